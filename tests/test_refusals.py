"""tether.refusals.RefusalLog: the first refusal's line, then a count a second."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tether.refusals import RefusalLog


def test_the_first_refusal_has_its_line_and_the_rest_a_count(
        caplog: pytest.LogCaptureFixture) -> None:
    """Three refusals within a second: the first's line, then (here at `close()`, else
    a second later) one line counting the other two; nothing more after."""
    async def main() -> None:
        lines = RefusalLog(logging.getLogger("test.fdlimit"), "%d more refused")
        for peer in ("a", "b", "c"):
            lines.refused("refused %s", peer)
        lines.close()
        lines.close()

    with caplog.at_level(logging.WARNING, logger="test.fdlimit"):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records] == ["refused a", "2 more refused"]
