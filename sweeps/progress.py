"""Progress bars for every stage, and their plain form for logs.

On a terminal a bar is tqdm's, redrawn in place. Anywhere else (a file, a pipe, `nohup`, CI,
`ray job logs`) redraws would pile up as carriage-return-joined copies of the bar, so the bar
prints a plain line instead, at most every `PLAIN_INTERVAL_S` seconds, and lines written
through it (`print_line`) go out as they are.
"""

from __future__ import annotations

import sys
import time
from typing import IO

from tqdm import tqdm

#: The shortest time between two plain progress lines.
PLAIN_INTERVAL_S = 30.0


def is_terminal(stream: IO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def progress_bar(
    desc: str,
    unit: str,
    total: int | None = None,
    stream: IO | None = None,
    leave: bool = True,
    interval_s: float = PLAIN_INTERVAL_S,
):
    """A bar on `stream` (default: stderr): tqdm's on a terminal, else a PlainProgress. Both
    take update(n), set_postfix_str(text), refresh(), print_line(line) and close(), and are context
    managers."""
    stream = stream or sys.stderr
    if not is_terminal(stream):
        return PlainProgress(desc, unit, total, stream, interval_s)
    return TerminalProgress(
        total=total,
        desc=desc,
        unit=unit,
        file=stream,
        dynamic_ncols=True,
        leave=leave,
        bar_format=None if total is None else BAR_FORMAT,
    )


#: A bar with a total: done of total, elapsed and remaining time, and the caller's postfix.
BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} |{bar:20}| {elapsed}<{remaining} {postfix}"


class TerminalProgress(tqdm):
    """tqdm's bar, with `print_line`: a line printed above it."""

    def print_line(self, line: str) -> None:
        tqdm.write(line, file=self.fp)


class PlainProgress:
    """A bar for a log: no redraws. `print_line` prints a line as it is; the progress itself is a
    line `<desc>: <n>[ of <total>] <unit> in <s> s[, <rate> <unit>/s][ (<postfix>)]`, printed
    when `update` or `refresh` comes at least `interval_s` after the previous one (or the
    start)."""

    def __init__(self, desc: str, unit: str, total: int | None, stream: IO, interval_s: float):
        self.desc, self.unit, self.total = desc, unit, total
        self.stream = stream
        self.interval_s = interval_s
        self.n = 0
        self.postfix = ""
        self.started = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self.print_line(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.started
        of = f" of {self.total}" if self.total is not None else ""
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if self.total is None and elapsed else ""
        extra = f" ({self.postfix})" if self.postfix else ""
        return f"{self.desc}: {self.n}{of} {self.unit} in {elapsed:.0f} s{rate}{extra}"

    def print_line(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
