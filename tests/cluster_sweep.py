"""A sweep on a simulated cluster, driven as `ray job submit` drives it: `run_sweep.py sweep` in
its own process, given the cluster's address in RAY_ADDRESS.

The cluster is a head and two worker nodes with fake GPUs, all on loopback (run with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, or Ray swaps 127.0.0.1 for this machine's address).
tests/test_cluster.py runs this in its own process: a ray.cluster_utils.Cluster cannot share
one with the tests' local Ray instance.

With `autoscale`, the cluster is instead Ray's fake multi-node autoscaling cluster: a head
without GPUs and a GPU worker type that starts at zero workers, which Ray's autoscaler adds and
removes. Its start and shutdown run `ray stop --force`, which would end every Ray on this
machine: test_cluster.py runs this mode in Linux namespaces of its own (processes, network,
/tmp/ray), a machine apart.

Usage: cluster_sweep.py JSON, with keys `args` (run_sweep.py's arguments after `sweep`),
`exp_dir` (the sweep's Tune experiment directory), `remove_node` (true: remove the worker of
the first trial that checkpoints, mid-sweep), `autoscale` (true: the autoscaling cluster) and
`report` (a file to write the JSON report to: the workers' node ids, the removed one, the
driver's exit code and output, and the (node_id, step) of every result each trial reported, in
order; with `autoscale`, also the seconds from the driver's start to the first worker, and
from the driver's end to the last worker's removal).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray
from ray.autoscaler._private.fake_multi_node.node_provider import (
    FAKE_HEAD_NODE_ID,
    FakeMultiNodeProvider,
)
from ray.cluster_utils import AutoscalingCluster, Cluster

RUN_SWEEP = str(Path(__file__).resolve().parents[1] / "run_sweep.py")


def reports(exp_dir: Path) -> dict[str, list[tuple[str, int]]]:
    """(node_id, step) of every result each trial reported, from Tune's result.json files."""
    out = {}
    for path in exp_dir.glob("run_trial_*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            out[lines[0]["trial_id"]] = [(r["node_id"], r["step"]) for r in lines]
    return out


def remove_first_checkpointed(cluster: Cluster, exp_dir: Path, removed: list) -> None:
    """Once a trial has saved its state, remove the worker node it runs on, without warning."""
    deadline = time.time() + 1200  # a hang guard: under load the first save takes minutes
    while time.time() < deadline:
        for latest in exp_dir.glob("trial_state/*/latest"):
            try:  # the driver may not have written the trial's results yet
                (results,) = exp_dir.glob(f"run_trial_{latest.parent.name}_*/result.json")
                node_id = json.loads(results.read_text().splitlines()[-1])["node_id"]
            except (OSError, IndexError, ValueError):
                continue
            node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
            cluster.remove_node(node, allow_graceful=False)
            removed.append(node_id)
            return
        time.sleep(0.1)


def main(spec: dict) -> None:
    loopback = {"node_ip_address": "127.0.0.1"}
    # Quick node-death detection: the default takes most of a minute.
    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "_system_config": system, **loopback},
    )
    workers = [cluster.add_node(num_cpus=2, num_gpus=1, **loopback) for _ in range(2)]
    exp_dir = Path(spec["exp_dir"])
    removed: list = []
    if spec["remove_node"]:
        threading.Thread(
            target=remove_first_checkpointed, args=(cluster, exp_dir, removed), daemon=True
        ).start()
    driver = subprocess.run(
        [sys.executable, RUN_SWEEP, "sweep", *spec["args"]],
        env=os.environ | {"RAY_ADDRESS": cluster.address},
        capture_output=True,
        text=True,
        timeout=1200,  # a guard against a hang, not a speed limit: loaded machines are slow
    )
    report = {
        "workers": [w.node_id for w in workers],
        "removed": removed,
        "returncode": driver.returncode,
        "output": driver.stdout[-5000:] + driver.stderr[-5000:],
        "reports": reports(exp_dir),
    }
    Path(spec["report"]).write_text(json.dumps(report))
    cluster.shutdown()


class FakeAutoscalingCluster(AutoscalingCluster):
    """AutoscalingCluster with its base config here. Ray's wheel lacks the fake provider's
    example.yaml, which AutoscalingCluster and the autoscaler read as the provider's defaults;
    the values are that file's, and the provider is named as an external module, whose
    defaults Ray holds in code."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **kw):
        head = {"resources": head_resources, "node_config": {}, "max_workers": 0}
        provider = {"type": "external", "module": f"{FakeMultiNodeProvider.__module__}."
                    "FakeMultiNodeProvider", "use_node_id_as_ip": True,
                    "disable_node_updaters": True, "disable_launch_config_check": True}  # fmt: skip
        if autoscaler_v2:
            provider |= {"launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID}
        commands = ("initialization", "setup", "head_setup", "worker_setup", "head_start_ray",
                    "worker_start_ray")  # fmt: skip
        return {
            "cluster_name": "fake_multinode",
            "max_workers": 8,
            "provider": provider,
            "available_node_types": {**worker_node_types, "ray.head.default": head},
            "head_node_type": "ray.head.default",
            "auth": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 0.1,
            "docker": {},
            **{f"{c}_commands": [] for c in commands},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            **kw,
        }


def autoscale(spec: dict) -> None:
    """The sweep on a cluster that starts without workers; run in namespaces of its own."""
    # This machine apart: its loopback up, its own Ray session directory.
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path("/tmp/ray").mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/tmp/ray"], check=True)
    # As cluster.yaml: the head has CPUs for the driver and extraction but no GPU, the GPU
    # workers start at zero (Ray's autoscaler v2, as `ray up` runs it).
    cluster = FakeAutoscalingCluster(
        head_resources={"CPU": 2},
        worker_node_types={
            "gpu_worker": {
                "resources": {"CPU": 2, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },  # fmt: skip
        autoscaler_v2=True,
    )
    cluster.start()
    ray.init("127.0.0.1:6379", log_to_driver=False)
    seen: dict[str, float] = {}  # worker node id -> when it first was alive
    done = threading.Event()

    def workers_alive() -> set[str]:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}

    def watch():
        while not done.is_set():
            for node in workers_alive():
                seen.setdefault(node, time.monotonic())
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.monotonic()
    driver = subprocess.run(
        [sys.executable, RUN_SWEEP, "sweep", *spec["args"]],
        env=os.environ | {"RAY_ADDRESS": "127.0.0.1:6379"},
        capture_output=True,
        text=True,
        timeout=1200,  # a guard against a hang, not a speed limit
    )
    ended = time.monotonic()
    # The workers go after the idle timeout; wait for that, not for a fixed time.
    deadline = ended + 180
    while workers_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    gone = time.monotonic()
    done.set()
    watcher.join()
    report = {
        "workers": sorted(seen),
        "removed": [],
        "returncode": driver.returncode,
        "output": driver.stdout[-5000:] + driver.stderr[-5000:],
        "reports": reports(Path(spec["exp_dir"])),
        "first_worker_s": min(seen.values(), default=started) - started,
        "workers_left": sorted(workers_alive()),
        "removed_after_s": gone - ended,
    }
    Path(spec["report"]).parent.mkdir(parents=True, exist_ok=True)
    Path(spec["report"]).write_text(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    autoscale(spec) if spec.get("autoscale") else main(spec)
