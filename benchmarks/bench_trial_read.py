"""How fast each way of reading a sweep's trials back from MLflow is, at sweep sizes.

It creates an MLflow SQLite store in a temporary directory, logs a sweep's parent run
(`sweeps.tracking.runs.start_sweep_run`) and trial runs through the project's own trial
logging (`sweeps.tracking.trial_runs.TrialRuns`, as the Tune callback drives it: the demo
config's fixed params, the searched ones, each metric of `schema.METRIC_KEYS` at a few steps
and under its final name, a stopped or failed trial's tags), growing the sweep to each size
in turn. At each size it times both paths of `sweeps.tracking.records.trial_records`,
returning the trials best first by `fvu`, as `best` asks (median of --repeats reads):

- `client`: MlflowClient (`_client_records`), the store open;
- `client cold`: the same in a new Python process (importing mlflow and opening the store
  counted), as one `sae-sweep best` pays it;
- `sql` (and `sql cold`): the SQL that reads a SQLite store (`_sqlite_records`);
- with --server, MlflowClient against a real `mlflow server` on 127.0.0.1 (a free port) over
  the same store, stopped at the end.

A REST reader with its own HTTP client was measured too and removed (docs/performance.md).

    python benchmarks/bench_trial_read.py --sizes 100 1000 5000 --server

Printed: one table of path, trials, median seconds and the ratio to MlflowClient on the same
store (warm to warm, cold to cold). A few minutes at the default sizes on 2 cores, most of
it logging the 5,000 trials.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = "bench"
SWEEP_ID = "/tmp/bench/sweep"


def log_trials(uri: str, parent: str, start: int, stop: int, steps: int) -> None:
    """Trials start..stop-1 as the Tune callback logs them: opened with the fixed and searched
    params, each metric at `steps` steps, the final names at the end, then closed; every tenth
    stopped early and every twentieth failed."""
    from sweeps.cli import DEMO_CONFIG
    from sweeps.config import fixed_fields, load_config
    from sweeps.tracking.trial_runs import TrialRuns
    from sweeps.vocabulary import METRIC_KEYS, final_name, trial_label

    cfg = load_config(DEMO_CONFIG, [])
    shared = {"sae": fixed_fields(cfg, "sae"), "train": fixed_fields(cfg, "train")}
    shared |= {"tokens_per_image": 50, "model": {"name_or_path": cfg.model.name_or_path}}
    runs = TrialRuns(uri, parent, shared)
    rng = random.Random(start)
    for i in range(start, stop):
        trial_id = f"t{i:05d}"
        config = {
            "layer": rng.choice([2, 4]),
            "expansion_factor": rng.choice([2, 4, 8]),
            "k": rng.choice([8, 16, 32]),
            "lr": 10 ** rng.uniform(-4, -2),
            "activation": "topk",
            "l0_coefficient": 0.0,
            "auxk_alpha": 1 / 32,
        }
        run_id = runs.open(trial_id, trial_label(config), config)
        values = {}
        for step in range(steps):
            values = {k: rng.random() for k in METRIC_KEYS}
            runs.log(run_id, trial_id, values, step)
        runs.log(run_id, trial_id, {final_name(k): v for k, v in values.items()}, steps)
        status, tags = "FINISHED", {}
        if i % 20 == 19:
            status, tags = "FAILED", {"error": "RuntimeError: diverged"}
        elif i % 10 == 9:
            tags = {"stopped_early": "true"}
        runs.tag(run_id, tags)
        runs.close(trial_id, status)


def read_once(path: str, uri: str, top: int) -> int:
    """Read the sweep's trials by `path` once; how many came back."""
    from sweeps.tracking import records

    args = (EXPERIMENT, SWEEP_ID, "fvu", True, top, True)
    if path == "sql":
        return len(records._sqlite_records(uri.removeprefix("sqlite:///"), *args))
    return len(records._client_records(uri, *args))


def timed(path: str, uri: str, top: int, repeats: int, cold: bool, expect: int) -> float:
    """The median seconds of `repeats` reads (each in a new process with `cold`)."""
    times = []
    for _ in range(repeats):
        if cold:
            code = (
                f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                "from benchmarks.bench_trial_read import read_once; "
                f"print(read_once({path!r}, {uri!r}, {top}))"
            )
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
            )
            times.append(time.perf_counter() - t0)
            n = int(out.stdout.split()[-1])
        else:
            t0 = time.perf_counter()
            n = read_once(path, uri, top)
            times.append(time.perf_counter() - t0)
        assert n == expect, f"{path} read {n} trials, expected {expect}"
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100, 1000, 5000],
        help="sweep sizes (trial runs) to time at, ascending: the store grows to each in turn",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="reads per path and size; the median is shown"
    )
    parser.add_argument(
        "--cold-repeats",
        type=int,
        default=3,
        help="reads in a new Python process per path and size (0: no cold rows)",
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="evaluations each trial logs its metrics at"
    )
    parser.add_argument(
        "--server",
        action="store_true",
        help="also time reading through a real `mlflow server` on 127.0.0.1 over the store",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the store goes (default: a temporary dir)"
    )
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")

    with contextlib.ExitStack() as stack:
        root = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        store = f"sqlite:///{root / 'mlflow.db'}"
        from sweeps.tracking.runs import start_sweep_run

        parent = start_sweep_run(store, EXPERIMENT, SWEEP_ID, {"tune": {"num_samples": 1}}, {})
        server = None
        if args.server:  # the suite's real `mlflow server`, started and stopped the same way
            from tests.helpers import mlflow_server

            server = stack.enter_context(mlflow_server(root, store, root / "artifacts"))
        rows = []
        logged = 0
        for size in sorted(args.sizes):
            t0 = time.perf_counter()
            log_trials(store, parent, logged, size, args.steps)
            print(f"logged trials {logged}..{size - 1} in {time.perf_counter() - t0:.0f} s")
            logged = size
            finished = size - size // 20  # every twentieth failed
            for uri, kinds in [(store, ("client", "sql")), (server, ("client",))]:
                if uri is None:
                    continue
                where = "sqlite" if uri == store else "server"
                for cold, repeats in ((False, args.repeats), (True, args.cold_repeats)):
                    if repeats < 1:
                        continue
                    base = None
                    for path in kinds:
                        s = timed(path, uri, 50_000, repeats, cold, finished)
                        base = s if path == "client" else base
                        name = f"{path}{' cold' if cold else ''} ({where})"
                        rows.append((name, size, s, s / base))
                        print(f"  {name:22s} {size:6d} trials: {s:.3f} s", flush=True)
        print("\npath                     trials  median s  / client")
        for name, size, s, ratio in rows:
            print(f"{name:24s} {size:6d}  {s:8.3f}  {ratio:8.2f}")


if __name__ == "__main__":
    main()
