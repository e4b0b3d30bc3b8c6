"""The CUDA path: kernels against the dense reference on the GPU, and bf16 training.

Skipped where no GPU is present (CI); run on a GPU machine with `pytest tests/test_cuda.py`.
"""

import pytest
import torch

from sae import SaeConfig, TopKSae, TrainConfig, train_sae
from tests.reference import dense_forward
from tests.test_trainer import sparse_dictionary_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_gradients_match_dense_reference_in_fp32():
    torch.manual_seed(0)
    sae = TopKSae(64, SaeConfig(num_latents=512, k=8), device="cuda")
    x = torch.randn(256, 64, device="cuda")
    dead = torch.zeros(512, dtype=torch.bool, device="cuda")
    dead[300:] = True
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec]
    out = sae(x, dead_mask=dead)
    ours = torch.autograd.grad(out.fvu + 0.5 * out.auxk_loss, params)
    ref = dense_forward(x, *params, k=8, dead_mask=dead, auxk_alpha=0.5)[0]
    for g, r in zip(ours, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)


def test_cuda_bf16_training_learns_the_dictionary():
    x, atoms = sparse_dictionary_data(0, d=32, n_atoms=64, n=20_000, active=3)
    result = train_sae(
        x,
        SaeConfig(expansion_factor=4, k=3),
        TrainConfig(batch_size=256, epochs=8, lr=3e-3, device="cuda"),
    )
    assert result.sae.device.type == "cuda"
    W = torch.nn.functional.normalize(result.sae.W_dec.detach().cpu(), dim=1)
    assert (atoms @ W.T).max(dim=1).values.mean() > 0.9
    assert result.metrics["fvu"] < 0.2


def test_cuda_half_precision_capture_matches_fp32_hidden_states(tmp_path):
    from transformers import CLIPVisionModel

    from sweeps.activations.clip import capture_layers, load_vision_model
    from sweeps.demo import make_tiny_clip

    model = CLIPVisionModel.from_pretrained(make_tiny_clip(tmp_path, hidden_size=64)).eval()
    torch.manual_seed(0)
    pixels = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    gpu = load_vision_model(model, dtype=torch.float16).cuda()
    with torch.no_grad():
        got = capture_layers(gpu, pixels.cuda().half(), [1, 3], token_mode="all")
    for layer in (1, 3):
        torch.testing.assert_close(got[layer].float().cpu(), ref[layer + 1], atol=3e-2, rtol=3e-2)
