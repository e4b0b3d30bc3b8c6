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

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import sqlalchemy
from optuna.storages import RDBStorage
from optuna.study.study import _SYSTEM_ATTR_METRIC_NAMES as METRIC_NAMES_ATTR
from optuna.trial import FrozenTrial, TrialState

from sweeps.redact import hide, redact, unhide

#: The user attribute of a copied trial that holds its Tune trial id.
TRIAL_ID_ATTR = "trial_id"
#: The user attribute of a study this service wrote: the sweep that owns it (its Tune
#: experiment path, as the sweep's MLflow run is tagged). A study without it is never touched.
OWNER_ATTR = "clip_sae.sweep"
#: Tables that make a database MLflow's: the study copy never writes beside them.
MLFLOW_TABLES = {"experiments", "runs", "metrics", "params"}


def _error(url: str, text: str) -> ValueError:
    return ValueError(f"Optuna storage {redact(url)}: {redact(' '.join(str(text).split()))[:300]}")


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL, None for another database; a ValueError for an in-memory
    one, whose study would end with the driver process."""
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    name = (parsed.database or "").removeprefix("file:")
    if name in ("", ":memory:") or parsed.query.get("mode") == "memory":
        raise _error(url, "an in-memory database ends with the driver: give a file, e.g. "
                     "sqlite:////abs/path/optuna.db")  # fmt: skip
    return Path(name)


def check_storage(url: str, study_name: str, owner: str) -> None:
    """Check, creating and writing nothing, that the sweep `owner` can keep its study copy
    `study_name` in the storage at `url`: a reachable, writable database that is not MLflow's
    and holds no study of that name owned by another sweep (or by no sweep of this service).
    A ValueError names the problem."""
    hide(url)  # so that a StudyCopy restored from Tune's pickle in this process finds it
    try:
        path = sqlite_path(url)
    except sqlalchemy.exc.ArgumentError as e:
        raise _error(url, f"{e}: give an SQLAlchemy URL such as sqlite:////abs/optuna.db") from None
    if path is not None and not path.exists():  # created at the sweep's start: can it be?
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise _error(url, f"cannot create {path}: {parent} is not a writable directory")
        return
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as connection:
            tables = set(sqlalchemy.inspect(connection).get_table_names())
            if MLFLOW_TABLES <= tables:
                raise _error(url, "this is an MLflow store: give the study copy its own database")
            connection.rollback()  # the inspection's transaction
            write = connection.begin()  # a write, undone: refuses a read-only database
            connection.exec_driver_sql("CREATE TABLE clip_sae_write_check (x INTEGER)")
            connection.exec_driver_sql("DROP TABLE clip_sae_write_check")
            write.rollback()
        engine.dispose()
    except ValueError:
        raise
    except Exception as e:  # a driver missing, a server down, a read-only file
        raise _error(url, e) from None
    if "studies" not in tables:
        return
    storage = RDBStorage(url, skip_table_creation=True)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return
    holder = storage.get_study_user_attrs(study_id).get(OWNER_ATTR)
    if holder != owner:
        whose = f"sweep {holder}" if holder else "no sweep of this service"
        raise _error(
            url,
            f"its study {study_name!r} belongs to {whose}, not to this sweep ({owner}); it is "
            "never written to or deleted: use another sweep.name or sweep.optuna_storage",
        )


def open_storage(url: str) -> RDBStorage:
    """The RDB storage at `url`, its tables created (and an SQLite file's directory); a
    ValueError that names the URL when it cannot be opened."""
    try:
        if (path := sqlite_path(url)) is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(url)
    except Exception as e:  # a directory it cannot make; SQLAlchemy's bad URL, driver, server
        raise _error(url, e) from None


def owns_study(url: str, name: str, owner: str) -> bool:
    """Whether the storage at `url` holds a study `name` that the sweep `owner` wrote. An
    SQLite file that does not exist is not created."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return False
    storage = open_storage(url)
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return storage.get_study_user_attrs(study_id).get(OWNER_ATTR) == owner


def delete_study(url: str, name: str, owner: str) -> bool:
    """Delete the study `name` that the sweep `owner` wrote to the storage at `url`, if both
    exist; whether it did."""
    if not owns_study(url, name, owner):
        return False
    storage = open_storage(url)
    storage.delete_study(storage.get_study_id_from_name(name))
    return True


class StudyCopy:
    """Writes a study's trials into the RDB storage at `url` as the study `study_name`.

    It travels in the searcher's pickle as its URL, name, owner and metric names alone; an
    unpickled copy connects again when it is next written to."""

    def __init__(self, url: str, study_name: str, owner: str, metric_names: list[str]):
        self.url = url
        self.study_name = study_name
        self.owner = owner
        """The sweep that writes the copy (its Tune experiment path): see OWNER_ATTR."""
        self.metric_names = metric_names
        """The objectives' names, which optuna-dashboard shows instead of "Objective 0"."""
        self._reset()

    def _reset(self) -> None:
        self._storage: RDBStorage | None = None
        self._study_id: int | None = None
        self._copies: dict[str, int] = {}  # Tune's trial id -> trial id in the copy

    def __getstate__(self) -> dict:
        keys = ("study_name", "owner", "metric_names")
        # Pickled into the sweep's storage with Tune's searcher: the URL without its password.
        return {"url": hide(self.url)} | {key: self.__dict__[key] for key in keys}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.url = unhide(self.url)  # the driver checked (hid) the real URL before a resume
        self._reset()

    @property
    def storage(self) -> RDBStorage:
        if self._storage is None:
            self._storage = open_storage(self.url)
        return self._storage

    def start(self, study, trial_ids: Mapping[int, str]) -> None:
        """Write the copy afresh from `study` (this sweep's study of the same name in the
        storage is replaced); trial_ids: Tune's trial id of each trial number."""
        storage = self.storage
        if delete_study(self.url, self.study_name, self.owner) is False:
            check_storage(self.url, self.study_name, self.owner)  # another's: refused
        self._study_id = storage.create_new_study(study.directions, self.study_name)
        storage.set_study_user_attr(self._study_id, OWNER_ATTR, self.owner)
        storage.set_study_system_attr(self._study_id, METRIC_NAMES_ATTR, self.metric_names)
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
        check_storage(self.url, self.study_name, self.owner)
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
