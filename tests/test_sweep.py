"""Sweeps end to end: the CLI as a user runs it, MLflow contents, faults and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from sae import TopKSae
from sweeps.cli import DEMO_CONFIG, main
from sweeps.config import load_config
from sweeps.tune import run_sweep
from tests.helpers import sweep_runs

ROOT = Path(__file__).resolve().parents[1]


def overrides(demo_assets, out: Path, name: str, *extra: str) -> list[str]:
    sets = [*demo_assets, f"sweep.out_dir={out}", f"sweep.name={name}", *extra]
    return [arg for s in sets for arg in ("--set", s)]


def cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_sweep.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def test_demo_sweep_end_to_end_through_the_cli(demo_assets, tmp_path):
    out = tmp_path / "out"
    args = overrides(
        demo_assets,
        out,
        "e2e",
        "tune.num_samples=4",
        "train.epochs=6",
        "train.eval_every=20",
        "tune.grace_period=40",
    )
    proc = cli(["demo", *args])
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert "sweep e2e: 4 trials (0 errored)" in log
    assert "mlflow ui --backend-store-uri sqlite:///" in log

    client, parents, kids = sweep_runs(f"sqlite:///{out / 'mlflow.db'}", "e2e")
    assert len(parents) == 1 and len(kids) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["cache_key"]
    assert "best.run_id" in parent.data.tags
    for kid in kids:
        assert kid.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id
        assert kid.info.status == "FINISHED"
        for p in ("lr", "k", "layer", "expansion_factor", "auxk_alpha"):
            assert p in kid.data.params
        history = client.get_metric_history(kid.info.run_id, "val/fvu")
        assert len(history) >= 2 and history[0].step < history[-1].step
        assert "fvu" in kid.data.metrics and "l0" in kid.data.metrics

    best_run = client.get_run(parent.data.tags["best.run_id"])
    artifacts = {a.path for a in client.list_artifacts(best_run.info.run_id, "sae")}
    assert {"sae/cfg.json", "sae/sae.safetensors", "sae/firing_frequency.png"} <= artifacts

    best = cli(["best", "--config", DEMO_CONFIG, *args])
    log, _ = best.communicate(timeout=120)
    assert best.returncode == 0, log
    sae_dir = next(line.split(": ", 1)[1] for line in log.splitlines() if "best SAE:" in line)
    sae = TopKSae.load(sae_dir)
    assert sae.cfg.k == int(best_run.data.params["k"])
    assert f"runs:/{best_run.info.run_id}/sae" in log


def terminated_trials(exp_dir: Path) -> set[str]:
    """Trials that Tune's saved experiment state records as finished."""
    states = sorted(exp_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return set()
    try:
        trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]]
    except (json.JSONDecodeError, KeyError):
        return set()  # caught mid-write
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


def test_killed_driver_resumes_without_retraining_or_duplicate_runs(demo_assets, tmp_path):
    out = tmp_path / "out"
    args = overrides(
        demo_assets,
        out,
        "resume",
        "tune.num_samples=6",
        "tune.asha=false",
        "tune.max_concurrent=1",
        "train.epochs=40",
        "train.eval_every=100",
    )
    exp_dir = out / "ray_results" / "resume"
    proc = cli(["sweep", "--config", DEMO_CONFIG, *args])
    deadline = time.time() + 300
    while time.time() < deadline and len(terminated_trials(exp_dir)) < 2:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = terminated_trials(exp_dir)
    assert 2 <= len(done) < 6
    mtimes = {t: (exp_dir / "sae" / t / "sae.safetensors").stat().st_mtime_ns for t in done}

    resumed = cli(["resume", "--config", DEMO_CONFIG, *args])
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    assert "sweep resume: 6 trials (0 errored)" in log

    _, parents, kids = sweep_runs(f"sqlite:///{out / 'mlflow.db'}", "resume")
    assert len(parents) == 1
    trial_ids = [k.data.tags["trial_id"] for k in kids]
    assert len(trial_ids) == len(set(trial_ids)) == 6
    assert all(k.info.status == "FINISHED" for k in kids)
    for trial_id, mtime in mtimes.items():  # finished trials were not trained again
        assert (exp_dir / "sae" / trial_id / "sae.safetensors").stat().st_mtime_ns == mtime


def _trial_worker_pids() -> list[int]:
    """PIDs of Ray workers running a Tune trial (their process title names the actor)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if title.startswith(("ray::ImplicitFunc", "ray::run_trial")):
            pids.append(int(proc.name))
    return pids


def _kill_first_trial_worker(exp_dir: Path, killed: list):
    """Once a trial has checkpointed twice, SIGKILL the worker process that runs it."""
    deadline = time.time() + 240
    while time.time() < deadline:
        # The second checkpoint on disk means Tune has taken the first report (a report
        # blocks training until the driver fetches it), so the first checkpoint is Tune's.
        if len(list(exp_dir.glob("run_trial_*/checkpoint_*"))) >= 2:
            for pid in _trial_worker_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            if killed:
                return
        time.sleep(0.1)


def test_killed_trial_worker_resumes_from_its_checkpoint(ray_session, demo_assets, tmp_path):
    out = tmp_path / "out"
    cfg = load_config(
        DEMO_CONFIG,
        [
            *demo_assets,
            f"sweep.out_dir={out}",
            "sweep.name=killw",
            "tune.num_samples=1",
            "tune.asha=false",
            "train.epochs=30",
            "train.eval_every=20",
            "tune.verbose=0",
        ],
    )
    exp_dir = out / "ray_results" / "killw"
    killed: list = []
    killer = threading.Thread(target=_kill_first_trial_worker, args=(exp_dir, killed))
    killer.start()
    result = run_sweep(cfg)
    killer.join()
    assert killed, "no trial worker was killed"
    client, _, kids = sweep_runs(result.tracking_uri, "killw")
    (kid,) = kids
    assert kid.info.status == "FINISHED" and kid.data.tags["num_failures"] == "1"
    steps = [m.step for m in client.get_metric_history(kid.info.run_id, "val/fvu")]
    # Restarting from step 0 would report the first eval step twice.
    assert steps.count(steps[0]) == 1 and steps[-1] == max(steps)


def test_multi_objective_sweep_returns_a_pareto_set(ray_session, demo_assets, tmp_path):
    cfg = load_config(
        DEMO_CONFIG,
        [
            *demo_assets,
            f"sweep.out_dir={tmp_path}",
            "sweep.name=pareto",
            "tune.num_samples=5",
            "tune.asha=false",
            "tune.sampler=nsga2",
            "train.epochs=3",
            "tune.verbose=0",
            "tune.objectives=[val/fvu:min, val/l0:min]",
            "search.activation=[topk, batchtopk]",
            "search.points_to_evaluate=[{activation: batchtopk}]",
        ],
    )
    result = run_sweep(cfg)
    assert "batchtopk" in {r["activation"] for r in result.rows}
    front = [(t["metrics"]["val/fvu"], t["metrics"]["val/l0"]) for t in result.best]
    assert front
    for a in front:  # no point of the front dominates another
        assert not any(b != a and b[0] <= a[0] and b[1] <= a[1] for b in front)
    others = [(r["val/fvu"], r["val/l0"]) for r in result.rows]
    for point in others:  # and every trial is dominated by or on the front
        assert any(f[0] <= point[0] and f[1] <= point[1] for f in front)
    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.parent_run_id).data.tags["pareto.size"] == str(len(front))


def test_diverging_trial_errors_with_its_reason_and_the_sweep_goes_on(
    ray_session, demo_assets, tmp_path
):
    cfg = load_config(
        DEMO_CONFIG,
        [
            *demo_assets,
            f"sweep.out_dir={tmp_path}",
            "sweep.name=diverge",
            "tune.data=cache",  # trials read the layer from the cache, as on several nodes
            "tune.num_samples=2",
            "tune.asha=false",
            "tune.max_failures=0",
            "train.epochs=2",
            "tune.verbose=0",
            "search.lr=[0.001, 1.0e+30]",
            "search.k=8",
            "search.expansion_factor=2",
            "search.layer=2",
            "search.points_to_evaluate=[{lr: 1.0e+30}, {lr: 0.001}]",
        ],
    )
    result = run_sweep(cfg)
    status = {r["lr"]: r for r in result.rows}
    assert status[0.001]["status"] == "DONE"
    assert status[1e30]["status"] == "ERROR"
    assert "loss became" in status[1e30]["error"]
    _, _, kids = sweep_runs(result.tracking_uri, "diverge")
    failed = [k for k in kids if k.info.status == "FAILED"]
    assert len(failed) == 1 and "loss became" in failed[0].data.tags["error"]


@pytest.mark.parametrize(
    "sets, message",
    [
        (["search.kk=3"], "unknown search field(s): kk"),
        (["tune.nope=1"], "unknown tune field(s): nope"),
        (
            ["search.k=[8, 1000]", "search.expansion_factor=[2, 4]"],
            "search.k reaches 1000, more than the 128 latents of the smallest SAE",
        ),
        (["search.layer=[3, 7]", "extract.layers=[3, 7]"], "has layers 0..3"),
        (["search.layer=[2, 5]"], "extract.layers [2, 3] does not cache"),
        (["search.lr={low: 0.1, high: 0.01}"], "search.lr: empty range"),
        (["search.k=[]"], "search.k: empty list of choices"),
        (["search.lr=0"], "search.lr: 0 must be > 0"),
        (["search.lr=-0.001"], "search.lr: -0.001 must be > 0"),
        (["train.lr=0.01"], "train.lr is chosen per trial: set it under search.lr"),
        (["sae.activation=batchtopk"], "sae.activation is chosen per trial"),
        (["search.activation=relu"], "search.activation: use topk, batchtopk"),
        (["tune.gpus_per_trial=1.5"], "tune.gpus_per_trial (got 1.5)"),
        (["sweep.tracking_uri=http://127.0.0.1:9"], "is not reachable"),
    ],
)
def test_invalid_configs_fail_before_any_compute(demo_assets, tmp_path, capsys, sets, message):
    args = ["sweep", "--config", DEMO_CONFIG]
    for s in [*demo_assets, f"sweep.out_dir={tmp_path}", *sets]:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "ray_results").exists()


def test_unreachable_ray_address_fails_fast(demo_assets, tmp_path, capsys):
    args = ["sweep", "--config", DEMO_CONFIG, "--address", "127.0.0.1:9"]
    for s in [*demo_assets, f"sweep.out_dir={tmp_path}"]:
        args += ["--set", s]
    started = time.time()
    assert main(args) == 2
    assert "Ray cluster at 127.0.0.1:9 cannot be reached" in capsys.readouterr().err
    assert time.time() - started < 30
