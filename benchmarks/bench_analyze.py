"""Analysis throughput vs a plain batched encode, its peak memory at two dataset sizes (CLS
and all-token caches), and the size and build time of the HTML feature browser.

    python benchmarks/bench_analyze.py [--images 20000] [--d 768] [--expansion 8] [--k 32]
        [--only throughput,memory,tokens,browser]

Throughput, one run on the same synthetic cache: a plain batched `sae.encode` over the layer
in memory, the same encode streamed from the Parquet cache, and the whole `scan.scan`
(statistics, top images, probe sums, then the probe's validation pass). Memory: each size runs
`scan` in a fresh subprocess and reports its peak RSS over the RSS before the scan (on CUDA,
the peak of allocated GPU memory); a whole-layer `load_layer` is measured the same way for
contrast. Tokens: the same for an all-token cache of T=50 tokens per image at M=24576
latents. Browser: report.html, latents.csv and thumbs/ for M=6144 latents with 16 top images
each, from a folder of JPEG photo crops (matplotlib's sample photo).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm

import argparse
import shutil
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
from sweeps.activations import cache  # noqa: E402
from sweeps.activations.clip import Preprocessing  # noqa: E402
from sweeps.activations.sources import index_source  # noqa: E402
from sweeps.config import DataConfig  # noqa: E402
from sweeps.results import analyze, report, scan  # noqa: E402

LAYER = 0


def make_cache(
    root: Path, n: int, d: int, part_rows: int = 4096, tokens: int = 0, labels=None
) -> Path:
    """n random float16 activations in parts of part_rows, (n, d) or with `tokens`
    (n, tokens, d), with the given labels (default: 10 random ones)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n) if labels is None else labels
    key = f"bench{n}x{tokens}x{d}"
    run_dir = cache.start_run(root, key)
    parts = []
    for lo in range(0, n, part_rows):
        hi = min(n, lo + part_rows)
        shape = (hi - lo, tokens, d) if tokens else (hi - lo, d)
        acts = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
        parts.append(cache.write_part(run_dir, np.arange(lo, hi), labels[lo:hi], {LAYER: acts}))
    manifest = {"key": key, "layers": [LAYER], "parts": parts, "rows": n}
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
    for _, _, x_BTD in cache.iter_layer(cache_dir, LAYER, batch_size):
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
    """Child side of peak_rss_mb: prints peak memory during the work minus memory before it,
    in MB: RSS on the CPU, allocated GPU memory where CUDA runs the scan."""
    sae = make_sae(d, expansion, k)
    cuda = mode == "scan" and torch.cuda.is_available()
    if cuda:
        sae = sae.cuda()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak (VmHWM) to now
    before_rss = _status_mb("VmRSS")
    if mode == "scan":
        scan.scan(sae, cache_dir, LAYER, top_n=16, batch_size=batch)
    else:
        cache.load_layer(cache_dir, LAYER, "all").astype(np.float32)
    if cuda:
        print(torch.cuda.max_memory_allocated() / 2**20 - before)
    else:
        print(_status_mb("VmHWM") - before_rss)


def photo_folder(root: Path, n: int, classes: int = 100) -> Path:
    """n JPEG crops of matplotlib's sample photo (varied position, scale, flip and colour),
    in `classes` class folders: thumbnails of real-photo texture, not of noise or flat colour."""
    from matplotlib import cbook
    from PIL import Image, ImageEnhance

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    rng = np.random.default_rng(0)
    w, h = photo.size
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        side = int(rng.integers(min(w, h) // 4, min(w, h)))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        img = photo.crop((x, y, x + side, y + side)).resize((256, 256))
        img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.3, 1.7)))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img.save(root / f"class{i % classes:03d}" / f"{i:06d}.jpg", quality=90)
    return root


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def bench_browser(tmp: Path, n: int, latents: int, top_n: int, d: int = 64, k: int = 32) -> None:
    """The report folder of an SAE with `latents` latents and top_n images each: build time of
    each step and the folder's size."""
    start = time.perf_counter()
    images = photo_folder(tmp / "photos", n)
    data = DataConfig(source="folder", path=str(images))
    source = index_source(data)
    made = time.perf_counter() - start
    labels = source.index["label"].to_numpy()
    cache_dir = make_cache(tmp, n, d, labels=labels)
    torch.manual_seed(0)
    sae = TopKSae(d, SaeConfig(num_latents=latents, k=k)).eval()
    stats, _ = scan.scan(sae, cache_dir, LAYER, top_n=top_n)
    out = tmp / "report"
    out.mkdir()
    chosen = scan.select_latents(stats, "max_act", 0)
    names = [f"class{c:03d}" for c in range(labels.max() + 1)]
    steps = {}
    start = time.perf_counter()
    thumbs = analyze.write_thumbnails(stats, chosen, source, data, Preprocessing(), out / "thumbs")
    steps["thumbnails (decode, crop, JPEG)"] = time.perf_counter() - start
    start = time.perf_counter()
    figure = report.frequency_histogram(stats.frequency_M, out / "frequency.png")
    analyze.write_latent_table(stats, names, out / "latents.csv")
    browser = analyze.browser_data(stats, chosen, names, "cls", "max_act")
    report.write_html(out / "report.html", "bench", stats.summary, {}, {"f": figure}, browser)
    steps["browser data, latents.csv, report.html"] = time.perf_counter() - start
    thumb_mb = folder_mb(out / "thumbs")
    rest_mb = folder_mb(out) - thumb_mb
    slots = len(chosen) * top_n
    print(
        f"\nfeature browser: {latents} latents ({len(chosen)} live), {top_n} top images each, "
        f"{n} photo crops in {labels.max() + 1} classes (made in {made:.0f} s)"
    )
    print(f"{'step':44s} {'seconds':>8s}")
    for name, s in steps.items():
        print(f"{name:44s} {s:8.2f}")
    print(f"{'thumbnails written':44s} {thumbs:8d}  ({thumbs / sum(steps.values()):.0f}/s)")
    print(f"{'thumbs/ (MB)':44s} {thumb_mb:8.1f}  ({1024 * thumb_mb / thumbs:.1f} KB each)")
    print(f"{'report.html + latents.csv + frequency.png (MB)':44s} {rest_mb:8.2f}")
    print(f"{'report folder (MB)':44s} {folder_mb(out):8.1f}")
    worst = f"worst case, all {slots} top images distinct (MB)"
    print(f"{worst:44s} {rest_mb + slots * thumb_mb / thumbs:8.1f}")
    shutil.rmtree(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--memory-images", type=int, default=5000, help="the smaller size")
    parser.add_argument("--token-images", type=int, default=100, help="all-token: smaller size")
    parser.add_argument("--browser-images", type=int, default=20000)
    parser.add_argument("--only", default="throughput,memory,tokens,browser")
    args = parser.parse_args()
    only = set(args.only.split(","))
    n, d, bs = args.images, args.d, args.batch_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        if "throughput" in only:
            cache_dir = make_cache(Path(tmp), n, d)
            sae = make_sae(d, args.expansion, args.k)
            x_ND = torch.from_numpy(cache.load_layer(cache_dir, LAYER, "all"))
            plain_encode(sae, x_ND[:bs], bs)  # warm-up
            rows = [
                ("plain batched encode (in memory)", timed(lambda: plain_encode(sae, x_ND, bs))),
                (
                    "encode streamed from the cache",
                    timed(lambda: streamed_encode(sae, cache_dir, bs)),
                ),
                (
                    "scan.scan (stats+top+probe, 2 passes)",
                    timed(lambda: scan.scan(sae, cache_dir, LAYER, top_n=16, batch_size=bs)),
                ),
            ]
            base = rows[0][1]
            print(
                f"throughput: {n} activations, d={d}, {sae.num_latents} latents, k={args.k}, "
                f"batch {bs}, {torch.get_num_threads()} threads, cpu"
            )
            print(f"{'method':44s} {'seconds':>8s} {'acts/s':>10s} {'vs plain':>9s}")
            for name, s in rows:
                print(f"{name:44s} {s:8.2f} {n / s:10.0f} {base / s:9.2f}x")

        if "memory" in only:
            small = args.memory_images
            print(
                f"\npeak memory growth (MB, fresh process each), {args.expansion}x SAE, "
                f"batch {bs}, scan on {device}"
            )
            print(f"{'method':32s} {small:>10d} {10 * small:>10d} {'ratio':>7s}")
            caches = [make_cache(Path(tmp), m, d) for m in (small, 10 * small)]
            modes = {
                "scan": "scan.scan",
                "scan/mmap": "scan.scan, fixed mmap thr.",
                "load": "load_layer (whole layer)",
            }
            for mode, label in modes.items():
                mb = [peak_rss_mb(mode, c, d, args.expansion, args.k, bs) for c in caches]
                print(f"{label:32s} {mb[0]:10.1f} {mb[1]:10.1f} {mb[1] / max(mb[0], 1e-9):6.2f}x")

        if "tokens" in only:
            small, t, expansion = args.token_images, 50, 32
            m = d * expansion
            print(
                f"\nall-token mode: T={t} tokens per image, d={d}, {m} latents, k={args.k}, scan "
                f"on {device}; peak memory growth (MB, fresh process each)"
            )
            print(f"{'batch (tokens)':32s} {small:>10d} {4 * small:>10d} {'ratio':>7s}")
            # Parts of 64 images, as extraction writes them: a part is decoded whole.
            sizes = (small, 4 * small)
            caches = [make_cache(Path(tmp), i, d, part_rows=64, tokens=t) for i in sizes]
            for batch in (bs, 4 * bs):
                mb = [peak_rss_mb("scan/mmap", c, d, expansion, args.k, batch) for c in caches]
                print(f"{batch:<32d} {mb[0]:10.1f} {mb[1]:10.1f} {mb[1] / max(mb[0], 1e-9):6.2f}x")
            dense = 1024 * t * m * 4 / 2**20
            print(f"(one dense (B*T, M) float32 tensor at B=1024 images: {dense:,.0f} MB)")

        if "browser" in only:
            bench_browser(Path(tmp), args.browser_images, latents=6144, top_n=16)


if __name__ == "__main__":
    main()
