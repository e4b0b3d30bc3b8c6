"""The CUDA path: each architecture against its dense reference on the GPU, the captured step
against the eager one, and bf16 training.

Skipped where no GPU is present (CI); run on a GPU machine with `pytest tests/test_cuda.py`.
"""

import warnings

import pytest
import torch

from sae import SaeConfig, TopKSae, TrainConfig, train_sae
from sae.trainer import CAPTURE_AFTER, Trainer
from tests.reference import dense_forward, dense_jumprelu_forward, dense_matryoshka_forward
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


ARCHITECTURES = ["topk", "batchtopk", "matryoshka", "jumprelu"]


def _reference_loss(sae, x, dead):
    """Our training loss and the dense reference's, for the SAE's architecture (AuxK at 0.5)."""
    cfg = sae.cfg
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec]
    out = sae(x, dead_mask=None if cfg.activation == "matryoshka" else dead, batch_topk=True)
    ours = out.fvu + out.inner_fvu + 0.5 * out.auxk_loss + 0.7 * out.l0_loss
    if cfg.activation == "jumprelu":
        params.append(sae.threshold)
        ref = dense_jumprelu_forward(
            x, *params, cfg.k, cfg.jumprelu_bandwidth, 0.7, dead_mask=dead, auxk_alpha=0.5
        )[0]
    elif cfg.activation == "matryoshka":
        ref = dense_matryoshka_forward(x, *params, cfg.k, cfg.matryoshka_fractions)[0]
    else:
        batch = cfg.activation == "batchtopk"
        ref = dense_forward(x, *params, cfg.k, dead_mask=dead, auxk_alpha=0.5, batch_topk=batch)[0]
    return ours, ref, params


@pytest.mark.parametrize("activation", ARCHITECTURES)
def test_cuda_each_architecture_matches_its_dense_reference_in_fp32(activation):
    torch.manual_seed(0)
    cfg = SaeConfig(num_latents=512, k=8, activation=activation, jumprelu_bandwidth=0.5)
    sae = TopKSae(64, cfg, device="cuda")
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        if activation == "jumprelu":
            sae.threshold.uniform_(0.2, 0.8)
    x = torch.randn(256, 64, device="cuda")
    dead = torch.zeros(512, dtype=torch.bool, device="cuda")
    dead[300:] = True
    ours, ref, params = _reference_loss(sae, x, dead)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    for g, r in zip(torch.autograd.grad(ours, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)


def _trained(activation, cuda_graph, steps=CAPTURE_AFTER + 4):
    x = torch.randn(8192, 64, generator=torch.Generator().manual_seed(0)) * 3
    cfg = TrainConfig(
        batch_size=256,
        steps=steps,
        val_fraction=0,
        dead_feature_threshold=256,
        lr=1e-3,
        device="cuda",
        cuda_graph=cuda_graph,
    )
    trainer = Trainer(x, SaeConfig(num_latents=1024, k=8, activation=activation), cfg)
    for step in range(steps):
        trainer.train_step(trainer._batch(step))
    torch.cuda.synchronize()
    return trainer


@pytest.mark.parametrize("activation", ARCHITECTURES)
def test_cuda_captured_steps_leave_the_state_of_eager_steps(activation):
    """After CAPTURE_AFTER eager steps the step is one CUDA graph; its replays give what the
    eager steps give (bf16 autocast both ways)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture that fails would only warn
        captured = _trained(activation, cuda_graph=True)
    eager = _trained(activation, cuda_graph=False)
    assert captured._graph is not None and eager._graph is None
    state, expected = captured.sae.state_dict(), eager.sae.state_dict()
    for name in expected:
        torch.testing.assert_close(state[name], expected[name], atol=2e-3, rtol=1e-2, msg=name)
    torch.testing.assert_close(captured.loss_sums, eager.loss_sums, atol=1e-3, rtol=1e-2)
    assert captured.step_T.item() == captured.step == CAPTURE_AFTER + 4


def test_cuda_a_step_that_cannot_be_captured_runs_eagerly_and_says_why(monkeypatch):
    step = Trainer._step

    def reads_on_host(self, x_BD):
        step(self, x_BD)
        float(self.loss_sums.sum())  # .item(): what a CUDA graph cannot capture

    monkeypatch.setattr(Trainer, "_step", reads_on_host)
    with pytest.warns(UserWarning, match="training eagerly: the step could not be captured"):
        trainer = _trained("topk", cuda_graph=True)
    assert trainer._graph is None and trainer.step_T.item() == CAPTURE_AFTER + 4
    assert torch.isfinite(trainer.sae.W_dec).all()


def test_cuda_every_awkward_file_through_nvjpeg(tmp_path):
    """PNG, grayscale, CMYK, progressive, truncated...: nvJPEG or the CPU decoder, the CPU
    path's reasons and (within tests/test_device_decode.py's tolerance) its pixels."""
    from tests.test_device_decode import check_corpus_on

    check_corpus_on("cuda", tmp_path)


def test_cuda_an_encoder_decoding_on_its_gpu_caches_what_the_cpu_path_caches(tmp_path):
    """The same JPEGs through an Encoder decoding with nvJPEG and one given CPU-decoded
    pixels: the cached CLS activations agree within 5% relative error per row."""
    import numpy as np
    import pyarrow.parquet as pq

    from sweeps.activations.clip import Preprocessing
    from sweeps.activations.extract import Encoder
    from sweeps.activations.sources import decode_batch
    from sweeps.config import DataConfig
    from sweeps.demo import make_tiny_clip
    from tests.test_device_decode import jpeg, smooth_image

    images = tmp_path / "images"
    images.mkdir()
    names = []
    for i, hw in enumerate([(375, 500), (500, 375), (224, 300), (120, 90)] * 4):
        names.append(f"{i:02d}.jpg")
        (images / names[-1]).write_bytes(jpeg(smooth_image(*hw, seed=i)))
    checkpoint = make_tiny_clip(tmp_path / "clip", image_size=224, patch_size=32)
    pre = Preprocessing.from_pretrained(checkpoint)
    data = DataConfig(source="folder", path=str(images))
    index = {
        "row_id": np.arange(len(names)),
        "path": np.array([str(images / n) for n in names], object),
        "label": np.full(len(names), -1),
    }
    decode = {"data": data, "pre": pre, "max_pixels": 10**8}
    acts = {}
    for on_device in (True, False):
        run_dir = tmp_path / f"run-{on_device}"
        run_dir.mkdir()
        encoder = Encoder(
            checkpoint, None, "float32", [2], "cls", "float32", pre, str(run_dir), 4,
            decode=decode if on_device else None, on_device=on_device, node="here",
        )  # fmt: skip
        out = encoder(index if on_device else decode_batch(index, **decode))
        assert (out["reason"] == "").all()
        assert out["cpu_decoded"].sum() == (0 if on_device else len(names))
        (part,) = run_dir.glob("part-*.parquet")
        column = pq.read_table(part)["layer_2"].combine_chunks()
        acts[on_device] = column.to_numpy_ndarray()
    error = np.linalg.norm(acts[True] - acts[False], axis=1) / np.linalg.norm(acts[False], axis=1)
    assert error.max() < 0.05, error
