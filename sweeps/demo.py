"""The offline demo: a tiny random CLIP and generated images, then a real sweep over them.

Also the material the tests build on: nothing here touches the network.
"""

from __future__ import annotations

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
    model.save_pretrained(directory)
    CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(directory)
    return directory


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


def prepare_demo(assets_dir: str | Path, n_images: int = 2400) -> tuple[str, str]:
    """Build (once) the demo's tiny CLIP and image folder; returns their paths."""
    assets = Path(assets_dir)
    model_dir, images_dir = assets / "tiny-clip", assets / "images"
    if not (model_dir / "config.json").exists():
        make_tiny_clip(model_dir, num_layers=4, hidden_size=64)
    if not images_dir.exists():
        tmp = assets / "images.tmp"
        make_image_folder(tmp, n=n_images, classes=("red", "green", "blue"))
        tmp.rename(images_dir)  # a half-written folder is never mistaken for a finished one
    return str(model_dir), str(images_dir)
