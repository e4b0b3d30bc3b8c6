"""Sweeps end to end: the CLI as a user runs it, MLflow contents, faults and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from sae import TopKSae
from sweeps.cli import DEMO_CONFIG, main
from sweeps.config import ConfigError, load_config
from sweeps.ranking import PickRule
from sweeps.results.best import format_table
from sweeps.search.driver import run_sweep
from tests.helpers import sweep_runs

ROOT = Path(__file__).resolve().parents[1]


def overrides(demo_assets, out: Path, name: str, *extra: str) -> list[str]:
    sets = [*demo_assets, f"sweep.out_dir={out}", f"sweep.name={name}", *extra]
    return [arg for s in sets for arg in ("--set", s)]


def cli(args: list[str], bars: bool = False, **kw) -> subprocess.Popen:
    """The command line in a process of its own, its output through a pipe; with `bars`, its
    progress bars on (the suite turns tqdm's off)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if bars:
        env.pop("TQDM_DISABLE", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_sweep.py"), *args],
        cwd=kw.pop("cwd", ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


#: A plain progress line: the sweep's trials, extraction's and analysis's images (progress.py).
PROGRESS_LINE = (
    r"(trials: \d+ of \d+ done|extract: \d+ img|analyse layer \d+: \d+ of \d+ img) "
    r"in \d+ s(, [\d.]+ img/s)?( \(.*\))?"
)

#: Every line the demo may print, as regular expressions (the whole line).
DEMO_LINES = [
    r"(started |stopped |finished|failed  ) [0-9a-f]{8}  L\d+ k\d+ x\d+ lr\S+ aux\S+.*",
    r"sweep e2e: checking the config, data and stores",
    r"starting a local Ray",
    PROGRESS_LINE,
    r"extract: \d+ images done, \d+ skipped .*|extract: cache hit, no work done: .*",
    r"trial_id +front +status +layer .*",  # the leaderboard's header and rows
    r"[0-9a-f]{8} +\*? +(DONE|STOPPED|FAILED) .*",
    r"pick: [0-9a-f]{8}, .* \(another rule: .*\)",
    r"  its control \(decoder frozen at random, trained alike\): fvu \S+, margin [+-]\S+",
    r"controls: 1 \(tune.controls\), each one trial's training: \d+% of this sweep's training",
    r"  its seed stability \(matched decoder cosine across seeds\): 0\.\d+",
    r"sweep e2e: \d+ trials \(\d+ failed\) in \d+s; results .*",
    r"MLflow UI: mlflow ui --backend-store-uri sqlite:///\S+",
    r"Optuna dashboard: optuna-dashboard sqlite:///\S+",
    r"  then open http://127\.0\.0\.1:\d+\S*",
    r"best SAE: \S+",
    r"demo: \d+ of \d+ image factors have a latent that picks them out .*",
    r"analyze [0-9a-f]{8} \(layer \d+\): .*report .*",
    r"next: sae-sweep best --config \S+  \(or analyze, export\)",
]


class Listeners:
    """Every listening socket of a process and its descendants, polled until `stop`."""

    def __init__(self, pid: int):
        self.names: set[str] = set()
        self.off_loopback: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(pid,), daemon=True)
        self._thread.start()

    def _poll(self, pid: int) -> None:
        import ipaddress

        import psutil

        while not self._done.is_set():
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    conns, name = p.net_connections(kind="inet"), p.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                for c in conns:
                    if c.status != psutil.CONN_LISTEN:
                        continue
                    ip = ipaddress.ip_address(c.laddr.ip)
                    ip = getattr(ip, "ipv4_mapped", None) or ip
                    self.names.add(name)
                    if not ip.is_loopback:
                        self.off_loopback.add(f"{c.laddr.ip}:{c.laddr.port} {name}")
            self._done.wait(0.5)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _table(log: str) -> list[list[str]]:
    """The leaderboard's rows without their trial ids (Tune draws new ones each run)."""
    row = r"[0-9a-f]{8} +(DONE|STOPPED|FAILED) .*"
    return [line.split()[1:] for line in log.splitlines() if re.fullmatch(row, line)]


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
        "tune.stability_seeds=1",
    )
    proc = cli(["demo", *args], bars=True)
    listeners = Listeners(proc.pid)
    log, _ = proc.communicate(timeout=600)
    listeners.stop()
    assert proc.returncode == 0, log
    assert "sweep e2e: 4 trials (0 failed)" in log
    # Its local Ray (GCS, raylet, agents, the trials' workers) listened on loopback only.
    assert {"gcs_server", "raylet"} <= listeners.names, listeners.names
    assert not listeners.off_loopback, listeners.off_loopback
    assert "auxk_alpha" in log and "l0_coefficient" not in log  # no JumpReLU trial: no column
    assert "mlflow ui --backend-store-uri sqlite:///" in log
    assert f"Optuna dashboard: optuna-dashboard sqlite:///{out / 'optuna.db'}" in log
    # The console: a line per trial event and the leaderboard, no Ray tables or INFO logs.
    # Through a pipe, as in a log file or `ray job logs`: no bar redrawn, every line plain.
    assert "\r" not in log
    lines = log.splitlines()
    assert len(lines) < 50, log
    # The first lines come before Ray's start, not after 20 s of silence.
    assert lines[:2] == ["sweep e2e: checking the config, data and stores", "starting a local Ray"]
    unknown = [line for line in lines if not any(re.fullmatch(p, line) for p in DEMO_LINES)]
    assert not unknown, log
    progress = [line for line in lines if re.fullmatch(PROGRESS_LINE, line)]
    assert len(progress) <= 6, log  # one at most every 30 s of a run of well under 3 minutes
    assert sum(line.startswith("started ") for line in lines) == 4, log
    assert sum(line.startswith(("finished ", "stopped ")) for line in lines) == 4, log
    assert any(line.split()[:3] == ["trial_id", "front", "status"] for line in lines)
    # the pick, by its rule, with its control's margin (the control is no trial of its own)
    pick = next(line for line in lines if line.startswith("pick: "))
    assert "val/never_fired_frac <= " in pick or "the least dead one" in pick, log
    assert sum(line.startswith("  its control (decoder frozen") for line in lines) == 1, log
    noise_lines = ("Trial status", "Configuration for experiment", "INFO", "TensorBoard")
    for noise in (*noise_lines, "snapshotting"):
        assert noise not in log
    assert "image factors have a latent that picks them out" in log
    assert "best SAE: " in log and "next: sae-sweep best --config " in log
    assert "analyze " in log and "report.html" in log

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
    assert best_run.data.tags["trial_id"] == pick.split()[1].rstrip(",")
    assert parent.data.tags["best.rule"] in pick
    # the pick's control: its metrics on the pick's run, tagged; the margin is their gap
    assert best_run.data.tags["control"] == "frozen_random_decoder"
    control = best_run.data.metrics
    assert control["control_margin_fvu"] == pytest.approx(control["control_fvu"] - control["fvu"])
    assert {"decoder_max_cos", "density_never", "shrinkage"} <= set(control)
    # retrained with another seed: its decoder matched to the pick's, row for row
    assert 0.1 < control["stability_decoder_mcc"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(best_run.info.run_id, "sae")}
    assert {"sae/cfg.json", "sae/sae.safetensors", "sae/firing_frequency.png"} <= artifacts

    first = log

    # `best` on the config the demo saved, from another directory, as its last line says.
    saved = out / "config.yaml"
    assert f"next: sae-sweep best --config {saved}" in log
    best = cli(["best", "--config", str(saved)], cwd=tmp_path.parent)
    log, _ = best.communicate(timeout=120)
    assert best.returncode == 0, log
    sae_dir = next(line.split(": ", 1)[1] for line in log.splitlines() if "best SAE:" in line)
    sae = TopKSae.load(sae_dir)
    assert sae.cfg.k == int(best_run.data.params["k"])
    assert f"runs:/{best_run.info.run_id}/sae" in log

    # One sweep, one name: a rerun is refused, a resume with another config too.
    again = cli(["sweep", "--config", DEMO_CONFIG, *args])
    log, _ = again.communicate(timeout=120)
    assert again.returncode == 2 and "a sweep named 'e2e' exists" in log, log
    assert "sae-sweep resume" in log and "--overwrite" in log
    changed = cli(["resume", "--config", DEMO_CONFIG, *args, "--set", "tune.num_samples=12"])
    log, _ = changed.communicate(timeout=120)
    assert changed.returncode == 2 and "differs" in log and "tune.num_samples" in log, log
    smaller = [*args, "--set", "tune.num_samples=2", "--set", "train.epochs=2"]
    over = cli(["sweep", "--overwrite", "--config", DEMO_CONFIG, *smaller])
    log, _ = over.communicate(timeout=600)
    assert over.returncode == 0, log
    assert "--overwrite: deleting sweep e2e's Tune state and SAEs in" in log
    assert "sweep e2e: 2 trials (0 failed)" in log
    _, parents, kids = sweep_runs(f"sqlite:///{out / 'mlflow.db'}", "e2e")
    assert len(parents) == 1 and len(kids) == 2
    assert parents[0].data.params["tune.num_samples"] == "2"
    assert parents[0].data.tags["best.run_id"] in {k.info.run_id for k in kids}

    # The same seed again: the same trials, results and best (two trials at once once let
    # timing pick another best); the last demo's records are named before they are deleted.
    again = cli(["demo", *args])
    log2, _ = again.communicate(timeout=600)
    assert again.returncode == 0, log2
    said = [line for line in log2.splitlines() if line.startswith("demo: replacing the last")]
    assert len(said) == 3 and "Tune state and SAEs" in said[0], log2
    assert log2.index(said[-1]) < log2.index("started ")
    assert _table(log2) == _table(first), log2


def test_trial_workers_load_no_plotting_library():
    """A trial leaves its plot's data beside its SAE; the driver draws (see test_tracking)."""
    code = "import sys, sweeps.search.trial; print([m for m in sys.modules if 'matplotlib' in m])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_trial_that_cannot_run_fails_once_with_its_reason(ray_session, demo_assets, tmp_path):
    # The CLI refuses device=cuda without GPUs before Ray starts; run_sweep meets it in the trial.
    sets = [*demo_assets, f"sweep.out_dir={tmp_path}", "sweep.name=nocuda", "train.device=cuda"]
    sets += ["tune.num_samples=1", "tune.max_failures=3", "tune.asha=false", "tune.verbose=0"]
    result = run_sweep(load_config(DEMO_CONFIG, sets))
    (row,) = result.rows
    assert row.status == "FAILED" and "CUDA is not available" in row.error
    assert row.error.startswith(f"layer {row.layer}: ")
    assert "CUDA is not available" in format_table(result.rows, PickRule({"val/fvu": "min"}))
    _, (parent,), (kid,) = sweep_runs(result.tracking_uri, "nocuda")
    assert kid.info.status == "FAILED" and "CUDA is not available" in kid.data.tags["error"]
    assert "num_failures" not in kid.data.tags  # failed once, not retried
    assert parent.info.status == "FAILED"


def test_a_driver_error_closes_the_parent_run_failed(ray_session, demo_assets, tmp_path):
    sets = [*demo_assets, f"sweep.out_dir={tmp_path}", "sweep.name=drivererr"]
    sets += ["train.val_fraction=0.0001", "tune.verbose=0"]
    with pytest.raises(ValueError, match="leaves"):
        run_sweep(load_config(DEMO_CONFIG, sets))
    _, (parent,), kids = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "drivererr")
    assert parent.info.status == "FAILED" and "leaves" in parent.data.tags["error"]
    assert not kids


def test_resources_no_node_can_supply_fail_at_once(demo_assets, tmp_path):
    proc = cli(
        [
            "sweep",
            "--config",
            DEMO_CONFIG,
            *overrides(demo_assets, tmp_path, "toobig", "tune.gpus_per_trial=1"),
        ]
    )
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, log
    assert "a trial needs 1 CPU and 1 GPU" in log and "largest node" in log
    assert "Traceback" not in log


def test_asha_stops_on_the_objective(demo_assets):
    from sweeps.search.driver import _scheduler

    sets = ["tune.objectives=[dead_frac:min]", "tune.asha=true"]
    cfg = load_config(DEMO_CONFIG, [*demo_assets, *sets])
    scheduler = _scheduler(cfg, max_steps=1000)
    assert (scheduler._metric, scheduler._mode) == ("dead_frac", "min")


def terminated_trials(exp_dir: Path) -> set[str]:
    """Trials that Tune's saved experiment state records as finished."""
    # Named by the driver session's start: a resumed sweep writes a newer file.
    states = sorted(exp_dir.glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]]
    except (json.JSONDecodeError, KeyError):
        return set()  # caught mid-write
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


def _final_sae(exp_dir: Path, trial_id: str) -> Path:
    (weights,) = (exp_dir / "sae" / trial_id).glob("layers.*/sae.safetensors")
    return weights


def assert_records_exact(uri: str, name: str, exp_dir: Path, eval_every: int) -> None:
    """The invariants a sweep's records keep through any kill and resume."""
    client, parents, kids = sweep_runs(uri, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    tune_trials = terminated_trials(exp_dir)
    live = [k for k in kids if k.info.status != "KILLED"]
    # exactly one run per Tune trial; runs of trials Tune lost are KILLED and say why
    assert sorted(k.data.tags["trial_id"] for k in live) == sorted(tune_trials)
    assert all(k.info.status in ("FINISHED", "FAILED") for k in live)
    for k in kids:
        if k.info.status == "KILLED":
            assert k.data.tags["trial_id"] not in tune_trials and k.data.tags["killed_reason"]
    # Optuna proposed no configuration twice
    configs = [tuple(sorted(k.data.params.items())) for k in kids]
    assert len(configs) == len(set(configs))
    for k in live:  # every reported point exactly once, none lost
        for key in ("val/fvu", "train/fvu", "dead_frac"):
            steps = [m.step for m in client.get_metric_history(k.info.run_id, key)]
            assert len(steps) == len(set(steps)), (k.data.tags["trial_id"], key, steps)
        steps = sorted(m.step for m in client.get_metric_history(k.info.run_id, "val/fvu"))
        evals = [s for s in steps if s % eval_every == 0]
        assert evals == list(range(eval_every, evals[-1] + 1, eval_every)), steps


def _wait(proc: subprocess.Popen, condition, what: str, timeout: float = 900) -> bool:
    """Poll `condition` until it holds (True), or until the driver exits (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return True


def _kids(uri: str, name: str) -> list:
    try:
        return sweep_runs(uri, name)[2]
    except Exception:  # the store or experiment is not there yet
        return []


@pytest.mark.timeout(1800)  # five driver starts; minutes on a loaded 2-core machine
def test_killed_driver_at_any_moment_then_resume_keeps_records_exact(demo_assets, tmp_path):
    """SIGKILL the driver during extraction, mid-trial (2 concurrent, ASHA on), right after a
    trial finishes and during the final summary; `resume` after each."""
    out, name, eval_every = tmp_path / "out", "kill", 40
    cache = tmp_path / "cache"  # its own cache, so that extraction runs
    args = overrides(
        demo_assets,
        out,
        name,
        f"extract.cache_dir={cache}",
        "tune.num_samples=6",
        "tune.max_concurrent=2",
        "tune.asha=true",
        "tune.objectives=[val/fvu:min]",  # ASHA: one objective
        "tune.grace_period=80",
        "train.epochs=8",
        f"train.eval_every={eval_every}",
        "tune.checkpoint_interval_s=0",  # checkpoint at every eval: resumes start from them
    )
    uri, exp_dir = f"sqlite:///{out / 'mlflow.db'}", out / "ray_results" / name

    def running_with_metrics():
        return any(
            k.info.status == "RUNNING" and "val/fvu" in k.data.metrics for k in _kids(uri, name)
        )

    def finished():
        return {k.data.tags["trial_id"] for k in _kids(uri, name) if k.info.status == "FINISHED"}

    moments = [
        ("during extraction", lambda: any(cache.rglob("part-*.parquet"))),
        ("mid-trial", running_with_metrics),
        ("after a trial finished", lambda: len(finished()) > len(done_before)),
        ("during the final summary", lambda: len(finished()) >= 6),
    ]
    command, killed = "sweep", []
    mtimes: dict[str, int] = {}
    for what, condition in moments:
        done_before = finished()
        proc = cli([command, "--config", DEMO_CONFIG, *args])
        if _wait(proc, condition, what):
            os.killpg(proc.pid, signal.SIGKILL)
            killed.append(what)
        log, _ = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), log
        command = "resume"
        for trial_id in finished():  # SAEs of finished trials must not be written again
            if list((exp_dir / "sae" / trial_id).glob("layers.*")):  # ASHA-stopped: none
                mtimes.setdefault(trial_id, _final_sae(exp_dir, trial_id).stat().st_mtime_ns)
    assert killed[:3] == [m[0] for m in moments[:3]], killed

    resumed = cli(["resume", "--config", DEMO_CONFIG, *args])
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    assert f"sweep {name}: 6 trials (0 failed)" in log
    assert "Traceback" not in log
    assert_records_exact(uri, name, exp_dir, eval_every)
    assert not list(exp_dir.glob("trial_state/*/latest"))  # every trial ended: states deleted
    for trial_id, mtime in mtimes.items():
        assert _final_sae(exp_dir, trial_id).stat().st_mtime_ns == mtime


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
    """Once a trial has saved its state, SIGKILL the worker process that runs it."""
    deadline = time.time() + 900
    while time.time() < deadline:
        # A trial saves its state after Tune took the report of that step.
        if list(exp_dir.glob("trial_state/*/latest")):
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
            "tune.checkpoint_interval_s=0",
            "tune.verbose=0",
        ],
    )
    exp_dir = out / "ray_results" / "killw"
    killed: list = []
    killer = threading.Thread(target=_kill_first_trial_worker, args=(exp_dir, killed))
    killer.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_sweep(cfg)
    killer.join()
    assert killed, "no trial worker was killed"
    # The retry's reports reach Optuna at their SAE steps (multiples of eval_every), not at
    # Tune's iterations counted from 1 again. One step can repeat: a kill after a report and
    # before the state save it precedes.
    repeats = [str(w.message) for w in caught if "already reported" in str(w.message)]
    steps = [int(re.search(r"step=(\d+)", text)[1]) for text in repeats]
    assert len(steps) <= 1 and all(s > 0 and s % 20 == 0 for s in steps), repeats
    _, _, (kid,) = sweep_runs(result.tracking_uri, "killw")
    assert kid.data.tags["num_failures"] == "1"
    # One run, every point once, and the retry went on from the saved state: Tune's own
    # record of the trial's results holds the first eval once (step 0 again would repeat it).
    assert_records_exact(result.tracking_uri, "killw", exp_dir, eval_every=20)
    (results,) = exp_dir.glob("run_trial_*/result.json")
    steps = [json.loads(line)["step"] for line in results.read_text().splitlines()]
    assert steps.count(20) == 1, steps
    assert not list(exp_dir.glob("trial_state/*"))  # deleted once the trial finished


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
            "train.eval_every=20",
            "tune.checkpoint_interval_s=3600",
            "tune.verbose=0",
            "tune.objectives=[val/fvu:min, val/l0:min]",
            "tune.max_dead_frac=1",  # the plain front: every trial feasible
            "tune.controls=0",
            "search.activation=[topk, batchtopk]",
            "search.points_to_evaluate=[{activation: batchtopk}]",
        ],
    )
    result = run_sweep(cfg)
    assert "batchtopk" in {r.params.activation for r in result.rows}
    front = [(t["metrics"]["val/fvu"], t["metrics"]["val/l0"]) for t in result.best]
    assert front
    for a in front:  # no point of the front dominates another
        assert not any(b != a and b[0] <= a[0] and b[1] <= a[1] for b in front)
    others = [(r.metrics["val/fvu"], r.metrics["val/l0"]) for r in result.rows]
    for point in others:  # and every trial is dominated by or on the front
        assert any(f[0] <= point[0] and f[1] <= point[1] for f in front)
    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.parent_run_id).data.tags["pareto.size"] == str(len(front))
    # About ten evals per trial and no state saved: the interval spaces the saves out.
    exp_dir = tmp_path / "ray_results" / "pareto"
    finals = [json.loads(p.read_text()) for p in exp_dir.glob("sae/*/layers.*/metrics.json")]
    assert len(finals) == 5 and all(m["states_saved"] == 0 for m in finals), finals
    assert not list(exp_dir.glob("run_trial_*/checkpoint_*"))  # Tune holds no checkpoints


def test_diverged_trials_fail_once_with_their_step_and_the_sweep_goes_on(
    ray_session, demo_assets, tmp_path
):
    """A loss that becomes NaN (lr 1e30) and an FVU that explodes while the loss stays finite
    (lr 1e5: once FINISHED with val/fvu 5e12 and reported as the best) both end FAILED with
    `diverged at/by step N`, are not retried (the same seed diverges again) and are never
    the best."""
    cfg = load_config(
        DEMO_CONFIG,
        [
            *demo_assets,
            f"sweep.out_dir={tmp_path}",
            "sweep.name=diverge",
            "tune.data=cache",  # trials read the layer from the cache, as on several nodes
            "tune.num_samples=3",
            "tune.asha=false",
            "tune.max_failures=2",
            "train.epochs=2",
            "tune.verbose=0",
            "search.lr=[0.001, 1.0e+5, 1.0e+30]",
            "search.k=8",
            "search.expansion_factor=2",
            "search.layer=2",
            "search.points_to_evaluate=[{lr: 1.0e+30}, {lr: 1.0e+5}, {lr: 0.001}]",
        ],
    )
    result = run_sweep(cfg)
    status = {r.params.lr: r for r in result.rows}
    assert status[0.001].status == "DONE"
    assert result.rows[0].params.lr == 0.001 and result.best[0]["config"]["lr"] == 0.001
    assert status[1e30].status == "FAILED"
    assert "diverged at step" in status[1e30].error
    assert status[1e5].status == "FAILED"
    assert re.search(r"diverged by step \d+: training FVU", status[1e5].error)
    _, _, kids = sweep_runs(result.tracking_uri, "diverge")
    failed = [k for k in kids if k.info.status == "FAILED"]
    assert len(kids) == 3 and len(failed) == 2
    assert all("diverged" in k.data.tags["error"] for k in failed)
    assert not any("num_failures" in k.data.tags for k in kids)  # none retried
    # No trial raised (Tune writes error.txt for each failure it retries)
    assert list((tmp_path / "ray_results" / "diverge").glob("run_trial_*"))
    assert not list((tmp_path / "ray_results" / "diverge").glob("run_trial_*/error.txt"))


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
        (["search.activation=relu"], "search.activation: use one or a list of topk, batchtopk"),
        (["tune.gpus_per_trial=1.5"], "tune.gpus_per_trial (got 1.5)"),
        (["sweep.tracking_uri=http://127.0.0.1:9"], "is not reachable"),
        # types come from the dataclass annotations, for every field
        (["tune.num_samples=eight"], "tune.num_samples: expected an integer, got 'eight'"),
        (["train.epochs=ten"], "train.epochs: expected a number, got 'ten'"),
        (["tune.asha=maybe"], "tune.asha: expected true or false, got 'maybe'"),
        (["train.batch_size=32.5"], "train.batch_size: expected an integer, got 32.5"),
        (["extract.token_mode=both"], "extract.token_mode: expected one of cls, all"),
        (["extract.layers=[2, x]"], "extract.layers[1]: expected an integer, got 'x'"),
        (["sae.normalize_decoder=1"], "sae.normalize_decoder: expected true or false, got 1"),
        (["search.lr={low: 1e-4, high: 1e-2, step: 1e-4}"], "takes step or log, not both"),
        (["search.k={low: 4, high: 16, step: -3}"], "search.k.step: use a number > 0"),
        (["tune.objectives=[lr:max]"], "tune.objectives (got 'lr:max'): give metric:mode"),
        (["tune.objectives=[val/fvu:max]"], "tune.objectives (got 'val/fvu:max')"),
        (["data.path=/nonexistent/images"], "data.path: '/nonexistent/images' does not exist"),
        (["train.val_fraction=0"], "train.val_fraction=0 leaves no validation rows"),
        (["train.device=cuda"], "train.device=cuda but tune.gpus_per_trial=0"),
        (["train.epochs=0"], "train.epochs must be > 0 (got 0)"),
        (["train.epochs=-1", "train.steps=100"], "train.epochs must be > 0 (got -1)"),
        (["tune.show_top=0"], "tune.show_top must be > 0 (got 0)"),
        (["tune.show_top=-1"], "tune.show_top must be > 0 (got -1)"),
        (["train.diverged_fvu=0.5"], "train.diverged_fvu must be > 1"),
    ],
)
def test_invalid_configs_fail_before_any_compute(demo_assets, tmp_path, capsys, sets, message):
    args = ["sweep", "--config", DEMO_CONFIG]
    for s in [*demo_assets, f"sweep.out_dir={tmp_path}", *sets]:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "ray_results").exists()


def test_numeric_strings_are_numbers_and_yaml_errors_name_the_place(demo_assets, tmp_path):
    # YAML 1.1 reads 1e-3 (no dot) as a string; where a number is expected it is one.
    cfg = load_config(
        DEMO_CONFIG,
        [*demo_assets, "search.points_to_evaluate=[{lr: 5e-3, k: 8}]", "search.auxk_alpha=1e-2"],
    )
    assert cfg.search.points_to_evaluate == [{"lr": "5e-3", "k": 8}]
    assert cfg.search.auxk_alpha == "1e-2"
    from sweeps.space import SearchSpace

    space = SearchSpace.from_config(cfg.search)
    assert space.optuna_points()[0]["lr"] == 0.005 and space.dims["auxk_alpha"].values == (0.01,)
    for text, where in [
        ("search:\n  k: [4, 8\ntune: {}\n", ":3:5: invalid YAML"),
        ("search:\n\tk: 4\n", ":2:1: invalid YAML"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=f"{bad}{where}"):
            load_config(bad)
    bad.write_text("search:\n\tk: 4\n")
    with pytest.raises(ConfigError, match="YAML forbids tabs"):
        load_config(bad)


def test_a_cache_hit_needs_no_ray(demo_assets, tmp_path):
    args = ["extract", "--config", DEMO_CONFIG, *overrides(demo_assets, tmp_path, "hit")]
    first = cli(args)  # builds the cache, or finds it
    log, _ = first.communicate(timeout=600)
    assert first.returncode == 0, log
    # An address nothing listens on: reaching for Ray would fail, a cache hit must not.
    again = cli([*args, "--address", "127.0.0.1:9"])
    log, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "cache hit, no work done" in log, log


def test_unreachable_ray_address_fails_fast(demo_assets, tmp_path, capsys):
    args = ["sweep", "--config", DEMO_CONFIG, "--address", "127.0.0.1:9"]
    for s in [*demo_assets, f"sweep.out_dir={tmp_path}"]:
        args += ["--set", s]
    started = time.time()
    assert main(args) == 2
    assert "Ray cluster at 127.0.0.1:9 cannot be reached" in capsys.readouterr().err
    assert time.time() - started < 30


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_sweep_is_killed_not_finished_and_resume_goes_on(sig, demo_assets, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM mid-trial: the
    trials and the sweep end KILLED with no best trial chosen, the console says how to resume,
    the exit code is 128 + the signal, and `resume` finishes the sweep."""
    out, name = tmp_path / "out", f"interrupt-{sig.name.lower()}"
    # one objective: the Optuna copy keeps each trial's curve, which resume must go on
    sets = ["tune.num_samples=3", "tune.max_concurrent=1", "train.epochs=30"]
    args = overrides(demo_assets, out, name, *sets, "tune.objectives=[val/fvu:min]")
    uri = f"sqlite:///{out / 'mlflow.db'}"

    def mid_trial():
        return any(
            k.info.status == "RUNNING" and "val/fvu" in k.data.metrics for k in _kids(uri, name)
        )

    proc = cli(["sweep", "--config", DEMO_CONFIG, *args])
    assert _wait(proc, mid_trial, "a trial's first evaluation"), proc.communicate()[0]
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, log
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "sae-sweep resume" in lines[0] and name in lines[0], log
    _, (parent,), kids = sweep_runs(uri, name)
    assert parent.info.status == "KILLED"
    assert not any(t.startswith("best.") for t in parent.data.tags), parent.data.tags
    assert kids and not any(k.info.status == "RUNNING" for k in kids)
    unfinished = [k for k in kids if k.info.status == "KILLED"]
    assert unfinished and all(sig.name in k.data.tags["killed_reason"] for k in unfinished)
    # The Optuna study's copy was written while the sweep ran: the trial and its evaluation.
    copied = optuna_trials(out / "optuna.db", name)
    assert {k.data.tags["trial_id"] for k in unfinished} <= set(copied)
    assert any(t.state.name == "RUNNING" and t.intermediate_values for t in copied.values())

    resumed = cli(["resume", "--config", DEMO_CONFIG, *args])
    log, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, log
    assert f"sweep {name}: 3 trials (0 failed)" in log
    assert "WARNING" not in log  # Tune's "Failed to fetch metrics" for unreported trials
    assert f"Optuna dashboard: optuna-dashboard sqlite:///{out / 'optuna.db'}" in log
    client, (parent,), kids = sweep_runs(uri, name)
    assert parent.info.status == "FINISHED" and parent.data.tags["best.trial_id"]
    # ... and after resume it holds what MLflow holds: each trial, its curve, its value.
    copied = optuna_trials(out / "optuna.db", name)
    assert sorted(copied) == sorted(k.data.tags["trial_id"] for k in kids)
    for kid in kids:
        trial = copied[kid.data.tags["trial_id"]]
        assert trial.state.name == "COMPLETE"
        assert trial.value == pytest.approx(kid.data.metrics["fvu"])
        history = client.get_metric_history(kid.info.run_id, "val/fvu")
        assert trial.intermediate_values == pytest.approx({m.step: m.value for m in history})


def optuna_trials(db: Path, study: str) -> dict:
    """The trials of a sweep's Optuna study copy, by their Tune trial id."""
    import optuna

    loaded = optuna.load_study(study_name=study, storage=f"sqlite:///{db}")
    return {t.user_attrs["trial_id"]: t for t in loaded.trials}


@pytest.mark.timeout(900)
def test_a_second_driver_of_a_running_sweep_is_refused_at_once(demo_assets, tmp_path, capsys):
    """Two `sweep`s of one name once both ran into one Tune directory and two parent runs:
    the second is refused at its name check, before Ray, naming the first's pid, and even
    --overwrite deletes nothing of the running sweep."""
    out, name = tmp_path / "out", "race"
    args = overrides(demo_assets, out, name, "tune.num_samples=2", "train.epochs=20")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    first = cli(["sweep", "--config", DEMO_CONFIG, *args])
    lock = out / "ray_results" / f".{name}.lock"
    assert _wait(first, lambda: lock.exists() and "pid" in lock.read_text(), "the first's lock")
    for command in (["sweep", "--overwrite"], ["resume"], ["demo"]):
        assert main([command[0], "--config", DEMO_CONFIG, *args, *command[1:]]) == 2
        err = capsys.readouterr().err
        assert f"sweep {name!r} is running" in err and f"pid {first.pid}" in err, err
    log, _ = first.communicate(timeout=600)
    assert first.returncode == 0, log
    _, parents, kids = sweep_runs(uri, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(kids) == 2
    # the lock goes with its holder: the next sweep of the name is told it exists, no more
    assert main(["sweep", "--config", DEMO_CONFIG, *args]) == 2
    assert "exists" in capsys.readouterr().err
