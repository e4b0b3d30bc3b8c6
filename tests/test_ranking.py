"""The pick (sweeps/ranking.py): the rule that names a sweep's best SAE, and the dead-latent
constraint Optuna's samplers get."""

from __future__ import annotations

import optuna
import pytest

from sweeps.ranking import DEAD_METRIC, PickRule, pareto_front, pick, rank
from sweeps.search.driver import _OptunaSearch

BOTH = {"val/fvu": "min", "val/l0": "min"}


def point(fvu, l0, dead=0.0):
    return {"val/fvu": fvu, "val/l0": l0, DEAD_METRIC: dead}


def test_pareto_front():
    points = [
        {"fvu": 0.1, "l0": 30},
        {"fvu": 0.3, "l0": 10},
        {"fvu": 0.2, "l0": 40},  # dominated by the first
        {"fvu": 0.1, "l0": 20},
        {"fvu": float("nan"), "l0": 5},  # no value: never on the front
        {"l0": 1},
    ]
    assert pareto_front(points, {"fvu": "min", "l0": "min"}) == [3, 1]
    assert pareto_front(points, {"fvu": "min"}) == [0, 3]
    assert pareto_front(points, {"l0": "max"}) == [2]
    with pytest.raises(ValueError, match="'min' or 'max'"):
        pareto_front(points, {"fvu": "minimize"})


def test_the_widest_densest_sae_is_not_the_pick_when_its_latents_are_dead():
    """The demo's old best: lowest FVU, most latents never fired. Infeasible, so never the
    pick, and ranked below every feasible trial; the pick is the lowest feasible FVU."""
    points = [point(0.05, 16, dead=0.86), point(0.12, 8), point(0.2, 4), point(0.3, 2)]
    rule = PickRule(BOTH, max_dead_frac=0.2)
    chosen, why = pick(points, rule)
    assert chosen == 1 and why == "the lowest val/fvu among trials with val/never_fired_frac <= 0.2"
    assert rank(points, rule) == [1, 2, 3, 0]
    assert pick(points, PickRule(BOTH, max_dead_frac=1.0))[0] == 0  # no bound: FVU alone


def test_the_pick_is_the_lowest_fvu_of_the_feasible_front_by_brute_force():
    """Against a direct search: among points with never-fired <= the bound, the lowest FVU
    (the front's lowest FVU is the lowest of all feasible points)."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        points = [
            point(rng.random(), rng.choice([2, 4, 8, 16, 32]), dead=rng.random() * 0.5)
            for _ in range(rng.randint(1, 9))
        ]
        feasible = [i for i, p in enumerate(points) if p[DEAD_METRIC] <= 0.2]
        chosen, _ = pick(points, PickRule(BOTH, max_dead_frac=0.2))
        if feasible:
            assert chosen == min(feasible, key=lambda i: points[i]["val/fvu"])
        else:
            assert chosen == min(range(len(points)), key=lambda i: points[i][DEAD_METRIC])


def test_an_l0_band_picks_the_lowest_fvu_inside_it():
    points = [point(0.05, 64), point(0.12, 30), point(0.1, 25, dead=0.5), point(0.3, 5)]
    chosen, why = pick(points, PickRule(BOTH, max_dead_frac=0.2, l0_band=(20, 40)))
    assert chosen == 1 and "[20, 40]" in why


def test_with_no_feasible_trial_the_least_dead_one_is_picked_and_the_reason_says_so():
    points = [point(0.05, 64, dead=0.9), point(0.1, 8, dead=0.5), point(0.2, 4, dead=0.7)]
    chosen, why = pick(points, PickRule(BOTH, max_dead_frac=0.2))
    assert chosen == 1 and "least dead" in why


def test_trials_without_results_never_hide_the_pick():
    """Diverged trials (NaN objectives, no dead fraction) count as neither feasible nor
    infeasible: with the one scored trial over the bound, it is still the pick."""
    nan = float("nan")
    points = [{"val/fvu": nan, "val/l0": nan}, point(0.1, 8, dead=0.5), {"val/fvu": nan}]
    chosen, why = pick(points, PickRule(BOTH, max_dead_frac=0.2))
    assert chosen == 1 and "least dead" in why
    assert rank(points, PickRule(BOTH, max_dead_frac=0.2))[0] == 1


def test_one_objective_picks_its_best_feasible_trial():
    points = [point(0.05, 64, dead=0.9), point(0.1, 8), point(0.2, 4)]
    assert pick(points, PickRule({"val/fvu": "min"}, max_dead_frac=0.2))[0] == 1
    assert pick([{"val/fvu": float("nan")}], PickRule({"val/fvu": "min"}))[0] is None


def test_the_searcher_hands_optuna_the_dead_bound_as_a_constraint():
    """The sweep's searcher, on its own: a trial over tune.max_dead_frac ends infeasible, so
    Optuna's best trials (and its samplers) leave it out."""
    space = lambda trial: {"x": trial.suggest_float("x", 0, 1)}  # noqa: E731
    searcher = _OptunaSearch(
        space=space,
        metric=["val/fvu", "val/l0"],
        mode=["min", "min"],
        sampler=optuna.samplers.TPESampler(seed=0),
        max_dead_frac=0.2,
    )
    for i, (fvu, l0, dead) in enumerate([(0.05, 16, 0.86), (0.12, 8, 0.1), (0.3, 4, 0.0)]):
        searcher.suggest(f"t{i}")
        result = {"val/fvu": fvu, "val/l0": l0, DEAD_METRIC: dead, "step": 10}
        searcher.on_trial_complete(f"t{i}", result)
    trials = searcher._ot_study.get_trials()
    assert [t.constraints for t in trials] == [
        {"dead_frac": pytest.approx(0.66)},
        {"dead_frac": pytest.approx(-0.1)},
        {"dead_frac": pytest.approx(-0.2)},
    ]
    assert sorted(t.values[0] for t in searcher._ot_study.best_trials) == [0.12, 0.3]
