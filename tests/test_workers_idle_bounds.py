"""An idle timeout the timing wheel cannot hold (``math.inf``, or a finite value too
large to add to a clock reading) is refused with ``ValueError`` by the caller's hub
before anything changes, whether the id is held here, by another worker (where it
used to be routed and then silently ignored by the holder) or behind the sync facade;
and a malformed IDLE record on a local link (a peer that did not check) does not break
the holder's idle timer for its other connections."""

from __future__ import annotations

import asyncio
import math
import socket

import pytest

from test_workers import TIMEOUT, linked_hubs
from tether.hub import Closed, Hub
from tether.sync import Hub as SyncHub
from tether.workers_wire import idle_record

BAD = [math.inf, 1e308]


@pytest.mark.parametrize("seconds", BAD)
async def test_a_routed_unholdable_idle_timeout_is_refused_by_the_sender(
        seconds: float) -> None:
    async with linked_hubs() as lh:
        h1, h2 = lh.hubs[1], lh.hubs[2]
        _, w1 = await asyncio.open_connection("127.0.0.1", h2.port)
        _, w2 = await asyncio.open_connection("127.0.0.1", h2.port)
        a = (await h2.recv_open()).id
        b = (await h2.recv_open()).id
        with pytest.raises(ValueError, match="idle timeout"):
            h1.set_idle_timeout(a, seconds)  # held by worker 2: refused here, not routed
        with pytest.raises(ValueError, match="idle timeout"):
            h2.set_idle_timeout(a, seconds)
        h2.set_idle_timeout(b, 0.05)
        assert await asyncio.wait_for(h2.recv_close(), TIMEOUT) == Closed(b, "idle")
        assert h2.is_open(a)
        for w in (w1, w2):
            w.close()


async def test_a_malformed_idle_record_leaves_the_holders_timer_working() -> None:
    async with linked_hubs() as lh:
        h2 = lh.hubs[2]
        _, w1 = await asyncio.open_connection("127.0.0.1", h2.port)
        _, w2 = await asyncio.open_connection("127.0.0.1", h2.port)
        a = (await h2.recv_open()).id
        b = (await h2.recv_open()).id
        h2.set_idle_timeout(a, 0.05)
        router = lh.routers[1]  # a peer that does not check: an IDLE record of inf
        d = router._dest(a)
        router._add(d, idle_record(a.serial, math.inf))
        router.flush()
        h2.set_idle_timeout(b, 0.05)
        got = {await asyncio.wait_for(h2.recv_close(), TIMEOUT) for _ in range(2)}
        assert got == {Closed(a, "idle"), Closed(b, "idle")}
        for w in (w1, w2):
            w.close()


def test_the_constructor_refuses_an_unholdable_idle_timeout() -> None:
    for seconds in BAD:
        with pytest.raises(ValueError, match="idle_timeout"):
            Hub(idle_timeout=seconds)


def test_the_sync_facade_refuses_it_and_keeps_working() -> None:
    with SyncHub() as hub:
        socks = [socket.create_connection(("127.0.0.1", hub.port), timeout=10)
                 for _ in range(2)]
        a = hub.recv_open(timeout=5).id
        b = hub.recv_open(timeout=5).id
        with pytest.raises(ValueError, match="idle timeout"):
            hub.set_idle_timeout(a, math.inf)
        hub.send(a, b"still served")
        assert socks[0].recv(100) == b"still served\n"
        hub.set_idle_timeout(b, 0.05)
        assert hub.recv_close(timeout=5) == Closed(b, "idle")
        for s in socks:
            s.close()
