"""A trial run's artifacts and MLflow's model registry: what `export` and `best --register`
need of MLflow, which nothing outside `sweeps/tracking/` imports."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import mlflow.artifacts
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as PROGRESS_BAR
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from sweeps.tracking.client import mlflow_client

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion


def trial_run(tracking_uri: str, run_id: str) -> Run:
    """The MLflow run `run_id`, which must be a sweep's trial; a ValueError that says what to
    pass otherwise."""
    try:
        run = mlflow_client(tracking_uri).get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"MLflow run {run_id}: {e.message}") from None
    if "trial_id" not in run.data.tags or "layer" not in run.data.params:
        raise ValueError(
            f"MLflow run {run_id} is not a trial of a sweep (no trial_id tag or layer param): "
            "pass the run id of a trial, as `best` lists them"
        )
    return run


def download_artifacts(tracking_uri: str, run_id: str, path: str, dst: str | None) -> Path:
    """A run's artifact folder, downloaded into `dst` (default: a new temporary directory)
    without MLflow's progress bar: library code prints nothing. FileNotFoundError when the
    run has none."""
    bar = PROGRESS_BAR.get_raw()
    PROGRESS_BAR.set("false")
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=dst, tracking_uri=tracking_uri
            )
        )
    except (MlflowException, OSError) as e:
        raise FileNotFoundError(
            f"run {run_id} has no {path} artifact ({e}): pick a trial that finished"
        ) from None
    finally:
        if bar is None:
            PROGRESS_BAR.unset()
        else:
            PROGRESS_BAR.set(bar)


def register_folder(
    tracking_uri: str,
    run_id: str,
    folder: Path,
    artifact_path: str,
    name: str,
    description: str,
    version_description: str,
    tags: dict[str, str],
) -> ModelVersion:
    """Log `folder` to the run under `artifact_path` and register it as a new version of the
    registered model `name` (created, with `description`, when new)."""
    client = mlflow_client(tracking_uri)
    client.log_artifacts(run_id, str(folder), artifact_path)
    try:
        client.create_registered_model(name, description=description)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise ValueError(f"cannot register model {name!r}: {e.message}") from None
    return client.create_model_version(
        name,
        f"runs:/{run_id}/{artifact_path}",
        run_id=run_id,
        tags=tags,
        description=version_description,
    )
