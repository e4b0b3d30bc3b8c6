"""CLIP vision side of extraction: load a checkpoint, preprocess images, capture layers.

Layer L is the residual stream after encoder block L (0-based), i.e. `hidden_states[L + 1]` of
the Hugging Face model, before any final layer norm. Pure torch/transformers: no Ray here.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
TokenMode = Literal["cls", "all"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the per-key load report that transformers 5 prints for a CLIPModel checkpoint."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The CLIPVisionModel inside a CLIPModel or CLIPVisionModelWithProjection (or itself)."""
    return getattr(model, "vision_model", model)


def load_vision_model(
    name_or_path: str | torch.nn.Module = DEFAULT_MODEL,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """Load the CLIP vision tower of a hub id or local directory (CLIPModel checkpoints too)."""
    if isinstance(name_or_path, torch.nn.Module):
        return vision_tower(name_or_path).to(dtype).eval()
    from transformers import CLIPVisionModel

    with _quiet_transformers():
        model, info = CLIPVisionModel.from_pretrained(
            name_or_path, revision=revision, dtype=dtype, output_loading_info=True
        )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"{name_or_path} is not a CLIP vision checkpoint: {len(missing)} weights missing "
            f"(e.g. {missing[0]}); point model.name_or_path at a CLIPModel or CLIPVisionModel"
        )
    return model.eval()


@dataclass(frozen=True)
class Preprocessing:
    """A checkpoint's CLIPImageProcessor settings, applied in two halves: `to_uint8` (convert,
    resize, crop; CPU tasks) and `normalize` (rescale, mean/std; on the model's device), so that
    the object store carries uint8 pixels, 4x smaller than float32."""

    shortest_edge: int | None = 224
    size_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] | None = (224, 224)
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, ...] | None = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] | None = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: str | None = None) -> Preprocessing:
        """Read `preprocessor_config.json`; without one, CLIP's defaults at the model's size."""
        from transformers import CLIPVisionConfig
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        try:
            with _quiet_transformers():
                p = CLIPImageProcessorPil.from_pretrained(name_or_path, revision=revision)
        except OSError:
            size = CLIPVisionConfig.from_pretrained(name_or_path, revision=revision).image_size
            log.warning(
                "%s has no preprocessor_config.json: CLIP defaults at %d px", name_or_path, size
            )
            return cls(shortest_edge=size, crop_hw=(size, size))
        size = p.size if p.do_resize else None
        return cls(
            shortest_edge=size.shortest_edge if size else None,
            size_hw=(size.height, size.width) if size and not size.shortest_edge else None,
            crop_hw=(p.crop_size.height, p.crop_size.width) if p.do_center_crop else None,
            resample=int(p.resample),
            rescale_factor=p.rescale_factor if p.do_rescale else None,
            mean=tuple(p.image_mean) if p.do_normalize else None,
            std=tuple(p.image_std) if p.do_normalize else None,
        )

    @classmethod
    def from_json(cls, fields: dict) -> Preprocessing:
        """From its dataclasses.asdict, read back from JSON (which made the tuples lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """Height and width after resizing (as transformers computes them)."""
        if self.shortest_edge:
            short, long = min(h, w), max(h, w)
            new_long = int(self.shortest_edge * long / short)
            return (self.shortest_edge, new_long) if h <= w else (new_long, self.shortest_edge)
        return self.size_hw or (h, w)

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """Convert to RGB, resize and center-crop: (3, H, W) uint8."""
        image = to_rgb(image)
        out_hw = self.output_hw(image.height, image.width)
        if out_hw != (image.height, image.width):
            image = image.resize(out_hw[::-1], resample=self.resample)
        pixels_CHW = np.asarray(image).transpose(2, 0, 1)
        return center_crop(pixels_CHW, self.crop_hw) if self.crop_hw else pixels_CHW

    def normalize(self, pixels_BCHW: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 pixels to the model's input: rescale, then (x - mean) / std, in float32."""
        x = pixels_BCHW.float()
        if self.rescale_factor is not None:
            x = x * self.rescale_factor
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x.to(dtype)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One image to a (3, H, W) float32 model input, like the HF image processor's output."""
        return self.normalize(torch.from_numpy(self.to_uint8(image))[None], torch.float32)[0]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency composited on white (as transformers does), 16/32-bit
    grayscale scaled to 8 bits instead of clipped at 255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = np.asarray(image, dtype=np.float64)
        top = 65535.0 if gray.max() > 255 else 255.0
        image = Image.fromarray((np.clip(gray, 0, top) * (255.0 / top)).round().astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop(pixels_CHW, crop_hw: tuple[int, int]):
    """Center crop of the last two axes, zero-padding images smaller than the crop
    (transformers' rule: the odd padding row or column goes first); numpy or torch."""
    h, w = pixels_CHW.shape[-2:]
    ch, cw = crop_hw
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        top, bottom, left, right = -(-ph // 2), ph // 2, -(-pw // 2), pw // 2
        if isinstance(pixels_CHW, np.ndarray):
            lead = [(0, 0)] * (pixels_CHW.ndim - 2)
            pixels_CHW = np.pad(pixels_CHW, [*lead, (top, bottom), (left, right)])
        else:
            pixels_CHW = torch.nn.functional.pad(pixels_CHW, (left, right, top, bottom))
        h, w = h + ph, w + pw
    top, left = (h - ch) // 2, (w - cw) // 2
    out = pixels_CHW[..., top : top + ch, left : left + cw]
    return np.ascontiguousarray(out) if isinstance(out, np.ndarray) else out.contiguous()


@torch.inference_mode()
def capture_layers(
    model: torch.nn.Module,
    pixels_BCHW: torch.Tensor,
    layers: list[int],
    token_mode: TokenMode = "cls",
) -> dict[int, torch.Tensor]:
    """Residual stream after each requested block, in one forward that stops after the deepest.

    Returns {layer: (B, d)} in `cls` mode (token 0) or {layer: (B, T, d)} in `all` mode.
    """
    vision = vision_tower(model)
    blocks = vision.encoder.layers
    if not layers or min(layers) < 0 or max(layers) >= len(blocks):
        raise ValueError(f"layers must be in 0..{len(blocks) - 1} (got {layers})")
    wanted = set(layers)
    h_BTD = vision.pre_layrnorm(vision.embeddings(pixels_BCHW))
    out = {}
    for i, block in enumerate(blocks[: max(layers) + 1]):
        h_BTD = block(h_BTD, None)
        if i in wanted:
            out[i] = h_BTD[:, 0] if token_mode == "cls" else h_BTD
    return out


__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "Preprocessing",
    "capture_layers",
    "center_crop",
    "load_vision_model",
    "to_rgb",
    "vision_tower",
]
