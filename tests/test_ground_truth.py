"""The ground truth SAEs are judged on: data with the structure it promises, a recovery score
equal to a brute-force one, and SAEs that recover an easy case."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sae import SaeConfig, TrainConfig, train_sae
from sae.ground_truth import GroundTruth, GroundTruthConfig, absorption, feature_recovery


def test_the_data_has_its_hierarchy_sparsity_correlation_and_heavy_tail():
    gt = GroundTruth(GroundTruthConfig(seed=3))
    x, coef = gt.sample(40_000, seed=4)
    fires = (coef > 0).numpy()
    torch.testing.assert_close(x, coef @ gt.features_FD)  # rows are what the features say
    assert fires.sum(1).mean() == pytest.approx(gt.cfg.mean_active, rel=0.1)
    children = np.flatnonzero(gt.parent_of >= 0)
    assert len(children) == gt.cfg.parents * gt.cfg.children
    # a child never fires without its parent, and fires with it at the given rate
    parents = gt.parent_of[children]
    assert not (fires[:, children] & ~fires[:, parents]).any()
    given = fires[:, children].sum(0) / fires[:, parents].sum(0)
    assert given.mean() == pytest.approx(gt.cfg.child_given_parent, abs=0.03)
    # Zipf: the most frequent feature fires far more often than the rarest
    freq = fires.mean(0)
    roots = gt.parent_of < 0
    assert freq[roots].max() > 50 * freq[roots].min() > 0
    # the copula correlates features; independent ones would be ~0
    top = np.argsort(-freq)[gt.cfg.parents : gt.cfg.parents + 40]  # frequent, not parents
    pairs = np.triu_indices(len(top), 1)
    correlated = np.abs(np.corrcoef(fires[:, top].T)[pairs]).mean()
    alone = GroundTruth(GroundTruthConfig(seed=3, correlation_rank=0)).sample(40_000, seed=4)[1]
    independent = np.abs(np.corrcoef((alone[:, top] > 0).numpy().T)[pairs]).mean()
    assert correlated > 2 * independent
    unit = gt.features_FD.norm(dim=1)
    torch.testing.assert_close(unit, torch.ones_like(unit))


@pytest.mark.parametrize("f, m", [(4, 4), (3, 5), (5, 3)])
def test_mcc_equals_the_best_assignment_by_brute_force(f, m):
    g = torch.Generator().manual_seed(f * 10 + m)
    features, W = torch.randn(f, 6, generator=g), torch.randn(m, 6, generator=g)
    cos = (
        torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(W, dim=1).T
    ).abs()
    pairs = min(f, m)
    best = max(
        sum(cos[i, j] for i, j in zip(rows, cols)) / pairs
        for rows in itertools.permutations(range(f), pairs)
        for cols in itertools.permutations(range(m), pairs)
    )
    scores = feature_recovery(W, features, threshold=0.5)
    assert scores["mcc"] == pytest.approx(float(best))
    assert scores["best_cos"] == pytest.approx(cos.max(1).values.mean().item())
    assert scores["recovered"] == pytest.approx((cos.max(1).values >= 0.5).float().mean().item())


def test_a_decoder_of_the_features_themselves_scores_one_and_sign_does_not_matter():
    gt = GroundTruth(GroundTruthConfig(d=16, num_features=24, parents=0, correlation_rank=0))
    W = gt.features_FD[torch.randperm(24)] * torch.where(torch.rand(24, 1) < 0.5, -3.0, 2.0)
    scores = feature_recovery(W, gt.features_FD)
    assert scores == pytest.approx({"mcc": 1.0, "recovered": 1.0, "best_cos": 1.0})


def test_absorption_is_zero_for_the_true_firing_and_one_when_children_eat_their_parents():
    gt = GroundTruth(GroundTruthConfig(seed=5))
    _, coef = gt.sample(8000, seed=6)
    truth = coef > 0  # latent i fires exactly when feature i does
    assert absorption(truth, gt.features_FD, coef, gt) == 0.0
    eaten = truth.clone()
    children = torch.from_numpy(gt.parent_of)
    half = torch.unique(children[children >= 0])[::2].tolist()
    for parent in half:  # half the parents' latents go silent whenever a child fires
        eaten[:, parent] &= ~(coef[:, children == parent] > 0).any(1)
    n_parents = len(torch.unique(children[children >= 0]))
    assert absorption(eaten, gt.features_FD, coef, gt) == pytest.approx(len(half) / n_parents)
    # the parent's latent is found by its decoder row, wherever it sits
    perm = torch.randperm(gt.cfg.num_features)
    assert absorption(eaten[:, perm], gt.features_FD[perm], coef, gt) == pytest.approx(
        len(half) / n_parents
    )


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "matryoshka", "jumprelu"])
def test_each_architecture_recovers_most_features_of_an_easy_case(activation):
    """Few features, barely in superposition, no hierarchy or correlation."""
    cfg = GroundTruthConfig(
        d=32, num_features=48, mean_active=3, parents=0, correlation_rank=0, seed=1
    )
    gt = GroundTruth(cfg)
    x, _ = gt.sample(20_000, seed=2)
    val, _ = gt.sample(2_000, seed=3)
    torch.manual_seed(0)
    result = train_sae(
        x,
        SaeConfig(num_latents=64, k=3, activation=activation),
        TrainConfig(lr=3e-3, steps=1500, batch_size=256, eval_every=1500),
        val_acts=val,
    )
    scores = feature_recovery(result.sae.W_dec, gt.features_FD)
    # Most, at cosine >= 0.9. Seen: topk 0.85, batchtopk 0.79, matryoshka 0.62 (its first 8
    # latents must reconstruct alone, which on flat data costs them alignment); with
    # auxk_alpha 1 and a 20,000 window: topk 0.85, batchtopk 0.88, matryoshka 0.77, jumprelu
    # 0.83 (its L0 3.4 for k=3)
    assert scores["recovered"] >= 0.6, scores
    assert scores["mcc"] >= 0.8, scores
