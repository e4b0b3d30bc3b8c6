"""Training from a layer larger than the trial's memory: peak resident memory and throughput of
a trial reading batches from the node's uncompressed copy (cache.MappedRows), against the same
trial holding the layer in memory, in one run.

The script writes an all-token activation cache of --gb gigabytes (float16 Parquet parts, as
extraction writes them), converts it with cache.layer_file (one process, peak memory measured),
then trains in fresh processes, alternating: mapped, in memory, mapped, in memory. Each child's
peak resident set comes from the kernel (wait4's ru_maxrss), which counts mapped file pages
while they are resident, so it is the figure a memory limit on the trial would see.

    python benchmarks/bench_mapped.py [--gb 4] [--budget-mib 1024] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sweeps import cache

TOKENS, D = 50, 768  # ViT-B/32: 49 patches + CLS, d_model 768
SHAPE = {"num_latents": 6144, "k": 32, "batch_size": 4096}  # the CPU step table's first row


def write_cache(root: Path, gb: float, images_per_part: int = 256) -> Path:
    """An all-token cache of about `gb` GB, generated part by part (never whole in memory)."""
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((1 << 16, D)).astype(np.float16)
    n_images = int(gb * 1e9 / (TOKENS * D * 2))
    run_dir = cache.start_run(root, "bench")
    parts = []
    for lo in range(0, n_images, images_per_part):
        ids = np.arange(lo, min(lo + images_per_part, n_images))
        rows = pool[rng.integers(0, len(pool), len(ids) * TOKENS)].reshape(len(ids), TOKENS, D)
        parts.append(cache.write_part(run_dir, ids, np.full(len(ids), -1), {9: rows}))
    manifest = {
        "key": f"bench-{n_images}",
        "layers": [9],
        "parts": parts,
        "d_model": D,
        "tokens_per_image": TOKENS,
        "dtype": "float16",
    }
    return cache.finish_run(run_dir, manifest)[0]


def child(args: list[str]) -> tuple[dict, float]:
    """Run this script's `--child` mode in a fresh process: (its JSON result, peak RSS MiB)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"child {args} failed with status {status}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def run_child(mode: str, cache_dir: str, arrays: str, steps: int) -> dict:
    if mode == "convert":
        start = time.perf_counter()
        for split in ("train", "val"):
            cache.layer_file(cache_dir, 9, split, root=arrays)
        return {"seconds": time.perf_counter() - start}

    import torch

    from sae import SaeConfig, TrainConfig
    from sae.trainer import Trainer

    paths = [cache.layer_file(cache_dir, 9, split, root=arrays) for split in ("train", "val")]
    if mode == "mapped":
        train, val = (cache.MappedRows(p) for p in paths)
    else:
        train, val = (np.load(p) for p in paths)
    sae_cfg = SaeConfig(num_latents=SHAPE["num_latents"], k=SHAPE["k"])
    cfg = TrainConfig(batch_size=SHAPE["batch_size"], steps=10**9, device="cpu", lr=1e-4)
    trainer = Trainer(train, sae_cfg, cfg, val_acts=val)
    for step in range(2):  # warm-up: allocations, the bf16 gate's one-time timing
        trainer.train_step(trainer._batch(step))
    times = []
    for step in range(2, 2 + steps):
        start = time.perf_counter()
        trainer.train_step(trainer._batch(step))  # the batch read is part of the step here
        times.append(time.perf_counter() - start)
    return {
        "acts_per_s": SHAPE["batch_size"] / float(np.median(times)),
        "train_gb": len(train) * D * 2 / 1e9,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=4.0, help="size of the cached layer")
    parser.add_argument("--budget-mib", type=float, default=1024, help="trial memory budget")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per child")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "CACHE", "ARRAYS", "STEPS"))
    args = parser.parse_args()
    if args.child:
        mode, cache_dir, arrays, steps = args.child
        print(json.dumps(run_child(mode, cache_dir, arrays, int(steps))))
        return

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        cache_dir = str(write_cache(tmp / "cache", args.gb))
        t_write = time.perf_counter() - start
        arrays = str(tmp / "arrays")
        conv, conv_rss = child(["convert", cache_dir, arrays, "0"])
        results = {"mapped": [], "memory": []}
        for mode in ("mapped", "memory", "mapped", "memory"):
            results[mode].append(child([mode, cache_dir, arrays, str(args.steps)]))

    layer_gb = results["mapped"][0][0]["train_gb"]
    print(
        f"\nall-token layer: {layer_gb:.2f} GB of float16 training rows (d={D}, {TOKENS} tokens "
        f"per image), SAE M={SHAPE['num_latents']} k={SHAPE['k']}, batch {SHAPE['batch_size']} "
        f"rows, {results['mapped'][0][0]['threads']} threads, {os.cpu_count()} CPUs; "
        f"budget {args.budget_mib:.0f} MiB for the trial process "
        f"(the layer is {layer_gb * 1e9 / 2**20 / args.budget_mib:.1f}x the budget)\n"
    )
    print(
        f"Parquet cache written in {t_write:.0f} s; cache.layer_file: {conv['seconds']:.0f} s, "
        f"peak RSS {conv_rss:.0f} MiB\n"
    )
    print("| trial reads | act/s (median step, 2 runs) | peak RSS MiB (max of 2) | within budget |")
    print("|---|---:|---:|---|")
    rates = {}
    for mode, name in (("mapped", "MappedRows (memory map)"), ("memory", "whole layer in memory")):
        rate = float(np.median([r["acts_per_s"] for r, _ in results[mode]]))
        rss = max(m for _, m in results[mode])
        rates[mode] = rate
        print(
            f"| {name} | {rate:,.0f} | {rss:,.0f} | {'yes' if rss <= args.budget_mib else 'no'} |"
        )
    print(f"\nmapped / in memory throughput: {rates['mapped'] / rates['memory']:.2f}x")


if __name__ == "__main__":
    main()
