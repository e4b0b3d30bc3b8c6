"""activations.clip: preprocessing equals the HF processor; the early-stopped forward equals
HF's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_tiny_clip, random_image
from PIL import Image

from sweeps.activations.clip import Preprocessing, capture_layers, load_vision_model, to_rgb


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), num_layers=4)


def test_preprocessing_matches_hf_processor(tiny):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    hf = CLIPImageProcessorPil.from_pretrained(tiny)
    ours = Preprocessing.from_pretrained(tiny)
    rng = np.random.default_rng(0)
    images = [random_image(rng, h, w) for h, w in [(40, 56), (64, 20), (32, 32), (17, 90)]]
    images += [images[0].convert("RGBA"), images[1].convert("L"), Image.new("RGB", (1, 1), 7)]
    for image in images:
        expected = hf(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ours(image), expected, atol=1e-5, rtol=0)


def test_preprocessing_reads_the_checkpoint_config(tiny):
    p = Preprocessing.from_pretrained(tiny)
    assert p.shortest_edge == 32 and p.crop_hw == (32, 32)
    assert p.to_uint8(random_image(np.random.default_rng(1), 50, 80)).shape == (3, 32, 32)


def test_to_rgb_scales_16_bit_instead_of_clipping():
    gray16 = np.full((4, 4), 32768, np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(gray16)))
    assert rgb.shape == (4, 4, 3) and abs(int(rgb[0, 0, 0]) - 128) <= 1


@pytest.mark.parametrize("token_mode", ["cls", "all"])
def test_capture_equals_full_forward_hidden_states(tiny, token_mode):
    model = load_vision_model(tiny)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    acts = capture_layers(model, pixels, [2, 0], token_mode)
    assert sorted(acts) == [0, 2]
    for layer, got in acts.items():
        want = hidden[layer + 1][:, 0] if token_mode == "cls" else hidden[layer + 1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_capture_stops_after_deepest_layer(tiny):
    model = load_vision_model(tiny)
    calls = []
    for i, block in enumerate(model.encoder.layers):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    capture_layers(model, torch.randn(1, 3, 32, 32), [1])
    assert calls == [0, 1]


def test_full_clip_checkpoint_and_object_give_the_vision_tower(tmp_path):
    from transformers import CLIPModel

    path = make_tiny_clip(tmp_path, num_layers=2, full_clip=True)
    full = CLIPModel.from_pretrained(path).eval()
    pixels = torch.randn(2, 3, 32, 32)
    want = capture_layers(full, pixels, [1])[1]
    torch.testing.assert_close(capture_layers(load_vision_model(path), pixels, [1])[1], want)
    torch.testing.assert_close(capture_layers(load_vision_model(full), pixels, [1])[1], want)


def test_dtype_and_bad_layers(tiny):
    model = load_vision_model(tiny, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"0\.\.3"):
        capture_layers(model, torch.randn(1, 3, 32, 32, dtype=torch.bfloat16), [4])
