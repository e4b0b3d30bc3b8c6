"""Entry point of the sweep service: `python run_sweep.py extract --config FILE`."""

import sys

from sweeps.cli import main

if __name__ == "__main__":
    sys.exit(main())
