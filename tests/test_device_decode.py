"""Images decoded on the model's device (sweeps/activations/device_decode.py): the same
pixels as the CPU path's PIL within a stated tolerance, and every awkward file either taken
by nvJPEG or sent to the CPU decoder, whose reasons stay the same.

torchvision's decoder itself runs where torchvision imports (the CUDA parts in
tests/test_cuda.py); on this project's CPU machines PyPI's torchvision wheel does not import
beside the CPU torch, and those tests skip saying so."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sweeps.activations.clip import Preprocessing
from sweeps.activations.device_decode import (
    _nvjpeg_candidate,
    decode_on_device,
    device_decoder_problem,
    resize_crop,
)
from sweeps.activations.sources import decode_batch
from sweeps.config import DataConfig
from tests.helpers import make_bad_images

# The resize and crop: within this many levels of 255 on any pixel, and this mean, of PIL.
MAX_LEVELS, MEAN_LEVELS = 1, 0.25
# Decoding too (nvJPEG or torchvision against PIL's libjpeg, then the resize): within these.
DECODE_LEVELS, DECODE_MEAN = 8, 1.0


def smooth_image(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A photo-like image: smooth gradients and blobs (noise would measure aliasing, not the
    resize)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(2, 9, 3)
        channels.append(127 + 60 * np.sin(a * xx + b * yy) + 60 * np.cos(c * xx * yy * 4))
    image = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    return image.convert(mode)


def jpeg(image: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95, **kw)
    return out.getvalue()


def _levels(a: torch.Tensor, b: np.ndarray) -> tuple[int, float]:
    diff = (a.cpu().int() - torch.from_numpy(b).int()).abs()
    return int(diff.max()), float(diff.float().mean())


@pytest.mark.parametrize(
    "hw", [(375, 500), (500, 375), (224, 224), (120, 90), (37, 300), (1000, 1333)]
)
def test_resize_and_crop_on_the_device_give_the_pil_path_pixels(hw):
    """The same decoded image through torch (the device path) and PIL (the CPU path): both
    resize the shortest edge to 224 with antialiased bicubic and crop the centre (padding
    what is smaller), within MAX_LEVELS."""
    pre = Preprocessing()
    image = smooth_image(*hw)
    expected = pre.to_uint8(image)
    got = resize_crop(torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()), pre)
    assert tuple(got.shape) == expected.shape == (3, 224, 224)
    worst, mean = _levels(got, expected)
    assert worst <= MAX_LEVELS and mean <= MEAN_LEVELS, (worst, mean)


def test_the_device_path_gives_the_clip_image_processors_model_input():
    """Against transformers' CLIPImageProcessor itself (its PIL form), normalised: within
    MAX_LEVELS / 255 / std."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pre = Preprocessing()
    for hw in [(375, 500), (500, 375), (90, 120)]:
        image = smooth_image(*hw, seed=1)
        expected = CLIPImageProcessorPil()(image, return_tensors="pt")["pixel_values"][0]
        pixels = resize_crop(torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()), pre)
        got = pre.normalize(pixels[None], torch.float32)[0]
        bound = MAX_LEVELS / 255 / min(pre.std) + 1e-5
        assert (got - expected).abs().max() <= bound


def _corpus(root) -> tuple[list[str], dict[str, bool]]:
    """The awkward files (PNG, grayscale, CMYK, truncated, text, empty, huge, ...) and good
    JPEGs of every kind nvJPEG meets; with whether each should reach nvJPEG."""
    make_bad_images(root, huge_side=2000)
    good = {
        "landscape.jpg": jpeg(smooth_image(375, 500, 2)),
        "portrait.jpg": jpeg(smooth_image(500, 375, 3)),
        "small.jpg": jpeg(smooth_image(60, 80, 4)),
        "gray.jpg": jpeg(smooth_image(200, 300, 5, mode="L")),
        "progressive.jpg": jpeg(smooth_image(300, 400, 6), progressive=True),
        "subsampled444.jpg": jpeg(smooth_image(256, 256, 7), subsampling=0),
    }
    for name, data in good.items():
        (root / name).write_bytes(data)
    to_device = {name: True for name in good} | {"large.jpg": True}
    names = sorted(p.name for p in root.iterdir())
    return names, {n: to_device.get(n, False) for n in names}


def test_nvjpeg_gets_whole_rgb_and_grayscale_jpegs_and_the_cpu_every_other_file(tmp_path):
    names, to_device = _corpus(tmp_path)
    for name in names:
        raw = (tmp_path / name).read_bytes()
        assert _nvjpeg_candidate(raw, Preprocessing(), 10**8) == to_device[name], name
    # the header's size counts: a JPEG above max_pixels goes to the CPU, which skips it
    assert not _nvjpeg_candidate((tmp_path / "large.jpg").read_bytes(), Preprocessing(), 10**6)


def _index(root, names):
    return {
        "row_id": np.arange(len(names)),
        "path": np.array([str(root / n) for n in names], object),
        "label": np.full(len(names), -1),
    }


def check_corpus_on(device: str, root) -> None:
    """Every file of the corpus through decode_on_device and through the CPU path: the same
    reasons, pixels within DECODE_LEVELS (JPEG decoders differ by a level or two, as the
    resizes do), and the files nvJPEG cannot take counted as decoded on the CPU."""
    names, to_device = _corpus(root)
    pre, data = Preprocessing(), DataConfig(source="folder", path=str(root))
    cpu = decode_batch(_index(root, names), data, pre, 10**8)
    dev = decode_on_device(_index(root, names), data, pre, 10**8, device)
    assert dev["pixels"].device.type == torch.device(device).type
    assert list(dev["reason"]) == list(cpu["reason"])
    assert dev["cpu_decoded"] == sum(not to_device[n] for n in names)
    for i, name in enumerate(names):
        if cpu["reason"][i] == "":
            worst, mean = _levels(dev["pixels"][i], cpu["pixels"][i])
            assert worst <= DECODE_LEVELS and mean <= DECODE_MEAN, (name, worst, mean)


def _torchvision_problem() -> str | None:
    try:
        import torchvision.io  # noqa: F401
    except Exception as e:
        return f"torchvision does not import beside torch {torch.__version__}: {e}"
    return None


@pytest.mark.skipif(_torchvision_problem() is not None, reason=str(_torchvision_problem()))
def test_every_awkward_file_through_torchvisions_cpu_decoder(tmp_path):
    check_corpus_on("cpu", tmp_path)


def test_a_machine_without_a_usable_device_decoder_is_told_why():
    assert "CUDA devices only" in device_decoder_problem(Preprocessing(), "cpu")
    lanczos = Preprocessing(resample=int(Image.Resampling.LANCZOS))
    assert "LANCZOS" in device_decoder_problem(lanczos, "cuda")
