"""The service on a cluster: cluster YAMLs against Ray's own schema, and sweeps on a simulated
cluster (tests/cluster_sweep.py) whose worker nodes carry fake GPUs.

Extraction's actor pool spreading over two GPU workers is tested in test_extract.py
(test_two_simulated_gpu_nodes_each_run_an_actor). What a simulation cannot show: shared storage
here is this machine's disk, the "GPUs" are CPU cores, and no node is a separate machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from sae import TopKSae
from sweeps.best import best_trials
from sweeps.cli import DEMO_CONFIG
from sweeps.config import load_config
from tests.helpers import sweep_runs

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAMLS = sorted(ROOT.glob("cluster*.yaml"))
# Ray resolves a 127.0.0.1 cluster address to this machine's network address unless told that
# the cluster is this machine alone: the simulated nodes stay on loopback.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_own_validation(path):
    # What `ray up` does before it touches a cloud: fill in the provider's defaults, validate.
    validate_config(prepare_config(yaml.safe_load(path.read_text())))


def test_aws_cluster_pins_ray_and_opens_no_port():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    ray_pin = re.search(r'"ray\[[\w,]*\]==([\w.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert config["docker"]["image"] == f"rayproject/ray:{ray_pin}-py311-gpu"
    workers = [t for name, t in config["available_node_types"].items() if "head" not in name]
    assert workers and all(t["min_workers"] == 0 for t in workers)
    text = (ROOT / "cluster.yaml").read_text()
    assert "mlflow server" in text and "--artifacts-destination s3://" in text
    # Ray's default security group opens SSH alone; no rule here may widen it, no key may hide.
    assert "SecurityGroupIds" not in text and "IpPermissions" not in text
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|ssh_private_key:", text)


@pytest.fixture(scope="module")
def demo_sets(demo_assets):
    return [
        *demo_assets,
        "tune.asha=false",
        "tune.verbose=0",
        "tune.gpus_per_trial=0.5",
        "train.device=cpu",  # the GPUs are fake
    ]


def run_cluster_sweep(sets: list[str], exp_dir: Path, remove_node: bool, env=None) -> dict:
    report = exp_dir.parent / "report.json"
    spec = {
        "args": ["--config", DEMO_CONFIG, *(arg for s in sets for arg in ("--set", s))],
        "exp_dir": str(exp_dir),
        "remove_node": remove_node,
        "report": str(report),
    }
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cluster_sweep.py"), json.dumps(spec)],
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", **LOOPBACK, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["returncode"] == 0, result["output"]
    return result


def test_fractional_gpu_trials_spread_over_both_workers(demo_sets, mlflow_server, tmp_path):
    # Storage as a URI goes through pyarrow.fs, as s3:// does on AWS.
    sets = [
        *demo_sets,
        f"sweep.storage_path=file://{tmp_path / 'shared'}",
        f"sweep.out_dir={tmp_path}",
        "sweep.name=spread",
        "tune.num_samples=4",
        "tune.max_concurrent=4",
        "train.epochs=4",
    ]
    # The tracking URI comes from the environment, as cluster.yaml sets it on every node.
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    report = run_cluster_sweep(sets, tmp_path / "shared" / "spread", False, env)

    assert "sweep spread: 4 trials (0 failed)" in report["output"]
    nodes = {node for steps in report["reports"].values() for node, _ in steps}
    assert nodes == set(report["workers"])  # two trials per worker's GPU, none on the head

    client, parents, kids = sweep_runs(mlflow_server, "spread")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(k.data.tags["trial_id"] for k in kids) == sorted(report["reports"])
    for kid in kids:
        assert kid.info.status == "FINISHED" and "fvu" in kid.data.metrics
        artifacts = {a.path for a in client.list_artifacts(kid.info.run_id, "sae")}
        assert {"sae/cfg.json", "sae/sae.safetensors"} <= artifacts

    cfg = load_config(DEMO_CONFIG, [*sets, f"sweep.tracking_uri={mlflow_server}"])
    best = best_trials(cfg, top=10)
    assert len(best) == 4
    for row in best:
        assert row["sae_dir"].startswith("file://")
        TopKSae.load(row["sae_dir"].removeprefix("file://"))


EVAL_EVERY = 10


def test_removed_worker_node_trials_resume_elsewhere(demo_sets, mlflow_server, tmp_path):
    sets = [
        *demo_sets,
        f"sweep.out_dir={tmp_path}",
        f"sweep.tracking_uri={mlflow_server}",
        "sweep.name=nodeloss",
        "tune.num_samples=4",
        "tune.max_concurrent=4",
        "train.epochs=15",
        f"train.eval_every={EVAL_EVERY}",
    ]
    report = run_cluster_sweep(sets, tmp_path / "ray_results" / "nodeloss", True)

    assert "sweep nodeloss: 4 trials (0 failed)" in report["output"]
    (removed,) = report["removed"]
    (survivor,) = set(report["workers"]) - {removed}
    moved = [t for t, steps in report["reports"].items() if steps[0][0] == removed]
    assert moved
    for trial in moved:
        steps = report["reports"][trial]
        assert steps[-1][0] == survivor
        before = [step for node, step in steps if node == removed]
        after = [step for node, step in steps if node == survivor]
        assert after == sorted(set(after))
        # From its last checkpoint, not from step 0: only the steps after the checkpoint
        # that Tune had registered when the node died (one report interval, or two when a
        # result was in flight) are trained again.
        assert after[0] >= before[-1] - 2 * EVAL_EVERY

    _, parents, kids = sweep_runs(mlflow_server, "nodeloss")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(k.data.tags["trial_id"] for k in kids) == sorted(report["reports"])
    assert all(k.info.status == "FINISHED" and "fvu" in k.data.metrics for k in kids)
    # A trial placed on the node before its first result also failed once, and moved.
    assert set(moved) <= {k.data.tags["trial_id"] for k in kids if "num_failures" in k.data.tags}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answered (401 until a token is sent)
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.5)


def test_sweep_submitted_as_a_ray_job(demo_assets, mlflow_server, tmp_path):
    """`ray job submit --working-dir .` against a head started with `ray start`, as on a
    cluster (README, "Run on a cluster"): the job's driver finds MLflow from the environment."""
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics, client = (
        _free_port() for _ in range(7)
    )
    # Ray 2.60 guards the job API with a token; the head and the client share one here.
    env = (
        os.environ
        | LOOPBACK
        | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "MLFLOW_TRACKING_URI": mlflow_server,
        }
    )
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         # Ports of its own: the session's local Ray already holds the default agent ports.
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         f"--ray-client-server-port={client}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_http(f"http://127.0.0.1:{dashboard}/api/version", head)
        sets = [*demo_assets, f"sweep.out_dir={tmp_path}", "sweep.name=job",
                "tune.num_samples=2", "train.epochs=4", "tune.verbose=0"]  # fmt: skip
        submit = ["ray", "job", "submit", f"--address=http://127.0.0.1:{dashboard}",
                  f"--working-dir={ROOT}", "--", "python", "run_sweep.py", "sweep",
                  "--config", "sweeps/configs/demo.yaml",
                  *(a for s in sets for a in ("--set", s))]  # fmt: skip
        # The head's job agent starts a little after its dashboard: Ray asks to retry then.
        for _ in range(15):
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in job.stderr:
                break
            time.sleep(2)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its cluster on exit
        head.wait(timeout=60)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "sweep job: 2 trials (0 failed)" in job.stdout
    _, parents, kids = sweep_runs(mlflow_server, "job")
    assert len(parents) == 1 and len(kids) == 2
    assert all(k.info.status == "FINISHED" for k in kids)
