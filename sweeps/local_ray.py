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
    from ray._private import ray_constants
    from ray._private.authentication import authentication_token_setup as auth
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    if os.environ.get(auth.AUTH_MODE_ENV_VAR) != "token":
        auth._enable_token_auth()  # sets RAY_AUTH_MODE=token, refreshes this process's config
    cluster = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # keep the node IP on loopback while Ray starts
    try:
        context = ray.init(
            **{"include_dashboard": False, **init_kwargs},
            address="local",
            _node_ip_address=LOOPBACK,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster  # a later connection to a cluster is unchanged
    ip = ray.util.get_node_ip_address()
    if ip != LOOPBACK or not is_token_auth_enabled():
        ray.shutdown()
        raise RuntimeError(f"the local Ray would be reachable from other machines (node IP {ip})")
    return context
