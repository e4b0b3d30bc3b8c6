"""MLflow tracking of a sweep: one parent run per sweep, exactly one nested child run per trial.

The parent is found again on resume by its `sweep_id` tag, and a trial's run by its `trial_id`
tag under the parent, so retries (FailureConfig) and Tuner.restore reopen runs instead of
opening new ones.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from ray import tune

from sweeps import storage

logger = logging.getLogger(__name__)

#: Result keys logged as step metrics when a trial reports them; at the end of a trial also as
#: final metrics named by `final_name` ("val/fvu" -> "fvu").
METRIC_KEYS = (
    "train/fvu",
    "val/fvu",
    "val/l0",
    "dead_frac",
    "val/never_fired_frac",
    "dense_frac",
    "auxk_loss",
    "lr",
    "acts_per_s",
)


#: Result keys that come from evaluating the SAE (not the optimiser's state or the clock).
EVAL_KEYS = ("train/fvu", "val/fvu", "val/l0", "dead_frac", "val/never_fired_frac", "dense_frac")

#: Metrics a sweep may optimise, each with the only mode that makes sense for it.
OBJECTIVES = {
    "val/fvu": "min",
    "train/fvu": "min",
    "val/l0": "min",
    "dead_frac": "min",
    "val/never_fired_frac": "min",
    "dense_frac": "min",
    "acts_per_s": "max",
}


def leaderboard_url(server: str, experiment_id: str, metric: str, mode: str) -> str:
    """The MLflow UI's runs page of an experiment sorted by `metric`: sorted by a metric, it
    lists the trial runs flat, best first, instead of folding them under the sweep's run."""
    from urllib.parse import quote

    key = quote(f"metrics.`{metric}`", safe="")
    ascending = "true" if mode == "min" else "false"
    page = f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{page}?orderByKey={key}&orderByAsc={ascending}"


def trial_label(config: Mapping[str, Any]) -> str:
    """A trial's hyperparameters in a few characters, `L9 k32 x8 lr3.2e-04 aux0.031`: its
    MLflow run name and its line on the console."""
    parts = [
        fmt.format(config[key])
        for key, fmt in (("layer", "L{}"), ("k", "k{}"), ("expansion_factor", "x{}"))
        if key in config
    ]
    if "lr" in config:
        parts.append(f"lr{float(config['lr']):.1e}")
    if "auxk_alpha" in config:
        parts.append(f"aux{float(config['auxk_alpha']):.2g}")
    return " ".join(parts)


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message says how to fix it."""


def default_tracking_uri(out_dir: str | Path) -> str:
    """The SQLite store under the sweep's output directory."""
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def check_tracking_uri(uri: str, timeout_s: float = 3.0) -> None:
    """Fail before any compute when `uri` cannot be used as a tracking store.

    Checks that an http(s) server answers and that a SQLite file's directory can be created;
    other database and hosted schemes are left to MLflow.
    """
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            pass  # it answered: reachable; auth or routing problems surface with a clearer error
        except (OSError, ValueError) as e:
            raise TrackingError(
                f"MLflow tracking server {uri} is not reachable ({e}). Start it (for example "
                "`mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri "
                "sqlite:///mlflow.db` on the head node), fix the URI, or use a local store "
                "such as sqlite:///<out_dir>/mlflow.db."
            ) from None
    elif scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if path == uri or path in ("", ":memory:"):
            raise TrackingError(
                f"SQLite tracking URI {uri} names no database file: use sqlite:///<path>/mlflow.db"
            )
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(
                f"Cannot create the directory of the MLflow SQLite store {uri} ({e}). "
                "Choose a writable output directory or another tracking URI."
            ) from None
    elif scheme in ("", "file") and not MLFLOW_ALLOW_FILE_STORE.get():
        raise TrackingError(
            f"Tracking URI {uri} is a file store, which MLflow 3 refuses unless "
            "MLFLOW_ALLOW_FILE_STORE=true. Use a SQLite store instead, e.g. "
            f"{default_tracking_uri('.')}."
        )


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
    Params are the flattened `config` plus `search_space.*`; logged only when the run is new,
    since MLflow params cannot change. With a SQLite store, artifacts default to
    `mlartifacts/` beside the database rather than the driver's working directory.
    """
    client = MlflowClient(tracking_uri)
    if artifact_location is None and tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    experiment_id = _experiment_id(client, experiment, artifact_location)
    found = find_sweep_run(tracking_uri, experiment, sweep_id)
    if found:
        client.update_run(found.info.run_id, status="RUNNING")
        if "error" in found.data.tags:
            client.delete_tag(found.info.run_id, "error")
        return found.info.run_id
    tags = {"sweep_id": sweep_id, "config_hash": config_hash(config)}
    if commit := _git_commit():
        tags[MLFLOW_GIT_COMMIT] = commit
    run = client.create_run(experiment_id, tags=tags, run_name=experiment)
    params = _flatten(config) | _flatten(search_space, "search_space.")
    _log_batch(client, run.info.run_id, params=_params(params))
    return run.info.run_id


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    _log_batch(MlflowClient(tracking_uri), run_id, tags=_tags(tags))


def find_sweep_run(tracking_uri: str, experiment: str, sweep_id: str):
    """The parent run tagged `sweep_id` in `experiment`, or None."""
    _check_quotable(sweep_id)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        return None
    found = client.search_runs(
        [exp.experiment_id], f"tags.sweep_id = '{sweep_id}'", max_results=1, order_by=["start_time"]
    )
    return found[0] if found else None


def child_runs(client: MlflowClient, parent) -> list:
    """Every trial run of a sweep's parent run."""
    return client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'",
        max_results=50000,
    )


def delete_sweep_runs(tracking_uri: str, parent) -> int:
    """Delete a sweep's parent and trial runs (MLflow keeps them as deleted until `mlflow gc`);
    returns how many runs were deleted."""
    client = MlflowClient(tracking_uri)
    runs = [*child_runs(client, parent), parent]
    for run in runs:
        client.delete_run(run.info.run_id)
    return len(runs)


def config_hash(config: Mapping[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_changes(parent, config: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The flattened config fields whose values differ from those the parent run recorded."""
    if parent.data.tags.get("config_hash") == config_hash(config):
        return []
    recorded = parent.data.params
    now = {p.key: p.value for p in _params(_flatten(config))}
    keys = (set(now) | {k for k in recorded if not k.startswith("search_space.")}) - set(ignore)
    return sorted(k for k in keys if recorded.get(k) != now.get(k))


def finish_sweep_run(
    tracking_uri: str, parent_run_id: str, status: str = "FINISHED", error: str = ""
) -> None:
    """Close the parent run with `status` (FINISHED, FAILED or KILLED), tagging the error."""
    client = MlflowClient(tracking_uri)
    if error:
        client.set_tag(parent_run_id, "error", error[:MAX_TAG_VAL_LENGTH])
    client.set_terminated(parent_run_id, status)


def close_lost_trial_runs(tracking_uri: str, parent_run_id: str, trial_ids: Iterable[str]) -> int:
    """Mark KILLED the open trial runs of trials Tune does not have (started after its last
    saved state, before the driver died), with a tag that says why; returns how many."""
    client = MlflowClient(tracking_uri)
    keep = set(trial_ids)
    lost = [
        r
        for r in child_runs(client, client.get_run(parent_run_id))
        if r.info.status == "RUNNING" and r.data.tags.get("trial_id") not in keep
    ]
    for run in lost:
        client.set_tag(
            run.info.run_id,
            "killed_reason",
            "the driver died before Tune saved this trial; resume did not know it",
        )
        client.set_terminated(run.info.run_id, "KILLED")
    return len(lost)


class MlflowTrialCallback(tune.Callback):
    """Keeps exactly one MLflow child run per Tune trial, across retries and Tuner.restore.

    Result keys read from trials:
    - the numeric keys of `metric_keys`: step metrics on every result, final metrics (see
      `final_name`) when the trial completes;
    - `step_key` (default "step", else training_iteration): the step of the metrics;
    - `fixed_params`: settings every trial shares, logged as params beside the trial's config,
      so runs of several sweeps in one experiment compare on them;
    - `sae_dir_key` (default "sae_dir"): the final SAE checkpoint directory, absolute, relative
      to the trial directory, or a storage URI (s3://...); logged with its plots under the
      artifact path "sae/". Report it once, after the final SAE is written: a trial that a
      scheduler (ASHA) or stopper ends before then is tagged stopped_early=true.

    Each result's metrics are sent when Tune hands it over, so a driver that dies loses none
    that Tune recorded. A reopened run (retry, resume) skips points at steps it already holds:
    a trial that continues from an older checkpoint logs each step once.
    """

    def __init__(
        self,
        tracking_uri: str,
        parent_run_id: str,
        metric_keys: Sequence[str] = METRIC_KEYS,
        step_key: str = "step",
        sae_dir_key: str = "sae_dir",
        fixed_params: Mapping[str, Any] | None = None,
    ):
        self.fixed_params = dict(fixed_params or {})
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.metric_keys = tuple(metric_keys)
        self.step_key = step_key
        self.sae_dir_key = sae_dir_key
        self._reset()

    def _reset(self) -> None:
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # trial_id -> run id of trials whose run is open
        self._logged: dict[str, dict[str, int]] = {}  # trial_id -> metric -> last logged step
        self._stopped: set[str] = set()

    # Tuner pickles its callbacks into tuner.pkl; a client and open-run caches must not travel.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
            self._experiment_id = self._client.get_run(self.parent_run_id).info.experiment_id
        return self._client

    def on_trial_start(self, iteration, trials, trial, **info):
        self._open(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get(self.step_key, result["training_iteration"]))
        self._log(trial, {k: result.get(k) for k in self.metric_keys}, step)
        # Tune marks a result done only when a scheduler or stopper decided to stop the trial;
        # a trainable that returns on its own ends without such a result.
        if result.get("done"):
            self._stopped.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._open(trial)
        last = trial.last_result
        step = int(last.get(self.step_key, last.get("training_iteration", 0)))
        self._log(trial, {final_name(k): last.get(k) for k in self.metric_keys}, step)
        tags = []
        if trial.trial_id in self._stopped and not last.get(self.sae_dir_key):
            tags.append(RunTag("stopped_early", "true"))
        if last.get("error"):  # a trial that cannot run ends itself with its reason
            tags.append(RunTag("error", str(last["error"])[:MAX_TAG_VAL_LENGTH]))
        _log_batch(self.client, run_id, tags=tags)
        self._log_sae_dir(trial, run_id)
        self._close(trial, "FAILED" if last.get("error") else "FINISHED")

    def on_trial_recover(self, iteration, trials, trial, **info):
        # The trial restarts from its last checkpoint and keeps this run.
        run_id = self._open(trial)
        self.client.set_tag(run_id, "num_failures", str(trial.num_failures))

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._open(trial)
        text = _read_error(trial)
        lines = text.strip().splitlines() or ["unknown error"]
        self.client.log_text(run_id, text, "error.txt")
        self.client.set_tag(run_id, "error", lines[-1][:MAX_TAG_VAL_LENGTH])
        self._close(trial, "FAILED")

    def on_experiment_end(self, trials, **info):
        # Trials still open here did not finish (Ctrl-C, a stopper's stop_all, a time budget).
        # KILLED, so no run stays RUNNING with nothing behind it; Tuner.restore reopens them.
        for trial in trials:
            if trial.trial_id in self._runs:
                self._close(trial, "KILLED")

    def _open(self, trial) -> str:
        """The trial's run id: cached, found under the parent and reopened, or created."""
        trial_id = trial.trial_id
        if trial_id in self._runs:
            return self._runs[trial_id]
        _check_quotable(trial_id)
        client = self.client  # connects and sets self._experiment_id
        found = client.search_runs(
            [self._experiment_id],
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}' "
            f"and tags.trial_id = '{trial_id}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            if "error" in found[0].data.tags:  # resumed after an error: error.txt keeps it
                client.delete_tag(run_id, "error")
            self._logged[trial_id] = {
                key: max(m.step for m in client.get_metric_history(run_id, key))
                for key in found[0].data.metrics
            }
        else:
            tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, "trial_id": trial_id}
            name = trial_label(trial.config) or str(trial)
            run = client.create_run(self._experiment_id, tags=tags, run_name=name)
            run_id = run.info.run_id
            params = _flatten(self.fixed_params) | _flatten(trial.config)
            _log_batch(client, run_id, params=_params(params))
            self._logged[trial_id] = {}
        self._runs[trial_id] = run_id
        return run_id

    def _log(self, trial, values: Mapping[str, Any], step: int) -> None:
        """Log the numeric values at `step`, skipping metrics the run already has there."""
        run_id = self._open(trial)
        logged = self._logged[trial.trial_id]
        ts = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), ts, step)
            for k, v in values.items()
            if _is_num(v) and step > logged.get(k, -1)
        ]
        _log_batch(self.client, run_id, metrics=metrics)
        logged.update({m.key: step for m in metrics})

    def _close(self, trial, status: str) -> None:
        self.client.set_terminated(self._runs.pop(trial.trial_id), status)
        self._logged.pop(trial.trial_id, None)
        self._stopped.discard(trial.trial_id)

    def _log_sae_dir(self, trial, run_id: str) -> None:
        reported = trial.last_result.get(self.sae_dir_key)
        if not reported:
            return
        if storage.is_uri(reported):
            with tempfile.TemporaryDirectory() as tmp:
                storage.download_dir(reported, tmp)
                self.client.log_artifacts(run_id, tmp, "sae")
            return
        path = Path(trial.local_path or "", reported)  # an absolute path stays as it is
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), "sae")
        else:
            logger.warning(
                "Trial %s reported %s=%s, which is not a directory on the driver: its SAE is not "
                "logged to MLflow. On several nodes, write it to shared storage.",
                trial,
                self.sae_dir_key,
                reported,
            )


def final_name(key: str) -> str:
    """Final metric name of a result key: "val/fvu" -> "fvu", "train/fvu" -> "train_fvu"."""
    return key.removeprefix("val/").replace("/", "_")


def pareto_front(points: Sequence[Mapping[str, Any]], objectives: Mapping[str, str]) -> list[int]:
    """Indices of the points no other point dominates, best first by the first objective.

    `objectives` maps a metric to "min" or "max". Points missing an objective or holding NaN
    are left out. With one objective this is the best point (and its ties).
    """
    bad = {m for m in objectives.values() if m not in ("min", "max")}
    if bad:
        raise ValueError(f"Objective modes must be 'min' or 'max', got {sorted(bad)}")
    sign = [1.0 if mode == "min" else -1.0 for mode in objectives.values()]
    costs = {
        i: tuple(s * float(p[k]) for s, k in zip(sign, objectives, strict=True))
        for i, p in enumerate(points)
        if all(_is_num(p.get(k)) and not math.isnan(p[k]) for k in objectives)
    }

    def dominates(a: tuple, b: tuple) -> bool:
        return a != b and all(x <= y for x, y in zip(a, b, strict=True))

    front = [i for i, c in costs.items() if not any(dominates(o, c) for o in costs.values())]
    return sorted(front, key=lambda i: costs[i])


def log_sweep_summary(
    tracking_uri: str,
    parent_run_id: str,
    results: Iterable,
    objectives: Mapping[str, str],
    metric_keys: Sequence[str] = METRIC_KEYS,
) -> list[dict]:
    """Log the best trial (one objective) or the Pareto front (several) to the parent run.

    `results` is a ray.tune.ResultGrid or dicts with trial_id, config and metrics; errored
    trials are left out. One objective: tags best.trial_id, best.run_id, best.params.<key> and
    metrics best/<name>. Several: artifact pareto_front.json, tags pareto.size and
    pareto.trial_ids, and tag pareto_front=true on the front's child runs. Tags rather than
    params, so that a resumed sweep can log its summary again. Returns the chosen trials.
    """
    trials = [_trial_dict(r) for r in results]
    trials = [t for t in trials if t is not None]
    client = MlflowClient(tracking_uri)
    children = child_runs(client, client.get_run(parent_run_id))
    run_ids = {r.data.tags.get("trial_id"): r.info.run_id for r in children}
    front = [trials[i] for i in pareto_front([t["metrics"] for t in trials], objectives)]
    for t in front:
        t["run_id"] = run_ids.get(t["trial_id"])
    if not front:
        logger.warning("No finished trial reported %s: nothing to summarise.", list(objectives))
        return []
    note = leaderboard(trials, objectives, run_ids, front)
    _log_batch(client, parent_run_id, tags=_tags({"mlflow.note.content": note}))
    if len(objectives) == 1:
        best = front[0]
        # The best trial's final evaluation; the schedule's lr and throughput are no result.
        keys = dict.fromkeys([*objectives, *(k for k in metric_keys if k in EVAL_KEYS)])
        metrics = [
            Metric(f"best/{final_name(k)}", float(best["metrics"][k]), int(time.time() * 1000), 0)
            for k in keys
            if _is_num(best["metrics"].get(k))
        ]
        tags = {"best.trial_id": best["trial_id"], "best.run_id": best["run_id"] or ""}
        tags |= {f"best.params.{k}": v for k, v in _flatten(best["config"]).items()}
        _log_batch(client, parent_run_id, metrics=metrics, tags=_tags(tags))
        return [best]
    summary = [
        {
            "trial_id": t["trial_id"],
            "run_id": t["run_id"],
            "config": t["config"],
            "metrics": {k: t["metrics"][k] for k in objectives},
        }
        for t in front
    ]
    client.log_text(parent_run_id, json.dumps(summary, indent=2, default=str), "pareto_front.json")
    tags = {"pareto.size": len(front), "pareto.trial_ids": ",".join(t["trial_id"] for t in front)}
    _log_batch(client, parent_run_id, tags=_tags(tags))
    for t in front:
        if t["run_id"]:
            client.set_tag(t["run_id"], "pareto_front", "true")
    return front


def leaderboard(
    trials: Sequence[Mapping[str, Any]],
    objectives: Mapping[str, str],
    run_ids: Mapping[str, str],
    front: Sequence[Mapping[str, Any]],
    top: int = 20,
) -> str:
    """The sweep's trials as a Markdown table, best first: the parent run's description."""
    metric, mode = next(iter(objectives.items()))
    sign = 1.0 if mode == "min" else -1.0

    def key(t):
        v = t["metrics"].get(metric)
        return (not _is_num(v) or math.isnan(v), sign * v if _is_num(v) else 0.0)

    cols = list(dict.fromkeys([*objectives, "val/fvu", "val/l0", "dead_frac"]))
    on_front = {t["trial_id"] for t in front}
    lines = [
        f"**{len(trials)} trials**, best first by `{metric}` ({mode}); "
        f"{'the Pareto front' if len(objectives) > 1 else 'the best'} in bold.",
        "",
        "| trial | run | " + " | ".join(f"`{c}`" for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for t in sorted(trials, key=key)[:top]:
        label = trial_label(t["config"]) or t["trial_id"]
        if t["trial_id"] in on_front:
            label = f"**{label}**"
        values = [t["metrics"].get(c) for c in cols]
        cells = [f"{v:.4g}" if _is_num(v) else "-" for v in values]
        lines.append(f"| {label} | {run_ids.get(t['trial_id'], '')[:8]} | {' | '.join(cells)} |")
    if len(trials) > top:
        lines.append(f"\n{len(trials) - top} more: `sae-sweep best --top N`")
    return "\n".join(lines)


def _trial_dict(result) -> dict | None:
    """A ResultGrid entry or a trial dict as {trial_id, config, metrics}; None if errored."""
    if isinstance(result, Mapping):
        return None if result.get("error") else dict(result)
    if result.error is not None or not result.metrics:
        return None
    return {
        "trial_id": result.metrics["trial_id"],
        "config": result.config,
        "metrics": result.metrics,
    }


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # MLflow 3's UI opens an experiment of this kind on its training runs, not on traces.
        tags = {"mlflow.experimentKind": "custom_model_development"}
        return client.create_experiment(name, artifact_location=artifact_location, tags=tags)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} is deleted. Restore it (`mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`) or give the sweep another name."
        )
    return experiment.experiment_id


def _log_batch(client: MlflowClient, run_id: str, metrics=(), params=(), tags=()) -> None:
    """log_batch within MLflow's per-request limits, skipping empty requests."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])
    n = MAX_PARAMS_TAGS_PER_BATCH
    for i in range(0, max(len(params), len(tags)), n):
        client.log_batch(run_id, params=params[i : i + n], tags=tags[i : i + n])


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _params(d: Mapping[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in d.items()]


def _tags(d: Mapping[str, Any]) -> list[RunTag]:
    return [RunTag(k, str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in d.items()]


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_quotable(value: str) -> None:
    # Both ids end up inside single-quoted MLflow search filters.
    if "'" in value:
        raise ValueError(f"Id {value!r} must not contain a single quote")


def _read_error(trial) -> str:
    path = trial.error_file
    if path and Path(path).is_file():
        return Path(path).read_text(errors="replace")
    return f"Trial {trial} failed; its error file is missing, see the Ray driver log."


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
