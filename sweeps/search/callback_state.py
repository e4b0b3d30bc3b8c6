"""What a Tune callback keeps out of its pickle: Tuner pickles its callbacks into tuner.pkl."""

from __future__ import annotations


class LocalState:
    """For a Tune callback: Tuner pickles its callbacks into tuner.pkl, and what is local to
    this driver (underscore attributes: a console handle, a client, caches) must not travel.
    An unpickled copy makes them anew with `_reset()`."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()
