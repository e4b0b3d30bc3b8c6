"""Credentials in URIs never reach what MLflow keeps, prints or pickles; a tracking server that
stops answering ends the sweep in bounded time with one line, and `resume` goes on."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from sweeps.config import load_config
from sweeps.redact import hide, redact, redact_values, unhide
from sweeps.search.mlflow_callback import MlflowTrialCallback
from sweeps.tracking.client import mlflow_client, server_lost, tracking_failure
from sweeps.tracking.runs import (
    close_open_trial_runs,
    config_changes,
    finish_sweep_run,
    start_sweep_run,
)
from sweeps.tracking.store import TrackingError, check_tracking_uri
from tests.helpers import stop_group, sweep_runs

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(ROOT / "sweeps" / "configs" / "demo.yaml")
SECRET = "pw-s3cret"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://user:pw@host/db", "postgresql://user:***@host/db"),
        (
            "postgresql+psycopg2://u:p@ss:w@h:5432/db?x=1",
            "postgresql+psycopg2://u:***@h:5432/db?x=1",
        ),
        ("http://:token@127.0.0.1:5000", "http://:***@127.0.0.1:5000"),
        ("mysql://u@h/db?password=pw&ssl=1", "mysql://u@h/db?password=***&ssl=1"),
        ("a http://u:p@h/x, b redis://v:q@h2 c", "a http://u:***@h/x, b redis://v:***@h2 c"),
        ("http://user@host:5000", "http://user@host:5000"),
        ("sqlite:////tmp/at@sign/optuna.db", "sqlite:////tmp/at@sign/optuna.db"),
        ("s3://bucket/a:b@c", "s3://bucket/a:b@c"),
        ("at 12:30@home", "at 12:30@home"),
    ],
)
def test_redact_hides_passwords_only(text, shown):
    assert redact(text) == shown


def test_redact_values_goes_through_a_config():
    config = {"a": {"b": "http://u:pw@h", "c": [1, ("x://u:pw@h",)]}, "n": 3, "p": None}
    assert redact_values(config) == {
        "a": {"b": "http://u:***@h", "c": [1, ("x://u:***@h",)]},
        "n": 3,
        "p": None,
    }


def test_a_hidden_uri_comes_back_in_the_process_that_hid_it():
    uri = f"postgresql://u:{SECRET}@db.example/optuna"
    assert hide(uri) == "postgresql://u:***@db.example/optuna"
    assert unhide(hide(uri)) == uri
    assert unhide("postgresql://v:***@db.example/optuna") == "postgresql://v:***@db.example/optuna"


def test_credentials_never_reach_mlflow(tmp_path):
    """The config's URIs are logged as params and tags with their passwords hidden, the config
    hash cannot be tried against passwords, and a new password is no config change."""
    storage = f"postgresql://optuna:{SECRET}@db.example:5432/optuna"
    tracking = f"http://alice:{SECRET}@127.0.0.1:9"
    cfg = load_config(
        DEMO_CONFIG, [f"sweep.optuna_storage={storage}", f"sweep.tracking_uri={tracking}"]
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_sweep_run(uri, "creds", "s1", dataclasses.asdict(cfg), {"lr": "log"})
    finish_sweep_run(uri, parent, "FAILED", error=f"OperationalError: {storage} refused")
    run = mlflow_client(uri).get_run(parent)
    kept = json.dumps([run.data.params, run.data.tags])
    assert SECRET not in kept
    assert run.data.params["sweep.optuna_storage"] == redact(storage)
    assert run.data.params["sweep.tracking_uri"] == "http://alice:***@127.0.0.1:9"
    assert redact(storage) in run.data.tags["error"]
    assert config_changes(run, dataclasses.asdict(cfg)) == []
    cfg.sweep.optuna_storage = storage.replace(SECRET, "rotated")
    assert config_changes(run, dataclasses.asdict(cfg)) == []
    cfg.sweep.optuna_storage = storage.replace("db.example", "other.example")
    assert config_changes(run, dataclasses.asdict(cfg)) == ["sweep.optuna_storage"]


def test_the_trial_callback_pickles_no_password():
    """Tune pickles its callbacks into tuner.pkl, in the sweep's storage: the tracking URI goes
    there without its password, and this process gives it back."""
    uri = f"http://alice:{SECRET}@127.0.0.1:9"
    callback = MlflowTrialCallback(uri, "parent-run")
    data = pickle.dumps(callback)
    assert SECRET.encode() not in data
    assert pickle.loads(data).tracking_uri == "http://alice:***@127.0.0.1:9"
    assert mlflow_client(pickle.loads(data).tracking_uri) is mlflow_client(uri)


class _Recorder(http.server.BaseHTTPRequestHandler):
    """MLflow's experiments/search answered, with the Authorization header kept."""

    seen: list[str | None] = []

    def do_POST(self):
        _Recorder.seen.append(self.headers.get("Authorization"))
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"experiments": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_tracking_uri_with_a_password_is_checked_with_it_and_shown_without(monkeypatch):
    """http://user:password@host, which MLflow's client sends as basic auth, passes the check
    before a sweep (it read user:password@host as a host), and no error shows the password."""
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        check_tracking_uri(f"http://alice:{SECRET}@127.0.0.1:{port}")
        assert (
            _Recorder.seen[-1] == "Basic " + base64.b64encode(f"alice:{SECRET}".encode()).decode()
        )
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(TrackingError) as refused:
        check_tracking_uri(f"http://alice:{SECRET}@127.0.0.1:{port}")
    assert "not reachable" in str(refused.value) and SECRET not in str(refused.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_tracking_server_fails_in_seconds_and_is_not_waited_for_again():
    """MLflow's own retries would take four minutes per call (7, backoff factor 2)."""
    uri = f"http://alice:{SECRET}@127.0.0.1:{_closed_port()}"
    client = mlflow_client(uri)
    started = time.monotonic()
    with pytest.raises(MlflowException) as raised:
        client.get_run("0" * 32)
    assert time.monotonic() - started < 30
    error = tracking_failure(uri, raised.value, "logging trial t1's metrics")
    assert "stopped answering while logging trial t1's metrics" in str(error)
    assert "Connection refused" in str(error) and "sae-sweep resume" in str(error)
    assert SECRET not in str(error) and "\n" not in str(error)
    assert server_lost(uri) is error
    # The driver's error path closes the parent: at once, with the error that ended the sweep.
    started = time.monotonic()
    assert close_open_trial_runs(uri, "parent", "interrupted") == 0
    with pytest.raises(TrackingError) as closing:
        finish_sweep_run(uri, "parent", "FAILED", error="TuneError: ...")
    assert closing.value is error and time.monotonic() - started < 1


def test_a_tracking_server_that_takes_calls_but_never_answers_fails_in_bounded_time(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # 10 s by default: 4 tries, 50 s
    with socket.socket() as listener:  # connections queue in its backlog, nothing answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(MlflowException) as raised:
            mlflow_client(uri).get_run("0" * 32)
        assert time.monotonic() - started < 40
    error = tracking_failure(uri, raised.value, "opening trial t1's run")
    assert "no answer within MLFLOW_HTTP_REQUEST_TIMEOUT" in str(error)


def test_an_mlflow_error_of_a_server_that_answers_is_no_lost_server():
    uri = f"http://127.0.0.1:{_closed_port()}"
    error = tracking_failure(uri, MlflowException("INVALID_PARAMETER_VALUE: too long"), "x")
    assert "failed while x: INVALID_PARAMETER_VALUE: too long" in str(error)
    assert server_lost(uri) is None


def _start_server(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:`port` over root's store and artifacts, in a session
    of its own; the same call starts it again, on the same port, after it was killed."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts")]
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with open(root / "server.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
    deadline = time.monotonic() + 900  # seconds quiet, minutes beside busy loops
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    stop_group(proc, timeout=5)
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()}")
            time.sleep(0.3)


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_sweep.py"), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.mark.timeout(2400)  # two server and two driver starts: minutes on a loaded machine
def test_a_tracking_server_killed_mid_sweep_ends_it_with_one_line_and_resume_finishes(
    demo_assets, tmp_path
):
    """SIGKILL the sweep's `mlflow server` once its first trial reports: the driver exits within
    90 s (MLflow's retries took 4 minutes a call) with one error line that says how to go on
    and shows no password; with the server back, `resume` finishes with exact records."""
    root, name, eval_every = tmp_path / "server", "deadserver", 50
    root.mkdir()
    port = _closed_port()
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"  # an open server ignores the credentials
    sets = [*demo_assets, f"sweep.out_dir={tmp_path / 'out'}", f"sweep.name={name}"]
    sets += [f"sweep.tracking_uri={uri}", "tune.num_samples=2", "tune.max_concurrent=1"]
    sets += ["tune.asha=false", "train.epochs=60", f"train.eval_every={eval_every}"]
    args = ["--config", DEMO_CONFIG, *(a for s in sets for a in ("--set", s))]

    def reporting():
        try:
            kids = sweep_runs(uri, name)[2]
        except Exception:  # no experiment yet
            return False
        return any(k.info.status == "RUNNING" and "val/fvu" in k.data.metrics for k in kids)

    server = _start_server(root, port)
    try:
        proc = _cli(["sweep", *args])
        deadline = time.monotonic() + 1200
        while not reporting():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "timed out waiting for a trial's first result"
            time.sleep(0.2)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    killed = time.monotonic()
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0]
        pytest.fail(f"the sweep still ran 300 s after its tracking server died:\n{log}")
    assert time.monotonic() - killed < 90, log
    assert proc.returncode == 2, log
    errors = [line for line in log.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "stopped answering" in errors[0], log
    assert "sae-sweep resume" in errors[0] and "Traceback" not in log
    assert SECRET not in log

    server = _start_server(root, port)
    try:
        resumed = _cli(["resume", *args])
        log, _ = resumed.communicate(timeout=900)
        assert resumed.returncode == 0, log
        assert f"sweep {name}: 2 trials (0 failed)" in log
        client, (parent,), kids = sweep_runs(uri, name)
        histories = {
            k.info.run_id: sorted(
                m.step for m in client.get_metric_history(k.info.run_id, "val/fvu")
            )
            for k in kids
        }
    finally:
        stop_group(server, timeout=5)
    assert parent.info.status == "FINISHED" and parent.data.tags["best.trial_id"]
    assert parent.data.params["sweep.tracking_uri"] == redact(uri)
    assert SECRET not in json.dumps([parent.data.params, parent.data.tags])
    # one run per trial, every evaluation once and none lost across the failure
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    assert len({k.data.tags["trial_id"] for k in kids}) == 2
    for steps in histories.values():
        assert len(steps) == len(set(steps)), steps
        evals = [s for s in steps if s % eval_every == 0]
        assert evals == list(range(eval_every, evals[-1] + 1, eval_every)), steps
    experiment = tmp_path / "out" / "ray_results" / name
    assert not any(SECRET.encode() in p.read_bytes() for p in experiment.glob("*.pkl"))
