"""The service on a cluster: the cluster YAMLs (Ray's own schema, what they share, security,
placeholders), a real `ray up`/`ray down` of cluster-local.yaml's head on a loopback node over
SSH, GPU workers autoscaled from zero, and sweeps on a simulated cluster (tests/cluster_sweep.py)
whose worker nodes carry fake GPUs.

Extraction's actor pool spreading over two GPU workers is tested in test_extract.py
(test_two_simulated_gpu_nodes_each_run_an_actor). What one machine cannot show: shared storage
here is this machine's disk, the "GPUs" are CPU cores, no node is a separate machine, and AWS
(AMI, security group, EFS, IAM, spot, Docker) is not there."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from sae import TopKSae
from sweeps.cli import DEMO_CONFIG
from sweeps.config import ConfigError, load_config
from sweeps.results.best import best_trials
from sweeps.search.data import on_network_fs
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


def test_instance_profiles_are_scoped():
    """The policies README attaches to clip-sae-head and clip-sae-worker: the EC2 actions Ray's
    autoscaler makes, passing the worker role alone, S3 under the bucket's two prefixes."""

    def statements(name: str) -> list[dict]:
        return json.loads((ROOT / "cluster" / f"iam-{name}-policy.json").read_text())["Statement"]

    def listed(value) -> list:
        return value if isinstance(value, list) else [value]

    bucket = "arn:aws:s3:::REPLACE_ME-bucket"
    head, worker = statements("head"), statements("worker")
    actions = {a for s in head for a in listed(s["Action"])}
    assert {a for a in actions if a.startswith("ec2:")} == {
        "ec2:RunInstances", "ec2:CreateTags", "ec2:DescribeInstances",
        "ec2:DescribeInstanceTypes", "ec2:DescribeImages", "ec2:TerminateInstances",
    }  # fmt: skip
    for s in head + worker:
        assert all("*" not in a for a in listed(s["Action"])), s
        if any(a.startswith("s3:") for a in listed(s["Action"])):
            assert all(r == bucket or r.startswith(f"{bucket}/") for r in listed(s["Resource"]))
            assert all(r != f"{bucket}/*" for r in listed(s["Resource"])), s
        if s["Resource"] == "*":
            assert (
                s["Condition"]["StringEquals"]["aws:RequestedRegion"]
                == _yaml("cluster.yaml")["provider"]["region"]
            )
    # Launching, retagging and ending instances: only those tagged with the cluster's name
    # (Ray's autoscaler tags what it launches with ray-cluster-name), never any instance.
    name = _yaml("cluster.yaml")["cluster_name"]
    for s in head:
        acts = set(listed(s["Action"]))
        tags = {**s.get("Condition", {}).get("StringEquals", {})}
        if acts & {"ec2:TerminateInstances", "ec2:StopInstances"}:
            assert tags.get("aws:ResourceTag/ray-cluster-name") == name, s
        if "ec2:CreateTags" in acts:
            assert tags.get("aws:ResourceTag/ray-cluster-name") == name or (
                tags.get("ec2:CreateAction") == "RunInstances"
            ), s
        instances = [r for r in listed(s["Resource"]) if ":instance/" in r or r == "*"]
        if "ec2:RunInstances" in acts and instances:
            assert tags.get("aws:RequestTag/ray-cluster-name") == name, s
    (pass_role,) = [s for s in head if s["Action"] == "iam:PassRole"]
    assert pass_role["Resource"].endswith(":role/clip-sae-worker")
    assert {a for s in worker for a in listed(s["Action"])} <= {
        "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket",
    }  # fmt: skip


def test_every_aws_node_requires_imdsv2():
    config = _yaml("cluster.yaml")
    for name, node in config["available_node_types"].items():
        options = node["node_config"].get("MetadataOptions", {})
        assert options.get("HttpTokens") == "required", name
        assert options.get("HttpPutResponseHopLimit", 1) >= 2, name  # Docker is one more hop


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
        if path.suffix == ".yaml":  # cluster/aws_setup.py alone makes the group's rules
            assert "IpPermissions" not in text, path
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
    assert on_network_fs(Path("/mnt/shared/sae-cache"), mounts)
    assert on_network_fs(Path("/mnt/shared"), mounts)
    assert on_network_fs(Path("/mnt/my share/cache"), mounts)
    assert not on_network_fs(Path("/mnt/shared/tmp/cache"), mounts)
    assert not on_network_fs(Path("/mnt/sharedx"), mounts)
    assert not on_network_fs(tmp_path, mounts)
    assert not on_network_fs(tmp_path)  # this machine's /proc/mounts: a local disk


@pytest.fixture(scope="module")
def demo_sets(demo_assets):
    return [
        *demo_assets,
        "tune.asha=false",
        "tune.verbose=0",
        "tune.gpus_per_trial=0.5",
        "train.device=cpu",  # the GPUs are fake
    ]


# A machine apart inside this one: its own processes, network (loopback alone) and mounts.
APART = ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--kill-child"]


def run_cluster_sweep(
    sets: list[str], exp_dir: Path, remove_node: bool, env=None, autoscale: bool = False
) -> dict:
    report = exp_dir.parent / "report.json"
    spec = {
        "args": ["--config", DEMO_CONFIG, *(arg for s in sets for arg in ("--set", s))],
        "exp_dir": str(exp_dir),
        "remove_node": remove_node,
        "autoscale": autoscale,
        "report": str(report),
    }
    out = subprocess.run(
        [
            *(APART if autoscale else []),
            sys.executable,
            str(ROOT / "tests" / "cluster_sweep.py"),
            json.dumps(spec),
        ],  # fmt: skip
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", **LOOPBACK, **(env or {})},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["returncode"] == 0, result["output"]
    return result


@pytest.mark.timeout(1800)  # minutes on a loaded 2-core machine
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
        assert row.sae_dir.startswith("file://")
        TopKSae.load(row.sae_dir.removeprefix("file://"))


@pytest.mark.timeout(1800)  # minutes on a loaded 2-core machine
def test_gpu_workers_scale_from_zero_run_the_trials_and_go_when_idle(demo_sets, tmp_path):
    """Ray's autoscaler (v2, as `ray up` runs it) on fake nodes: a head without GPUs, a GPU
    worker type at min_workers 0 as in cluster.yaml. Trials that need a GPU make it add
    workers, run there, and the workers go after the idle timeout."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the cluster's network is its own
    sets = [
        *demo_sets,
        "extract.num_gpus_per_actor=0",  # extraction on the head's CPUs
        "tune.gpus_per_trial=1",
        f"sweep.out_dir={tmp_path}",
        f"sweep.tracking_uri={tracking}",
        "sweep.name=autoscale",
        "tune.num_samples=2",
        "tune.max_concurrent=2",
        "train.epochs=4",
    ]
    exp_dir = tmp_path / "ray_results" / "autoscale"
    # Token auth on, as on the real cluster; its own token, not this machine's ~/.ray one.
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    report = run_cluster_sweep(sets, exp_dir, False, token, autoscale=True)
    assert "sweep autoscale: 2 trials (0 failed)" in report["output"]
    ran_on = {t: sorted({node for node, _ in steps}) for t, steps in report["reports"].items()}
    print(f"first GPU worker {report['first_worker_s']:.1f}s after the driver started; workers "
          f"{report['workers']}; trials on {ran_on}; workers gone {report['removed_after_s']:.1f}s "
          "after the driver ended")  # fmt: skip
    assert report["workers"]  # none existed before the sweep
    assert set().union(*ran_on.values()) <= set(report["workers"])  # none ran on the head
    assert report["workers_left"] == []  # all went after the idle timeout
    _, parents, kids = sweep_runs(tracking, "autoscale")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(k.data.tags["trial_id"] for k in kids) == sorted(report["reports"])


EVAL_EVERY = 10


@pytest.mark.timeout(1800)  # minutes on a loaded 2-core machine
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
        "tune.checkpoint_interval_s=0",  # a checkpoint at every eval, to resume from
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
        # From its last saved state, not from step 0: only the steps after the newest state
        # whole when the node died (one report interval, or two when a save was under way)
        # are trained again.
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


def _wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
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


# PID 1 of a loopback node: brings its network's loopback up, then reaps orphans, as an init
# does, until the node is ended.
NODE_INIT = """
import os, subprocess, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
print("up", flush=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
"""
SSHD = "/usr/sbin/sshd"

#: What a loopback node runs, by the Debian package that has it.
NODE_COMMANDS = {
    "openssh-server": [SSHD],
    "openssh-client": ["ssh", "ssh-keygen"],
    "rsync": ["rsync"],  # Ray's file mounts
    "iproute2": ["ip"],
    "util-linux": ["unshare", "nsenter"],
}


def loopback_node_missing() -> str:
    """Why this machine cannot hold a loopback node, or "" when it can."""
    if os.geteuid() != 0:
        return "a loopback node needs root (sshd, and Linux namespaces for the node)"
    missing = [pkg for pkg, cmds in NODE_COMMANDS.items() if not all(map(shutil.which, cmds))]
    if missing:
        return (
            f"a loopback node needs {', '.join(missing)}, not installed here "
            "(`bash .ci/run` installs them with apt-get, as root)"
        )
    tried = subprocess.run(["unshare", "--pid", "--fork", "--net", "true"],
                           capture_output=True, text=True)  # fmt: skip
    if tried.returncode != 0:
        why = " ".join(tried.stderr.split())
        return f"a loopback node needs PID and network namespaces, refused here: {why}"
    return ""


def _node_pids(ns: str) -> set[int]:
    """Processes in the PID namespace ns (a /proc/<pid>/ns/pid link)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and os.readlink(proc / "ns" / "pid") == ns:
                pids.add(int(proc.name))
    return pids


@contextlib.contextmanager
def loopback_node(root: Path):
    """A machine of its own inside this one, reached by SSH as a cloud node is.

    Linux namespaces give it its own process table (its `ray stop` ends its Ray alone) and its
    own network holding a loopback interface alone (Ray and MLflow keep their default ports,
    and nothing reaches them but SSH); it shares the file system. SSH is OpenSSH's sshd, run
    per connection inside the node (the ProxyCommand), key-based, logging in to the node's own
    HOME. Yields Ray's auth config, the node's home and its PID namespace. Leaving the block
    ends every process of the node, as terminating an instance does."""
    if why := loopback_node_missing():
        pytest.skip(why)
    root.mkdir()
    home = root / "home"
    home.mkdir()
    for key in ("client", "host"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)],
                       check=True)  # fmt: skip
    (root / "sshd_config").write_text(
        f"HostKey {root / 'host'}\nAuthorizedKeysFile {root / 'client.pub'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        f"SetEnv HOME={home}\n"
    )
    # The node's software is this machine's: its Python, offline as the suite is.
    offline = " ".join(f"{k}=1" for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                          "HF_DATASETS_OFFLINE", "TQDM_DISABLE"))  # fmt: skip
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    (home / ".bashrc").write_text(f"export PATH={path} {offline}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    node = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--kill-child",
         sys.executable, "-c", NODE_INIT],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert node.stdout.readline().strip() == "up"
        (init,) = [
            int(p) for p in Path(f"/proc/{node.pid}/task/{node.pid}/children").read_text().split()
        ]
        ns = os.readlink(f"/proc/{init}/ns/pid")
        proxy = (f"nsenter --target {init} --pid --mount --net "
                 f"{SSHD} -i -f {root / 'sshd_config'} -E {root / 'sshd.log'}")  # fmt: skip
        auth = {"ssh_user": "root", "ssh_private_key": str(root / "client"),
                "ssh_proxy_command": proxy}  # fmt: skip
        yield {"auth": auth, "home": home, "ns": ns, "init": init}
    finally:
        node.kill()  # unshare's child, the node's init, dies with it, and the node with it
        node.wait()


def _loopback_config(node: dict, name: str, token: Path, shared: Path) -> dict:
    """cluster-local.yaml for the loopback node: the same file mounts and start commands, with
    the container's home and the NFS share at this node's paths."""
    config = _yaml("cluster-local.yaml")

    def here(s: str) -> str:
        return s.replace("/home/ray", str(node["home"])).replace("/mnt/shared", str(shared))

    return {
        **config,
        "cluster_name": name,
        "provider": {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
        "auth": node["auth"],
        # No Docker: the node is the container. No setup: its Python has the dependencies,
        # and `ray job submit --working-dir` ships the code.
        "docker": {},
        "setup_commands": [],
        "file_mounts": {
            here(remote): str(token) if remote.endswith("auth_token") else local
            for remote, local in config["file_mounts"].items()
        },
        "head_start_ray_commands": [here(c) for c in config["head_start_ray_commands"]],
        "worker_start_ray_commands": [here(c) for c in config["worker_start_ray_commands"]],
    }


def _listeners(pid: int) -> dict[int, str]:
    """{port: address} of the TCP sockets listening in the network of process pid."""
    out = {}
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            address, port = local.split(":")
            out[int(port, 16)] = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
    return out


def _tunnel(config_path: Path, local: int, remote: int, env: dict) -> subprocess.Popen:
    """`ray dashboard`: an SSH tunnel from localhost:local to the head's localhost:remote."""
    return subprocess.Popen(
        ["ray", "dashboard", str(config_path), "--no-config-cache", f"--port={local}",
         f"--remote-port={remote}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


@pytest.fixture
def cluster_name():
    """A new cluster's name; afterwards, the files Ray's CLI kept about it on this machine go:
    the local provider's state, cached configs and SSH control sockets."""
    name = f"clip-sae-test-{secrets.token_hex(4)}"
    yield name
    tmp = Path(tempfile.gettempdir())
    for path in [*tmp.glob(f"ray/cluster-{name}.*"), *tmp.glob("ray-config-*")]:
        if path.name.startswith("cluster-") or name in path.read_text(errors="replace"):
            path.unlink(missing_ok=True)
    _close_ssh_masters(name)
    for path in tmp.glob(f"ray_ssh_*/{_control_dir(name)}"):
        shutil.rmtree(path, ignore_errors=True)


def _control_dir(cluster_name: str) -> str:
    """The directory of the cluster's SSH control sockets under /tmp/ray_ssh_<user>/ (Ray's
    SSHCommandRunner names it so)."""
    return hashlib.sha256(cluster_name.encode()).hexdigest()[:10]


def _close_ssh_masters(cluster_name: str) -> None:
    """End the SSH master connections Ray's CLI keeps open to the cluster's nodes: a master
    that carried a `ray dashboard` tunnel outlives the tunnel."""
    for sock in Path(tempfile.gettempdir()).glob(f"ray_ssh_*/{_control_dir(cluster_name)}/*"):
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "node"],
                       capture_output=True, timeout=30)  # fmt: skip


def test_ray_up_starts_the_cluster_and_a_job_sweeps_into_its_mlflow(
    demo_assets, cluster_name, tmp_path
):
    """The README's procedure minus the cloud: `ray up` cluster-local.yaml's head on a loopback
    node over SSH, its dashboard and MLflow through SSH tunnels, a sweep submitted with
    `ray job submit` and the cluster's token, then `ray down`."""
    token = tmp_path / "auth_token"  # what `ray get-auth-token --generate` writes
    token.write_text(secrets.token_hex(32))
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env.pop("RAY_ADDRESS", None)
    with loopback_node(tmp_path / "node") as node:
        config = _loopback_config(node, cluster_name, token, tmp_path / "shared")
        config_path = tmp_path / "cluster.yaml"
        config_path.write_text(yaml.safe_dump(config))
        up = subprocess.run(["ray", "up", "-y", "--no-config-cache", str(config_path)],
                            env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        # Ray's job API and MLflow listen on the head's loopback alone.
        listening = _listeners(node["init"])
        assert listening[8265] == "127.0.0.1" and listening[5000] == "127.0.0.1"
        dashboard, mlflow_port = _free_port(), _free_port()
        tunnels = [_tunnel(config_path, dashboard, 8265, env),
                   _tunnel(config_path, mlflow_port, 5000, env)]  # fmt: skip
        try:
            _wait_for_http(f"http://127.0.0.1:{dashboard}/api/version", tunnels[0])
            _wait_for_http(f"http://127.0.0.1:{mlflow_port}/health", tunnels[1])
            # Without the token the job API refuses.
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/jobs/", timeout=10)
            assert refused.value.code in (401, 403)
            sets = [*demo_assets, f"sweep.out_dir={tmp_path / 'out'}", "sweep.name=job",
                    "tune.num_samples=2", "train.epochs=4", "tune.verbose=0"]  # fmt: skip
            submit = ["ray", "job", "submit", f"--address=http://127.0.0.1:{dashboard}",
                      f"--working-dir={ROOT}", "--", "python", "run_sweep.py", "sweep",
                      "--config", "sweeps/configs/demo.yaml",
                      *(a for s in sets for a in ("--set", s))]  # fmt: skip
            # The head's job agent starts a little after its dashboard: Ray asks to retry then.
            for _ in range(30):
                job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
                if "No available agent" not in job.stderr:
                    break
                time.sleep(2)
            assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
            assert "sweep job: 2 trials (0 failed)" in job.stdout
            # The driver found the head's server from the file prepare-head.sh wrote.
            assert "MLflow UI: http://127.0.0.1:5000" in job.stdout
            _, parents, kids = sweep_runs(f"http://127.0.0.1:{mlflow_port}", "job")
            assert len(parents) == 1 and parents[0].info.status == "FINISHED"
            assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
        finally:
            for tunnel in tunnels:
                os.killpg(tunnel.pid, signal.SIGTERM)
                tunnel.wait(timeout=30)
        down = subprocess.run(["ray", "down", "-y", str(config_path)],
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        _close_ssh_masters(cluster_name)  # this machine's SSH clients: not the node's to end
        # `ray down` ends every Ray process; what it leaves, MLflow's server, ends with the
        # node (`docker stop` with Docker, the instance's end on AWS).
        (server,) = [p for p in _node_pids(node["ns"]) if "mlflow server" in _cmdline(p)]
        mlflow = {server} | {c.pid for c in psutil.Process(server).children(recursive=True)}
        ray_left = _wait_for_none(lambda: _node_pids(node["ns"]) - {node["init"]} - mlflow)
        assert not ray_left, [_cmdline(p) for p in ray_left]
    assert not _wait_for_none(lambda: _node_pids(node["ns"]))


def _wait_for_none(find, timeout: float = 300) -> set:
    """Poll find() until it returns nothing or timeout passes; returns its last answer."""
    deadline = time.monotonic() + timeout
    while (found := find()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""
