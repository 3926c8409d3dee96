"""Connections a worker closed just before it is SIGKILLed are not reported closed
"down" afterwards (real processes, real SIGKILL): the worker's report of a close reaches
the supervisor in the same loop iteration as its handler gets the Closed, so once the
handler has acted on a Closed, that connection is not among the dead worker's."""

from __future__ import annotations

import os
import signal

import pytest

from test_workers import running, spread
from tether.ids import FlowId
from tether.workers import pool_of


async def test_connections_closed_just_before_a_sigkill_are_not_reported_down() -> None:
    async with running(2) as hub:
        pool = pool_of(hub)
        clients, by = await spread(hub.port, 2, each=4)
        survivor, holder = by[1][0], by[2][0]
        closed_here, closed_by_peer = by[2][1], by[2][2]
        assert await survivor.ask("WATCH") == "WATCHING"
        assert await holder.ask("WATCH") == "WATCHING"
        holder.send(f"CLOSE {closed_here.id}")
        closed_by_peer.close()
        notes = {await holder.line() for _ in range(3)}
        assert notes == {"CLOSE True", f"GONE {closed_here.id} local",
                         f"GONE {closed_by_peer.id} peer"}
        os.kill(pool.pids()[2], signal.SIGKILL)  # at once: the handler acted on both
        expected = {c.id for c in by[2]} - {closed_here.id, closed_by_peer.id}
        got = {FlowId.parse((await survivor.line()).removeprefix("DOWN "))
               for _ in expected}
        assert got == expected
        with pytest.raises(TimeoutError):  # and nothing more: one Closed per connection
            await survivor.line(0.5)
        stats = await pool.refresh_stats()
        assert stats.closed == {"local": 1, "peer": 1, "down": len(expected)}
        for c in clients:
            c.close()
