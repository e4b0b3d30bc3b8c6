"""Extraction throughput: `extract()` in this process and on Ray Data against a plain loop.

Plain loop: the HF image processor, then the full model with output_hidden_states, batch by
batch in this process, model and processor loading included. `extract()` end to end into a
fresh cache: in this process (what `sae-sweep extract` does on one machine without GPUs: no
Ray at all), and with --ray-data through Ray Data too (actor start and model load included;
`ray.init`, once, is printed apart). All load the same ViT-B/32-shaped checkpoint (random
weights) and read the same JPEG files; they alternate, --runs times, and the table gives
medians. A second table isolates the forward: 12 blocks against stopping after the layer.
A third times a model actor's loop without Ray on 500x375 JPEGs at batch 256 (`inner_loop`):
the CPU decoders (threads as before, processes) and nvJPEG where it runs, each alone and then
with the forward (float16 on a GPU), against the plain HF loop; `--inner-only` prints only it
(no Ray needed: the GPU check runs it).

    python benchmarks/bench_extract.py [--images 1024] [--batch-size 64] [--layer 9] [--runs 3]
        [--ray-data] [--device cpu|cuda] [--inner-batch 256] [--inner-only]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sweeps.activations.clip import capture_layers, load_vision_model
from sweeps.activations.extract import extract
from sweeps.config import from_mapping


def make_checkpoint(directory: Path) -> str:
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
    )
    CLIPVisionModel(config).save_pretrained(directory)
    CLIPImageProcessorPil().save_pretrained(directory)  # CLIP's 224 px defaults
    return str(directory)


def make_images(
    directory: Path, n: int, size=(400, 300), grid=(8, 8), detail=0.0, quality=75, seed=0
) -> list[Path]:
    """n distinct JPEGs of `size` (width, height): smooth noise (a random `grid` of colours,
    resized bicubic), plus Gaussian `detail` of that standard deviation, like photos in size
    and decode cost."""
    rng = np.random.default_rng(seed)
    directory.mkdir()
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, size=(*grid, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC))
        if detail:
            pixels = np.clip(pixels + rng.normal(0, detail, pixels.shape), 0, 255)
        paths.append(directory / f"{i:05d}.jpg")
        Image.fromarray(pixels.astype(np.uint8)).save(paths[-1], quality=quality)
    return paths


def plain_loop(checkpoint: str, paths: list[Path], batch_size: int, layer: int) -> float:
    """Seconds for the obvious loop, model and processor loading included."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    start = time.perf_counter()
    model = CLIPVisionModel.from_pretrained(checkpoint).eval()
    processor = CLIPImageProcessor.from_pretrained(checkpoint)
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            images = [Image.open(p) for p in paths[i : i + batch_size]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
            hidden[layer + 1][:, 0].numpy()
    return time.perf_counter() - start


def pipeline(
    checkpoint: str, folder: Path, cache_dir: Path, batch_size: int, layer: int, in_process: bool
):
    """Seconds for one extraction, end to end."""
    cfg = from_mapping(
        {
            "model": {"name_or_path": checkpoint},
            "data": {"source": "folder", "path": str(folder)},
            "extract": {"layers": [layer], "cache_dir": str(cache_dir), "batch_size": batch_size},
        }
    )
    start = time.perf_counter()
    extract(cfg, in_process=in_process)
    return time.perf_counter() - start


def make_photo_jpegs(directory: Path, n: int) -> list[Path]:
    """n ImageNet-like JPEGs: 500x375, quality 90, smooth content with fine detail."""
    return make_images(directory, n, (500, 375), (12, 16), detail=12.0, quality=90, seed=1)


def inner_loop(checkpoint: str, paths: list[Path], layer: int, device: str, batch: int = 256):
    """Images/s of a model actor's work on one batch, without Ray: each decoder alone (CPU
    threads, as before; CPU processes; nvJPEG on the device where it runs), the forward
    stopped after `layer` alone (float16 on a GPU), each decoder then the forward, and the
    plain HF loop (processor, then the full model) on the same batch. Medians of 3."""
    from transformers import CLIPImageProcessor

    from sweeps.activations.clip import Preprocessing
    from sweeps.activations.device_decode import decode_on_device, device_decoder_problem
    from sweeps.activations.sources import decode_batch, decode_image
    from sweeps.config import DataConfig

    cuda = device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    pre = Preprocessing.from_pretrained(checkpoint)
    model = load_vision_model(checkpoint, dtype=dtype).to(device)
    processor = CLIPImageProcessor.from_pretrained(checkpoint)
    data = DataConfig(source="folder", path=str(paths[0].parent))
    paths = (paths * (batch // len(paths) + 1))[:batch]
    index = {
        "row_id": np.arange(batch),
        "path": np.array([str(p) for p in paths], object),
        "label": np.full(batch, -1),
    }
    cores = os.cpu_count() or 1

    def threads():  # the decoder before this change: PIL in a thread pool
        with ThreadPoolExecutor(cores) as pool:
            decoded = list(pool.map(lambda p: decode_image(str(p), pre, 10**9)[0], paths))
        return torch.from_numpy(np.stack(decoded))

    def processes():
        return torch.from_numpy(decode_batch(index, data, pre, 10**9, processes=cores)["pixels"])

    def on_device():
        return decode_on_device(index, data, pre, 10**9, device)["pixels"]

    def forward(pixels):
        x = pre.normalize(pixels.to(device, non_blocking=True), dtype)
        return capture_layers(model, x, [layer])[layer].float().cpu()

    def plain():
        images = [Image.open(p) for p in paths]
        x = processor(images=images, return_tensors="pt")["pixel_values"].to(device, dtype)
        model(pixel_values=x, output_hidden_states=True).hidden_states[layer + 1][:, 0].cpu()

    decoders = {f"CPU, {cores} threads (before)": threads, f"CPU, {cores} processes": processes}
    problem = device_decoder_problem(pre, device)
    if problem is None:
        decoders["nvJPEG on the device"] = on_device
    pixels = processes()
    forward(pixels)  # warm-up: cuBLAS handles, allocator, the process pool
    cases = {f"decode: {name}": fn for name, fn in decoders.items()}
    cases["forward alone, stopped after the layer"] = lambda: forward(pixels)
    cases |= {
        f"decode then forward: {name}": (lambda f=fn: forward(f())) for name, fn in decoders.items()
    }
    cases["plain HF loop: processor, full model"] = plain
    rates = {}
    with torch.inference_mode():
        for name, fn in cases.items():
            fn()
            times = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            rates[name] = batch / statistics.median(times)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    return rates, name, problem


def forward_only(checkpoint: str, batch_size: int, layer: int, repeats: int = 3):
    """Best-of-repeats seconds per batch: all 12 blocks, and stopping after `layer`."""
    model = load_vision_model(checkpoint)
    pixels = torch.randn(batch_size, 3, 224, 224)
    full, stopped = [], []
    with torch.inference_mode():
        model(pixel_values=pixels)  # warm up
        for _ in range(repeats):  # interleaved, so background load hits both alike
            t = time.perf_counter()
            model(pixel_values=pixels, output_hidden_states=True)
            full.append(time.perf_counter() - t)
            t = time.perf_counter()
            capture_layers(model, pixels, [layer])
            stopped.append(time.perf_counter() - t)
    return min(full), min(stopped)


def decode_only(checkpoint: str, paths: list[Path]) -> float:
    """Seconds per image to read, decode and preprocess on one thread (as extraction does)."""
    from sweeps.activations.clip import Preprocessing
    from sweeps.activations.sources import decode_image

    pre = Preprocessing.from_pretrained(checkpoint)
    start = time.perf_counter()
    for path in paths:
        decode_image(str(path), pre, 10**9)
    return (time.perf_counter() - start) / len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--ray-data", action="store_true", help="also time extract() through Ray Data"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--inner-batch", type=int, default=256, help="batch of the model actor's loop table"
    )
    parser.add_argument("--inner-only", action="store_true", help="only the actor's loop table")
    args = parser.parse_args()
    if args.inner_only:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = make_checkpoint(Path(tmp) / "vit-b-32")
            photos = make_photo_jpegs(Path(tmp) / "photos", min(args.inner_batch, 512))
            print_inner(
                args, inner_loop(checkpoint, photos, args.layer, args.device, args.inner_batch)
            )
        return

    import ray

    t_ray = None
    plain, here, ray_data = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = make_checkpoint(tmp / "vit-b-32")
        paths = make_images(tmp / "images", args.images)
        n = len(paths)
        for run in range(args.runs):  # alternating, so background load hits both alike
            plain.append(plain_loop(checkpoint, paths, args.batch_size, args.layer))
            common = (checkpoint, tmp / "images", args.batch_size, args.layer)
            here.append(pipeline(common[0], common[1], tmp / f"here{run}", *common[2:], True))
            if not args.ray_data:
                continue
            if t_ray is None:
                start = time.perf_counter()
                # address="local": a fresh instance, never a cluster another process started
                ray.init(
                    address="local",
                    num_cpus=os.cpu_count(),
                    include_dashboard=False,
                    log_to_driver=False,
                )
                t_ray = time.perf_counter() - start
            ray_data.append(pipeline(common[0], common[1], tmp / f"ray{run}", *common[2:], False))
        t_full, t_stop = forward_only(checkpoint, args.batch_size, args.layer)
        t_decode = decode_only(checkpoint, paths[:128])
        photos = make_photo_jpegs(tmp / "photos", min(args.inner_batch, 512))
        inner = inner_loop(checkpoint, photos, args.layer, args.device, args.inner_batch)
    if ray.is_initialized():
        ray.shutdown()

    t_plain, t_here = statistics.median(plain), statistics.median(here)
    print(
        f"\n{n} images of 400x300, ViT-B/32 shape, random weights, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, layer {args.layer}, "
        f"median of {args.runs} alternating runs"
        + (f" (ray.init {t_ray:.1f} s, not counted)" if t_ray is not None else "")
        + "\n"
    )
    print("| path | seconds (runs) | images/s | vs plain loop |")
    print("|---|---:|---:|---:|")
    rows = [
        ("plain loop: HF processor + full model, output_hidden_states", t_plain, plain),
        (f"extract() in this process, end to end (layers [{args.layer}])", t_here, here),
    ]
    if ray_data:
        rows.append(("extract() on Ray Data, end to end", statistics.median(ray_data), ray_data))
    for name, t, runs in rows:
        each = ", ".join(f"{r:.0f}" for r in runs)
        print(f"| {name} | {t:.1f} ({each}) | {n / t:.1f} | {t_plain / t:.2f}x |")
    print(f"\n| forward, batch {args.batch_size} | ms/batch | speedup |")
    print("|---|---:|---:|")
    print(f"| all 12 blocks, output_hidden_states | {t_full * 1e3:.0f} | 1.00x |")
    print(f"| stop after layer {args.layer} | {t_stop * 1e3:.0f} | {t_full / t_stop:.2f}x |")
    per_image = t_stop / args.batch_size + t_decode / torch.get_num_threads()
    print(
        f"\nwhere the pipeline's time goes, per image: decode + preprocess {t_decode * 1e3:.1f} "
        f"ms on one thread, forward stopped after layer {args.layer} "
        f"{t_stop / args.batch_size * 1e3:.1f} ms on {torch.get_num_threads()} threads; the "
        f"rest of extract() in this process, {t_here - n * per_image:.1f} s of {t_here:.1f} s, "
        "is start-up (indexing, weight hash, model load) and what decoding adds to the forward"
    )
    print_inner(args, inner)


def print_inner(args, inner) -> None:
    rates, where, problem = inner
    print(
        f"\n| a model actor's loop, batch {args.inner_batch}, 500x375 JPEGs, {where}, "
        f"{os.cpu_count()} CPUs | images/s | vs plain HF loop |"
    )
    print("|---|---:|---:|")
    plain = rates["plain HF loop: processor, full model"]
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / plain:.2f}x |")
    if problem:
        print(f"(no nvJPEG rows: {problem})")


if __name__ == "__main__":
    main()
