"""Independent dense SAE forwards, written with stock autograd, to check the kernels.

The AuxK term follows Gao et al. (2024) appendix B.1 as sparsify's SparseCoder.forward
states it, step by step, rather than sae/model.py's arrangement of the same rule.
"""

import torch


def _auxk(pre, e, W_dec, dead_mask, total_variance):
    """Top dead latents (of d/2, fewer if fewer are dead) predict the residual e; the loss
    shrinks in proportion when fewer than d/2 latents are dead."""
    half = e.shape[1] // 2
    num_dead = int(dead_mask.sum())
    scale = min(num_dead / half, 1.0)
    dead_only = torch.where(dead_mask[None], pre, -torch.inf)
    vals, idx = dead_only.topk(min(half, num_dead), dim=1)
    e_hat = torch.zeros_like(pre).scatter(1, idx, vals) @ W_dec  # no b_dec: e already has it
    return scale * (e_hat - e.detach()).pow(2).sum() / total_variance


def dense_forward(
    x, W_enc, b_enc, W_dec, b_dec, k, dead_mask=None, auxk_alpha=0.0, batch_topk=False
):
    """Loss of a TopK (or, with batch_topk, BatchTopK) SAE computed densely: (B, M) latents
    and a dense decoder matmul."""
    pre = torch.relu((x - b_dec) @ W_enc.T + b_enc)
    if batch_topk:  # Bussmann et al. 2024: the k * B largest latents of the whole batch
        vals, flat = pre.flatten().topk(k * len(x))
        z = torch.zeros_like(pre).flatten().scatter(0, flat, vals).view_as(pre)
    else:
        vals, idx = pre.topk(k, dim=1)
        z = torch.zeros_like(pre).scatter(1, idx, vals)
    x_hat = z @ W_dec + b_dec
    e = x - x_hat
    total_variance = (x - x.mean(0)).pow(2).sum()
    fvu = e.pow(2).sum() / total_variance
    aux = torch.zeros(())
    if dead_mask is not None and dead_mask.any():
        aux = _auxk(pre, e, W_dec, dead_mask, total_variance)
    return fvu + auxk_alpha * aux, fvu, aux, z


def dense_matryoshka_forward(x, W_enc, b_enc, W_dec, b_dec, k, fractions):
    """Matryoshka-BatchTopK's training loss computed densely (Bussmann et al. 2025): the batch
    picks k * B latents as BatchTopK does; the first M * f of them, for each fraction f, and
    then all of them, each reconstruct x; the loss sums the levels' FVUs."""
    _, fvu, _, z = dense_forward(x, W_enc, b_enc, W_dec, b_dec, k, batch_topk=True)
    total_variance = (x - x.mean(0)).pow(2).sum()
    m = W_dec.shape[0]
    inner = torch.zeros((), dtype=x.dtype)
    for width in sorted({max(1, round(f * m)) for f in fractions}):
        prefix = torch.zeros_like(z)
        prefix[:, :width] = z[:, :width]
        inner = inner + (x - (prefix @ W_dec + b_dec)).pow(2).sum() / total_variance
    return fvu + inner, fvu, inner, z


def dense_jumprelu_forward(
    x,
    W_enc,
    b_enc,
    W_dec,
    b_dec,
    threshold,
    k,
    bandwidth,
    l0_coefficient,
    dead_mask=None,
    auxk_alpha=0.0,
):
    """JumpReLU's training loss (Rajamanoharan et al. 2024) with its straight-through
    estimator written as surrogate terms: each adds zero to the value and, through the
    threshold alone, the kernel's derivative, d/dθ [θ·K·c] = K·c with K and c held fixed."""
    pre = (x - b_dec) @ W_enc.T + b_enc
    gate = (pre > threshold).to(pre.dtype)
    kernel = ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype).detach()

    def through_threshold(slope):  # value 0, gradient `slope` per (row, latent) w.r.t. θ
        term = threshold * slope
        return term - term.detach()

    z = pre * gate + through_threshold(-kernel * threshold.detach() / bandwidth)
    step = gate + through_threshold(-kernel / bandwidth)
    x_hat = z @ W_dec + b_dec
    e = x - x_hat
    total_variance = (x - x.mean(0)).pow(2).sum()
    fvu = e.pow(2).sum() / total_variance
    l0 = step.sum(1).mean()
    sparsity = (l0 / k - 1) ** 2
    aux = torch.zeros(())
    if dead_mask is not None and dead_mask.any():
        aux = _auxk(torch.relu(pre), e, W_dec, dead_mask, total_variance)
    return fvu + auxk_alpha * aux + l0_coefficient * sparsity, fvu, aux, sparsity, z
