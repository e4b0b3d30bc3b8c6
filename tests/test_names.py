"""Names that become paths are identifiers, checked before anything is touched: a sweep named
`..` once made `sweep --overwrite` delete everything in out_dir, and a trial id read back from
MLflow chose where `export` and `analyze` wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweeps.cli import DEMO_CONFIG, main
from sweeps.config import ConfigError, load_config
from sweeps.results.best import trial_sae_dir
from sweeps.vocabulary import check_name

BAD_NAMES = ["..", ".", "/etc", "a/b", "a\x00b", "it's", 'say "hi"', "x" * 300, "", " lead"]


# an empty experiment is no name: it takes the sweep's
FIELD_NAMES = [("sweep.name", n) for n in BAD_NAMES]
FIELD_NAMES += [("sweep.experiment", n) for n in BAD_NAMES if n]


@pytest.mark.parametrize("field, name", FIELD_NAMES, ids=repr)
def test_a_name_that_is_not_an_identifier_is_a_config_error(field, name):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(DEMO_CONFIG, [f"{field}={name!r}"])


COMMANDS = [
    ["sweep", "--overwrite"],
    ["resume"],
    ["best"],
    ["export"],
    ["analyze"],
    ["extract"],
    ["demo"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("name", ["..", ".", "/tmp", "x" * 300], ids=repr)
def test_every_command_refuses_a_bad_name_in_one_line_and_deletes_nothing(
    command, name, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "runs"
    (out / "ray_results" / "other-sweep").mkdir(parents=True)
    keep = [out / "mlflow.db", out / "my-notes.txt", out / "ray_results" / "other-sweep" / "x"]
    for path in keep:
        path.write_text("the user's")
    monkeypatch.chdir(tmp_path)
    sets = ["--set", f"sweep.out_dir={out}", "--set", f"sweep.name={name!r}"]
    assert main([command[0], "--config", DEMO_CONFIG, *sets, *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweep.name" in err and "Traceback" not in err
    assert all(p.read_text() == "the user's" for p in keep)


def test_check_name_keeps_a_name_that_is_an_identifier():
    for ok in ("demo", "seed-model-1", "clip-vit-b32-cifar100", "a.b_c-9", "x" * 100):
        assert check_name(ok, "sweep.name") == ok
    with pytest.raises(ValueError, match="at most 100"):
        check_name("x" * 101, "sweep.name")


@pytest.mark.parametrize("trial_id", ["../../../x", "/abs", "..", "a/b"])
def test_a_trial_id_read_back_from_mlflow_never_becomes_a_path(trial_id, tmp_path):
    cfg = load_config(DEMO_CONFIG, [f"sweep.out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="trial_id"):
        trial_sae_dir(cfg, trial_id, 1)
    assert not any(Path(tmp_path).parent.glob("x"))


def test_an_empty_or_comment_only_config_file_is_an_error_not_zero_sweeps(tmp_path, capsys):
    for text in ("", "# nothing here\n", "---\n---\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        assert main(["sweep", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert "holds no config" in err and str(path) in err and err.count("\n") == 1


def test_export_refuses_a_trial_id_tag_that_is_a_path(tmp_path, capsys):
    """Anyone who can write to the tracking server chose where `export` wrote: its output
    folder was built from the run's trial_id tag unchecked."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "out"
    out.mkdir()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("demo")
    run = client.create_run(exp, tags={"trial_id": "../../../escaped"})
    for key, value in {"layer": 2, "k": 8, "expansion_factor": 2, "lr": 1e-3}.items():
        client.log_param(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    capsys.readouterr()  # MLflow's own lines about creating the store
    argv = ["export", "--config", DEMO_CONFIG, "--set", f"sweep.out_dir={out}"]
    assert main([*argv, "--run-id", run.info.run_id]) == 2
    err = capsys.readouterr().err
    assert "trial_id '../../../escaped' is not a name" in err and err.count("\n") == 1, err
    assert not list(tmp_path.parent.glob("**/escaped"))
