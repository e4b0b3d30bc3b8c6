"""Training from a layer larger than the trial's memory: peak resident memory and throughput of
a trial reading batches from the node's uncompressed copy (cache.RowFile), against the same
trial holding the layer in memory, in one run.

It writes an all-token layer of --gb gigabytes as the .npy files cache.layer_file makes (train
and validation), then trains in fresh processes, alternating: file, in memory, file, in memory.
Each child reports its own peak resident set (VmHWM): the figure a memory limit on the trial
would see. The conversion from Parquet (cache.layer_file) is timed on a --convert-gb cache, in
a child of its own.

    python benchmarks/bench_mapped.py [--gb 4] [--budget-mib 1280] [--steps 20]
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

from sweeps.activations import cache

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


def write_npy(path: Path, rows: int, seed: int, chunk: int = 1 << 16) -> Path:
    """A float16 (rows, D) .npy like layer_file's, written chunk by chunk."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((chunk, D)).astype(np.float16)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f2", "fortran_order": False, "shape": (rows, D)}
        )
        for lo in range(0, rows, chunk):
            f.write(pool[rng.integers(0, chunk, min(chunk, rows - lo))].tobytes())
    return path


def child(args: list[str]) -> dict:
    """Run this script's `--child` mode in a fresh process; its JSON result."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def run_child(mode: str, first: str, second: str, steps: int) -> dict:
    if mode == "convert":  # first: a cache directory, second: the arrays root
        start = time.perf_counter()
        paths = [cache.layer_file(first, 9, split, root=second) for split in ("train", "val")]
        seconds = time.perf_counter() - start
        gb = sum(p.stat().st_size for p in paths) / 1e9
        return {"seconds": seconds, "gb": gb, "peak_mib": peak_rss_mib()}

    import torch

    from sae import SaeConfig, TrainConfig
    from sae.trainer import Trainer

    if mode == "mapped":  # first, second: the train and validation .npy files
        train, val = cache.RowFile(first), cache.RowFile(second)
    else:
        train, val = np.load(first), np.load(second)
    sae_cfg = SaeConfig(num_latents=SHAPE["num_latents"], k=SHAPE["k"])
    cfg = TrainConfig(batch_size=SHAPE["batch_size"], steps=10**9, device="cpu", lr=1e-4)
    trainer = Trainer(train, sae_cfg, cfg, val_acts=val)
    batches = trainer._read_ahead()  # fit's loop: the next batch is read while a step runs
    for _ in range(2):  # warm-up: allocations, the bf16 gate's one-time timing
        trainer.train_step(next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    seconds = time.perf_counter() - start
    return {
        "acts_per_s": steps * SHAPE["batch_size"] / seconds,
        "train_gb": len(train) * D * 2 / 1e9,
        "threads": torch.get_num_threads(),
        "peak_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=4.0, help="size of the layer's train rows")
    parser.add_argument("--budget-mib", type=float, default=1280, help="trial memory budget")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per child")
    parser.add_argument("--convert-gb", type=float, default=0.2, help="Parquet cache to convert")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "A", "B", "STEPS"))
    args = parser.parse_args()
    if args.child:
        mode, first, second, steps = args.child
        print(json.dumps(run_child(mode, first, second, int(steps))))
        return

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        cache_dir = str(write_cache(tmp / "cache", args.convert_gb))
        conv = child(["convert", cache_dir, str(tmp / "arrays"), "0"])
        rows = int(args.gb * 1e9 / (D * 2))
        train = write_npy(tmp / "train.npy", rows, 0)
        val = write_npy(tmp / "val.npy", rows // 19, 1)  # val_fraction 0.05
        results = {"mapped": [], "memory": []}
        for mode in ("mapped", "memory", "mapped", "memory"):
            results[mode].append(child([mode, str(train), str(val), str(args.steps)]))

    layer_gb = results["mapped"][0]["train_gb"]
    print(
        f"\nall-token layer: {layer_gb:.2f} GB of float16 training rows (d={D}), SAE "
        f"M={SHAPE['num_latents']} k={SHAPE['k']}, batch {SHAPE['batch_size']} rows, "
        f"{results['mapped'][0]['threads']} threads, {os.cpu_count()} CPUs; budget "
        f"{args.budget_mib:.0f} MiB for the trial process (the layer is "
        f"{layer_gb * 1e9 / 2**20 / args.budget_mib:.1f}x the budget)\n"
    )
    print(
        f"cache.layer_file from Parquet: {conv['gb']:.2f} GB in {conv['seconds']:.0f} s "
        f"({conv['gb'] * 1e3 / conv['seconds']:.0f} MB/s), peak RSS {conv['peak_mib']:.0f} MiB\n"
    )
    print("| trial reads | act/s (median, 2 runs) | peak RSS MiB (max of 2) | within budget |")
    print("|---|---:|---:|---|")
    rates = {}
    names = {"mapped": "RowFile (reads from the node copy)", "memory": "whole layer in memory"}
    for mode, name in names.items():
        rate = float(np.median([r["acts_per_s"] for r in results[mode]]))
        rss = max(r["peak_mib"] for r in results[mode])
        rates[mode] = rate
        ok = "yes" if rss <= args.budget_mib else "no"
        print(f"| {name} | {rate:,.0f} | {rss:,.0f} | {ok} |")
    print(f"\nfile / in memory throughput: {rates['mapped'] / rates['memory']:.2f}x")


if __name__ == "__main__":
    main()
