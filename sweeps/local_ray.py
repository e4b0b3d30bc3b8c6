"""A local Ray instance: reachable from this machine only, authenticated with a token.

Every Ray server (GCS, raylet, object manager, the core workers, the dashboard, runtime env and
metrics agents, the autoscaler monitor) listens on loopback exactly when the node's IP is
localhost, else on every interface. `ray.init(_node_ip_address="127.0.0.1")` alone is not
enough: Ray 2.60 turns a localhost node IP into the machine's outward one
(`ray/_private/worker.py`, `services.resolve_ip_for_localhost`), unless
`ray_constants.ENABLE_RAY_CLUSTER` is off, as it is on macOS and Windows, where Ray runs single
machine instances on loopback (`ray/_private/services.py`, `get_node_ip_address`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os

LOOPBACK = "127.0.0.1"


def start_local_ray(**init_kwargs):
    """Start a local Ray instance whose processes all listen on 127.0.0.1 and whose clients must
    present Ray's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, which Ray
    creates when there is none), as on the cluster; returns `ray.init`'s context. `init_kwargs`
    go to `ray.init` (num_cpus, log_to_driver, logging_level, ...).

    RAY_AUTH_MODE=token stays set in this process, as a plain `ray.init` leaves it: the Ray
    processes this one starts, and its own later Ray clients, read it from the environment.
    Set here, it also keeps Ray's notice that it enabled token authentication off the console.
    """
    import ray
    from ray._private.authentication import authentication_token_setup as auth
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if os.environ.get(auth.AUTH_MODE_ENV_VAR) != "token":
        auth._enable_token_auth()  # sets RAY_AUTH_MODE=token, refreshes this process's config
    with _on_loopback():
        context = ray.init(
            **{"include_dashboard": False, **init_kwargs},
            address="local",
            _node_ip_address=LOOPBACK,
        )
    ip = ray.util.get_node_ip_address()
    if ip != LOOPBACK or not is_token_auth_enabled():
        ray.shutdown()
        raise RuntimeError(f"the local Ray would be reachable from other machines (node IP {ip})")
    return context


def join_ray(address: str, **init_kwargs):
    """Connect to the running Ray at `address` (host:port, auto or ray://...); returns
    `ray.init`'s context. A Ray on this machine's loopback, such as a local instance another
    command started (`start_local_ray`, or Ray's `ray start --node-ip-address 127.0.0.1`), is
    joined on 127.0.0.1, where it listens: Ray would otherwise turn the address into the
    machine's outward IP and wait there forever."""
    import ray
    from ray._private import services

    host = ""
    if not address.startswith("ray://"):
        with _on_loopback():  # auto: the address of the Ray this machine last started
            host = (services.canonicalize_bootstrap_address(address) or "").rpartition(":")[0]
    if _is_loopback(host):
        with _on_loopback():
            return ray.init(address=address, _node_ip_address=LOOPBACK, **init_kwargs)
    return ray.init(address=address, **init_kwargs)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


@contextlib.contextmanager
def _on_loopback():
    """Ray keeps a node IP of 127.0.0.1 as it is only while ENABLE_RAY_CLUSTER is off (as on
    macOS and Windows); put back after, so that a later connection to a cluster is unchanged."""
    from ray._private import ray_constants

    cluster = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
