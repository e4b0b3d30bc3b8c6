"""Images decoded and preprocessed on the model's device: the JPEGs nvJPEG takes through
`torchvision.io.decode_jpeg` on CUDA, in one batched call, then CLIP's resize and centre crop
as tensor operations there; every other image (PNG, CMYK, files nvJPEG refuses, broken ones)
through the CPU decoder (`sources.decode_image`), whose reasons for unusable rows are the same
as on the CPU path.

The pixels match the CPU path's (PIL) within a few uint8 levels: torch's bicubic resize with
antialiasing uses PIL's kernel (a = -0.5) and support, and JPEG decoders differ by a level or
two in their IDCT and chroma upsampling.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sweeps.activations.clip import Preprocessing, center_crop
from sweeps.activations.sources import decode_image, fetch_images, raw_bytes
from sweeps.config import DataConfig

#: PIL resampling filters and their torch interpolation modes (both with antialiasing)
MODES = {int(Image.Resampling.BICUBIC): "bicubic", int(Image.Resampling.BILINEAR): "bilinear"}


def device_decoder_problem(pre: Preprocessing, device: str) -> str | None:
    """Why images cannot be decoded on `device` (None: they can)."""
    if not str(device).startswith("cuda"):
        return f"nvJPEG runs on CUDA devices only, not {device}"
    if pre.resample not in MODES:
        name = Image.Resampling(pre.resample).name
        return f"the checkpoint resizes with {name}, which torch has no antialiased form of"
    try:
        import torchvision.io  # noqa: F401
    except Exception as e:  # ImportError, or a torchvision built for another torch
        return (
            f"torchvision does not import ({e}): install the torchvision built for torch "
            f"{torch.__version__} (README, 'Installing PyTorch')"
        )
    return None


def resize_crop(image_CHW: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """CLIP's resize (shortest edge, antialiased) and centre crop of one (3, H, W) uint8
    image, on its device, as Preprocessing.to_uint8 does with PIL."""
    h, w = image_CHW.shape[-2:]
    out_hw = pre.output_hw(h, w)
    if out_hw != (h, w):
        x = F.interpolate(
            image_CHW[None].float(), size=out_hw, mode=MODES[pre.resample], antialias=True
        )
        image_CHW = x[0].round_().clamp_(0, 255).to(torch.uint8)
    return center_crop(image_CHW, pre.crop_hw) if pre.crop_hw else image_CHW


def _nvjpeg_candidate(raw, pre: Preprocessing, max_pixels: int) -> bool:
    """Whether nvJPEG should take these bytes: a whole JPEG (start and end markers; a
    truncated one goes to the CPU decoder, which names it) in RGB or grayscale (not CMYK),
    not too large, judged from the header."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return False
    raw = bytes(raw)
    if raw[:2] != b"\xff\xd8" or raw.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except Exception:
        return False  # the CPU decoder names what is wrong with it
    h, w = pre.output_hw(image.height, image.width)
    return (
        image.format == "JPEG"
        and image.mode in ("RGB", "L")
        and image.width * image.height <= max_pixels
        and h * w <= max_pixels
    )


def _decode_jpegs(raws: list, device: str) -> list[torch.Tensor | None]:
    """Each JPEG as (3, H, W) uint8 on the device, None where nvJPEG refused it: one batched
    call, then one at a time if the batch failed."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(raw), dtype=torch.uint8) for raw in raws]
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out = []
        for one in data:
            try:
                out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_on_device(
    index: dict[str, np.ndarray],
    data: DataConfig,
    pre: Preprocessing,
    max_pixels: int,
    device: str,
) -> dict:
    """decode_batch's output with `pixels` a (B, 3, H, W) uint8 tensor on `device`, and
    `cpu_decoded` the number of images that went through the CPU decoder."""
    values, labels = fetch_images(index, data)
    raws = []
    for value in values:
        try:
            raws.append(raw_bytes(value))
        except OSError:
            raws.append(None)  # the CPU decoder reports it missing
    on_device = [i for i, raw in enumerate(raws) if _nvjpeg_candidate(raw, pre, max_pixels)]
    crop_h, crop_w = pre.crop_hw or pre.size_hw
    pixels_BCHW = torch.zeros(len(values), 3, crop_h, crop_w, dtype=torch.uint8, device=device)
    reasons = [""] * len(values)
    decoded = dict(zip(on_device, _decode_jpegs([raws[i] for i in on_device], device)))
    for i, image_CHW in decoded.items():
        if image_CHW is not None:
            pixels_BCHW[i] = resize_crop(image_CHW, pre)
    cpu = [i for i in range(len(values)) if decoded.get(i) is None]
    for i in cpu:
        pixels, reason = decode_image(values[i] if raws[i] is None else raws[i], pre, max_pixels)
        if pixels is not None:
            pixels_BCHW[i] = torch.from_numpy(pixels).to(device)
        reasons[i] = reason
    return {
        "row_id": index["row_id"],
        "label": labels,
        "pixels": pixels_BCHW,
        "reason": np.array(reasons, dtype=object),
        "cpu_decoded": len(cpu),
    }
