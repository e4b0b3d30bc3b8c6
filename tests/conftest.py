"""Shared fixtures: one local Ray instance per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("RAY_ACCEPT_DEPRECATED_FEATURES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported
# Node copies of cached layers (cache.layer_file) go to a folder of this session, not /tmp.
os.environ.setdefault("SAE_ARRAY_DIR", tempfile.mkdtemp(prefix="sae-arrays-"))
atexit.register(shutil.rmtree, os.environ["SAE_ARRAY_DIR"], True)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs one (about 5 s to start), started
    as the CLI starts one: on loopback, with token authentication."""
    import ray

    from sweeps.local_ray import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium's executable. Session-scoped, so that where it is missing a test that
    asks for it skips before its other fixtures (a sweep) run."""
    from tests.helpers import chromium

    return chromium()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, local artifacts); yields its URI."""
    from tests.helpers import mlflow_server

    root = tmp_path_factory.mktemp("mlflow_server")
    with mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}", root / "artifacts") as uri:
        yield uri


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    """`--set` overrides pointing the demo config at a tiny CLIP, 600 generated images and one
    activation cache directory shared by every test that sweeps them."""
    from sweeps.demo import prepare_demo

    root = tmp_path_factory.mktemp("demo")
    model, images = prepare_demo(root / "assets", n_images=600)
    return [
        f"model.name_or_path={model}",
        f"data.path={images}",
        f"extract.cache_dir={root / 'cache'}",
    ]
