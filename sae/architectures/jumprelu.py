"""JumpReLU (Rajamanoharan et al. 2024): a latent fires where its pre-activation exceeds its own
learnt threshold; k is the L0 that training aims at (TrainConfig.l0_coefficient weighs the
pull), and the L0 reached is measured, not fixed. The thresholds' straight-through gradient
is sae.kernels.JumpReLU."""

from __future__ import annotations

from .base import Architecture

INIT_FIRING = 1 / 3
"""The share of the first batch each latent fires on at the start, when
TrainConfig.jumprelu_init_threshold is unset. A low start, as Rajamanoharan et al.'s, that
the L0 loss raises; in the data's own units. Ground truth (docs/performance.md): thresholds
started where latents fire on k / M of the batch left 21% of the latents dead."""


class JumpReLU(Architecture):
    name = "jumprelu"
    title = "JumpReLU"
    saelens = "jumprelu"
    searched = ("l0_coefficient",)
    label = {"l0_coefficient": "l0c"}
    dense = True  # the thresholds' gradient needs the pre-activations near them

    def add_state(self, sae):
        import torch

        # Learnt, kept >= 0 after each step (a negative one would pass negative
        # pre-activations); `initialise` sets its start from the first batch.
        w = sae.W_dec
        zeros = torch.zeros(sae.num_latents, device=w.device, dtype=w.dtype)
        sae.threshold = torch.nn.Parameter(zeros)

    def select(self, sae, pre_BM, training, rescore=None):
        from sae.kernels import over_threshold

        return over_threshold(pre_BM, pre_BM > sae.threshold)

    def dense_forward(self, sae, pre_BM):
        from sae.kernels import jumprelu

        acts_BM, fires_BM = jumprelu(pre_BM, sae.threshold, self.cfg.jumprelu_bandwidth)
        # (L0 / k - 1)^2, the batch's mean L0 counted straight-through
        l0_loss = (fires_BM.sum(1).mean() / self.cfg.k - 1).pow(2)
        return acts_BM, fires_BM, l0_loss

    def initialise(self, sae, x_BD, train):
        """Every threshold at train.jumprelu_init_threshold, or per latent the pre-activation
        it exceeds on INIT_FIRING of this batch's rows."""
        import torch

        with torch.no_grad():
            if train.jumprelu_init_threshold is not None:
                sae.threshold.fill_(train.jumprelu_init_threshold)
                return
            pre_BM = sae.pre_activations(x_BD)
            below = max(round(len(x_BD) * (1 - INIT_FIRING)), 1)
            sae.threshold.copy_(pre_BM.kthvalue(below, dim=0).values.clamp(min=0))

    def after_step(self, sae, out):
        import torch

        with torch.no_grad():
            sae.threshold.clamp_(min=0)
