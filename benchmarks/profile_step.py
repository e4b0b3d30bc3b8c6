"""Profile one SAE training step (torch.profiler table), for finding where a step's time goes.

python benchmarks/profile_step.py [--device cuda] [--batch 500] [--latents 3072] [--k 64]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sae import SaeConfig, TrainConfig
from sae.trainer import Trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--latents", type=int, default=3072)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--d", type=int, default=768)
    args = parser.parse_args()
    acts = torch.randn(args.batch * 2, args.d)
    cfg = TrainConfig(batch_size=args.batch, val_fraction=0, steps=10**9, device=args.device)
    trainer = Trainer(acts, SaeConfig(num_latents=args.latents, k=args.k), cfg)
    x = acts[: args.batch].to(trainer.device)
    for _ in range(5):
        trainer.train_step(x)
    activities = [ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    steps = 10
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(x)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.key_averages()
    line = f"one step: {wall_ms:.2f} ms of wall time (under the profiler)"
    if trainer.device.type == "cuda":
        kernels_ms = sum(e.self_device_time_total for e in events) / 1e3 / steps
        line += f", {kernels_ms:.2f} ms of GPU kernels ({kernels_ms / wall_ms:.0%} busy)"
    print(line)
    sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=25))


if __name__ == "__main__":
    main()
