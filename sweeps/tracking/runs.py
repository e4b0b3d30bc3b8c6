"""MLflow tracking of a sweep: one parent run per sweep, exactly one nested child run per trial.

The parent is found again on resume by its `sweep_id` tag, and a trial's run by its `trial_id`
tag under the parent, so retries (FailureConfig) and Tuner.restore reopen runs instead of
opening new ones.

Params and tags are written with the passwords of the URIs in them hidden (sweeps.redact):
`sweep.optuna_storage` or `sweep.tracking_uri` may hold credentials, and MLflow shows every
param to everyone who can open the UI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from sweeps.ranking import PickRule, feasible_front, pick, rank
from sweeps.redact import redact, redact_values
from sweeps.tracking.client import mlflow_client, server_answers, server_lost
from sweeps.tracking.records import TrialRecord
from sweeps.tracking.store import TrackingError
from sweeps.vocabulary import (
    EVAL_KEYS,
    METRIC_KEYS,
    RUNS_PAGE_COLUMNS,
    SUMMARY_METRICS,
    final_name,
    is_num,
    trial_label,
)

logger = logging.getLogger(__name__)


def start_sweep_run(
    tracking_uri: str,
    experiment: str,
    sweep_id: str,
    config: Mapping[str, Any],
    search_space: Mapping[str, Any],
    artifact_location: str | None = None,
) -> str:
    """Create the sweep's parent run, or reopen the one tagged `sweep_id`; return its run id.

    `sweep_id` must stay the same across resumes (e.g. the Tune experiment's storage path).
    Params are the flattened `config` plus `search_space.*`, passwords hidden; logged only
    when the run is new, since MLflow params cannot change. With a SQLite store, artifacts
    default to `mlartifacts/` beside the database rather than the driver's working directory.
    """
    client = mlflow_client(tracking_uri)
    if artifact_location is None and tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    experiment_id = _experiment_id(client, experiment, artifact_location)
    server_answers(tracking_uri)
    found = find_sweep_run(tracking_uri, experiment, sweep_id)
    if found:
        client.update_run(found.info.run_id, status="RUNNING")
        if "error" in found.data.tags:
            client.delete_tag(found.info.run_id, "error")
        return found.info.run_id
    tags = {"sweep_id": sweep_id, "config_hash": config_hash(config)}
    if commit := _git_commit():
        tags[MLFLOW_GIT_COMMIT] = commit
    run = client.create_run(experiment_id, tags=tags, run_name=sweep_run_name(experiment))
    params = flatten(config) | flatten(search_space, "search_space.")
    log_batch(client, run.info.run_id, params=as_params(params))
    return run.info.run_id


def sweep_run_name(experiment: str) -> str:
    """The parent run's name. On the runs page it stands among the trials' runs, and says that
    opening it shows the leaderboard (its description)."""
    return f"leaderboard · {experiment}"


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    log_batch(mlflow_client(tracking_uri), run_id, tags=as_tags(tags))


def find_sweep_run(tracking_uri: str, experiment: str, sweep_id: str):
    """The parent run tagged `sweep_id` in `experiment`, or None."""
    check_quotable(sweep_id)
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        return None
    found = client.search_runs(
        [exp.experiment_id], f"tags.sweep_id = '{sweep_id}'", max_results=1, order_by=["start_time"]
    )
    return found[0] if found else None


def child_filter(parent_run_id: str) -> str:
    """The MLflow search filter of a sweep's trial runs."""
    return f"tags.`mlflow.parentRunId` = '{parent_run_id}'"


def child_runs(client: MlflowClient, parent, where: str = "") -> list:
    """Every trial run of a sweep's parent run; `where` adds conditions to the filter
    (e.g. "status = 'FINISHED'")."""
    query = child_filter(parent.info.run_id) + (f" and {where}" if where else "")
    return client.search_runs([parent.info.experiment_id], query, max_results=50000)


def delete_sweep_runs(tracking_uri: str, parent) -> int:
    """Delete a sweep's parent and trial runs (MLflow keeps them as deleted until `mlflow gc`);
    returns how many runs were deleted."""
    client = mlflow_client(tracking_uri)
    runs = [*child_runs(client, parent), parent]
    for run in runs:
        client.delete_run(run.info.run_id)
    return len(runs)


def config_hash(config: Mapping[str, Any]) -> str:
    """A short hash of `config` without its passwords: the tag must not let anyone who knows
    the other params try passwords against it, and a new password is no new config."""
    import hashlib

    text = json.dumps(redact_values(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_changes(parent, config: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The flattened config fields whose values differ from those the parent run recorded."""
    if parent.data.tags.get("config_hash") == config_hash(config):
        return []
    recorded = {k: redact(v) for k, v in parent.data.params.items()}  # logged in clear once
    now = {p.key: p.value for p in as_params(flatten(config))}
    keys = (set(now) | {k for k in recorded if not k.startswith("search_space.")}) - set(ignore)
    return sorted(k for k in keys if recorded.get(k) != now.get(k))


def finish_sweep_run(
    tracking_uri: str, parent_run_id: str, status: str = "FINISHED", error: str = ""
) -> None:
    """Close the parent run with `status` (FINISHED, FAILED or KILLED), tagging the error.

    When the tracking server stopped answering, raises at once the TrackingError that says so
    (tracking.client.server_lost), instead of waiting for the server again: the sweep ends on
    it, and `resume` reopens the run. (Tune hands a callback's error on as a TuneError holding
    its traceback's text; the driver's error path, which closes the run, raises this one.)"""
    if (lost := server_lost(tracking_uri)) is not None:
        raise lost
    client = mlflow_client(tracking_uri)
    if error:
        client.set_tag(parent_run_id, "error", redact(error)[:MAX_TAG_VAL_LENGTH])
    client.set_terminated(parent_run_id, status)


def close_lost_trial_runs(tracking_uri: str, parent_run_id: str, trial_ids: Iterable[str]) -> int:
    """Mark KILLED the trial runs of trials Tune does not have, with a tag that says why;
    returns how many. The driver died before Tune saved them: they were started (RUNNING), or
    started and ended (FINISHED, FAILED) within Tune's snapshot period, and resume ran other
    trials in their place."""
    client = mlflow_client(tracking_uri)
    keep = set(trial_ids)
    lost = [
        r
        for r in child_runs(client, client.get_run(parent_run_id))
        if r.info.status != "KILLED" and r.data.tags.get("trial_id") not in keep
    ]
    for run in lost:
        client.set_tag(
            run.info.run_id,
            "killed_reason",
            f"was {run.info.status}: the driver died before Tune saved this trial, so resume "
            "did not know it and ran other trials in its place",
        )
        client.set_terminated(run.info.run_id, "KILLED")
    return len(lost)


def log_followups(
    tracking_uri: str, parent_run_id: str, followups: Mapping[str, Mapping[str, float]]
) -> None:
    """Log each trial's metrics from after the sweep (schema.CONTROL_KEYS and STABILITY_KEYS,
    under their final names) to the trial's run; tag control=frozen_random_decoder where a
    control ran."""
    client = mlflow_client(tracking_uri)
    runs = {
        r.data.tags.get("trial_id"): r for r in child_runs(client, client.get_run(parent_run_id))
    }
    for trial_id, metrics in followups.items():
        run = runs.get(trial_id)
        if run is None or not metrics:
            continue
        values = as_metrics({final_name(k): v for k, v in metrics.items()})
        log_batch(client, run.info.run_id, metrics=values)
        if "control/fvu" in metrics:
            client.set_tag(run.info.run_id, "control", "frozen_random_decoder")


def close_open_trial_runs(tracking_uri: str, parent_run_id: str, reason: str) -> int:
    """Mark KILLED, with `reason` as their killed_reason tag, the trial runs still RUNNING
    when the driver stops (interrupted); returns how many. None when the tracking server
    stopped answering (`resume` reopens them)."""
    if server_lost(tracking_uri) is not None:
        return 0
    client = mlflow_client(tracking_uri)
    running = child_runs(client, client.get_run(parent_run_id), "status = 'RUNNING'")
    for run in running:
        client.set_tag(run.info.run_id, "killed_reason", reason)
        client.set_terminated(run.info.run_id, "KILLED")
    return len(running)


def log_sweep_summary(
    tracking_uri: str,
    parent_run_id: str,
    results: Iterable,
    rule: PickRule,
    metric_keys: Sequence[str] = METRIC_KEYS,
    followups: Mapping[str, Mapping[str, float]] | None = None,
) -> list[dict]:
    """Log the pick (sweeps.ranking) and, with several objectives, the Pareto front to the
    parent run.

    `results` is a ray.tune.ResultGrid or dicts with trial_id, config and metrics (read as
    TrialRecord.from_tune); errored trials are left out. The pick: tags best.trial_id,
    best.run_id, best.rule (why it is the pick), best.params.<key> and metrics best/<name>.
    Several objectives: also the artifact pareto_front.json, tags pareto.size and
    pareto.trial_ids, and tag pareto_front=true on the front's child runs (the front of the
    feasible trials: ranking.feasible_front). Tags rather than params, so that a resumed sweep
    can log its summary again. Returns the pick, then the rest of the front, each as a dict of
    its trial_id, run_id, config and metrics.
    """
    client = mlflow_client(tracking_uri)
    children = child_runs(client, client.get_run(parent_run_id))
    run_ids = {r.data.tags.get("trial_id"): r.info.run_id for r in children}
    # `followups`: each trial's control and stability metrics, shown too
    trials = [
        dataclasses.replace(
            t,
            metrics={**t.metrics, **(followups or {}).get(t.trial_id, {})},
            run_id=run_ids.get(t.trial_id),
        )
        for t in (TrialRecord.from_tune(r) for r in results if not _errored(r))
    ]
    points = [t.metrics for t in trials]
    chosen, why = pick(points, rule)
    if chosen is None:
        logger.warning(
            "No finished trial reported %s: nothing to summarise.", list(rule.objectives)
        )
        return []
    front = [trials[i] for i in feasible_front(points, rule)]
    best = trials[chosen]
    note = leaderboard(trials, rule, front, chosen, why)
    log_batch(client, parent_run_id, tags=as_tags({"mlflow.note.content": note}))
    # The pick's final evaluation; the schedule's lr and throughput are no result.
    keys = dict.fromkeys([*rule.objectives, *(k for k in metric_keys if k in EVAL_KEYS)])
    metrics = [
        Metric(f"best/{final_name(k)}", float(best.metrics[k]), int(time.time() * 1000), 0)
        for k in keys
        if is_num(best.metrics.get(k))
    ]
    tags = {"best.trial_id": best.trial_id, "best.run_id": best.run_id or "", "best.rule": why}
    tags |= {f"best.params.{k}": v for k, v in flatten(best.config).items()}
    log_batch(client, parent_run_id, metrics=metrics, tags=as_tags(tags))
    if len(rule.objectives) > 1:
        summary = [
            {
                "trial_id": t.trial_id,
                "run_id": t.run_id,
                "config": t.config,
                "metrics": {k: t.metrics[k] for k in rule.objectives},
                "pick": t is best,
            }
            for t in front
        ]
        text = redact(json.dumps(summary, indent=2, default=str))
        client.log_text(parent_run_id, text, "pareto_front.json")
        ids = ",".join(t.trial_id for t in front)
        log_batch(
            client,
            parent_run_id,
            tags=as_tags({"pareto.size": len(front), "pareto.trial_ids": ids}),
        )
        for t in front:
            if t.run_id:
                client.set_tag(t.run_id, "pareto_front", "true")
    chosen_first = [best, *(t for t in front if t is not best)]
    return [
        {"trial_id": t.trial_id, "run_id": t.run_id, "config": t.config, "metrics": t.metrics}
        for t in chosen_first
    ]


def leaderboard(
    trials: Sequence[TrialRecord],
    rule: PickRule,
    front: Sequence[TrialRecord],
    chosen: int | None,
    why: str,
    top: int = 20,
) -> str:
    """The sweep's trials as a Markdown table, the pick first (sweeps.ranking.rank): the
    parent run's description."""
    cols = list(dict.fromkeys([*rule.objectives, *SUMMARY_METRICS]))
    if any("control/margin_fvu" in t.metrics for t in trials):
        cols.append("control/margin_fvu")
    on_front = {t.trial_id for t in front}
    several = len(rule.objectives) > 1
    lines = [
        f"**{len(trials)} trials**. The pick (first row) is {why}."
        + (" The Pareto front in bold." if several else ""),
        "",
        "| trial | run | " + " | ".join(f"`{c}`" for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    order = rank([t.metrics for t in trials], rule)
    for i in order[:top]:
        t = trials[i]
        label = trial_label(t.config) or t.trial_id
        if several and t.trial_id in on_front:
            label = f"**{label}**"
        if i == chosen:
            label = f"pick: {label}"
        cells = [f"{v:.4g}" if is_num(v) else "-" for v in (t.metrics.get(c) for c in cols)]
        lines.append(f"| {label} | {(t.run_id or '')[:8]} | {' | '.join(cells)} |")
    if len(trials) > top:
        lines.append(f"\n{len(trials) - top} more: `sae-sweep best --top N`")
    ticks = "; ".join(
        ", ".join(f"`{name}`" for name in names) + f" under {group}"
        for group, names in RUNS_PAGE_COLUMNS.items()
    )
    lines.append(f"\nTo compare the trials on the runs page, open Columns and tick {ticks}.")
    return "\n".join(lines)


def _errored(result) -> bool:
    """Whether a ResultGrid entry or a trial dict is left out of the summary: it errored (or
    reported nothing)."""
    if isinstance(result, Mapping):
        return bool(result.get("error"))
    return result.error is not None or not result.metrics


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # MLflow 3's UI opens an experiment of this kind on its training runs, not on traces.
        tags = {"mlflow.experimentKind": "custom_model_development"}
        return client.create_experiment(name, artifact_location=artifact_location, tags=tags)
    _refuse_deleted(experiment, client.tracking_uri)
    return experiment.experiment_id


def check_experiment(tracking_uri: str, name: str) -> None:
    """Fail before any compute when the sweep's experiment exists but is deleted (MLflow keeps
    deleted experiments, and their name, until `mlflow gc`)."""
    experiment = mlflow_client(tracking_uri).get_experiment_by_name(name)
    if experiment is not None:
        _refuse_deleted(experiment, tracking_uri)


def _refuse_deleted(experiment, tracking_uri: str) -> None:
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {experiment.name!r} is deleted: restore it with "
            f"`MLFLOW_TRACKING_URI={redact(tracking_uri)} mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`, or give the sweep another name "
            "(sweep.experiment)"
        )


def log_batch(client: MlflowClient, run_id: str, metrics=(), params=(), tags=()) -> None:
    """log_batch within MLflow's per-request limits, skipping empty requests."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
    n = MAX_PARAMS_TAGS_PER_BATCH
    for i in range(0, max(len(params), len(tags)), n):
        client.log_batch(run_id, params=params[i : i + n], tags=tags[i : i + n])


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def as_metrics(values: Mapping[str, float], step: int = 0) -> list[Metric]:
    """MLflow metrics of `values` at `step`, stamped now."""
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


def as_params(d: Mapping[str, Any]) -> list[Param]:
    """MLflow params of `d`'s values as strings, the passwords of the URIs in them hidden."""
    return [Param(k, redact(str(v))[:MAX_PARAM_VAL_LENGTH]) for k, v in d.items()]


def as_tags(d: Mapping[str, Any]) -> list[RunTag]:
    """MLflow tags of `d`'s values as strings, the passwords of the URIs in them hidden."""
    return [RunTag(k, redact(str(v))[:MAX_TAG_VAL_LENGTH]) for k, v in d.items()]


def check_quotable(value: str) -> None:
    # Both ids end up inside single-quoted MLflow search filters.
    if "'" in value:
        raise ValueError(f"Id {value!r} must not contain a single quote")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
