"""FloodLog: the log lines of one kind of event that may come in floods.

A server refusing connections for one reason (over its connection limit, no link to
its gateway), a mesh refusing messages to a peer that does not take its failure
reports, a hub seeing TLS handshakes fail: each may happen thousands of times a second
while the cause lasts. A line each would bury everything else in the log; no line
would leave them unsaid. So the first few of a window get their lines (`burst`), and
the rest one line when the window ends, counting them (and naming the last, when that
says more than the count). The next event after a window opens a new one. Nothing is
lost: `close()` says what is still counted.

Every daemon's floods go through this one class, so they read alike: a WARNING line,
then "N more ..." within a second.
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ["FloodLog"]


class FloodLog:
    """The lines for one kind of event (see the module docstring): the first `burst`
    of each `window` seconds are logged as they come, the rest counted, and told in one
    line at the window's end: `summary % count`, or `summary % (count, last)` with
    `with_last` (`last`: the line the last counted event would have had). Needs a
    running loop (its timer)."""

    __slots__ = ("_burst", "_last", "_level", "_log", "_logged", "_summary", "_timer",
                 "_unsaid", "_window", "_with_last")

    def __init__(self, log: logging.Logger, summary: str, *, level: int = logging.WARNING,
                 burst: int = 1, window: float = 1.0, with_last: bool = False) -> None:
        if burst < 1 or not window > 0:
            raise ValueError(f"burst {burst} must be 1 or more, window {window} positive")
        self._log = log
        self._summary = summary
        self._level = level
        self._burst = burst
        self._window = window
        self._with_last = with_last
        self._timer: asyncio.TimerHandle | None = None
        self._logged = 0
        self._unsaid = 0
        self._last = ""

    def event(self, line: str, *args: object) -> None:
        """One event: `line % args` logged, or counted for the window's summary."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._window, self._tick)
            self._logged = 0
        if self._logged < self._burst:
            self._logged += 1
            self._log.log(self._level, line, *args)
            return
        self._unsaid += 1
        if self._with_last:
            self._last = line % args if args else line

    def close(self) -> None:
        """Say what is counted and not yet said, now, and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._say()

    def _tick(self) -> None:
        self._timer = None
        self._say()

    def _say(self) -> None:
        if not self._unsaid:
            return
        if self._with_last:
            self._log.log(self._level, self._summary, self._unsaid, self._last)
        else:
            self._log.log(self._level, self._summary, self._unsaid)
        self._unsaid = 0
