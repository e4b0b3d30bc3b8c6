"""Analysis throughput vs a plain batched encode, and its peak memory at two dataset sizes.

    python benchmarks/bench_analyze.py [--images 20000] [--d 768] [--expansion 8] [--k 32]

Throughput, one run on the same synthetic cache: a plain batched `sae.encode` over the layer
in memory, the same encode streamed from the Parquet cache, and the whole `analysis.scan`
(statistics, top images, probe sums, then the probe's validation pass). Memory: each size runs
`scan` in a fresh subprocess and reports its peak RSS over the RSS before the scan; a whole-
layer `load_layer` is measured the same way for contrast.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae import SaeConfig, TopKSae  # noqa: E402
from sweeps import analysis, cache  # noqa: E402

LAYER = 0


def make_cache(root: Path, n: int, d: int, part_rows: int = 4096) -> Path:
    """n random float16 CLS activations in parts of part_rows, with 10 labels."""
    rng = np.random.default_rng(0)
    run_dir = cache.start_run(root, f"bench{n}")
    parts = []
    for lo in range(0, n, part_rows):
        hi = min(n, lo + part_rows)
        acts = rng.standard_normal((hi - lo, d), dtype=np.float32).astype(np.float16)
        labels = rng.integers(0, 10, hi - lo)
        parts.append(cache.write_part(run_dir, np.arange(lo, hi), labels, {LAYER: acts}))
    manifest = {"key": f"bench{n}", "layers": [LAYER], "parts": parts, "rows": n}
    return cache.finish_run(run_dir, manifest)[0]


def make_sae(d: int, expansion: int, k: int) -> TopKSae:
    torch.manual_seed(0)
    return TopKSae(d, SaeConfig(expansion_factor=expansion, k=k)).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def plain_encode(sae, x_ND: torch.Tensor, batch_size: int) -> None:
    for start in range(0, len(x_ND), batch_size):
        sae.encode(x_ND[start : start + batch_size].float())


@torch.no_grad()
def streamed_encode(sae, cache_dir: Path, batch_size: int) -> None:
    for _, _, x_BTD in analysis.iter_layer(cache_dir, LAYER, batch_size):
        sae.encode(x_BTD.flatten(0, 1))


def peak_rss_mb(mode: str, cache_dir: Path, d: int, expansion: int, k: int, batch: int) -> float:
    """Peak RSS growth (MB) of one measurement in a fresh process. Mode "scan/mmap" fixes
    glibc's mmap threshold at 1 MiB: glibc otherwise raises it as large blocks are freed, and
    the heap fragmentation that follows is allocator growth, not data the scan holds."""
    env = dict(os.environ)
    if mode.endswith("/mmap"):
        mode, env["MALLOC_MMAP_THRESHOLD_"] = mode.removesuffix("/mmap"), str(1 << 20)
    args = f"{mode!r}, {str(cache_dir)!r}, {d}, {expansion}, {k}, {batch}"
    code = f"from benchmarks.bench_analyze import measure; measure({args})"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def _status_mb(field: str) -> float:
    line = next(
        x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field)
    )
    return int(line.split()[1]) / 1024  # kB


def measure(mode: str, cache_dir: str, d: int, expansion: int, k: int, batch: int) -> None:
    """Child side of peak_rss_mb: prints peak RSS during the work minus RSS before it, in MB."""
    sae = make_sae(d, expansion, k)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to now
    before = _status_mb("VmRSS")
    if mode == "scan":
        analysis.scan(sae, cache_dir, LAYER, top_n=16, batch_size=batch)
    else:
        cache.load_layer(cache_dir, LAYER, "all").astype(np.float32)
    print(_status_mb("VmHWM") - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--memory-images", type=int, default=5000, help="the smaller size")
    args = parser.parse_args()
    n, d, bs = args.images, args.d, args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = make_cache(Path(tmp), n, d)
        sae = make_sae(d, args.expansion, args.k)
        x_ND = torch.from_numpy(cache.load_layer(cache_dir, LAYER, "all"))
        plain_encode(sae, x_ND[:bs], bs)  # warm-up
        rows = [
            ("plain batched encode (in memory)", timed(lambda: plain_encode(sae, x_ND, bs))),
            ("encode streamed from the cache", timed(lambda: streamed_encode(sae, cache_dir, bs))),
            (
                "analysis.scan (stats+top+probe, 2 passes)",
                timed(lambda: analysis.scan(sae, cache_dir, LAYER, top_n=16, batch_size=bs)),
            ),
        ]
        base = rows[0][1]
        print(
            f"throughput: {n} activations, d={d}, {sae.num_latents} latents, k={args.k}, "
            f"batch {bs}, {torch.get_num_threads()} threads, "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
        )
        print(f"{'method':44s} {'seconds':>8s} {'acts/s':>10s} {'vs plain':>9s}")
        for name, s in rows:
            print(f"{name:44s} {s:8.2f} {n / s:10.0f} {base / s:9.2f}x")

        small = args.memory_images
        print(f"\npeak memory growth (MB, fresh process each), {args.expansion}x SAE, batch {bs}")
        print(f"{'method':32s} {small:>10d} {10 * small:>10d} {'ratio':>7s}")
        caches = [make_cache(Path(tmp), m, d) for m in (small, 10 * small)]
        modes = {
            "scan": "analysis.scan",
            "scan/mmap": "analysis.scan, fixed mmap thr.",
            "load": "load_layer (whole layer)",
        }
        for mode, label in modes.items():
            mb = [peak_rss_mb(mode, c, d, args.expansion, args.k, bs) for c in caches]
            print(f"{label:32s} {mb[0]:10.1f} {mb[1]:10.1f} {mb[1] / max(mb[0], 1e-9):6.2f}x")


if __name__ == "__main__":
    main()
