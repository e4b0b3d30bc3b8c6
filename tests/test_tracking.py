"""MLflow tracking of real tiny Ray Tune sweeps, against SQLite and a real `mlflow server`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from sweeps.ranking import PickRule
from sweeps.results.plots import trial_plots
from sweeps.search.console import SweepDisplay
from sweeps.search.mlflow_callback import MlflowTrialCallback
from sweeps.search.snapshots import set_aside_torn_snapshot
from sweeps.tracking.records import _client_records, _sqlite_records, trial_records
from sweeps.tracking.runs import (
    close_lost_trial_runs,
    log_sweep_summary,
    start_sweep_run,
    sweep_run_name,
)
from sweeps.tracking.store import TrackingError, check_tracking_uri
from sweeps.vocabulary import (
    FREQUENCY_FILE,
    RUNS_PAGE_COLUMNS,
    default_tracking_uri,
)
from tests.helpers import page_text, stop_group, sweep_runs

STEPS = 4

# Ray workers cannot import this test module: ship its functions and classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def trainable(config):
    """Fake SAE training: reports metrics and checkpoints each step; fails or stops on request.

    config: lr; steps; raise_at: a step that raises, once when `marker` is set; interrupt: the
    driver's pid, interrupted at step 1 (once, with `marker`).
    """
    start = 0
    if checkpoint := tune.get_checkpoint():
        with checkpoint.as_directory() as d:
            start = json.loads(Path(d, "state.json").read_text())["step"] + 1
    steps = config.get("steps", STEPS)
    for step in range(start, steps):
        marker = config.get("marker")
        if step == config.get("raise_at") and not (marker and Path(marker).exists()):
            if marker:
                Path(marker).touch()
            raise RuntimeError(f"boom at step {step}")
        if step == 1 and config.get("interrupt") and not Path(marker + ".interrupted").exists():
            Path(marker + ".interrupted").touch()
            os.kill(config["interrupt"], signal.SIGUSR1)  # Tune's Ctrl-C: checkpoint, then end
            time.sleep(2)  # still mid-trial when the driver stops
        metrics = {
            "step": step,
            "train/fvu": config["lr"] / (step + 1),
            "val/fvu": config["lr"] / (step + 1) + 0.01,
            "val/l0": 8.0,
            "dead_frac": 0.1,
            "lr": config["lr"],
            "ignored": "not a number",
        }
        if step == steps - 1:
            sae_dir = Path(tune.get_context().get_trial_dir(), "sae")
            sae_dir.mkdir(parents=True, exist_ok=True)
            (sae_dir / "cfg.json").write_text('{"k": 4}')
            (sae_dir / "fvu.png").write_bytes(b"\x89PNG fake")
            np.save(sae_dir / FREQUENCY_FILE, np.array([0.0, 0.01, 0.2]))  # the driver plots it
            # as a URI (the sweep's storage on a cluster); test_sweep's sweep reports a path
            metrics["sae_dir"] = sae_dir.as_uri()
        with tempfile.TemporaryDirectory() as d:
            Path(d, "state.json").write_text(json.dumps({"step": step}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


@pytest.fixture(params=["sqlite", "server"])
def tracking_uri(request, tmp_path):
    if request.param == "server":
        return request.getfixturevalue("mlflow_server")
    return default_tracking_uri(tmp_path / "out")


def run_sweep(tmp_path, uri, param_space, sweep_id="s1", **tune_kwargs):
    """A tiny sweep with a parent run, as the sweep driver wires it."""
    parent = start_sweep_run(uri, "sweep", sweep_id, {"tune": {"num_samples": 1}}, {"lr": "grid"})
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=1, **tune_kwargs.pop("tune", {})),
        run_config=tune.RunConfig(
            name=sweep_id,
            storage_path=str(tmp_path / "ray"),
            callbacks=[MlflowTrialCallback(uri, parent, plots=trial_plots)],
            verbose=0,
            **tune_kwargs,
        ),
    )
    return parent, tuner.fit()


def children(uri, parent):
    """The trial runs of a sweep of `run_sweep` by their lr."""
    return {r.data.params["lr"]: r for r in sweep_runs(uri, "sweep", parent)[2]}


def test_sweep_logs_parent_children_metrics_artifacts(ray_session, tmp_path, tracking_uri):
    # Sequential trials: lr 0.1 completes, ASHA stops lr 0.9 (worse at rung 1), lr 0.5 raises.
    space = {
        "lr": tune.grid_search([0.1, 0.9, 0.5]),
        "steps": STEPS,
        "raise_at": tune.sample_from(lambda spec: 0 if spec.config.lr == 0.5 else None),
    }
    asha = ASHAScheduler(max_t=100, grace_period=1, reduction_factor=2)
    tune_cfg = {"metric": "val/fvu", "mode": "min", "scheduler": asha}
    parent, grid = run_sweep(tmp_path, tracking_uri, space, tune=tune_cfg)
    client = MlflowClient(tracking_uri)

    runs = children(tracking_uri, parent)
    assert sorted(runs) == ["0.1", "0.5", "0.9"]
    done, stopped, failed = runs["0.1"], runs["0.9"], runs["0.5"]
    assert done.info.status == "FINISHED" and "stopped_early" not in done.data.tags
    assert done.data.params["steps"] == str(STEPS)
    history = client.get_metric_history(done.info.run_id, "val/fvu")
    assert [m.step for m in history] == list(range(STEPS))
    assert done.data.metrics["fvu"] == pytest.approx(0.1 / STEPS + 0.01)
    assert done.data.metrics["train_fvu"] == pytest.approx(0.1 / STEPS)
    assert {"l0", "dead_frac", "lr", "val/l0", "train/fvu"} <= set(done.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(done.info.run_id, "sae")}
    plots = {"sae/firing_frequency.npy", "sae/firing_frequency.png"}
    assert artifacts == {"sae/cfg.json", "sae/fvu.png", *plots}
    (sae_dir,) = Path(tmp_path, "ray").rglob("sae")  # the plot also lands beside the SAE
    assert (sae_dir / "firing_frequency.png").read_bytes().startswith(b"\x89PNG")

    assert stopped.info.status == "FINISHED" and stopped.data.tags["stopped_early"] == "true"
    assert failed.info.status == "FAILED" and "boom at step 0" in failed.data.tags["error"]
    error_txt = Path(client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path)))
    assert "RuntimeError" in error_txt.read_text()

    best = log_sweep_summary(tracking_uri, parent, grid, PickRule({"val/fvu": "min"}))
    assert best[0]["run_id"] == done.info.run_id
    summary = client.get_run(parent).data
    assert summary.tags["best.run_id"] == done.info.run_id
    assert summary.tags["best.params.lr"] == "0.1"
    assert summary.metrics["best/fvu"] == pytest.approx(0.1 / STEPS + 0.01)
    assert summary.params["tune.num_samples"] == "1"
    assert summary.params["search_space.lr"] == "grid"


def test_retry_from_checkpoint_keeps_one_finished_run(ray_session, tmp_path):
    uri = default_tracking_uri(tmp_path)
    space = {"lr": 0.2, "raise_at": 2, "marker": str(tmp_path / "failed_once")}
    parent, grid = run_sweep(
        tmp_path, uri, space, failure_config=tune.FailureConfig(max_failures=1)
    )

    assert not grid.errors
    (run,) = children(uri, parent).values()
    assert run.info.status == "FINISHED" and run.data.tags["num_failures"] == "1"
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "val/fvu")
    assert [m.step for m in history] == list(range(STEPS))  # resumed at step 2, not step 0


def test_restore_reopens_the_same_parent_and_children(ray_session, tmp_path):
    uri = default_tracking_uri(tmp_path)
    driver = os.getpid()
    space = {
        "lr": tune.grid_search([0.3, 0.4]),
        "steps": 6,
        "marker": str(tmp_path / "failed_once"),
        "raise_at": tune.sample_from(lambda spec: 2 if spec.config.lr == 0.3 else None),
        "interrupt": tune.sample_from(lambda spec: driver if spec.config.lr == 0.4 else None),
    }
    # First run: lr 0.3 errors at step 2, then the sweep is interrupted during lr 0.4.
    parent, _ = run_sweep(tmp_path, uri, space)
    runs = children(uri, parent)
    assert runs["0.3"].info.status == "FAILED"
    assert runs["0.4"].info.status == "KILLED"

    again = start_sweep_run(uri, "sweep", "s1", {}, {})
    assert again == parent
    tuner = tune.Tuner.restore(str(tmp_path / "ray" / "s1"), trainable, resume_errored=True)
    assert not tuner.fit().errors

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep")
    all_runs = client.search_runs([experiment.experiment_id])
    assert len(all_runs) == 3  # one parent, two children
    assert [r.info.status for r in all_runs if r.info.run_id != parent] == ["FINISHED"] * 2
    runs = children(uri, parent)
    assert "error" not in runs["0.3"].data.tags
    for run in runs.values():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/fvu")]
        assert sorted(set(steps)) == list(range(6))


@pytest.mark.parametrize("torn", ["experiment_state", "searcher-state"])
def test_resume_goes_on_from_the_snapshot_before_one_a_kill_cut_short(ray_session, tmp_path, torn):
    """Tune writes its snapshot in place: a driver killed mid-write leaves a newer session's
    file cut short, and Tune, restoring, would start the sweep again from nothing."""
    uri = default_tracking_uri(tmp_path / "out")
    searcher = OptunaSearch(metric="val/fvu", mode="min", seed=0)
    space = {"lr": tune.uniform(0.1, 1.0), "steps": 2}
    _, grid = run_sweep(tmp_path, uri, space, tune={"search_alg": searcher, "num_samples": 2})
    exp = tmp_path / "ray" / "s1"
    (state,) = exp.glob("experiment_state-*.json")
    session = state.name.removeprefix("experiment_state-").removesuffix(".json")
    later = "2099-01-01_00-00-00"  # a later session, killed while it wrote its snapshot
    for p in [*exp.glob(f"*-{session}.json"), *exp.glob(f"*-{session}.pkl")]:
        shutil.copy(p, exp / p.name.replace(session, later))
    cut = next(exp.glob(f"{torn}-{later}.*"))
    cut.write_bytes(cut.read_bytes()[:50])

    aside = set_aside_torn_snapshot(str(exp))
    assert cut.name in aside and all(later in name for name in aside)
    assert not list(exp.glob(f"*-{later}.json")) + list(exp.glob(f"*-{later}.pkl"))
    assert set_aside_torn_snapshot(str(exp)) == []  # the session before is whole
    assert set_aside_torn_snapshot(str(tmp_path / "never-saved")) == []
    again = tune.Tuner.restore(str(exp), trainable, resume_unfinished=True).fit()
    assert sorted(r.metrics["trial_id"] for r in again) == sorted(
        r.metrics["trial_id"] for r in grid
    )


def test_callbacks_pickle_without_their_driver_state(tmp_path):
    """Tuner pickles callbacks into tuner.pkl: clients, consoles and caches stay behind."""
    callback = MlflowTrialCallback(default_tracking_uri(tmp_path), "parent-run")
    callback._runs.open_runs["t1"] = "run-1"
    display = SweepDisplay(3)
    display._counts["running"] = 1
    assert display.bar is not None
    callback_copy, display_copy = pickle.loads(pickle.dumps((callback, display)))
    assert callback_copy._runs.open_runs == {} and callback_copy._runs._client is None
    assert callback_copy.parent_run_id == "parent-run"
    assert display_copy._bar is None and display_copy._counts["running"] == 0
    assert display_copy.num_samples == 3


def test_pareto_summary_on_parent(tmp_path):
    uri = default_tracking_uri(tmp_path)
    parent = start_sweep_run(uri, "pareto", "p1", {}, {})
    trials = [
        {"trial_id": "a", "config": {"k": 8}, "metrics": {"val/fvu": 0.1, "val/l0": 64}},
        {"trial_id": "b", "config": {"k": 4}, "metrics": {"val/fvu": 0.2, "val/l0": 32}},
        {"trial_id": "c", "config": {"k": 8}, "metrics": {"val/fvu": 0.3, "val/l0": 64}},
        {"trial_id": "d", "config": {"k": 2}, "metrics": {"val/fvu": 0.0}, "error": "diverged"},
    ]
    rule = PickRule({"val/fvu": "min", "val/l0": "min"})
    front = log_sweep_summary(uri, parent, trials, rule)
    assert [t["trial_id"] for t in front] == ["a", "b"]  # the pick, then the rest of the front
    client = MlflowClient(uri)
    tags = client.get_run(parent).data.tags
    assert tags["pareto.trial_ids"] == "a,b" and tags["pareto.size"] == "2"
    assert tags["best.trial_id"] == "a" and "the lowest val/fvu among trials" in tags["best.rule"]
    assert tags["mlflow.note.content"].splitlines()[4].startswith("| pick: **")
    saved = json.loads(
        Path(client.download_artifacts(parent, "pareto_front.json", str(tmp_path))).read_text()
    )
    assert [t["metrics"] for t in saved] == [
        {"val/fvu": 0.1, "val/l0": 64},
        {"val/fvu": 0.2, "val/l0": 32},
    ]
    assert [t["pick"] for t in saved] == [True, False]


def test_runs_of_trials_tune_lost_are_closed_killed_whatever_their_status(tmp_path):
    """A driver killed before Tune saved a trial leaves its run RUNNING, or FINISHED when the
    trial ended within Tune's snapshot period; either way resume ran others in its place."""
    uri = default_tracking_uri(tmp_path)
    parent = start_sweep_run(uri, "lost", "l1", {}, {})
    client = MlflowClient(uri)
    experiment_id = client.get_run(parent).info.experiment_id
    runs = {}
    for trial_id, status in [("kept", "FINISHED"), ("open", None), ("ended", "FINISHED")]:
        tags = {"mlflow.parentRunId": parent, "trial_id": trial_id}
        runs[trial_id] = client.create_run(experiment_id, tags=tags).info.run_id
        if status:
            client.set_terminated(runs[trial_id], status)
    assert close_lost_trial_runs(uri, parent, ["kept"]) == 2
    assert close_lost_trial_runs(uri, parent, ["kept"]) == 0  # already closed
    for trial_id, run_id in runs.items():
        run = client.get_run(run_id)
        if trial_id == "kept":
            assert run.info.status == "FINISHED" and "killed_reason" not in run.data.tags
        else:
            assert run.info.status == "KILLED"
            assert (
                "was " + ("RUNNING" if trial_id == "open" else "FINISHED")
                in (run.data.tags["killed_reason"])
            )


def test_trial_records_read_by_sql_match_mlflow_search(tracking_uri, tmp_path):
    """`best` reads a SQLite store with SQL, not mlflow (3 s to import; MlflowClient took 20x
    the SQL's time at 1,000 trials): the same records, values and order as
    MlflowClient.search_runs, and no mlflow module loaded. A server is read by MlflowClient."""
    exp, sweep_id = f"readers-{tmp_path.name}", str(tmp_path / "ray" / "readers")
    parent = start_sweep_run(tracking_uri, exp, sweep_id, {}, {})
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(parent).info.experiment_id
    other = client.create_run(experiment_id, tags={"sweep_id": "another"}).info.run_id

    def trial(trial_id, fvu=None, status="FINISHED", parent_id=parent):
        tags = {"mlflow.parentRunId": parent_id, "trial_id": trial_id}
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        for key, value in {"layer": "3", "k": "8", "expansion_factor": "4", "lr": "0.001"}.items():
            client.log_param(run_id, key, value)
        if fvu is not None:
            client.log_metric(run_id, "fvu", fvu)
            client.log_metric(run_id, "l0", 8.0, step=5)
        if status:
            client.set_terminated(run_id, status)
        return run_id

    for i, fvu in enumerate([0.3, 0.1, 0.2, 0.1, math.nan, None]):  # a tie, a NaN, none
        trial(f"t{i}", fvu)
    trial("running", 0.01, status=None)
    trial("failed", 0.02, status="FAILED")
    client.delete_run(trial("deleted", 0.03))
    trial("elsewhere", 0.04, parent_id=other)

    def dump(records):
        return json.dumps([dataclasses.asdict(r) for r in records], sort_keys=True)

    sql = tracking_uri.startswith("sqlite:///")
    path = tracking_uri.removeprefix("sqlite:///")
    for ascending, top in [(True, 50), (False, 50), (True, 2)]:
        args = (exp, sweep_id, "fvu", ascending, top, True)
        got = trial_records(tracking_uri, *args)
        assert dump(got) == dump(_client_records(tracking_uri, *args))
        if sql:
            assert dump(got) == dump(_sqlite_records(path, *args))
        assert len(got) == min(top, 6)
    # every status, for load_sweep: the running and failed trials too, not the deleted one
    args = (exp, sweep_id, "fvu", True, 50, False)
    every = trial_records(tracking_uri, *args)
    assert dump(every) == dump(_client_records(tracking_uri, *args))
    if sql:
        assert dump(every) == dump(_sqlite_records(path, *args))
    assert {r.trial_id: r.status for r in every} == {
        **{f"t{i}": "DONE" for i in range(6)},
        "running": "RUNNING",
        "failed": "FAILED",
    }
    assert [r.trial_id for r in every][:2] == ["running", "failed"]  # by fvu first
    done = trial_records(tracking_uri, exp, sweep_id, "fvu", True, 9)
    ids = [r.trial_id for r in done]
    assert ids[0] in ("t1", "t3") and ids[2:] == ["t2", "t0", "t4", "t5"]
    assert done[0].metrics == {"val/fvu": 0.1, "val/l0": 8.0} and done[0].params.k == 8
    assert math.isnan(done[4].metrics["val/fvu"]) and "val/fvu" not in done[5].metrics
    assert trial_records(tracking_uri, exp, "no-such-sweep", "fvu", True, 5) is None
    assert trial_records(tracking_uri, "no-such-experiment", sweep_id, "fvu", True, 5) is None
    if not sql:
        return
    code = (
        "import sys; from sweeps.tracking.records import trial_records as f; "
        f"runs = f({tracking_uri!r}, {exp!r}, {sweep_id!r}, 'fvu', True, 50); "
        "print(len(runs), sorted(m for m in sys.modules if m.startswith('mlflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["6", "[]"]


def test_an_unreachable_tracking_server_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} is not reachable"):
        trial_records(uri, "sweep", "s1", "fvu", True, 5)


def test_a_missing_sqlite_store_is_no_sweep_and_stays_missing(tmp_path):
    uri = default_tracking_uri(tmp_path / "elsewhere")
    assert trial_records(uri, "sweep", "s1", "fvu", True, 5) is None
    assert not (tmp_path / "elsewhere").exists()


def test_check_tracking_uri(tmp_path, mlflow_server, monkeypatch):
    check_tracking_uri(mlflow_server)
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(TrackingError, match=f"{dead} is not reachable.*mlflow server"):
        check_tracking_uri(dead, timeout_s=1)

    check_tracking_uri(default_tracking_uri(tmp_path / "new" / "dir"))
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "file").touch()
    with pytest.raises(TrackingError, match="Cannot create the directory"):
        check_tracking_uri(default_tracking_uri(tmp_path / "file" / "out"))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    for uri in (f"file://{tmp_path}", str(tmp_path)):
        with pytest.raises(TrackingError, match="file store.*sqlite:///"):
            check_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's explicit opt-in
    check_tracking_uri(f"file://{tmp_path}")


@pytest.fixture(scope="module")
def ui_sweep(ray_session, demo_assets, mlflow_server, tmp_path_factory):
    """A small finished sweep logged to a real `mlflow server`: (its result, its out_dir)."""
    from sweeps.cli import DEMO_CONFIG
    from sweeps.config import load_config
    from sweeps.search.driver import run_sweep

    out = tmp_path_factory.mktemp("ui")
    sets = [*demo_assets, f"sweep.out_dir={out}", "sweep.name=ui", "tune.num_samples=3"]
    sets += [f"sweep.tracking_uri={mlflow_server}", "tune.asha=false", "train.epochs=2"]
    sets += ["tune.objectives=[val/fvu:min]"]  # one objective: Optuna keeps its curves
    return run_sweep(load_config(DEMO_CONFIG, sets)), out


def test_mlflow_ui_shows_trials_by_name_and_the_leaderboard(
    browser, ui_sweep, mlflow_server, tmp_path
):
    """A small sweep logged to a real `mlflow server`, then its pages in headless Chromium."""
    from sweeps.vocabulary import leaderboard_url, trial_label

    result, _ = ui_sweep
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment(result.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    kids = client.search_runs(
        [result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    )
    names = {k.info.run_name for k in kids}
    assert names == {trial_label(r.params.as_dict()) for r in result.rows} and len(names) == 3
    for kid in kids:  # sampled values and fixed settings side by side
        assert {"lr", "k", "layer", "train.batch_size", "model.name_or_path"} <= set(
            kid.data.params
        )
        # what the README and the leaderboard say to tick under Columns, under those names
        assert set(RUNS_PAGE_COLUMNS["Metrics"]) <= set(kid.data.metrics), kid.data.metrics
        assert set(RUNS_PAGE_COLUMNS["Parameters"]) <= set(kid.data.params)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.run_name == sweep_run_name("ui") == "leaderboard · ui"
    note = parent.data.tags["mlflow.note.content"]
    assert "| trial | run |" in note and "open Columns and tick `val/fvu`" in note
    assert "best/lr" not in parent.data.metrics and "best/fvu" in parent.data.metrics

    artifacts = artifacts_dir(tmp_path)

    def text_of(url: str, shot: str) -> str:
        return page_text(browser, url, tmp_path / "profile", artifacts / shot)

    runs = text_of(
        leaderboard_url(mlflow_server, result.experiment_id, "val/fvu", "min"), "mlflow_runs.png"
    )
    assert "Training runs" in runs
    shown = [n for n in names if n in runs]
    assert len(shown) == 3, runs[:3000]
    order = sorted(shown, key=runs.index)  # sorted by val/fvu, as the URL asks
    lowest = min(result.rows, key=lambda r: r.metrics["val/fvu"])
    assert order[0] == trial_label(lowest.params.as_dict())
    assert sweep_run_name("ui") in runs  # the way from the runs page to the leaderboard

    page = f"{mlflow_server}/#/experiments/{result.experiment_id}/runs/{result.parent_run_id}"
    text = text_of(page, "mlflow_parent.png")
    assert "3 trials" in text and "The pick (first row) is" in text, text[:3000]
    assert trial_label(result.rows[0].params.as_dict()) in text


def artifacts_dir(tmp_path: Path) -> Path:
    """Where a test's screenshots go: $TEST_ARTIFACTS when set, else its temporary directory."""
    artifacts = Path(os.environ.get("TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    return artifacts


def test_optuna_dashboard_shows_the_sweeps_study(browser, ui_sweep, tmp_path):
    """The sweep's Optuna study in its storage beside the MLflow store, opened as the sweep's
    last lines say: `optuna-dashboard <storage>` on 127.0.0.1, its trials in headless Chromium
    and in its API, with their params, intermediate values at each evaluation and values."""
    import urllib.request

    from sweeps.cli import optuna_dashboard_hint

    result, out = ui_sweep
    client, _, kids = sweep_runs(result.tracking_uri, "ui", result.parent_run_id)
    run_ids = {k.data.tags["trial_id"]: k.info.run_id for k in kids}
    assert result.optuna_storage == f"sqlite:///{out / 'optuna.db'}"
    command = optuna_dashboard_hint(result.optuna_storage).split(": ", 1)[1].split()[:2]
    assert command == ["optuna-dashboard", result.optuna_storage]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    executable = Path(sys.executable).parent / "optuna-dashboard"  # the extra's console script
    log = open(tmp_path / "dashboard.log", "wb")
    server = subprocess.Popen(
        [str(executable), result.optuna_storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # guards against a hang only
        while True:
            try:
                studies = json.load(urllib.request.urlopen(f"{url}/api/studies", timeout=5))
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "dashboard.log"
                ).read_text()
                time.sleep(0.3)
        (study,) = [s for s in studies["study_summaries"] if s["study_name"] == "ui"]
        sid = study["study_id"]
        detail = json.load(urllib.request.urlopen(f"{url}/api/studies/{sid}?after=0", timeout=30))
        trials = {_tune_trial_id(t): t for t in detail["trials"]}
        assert sorted(trials) == sorted(r.trial_id for r in result.rows)
        for row in result.rows:  # the same trial as Tune's and MLflow's: params, curve, value
            t = trials[row.trial_id]
            assert t["state"] == "Complete"
            params = {p["name"]: p["param_external_value"] for p in t["params"]}
            searched = row.params.as_dict()
            assert params and all(float(v) == float(searched[k]) for k, v in params.items())
            # an intermediate value at each evaluation: the val/fvu curve MLflow holds
            curve = {v["step"]: v["value"] for v in t["intermediate_values"]}
            history = client.get_metric_history(run_ids[row.trial_id], "val/fvu")
            assert curve == pytest.approx({m.step: m.value for m in history}) and curve
            assert t["values"] == [pytest.approx(row.metrics["val/fvu"])]

        text = page_text(browser, f"{url}/dashboard/studies/{sid}/trials", tmp_path / "profile",
                         artifacts_dir(tmp_path) / "optuna_dashboard.png")  # fmt: skip
        assert "ui (id=" in text and "3 Trials" in text, text[:3000]
        for number in range(3):
            assert f"Trial {number} Complete" in text, text[:3000]
        assert "Intermediate Values" in text and "User Attributes" in text, text[:3000]
        first = next(t for t in detail["trials"] if t["number"] == 0)  # the one shown
        assert f"trial_id {_tune_trial_id(first)}" in text, text[:3000]
    finally:
        stop_group(server)
        log.close()


def _tune_trial_id(trial: dict) -> str:
    """The Tune trial id of a trial in optuna-dashboard's API (its user attribute)."""
    return next(a["value"] for a in trial["user_attrs"] if a["key"] == "trial_id")


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """Two sweeps started together on a fresh out_dir both crashed in MLflow's schema
    migration (tables created twice, alembic's version row missing). Four processes, each
    past its imports, open one new store at the same moment."""
    go = tmp_path / "go"
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    code = (
        "import os, sys, time\n"
        "from sweeps.tracking.client import mlflow_client\n"
        f"open(os.path.join({str(tmp_path)!r}, 'ready-' + sys.argv[1]), 'w').close()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
        f"print(len(mlflow_client({uri!r}).search_experiments()))\n"
    )
    env = {**os.environ, "MLFLOW_LOGGING_LEVEL": "ERROR"}
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env, cwd=root)
        for i in range(4)
    ]  # fmt: skip
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("ready-*"))) < 4:  # wait on the condition, not the clock
        assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert all(out.strip().splitlines()[-1] == "1" for out in outs), outs  # the Default one
