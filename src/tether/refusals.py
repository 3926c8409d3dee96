"""RefusalLog: one line for a flood of refused connections, and a count a second.

A server refusing connections for one reason (over its connection limit, no link to
its gateway) may refuse thousands a second while the reason lasts: a line each would
bury everything else in the log, no line would leave them unsaid. So the first gets
its line, and the rest a line a second that counts them.
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ["RefusalLog"]


class RefusalLog:
    """The lines for connections refused for one reason (a limit, no link): a WARNING
    for the first, then, while more come, one a second that counts them (`summary`, a
    format taking the count), so that a flood of refusals is neither a flood of lines
    nor unsaid. Needs a running loop (its timer)."""

    __slots__ = ("_log", "_summary", "_timer", "_unsaid")

    def __init__(self, log: logging.Logger, summary: str) -> None:
        self._log = log
        self._summary = summary
        self._timer: asyncio.TimerHandle | None = None
        self._unsaid = 0

    def refused(self, line: str, *args: object) -> None:
        """One connection refused: `line % args` if no line was written in the last
        second, else counted for the next summary."""
        if self._timer is not None:
            self._unsaid += 1
            return
        self._log.warning(line, *args)
        self._timer = asyncio.get_running_loop().call_later(1.0, self._tick)

    def close(self) -> None:
        """Write the count not written yet, now, and stop."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._say()

    def _tick(self) -> None:
        self._timer = None
        if self._say():
            self._timer = asyncio.get_running_loop().call_later(1.0, self._tick)

    def _say(self) -> bool:
        if not self._unsaid:
            return False
        self._log.warning(self._summary, self._unsaid)
        self._unsaid = 0
        return True
