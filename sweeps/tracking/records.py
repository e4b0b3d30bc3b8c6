"""A sweep's trials as typed records, and its finished trial runs read from its MLflow store
without importing mlflow.

Importing mlflow and opening its SQLAlchemy store takes about 3 s, which `best` should not
cost. A SQLite store is read with SQL (read-only), a tracking server through its REST API;
other stores, and a SQLite schema this reader does not know, go through MlflowClient. All
three return the same runs in the same order as MlflowClient.search_runs would.
"""

from __future__ import annotations

import math
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sweeps.schema import METRIC_KEYS, Hyperparams, final_name
from sweeps.tracking.store import rest_call


@dataclass(frozen=True)
class TrialRun:
    """A trial's MLflow run as the store holds it: params and tags are text."""

    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    status: str = "FINISHED"
    """The run's MLflow status: RUNNING, FINISHED, FAILED or KILLED."""

    @classmethod
    def from_mlflow(cls, run) -> TrialRun:
        """From an mlflow.entities.Run."""
        data = run.data
        return cls(run.info.run_id, data.params, data.metrics, data.tags, run.info.status)


@dataclass
class TrialRecord:
    """One trial, read once from MLflow or from Tune's results and passed on typed: `best`,
    `export`, `analyze` and the sweep's summary all read it."""

    trial_id: str
    status: str
    """DONE (a final SAE), STOPPED (early, by ASHA) or FAILED; read from MLflow, also RUNNING
    and KILLED (the run's status)."""
    params: Hyperparams | None
    """None only for a trial that failed before Tune handed it a configuration."""
    metrics: dict[str, float]
    """Final metrics by result key (`val/fvu`, `dead_frac`, ...)."""
    sae_dir: str | None = None
    """The final SAE's directory or URI; None for a trial without one."""
    run_id: str | None = None
    error: str = ""
    step: int | None = None

    @property
    def layer(self) -> int:
        return self.params.layer

    @property
    def mlflow_uri(self) -> str:
        return f"runs:/{self.run_id}/sae"

    def value(self, column: str):
        """A table cell: a field, a searched parameter or a metric by its result key."""
        if column in ("trial_id", "status", "sae_dir", "run_id", "error", "step"):
            return getattr(self, column)
        if self.params is not None and hasattr(self.params, column):
            return getattr(self.params, column)
        return self.metrics.get(column)

    @classmethod
    def from_run(cls, run: TrialRun, sae_dir: str | None = None) -> TrialRecord:
        """A finished trial run's record; its final metrics are kept by result key."""
        metrics = {
            k: run.metrics[final_name(k)] for k in METRIC_KEYS if final_name(k) in run.metrics
        }
        status = run.status
        if status == "FINISHED":
            status = "STOPPED" if run.tags.get("stopped_early") else "DONE"
        return cls(
            trial_id=run.tags.get("trial_id", ""),
            status=status,
            params=Hyperparams.from_values(run.params),
            metrics=metrics,
            sae_dir=sae_dir,
            run_id=run.run_id,
            error=run.tags.get("error", ""),
        )


def finished_trial_runs(
    uri: str,
    experiment: str,
    sweep_id: str,
    metric: str,
    ascending: bool,
    top: int,
    finished_only: bool = True,
) -> list[TrialRun] | None:
    """The FINISHED trial runs of the sweep tagged `sweep_id` (with `finished_only=False`,
    its trial runs of any status), best first by `metric` (runs without it last), at most
    `top`; None when the store holds no such sweep."""
    scheme = uri.split(":", 1)[0].lower()
    args = (experiment, sweep_id, metric, ascending, top, finished_only)
    if scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if not Path(path).is_file():
            return None  # never ran: and opening it must not create an empty store
        try:
            return _sqlite_runs(path, *args)
        except sqlite3.OperationalError:  # another MLflow's schema: let MLflow read it
            pass
    elif scheme in ("http", "https"):
        return _rest_runs(uri, *args)
    return _client_runs(uri, *args)


def _client_runs(
    uri, experiment, sweep_id, metric, ascending, top, finished_only=True
) -> list[TrialRun] | None:

    from sweeps.tracking.client import mlflow_client
    from sweeps.tracking.runs import find_sweep_run

    parent = find_sweep_run(uri, experiment, sweep_id)
    if parent is None:
        return None
    runs = mlflow_client(uri).search_runs(
        [parent.info.experiment_id],
        _child_filter(parent.info.run_id, finished_only),
        order_by=[_order(metric, ascending)],
        max_results=top,
    )
    return [TrialRun.from_mlflow(r) for r in runs]


def _rest_runs(
    uri, experiment, sweep_id, metric, ascending, top, finished_only
) -> list[TrialRun] | None:
    query = urllib.parse.urlencode({"experiment_name": experiment})
    found = rest_call(uri, f"experiments/get-by-name?{query}")
    if found is None or found["experiment"].get("lifecycle_stage") == "deleted":
        return None
    exp = found["experiment"]

    def search(filter_string: str, order_by: str, max_results: int) -> list[dict]:
        body = {
            "experiment_ids": [exp["experiment_id"]],
            "filter": filter_string,
            "order_by": [order_by],
            "max_results": max_results,
        }
        return rest_call(uri, "runs/search", body).get("runs", [])

    parents = search(f"tags.sweep_id = '{sweep_id}'", "attributes.start_time ASC", 1)
    if not parents:
        return None
    runs = search(
        _child_filter(parents[0]["info"]["run_id"], finished_only), _order(metric, ascending), top
    )

    def pairs(run: dict, kind: str) -> dict:
        return {e["key"]: e["value"] for e in run["data"].get(kind, [])}

    # JSON has no NaN or inf: the server sends them as the strings "NaN" and "Infinity"
    return [
        TrialRun(
            r["info"]["run_id"],
            pairs(r, "params"),
            {k: float(v) for k, v in pairs(r, "metrics").items()},
            pairs(r, "tags"),
            r["info"]["status"],
        )
        for r in runs
    ]


def _sqlite_runs(
    path, experiment, sweep_id, metric, ascending, top, finished_only
) -> list[TrialRun] | None:
    db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        found = db.execute(
            "SELECT experiment_id FROM experiments"
            " WHERE name = ? AND workspace = 'default' AND lifecycle_stage = 'active'",
            (experiment,),
        ).fetchone()
        if found is None:
            return None
        parent = db.execute(
            "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid"
            " WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active'"
            " AND t.key = 'sweep_id' AND t.value = ?"
            " ORDER BY r.start_time, r.run_uuid LIMIT 1",
            (found[0], sweep_id),
        ).fetchone()
        if parent is None:
            return None
        # MLflow's order: numbers, then NaN, then runs without the metric; ties newest first
        finished = " AND r.status = 'FINISHED'" if finished_only else ""
        found_runs = dict(
            db.execute(
                "SELECT r.run_uuid, r.status FROM runs r"
                " JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'mlflow.parentRunId'"
                " LEFT JOIN latest_metrics m ON m.run_uuid = r.run_uuid AND m.key = ?"
                " WHERE r.experiment_id = ? AND r.lifecycle_stage = 'active'"
                f"{finished} AND t.value = ?"
                " ORDER BY CASE WHEN m.is_nan THEN 1 WHEN m.value IS NULL THEN 2 ELSE 0 END,"
                f" m.value {'ASC' if ascending else 'DESC'}, r.start_time DESC, r.run_uuid"
                " LIMIT ?",
                (metric, found[0], parent[0], top),
            )
        )
        ids = list(found_runs)

        def table(name: str, columns: str = "key, value") -> dict[str, dict]:
            marks = ",".join("?" * len(ids))
            out: dict[str, dict] = {i: {} for i in ids}
            rows = db.execute(
                f"SELECT run_uuid, {columns} FROM {name} WHERE run_uuid IN ({marks})", ids
            )
            for run_id, key, value, *nan in rows:
                out[run_id][key] = math.nan if nan and nan[0] else value
            return out

        params, tags = table("params"), table("tags")
        metrics = table("latest_metrics", "key, value, is_nan")
        return [TrialRun(i, params[i], metrics[i], tags[i], found_runs[i]) for i in ids]
    finally:
        db.close()


def child_filter(parent_run_id: str) -> str:
    """The MLflow search filter of a sweep's trial runs."""
    return f"tags.`mlflow.parentRunId` = '{parent_run_id}'"


def _child_filter(parent_run_id: str, finished_only: bool = True) -> str:
    where = child_filter(parent_run_id)
    return f"{where} and status = 'FINISHED'" if finished_only else where


def _order(metric: str, ascending: bool) -> str:
    return f"metrics.`{metric}` {'ASC' if ascending else 'DESC'}"
