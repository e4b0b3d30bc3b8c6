"""Resume's repair of a Tune experiment whose driver was killed while Tune wrote its snapshot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ray

from sweeps import storage


def set_aside_torn_snapshot(path: str) -> list[str]:
    """Rename to `*.torn` the newest session's snapshot files (`experiment_state-<session>.json`
    and the searcher's state) when one is cut short, and so on back; return the names.

    Tune writes and copies them in place, so a driver killed mid-write can leave one empty or
    truncated, and Tune would then log the error and start the sweep again from nothing. With
    the session set aside whole (the searcher must match the trials), resume takes the one
    before. Object stores (s3://...) never hold a part-written object."""
    if storage.is_uri(path) or not Path(path).is_dir():  # killed before Tune saved anything
        return []
    sessions: dict[str, list[Path]] = {}
    for p in Path(path).iterdir():
        if m := _SNAPSHOT.fullmatch(p.name):
            sessions.setdefault(m[1], []).append(p)
    set_aside = []
    for session in sorted(sessions, reverse=True):
        files = sessions[session]
        if any(p.name.startswith("experiment_state-") for p in files) and all(
            map(_readable, files)
        ):
            break
        for p in files:
            p.rename(p.with_name(p.name + ".torn"))
            set_aside.append(p.name)
    return set_aside


# Tune's per-session snapshot files; its temporary files (tmp-*, .*) are not among them.
_SNAPSHOT = re.compile(r"(?!tmp-)[a-z_-]+-(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)\.(?:json|pkl)")


def _readable(path: Path) -> bool:
    data = path.read_bytes()
    for load in (json.loads, ray.cloudpickle.loads):  # Tune pickles some of its *.json too
        try:
            load(data)
            return True
        except Exception:  # cut short: any error a partial file can raise
            pass
    return False
