"""The one place an MlflowClient is built: one per tracking URI and process, so that a
command opens the store (and, for SQLite, its database engine) once.

MLflow retries a request to a tracking server that does not answer for about four minutes
(7 retries, backoff factor 2, 120 s timeout): a sweep whose server died would wait that long on
every call. Its client gives up within seconds on a refused connection and within about 50 s
on a server that takes no calls (HTTP_LIMITS; an environment that sets these variables keeps
its own values), and a server that stopped answering is remembered with its error
(`server_lost`), so that closing the sweep's runs after the failure does not wait for it again.

A tracking URI is taken as it is or as `redact.hide` showed it (what Tune pickles keeps that:
the trial callback's URI in tuner.pkl); the sweep's driver opens the client of the URI with its
password before Tune restores its callbacks."""

from __future__ import annotations

import fcntl
import functools
import os
from pathlib import Path

from mlflow.tracking import MlflowClient

from sweeps.config import SweepConfig
from sweeps.redact import hide, redact, unhide
from sweeps.tracking.store import TrackingError

#: MLflow's settings of its HTTP requests, for a tracking server: 3 retries 0, 2 and 4 s apart
#: (MLflow adds up to 1 s of jitter to each), each try waiting at most 10 s for an answer.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}

_lost: dict[str, TrackingError] = {}  # redacted tracking URI -> how its server stopped answering


def mlflow_client(tracking_uri: str) -> MlflowClient:
    """The client of `tracking_uri`, or of the URI that `hide` showed as `tracking_uri`."""
    return _client(unhide(hide(tracking_uri)))


@functools.lru_cache(maxsize=8)
def _client(tracking_uri: str) -> MlflowClient:
    if tracking_uri.split(":", 1)[0].lower() in ("http", "https"):
        for name, value in HTTP_LIMITS.items():  # read by MLflow at each request
            os.environ.setdefault(name, value)
    if not tracking_uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri)
    # The client creates and migrates a new SQLite store's schema, which two processes doing
    # at once both crash in (duplicate tables, alembic's version row): one at a time.
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return MlflowClient(tracking_uri)


def sweep_client(sweep: SweepConfig) -> MlflowClient:
    """The client of a sweep's tracking store (`sweep.tracking_uri` as resolved)."""
    return mlflow_client(sweep.resolved_tracking_uri())


def tracking_failure(tracking_uri: str, error: Exception, doing: str) -> TrackingError:
    """`error`, raised by an MLflow call on `tracking_uri` while `doing` something, as a
    one-line TrackingError without credentials. A server that did not answer (refused, timed
    out, or failing until MLflow's retries ran out) is remembered as lost."""
    uri = hide(tracking_uri)
    cause = _no_answer(error)
    if cause is None:
        text = redact(" ".join(str(getattr(error, "message", None) or error).split()))
        return TrackingError(f"MLflow tracking store {uri} failed while {doing}: {text[:300]}")
    _lost[uri] = TrackingError(
        f"MLflow tracking server {uri} stopped answering while {doing} ({cause}); the sweep "
        "stopped with its trials' state kept: once the server answers again, `sae-sweep "
        "resume` with the same arguments goes on from here"
    )
    return _lost[uri]


def read_failure(tracking_uri: str, error: Exception) -> TrackingError:
    """`error`, raised by an MLflow call reading a sweep's trials back (`best`, `export`,
    `analyze`, `load_sweep`), as a one-line TrackingError without credentials; no sweep ends
    on it, so no server is remembered as lost."""
    cause = _no_answer(error)
    if cause is None:
        text = redact(" ".join(str(getattr(error, "message", None) or error).split()))
        return TrackingError(
            f"MLflow tracking store {hide(tracking_uri)} failed while reading the sweep's "
            f"trials: {text[:300]}"
        )
    return TrackingError(
        f"MLflow tracking server {hide(tracking_uri)} is not reachable ({cause}): start it, or "
        "point sweep.tracking_uri (or MLFLOW_TRACKING_URI) at the sweep's store"
    )


def server_lost(tracking_uri: str) -> TrackingError | None:
    """How the tracking server of `tracking_uri` stopped answering in this process, or None."""
    return _lost.get(redact(tracking_uri))


def server_answers(tracking_uri: str) -> None:
    """Forget that the server of `tracking_uri` was lost: it answered again."""
    _lost.pop(redact(tracking_uri), None)


def _no_answer(error: BaseException) -> str | None:
    """How the server failed to answer, when `error` (an MLflow client error) is about that;
    else None (it answered, with an error)."""
    import requests

    for _ in range(10):  # MlflowException <- requests <- urllib3 <- the socket's error
        if error is None:
            return None
        if isinstance(error, (requests.ConnectionError, requests.Timeout)):
            return _reason(error)
        if isinstance(error, requests.exceptions.RetryError):
            return "it answered with server errors until the retries ran out"
        error = error.__cause__ or error.__context__
    return None


def _reason(error: BaseException) -> str:
    # The innermost error says it best: "[Errno 111] Connection refused", "timed out".
    while error.__cause__ or error.__context__:
        error = error.__cause__ or error.__context__
    if isinstance(error, TimeoutError) or "timed out" in str(error).lower():
        return "no answer within MLFLOW_HTTP_REQUEST_TIMEOUT"
    text = str(getattr(error, "reason", None) or error)
    return redact(" ".join(text.split()))[:200] or type(error).__name__
