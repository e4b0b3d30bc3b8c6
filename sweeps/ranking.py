"""Which trials are best: the Pareto front of the sweep's objectives, and one pick by a
documented rule. No Ray, no MLflow, no torch.

The pick (`pick`):

1. Only feasible trials: a validation never-fired fraction (`val/never_fired_frac`) at most
   `tune.max_dead_frac`. Optuna's samplers get the same bound as a constraint. This is what
   keeps an SAE that wastes most of its latents from winning on FVU.
2. With `tune.pick_l0: [low, high]`: the lowest `val/fvu` among feasible trials whose
   `val/l0` lies in the band (SAEBench compares SAEs at matched sparsity).
3. Else: the feasible front's best by the first objective (the lowest `val/fvu` by default).

If no trial is feasible, the pick is the least dead one, and the reason says so.

A knee rule (the front point nearest the ideal corner in log L0 and FVU) was tried as the
default and dropped: on SAELens's synthetic ground truth it recovered fewer true features
than the lowest feasible FVU in 3 of 3 sweeps (docs/performance.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sweeps.vocabulary import is_num

DEAD_METRIC = "val/never_fired_frac"


@dataclass(frozen=True)
class PickRule:
    """The objectives (metric -> min/max) and the pick's bounds (see the module doc)."""

    objectives: Mapping[str, str]
    max_dead_frac: float = 1.0
    l0_band: tuple[float, float] | None = None

    @classmethod
    def from_tune(cls, tune) -> PickRule:
        """From a TuneConfig."""
        band = tuple(tune.pick_l0) if tune.pick_l0 else None
        return cls(tune.objective_modes(), tune.max_dead_frac, band)

    def feasible(self, point: Mapping[str, Any]) -> bool:
        dead = point.get(DEAD_METRIC)
        return not is_num(dead) or math.isnan(dead) or dead <= self.max_dead_frac


def _value(point: Mapping[str, Any], key: str) -> float | None:
    v = point.get(key)
    return float(v) if is_num(v) and not math.isnan(v) else None


def pareto_front(points: Sequence[Mapping[str, Any]], objectives: Mapping[str, str]) -> list[int]:
    """Indices of the points no other point dominates, best first by the first objective.

    `objectives` maps a metric to "min" or "max". Points missing an objective or holding NaN
    are left out. With one objective this is the best point (and its ties).
    """
    bad = {m for m in objectives.values() if m not in ("min", "max")}
    if bad:
        raise ValueError(f"Objective modes must be 'min' or 'max', got {sorted(bad)}")
    sign = [1.0 if mode == "min" else -1.0 for mode in objectives.values()]
    costs = {}
    for i, p in enumerate(points):
        values = [_value(p, k) for k in objectives]
        if all(v is not None for v in values):
            costs[i] = tuple(s * v for s, v in zip(sign, values, strict=True))

    def dominates(a: tuple, b: tuple) -> bool:
        return a != b and all(x <= y for x, y in zip(a, b, strict=True))

    front = [i for i, c in costs.items() if not any(dominates(o, c) for o in costs.values())]
    return sorted(front, key=lambda i: costs[i])


def feasible_front(points: Sequence[Mapping[str, Any]], rule: PickRule) -> list[int]:
    """The Pareto front of the feasible points (indices into `points`), best first by the
    first objective: the constrained front Optuna's best_trials gives, and the pick's pool."""
    feasible = [i for i, p in enumerate(points) if rule.feasible(p)]
    return [feasible[j] for j in pareto_front([points[i] for i in feasible], rule.objectives)]


def pick(points: Sequence[Mapping[str, Any]], rule: PickRule) -> tuple[int | None, str]:
    """The index of the pick among `points` (metric dicts) and why, in words; (None, why)
    when no point has the objectives."""
    scored = [
        i for i, p in enumerate(points) if all(_value(p, k) is not None for k in rule.objectives)
    ]
    if not scored:
        return None, "no trial reported the objectives"
    feasible = [i for i in scored if rule.feasible(points[i])]
    if not feasible:  # then each scored point has a dead fraction, above the bound
        least = min(scored, key=lambda i: points[i][DEAD_METRIC])
        return least, (
            f"no trial has {DEAD_METRIC} <= tune.max_dead_frac={rule.max_dead_frac:g}: the "
            "least dead one"
        )
    if rule.l0_band is not None:
        low, high = rule.l0_band
        band = [
            i
            for i in feasible
            if _value(points[i], "val/l0") is not None
            and low <= points[i]["val/l0"] <= high
            and _value(points[i], "val/fvu") is not None
        ]
        if band:
            return min(band, key=lambda i: points[i]["val/fvu"]), (
                f"the lowest val/fvu with val/l0 in [{low:g}, {high:g}] and {DEAD_METRIC} <= "
                f"{rule.max_dead_frac:g}"
            )
    front = feasible_front(points, rule)
    if not front:
        return None, "no feasible trial reported the objectives"
    first = next(iter(rule.objectives))
    best = "lowest" if rule.objectives[first] == "min" else "highest"
    return front[0], f"the {best} {first} among trials with {DEAD_METRIC} <= {rule.max_dead_frac:g}"


def rank(points: Sequence[Mapping[str, Any]], rule: PickRule) -> list[int]:
    """Every index, best first: the pick, the rest of the feasible front, the other feasible
    points, the infeasible ones (each group by the first objective), then those without it."""
    first, mode = next(iter(rule.objectives.items()))
    sign = 1.0 if mode == "min" else -1.0
    chosen, _ = pick(points, rule)
    front = set(feasible_front(points, rule))

    def key(i: int):
        v = _value(points[i], first)
        return (
            i != chosen,
            v is None,
            i not in front,
            not rule.feasible(points[i]),
            sign * v if v is not None else 0.0,
        )

    return sorted(range(len(points)), key=key)
