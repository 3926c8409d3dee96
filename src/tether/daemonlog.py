"""How tether's daemons log: one line per event to stderr, at little cost per line.

A relayed connection logs about ten lines at INFO across the agent, the gateway and the
connector. By default every `logging.LogRecord` also finds its caller's file and line
(walking the stack), the current thread, the process id (a `getpid(2)` system call)
and the multiprocessing process name, none of which the daemons print, and
`Formatter.formatTime` calls `localtime` and `strftime` for every line. The daemons
turn the look-ups off (the switches `logging` documents for this, in "Optimization")
and format the date and time once per second. A line then costs about a quarter less
(9.3 -> 7 us in a loop here), and a relayed connection 5-7 % less CPU across the three
daemons (docs/benchmarks.md, "CPU per connection").

Only the entry points of processes call `configure` (the `tether` command, a hub
worker): it changes `logging` for the whole process, which a library must not do on
import.
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["DEFAULT_FORMAT", "DaemonLogFormatter", "configure"]

DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DaemonLogFormatter(logging.Formatter):
    """A `logging.Formatter` whose ``%(asctime)s`` is the same text as the standard
    one's, with the date and time formatted once per second (the milliseconds per
    line). A `datefmt`, if given, is honoured the standard way."""

    def __init__(self, fmt: str = DEFAULT_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """``YYYY-MM-DD HH:MM:SS,mmm`` in local time, as `logging.Formatter`."""
        if datefmt is not None or self.datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._text = time.strftime(self.default_time_format,
                                       self.converter(record.created))
            self._second = second
        return f"{self._text},{int(record.msecs):03d}"  # default_msec_format


def configure(level: int | str, fmt: str = DEFAULT_FORMAT) -> None:
    """Log records of `level` and above to stderr in `fmt`, without the per-record
    look-ups the daemons' formats do not print. For a process's entry point only."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12 and later
        logging.logAsyncioTasks = False
    logging._srcfile = None  # no stack walk for %(pathname)s, %(lineno)d, %(funcName)s
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DaemonLogFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
