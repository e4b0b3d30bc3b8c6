"""Whole-dataset SAE metrics, accumulated batch by batch in one pass.

FVU is sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over every row. Both sums run in float64:
a float32 running sum over millions of rows drifts by more than the differences between
the SAEs a sweep compares. The denominator merges per-batch means and squared deviations
(Chan et al.), so no second pass over the data is needed for the mean.
"""

from __future__ import annotations

import torch
from torch import Tensor

DENSE_FREQUENCY = 0.1
"""A latent firing on more than this fraction of inputs counts as dense."""


class SaeStats:
    """Running FVU, L0 and per-latent firing counts over many batches."""

    def __init__(self, num_latents: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.sq_err = torch.zeros((), dtype=torch.float64, device=device)
        self.mean_D: Tensor | None = None
        self.m2 = torch.zeros((), dtype=torch.float64, device=device)
        self.active = torch.zeros((), dtype=torch.float64, device=device)
        self.fired_M = torch.zeros(num_latents, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, x_BD: Tensor, x_hat_BD: Tensor, acts_BK: Tensor, idx_BK: Tensor) -> None:
        x = x_BD.double()
        b = x.shape[0]
        if b == 0:
            return
        self.sq_err += (x - x_hat_BD.double()).pow(2).sum()
        batch_mean = x.mean(0)
        batch_m2 = (x - batch_mean).pow(2).sum()
        if self.mean_D is None:
            self.mean_D, self.m2 = batch_mean, batch_m2
        else:
            delta = batch_mean - self.mean_D
            total = self.n + b
            self.m2 = self.m2 + batch_m2 + delta.pow(2).sum() * (self.n * b / total)
            self.mean_D = self.mean_D + delta * (b / total)
        self.n += b
        fired_BK = acts_BK > 0
        self.active += fired_BK.sum()
        # A latent can appear at most once per row, so counting indices counts inputs.
        self.fired_M += torch.bincount(idx_BK[fired_BK], minlength=self.fired_M.numel())

    def firing_frequency(self) -> Tensor:
        """Fraction of inputs on which each latent fired, (M,)."""
        return self.fired_M.double() / max(self.n, 1)

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no rows were evaluated")
        freq = self.firing_frequency()
        return {
            "fvu": (self.sq_err / self.m2).item() if self.m2 > 0 else float("nan"),
            "l0": (self.active / self.n).item(),
            "dead_frac": (freq == 0).double().mean().item(),
            "dense_frac": (freq > DENSE_FREQUENCY).double().mean().item(),
        }


@torch.no_grad()
def evaluate(sae, acts_ND, batch_size: int = 4096, device=None) -> SaeStats:
    """Stream the rows of the tensor `acts_ND` through `sae` and gather SaeStats."""
    device = device or sae.device
    stats = SaeStats(sae.num_latents, device=device)
    for start in range(0, len(acts_ND), batch_size):
        x = acts_ND[start : start + batch_size].to(device, torch.float32)
        acts_BK, idx_BK = sae.encode(x)
        stats.update(x, sae.decode(acts_BK, idx_BK), acts_BK, idx_BK)
    return stats
