"""Whole-dataset SAE metrics, accumulated batch by batch in one pass.

FVU is sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over every row. Both sums run in float64:
a float32 running sum over millions of rows drifts by more than the differences between
the SAEs a sweep compares. The denominator merges per-batch means and squared deviations
(Chan et al.), so no second pass over the data is needed for the mean.

`never_fired_frac` counts latents that fired on none of the n evaluated rows. It is not the
dead fraction: a live latent that fires on a fraction p of inputs goes unseen with
probability (1 - p)^n ~ exp(-n p), so it only tells dead from rare for latents with
p >> 1/n; n >= 3 / p makes a miss less than 5% likely (3,000 rows: latents rarer than
1e-3 may read as never fired). The trainer's `dead_frac` (training window) is the dead count.
"""

from __future__ import annotations

import torch
from torch import Tensor

DENSE_FREQUENCY = 0.1
"""A latent firing on more than this fraction of inputs counts as dense."""


class _Moments:
    """Running mean and summed squared deviation of rows, merged batch by batch (Chan)."""

    def __init__(self, device):
        self.n = 0
        self.mean_D: Tensor | None = None
        self.m2 = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, x_BD: Tensor) -> None:
        b = x_BD.shape[0]
        batch_mean = x_BD.mean(0)
        batch_m2 = (x_BD - batch_mean).pow(2).sum()
        if self.mean_D is None:
            self.mean_D, self.m2 = batch_mean, batch_m2
        else:
            delta = batch_mean - self.mean_D
            total = self.n + b
            self.m2 = self.m2 + batch_m2 + delta.pow(2).sum() * (self.n * b / total)
            self.mean_D = self.mean_D + delta * (b / total)
        self.n += b


class SaeStats:
    """Running FVU, explained variance, L0 and per-latent firing counts and activations."""

    def __init__(self, num_latents: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.sq_err = torch.zeros((), dtype=torch.float64, device=device)
        self.x = _Moments(device)
        self.residual = _Moments(device)
        self.active = torch.zeros((), dtype=torch.float64, device=device)
        self.xhat_sq = torch.zeros((), dtype=torch.float64, device=device)
        self.x_dot_xhat = torch.zeros((), dtype=torch.float64, device=device)
        self.fired_M = torch.zeros(num_latents, dtype=torch.int64, device=device)
        self.act_sum_M = torch.zeros(num_latents, dtype=torch.float64, device=device)
        self.max_act_M = torch.zeros(num_latents, device=device)

    @torch.no_grad()
    def update(self, x_BD: Tensor, x_hat_BD: Tensor, acts_BK: Tensor, idx_BK: Tensor) -> None:
        x = x_BD.double()
        if x.shape[0] == 0:
            return
        x_hat = x_hat_BD.double()
        r = x - x_hat
        self.sq_err += r.pow(2).sum()
        self.xhat_sq += x_hat.pow(2).sum()
        self.x_dot_xhat += (x * x_hat).sum()
        self.x.update(x)
        self.residual.update(r)
        self.n += x.shape[0]
        fired_BK = acts_BK > 0
        self.active += fired_BK.sum()
        # A latent can appear at most once per row, so counting indices counts inputs.
        idx = idx_BK[fired_BK]
        acts = acts_BK[fired_BK].float()
        self.fired_M += torch.bincount(idx, minlength=self.fired_M.numel())
        self.act_sum_M.index_add_(0, idx, acts.double())
        self.max_act_M.scatter_reduce_(0, idx, acts, "amax")

    def firing_frequency(self) -> Tensor:
        """Fraction of inputs on which each latent fired, (M,)."""
        return self.fired_M.double() / max(self.n, 1)

    def mean_activation(self) -> Tensor:
        """Mean activation of each latent over the inputs where it fired (0 if none), (M,)."""
        return self.act_sum_M / self.fired_M.clamp(min=1)

    def result(self) -> dict[str, float]:
        """fvu; explained_variance = 1 - sum Var(x - x_hat) / sum Var(x) (unlike 1 - fvu it
        forgives a constant offset); l0; never_fired_frac and dense_frac (see the module
        doc); mean_act (mean over latents that fired of their mean activation) and max_act;
        shrinkage, SAEBench's relative reconstruction bias sum ||x_hat||^2 / sum <x, x_hat>
        (Rajamanoharan et al. 2024, eq. 10): 1 when x_hat is not scaled down, below 1 when
        the sparsity penalty shrinks it; 1 / shrinkage is the best rescaling of x_hat."""
        if self.n == 0:
            raise ValueError("no rows were evaluated")
        freq = self.firing_frequency()
        fired = self.fired_M > 0
        var = self.x.m2
        return {
            "fvu": (self.sq_err / var).item() if var > 0 else float("nan"),
            "explained_variance": (1 - self.residual.m2 / var).item() if var > 0 else float("nan"),
            "l0": (self.active / self.n).item(),
            "never_fired_frac": (~fired).double().mean().item(),
            "dense_frac": (freq > DENSE_FREQUENCY).double().mean().item(),
            "mean_act": self.mean_activation()[fired].mean().item() if fired.any() else 0.0,
            "max_act": self.max_act_M.max().item(),
            "shrinkage": (self.xhat_sq / self.x_dot_xhat).item()
            if self.x_dot_xhat > 0
            else float("nan"),
        }


DENSITY_DECADES = tuple(range(-6, 0))
"""log10 firing frequencies that bound the bins of density_histogram."""


def density_histogram(frequency_M: Tensor) -> dict[str, int]:
    """How many latents fire at each decade of frequency (SAEBench's feature density): keys
    "never", "below_1e-6", "1e-6" (for [1e-6, 1e-5)), ..., "1e-1" (for [0.1, 1])."""
    freq = frequency_M.double()
    counts = {
        "never": int((freq == 0).sum()),
        "below_1e-6": int(((freq > 0) & (freq < 1e-6)).sum()),
    }
    for low in DENSITY_DECADES:
        above = freq >= 10.0**low
        counts[f"1e{low}"] = int((above & (freq < 10.0 ** (low + 1) if low < -1 else above)).sum())
    return counts


@torch.no_grad()
def decoder_similarity(W_dec_MD: Tensor, threshold: float = 0.9, block: int = 4096):
    """(largest cosine similarity between two distinct decoder rows, pairs of rows above
    `threshold`): near-duplicate latents. In blocks of rows, never a whole (M, M) matrix."""
    W = torch.nn.functional.normalize(W_dec_MD.float(), dim=1)
    M = len(W)
    best, pairs = -1.0, 0
    for start in range(0, M, block):
        cos_BM = W[start : start + block] @ W.T
        rows = torch.arange(start, min(start + block, M), device=W.device)
        cos_BM[rows - start, rows] = -2.0  # a row with itself
        best = max(best, cos_BM.max().item())
        pairs += int((cos_BM > threshold).sum())
    return best, pairs // 2


def dictionary_metrics(W_dec_MD: Tensor, frequency_M: Tensor) -> dict[str, float]:
    """What a trained SAE's dictionary looks like, SAEBench's way: decoder/max_cos and
    decoder/pairs_over_0.9 (decoder_similarity), and density/<bin> (density_histogram of the
    firing frequencies measured on validation rows)."""
    max_cos, pairs = decoder_similarity(W_dec_MD)
    out = {"decoder/max_cos": max_cos, "decoder/pairs_over_0.9": float(pairs)}
    return out | {f"density/{k}": float(v) for k, v in density_histogram(frequency_M).items()}


@torch.no_grad()
def evaluate(
    sae,
    acts_ND,
    batch_size: int = 4096,
    device=None,
    input_scale: float = 1.0,
    exact: bool = False,
) -> SaeStats:
    """Stream the rows of the tensor `acts_ND` through `sae` and gather SaeStats.

    `input_scale`: the SAE reads input_scale * x (normalize_input); activations are reported
    divided by it, in the units of the SAE that reads raw x. `exact`: as in TopKSae.encode."""
    device = device or sae.device
    stats = SaeStats(sae.num_latents, device=device)
    for start in range(0, len(acts_ND), batch_size):
        x = acts_ND[start : start + batch_size].to(device, torch.float32)
        if input_scale != 1:
            x = x * input_scale
        acts_BK, idx_BK = sae.encode(x, exact=exact)
        stats.update(x, sae.decode(acts_BK, idx_BK), acts_BK / input_scale, idx_BK)
    return stats
