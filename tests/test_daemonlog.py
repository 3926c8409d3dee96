"""`tether.daemonlog`: the daemons' log lines are the standard ones, made cheaper."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from tether.daemonlog import DEFAULT_FORMAT, DaemonLogFormatter


def _record(created: float) -> logging.LogRecord:
    record = logging.LogRecord("tether.relay", logging.INFO, __file__, 1, "flow %s ended",
                               ("7@agent",), None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return record


@given(st.lists(st.floats(min_value=0, max_value=4e9, allow_nan=False), min_size=1,
                max_size=40))
def test_lines_are_those_of_the_standard_formatter(times: list[float]) -> None:
    """In any order of timestamps (same second, next second, back in time), the cached
    date and time give exactly the standard formatter's text."""
    standard = logging.Formatter(DEFAULT_FORMAT)
    cached = DaemonLogFormatter()
    for t in sorted(times) + times:
        assert cached.format(_record(t)) == standard.format(_record(t))


def test_a_datefmt_is_honoured() -> None:
    record = _record(1_700_000_000.25)
    assert DaemonLogFormatter("%(asctime)s", "%H").format(record) == \
        logging.Formatter("%(asctime)s", "%H").format(record)


def test_configure_logs_the_daemon_format_without_caller_lookups() -> None:
    """A process configured as a daemon prints the usual line, and its records carry no
    caller, thread or process (nothing the format prints was lost)."""
    code = ("import logging, sys\n"
            "from tether import daemonlog\n"
            "daemonlog.configure('INFO')\n"
            "seen = []\n"
            "class Keep(logging.Handler):\n"
            "    def emit(self, record): seen.append(record)\n"
            "logging.getLogger().addHandler(Keep())\n"
            "logging.getLogger('tether.gateway').info('flow %s spliced', '1@gw1')\n"
            "logging.getLogger('tether.gateway').debug('not shown')\n"
            "r = seen[0]\n"
            "print(r.lineno, r.funcName == '(unknown function)', r.threadName, r.process)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tether\.gateway: "
                        r"flow 1@gw1 spliced\n", out.stderr), out.stderr
    assert out.stdout.split() == ["0", "True", "None", "None"], out.stdout
