"""The Tune callback that keeps exactly one MLflow child run per trial, across retries and
Tuner.restore: a trial's run is found again by its `trial_id` tag under the sweep's parent run,
and reopened instead of duplicated."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ray import tune

from sweeps import storage
from sweeps.redact import hide, redact
from sweeps.search.callback_state import LocalState
from sweeps.tracking.trial_runs import TrialRuns
from sweeps.vocabulary import METRIC_KEYS, final_name, trial_label

logger = logging.getLogger(__name__)


class MlflowTrialCallback(LocalState, tune.Callback):
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

    `plots(sae_dir) -> [png paths]` draws a finished trial's plots beside its SAE, on the
    driver (trial workers load no plotting library): the caller passes results.plots'
    `trial_plots`, which the search may not import.

    Each result's metrics are sent when Tune hands it over, so a driver that dies loses none
    that Tune recorded. A reopened run (retry, resume) skips points at steps it already holds:
    a trial that continues from an older checkpoint logs each step once.

    A store that fails (a tracking server that stopped answering: MLflow's client gives up
    within seconds to a minute, see tracking.client) ends the sweep: the hook raises a one-line
    TrackingError, Tune stops, and its trials' state is kept for `resume`, which logs from
    where they go on. Going on without MLflow would leave trials no record can be made of.
    """

    def __init__(
        self,
        tracking_uri: str,
        parent_run_id: str,
        metric_keys: Sequence[str] = METRIC_KEYS,
        step_key: str = "step",
        sae_dir_key: str = "sae_dir",
        fixed_params: Mapping[str, Any] | None = None,
        plots: Callable[[Path], list[Path]] | None = None,
    ):
        self.fixed_params = dict(fixed_params or {})
        self.plots = plots
        self.tracking_uri = hide(tracking_uri)  # pickled into tuner.pkl: no password
        self.parent_run_id = parent_run_id
        self.metric_keys = tuple(metric_keys)
        self.step_key = step_key
        self.sae_dir_key = sae_dir_key
        self._reset()

    def _reset(self) -> None:
        self._runs = TrialRuns(self.tracking_uri, self.parent_run_id, self.fixed_params)
        self._stopped: set[str] = set()

    def _open(self, trial) -> str:
        return self._runs.open(
            trial.trial_id, trial_label(trial.config) or str(trial), trial.config
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        with self._runs.tracking(f"opening trial {trial.trial_id}'s run"):
            self._open(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get(self.step_key, result["training_iteration"]))
        with self._runs.tracking(f"logging trial {trial.trial_id}'s metrics"):
            values = {k: result.get(k) for k in self.metric_keys}
            self._runs.log(self._open(trial), trial.trial_id, values, step)
        # Tune marks a result done only when a scheduler or stopper decided to stop the trial;
        # a trainable that returns on its own ends without such a result.
        if result.get("done"):
            self._stopped.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        with self._runs.tracking(f"closing trial {trial.trial_id}'s run"):
            run_id = self._open(trial)
            last = trial.last_result
            step = int(last.get(self.step_key, last.get("training_iteration", 0)))
            values = {final_name(k): last.get(k) for k in self.metric_keys}
            self._runs.log(run_id, trial.trial_id, values, step)
            tags = {}
            if trial.trial_id in self._stopped and not last.get(self.sae_dir_key):
                tags["stopped_early"] = "true"
            if last.get("error"):  # a trial that cannot run ends itself with its reason
                tags["error"] = str(last["error"])
            self._runs.tag(run_id, tags)
            self._log_sae_dir(trial, run_id)
            self._close(trial, "FAILED" if last.get("error") else "FINISHED")

    def on_trial_recover(self, iteration, trials, trial, **info):
        # The trial restarts from its last checkpoint and keeps this run.
        with self._runs.tracking(f"reopening trial {trial.trial_id}'s run"):
            self._runs.tag(self._open(trial), {"num_failures": str(trial.num_failures)})

    def on_trial_error(self, iteration, trials, trial, **info):
        text = redact(_read_error(trial))
        lines = text.strip().splitlines() or ["unknown error"]
        with self._runs.tracking(f"closing failed trial {trial.trial_id}'s run"):
            run_id = self._open(trial)
            self._runs.log_text(run_id, text, "error.txt")
            self._runs.tag(run_id, {"error": lines[-1]})
            self._close(trial, "FAILED")

    def on_experiment_end(self, trials, **info):
        # Trials still open here did not finish (Ctrl-C, a stopper's stop_all, a time budget).
        # KILLED, so no run stays RUNNING with nothing behind it; Tuner.restore reopens them.
        # Not after the store failed: the sweep ends on that error, and `resume` reopens them.
        if self._runs.failed is not None:
            return
        with self._runs.tracking("closing the unfinished trials' runs"):
            for trial in trials:
                if trial.trial_id in self._runs.open_runs:
                    self._close(trial, "KILLED")

    def _close(self, trial, status: str) -> None:
        self._runs.close(trial.trial_id, status)
        self._stopped.discard(trial.trial_id)

    def _log_sae_dir(self, trial, run_id: str) -> None:
        reported = trial.last_result.get(self.sae_dir_key)
        if not reported:
            return
        # The driver draws the trial's plots (workers load no plotting library), beside its SAE.
        if storage.is_uri(reported):
            with tempfile.TemporaryDirectory() as tmp:
                storage.download_dir(reported, tmp)
                plots = self.plots(Path(tmp)) if self.plots else []
                self._runs.log_artifacts(run_id, Path(tmp), "sae")
                storage.write_dir(reported, lambda d: [shutil.copy(p, d) for p in plots])
            return
        path = Path(trial.local_path or "", reported)  # an absolute path stays as it is
        if path.is_dir():
            if self.plots:
                self.plots(path)
            self._runs.log_artifacts(run_id, path, "sae")
        else:
            logger.warning(
                "Trial %s reported %s=%s, which is not a directory on the driver: its SAE is not "
                "logged to MLflow. On several nodes, write it to shared storage.",
                trial,
                self.sae_dir_key,
                reported,
            )


def _read_error(trial) -> str:
    path = trial.error_file
    if path and Path(path).is_file():
        return Path(path).read_text(errors="replace")
    return f"Trial {trial} failed; its error file is missing, see the Ray driver log."
