"""A copy of the sweep's Optuna study in an RDB storage, which optuna-dashboard opens.

Tune keeps the study that proposes trials in its searcher's state, pickled with the experiment.
The searcher (driver's `_OptunaSearch`) copies each trial into the storage as the study
changes: when Optuna proposes it (its params), at each report (the intermediate value, at the
SAE's step) and when it ends (its state and value). A copied trial's user attribute
`trial_id` is Tune's trial id, as the trial's MLflow run is tagged.

On `resume` Tune restores the searcher from its pickle, which may be a snapshot older than the
copy. The copy keeps what it holds, as MLflow keeps its runs: each point once, the first value
at a step, a trial's end. It gains what the restored study adds, and a trial the restored study
never proposed (proposed within Tune's snapshot period before the driver died; MLflow closes
its run KILLED) ends FAIL with the user attribute `killed_reason`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from pathlib import Path

from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

#: The user attribute of a copied trial that holds its Tune trial id.
TRIAL_ID_ATTR = "trial_id"


def open_storage(url: str) -> RDBStorage:
    """The RDB storage at `url`, its tables created (and an SQLite file's directory); a
    ValueError that names the URL when it cannot be opened."""
    try:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(url)
    except Exception as e:  # a directory it cannot make; SQLAlchemy's bad URL, driver, server
        text = " ".join(str(e).split())[:300]
        raise ValueError(f"cannot open the Optuna storage {url}: {text}") from None


def delete_study(url: str, name: str) -> bool:
    """Delete the study `name` from the storage at `url`, if both exist; whether it did. An
    SQLite file that does not exist is not created."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return False
    storage = open_storage(url)
    try:
        storage.delete_study(storage.get_study_id_from_name(name))
    except KeyError:
        return False
    return True


class StudyCopy:
    """Writes a study's trials into the RDB storage at `url` as the study `study_name`.

    It travels in the searcher's pickle as its URL and name alone; an unpickled copy connects
    again when it is next written to."""

    def __init__(self, url: str, study_name: str):
        self.url = url
        self.study_name = study_name
        self._reset()

    def _reset(self) -> None:
        self._storage: RDBStorage | None = None
        self._study_id: int | None = None
        self._copies: dict[str, int] = {}  # Tune's trial id -> trial id in the copy

    def __getstate__(self) -> dict:
        return {"url": self.url, "study_name": self.study_name}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def storage(self) -> RDBStorage:
        if self._storage is None:
            self._storage = open_storage(self.url)
        return self._storage

    def start(self, study, trial_ids: Mapping[int, str]) -> None:
        """Write the copy afresh from `study` (a study of the same name in the storage is
        replaced); trial_ids: Tune's trial id of each trial number."""
        storage = self.storage
        with contextlib.suppress(KeyError):
            storage.delete_study(storage.get_study_id_from_name(self.study_name))
        self._study_id = storage.create_new_study(study.directions, self.study_name)
        self._copies = {}
        self._sync_all(study, trial_ids)

    def resume(self, study, trial_ids: Mapping[int, str]) -> None:
        """Go on with the copy from `study` as Tune restored it (see the module's docstring);
        with no copy yet, start one."""
        storage = self.storage
        try:
            self._study_id = storage.get_study_id_from_name(self.study_name)
        except KeyError:
            return self.start(study, trial_ids)
        self._copies = {}
        live = set(trial_ids.values())
        for trial in storage.get_all_trials(self._study_id, deepcopy=False):
            copy_id = storage.get_trial_id_from_study_id_trial_number(self._study_id, trial.number)
            trial_id = trial.user_attrs.get(TRIAL_ID_ATTR, "")
            self._copies[trial_id] = copy_id
            if trial_id not in live and not trial.state.is_finished():
                reason = "proposed after Tune's last snapshot; the driver died before saving it"
                storage.set_trial_user_attr(copy_id, "killed_reason", reason)
                storage.set_trial_state_values(copy_id, TrialState.FAIL)
        self._sync_all(study, trial_ids)

    def _sync_all(self, study, trial_ids: Mapping[int, str]) -> None:
        for trial in study.get_trials(deepcopy=False):
            if trial.state != TrialState.WAITING:  # enqueued, not yet proposed
                self.sync(trial, trial_ids.get(trial.number, ""))

    def sync(self, trial: FrozenTrial, trial_id: str) -> None:
        """Bring the copy of Tune's trial `trial_id` up to date with the study's `trial`:
        create it, add the intermediate values it lacks, end it as the trial ended. Call
        `start` or `resume` first."""
        if self._study_id is None:
            raise RuntimeError("StudyCopy.sync before start or resume")
        storage = self.storage
        copy_id = self._copies.get(trial_id)
        if copy_id is None:
            template = copy.deepcopy(trial)
            template.user_attrs = {**template.user_attrs, TRIAL_ID_ATTR: trial_id}
            self._copies[trial_id] = storage.create_new_trial(self._study_id, template)
            return
        have = storage.get_trial(copy_id)
        if have.state.is_finished():
            return
        for step, value in trial.intermediate_values.items():
            if step not in have.intermediate_values:  # the first value at a step stays
                storage.set_trial_intermediate_value(copy_id, step, value)
        if trial.state.is_finished():
            storage.set_trial_state_values(copy_id, trial.state, trial.values)
