"""Offline test material: a tiny CLIP checkpoint and generated image datasets; a real
`mlflow server`, and headless Chromium driven through the DevTools protocol."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
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


@contextlib.contextmanager
def mlflow_server(root: Path, backend_store_uri: str, artifacts: Path | None = None):
    """A real `mlflow server` on 127.0.0.1 over `backend_store_uri`, logging to root/server.log;
    yields its URI. Runs whose artifacts are local file URIs are served from there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1", "--backend-store-uri", backend_store_uri]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(artifacts)]
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    # Its own session, so that stopping it also stops the uvicorn and job-runner children.
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
    # It starts in seconds on a quiet machine and in minutes beside busy loops: wait for it
    # while it runs; the deadline only guards against a hang.
    deadline = time.monotonic() + 900
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                log.close()
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()}")
            time.sleep(0.3)
    try:
        yield uri
    finally:
        stop_group(proc, timeout=5)
        log.close()


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM a server started in a session of its own, and its children; SIGKILL after
    `timeout` seconds."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


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


class Chromium:
    """Headless Chromium driven through the DevTools protocol on a pipe (--remote-debugging-pipe:
    JSON messages ending in NUL, read on fd 3 and written on fd 4), so that a test can click,
    wait and read inside a page's frames without a websocket library. One page, in front (a
    background tab loads no lazy images); `page` is its session, `frame(prefix)` the session of
    the out-of-process frame whose URL starts with prefix."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 900, timeout: float = 180):
        to_r, self._w = os.pipe()
        self._r, from_w = os.pipe()
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={profile}", f"--window-size={width},{height}",
            "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        # bash, not sh: dash takes one-digit descriptors only.
        cmd = ["bash", "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w}', chromium(), *flags]
        self._log = open(Path(profile).with_suffix(".log"), "wb")
        self.proc = subprocess.Popen(
            cmd, pass_fds=(to_r, from_w), stdout=self._log, stderr=self._log,
            start_new_session=True,
        )  # fmt: skip
        os.close(to_r)
        os.close(from_w)
        self.timeout, self._buf, self._id, self.events = timeout, b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.page = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Target.setAutoAttach", self.page, autoAttach=True,
                  waitForDebuggerOnStart=False, flatten=True)  # fmt: skip
        self.call("Page.enable", self.page)
        self.call("Page.bringToFront", self.page)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer in {self.timeout} s")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """One DevTools command; the events that arrive meanwhile go to `events`."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            got = self._message(deadline)
            if got.get("id") == self._id:
                if "error" in got:
                    raise RuntimeError(f"{method}: {got['error']}")
                return got["result"]
            self.events.append(got)

    def evaluate(self, expression: str, session: str | None = None):
        """The value of a JavaScript expression (promises awaited) in the page or a frame."""
        got = self.call(
            "Runtime.evaluate", session or self.page, expression=expression,
            returnByValue=True, awaitPromise=True,
        )  # fmt: skip
        if "exceptionDetails" in got:
            raise RuntimeError(f"{expression[:80]}...: {got['exceptionDetails']}")
        return got["result"].get("value")

    def wait_for(self, expression: str, session: str | None = None, what: str = ""):
        """Poll until the expression is truthy; returns its value (the deadline only guards
        against a hang: a loaded machine renders slowly)."""
        deadline = time.monotonic() + self.timeout
        while not (value := self.evaluate(expression, session)):
            assert time.monotonic() < deadline, f"never true: {what or expression}"
            time.sleep(0.2)
        return value

    def frame(self, url_prefix: str, skip: Iterable[str] = ()) -> str:
        """The session of the newest attached out-of-process frame of the page whose URL starts
        with url_prefix, other than the sessions in `skip` (frames a page has replaced)."""
        deadline = time.monotonic() + self.timeout
        while True:
            self.call("Runtime.evaluate", self.page, expression="0")  # let events arrive
            live: dict[str, str] = {}  # session -> its frame's URL
            targets: dict[str, str] = {}  # target -> session
            for e in self.events:
                method, params = e.get("method"), e.get("params", {})
                if method == "Target.attachedToTarget":
                    targets[params["targetInfo"]["targetId"]] = params["sessionId"]
                    live[params["sessionId"]] = params["targetInfo"]["url"]
                elif method == "Target.targetInfoChanged":
                    session = targets.get(params["targetInfo"]["targetId"])
                    if session in live:
                        live[session] = params["targetInfo"]["url"]
                elif method == "Target.detachedFromTarget":
                    live.pop(params["sessionId"], None)
            found = [s for s, url in live.items() if url.startswith(url_prefix) and s not in skip]
            if found:
                return found[-1]
            assert time.monotonic() < deadline, f"no frame at {url_prefix}: {live}"
            time.sleep(0.2)

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", self.page, url=url)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", self.page)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        self._log.close()
