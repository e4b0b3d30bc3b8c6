"""The local Ray instance (sweeps/local_ray.py): every process of it listens on loopback alone,
its node and workers report 127.0.0.1, and its GCS refuses a client without the token."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time

import psutil

#: Starts the local Ray as the CLI does (Ray already imported, console quiet), prints what the
#: test needs as one JSON line, and shuts Ray down when its stdin closes.
DRIVER = """
import json, logging, sys, time
import ray
from ray.experimental import internal_kv
from sweeps.local_ray import start_local_ray

start_local_ray(num_cpus=1, log_to_driver=False, logging_level=logging.ERROR)

@ray.remote
def node_ip():
    return ray.util.get_node_ip_address()

node = ray.nodes()[0]
keys = (b"AutoscalerMetricsAddress", b"DashboardMetricsAddress")
deadline = time.monotonic() + 60
while not all(map(internal_kv._internal_kv_get, keys)) and time.monotonic() < deadline:
    time.sleep(0.1)  # the monitor and the dashboard write their metrics address as they start
ports = ("NodeManagerPort", "ObjectManagerPort", "MetricsExportPort", "MetricsAgentPort",
         "DashboardAgentListenPort", "RuntimeEnvAgentPort")
own = ray._private.worker.global_worker.node
print(json.dumps({
    "gcs": own.gcs_address,
    "cluster_id": own.cluster_id.hex(),
    "ports": [int(own.gcs_address.rsplit(":", 1)[1])] + [node[p] for p in ports if node[p] > 0],
    "node_ip": node["NodeManagerAddress"],
    "worker_ip": ray.get(node_ip.remote()),
    "metrics": [(internal_kv._internal_kv_get(k) or b"").decode() for k in keys],
}), flush=True)
sys.stdin.read()
ray.shutdown()
"""

#: One GCS call with whatever token (or none) the environment gives.
PROBE = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1], cluster_id=sys.argv[2]).internal_kv_keys(b"", None, 10)
    print("accepted")
except Exception as e:
    print("refused", type(e).__name__, e)
"""


def is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket
    return (mapped or ip).is_loopback


def listeners(root: int) -> list[tuple[str, int, str]]:
    """(address, port, process) of every listening socket of root and its descendants."""
    found = []
    procs = psutil.Process(root)
    for proc in [procs, *procs.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.NoSuchProcess:
            continue
        found += [(c.laddr.ip, c.laddr.port, name) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def probe(info: dict, env: dict) -> str:
    args = [sys.executable, "-c", PROBE, info["gcs"], info["cluster_id"]]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120).stdout


def test_local_ray_listens_on_loopback_only_and_wants_the_token(tmp_path):
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = driver.stdout.readline()
        assert line, driver.communicate(timeout=60)[1]
        info = json.loads(line)
        # Wait until every server the node reports (GCS, raylet, object manager, agents) listens.
        deadline = time.monotonic() + 60
        while not set(info["ports"]) <= {port for _, port, _ in listeners(driver.pid)}:
            assert time.monotonic() < deadline, (info["ports"], listeners(driver.pid))
            time.sleep(0.1)
        found = listeners(driver.pid)
        exposed = [f"{ip}:{port} {name}" for ip, port, name in found if not is_loopback(ip)]
        assert not exposed, f"{len(exposed)} of {len(found)} listeners off loopback: {exposed}"
        assert info["node_ip"] == info["worker_ip"] == "127.0.0.1", info
        assert all(m.startswith("127.0.0.1:") for m in info["metrics"]), info["metrics"]

        # The token: the driver's own sources let a client in; none, or a wrong one, does not.
        assert probe(info, os.environ | {"RAY_AUTH_MODE": "token"}).startswith("accepted")
        bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        bare["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
        assert probe(info, bare | {"RAY_AUTH_MODE": "disabled"}).startswith("refused")
        wrong = bare | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32}
        assert probe(info, wrong).startswith("refused")
    finally:
        try:
            _, err = driver.communicate(timeout=120)  # closes stdin: the driver shuts Ray down
        except subprocess.TimeoutExpired:
            driver.kill()
            _, err = driver.communicate()
    assert driver.returncode == 0, err
    assert "Token authentication" not in err, err  # Ray's notice stays off a quiet console
