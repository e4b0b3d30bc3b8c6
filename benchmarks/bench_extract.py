"""Extraction throughput: the Ray Data pipeline against a plain loop, in one run.

Plain loop: the HF image processor, then the full model with output_hidden_states, batch by
batch in this process. Pipeline: `sweeps.extract.extract` end to end (actor start and model
load included), decoding in CPU tasks while the actor runs a forward stopped after the
deepest requested layer. Both load the same ViT-B/32-shaped checkpoint (random weights) and
read the same JPEG files. A second table isolates the forward: 12 blocks against stopping
after layer 9.

    python benchmarks/bench_extract.py [--images 1024] [--batch-size 64] [--layer 9]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sae.clip import capture_layers, load_vision_model
from sweeps.config import from_mapping
from sweeps.extract import extract


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


def make_images(directory: Path, n: int) -> list[Path]:
    """n distinct 400x300 JPEGs: smooth noise, like photos in size and decode cost."""
    rng = np.random.default_rng(0)
    directory.mkdir()
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        path = directory / f"{i:05d}.jpg"
        Image.fromarray(coarse).resize((400, 300), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
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


def pipeline(checkpoint: str, folder: Path, cache_dir: Path, batch_size: int, layer: int):
    cfg = from_mapping(
        {
            "model": {"name_or_path": checkpoint},
            "data": {"source": "folder", "path": str(folder)},
            "extract": {"layers": [layer], "cache_dir": str(cache_dir), "batch_size": batch_size},
        }
    )
    start = time.perf_counter()
    extract(cfg)
    return time.perf_counter() - start


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--layer", type=int, default=9)
    args = parser.parse_args()

    import ray

    os.environ.setdefault("TQDM_DISABLE", "1")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = make_checkpoint(tmp / "vit-b-32")
        paths = make_images(tmp / "images", args.images)
        n = len(paths)
        t_plain = plain_loop(checkpoint, paths, args.batch_size, args.layer)
        t_pipe = pipeline(checkpoint, tmp / "images", tmp / "cache", args.batch_size, args.layer)
        t_full, t_stop = forward_only(checkpoint, args.batch_size, args.layer)
    ray.shutdown()

    print(
        f"\n{n} images of 400x300, ViT-B/32 shape, random weights, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, layer {args.layer}\n"
    )
    print("| path | images/s | vs plain loop |")
    print("|---|---:|---:|")
    rows = [
        ("plain loop: HF processor + full model, output_hidden_states", n / t_plain),
        (f"pipeline, end to end (layers [{args.layer}])", n / t_pipe),
    ]
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {rate * t_plain / n:.2f}x |")
    print(f"\n| forward, batch {args.batch_size} | ms/batch | speedup |")
    print("|---|---:|---:|")
    print(f"| all 12 blocks, output_hidden_states | {t_full * 1e3:.0f} | 1.00x |")
    print(f"| stop after layer {args.layer} | {t_stop * 1e3:.0f} | {t_full / t_stop:.2f}x |")


if __name__ == "__main__":
    main()
