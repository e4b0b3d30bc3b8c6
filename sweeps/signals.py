"""Ctrl-C (SIGINT) and SIGTERM as one exception that knows its signal.

Ray's core turns an exception raised by a signal handler during ray.get/ray.wait into a plain
KeyboardInterrupt, so the signal is also kept here for whoever catches it (`received`)."""

from __future__ import annotations

import signal
import threading

_received: list[int] = []


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal; its records say KILLED and `resume` goes on."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def received() -> signal.Signals:
    """The signal that stopped the command (SIGINT when none was caught: a bare Ctrl-C)."""
    return signal.Signals(_received[-1] if _received else signal.SIGINT)


def _interrupt(signum, frame):
    _received.append(signum)
    # a second signal stops the clean-up: Python's own handlers
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Interrupted(signum)


def catch() -> None:
    """SIGINT and SIGTERM raise Interrupted in the main thread. Call it again after ray.init,
    whose SIGTERM handler exits at once, leaving a sweep's runs RUNNING."""
    if threading.current_thread() is threading.main_thread():
        _received.clear()
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
