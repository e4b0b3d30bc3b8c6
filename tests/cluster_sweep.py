"""A sweep on a simulated cluster, driven as `ray job submit` drives it: `run_sweep.py sweep` in
its own process, given the cluster's address in RAY_ADDRESS.

The cluster is a head and two worker nodes with fake GPUs, all on loopback (run with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, or Ray swaps 127.0.0.1 for this machine's address).
tests/test_cluster.py runs this in its own process: a ray.cluster_utils.Cluster cannot share
one with the tests' local Ray instance.

Usage: cluster_sweep.py JSON, with keys `args` (run_sweep.py's arguments after `sweep`),
`exp_dir` (the sweep's Tune experiment directory), `remove_node` (true: remove the worker of
the first trial that checkpoints, mid-sweep) and `report` (a file to write the JSON report to:
the workers' node ids, the removed one, the driver's exit code and output, and the
(node_id, step) of every result each trial reported, in order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ray.cluster_utils import Cluster

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
    """Once a trial has a checkpoint, remove the worker node it runs on, without warning."""
    deadline = time.time() + 240
    while time.time() < deadline:
        for ckpt in exp_dir.glob("run_trial_*/checkpoint_*"):
            try:  # the driver may not have written the result of this checkpoint yet
                last = (ckpt.parent / "result.json").read_text().splitlines()[-1]
                node_id = json.loads(last)["node_id"]
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
        timeout=240,
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


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
