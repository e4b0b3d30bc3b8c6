"""One MLflow child run per trial under a sweep's parent run, by trial id: opened (or found
under the parent and reopened), logged to, tagged and closed. The Tune callback
(`sweeps/search/mlflow_callback.py`) drives it from Tune's hooks; this module holds every
MLflow call it makes. No Ray.

A store that fails (a tracking server that stopped answering) becomes one TrackingError, and
every later call raises it again: going on without MLflow would leave trials no record can
be made of."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from sweeps.redact import redact
from sweeps.tracking.client import mlflow_client, tracking_failure
from sweeps.tracking.runs import as_params, check_quotable, child_filter, flatten, log_batch
from sweeps.vocabulary import is_num


class TrialRuns:
    """The trial runs of the sweep whose parent run is `parent_run_id`. A reopened run (retry,
    resume) skips points at steps it already holds: a trial that continues from an older
    checkpoint logs each step once."""

    def __init__(self, tracking_uri: str, parent_run_id: str, fixed_params: Mapping[str, Any]):
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.fixed_params = dict(fixed_params)
        self.failed: Exception | None = None
        """The store's failure, which ended the sweep."""
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self.open_runs: dict[str, str] = {}
        """trial_id -> run id of the trials whose run is open."""
        self._logged: dict[str, dict[str, int]] = {}  # trial_id -> metric -> last logged step

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
            self._experiment_id = self._client.get_run(self.parent_run_id).info.experiment_id
        return self._client

    @contextlib.contextmanager
    def tracking(self, doing: str):
        """Around MLflow calls: a failure of the store becomes one TrackingError; after it,
        entering raises it again at once."""
        if self.failed is not None:
            raise self.failed
        try:
            yield
        except (MlflowException, requests.RequestException) as e:
            self.failed = tracking_failure(self.tracking_uri, e, doing)
            raise self.failed from None

    def open(self, trial_id: str, name: str, config: Mapping[str, Any]) -> str:
        """The trial's run id: cached, found under the parent and reopened, or created with
        the run name `name` and params: the fixed ones and the trial's `config`."""
        if trial_id in self.open_runs:
            return self.open_runs[trial_id]
        check_quotable(trial_id)
        client = self.client  # connects and sets self._experiment_id
        found = client.search_runs(
            [self._experiment_id],
            f"{child_filter(self.parent_run_id)} and tags.trial_id = '{trial_id}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            for tag in ("error", "killed_reason"):  # resumed after either: error.txt keeps one
                if tag in found[0].data.tags:
                    client.delete_tag(run_id, tag)
            self._logged[trial_id] = {
                key: max(m.step for m in client.get_metric_history(run_id, key))
                for key in found[0].data.metrics
            }
        else:
            tags = {MLFLOW_PARENT_RUN_ID: self.parent_run_id, "trial_id": trial_id}
            run = client.create_run(self._experiment_id, tags=tags, run_name=name)
            run_id = run.info.run_id
            params = flatten(self.fixed_params) | flatten(config)
            log_batch(client, run_id, params=as_params(params))
            self._logged[trial_id] = {}
        self.open_runs[trial_id] = run_id
        return run_id

    def log(self, run_id: str, trial_id: str, values: Mapping[str, Any], step: int) -> None:
        """Log the numeric values at `step`, skipping metrics the run already has there."""
        logged = self._logged.setdefault(trial_id, {})
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in values.items()
            if is_num(v) and step > logged.get(k, -1)
        ]
        log_batch(self.client, run_id, metrics=metrics)
        logged.update({m.key: step for m in metrics})

    def tag(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags, each cut to MLflow's length and without credentials."""
        values = [RunTag(k, redact(str(v))[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        log_batch(self.client, run_id, tags=values)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_artifacts(self, run_id: str, directory: Path, path: str) -> None:
        self.client.log_artifacts(run_id, str(directory), path)

    def close(self, trial_id: str, status: str) -> None:
        """End the trial's open run with `status` (FINISHED, FAILED, KILLED)."""
        self.client.set_terminated(self.open_runs.pop(trial_id), status)
        self._logged.pop(trial_id, None)
