"""The `sae-sweep` command line: one function per subcommand."""

from __future__ import annotations

import argparse
import os
import sys

from sweeps.config import ConfigError, config_help, load_config


def init_ray(address: str | None) -> None:
    """Connect to a cluster when an address is given (flag or RAY_ADDRESS), else start one."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def cmd_extract(args: argparse.Namespace) -> int:
    from sweeps.extract import extract

    cfg = load_config(args.config, args.set)
    init_ray(args.address)
    extract(cfg)
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: all defaults)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field (value parsed as YAML); repeatable",
    )
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-sweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    extract = sub.add_parser(
        "extract",
        help="cache CLIP vision activations of a dataset",
        epilog="config fields:\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(extract)
    extract.set_defaults(func=cmd_extract)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
