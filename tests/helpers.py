"""Offline test material: a tiny CLIP checkpoint and generated image datasets."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sweeps.demo import make_image_folder, make_tiny_clip, random_image  # noqa: F401 (re-exported)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def make_hf_dataset(root, n: int = 24, seed: int = 0, with_label: bool = True) -> str:
    """A `datasets` save_to_disk directory with an Image column and a ClassLabel column."""
    import datasets

    rng = np.random.default_rng(seed)
    features = {"image": datasets.Image()}
    data = {"image": [{"bytes": encode(random_image(rng)), "path": None} for _ in range(n)]}
    if with_label:
        features["label"] = datasets.ClassLabel(names=["a", "b", "c"])
        data["label"] = [i % 3 for i in range(n)]
    ds = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    ds.save_to_disk(str(root))
    return str(root)


def make_parquet(path, n: int = 24, seed: int = 0, rows_per_group: int = 5) -> str:
    """A Parquet file with an `img` binary column and an `y` label column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    table = pa.table(
        {
            "img": [encode(random_image(rng)) for _ in range(n)],
            "y": pa.array([i % 4 for i in range(n)], pa.int64()),
        }
    )
    pq.write_table(table, str(path), row_group_size=rows_per_group)
    return str(path)


# file name -> None if it must be converted and kept, else the skip reason
BAD_IMAGES = {
    "empty.jpg": "empty",
    "text.jpg": "not_an_image",
    "truncated.jpg": "truncated",
    "huge.png": "too_large",
    "cmyk.jpg": None,
    "la.png": None,
    "p.png": None,
    "rgba.png": None,
    "i16.png": None,
    "onebit.png": None,
    "one_pixel.png": None,
    "large.jpg": None,
}


def make_bad_images(root, seed: int = 0, huge_side: int = 12_000) -> dict[str, str | None]:
    """Write one file of each troublesome kind into root; returns BAD_IMAGES.

    huge.png is huge_side**2 pixels (a zero 1-bit image, tiny on disk): above a
    max_image_pixels of 10**8 it must be skipped from its header alone."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rgb = random_image(rng, 40, 56)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_bytes(b"this is not an image\n" * 10)
    noise = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    jpeg = encode(noise, "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    Image.new("1", (huge_side, huge_side)).save(root / "huge.png")
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    rgb.convert("LA").save(root / "la.png")
    p = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    p.save(root / "p.png", transparency=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(root / "i16.png")
    rgb.convert("1").save(root / "onebit.png")
    Image.new("RGB", (1, 1), (200, 10, 30)).save(root / "one_pixel.png")
    random_image(rng, 3000, 4000).save(root / "large.jpg", quality=90)
    return dict(BAD_IMAGES)


def sweep_runs(uri: str, experiment: str, parent: str | None = None):
    """(client, parent runs, child runs) of an MLflow experiment; with `parent` (a run id),
    only that sweep's."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "sweep_id" in r.data.tags and parent in (None, r.info.run_id)]
    kids = [
        r
        for r in runs
        if MLFLOW_PARENT_RUN_ID in r.data.tags
        and parent in (None, r.data.tags[MLFLOW_PARENT_RUN_ID])
    ]
    return client, parents, kids


def chromium() -> str:
    """Headless Chromium's executable; skips the test where it is not installed."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package)")
    return found


def chromium_flags(profile: Path) -> list[str]:
    """Headless, offline, a profile of its own, and 30 s of virtual time for the page's
    scripts to fetch and draw."""
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--window-size=1400,900",
    ]  # fmt: skip


def page_text(browser: str, url: str, profile: Path, shot: Path | None = None) -> str:
    """The text of a page once its scripts ran, tags, scripts and styles stripped and spaces
    joined; with `shot`, a screenshot of it too."""
    flags = chromium_flags(profile)
    if shot is not None:
        subprocess.run([browser, *flags, f"--screenshot={shot}", url],
                       capture_output=True, timeout=180)  # fmt: skip
    dom = subprocess.run([browser, *flags, "--dump-dom", url],
                         capture_output=True, text=True, timeout=180).stdout  # fmt: skip
    text = re.sub(r"<script.*?</script>|<style.*?</style>", "", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))
