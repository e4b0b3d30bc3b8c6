"""BatchTopK (Bussmann et al. 2024): in training the k * B largest latents of a batch of B
inputs, so inputs share the budget; at inference a latent fires above one threshold, a running
average of the smallest activation the training rule kept."""

from __future__ import annotations

from .base import Architecture

THRESHOLD_LR = 0.01
"""Weight of each training batch in the running average of the inference threshold (SAELens's
topk_threshold_lr)."""


class BatchTopK(Architecture):
    name = "batchtopk"
    title = "BatchTopK"
    saelens = "jumprelu"  # its threshold repeated per latent, as SAELens saves its own
    flat = True

    def add_state(self, sae):
        import torch

        w = sae.W_dec
        sae.register_buffer("threshold", torch.zeros((), device=w.device, dtype=w.dtype))

    def select(self, sae, pre_BM, training, rescore=None):
        from sae.kernels import batch_top, over_threshold

        if training:
            sel = batch_top(pre_BM, self.cfg.k * len(pre_BM))
            return sel._replace(acts_N=sel.acts_N.relu())
        return over_threshold(pre_BM, pre_BM > sae.threshold)

    def after_step(self, sae, out):
        """Move the threshold towards the smallest positive activation the batch rule kept;
        the first batch sets it."""
        import torch

        with torch.no_grad():
            acts, old = out.latent_acts, sae.threshold
            smallest = torch.where(acts > 0, acts, torch.inf).min().to(old.dtype)
            moved = torch.where(old == 0, smallest, old.lerp(smallest, THRESHOLD_LR))
            old.copy_(torch.where(torch.isfinite(smallest), moved, old))
