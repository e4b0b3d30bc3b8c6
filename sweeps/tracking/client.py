"""The one place an MlflowClient is built: one per tracking URI and process, so that a
command opens the store (and, for SQLite, its database engine) once."""

from __future__ import annotations

import functools

from mlflow.tracking import MlflowClient

from sweeps.config import SweepSettings


@functools.lru_cache(maxsize=8)
def mlflow_client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri)


def sweep_client(sweep: SweepSettings) -> MlflowClient:
    """The client of a sweep's tracking store (`sweep.tracking_uri` as resolved)."""
    return mlflow_client(sweep.resolved_tracking_uri())
