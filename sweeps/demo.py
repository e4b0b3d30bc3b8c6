"""The offline demo: a tiny random CLIP and generated images, then a real sweep over them.

Also the material the tests build on: nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_IMAGE_SIZE = 32


def make_tiny_clip(
    directory,
    num_layers: int = 4,
    hidden_size: int = 32,
    image_size: int = TINY_IMAGE_SIZE,
    patch_size: int = 8,
    full_clip: bool = False,
    seed: int = 0,
) -> str:
    """Save a random CLIPVisionModel (or a whole CLIPModel) plus its image processor config."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    vision = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    if full_clip:
        text = dict(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=49408,
        )
        model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    directory = str(directory)
    with _quiet_progress():
        model.save_pretrained(directory)
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(directory)
    return directory


@contextlib.contextmanager
def _quiet_progress():
    """transformers' "Writing model shards" bar, noise for a model of a few kB."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def random_image(rng: np.random.Generator, h: int | None = None, w: int | None = None):
    """A smooth random RGB image (so JPEG round trips stay close), sizes 24..64 by default."""
    h = h or int(rng.integers(24, 65))
    w = w or int(rng.integers(24, 65))
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)


def make_image_folder(root, n: int = 24, classes=("cat", "dog"), seed: int = 0) -> str:
    """An ImageFolder: root/<class>/<i>.png, images of varied sizes."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for i in range(n):
        cls = classes[i % len(classes)]
        (root / cls).mkdir(parents=True, exist_ok=True)
        random_image(rng).save(root / cls / f"{i:04d}.png")
    return str(root)


#: The demo images' generative factors and their values; the folder's label is the shape.
FACTORS = {
    "shape": ("disc", "square", "triangle", "cross"),
    "colour": ("red", "green", "blue", "yellow"),
    "size": ("small", "large"),
    "side": ("left", "right"),
}
_RGB = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}


def factor_image(rng: np.random.Generator, shape: str, colour: str, size: str, side: str):
    """One 32x32 picture: a shape of a colour and size on one side of a noisy grey ground."""
    from PIL import ImageDraw

    n = TINY_IMAGE_SIZE
    ground = rng.integers(90, 150, size=(n, n, 1)) + rng.integers(-12, 13, size=(n, n, 3))
    image = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8))
    r = (5 if size == "small" else 10) + int(rng.integers(-1, 2))
    cx = (n // 4 if side == "left" else 3 * n // 4) + int(rng.integers(-2, 3))
    cy = n // 2 + int(rng.integers(-5, 6))
    box = (cx - r, cy - r, cx + r, cy + r)
    draw, fill = ImageDraw.Draw(image), _RGB[colour]
    if shape == "disc":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = max(1, r // 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return image


def make_factor_images(root, n: int, seed: int = 0) -> str:
    """An ImageFolder of `factor_image`s, root/<shape>/<i>.png, with every image's factors in
    root/factors.json ({file name: {factor: value}}), so what latents track can be scored."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    factors = {}
    for i in range(n):
        values = {name: str(rng.choice(options)) for name, options in FACTORS.items()}
        (root / values["shape"]).mkdir(parents=True, exist_ok=True)
        name = f"{values['shape']}/{i:05d}.png"
        factor_image(rng, **values).save(root / name)
        factors[name] = values
    (root / "factors.json").write_text(json.dumps(factors, indent=1))
    return str(root)


def prepare_demo(assets_dir: str | Path, n_images: int = 2400) -> tuple[str, str]:
    """Build (once) the demo's tiny CLIP and image folder; returns their paths."""
    assets = Path(assets_dir)
    model_dir, images_dir = assets / "tiny-clip", assets / "images"
    if not (model_dir / "config.json").exists():
        make_tiny_clip(model_dir, num_layers=4, hidden_size=64)
    if not images_dir.exists():
        tmp = assets / "images.tmp"
        make_factor_images(tmp, n=n_images)
        tmp.rename(images_dir)  # a half-written folder is never mistaken for a finished one
    return str(model_dir), str(images_dir)


def factor_scores(
    sae_dir: str, cache_dir: str, layer: int, images_dir: str, val_fraction: float, seed: int
) -> dict[str, tuple[int, float]]:
    """For each factor value (e.g. colour=red), the SAE latent whose activation best tells
    the images that have it from those that do not, scored on the validation images:
    {"colour=red": (latent, AUROC)}. AUROC 1 is a latent that fires more on every such image
    than on any other; 0.5 is chance."""
    from scipy.stats import rankdata

    from sae import TopKSae
    from sweeps.activations import cache

    images = Path(images_dir)
    factors = json.loads((images / "factors.json").read_text())
    by_row = [factors[name] for name in sorted(factors)]  # row ids follow sorted paths
    rows = cache.load_row_ids(cache_dir, "val", val_fraction, seed)
    acts = torch.from_numpy(cache.load_layer(cache_dir, layer, "val", val_fraction, seed))
    sae = TopKSae.load(sae_dir)
    with torch.no_grad():
        out = sae(acts.float())
    dense_NM = torch.zeros(len(rows), sae.num_latents)
    dense_NM.scatter_(1, out.latent_indices, out.latent_acts.float())
    ranks_NM = rankdata(dense_NM.numpy(), axis=0)  # ties (mostly zeros) share a rank
    scores = {}
    for factor, options in FACTORS.items():
        for value in options:
            y = np.array([by_row[r][factor] == value for r in rows])
            n_pos, n_neg = int(y.sum()), int((~y).sum())
            if n_pos == 0 or n_neg == 0:
                continue
            auc_M = (ranks_NM[y].sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
            best = int(np.argmax(auc_M))
            scores[f"{factor}={value}"] = (best, float(auc_M[best]))
    return scores
