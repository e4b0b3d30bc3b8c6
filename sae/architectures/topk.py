"""TopK (Gao et al. 2024; EleutherAI sparsify's): the k largest latents of each input."""

from __future__ import annotations

from .base import Architecture


class TopK(Architecture):
    name = "topk"
    title = "TopK"
    sparsify = True
    prefilter = True

    def select(self, sae, pre_BM, training, rescore=None):
        from sae.kernels import top_per_row

        return top_per_row(pre_BM, self.cfg.k, rescore=rescore)
