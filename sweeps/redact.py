"""URIs with their passwords replaced, for everything logged, printed or written: params, tags,
errors, reports, model cards. Credentials stay in the config (or the environment) only."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: What a password is replaced with.
HIDDEN = "***"

# scheme://user:password@host: the password runs to the last "@" before the host's "/" (or a
# space), so an unescaped "@" in it is hidden too. A user alone (scheme://user@host) is kept.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)[^\s/]*(?=@)")
# ...?password=... and the like in a URI's query
_QUERY = re.compile(
    r"(?P<head>[?&](?:password|passwd|pwd|secret|token|access_token|sas_token)=)[^&\s'\"]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with the password of every URI in it replaced by ***:
    `postgresql://user:pw@host/db` -> `postgresql://user:***@host/db`."""
    text = _USERINFO.sub(rf"\g<head>{HIDDEN}", text)
    return _QUERY.sub(rf"\g<head>{HIDDEN}", text)


def redact_values(value: Any) -> Any:
    """`value` with `redact` applied to every string in it, through mappings, lists and tuples
    (a config as `dataclasses.asdict` gives it); other values as they are."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return value
