"""Matryoshka (Bussmann et al. 2025): BatchTopK whose first latents must also reconstruct the
input on their own, at each width of SaeConfig.matryoshka_fractions (nested dictionaries,
against feature absorption). It runs as a BatchTopK SAE."""

from __future__ import annotations

from .batchtopk import BatchTopK


class Matryoshka(BatchTopK):
    name = "matryoshka"
    title = "Matryoshka"

    def widths(self, num_latents: int) -> list[int]:
        """The inner levels' widths in latents (the whole width not included)."""
        fractions = self.cfg.matryoshka_fractions
        widths = sorted({max(1, round(f * num_latents)) for f in fractions})
        return [w for w in widths if w < num_latents]

    def inner_fvu(self, sae, x_BD, sel, total_variance):
        """The sum over the inner levels of the FVU of the level's latents alone, their
        activations as the batch chose them."""
        import torch

        from sae.kernels import decode

        inner = x_BD.new_zeros(())
        for width in self.widths(sae.num_latents):
            inner_N = torch.where(sel.latents_N < width, sel.acts_N, 0)
            e_inner = x_BD - (decode(sel, sae.W_dec, inner_N) + sae.b_dec)
            inner = inner + e_inner.pow(2).sum() / total_variance
        return inner
