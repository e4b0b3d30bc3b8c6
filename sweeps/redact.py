"""URIs with their passwords replaced, for everything logged, printed or written: params, tags,
errors, reports, model cards. Credentials stay in the config (or the environment) only.

An object that Tune pickles into the sweep's storage (a callback, the searcher) keeps a URI as
`hide` shows it, and gets the URI with its password back with `unhide`, in a process that
hid that URI before (the driver checks its stores before Tune restores what it pickled)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: What a password is replaced with.
HIDDEN = "***"

_hidden: dict[str, str] = {}  # a URI as `hide` showed it -> the URI with its password

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


def hide(uri: str) -> str:
    """`uri` redacted, remembered in this process for `unhide`."""
    shown = redact(uri)
    if shown != uri:
        _hidden[shown] = uri
    return shown


def unhide(uri: str) -> str:
    """The URI with its password that `hide` showed as `uri` in this process; else `uri`."""
    return _hidden.get(uri, uri)
