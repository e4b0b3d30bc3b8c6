"""The training step's sparse kernels: a latent selection held as a fixed-size sparse matrix,
an encoder and a decoder with hand-written backward passes over it.

The one dense product a training step cannot avoid is the encoder matmul. Everything after it
touches only the selected latents: the encoder's weight gradient is a sparse (M, B) x dense
(B, d) product, the decoder is an embedding bag. Stock autograd would instead materialise dense
(B, M) gradients, and sparsify's fused encoder builds a (B*k, d) tensor of per-row
contributions; both cost more than the matmul we keep.

A training step never waits for the host: every selection has a size known before the data
(k per row; k*B per batch; k_aux per row for AuxK, dead or not), nothing reads a tensor's
value on the host, and the two sparse products are custom operators, opaque to
torch.compile (which cannot trace sparse tensors) and capturable in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
import re
import time
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Sparse CSR is "beta" in PyTorch; the ops used here are stable, the warning is noise in every
# trial's log.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class Selection(NamedTuple):
    """The selected latents of a batch: a sparse (B, M) matrix in CSR order (rows ascending,
    latents ascending within each row)."""

    acts_N: Tensor
    """Activation of each selected (row, latent); 0 where a selected latent is not positive."""
    latents_N: Tensor
    """Its latent."""
    rows_N: Tensor
    """Its row of the batch."""
    offsets_B1: Tensor
    """Where each row's entries start, then N: (B + 1,)."""


def per_row(acts_BK: Tensor, idx_BK: Tensor) -> Selection:
    """The selection of K latents in each row (padding zeros at distinct latents allowed)."""
    B, K = idx_BK.shape
    idx_BK, order_BK = idx_BK.sort(dim=1)
    # (repeat_interleave would read its output size on the host)
    rows_N = torch.arange(B, device=idx_BK.device)[:, None].expand(B, K).reshape(-1)
    offsets = torch.arange(0, B * K + 1, K, device=idx_BK.device)
    return Selection(acts_BK.gather(1, order_BK).reshape(-1), idx_BK.reshape(-1), rows_N, offsets)


def batch_top(pre_BM: Tensor, n: int) -> Selection:
    """The n largest entries of the whole (B, M) matrix (BatchTopK's training rule)."""
    B, M = pre_BM.shape
    vals_N, flat_N = pre_BM.reshape(-1).topk(min(n, pre_BM.numel()), sorted=False)
    flat_N, order_N = flat_N.sort()
    rows_N = flat_N.div(M, rounding_mode="floor")
    # Row starts by counting, not bincount: bincount's output size waits for the device.
    counts = torch.zeros(B + 1, dtype=torch.int64, device=pre_BM.device)
    counts.index_add_(0, rows_N + 1, torch.ones_like(rows_N))
    return Selection(vals_N[order_N], flat_N - rows_N * M, rows_N, counts.cumsum(0))


def top_per_row(pre_BM: Tensor, n: int, mask_M: Tensor | None = None, rescore=None) -> Selection:
    """The n largest pre-activations of each row (among the latents of mask_M), ReLU applied:
    latents masked out that fill a row get 0. `rescore(idx_BC)` gives exact values where
    pre_BM is a bf16 estimate: its top 2n are the candidates."""
    scores_BM = pre_BM if mask_M is None else pre_BM.masked_fill(~mask_M, -math.inf)
    if rescore is None:
        vals_BK, idx_BK = scores_BM.topk(n, dim=1, sorted=False)
    else:
        cand_BC = scores_BM.topk(min(2 * n, pre_BM.shape[1]), dim=1, sorted=False).indices
        cand_BC = cand_BC.sort(dim=1).values
        exact_BC = rescore(cand_BC)
        if mask_M is not None:
            exact_BC = exact_BC.masked_fill(~mask_M[cand_BC], -math.inf)
        vals_BK, local_BK = exact_BC.topk(n, dim=1, sorted=False)
        idx_BK = cand_BC.gather(1, local_BK)
    return per_row(vals_BK.relu(), idx_BK)


def over_threshold(pre_BM: Tensor, keep_BM: Tensor) -> Selection:
    """The kept pre-activations, rows padded to the widest with zeros at real, distinct
    latents (which decode to nothing). Its width is read on the host: inference only."""
    width = max(int(keep_BM.sum(1).max()), 1)
    # Per-latent thresholds keep latents that need not be a row's largest values.
    _, idx_BK = pre_BM.masked_fill(~keep_BM, -math.inf).topk(width, dim=1, sorted=False)
    acts_BK = torch.where(keep_BM.gather(1, idx_BK), pre_BM.gather(1, idx_BK), 0)
    return per_row(acts_BK.relu(), idx_BK)


def _transposed_mm(
    rows_N: Tensor, latents_N: Tensor, vals_N: Tensor, dense_BD: Tensor, num_latents: int
) -> Tensor:
    """S.T @ dense for the sparse (B, M) matrix S holding vals at (rows, latents): (M, d).

    Built as CSR over latents (rows of S.T), which multiplies faster than COO on CPU."""
    order_N = latents_N.argsort()
    crow = torch.zeros(num_latents + 1, dtype=torch.int64, device=latents_N.device)
    crow.index_add_(0, latents_N + 1, torch.ones_like(latents_N))
    S_t = torch.sparse_csr_tensor(
        crow.cumsum(0),
        rows_N[order_N],
        vals_N[order_N],
        (num_latents, dense_BD.shape[0]),
        check_invariants=False,
    )
    return S_t @ dense_BD


transposed_mm = torch.library.custom_op("clip_sae::transposed_mm", _transposed_mm, mutates_args=())


@transposed_mm.register_fake
def _(rows_N, latents_N, vals_N, dense_BD, num_latents):
    return dense_BD.new_empty(num_latents, dense_BD.shape[1])


def _sampled_dots(offsets_B1: Tensor, latents_N: Tensor, a_BD: Tensor, W_MD: Tensor) -> Tensor:
    """<a[row], W[latent]> for each entry of a CSR pattern, without gathering (N, d) rows."""
    pattern = torch.sparse_csr_tensor(
        offsets_B1,
        latents_N,
        a_BD.new_zeros(len(latents_N)),
        (a_BD.shape[0], W_MD.shape[0]),
        check_invariants=False,
    )
    return torch.sparse.sampled_addmm(pattern, a_BD, W_MD.t(), beta=0.0).values()


sampled_dots = torch.library.custom_op("clip_sae::sampled_dots", _sampled_dots, mutates_args=())


@sampled_dots.register_fake
def _(offsets_B1, latents_N, a_BD, W_MD):
    return a_BD.new_empty(len(latents_N))


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
    never when `exact` (TrainConfig.exact_topk). Decided from shapes, dtypes and the device,
    never from values.

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


def exact_pre(xc_BD: Tensor, W_enc_MD: Tensor, b_enc_M: Tensor, idx_BC: Tensor) -> Tensor:
    """Exact fp32 pre-activations of the latents idx_BC (sorted within rows) of each row."""
    B, C = idx_BC.shape
    offsets_B1 = torch.arange(0, B * C + 1, C, device=idx_BC.device)
    dots = sampled_dots(offsets_B1, idx_BC.reshape(-1), xc_BD, W_enc_MD)
    return dots.view(idx_BC.shape) + b_enc_M[idx_BC]


class Encode(torch.autograd.Function):
    """The selected pre-activations (given, computed without autograd), with their gradient
    to x, W_enc, b_enc and b_dec: pre = (x - b_dec) @ W_enc.T + b_enc at each selected
    (row, latent). Only positive activations pass a gradient (the ReLU)."""

    @staticmethod
    def forward(ctx, acts_N, x_BD, W_enc_MD, b_enc_M, b_dec_D, latents_N, rows_N, offsets_B1):
        ctx.save_for_backward(acts_N, x_BD, W_enc_MD, b_dec_D, latents_N, rows_N, offsets_B1)
        return acts_N.clone()

    @staticmethod
    def backward(ctx, g_N):
        acts_N, x_BD, W_enc_MD, b_dec_D, latents_N, rows_N, offsets_B1 = ctx.saved_tensors
        g_N = (g_N * (acts_N > 0)).to(W_enc_MD.dtype)
        M = W_enc_MD.shape[0]
        g_x = g_W = g_b_enc = g_b_dec = None
        need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[1:5]
        if need_W:
            xc_BD = (x_BD - b_dec_D).to(W_enc_MD.dtype)
            g_W = transposed_mm(rows_N, latents_N, g_N, xc_BD, M)
        if need_b_enc or need_b_dec:
            g_pre_M = torch.zeros(M, dtype=g_N.dtype, device=g_N.device)
            g_pre_M.index_add_(0, latents_N, g_N)
            g_b_enc = g_pre_M if need_b_enc else None
            # d/d b_dec of sum_bj g_bj W_enc[j] . (x_b - b_dec) = -(sum_b g_b) @ W_enc
            g_b_dec = -(g_pre_M @ W_enc_MD) if need_b_dec else None
        if need_x:
            g_x = F.embedding_bag(
                latents_N,
                W_enc_MD,
                offsets_B1,
                mode="sum",
                per_sample_weights=g_N,
                include_last_offset=True,
            )
        return None, g_x, g_W, g_b_enc, g_b_dec, None, None, None


def encode(sel: Selection, x_BD, W_enc_MD, b_enc_M, b_dec_D) -> Tensor:
    """sel.acts_N with gradients to the encoder's inputs and parameters."""
    return Encode.apply(
        sel.acts_N, x_BD, W_enc_MD, b_enc_M, b_dec_D, sel.latents_N, sel.rows_N, sel.offsets_B1
    )


class Decode(torch.autograd.Function):
    """Row b of the output: sum of acts * W_dec[latent] over the row's entries (an embedding
    bag), with a sparse backward."""

    @staticmethod
    def forward(ctx, acts_N, W_dec_MD, latents_N, rows_N, offsets_B1):
        ctx.save_for_backward(acts_N, W_dec_MD, latents_N, rows_N, offsets_B1)
        return F.embedding_bag(
            latents_N,
            W_dec_MD,
            offsets_B1,
            mode="sum",
            per_sample_weights=acts_N.to(W_dec_MD.dtype),
            include_last_offset=True,
        )

    @staticmethod
    def backward(ctx, g_out_BD):
        acts_N, W_dec_MD, latents_N, rows_N, offsets_B1 = ctx.saved_tensors
        g_out_BD = g_out_BD.to(W_dec_MD.dtype)
        g_acts = g_W = None
        if ctx.needs_input_grad[0]:
            g_acts = sampled_dots(offsets_B1, latents_N, g_out_BD, W_dec_MD).to(acts_N.dtype)
        if ctx.needs_input_grad[1]:
            g_W = transposed_mm(
                rows_N, latents_N, acts_N.to(W_dec_MD.dtype), g_out_BD, W_dec_MD.shape[0]
            )
        return g_acts, g_W, None, None, None


def decode(sel: Selection, W_dec_MD: Tensor, acts_N: Tensor | None = None) -> Tensor:
    """(B, d) reconstruction from the selection (or from other activations at its entries)."""
    acts_N = sel.acts_N if acts_N is None else acts_N
    return Decode.apply(acts_N, W_dec_MD, sel.latents_N, sel.rows_N, sel.offsets_B1)


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
