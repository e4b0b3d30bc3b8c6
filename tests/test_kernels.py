"""The fused encoder and sparse decoder against a dense autograd reference."""

import pytest
import torch

from sae import SaeConfig, TopKSae, TrainConfig, kernels, train_sae
from tests.reference import dense_forward, dense_jumprelu_forward, dense_matryoshka_forward


def _sae(d=16, M=64, k=4, seed=0):
    torch.manual_seed(seed)
    sae = TopKSae(d, SaeConfig(num_latents=M, k=k)).double()
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def _grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True)


def test_topk_returns_exactly_k_positive_latents_per_row():
    sae = _sae(M=64, k=5)
    with torch.no_grad():
        sae.encoder.bias.fill_(10.0)  # every pre-activation positive
    acts, idx = sae.encode(torch.randn(32, 16, dtype=torch.float64))
    assert acts.shape == idx.shape == (32, 5)
    assert (acts > 0).sum(dim=1).eq(5).all()
    assert all(len(set(row.tolist())) == 5 for row in idx)


def test_forward_and_gradients_match_dense_reference():
    sae = _sae()
    x = torch.randn(40, 16, dtype=torch.float64)
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec]
    out = sae(x)
    ref_loss, ref_fvu, _, z = dense_forward(x, *params, k=4)
    torch.testing.assert_close(out.fvu, ref_fvu)
    dense_z = out.dense_latents(z.shape[1])
    torch.testing.assert_close(dense_z, z)
    for ours, ref in zip(_grads(out.fvu, params), _grads(ref_loss, params)):
        torch.testing.assert_close(ours, ref)


def test_input_gradient_matches_dense_reference():
    sae = _sae()
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec]
    (g_ours,) = _grads(sae(x).fvu, [x])
    (g_ref,) = _grads(dense_forward(x, *params, k=4)[0], [x])
    torch.testing.assert_close(g_ours, g_ref)


def test_auxk_gradient_reaches_encoder_rows_of_dead_latents():
    sae = _sae(M=64, k=4)
    x = torch.randn(50, 16, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec]
    out = sae(x, dead_mask=dead)
    assert out.auxk_loss > 0
    ref_loss, _, ref_aux, _ = dense_forward(x, *params, k=4, dead_mask=dead, auxk_alpha=0.5)
    torch.testing.assert_close(out.auxk_loss, ref_aux)
    ours = _grads(out.fvu + 0.5 * out.auxk_loss, params)
    for g, r in zip(ours, _grads(ref_loss, params)):
        torch.testing.assert_close(g, r)
    # The part sparsify's fused encoder drops: AuxK alone moves dead latents' encoder rows.
    g_enc_aux = _grads(out.auxk_loss, [sae.encoder.weight])[0]
    assert g_enc_aux[40:].abs().sum(dim=1).gt(0).sum() > 0
    assert g_enc_aux[:40].abs().sum() == 0  # live latents get no AuxK gradient


def test_decoder_rows_stay_unit_norm_after_steps():
    sae = TopKSae(16, SaeConfig(num_latents=64, k=4, normalize_decoder=True))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(5):
        loss = sae(torch.randn(32, 16)).fvu
        opt.zero_grad()
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        radial = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
        torch.testing.assert_close(radial, torch.zeros_like(radial), atol=1e-6, rtol=0)
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


@pytest.fixture
def prefilter_spy(monkeypatch):
    """The bf16 prefilter's answers, in call order, with it on for any shape and CPU."""
    monkeypatch.setattr(kernels, "PREFILTER_MIN_MACS", 0)  # the prefilter even at test size
    # ...and on any CPU: oneDNN computes bf16 everywhere, only slower without native support.
    monkeypatch.setattr(kernels, "bf16_matmul_faster", lambda B, D, M: True)
    chosen = []
    gate = kernels.bf16_prefilter

    def spy(*args):
        chosen.append(gate(*args))
        return chosen[-1]

    monkeypatch.setattr(kernels, "bf16_prefilter", spy)
    return chosen


@pytest.mark.parametrize("exact", [True, False])
def test_float32_cpu_selection_matches_dense_reference(prefilter_spy, exact):
    """fp32 on CPU picks candidates with a bf16 matmul (where that is faster) and
    rescores them exactly: the same latents, values and gradients as the exact path."""
    torch.manual_seed(0)
    sae = TopKSae(64, SaeConfig(num_latents=512, k=8))
    x = torch.randn(256, 64)
    dead = torch.zeros(512, dtype=torch.bool)
    dead[300:] = True
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec]
    out = sae(x, dead_mask=dead, exact=exact)
    ref_loss, ref_fvu, ref_aux, z = dense_forward(x, *params, k=8, dead_mask=dead, auxk_alpha=0.5)
    dense_z = out.dense_latents(z.shape[1])
    torch.testing.assert_close(dense_z, z)
    torch.testing.assert_close(out.auxk_loss, ref_aux)
    ours = _grads(out.fvu + 0.5 * out.auxk_loss, params)
    for g, r in zip(ours, _grads(ref_loss, params)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert prefilter_spy == [not exact]  # the path under test is the one that ran


@pytest.mark.parametrize("exact", [True, False])
def test_train_config_exact_topk_decides_the_path_in_training_and_evaluation(prefilter_spy, exact):
    x = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(batch_size=100, steps=2, eval_every=2, exact_topk=exact)
    train_sae(x, SaeConfig(num_latents=128, k=4), cfg)
    # two steps, then one validation batch (reused for the final metrics)
    assert prefilter_spy == [not exact] * 3


def test_auxk_loss_and_decoder_gradient_equal_sparsify():
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is in the dev extra")
    sae = _sae(d=16, M=64, k=4)
    theirs = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=64, k=4))
    theirs = theirs.double()
    theirs.load_state_dict(sae.state_dict())
    x = torch.randn(50, 16, dtype=torch.float64)
    for n_dead in (3, 24):  # fewer and more dead latents than d_in / 2 = 8
        dead = torch.zeros(64, dtype=torch.bool)
        dead[-n_dead:] = True
        ours, ref = sae(x, dead_mask=dead), theirs(x, dead_mask=dead)
        torch.testing.assert_close(ours.fvu, ref.fvu)
        torch.testing.assert_close(ours.auxk_loss, ref.auxk_loss)
        (g_ours,) = _grads(ours.auxk_loss, [sae.W_dec])
        (g_ref,) = _grads(ref.auxk_loss, [theirs.W_dec])
        assert g_ref.abs().sum() > 0
        torch.testing.assert_close(g_ours, g_ref)


def test_batchtopk_training_rule_matches_dense_reference():
    torch.manual_seed(1)
    sae = TopKSae(16, SaeConfig(num_latents=64, k=4, activation="batchtopk")).double()
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(40, 16, dtype=torch.float64)
    x[:5] *= 4  # large rows take more than k latents, small ones fewer
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec]
    dead = torch.zeros(64, dtype=torch.bool)
    dead[50:] = True
    out = sae(x, dead_mask=dead, batch_topk=True)
    ref_loss, ref_fvu, ref_aux, z = dense_forward(
        x, *params, k=4, dead_mask=dead, auxk_alpha=0.5, batch_topk=True
    )
    dense_z = out.dense_latents(z.shape[1])
    torch.testing.assert_close(dense_z, z)
    per_row = (z > 0).sum(1)
    assert per_row.sum() == 4 * 40 and per_row.max() > 4 and per_row.min() < 4
    torch.testing.assert_close(out.fvu, ref_fvu)
    torch.testing.assert_close(out.auxk_loss, ref_aux)
    ours = _grads(out.fvu + 0.5 * out.auxk_loss, params)
    for g, r in zip(ours, _grads(ref_loss, params)):
        torch.testing.assert_close(g, r)


def test_matryoshka_loss_and_gradients_match_a_dense_reference():
    torch.manual_seed(3)
    cfg = SaeConfig(num_latents=64, k=4, activation="matryoshka", matryoshka_fractions=[0.1, 0.5])
    sae = TopKSae(16, cfg).double()
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(40, 16, dtype=torch.float64)
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec]
    out = sae(x, batch_topk=True)
    ref_loss, ref_fvu, ref_inner, z = dense_matryoshka_forward(x, *params, 4, [0.1, 0.5])
    assert sae.architecture.widths(64) == [6, 32]
    torch.testing.assert_close(out.dense_latents(z.shape[1]), z)
    torch.testing.assert_close(out.fvu, ref_fvu)
    torch.testing.assert_close(out.inner_fvu, ref_inner)
    assert ref_inner > 2 * ref_fvu  # the inner levels reconstruct worse: a real term
    for g, r in zip(_grads(out.fvu + out.inner_fvu, params), _grads(ref_loss, params)):
        torch.testing.assert_close(g, r)
    # other activations have no inner levels
    topk = TopKSae(16, SaeConfig(num_latents=64, k=4)).double()
    assert topk(x).inner_fvu == 0


def _jumprelu_sae(bandwidth=0.5, seed=4):
    torch.manual_seed(seed)
    cfg = SaeConfig(num_latents=64, k=6, activation="jumprelu", jumprelu_bandwidth=bandwidth)
    sae = TopKSae(16, cfg).double()
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.threshold.uniform_(0.2, 0.8)  # distinct per latent
    return sae


def test_jumprelu_loss_and_gradients_match_a_dense_reference():
    sae = _jumprelu_sae()
    x = torch.randn(40, 16, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[50:] = True
    params = [sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec, sae.threshold]
    out = sae(x, dead_mask=dead)
    ref_loss, ref_fvu, ref_aux, ref_l0, z = dense_jumprelu_forward(
        x, *params, k=6, bandwidth=0.5, l0_coefficient=0.7, dead_mask=dead, auxk_alpha=0.5
    )
    torch.testing.assert_close(out.dense_latents(z.shape[1]), z.detach())
    torch.testing.assert_close(out.fvu, ref_fvu)
    torch.testing.assert_close(out.auxk_loss, ref_aux)
    torch.testing.assert_close(out.l0_loss, ref_l0)
    assert ref_aux > 0 and ref_l0 > 0  # both terms are live in this case
    ours = _grads(out.fvu + 0.5 * out.auxk_loss + 0.7 * out.l0_loss, params)
    ref = _grads(ref_loss, params)
    for g, r in zip(ours, ref):
        torch.testing.assert_close(g, r)
    assert (ours[-1] != 0).sum() > 10  # the thresholds do get a gradient


def test_jumprelu_threshold_gradient_is_the_rectangle_kernel_estimate():
    """By hand, for one latent: d fvu/dθ = -(θ/ε) sum over rows within ε/2 of θ of
    d fvu/d act, and d L0/dθ = -(rows within ε/2) / (ε B)."""
    pre = torch.tensor([[0.1], [0.44], [0.52], [0.9]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    acts, fires = kernels.jumprelu(pre, theta, 0.2)
    assert acts.squeeze(1).tolist() == [0, 0, 0.52, 0.9]
    assert fires.squeeze(1).tolist() == [0, 0, 1, 1]
    g_acts = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    g_theta, g_pre = torch.autograd.grad(acts, [theta, pre], g_acts, retain_graph=True)
    assert g_theta.item() == pytest.approx(-(0.5 / 0.2) * (2.0 + 3.0))  # rows 0.44 and 0.52
    assert g_pre.squeeze(1).tolist() == [0, 0, 3.0, 4.0]
    (g_theta,) = torch.autograd.grad(fires.mean(), [theta])
    assert g_theta.item() == pytest.approx(-2 / (0.2 * 4))


def test_jumprelu_inference_keeps_each_latent_above_its_own_threshold():
    sae = _jumprelu_sae().float()
    x = torch.randn(30, 16)
    acts, idx = sae.encode(x)
    pre = (x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias
    expected = torch.where(pre > sae.threshold, pre, 0).detach()
    torch.testing.assert_close(torch.zeros_like(pre).scatter(1, idx, acts), expected)
    # the training forward's latents are the same ones
    out = sae(x)
    torch.testing.assert_close(out.dense_latents(pre.shape[1]), expected)


def test_batchtopk_inference_keeps_latents_above_the_threshold():
    torch.manual_seed(2)
    sae = TopKSae(16, SaeConfig(num_latents=64, k=4, activation="batchtopk"))
    sae.threshold.fill_(0.3)
    x = torch.randn(30, 16)
    acts, idx = sae.encode(x)
    pre = torch.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    expected = torch.where(pre > 0.3, pre, 0)
    torch.testing.assert_close(torch.zeros_like(pre).scatter(1, idx, acts), expected)
    assert all(len(set(row.tolist())) == idx.shape[1] for row in idx)  # no repeated latent


# First lines of /proc/cpuinfo's flags from real machines (abridged to the relevant flags).
CPU_FLAGS = {
    "Cascade Lake: AVX512, bf16 only emulated": ("flags\t\t: fpu avx2 avx512f avx512_vnni", False),
    "Sapphire Rapids": ("flags\t\t: fpu avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile", True),
    "Zen 4": ("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni", True),
    "Graviton 2": ("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics", False),
    "Graviton 3": ("Features\t: fp asimd sve sve2 svebf16 i8mm bf16 dgh rng", True),
    "no flags line": ("processor\t: 0", None),
    # each flag alone is enough
    "amx_bf16 alone": ("flags\t\t: fpu avx512f amx_bf16 amx_tile", True),
    "avx512_bf16 alone": ("flags\t\t: fpu avx512f avx512_bf16", True),
}


@pytest.mark.parametrize("cpu", CPU_FLAGS)
def test_native_bf16_is_read_from_cpu_flags(cpu):
    text, native = CPU_FLAGS[cpu]
    assert kernels.native_bf16(f"processor\t: 0\n{text}\n") is native


def test_no_bf16_prefilter_without_native_bf16(monkeypatch):
    """Where oneDNN only emulates bf16 (any AVX512 core), the fp32 matmul is faster: the gate
    says no without timing anything."""
    monkeypatch.setattr(kernels, "_native_bf16_cpu", lambda: False)
    monkeypatch.setattr(kernels, "_seconds", None)  # timing would raise
    assert kernels.bf16_matmul_faster.__wrapped__(4096, 768, 6144) is False


@pytest.mark.parametrize(
    "B, D, M, on",
    [(1000, 64, 8192, True), (1000, 8192, 64, True), (1000, 64, 64, False), (64, 64, 65536, True)],
)
def test_bf16_prefilter_counts_the_matmul_macs_and_times_its_real_shape(monkeypatch, B, D, M, on):
    """The gate: fp32 on CPU, not exact, B * M * D multiply-adds >= PREFILTER_MIN_MACS, and the
    timing asked about the (B rounded up to a power of two, D, M) matmul."""
    asked = []
    monkeypatch.setattr(kernels, "bf16_matmul_faster", lambda *shape: asked.append(shape) or True)
    x, W = torch.empty(B, D), torch.empty(M, D)
    assert (B * M * D >= kernels.PREFILTER_MIN_MACS) is on
    assert kernels.bf16_prefilter(x, W) is on
    assert asked == ([(1 << (B - 1).bit_length(), D, M)] if on else [])
    assert kernels.bf16_prefilter(x, W, exact=True) is False
    assert kernels.bf16_prefilter(x.double(), W.double()) is False


def test_batchtopk_forward_selects_by_the_threshold_unless_asked_for_the_batch_rule():
    """Outside training a BatchTopK SAE's forward is its inference rule, as encode."""
    torch.manual_seed(5)
    sae = TopKSae(16, SaeConfig(num_latents=64, k=4, activation="batchtopk"))
    sae.threshold.fill_(0.05)  # low: far more than k per row pass it
    x = torch.randn(30, 16)
    pre = torch.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias).detach()
    dense = lambda out: out.dense_latents(pre.shape[1])
    torch.testing.assert_close(dense(sae(x)), torch.where(pre > 0.05, pre, 0))
    batch = dense(sae(x, batch_topk=True))
    assert (batch > 0).sum() == 4 * 30  # the batch rule: k * B


def test_encode_picks_candidates_with_the_prefilter_unless_exact(prefilter_spy):
    torch.manual_seed(0)
    sae = TopKSae(64, SaeConfig(num_latents=512, k=8))
    x = torch.randn(64, 64)
    sae.encode(x)
    sae.encode(x, exact=True)
    assert prefilter_spy == [True, False]
