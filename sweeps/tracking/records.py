"""A sweep's trials as one typed record, `TrialRecord`, and one function that reads a sweep's
trial runs back from its MLflow store: `trial_records`.

`trial_records` goes through MlflowClient, except on a SQLite store, which it reads with SQL
(read-only, without importing mlflow): at 1,000 trials MlflowClient took 2.2 s against 0.1 s,
and a new process (`sae-sweep best`) 4.4 s against 0.35 s (`benchmarks/bench_trial_read.py`,
docs/performance.md). Both return the same records in the same order (tests/test_tracking.py
compares them on one store); a SQLite schema the SQL does not know goes through MlflowClient.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeps.vocabulary import METRIC_KEYS, SAE_DIR_KEY, Hyperparams, final_name, is_num


@dataclass(frozen=True)
class TrialRecord:
    """One trial, read once from MLflow (`from_mlflow`) or from Tune's results (`from_tune`)
    and passed on typed: `best`, `export`, `analyze`, the sweep's summary and its MLflow
    leaderboard all read it."""

    trial_id: str
    status: str
    """DONE (a final SAE), STOPPED (early, by ASHA) or FAILED; read from MLflow, also RUNNING
    and KILLED (the run's status)."""
    params: Hyperparams | None
    """None only for a trial without a sweep's configuration (one that failed before Tune
    handed it one)."""
    metrics: dict[str, float]
    """Final metrics by result key (`val/fvu`, `dead_frac`, ...)."""
    sae_dir: str | None = None
    """The final SAE's directory or URI; None for a trial without one."""
    run_id: str | None = None
    error: str = ""
    step: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """The trial's configuration as Tune handed it (searched and fixed values); read from
    MLflow, its run's params (text)."""

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
    def from_mlflow(cls, run) -> TrialRecord:
        """A trial's MLflow run (an mlflow.entities.Run); its final metrics by result key."""
        return cls._of_run(
            run.info.run_id, run.info.status, run.data.params, run.data.metrics, run.data.tags
        )

    @classmethod
    def _of_run(cls, run_id, status, params, metrics, tags) -> TrialRecord:
        if status == "FINISHED":
            status = "STOPPED" if tags.get("stopped_early") else "DONE"
        return cls(
            trial_id=tags.get("trial_id", ""),
            status=status,
            params=Hyperparams.from_values(params),
            metrics={k: metrics[final_name(k)] for k in METRIC_KEYS if final_name(k) in metrics},
            run_id=run_id,
            error=tags.get("error", ""),
            config=dict(params),
        )

    @classmethod
    def from_tune(cls, result, keys: Iterable[str] | None = None) -> TrialRecord:
        """A trial's result from Tune: a ray.tune.Result, or a dict with its trial_id, config,
        metrics and, when it failed, error. Its numeric metrics (of `keys` where given) by
        result key; its params None where its config is not a sweep's."""
        if isinstance(result, Mapping):
            m, config = result.get("metrics") or {}, result.get("config") or {}
            trial_id, raised, reported = result.get("trial_id", ""), None, result.get("error")
        else:
            m, config, raised = result.metrics or {}, result.config or {}, result.error
            trial_id, reported = m.get("trial_id", ""), m.get("error")
        try:
            params = Hyperparams.from_values(config) if config else None
        except ValueError:  # not a sweep's configuration
            params = None
        status = "DONE" if m.get(SAE_DIR_KEY) else "STOPPED"
        return cls(
            trial_id=trial_id,
            status="FAILED" if raised or reported else status,
            params=params,
            metrics={k: m[k] for k in (m if keys is None else keys) if is_num(m.get(k))},
            sae_dir=m.get(SAE_DIR_KEY),
            error=str(raised).strip().splitlines()[-1] if raised else (reported or ""),
            step=m.get("step"),
            config=dict(config),
        )


def trial_records(
    uri: str,
    experiment: str,
    sweep_id: str,
    metric: str,
    ascending: bool,
    top: int,
    finished_only: bool = True,
) -> list[TrialRecord] | None:
    """The FINISHED trial runs of the sweep tagged `sweep_id` (with `finished_only=False`,
    its trial runs of any status), best first by the MLflow metric `metric` as MLflow orders
    them (numbers, then NaN, then runs without it; ties newest first), at most `top` (MLflow
    searches 50,000 at most); None when the store holds no such sweep."""
    args = (experiment, sweep_id, metric, ascending, top, finished_only)
    if uri.split(":", 1)[0].lower() == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if not Path(path).is_file():
            return None  # never ran: and opening it must not create an empty store
        try:
            return _sqlite_records(path, *args)
        except sqlite3.OperationalError:  # another MLflow's schema: let MLflow read it
            pass
    return _client_records(uri, *args)


def _client_records(
    uri, experiment, sweep_id, metric, ascending, top, finished_only
) -> list[TrialRecord] | None:
    import requests
    from mlflow.exceptions import MlflowException

    from sweeps.tracking.client import mlflow_client, read_failure
    from sweeps.tracking.runs import child_filter, find_sweep_run

    try:
        parent = find_sweep_run(uri, experiment, sweep_id)
        if parent is None:
            return None
        where = child_filter(parent.info.run_id)
        runs = mlflow_client(uri).search_runs(
            [parent.info.experiment_id],
            f"{where} and status = 'FINISHED'" if finished_only else where,
            order_by=[f"metrics.`{metric}` {'ASC' if ascending else 'DESC'}"],
            max_results=top,
        )
    except (MlflowException, requests.RequestException) as e:
        raise read_failure(uri, e) from None
    return [TrialRecord.from_mlflow(r) for r in runs]


def _sqlite_records(
    path, experiment, sweep_id, metric, ascending, top, finished_only
) -> list[TrialRecord] | None:
    """What `_client_records` returns, read from MLflow's tables with SQL."""
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
        return [TrialRecord._of_run(i, found_runs[i], params[i], metrics[i], tags[i]) for i in ids]
    finally:
        db.close()
