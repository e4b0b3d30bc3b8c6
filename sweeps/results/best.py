"""`best`: the top trials of a sweep and where their SAEs are, read back from MLflow."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sae import architectures
from sae.architectures import Architecture
from sweeps import storage
from sweeps.config import Config
from sweeps.ranking import DEAD_METRIC, PickRule, feasible_front, pick, rank
from sweeps.tracking.records import TrialRecord, trial_records
from sweeps.vocabulary import (
    SEARCHED_PARAMS,
    SUMMARY_METRICS,
    final_name,
    final_sae_dir,
    format_value,
)

MAX_RANKED = 50_000
"""Trials read back to rank: all of any sweep's (MLflow's most runs per search)."""


def sae_folder(cfg: Config, trial_id: str, layer: int) -> str:
    """Where a trial's final SAE is written: `sae/<trial_id>/layers.<L>` under the sweep's
    results."""
    return final_sae_dir(storage.join(cfg.sweep.experiment_path(), "sae"), trial_id, layer)


def trial_sae_dir(cfg: Config, trial_id: str, layer: int) -> str | None:
    """A trial's final SAE: its `sae_folder`, or `sae/<trial_id>` itself where sweeps wrote it
    before they followed sparsify's folder convention; None when there is none (a trial
    stopped early, or its folder deleted)."""
    folder = sae_folder(cfg, trial_id, layer)
    for path in (folder, folder.rsplit("/", 1)[0]):
        if storage.exists(storage.join(path, "cfg.json")):
            return path
    return None


def why_no_sae(status: str, folder: str = "") -> str:
    """Why a trial of this status has no final SAE (`folder`: where a DONE trial wrote it)."""
    if status == "DONE":
        return f"its SAE folder {folder + ' ' if folder else ''}is missing (deleted or moved)"
    reasons = {"STOPPED": "ASHA stopped it early", "FAILED": "it failed"}
    return reasons.get(status, "it has not finished")


def best_trials(cfg: Config, top: int = 5, finished_only: bool = True) -> list[TrialRecord]:
    """Finished trials of the sweep (with `finished_only=False`, its trials of any status:
    failed, killed, running), the pick first, then as sweeps.ranking.rank orders them."""
    sweep = cfg.sweep
    uri = sweep.resolved_tracking_uri()
    rule = PickRule.from_tune(cfg.tune)
    metric, mode = next(iter(rule.objectives.items()))
    records = trial_records(
        uri,
        sweep.experiment_name(),
        sweep.experiment_path(),
        final_name(metric),
        ascending=mode == "min",
        top=MAX_RANKED,
        finished_only=finished_only,
    )
    if records is None:
        raise FileNotFoundError(
            f"no sweep {sweep.name!r} with results {sweep.experiment_path()} in MLflow "
            f"store {uri}: run `sae-sweep sweep` with this config first"
        )
    records = [records[i] for i in rank([r.metrics for r in records], rule)][:top]
    return [
        dataclasses.replace(r, sae_dir=trial_sae_dir(cfg, r.trial_id, r.layer)) for r in records
    ]


def format_table(records: Sequence[TrialRecord], rule: PickRule, limit: int = 10) -> str:
    """The trials as a text table, one line each: the console's summary and `best`. With
    several objectives a `front` column marks the feasible Pareto front."""
    objectives = rule.objectives
    shown = records[:limit]
    # An architecture's own hyperparameter (JumpReLU's l0_coefficient) is 0 in every other
    # trial: a column of zeros says nothing
    kinds = {r.params.activation for r in shown if r.params is not None}
    own = {p for kind in kinds for p in architectures.registry().get(kind, Architecture).searched}
    params = [p for p in SEARCHED_PARAMS if p in own or p not in architectures.searched()]
    metrics = [*SUMMARY_METRICS, *objectives, DEAD_METRIC]
    for key in ("control/margin_fvu", "stability/decoder_mcc"):
        if any(key in r.metrics for r in shown):
            metrics.append(key)
    cols = ["trial_id", "status", *params, *dict.fromkeys(metrics)]
    if any(r.error for r in shown):
        cols.append("error")
    cells = [[format_value(r.value(c)) for c in cols] for r in shown]
    if len(objectives) > 1:  # which trials are on the Pareto front
        front = set(feasible_front([r.metrics for r in records], rule))
        cols.insert(1, "front")
        for i, row in enumerate(cells):
            row.insert(1, "*" if i in front else "")
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(cols)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    if len(records) > limit:
        lines.append(f"... {len(records) - limit} more trials (sae-sweep best --top N)")
    return "\n".join(lines)


def pick_note(cfg: Config, records: Sequence[TrialRecord]) -> str:
    """The line under a table of the sweep's trials: the pick and the rule that chose it."""
    chosen, why = pick([r.metrics for r in records], PickRule.from_tune(cfg.tune))
    if chosen is None:
        return f"pick: none ({why})"
    line = (
        f"pick: {records[chosen].trial_id}, {why} (another rule: tune.pick_l0, "
        "tune.max_dead_frac, tune.objectives)"
    )
    margin = records[chosen].metrics.get("control/margin_fvu")
    if margin is not None:
        control = records[chosen].metrics["control/fvu"]
        line += (
            f"\n  its control (decoder frozen at random, trained alike): fvu {control:.4g}, "
            f"margin {margin:+.4g}"
        )
    stability = records[chosen].metrics.get("stability/decoder_mcc")
    if stability is not None:
        line += f"\n  its seed stability (matched decoder cosine across seeds): {stability:.3f}"
    return line
