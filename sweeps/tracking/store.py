"""Whether a tracking URI names a store this service can use, checked without importing mlflow
(3 s), and without MLflow's two minutes of retries on a store it cannot open, before a command
reads or writes it."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from sweeps.redact import redact
from sweeps.vocabulary import default_tracking_uri


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used; the message says how to fix it."""


def check_tracking_uri(uri: str, timeout_s: float = 30.0) -> None:
    """Fail before any compute when `uri` cannot be used as a tracking store.

    Checks that an http(s) server answers MLflow's API (a refused connection fails at once;
    the timeout is for a server that is slow, as a loaded one queried through its database
    is, not for one that is down) and that a SQLite file's directory can be created;
    other database and hosted schemes are left to MLflow. Messages show `uri` without its
    password.
    """
    shown = redact(uri)
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        # MLflow's REST API itself, not any answer: another server on the port once passed.
        try:
            answer = _rest_call(uri, "experiments/search", {"max_results": 1}, timeout_s)
        except ConnectionError as e:
            if "not reachable" not in str(e):
                raise TrackingError(
                    f"{e}. It is not an MLflow tracking server, or its credentials are missing "
                    "(MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN): fix the URI "
                    "or the credentials"
                ) from None
            raise TrackingError(
                f"{e}. Start it (for example `mlflow server --host 127.0.0.1 --port 5000 "
                "--backend-store-uri sqlite:///mlflow.db` on the head node, reached through "
                "an SSH tunnel), fix the URI, or use a local store such as "
                "sqlite:///<out_dir>/mlflow.db."
            ) from None
        except ValueError:  # not JSON
            answer = None
        if not isinstance(answer, dict):
            raise TrackingError(
                f"{shown} answered MLflow's API with something other than MLflow's JSON: it is "
                "not an MLflow tracking server; fix sweep.tracking_uri"
            )
    elif scheme == "sqlite":
        path = uri.removeprefix("sqlite:///")
        if path == uri or path in ("", ":memory:"):
            raise TrackingError(
                f"SQLite tracking URI {shown} names no database file: use sqlite:///<path>/mlflow.db"
            )
        if Path(path).is_dir():
            raise TrackingError(
                f"SQLite tracking URI {shown} names a directory, not a database file: use "
                f"sqlite:///{Path(path) / 'mlflow.db'}"
            )
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(
                f"Cannot create the directory of the MLflow SQLite store {shown} ({e}). "
                "Choose a writable output directory or another tracking URI."
            ) from None
    elif scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in (
        "true",
        "1",
    ):
        raise TrackingError(
            f"Tracking URI {shown} is a file store, which MLflow 3 refuses unless "
            "MLFLOW_ALLOW_FILE_STORE=true. Use a SQLite store instead, e.g. "
            f"{default_tracking_uri('.')}."
        )


def _rest_call(uri: str, endpoint: str, body: dict | None = None, timeout_s: float = 30):
    """One request to the tracking server's REST API, with MLflow's credentials: the URI's own
    (http://user:password@host, which MLflow's client sends as basic auth), else those of the
    environment where they are set; its answer as JSON. Errors show the URI without its
    password."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]  # urllib would read user:password@host as a host
    request = urllib.request.Request(
        f"{parts._replace(netloc=host).geturl().rstrip('/')}/api/2.0/mlflow/{endpoint}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if parts.username is not None:  # the URI's own, which win in MLflow's client too
        user, password, token = parts.username, parts.password or "", None
        user, password = urllib.parse.unquote(user), urllib.parse.unquote(password)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    elif user and password:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        raise ConnectionError(
            f"MLflow tracking server {redact(uri)} answered HTTP {e.code} to {endpoint}: "
            f"{redact(text)[:300]}"
        ) from None
    except OSError as e:  # refused, unknown host, timed out
        raise ConnectionError(
            f"MLflow tracking server {redact(uri)} is not reachable "
            f"({redact(str(getattr(e, 'reason', e)))}): start "
            "it, or point sweep.tracking_uri (or MLFLOW_TRACKING_URI) at the sweep's store"
        ) from None
