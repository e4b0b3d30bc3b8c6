"""The sweep's copy of its Optuna study (sweep.optuna_storage): a sweep writes and deletes only
the study it created, and a storage it cannot keep the copy in is refused before Ray starts,
with nothing created in it."""

from __future__ import annotations

import pickle
import sqlite3

import optuna
import pytest

from sweeps.cli import DEMO_CONFIG, main
from sweeps.config import load_config
from sweeps.search.study import OWNER_ATTR, StudyCopy, check_storage, delete_study


@pytest.fixture
def sets(demo_assets, tmp_path):
    return [f"--set={s}" for s in [*demo_assets, f"sweep.out_dir={tmp_path / 'out'}"]]


def _someone_elses_study(url: str, name: str) -> None:
    study = optuna.create_study(study_name=name, storage=url)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))


@pytest.mark.parametrize("overwrite", [False, True])
def test_another_projects_study_is_never_written_or_deleted(sets, tmp_path, capsys, overwrite):
    """`sweep --overwrite` once deleted a study of the same name that another project kept in
    a shared database, and without --overwrite the sweep would have written into it."""
    url = f"sqlite:///{tmp_path / 'shared' / 'optuna.db'}"
    (tmp_path / "shared").mkdir()
    _someone_elses_study(url, "case")
    flags = ["--overwrite"] if overwrite else []
    code = main(["sweep", *flags, "--config", DEMO_CONFIG, *sets, "--set=sweep.name=case",
                 f"--set=sweep.optuna_storage={url}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert (
        f"sweep.optuna_storage: Optuna storage {url}: its study 'case' belongs to no sweep" in err
    )
    assert "never written to or deleted" in err and "deleted" not in err.replace("or deleted", "")
    assert len(optuna.load_study(study_name="case", storage=url).trials) == 1


def test_a_sweep_writes_and_deletes_only_its_own_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(directions=["minimize", "minimize"])
    mine = StudyCopy(url, "case", "/runs/a/case", ["val/fvu", "val/l0"])
    mine.start(study, {})
    copied = optuna.load_study(study_name="case", storage=url)
    assert copied.user_attrs[OWNER_ATTR] == "/runs/a/case"
    assert copied.metric_names == ["val/fvu", "val/l0"]  # optuna-dashboard's axis labels
    check_storage(url, "case", "/runs/a/case")  # its own: fine
    with pytest.raises(ValueError, match="belongs to sweep /runs/a/case, not to this sweep"):
        check_storage(url, "case", "/runs/b/case")
    with pytest.raises(ValueError, match="belongs to sweep /runs/a/case"):
        StudyCopy(url, "case", "/runs/b/case", ["val/fvu"]).start(study, {})
    assert delete_study(url, "case", "/runs/b/case") is False
    assert optuna.load_study(study_name="case", storage=url).user_attrs[OWNER_ATTR]
    assert delete_study(url, "case", "/runs/a/case") is True
    assert optuna.get_all_study_names(url) == []


def test_a_storage_the_copy_cannot_live_in_is_refused_creating_nothing(sets, tmp_path, capsys):
    out = tmp_path / "out"
    # MLflow's own database: once refused only after Optuna had added its tables to it
    out.mkdir()
    mlflow_db = out / "mlflow.db"
    from sweeps.tracking.client import mlflow_client

    mlflow_client(f"sqlite:///{mlflow_db}").search_experiments()  # MLflow's tables
    before = _tables(mlflow_db)
    read_only = tmp_path / "ro.db"
    optuna.create_study(study_name="x", storage=f"sqlite:///{read_only}")
    cases = {
        f"sqlite:///{mlflow_db}": "this is an MLflow store",
        "'sqlite:///:memory:'": "an in-memory database ends with the driver",
        f"sqlite:///file:{read_only}?mode=ro&uri=true": "readonly database",
        f"sqlite:///{tmp_path / 'afile' / 'o.db'}": "is not a writable directory",
    }
    (tmp_path / "afile").write_text("a file")
    for url, message in cases.items():
        code = main(["sweep", "--config", DEMO_CONFIG, *sets, f"--set=sweep.optuna_storage={url}"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "sweep.optuna_storage" in err, (url, err)
    assert _tables(mlflow_db) == before


def test_a_relative_sqlite_file_is_resolved_and_not_created_by_a_refused_config(
    sets, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    rel = ["--set=sweep.optuna_storage=sqlite:///rel/optuna.db"]
    cfg = load_config(DEMO_CONFIG, [s.removeprefix("--set=") for s in [*sets, *rel]])
    assert cfg.sweep.optuna_storage == f"sqlite:///{tmp_path / 'rel' / 'optuna.db'}"
    # refused at the name check (a sweep of that name exists): no storage file appears
    (tmp_path / "out" / "ray_results" / "demo").mkdir(parents=True)
    assert main(["sweep", "--config", DEMO_CONFIG, *sets, *rel]) == 2
    assert "a sweep named 'demo' exists" in capsys.readouterr().err
    assert not (tmp_path / "rel").exists()


def _tables(db) -> set[str]:
    with sqlite3.connect(db) as connection:
        return {r[0] for r in connection.execute("SELECT name FROM sqlite_master")}


def test_the_storage_password_is_never_printed_or_pickled(sets, capsys):
    url = "postgresql://alice:SECRET@127.0.0.1:9/optuna"
    code = main(["sweep", "--config", DEMO_CONFIG, *sets, f"--set=sweep.optuna_storage={url}"])
    err = capsys.readouterr().err
    assert code == 2 and "postgresql://alice:***@127.0.0.1:9/optuna" in err, err
    assert "SECRET" not in err
    # Tune pickles the searcher, and with it the copy, into the sweep's storage
    copy = StudyCopy(url, "case", "/runs/a/case", ["val/fvu"])
    frozen = pickle.dumps(copy)
    assert b"SECRET" not in frozen
    assert pickle.loads(frozen).url == url  # in the process that checked the storage
