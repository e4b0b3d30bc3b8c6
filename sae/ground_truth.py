"""Activations whose features are known, and how well an SAE's decoder recovers them.

An SAE is good when it finds the features that are really there, not only when it
reconstructs well. `GroundTruth` draws rows as sparse positive combinations of known unit
feature vectors in superposition (more features than dimensions), with the structure that
makes real activations hard for SAEs: a hierarchy (a child fires only with its parent),
correlated firing (a low-rank Gaussian copula) and a heavy tail of rare features (Zipf
firing probabilities). `feature_recovery` scores a decoder against the true features by the
mean correlation coefficient after Hungarian matching (MCC), as SAELens's SynthSAEBench does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class GroundTruthConfig:
    """The synthetic data's shape. Defaults: 512 features in 128 dimensions, 8 active per row
    on average."""

    d: int = 128
    """Width of the activations."""
    num_features: int = 512
    """True features; more than d puts them in superposition."""
    mean_active: float = 8.0
    """Expected number of features firing per row (the data's own L0)."""
    zipf_exponent: float = 0.8
    """Firing probability of the i-th most frequent feature is proportional to i**-exponent."""
    parents: int = 32
    """Features that have children; each has `children` children among the rest."""
    children: int = 3
    child_given_parent: float = 0.3
    """Probability that a child fires on a row where its parent fires (never without it)."""
    correlation_rank: int = 8
    """Rank of the Gaussian copula that correlates firing; 0: independent features."""
    correlation: float = 0.3
    """Share of each feature's firing noise that comes from the shared low-rank factors."""
    magnitude_std: float = 0.25
    """Coefficients are |N(1, magnitude_std)|."""
    seed: int = 0


class GroundTruth:
    """The true features of a config, and rows drawn from them."""

    def __init__(self, cfg: GroundTruthConfig):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        f = cfg.num_features
        features = rng.standard_normal((f, cfg.d))
        self.features_FD = torch.from_numpy(
            features / np.linalg.norm(features, axis=1, keepdims=True)
        ).float()
        # Parents are the most frequent features; their children draw from the rest.
        n_parents = min(cfg.parents, f // (cfg.children + 1))
        self.parent_of = np.full(f, -1)
        kids = rng.permutation(np.arange(n_parents, f))[: n_parents * cfg.children]
        self.parent_of[kids] = np.repeat(np.arange(n_parents), cfg.children)
        roots = self.parent_of < 0
        # Zipf probabilities over the root features, scaled so that a row holds mean_active
        # features on average once the children's expected firing is added.
        ranks = np.ones(f)
        ranks[roots] = np.arange(1, roots.sum() + 1)
        weight = np.where(roots, ranks**-cfg.zipf_exponent, 0.0)
        child_share = cfg.child_given_parent * np.bincount(self.parent_of[~roots], minlength=f)
        scale = cfg.mean_active / (weight * (1 + child_share)).sum()
        self.p_F = np.clip(weight * scale, 0, 0.95)
        self.p_F[~roots] = cfg.child_given_parent
        self._mixing = rng.standard_normal((f, cfg.correlation_rank)) / math.sqrt(
            max(cfg.correlation_rank, 1)
        )

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """(x_ND, coef_NF): n rows and the coefficient of every true feature in each."""
        cfg, rng = self.cfg, np.random.default_rng(seed)
        f = cfg.num_features
        noise = rng.standard_normal((n, f))
        if cfg.correlation_rank > 0:
            shared = rng.standard_normal((n, cfg.correlation_rank)) @ self._mixing.T
            noise = math.sqrt(1 - cfg.correlation) * noise + math.sqrt(cfg.correlation) * shared
        # the copula: a feature fires where its standard normal noise falls in its lower tail
        uniform = 0.5 * (1 + _erf(noise / math.sqrt(2)))
        fires = uniform < self.p_F
        children = self.parent_of >= 0
        fires[:, children] &= fires[:, self.parent_of[children]]
        magnitude = np.abs(1 + cfg.magnitude_std * rng.standard_normal((n, f)))
        coef_NF = torch.from_numpy(np.where(fires, magnitude, 0.0)).float()
        return coef_NF @ self.features_FD, coef_NF


def _erf(x: np.ndarray) -> np.ndarray:
    return torch.erf(torch.from_numpy(x)).numpy()


def feature_recovery(W_dec_MD: Tensor, features_FD: Tensor, threshold: float = 0.9) -> dict:
    """How well decoder rows recover the true features.

    - mcc: the mean |cosine| over the pairs of true feature and decoder row that Hungarian
      matching makes (min(F, M) pairs, each row and feature in one pair at most);
    - recovered: the share of true features whose best decoder row has cosine >= threshold;
    - best_cos: the mean over true features of their best cosine with any decoder row.
    """
    from scipy.optimize import linear_sum_assignment

    W = torch.nn.functional.normalize(W_dec_MD.detach().double().cpu(), dim=1)
    F = torch.nn.functional.normalize(features_FD.double().cpu(), dim=1)
    cos_FM = (F @ W.T).abs().numpy()
    rows, cols = linear_sum_assignment(cos_FM, maximize=True)
    best = cos_FM.max(axis=1)
    return {
        "mcc": float(cos_FM[rows, cols].mean()),
        "recovered": float((best >= threshold).mean()),
        "best_cos": float(best.mean()),
    }


def absorption(
    fires_NM: Tensor, W_dec_MD: Tensor, coef_NF: Tensor, gt: GroundTruth, min_rows: int = 20
) -> float:
    """How much of their parents' latents the children eat (feature absorption, Chanin et al.
    2024): the mean over parents of how much less often the parent's latent fires on rows
    where the parent fires with a child than on rows where it fires alone.

    A parent's latent is the decoder row closest to it (by |cosine|). `fires_NM` says which
    latents fired on each row of `coef_NF`. Parents with fewer than `min_rows` rows of either
    kind are left out; 0 when no parent has enough. 0 is no absorption, 1 a latent that fires
    whenever its parent is alone and never when a child is there.
    """
    W = torch.nn.functional.normalize(W_dec_MD.detach().float().cpu(), dim=1)
    latent_of = (gt.features_FD @ W.T).abs().argmax(1)
    fires_NM, coef_NF = fires_NM.cpu(), coef_NF.cpu()
    children = torch.from_numpy(gt.parent_of)
    gaps = []
    for parent in torch.unique(children[children >= 0]).tolist():
        on = coef_NF[:, parent] > 0
        with_child = (coef_NF[:, children == parent] > 0).any(1)
        alone, together = on & ~with_child, on & with_child
        if alone.sum() < min_rows or together.sum() < min_rows:
            continue
        fired = fires_NM[:, latent_of[parent]]
        gaps.append(max(fired[alone].float().mean() - fired[together].float().mean(), 0.0))
    return float(torch.tensor(gaps).mean()) if gaps else 0.0
