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
from sweeps.config import ConfigError, load_config
from sweeps.tune import _on_network_fs
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


def _yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _project_dir(config: dict) -> str:
    """Where `ray up` puts this repository on the nodes."""
    (remote,) = [r for r, local in config["file_mounts"].items() if local == "."]
    return remote


def test_cluster_yamls_share_what_is_not_the_providers():
    aws, local = _yaml("cluster.yaml"), _yaml("cluster-local.yaml")
    # Every node starts alike; only MLflow's artifact store (S3 on AWS, the share on your
    # machines) is the provider's.
    artifacts = "s3://REPLACE_ME-bucket/mlflow", "/mnt/shared/mlflow-artifacts"
    prepare = f"bash {_project_dir(aws)}/cluster/prepare-head.sh"
    assert aws["head_start_ray_commands"][0] == f"{prepare} {artifacts[0]}"
    assert local["head_start_ray_commands"][0] == f"{prepare} {artifacts[1]}"
    assert aws["head_start_ray_commands"][1:] == local["head_start_ray_commands"][1:]
    assert aws["worker_start_ray_commands"] == local["worker_start_ray_commands"]
    for key in ("file_mounts", "setup_commands", "rsync_filter", "rsync_exclude"):
        assert aws[key] == local[key], key
    for key in ("image", "container_name"):
        assert aws["docker"][key] == local["docker"][key], key
    assert set(aws["docker"]["run_options"]) == set(local["docker"]["run_options"])
    # The nodes' Ray is pyproject's, their torch is CI's, as a CUDA build.
    ray_pin = re.search(r'"ray\[[\w,]*\]==([\w.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert aws["docker"]["image"] == f"rayproject/ray:{ray_pin}-py311-gpu"
    torch_pin = re.search(r"torch==([\w.]+)", (ROOT / ".ci" / "run").read_text())[1]
    assert any(
        f"torch=={torch_pin} --index-url https://download.pytorch.org/whl/cu" in cmd
        for cmd in aws["setup_commands"]
    )


def test_aws_cluster_pins_its_ami_group_and_profiles_and_prefers_spot():
    config = _yaml("cluster.yaml")
    types = config["available_node_types"]
    nodes = [t["node_config"] for t in types.values()]
    # Ray's defaults (an old CUDA 11 AMI, a security group open to SSH from anywhere, a role
    # with EC2 and S3 full access) apply to no node.
    assert len({n["ImageId"] for n in nodes}) == 1
    assert all(n["SecurityGroupIds"] for n in nodes)
    head = types[config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Arn"]
    assert head.endswith(":instance-profile/clip-sae-head")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert all(t["min_workers"] == 0 for t in workers.values())
    assert all(
        t["node_config"]["IamInstanceProfile"]["Arn"].endswith(":instance-profile/clip-sae-worker")
        for t in workers.values()
    )
    spot, on_demand = workers["gpu_spot"], workers["gpu_on_demand"]
    assert spot["node_config"].pop("InstanceMarketOptions") == {"MarketType": "spot"}
    assert spot["priority"] > on_demand["priority"]
    assert {**spot, "priority": 0} == {**on_demand, "priority": 0}


def _shipped_files() -> list[Path]:
    return [*CLUSTER_YAMLS, *sorted((ROOT / "cluster").iterdir())]


def _commands(config: dict) -> list[str]:
    kinds = ("initialization", "setup", "head_setup", "worker_setup", "head_start_ray",
             "worker_start_ray")  # fmt: skip
    return [cmd for kind in kinds for cmd in config.get(f"{kind}_commands", [])]


def test_no_port_or_rule_open_to_the_world_and_every_ray_start_authenticates():
    for path in _shipped_files():
        text = path.read_text()
        assert "0.0.0.0" not in text, path  # no bind to every interface, no rule from anywhere
        assert "IpPermissions" not in text, path  # the README's security group has the rules
    mlflow = [
        line
        for line in (ROOT / "cluster" / "prepare-head.sh").read_text().splitlines()
        if "mlflow server --" in line
    ]
    assert mlflow and all("--host 127.0.0.1 " in line for line in mlflow)
    for path in CLUSTER_YAMLS:
        config = yaml.safe_load(path.read_text())
        starts = [cmd for cmd in _commands(config) if re.search(r"\bray start\b", cmd)]
        assert len(starts) == 2, path  # head and workers
        for cmd in starts:
            assert "RAY_AUTH_MODE=token ray start" in cmd, path
            if "--head" in cmd:
                assert "--dashboard-host=127.0.0.1" in cmd, path
        # The token reaches every node through file_mounts, from the user's machine.
        assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token", path


CREDENTIALS = re.compile(
    r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[=:]|-----BEGIN [A-Z ]*PRIVATE KEY|"
    r"^\s*ssh_private_key:|RAY_AUTH_TOKEN=[0-9a-f]{16}",
    re.MULTILINE,
)


def test_no_credentials_in_any_file():
    files = [
        p
        for p in ROOT.rglob("*")
        if p.is_file()
        and p.suffix in {".py", ".yaml", ".yml", ".sh", ".md", ".toml", ".json", ".txt", ""}
        and not any(part.startswith(".") and part != ".ci" for part in p.relative_to(ROOT).parts)
    ]
    assert ROOT / ".ci" / "run" in files and ROOT / "cluster.yaml" in files
    leaks = [str(p) for p in files if CREDENTIALS.search(p.read_text(errors="replace"))]
    assert not leaks


def test_placeholders_are_marked_and_refused_by_name(tmp_path):
    for path in CLUSTER_YAMLS:
        text = path.read_text()
        # Every value to fill in says so; none could pass for a real one.
        assert "REPLACE_ME" in text
        assert not re.search(r"192\.168\.|my-sae-bucket|fs-0123456789abcdef0", text), path
    # The head refuses a placeholder artifact store before it stops a running Ray.
    out = subprocess.run(
        ["bash", str(ROOT / "cluster" / "prepare-head.sh"), "s3://REPLACE_ME-bucket/mlflow"],
        env=os.environ | {"HOME": str(tmp_path)}, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "s3://REPLACE_ME-bucket/mlflow" in out.stderr
    # ... and without the token `ray up` should have copied.
    out = subprocess.run(
        ["bash", str(ROOT / "cluster" / "prepare-head.sh"), str(tmp_path / "artifacts")],
        env=os.environ | {"HOME": str(tmp_path)}, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "~/.ray/auth_token" in out.stderr
    # A sweep config holding one is refused at start-up, naming the field.
    with pytest.raises(ConfigError, match=r"sweep\.storage_path .*REPLACE_ME"):
        load_config(DEMO_CONFIG, ["sweep.storage_path=s3://REPLACE_ME-bucket/sweeps"])


def test_sweeps_on_the_head_find_its_mlflow_server(tmp_path, monkeypatch):
    """`ray submit` and `ray exec` drivers do not inherit `ray start`'s environment: they read
    the address cluster/prepare-head.sh wrote on the head."""
    cfg = load_config(DEMO_CONFIG, [f"sweep.out_dir={tmp_path}"])
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cfg.sweep.resolved_tracking_uri().startswith("sqlite:///")
    (tmp_path / ".clip-sae").mkdir()
    (tmp_path / ".clip-sae" / "tracking_uri").write_text("http://127.0.0.1:5000\n")
    assert cfg.sweep.resolved_tracking_uri() == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:6000")
    assert cfg.sweep.resolved_tracking_uri() == "http://127.0.0.1:6000"
    cfg.sweep.tracking_uri = "http://127.0.0.1:7000"
    assert cfg.sweep.resolved_tracking_uri() == "http://127.0.0.1:7000"


def test_tune_data_auto_follows_where_the_cache_lives(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "overlay / overlay rw 0 0\n"
        "fs-1.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw,vers=4.1 0 0\n"
        "tmpfs /mnt/shared/tmp tmpfs rw 0 0\n"
        "server:/x /mnt/my\\040share nfs rw 0 0\n"
    )
    assert _on_network_fs(Path("/mnt/shared/sae-cache"), mounts)
    assert _on_network_fs(Path("/mnt/shared"), mounts)
    assert _on_network_fs(Path("/mnt/my share/cache"), mounts)
    assert not _on_network_fs(Path("/mnt/shared/tmp/cache"), mounts)
    assert not _on_network_fs(Path("/mnt/sharedx"), mounts)
    assert not _on_network_fs(tmp_path, mounts)
    assert not _on_network_fs(tmp_path)  # this machine's /proc/mounts: a local disk


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

    assert "sweep spread: 4 trials (0 errored)" in report["output"]
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

    assert "sweep nodeloss: 4 trials (0 errored)" in report["output"]
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
    assert "sweep job: 2 trials (0 errored)" in job.stdout
    _, parents, kids = sweep_runs(mlflow_server, "job")
    assert len(parents) == 1 and len(kids) == 2
    assert all(k.info.status == "FINISHED" for k in kids)
