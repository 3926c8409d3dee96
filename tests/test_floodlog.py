"""tether.floodlog.FloodLog: the first lines of a window, then one counting the rest."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tether.floodlog import FloodLog

LOGGER = "test.floodlog"


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_the_first_event_has_its_line_and_the_rest_a_count(
        caplog: pytest.LogCaptureFixture) -> None:
    """Three events within a window: the first's line, then (here at `close()`, else at
    the window's end) one line counting the other two; nothing more after."""
    async def main() -> None:
        lines = FloodLog(logging.getLogger(LOGGER), "%d more refused")
        for peer in ("a", "b", "c"):
            lines.event("refused %s", peer)
        lines.close()
        lines.close()

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        asyncio.run(main())
    assert _lines(caplog) == ["refused a", "2 more refused"]


def test_a_burst_a_window_then_a_new_window(caplog: pytest.LogCaptureFixture) -> None:
    """burst 2, window 0.2 s: five events give two lines and, at the window's end (no
    close), a count of three naming the last; an event after it opens a new window and
    has its line. At INFO, as asked."""
    async def main() -> None:
        lines = FloodLog(logging.getLogger(LOGGER), "%d more; the last: %s",
                         level=logging.INFO, burst=2, window=0.2, with_last=True)
        for i in range(5):
            lines.event("event %d", i)
        assert len(_lines(caplog)) == 2
        await asyncio.sleep(0.35)
        assert _lines(caplog)[2:] == ["3 more; the last: event 4"]
        lines.event("event %d", 5)
        lines.close()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        asyncio.run(main())
    assert _lines(caplog) == ["event 0", "event 1", "3 more; the last: event 4", "event 5"]
    assert {r.levelno for r in caplog.records if r.name == LOGGER} == {logging.INFO}


def test_a_quiet_window_says_nothing_more(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        lines = FloodLog(logging.getLogger(LOGGER), "%d more", window=0.05)
        lines.event("only one")
        await asyncio.sleep(0.15)
        lines.close()

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        asyncio.run(main())
    assert _lines(caplog) == ["only one"]


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="burst 0"):
        FloodLog(logging.getLogger(LOGGER), "%d", burst=0)
    with pytest.raises(ValueError, match="window"):
        FloodLog(logging.getLogger(LOGGER), "%d", window=0)
