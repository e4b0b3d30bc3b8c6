"""`train_sae` end to end (batches read from the host, read-ahead, evaluation points) against
the training step alone, and trials sharing one device, as `tune.gpus_per_trial: 1/N` runs
them. Random activations, one epoch, no validation split.

    python benchmarks/bench_train_e2e.py [--device cpu|cuda] [--rows 2000000]
        [--batches 500 4096] [--trials 1 2 4 8] [--trial-rows 1000000] [--quick]

Prints two tables: end to end vs the step at each batch size (and the ratio), and the
activations per second of N trials training at once, in all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sae import SaeConfig, TrainConfig
from sae.trainer import CAPTURE_AFTER, Trainer

D, M, K = 768, 3072, 64


def _trainer(rows: int, batch: int, device: str) -> Trainer:
    acts = torch.randn(rows, D, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(batch_size=batch, val_fraction=0, device=device, lr=1e-4)
    return Trainer(acts, SaeConfig(num_latents=M, k=K), cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def end_to_end(rows: int, batch: int, device: str) -> float:
    """Activations/s of Trainer.fit over one epoch (what train_sae runs)."""
    trainer = _trainer(rows, batch, device)
    t0 = time.perf_counter()
    trainer.fit()
    _sync(trainer.device)
    return trainer.step * batch / (time.perf_counter() - t0)


def step_alone(batch: int, device: str, steps: int) -> float:
    """Median activations/s of the step on one batch already on the device."""
    trainer = _trainer(batch * 4, batch, device)
    x = trainer._batch(0).to(trainer.device)
    for _ in range(CAPTURE_AFTER + 3):
        trainer.train_step(x)
    times = []
    for _ in range(steps):
        _sync(trainer.device)
        t0 = time.perf_counter()
        trainer.train_step(x)
        _sync(trainer.device)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def worker(rows: int, batch: int, device: str, ready: Path, trials: int) -> None:
    """One trial: build, wait until every trial is built, train, print its time window."""
    trainer = _trainer(rows, batch, device)
    ready.joinpath(f"{id(trainer)}-{time.time_ns()}").touch()
    while len(list(ready.iterdir())) < trials:  # start together, whatever the import times
        time.sleep(0.01)
    start = time.time()
    trainer.fit()
    _sync(trainer.device)
    print(json.dumps({"start": start, "end": time.time(), "rows": trainer.step * batch}))


def shared(trials: int, rows: int, batch: int, device: str) -> float:
    """Activations/s in all of `trials` processes training at once on the device."""
    with tempfile.TemporaryDirectory() as ready:
        cmd = [sys.executable, __file__, "--worker", ready, "--device", device]
        cmd += ["--trial-rows", str(rows), "--batches", str(batch), "--trials", str(trials)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(trials)]
        outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a trial failed: exit codes {[p.returncode for p in procs]}")
    runs = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    window = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    return sum(r["rows"] for r in runs) / window


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows, end to end")
    parser.add_argument("--batches", type=int, nargs="+", default=[500, 4096])
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--trial-rows", type=int, default=1_000_000, help="rows per trial")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of the step alone")
    parser.add_argument(
        "--quick", action="store_true", help="rehearsal: 20,000 rows, trials of 5,000, 3 steps"
    )
    parser.add_argument("--worker", metavar="READY_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.trial_rows, args.batches[0], args.device, Path(args.worker), args.trials[0])
        return
    if args.quick:
        args.rows, args.trial_rows, args.steps = 20_000, 5_000, 3
    print(f"device={args.device} torch={torch.__version__} (d, M, k) = ({D}, {M}, {K})\n")
    print(f"train_sae end to end, {args.rows:,} rows, one epoch, activations/s\n")
    print("| B | end to end | step alone | end to end / step |\n| ---: | ---: | ---: | ---: |")
    for batch in args.batches:
        e2e = end_to_end(args.rows, batch, args.device)
        alone = step_alone(batch, args.device, args.steps)
        print(f"| {batch} | {e2e:,.0f} | {alone:,.0f} | {e2e / alone:.0%} |", flush=True)
    batch = args.batches[0]
    print(f"\ntrials sharing the device, each {args.trial_rows:,} rows at batch {batch}\n")
    print("| trials | activations/s in all | per trial |\n| ---: | ---: | ---: |")
    for n in args.trials:
        total = shared(n, args.trial_rows, batch, args.device)
        print(f"| {n} | {total:,.0f} | {total / n:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
