"""An independent dense TopK SAE forward, written with stock autograd, to check the kernels."""

import torch


def dense_forward(x, W_enc, b_enc, W_dec, b_dec, k, dead_mask=None, auxk_alpha=0.0):
    """Loss of a TopK SAE computed densely: (B, M) latents, dense decoder matmul."""
    pre = torch.relu((x - b_dec) @ W_enc.T + b_enc)
    vals, idx = pre.topk(k, dim=1)
    z = torch.zeros_like(pre).scatter(1, idx, vals)
    x_hat = z @ W_dec + b_dec
    e = x - x_hat
    total_variance = (x - x.mean(0)).pow(2).sum()
    fvu = e.pow(2).sum() / total_variance
    aux = torch.zeros(())
    if dead_mask is not None and dead_mask.any():
        num_dead = int(dead_mask.sum())
        k_aux = min(x.shape[1] // 2, num_dead)
        masked = torch.where(dead_mask[None], pre, torch.full_like(pre, -1.0))
        a_vals, a_idx = masked.topk(k_aux, dim=1)
        z_aux = torch.zeros_like(pre).scatter(1, a_idx, a_vals.clamp(min=0))
        scale = min(num_dead / (x.shape[1] // 2), 1.0)
        aux = scale * (z_aux @ W_dec - e.detach()).pow(2).sum() / total_variance
    return fvu + auxk_alpha * aux, fvu, aux, z
