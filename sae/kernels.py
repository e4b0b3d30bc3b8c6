"""Fused TopK encoder and sparse decoder with hand-written backward passes.

The one dense product a training step cannot avoid is the encoder matmul. Everything after it
touches only the k (plus k_aux) selected latents of each row: the encoder's weight gradient is
a sparse (M, B) x dense (B, d) product, the decoder is an embedding bag. Stock autograd would
instead materialise dense (B, M) gradients, and sparsify's fused encoder builds a (B*k, d)
tensor of per-row contributions; both cost more than the matmul we keep.
"""

from __future__ import annotations

import functools
import math
import re
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

# Sparse CSR is "beta" in PyTorch; the ops used here are stable, the warning is noise in every
# trial's log.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _scatter_t_mm(idx_BK: Tensor, vals_BK: Tensor, dense_BD: Tensor, num_latents: int) -> Tensor:
    """S.T @ dense for the sparse (B, M) matrix S holding `vals_BK` at columns `idx_BK`.

    Built as CSR over latents (rows of S.T), which multiplies faster than COO on CPU.
    """
    B, K = idx_BK.shape
    flat = idx_BK.reshape(-1)
    order = flat.argsort()
    crow = torch.zeros(num_latents + 1, dtype=torch.int64, device=flat.device)
    crow[1:] = torch.bincount(flat, minlength=num_latents).cumsum(0)
    rows = torch.arange(B, device=flat.device).repeat_interleave(K)
    S_t = torch.sparse_csr_tensor(
        crow, rows[order], vals_BK.reshape(-1)[order], (num_latents, B), check_invariants=False
    )
    return S_t @ dense_BD


def _sampled_dots(idx_BK: Tensor, a_BD: Tensor, W_MD: Tensor) -> Tensor:
    """<a_b, W[idx_bj]> for every selected (b, j), without gathering (B, K, D) rows."""
    B, K = idx_BK.shape
    sorted_BK, perm_BK = idx_BK.sort(dim=1)  # CSR wants sorted columns within a row
    crow = torch.arange(0, B * K + 1, K, device=idx_BK.device)
    pattern = torch.sparse_csr_tensor(
        crow,
        sorted_BK.reshape(-1),
        a_BD.new_zeros(B * K),
        (B, W_MD.shape[0]),
        check_invariants=False,
    )
    dots = torch.sparse.sampled_addmm(pattern, a_BD, W_MD.t(), beta=0.0).values().view(B, K)
    return torch.empty_like(dots).scatter_(1, perm_BK, dots)


PREFILTER_MIN_MACS = 2**28


def native_bf16(cpuinfo: str) -> bool | None:
    """Whether a CPU computes bf16 dot products in hardware, from /proc/cpuinfo's text: x86
    `avx512_bf16` or `amx_bf16`, ARM `bf16`. None when the text lists no flags.

    oneDNN also runs bf16 matmuls on CPUs without these instructions (any AVX512 core), by
    converting to fp32: there they are about 2x slower than fp32 itself.
    """
    lines = [line for line in cpuinfo.splitlines() if re.match(r"(flags|Features)\s*:", line)]
    if not lines:
        return None
    flags = set(lines[0].split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def _native_bf16_cpu() -> bool | None:
    try:
        with open("/proc/cpuinfo") as f:
            return native_bf16(f.read())
    except OSError:  # not Linux: let the timing decide
        return None


def _seconds(x_BD: Tensor, w_MD: Tensor) -> float:
    start = time.perf_counter()
    torch.mm(x_BD, w_MD.t())
    return time.perf_counter() - start


@functools.cache
def bf16_matmul_faster(B: int, D: int, M: int) -> bool:
    """Whether a bf16 (B, D) x (D, M) matmul beats fp32 on this CPU: never without native bf16
    instructions; where they exist (or the flags are unknown), timed once per shape and process.

    The timing also catches what flags cannot: oneDNN limited by ONEDNN_MAX_CPU_ISA, or a
    build without bf16 kernels. Native bf16 ran 3-4x faster than fp32 where we measured, an
    emulated one 2x slower, so a few timed calls decide it even on a busy machine.
    """
    if _native_bf16_cpu() is False:
        return False
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    gen = torch.Generator().manual_seed(0)
    fp32 = (torch.randn(B, D, generator=gen), torch.randn(M, D, generator=gen))
    bf16 = tuple(t.bfloat16() for t in fp32)
    _seconds(*fp32), _seconds(*bf16)  # first calls: oneDNN builds its kernels
    t32 = t16 = math.inf
    for _ in range(3):  # best of three, interleaved, so background load slows both alike
        t32, t16 = min(t32, _seconds(*fp32)), min(t16, _seconds(*bf16))
    return t16 < 0.8 * t32


def bf16_prefilter(xc_BD: Tensor, W_enc_MD: Tensor, exact: bool = False) -> bool:
    """Whether to pick TopK candidates with a bf16 matmul: where bf16 matmuls are faster than
    fp32 (see bf16_matmul_faster), since the encoder matmul is most of a CPU training step;
    never when `exact` (TrainConfig.exact_topk).

    Only the choice of candidates (2k per row) uses bf16; their values, the activations and all
    gradients are exact fp32. A true top-k latent outside the bf16 top 2k would need a bf16
    rounding error larger than the gap between the k-th and 2k-th pre-activation.
    """
    B, D = xc_BD.shape
    M = W_enc_MD.shape[0]
    return (
        not exact
        and xc_BD.device.type == "cpu"
        and xc_BD.dtype == W_enc_MD.dtype == torch.float32
        # Below ~3e8 multiply-adds the conversions and rescoring cost more than they save.
        and B * M * D >= PREFILTER_MIN_MACS
        # Timed at the batch rounded up to a power of two: the last, smaller batch of an
        # evaluation pass reuses its full batches' answer instead of timing again.
        and bf16_matmul_faster(1 << (B - 1).bit_length(), D, M)
    )


class TopKEncode(torch.autograd.Function):
    """relu(TopK((x - b_dec) @ W_enc.T + b_enc)), plus the AuxK selection among dead latents.

    Returns (acts_BK, indices_BK, aux_acts_BA, aux_indices_BA). The AuxK outputs are empty
    when `dead_M` is None. Gradients from both selections flow to W_enc, b_enc and b_dec:
    sparsify's fused encoder drops the AuxK part (its backward ignores the pre-activations'
    gradient), which leaves dead latents' encoder rows frozen.
    """

    @staticmethod
    def forward(
        ctx, x_BD, W_enc_MD, b_enc_M, b_dec_D, k: int, dead_M, k_aux: int, rule, threshold, exact
    ):
        xc_BD = x_BD - b_dec_D
        # The batch and threshold rules need every pre-activation exactly: no prefilter.
        prefilter = rule == "topk" and bf16_prefilter(xc_BD, W_enc_MD, exact)
        if prefilter:
            W_enc_lo = W_enc_MD.bfloat16()
            pre_BM = torch.addmm(b_enc_M.bfloat16(), xc_BD.bfloat16(), W_enc_lo.t())
        else:
            pre_BM = torch.addmm(b_enc_M, xc_BD, W_enc_MD.t())

        def select(cols, n):
            """Top n of pre_BM (restricted to `cols`), as exact (values, latent indices)."""
            scores = pre_BM if cols is None else pre_BM.index_select(1, cols)
            if not prefilter:
                vals, local = scores.topk(n, dim=1, sorted=False)
                return vals, local if cols is None else cols[local]
            # bf16 scores only choose candidates: twice as many as needed, rescored exactly.
            cand = scores.topk(min(2 * n, scores.shape[1]), dim=1, sorted=False).indices
            cand = cand if cols is None else cols[cand]
            exact = _sampled_dots(cand, xc_BD, W_enc_MD) + b_enc_M[cand]
            vals, local = exact.topk(n, dim=1, sorted=False)
            return vals, cand.gather(1, local)

        if rule == "topk":
            # TopK then ReLU selects the same values as ReLU then TopK, on k instead of M columns.
            acts_BK, idx_BK = select(None, k)
        else:
            # A cut over the whole matrix: the k*B-th largest value (batchtopk) or a fixed
            # threshold. Rows keep different counts, padded to the widest row with zeros at
            # real (distinct) latents, which decode to nothing and get no gradient.
            if rule == "batchtopk":
                n = min(k * pre_BM.shape[0], pre_BM.numel())
                threshold = pre_BM.reshape(-1).topk(n, sorted=False).values.min()
                keep_BM = pre_BM >= threshold
            else:
                keep_BM = pre_BM > threshold
            width = max(int(keep_BM.sum(1).max()), 1)
            # Per-latent thresholds keep latents that need not be a row's largest values.
            kept_BM = pre_BM.masked_fill(~keep_BM, -math.inf)
            _, idx_BK = kept_BM.topk(width, dim=1, sorted=False)
            acts_BK = torch.where(keep_BM.gather(1, idx_BK), pre_BM.gather(1, idx_BK), 0)
        acts_BK = acts_BK.relu_()
        if dead_M is not None and k_aux > 0 and not prefilter and xc_BD.device.type != "cpu":
            # On a GPU, nonzero() would wait for the device; masking the live latents does
            # not. The caller keeps k_aux <= the dead count, so every pick is a dead latent.
            live = pre_BM.masked_fill(~dead_M, -math.inf)
            aux_acts_BA, aux_idx_BA = live.topk(k_aux, dim=1, sorted=False)
            aux_acts_BA = aux_acts_BA.relu_()
        elif dead_M is not None and k_aux > 0:
            aux_acts_BA, aux_idx_BA = select(dead_M.nonzero().squeeze(1), k_aux)
            aux_acts_BA = aux_acts_BA.relu_()
        else:
            aux_acts_BA = xc_BD.new_empty(x_BD.shape[0], 0)
            aux_idx_BA = idx_BK.new_empty(x_BD.shape[0], 0)
        ctx.save_for_backward(xc_BD, W_enc_MD, idx_BK, acts_BK, aux_idx_BA, aux_acts_BA)
        ctx.mark_non_differentiable(idx_BK, aux_idx_BA)
        return acts_BK, idx_BK, aux_acts_BA, aux_idx_BA

    @staticmethod
    def backward(ctx, g_acts_BK, _g_idx, g_aux_BA, _g_aux_idx):
        xc_BD, W_enc_MD, idx_BK, acts_BK, aux_idx_BA, aux_acts_BA = ctx.saved_tensors
        # Gradient w.r.t. the pre-activations, only where something was selected and positive.
        g_BK = g_acts_BK * (acts_BK > 0)
        if aux_idx_BA.shape[1] > 0 and g_aux_BA is not None:
            g_BK = torch.cat([g_BK, g_aux_BA * (aux_acts_BA > 0)], dim=1)
            idx_BK = torch.cat([idx_BK, aux_idx_BA], dim=1)
        g_BK = g_BK.to(W_enc_MD.dtype)
        M = W_enc_MD.shape[0]
        g_x = g_W = g_b_enc = g_b_dec = None
        need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[:4]
        if need_W:
            g_W = _scatter_t_mm(idx_BK, g_BK, xc_BD.to(W_enc_MD.dtype), M)
        if need_b_enc or need_b_dec:
            g_pre_M = torch.zeros(M, dtype=g_BK.dtype, device=g_BK.device)
            g_pre_M.index_add_(0, idx_BK.reshape(-1), g_BK.reshape(-1))
            g_b_enc = g_pre_M if need_b_enc else None
            # d/d b_dec of sum_bj g_bj W_enc[j] . (x_b - b_dec) = -(sum_b g_b) @ W_enc
            g_b_dec = -(g_pre_M @ W_enc_MD) if need_b_dec else None
        if need_x:
            g_x = F.embedding_bag(idx_BK, W_enc_MD, per_sample_weights=g_BK, mode="sum")
        return g_x, g_W, g_b_enc, g_b_dec, None, None, None, None, None, None


class SparseDecode(torch.autograd.Function):
    """sum_j acts[b, j] * W_dec[indices[b, j]]: an embedding bag with a sparse backward."""

    @staticmethod
    def forward(ctx, acts_BK, idx_BK, W_dec_MD):
        ctx.save_for_backward(acts_BK, idx_BK, W_dec_MD)
        return F.embedding_bag(
            idx_BK, W_dec_MD, per_sample_weights=acts_BK.to(W_dec_MD.dtype), mode="sum"
        )

    @staticmethod
    def backward(ctx, g_out_BD):
        acts_BK, idx_BK, W_dec_MD = ctx.saved_tensors
        g_acts = g_W = None
        if ctx.needs_input_grad[0]:
            g_acts = _sampled_dots(idx_BK, g_out_BD.to(W_dec_MD.dtype), W_dec_MD)
            g_acts = g_acts.to(acts_BK.dtype)
        if ctx.needs_input_grad[2]:
            g_W = _scatter_t_mm(
                idx_BK, acts_BK.to(W_dec_MD.dtype), g_out_BD.to(W_dec_MD.dtype), W_dec_MD.shape[0]
            )
        return g_acts, None, g_W


class JumpReLU(torch.autograd.Function):
    """JumpReLU's training activations (Rajamanoharan et al. 2024), dense over the batch:
    acts = pre * (pre > threshold) and fires = (pre > threshold), per latent.

    The step has no gradient, so the thresholds get a straight-through estimate: the step's
    derivative is replaced by a rectangle kernel of width `bandwidth` around the threshold.
    Then d acts / d threshold = -(threshold / bandwidth) * K and d fires / d threshold =
    -K / bandwidth, with K = 1 where |pre - threshold| < bandwidth / 2. The pre-activations
    get the ordinary gradient of acts (the step's own is zero).
    """

    @staticmethod
    def forward(ctx, pre_BM, threshold_M, bandwidth: float):
        fires_BM = pre_BM > threshold_M
        ctx.save_for_backward(pre_BM, threshold_M, fires_BM)
        ctx.bandwidth = bandwidth
        return pre_BM * fires_BM, fires_BM.to(pre_BM.dtype)

    @staticmethod
    def backward(ctx, g_acts_BM, g_fires_BM):
        pre_BM, threshold_M, fires_BM = ctx.saved_tensors
        eps = ctx.bandwidth
        near_BM = ((pre_BM - threshold_M).abs() < eps / 2).to(threshold_M.dtype)
        g_pre = g_acts_BM * fires_BM if g_acts_BM is not None else None
        g_theta = threshold_M.new_zeros(threshold_M.shape)
        if g_acts_BM is not None:
            g_theta -= (near_BM * g_acts_BM).sum(0) * threshold_M / eps
        if g_fires_BM is not None:
            g_theta -= (near_BM * g_fires_BM).sum(0) / eps
        return g_pre, g_theta, None


def jumprelu(pre_BM, threshold_M, bandwidth):
    """(acts_BM, fires_BM) of JumpReLU with straight-through threshold gradients."""
    return JumpReLU.apply(pre_BM, threshold_M, bandwidth)


def topk_encode(
    x_BD,
    W_enc_MD,
    b_enc_M,
    b_dec_D,
    k,
    dead_M=None,
    k_aux=0,
    rule="topk",
    threshold=0.0,
    exact=False,
):
    """rule: "topk" (k per row), "batchtopk" (k * B over the batch) or "threshold" (every
    pre-activation above `threshold`, a number or one per latent, (M,)). The last two return
    rows padded with zeros.
    `exact`: select from the fp32 matmul even where bf16_prefilter would pick candidates."""
    return TopKEncode.apply(
        x_BD, W_enc_MD, b_enc_M, b_dec_D, k, dead_M, k_aux, rule, threshold, exact
    )


def sparse_decode(acts_BK, idx_BK, W_dec_MD):
    return SparseDecode.apply(acts_BK, idx_BK, W_dec_MD)
