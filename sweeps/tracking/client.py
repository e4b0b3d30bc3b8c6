"""The one place an MlflowClient is built: one per tracking URI and process, so that a
command opens the store (and, for SQLite, its database engine) once."""

from __future__ import annotations

import fcntl
import functools
from pathlib import Path

from mlflow.tracking import MlflowClient

from sweeps.config import SweepSettings


@functools.lru_cache(maxsize=8)
def mlflow_client(tracking_uri: str) -> MlflowClient:
    if not tracking_uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri)
    # The client creates and migrates a new SQLite store's schema, which two processes doing
    # at once both crash in (duplicate tables, alembic's version row): one at a time.
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return MlflowClient(tracking_uri)


def sweep_client(sweep: SweepSettings) -> MlflowClient:
    """The client of a sweep's tracking store (`sweep.tracking_uri` as resolved)."""
    return mlflow_client(sweep.resolved_tracking_uri())
