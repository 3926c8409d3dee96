"""HeldReads: the rest of a read whose stream end was passed on ahead waits until the
loop has slept, and nothing else of the thread is handled before it."""

from __future__ import annotations

import asyncio

import pytest

import tether
from linkspy import Handle, spy_on_links
from test_datapath import served_pair
from test_gateway import address, eventually, gateway, read_to_eof
from tether import heldreads
from tether.aio import LinkConnection
from tether.events import Event, FinReceived
from tether.flowstate import FlowState
from tether.heldreads import HeldReads


class _Holder:
    def __init__(self, name: str, applied: list[tuple[str, bytes]]) -> None:
        self.name = name
        self.applied = applied

    def apply_held(self, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("boom")
        self.applied.append((self.name, data))


async def test_held_reads_wait_for_the_loop_to_sleep_then_apply_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Held reads wait through turns of the loop that do not sleep, then the timer
    applies them in order. (`DELAY` stretched to 50 ms: the three turns below took
    over 1 ms once, under a loaded CI, and the timer came first.)"""
    monkeypatch.setattr(heldreads, "DELAY", 0.05)
    applied: list[tuple[str, bytes]] = []
    held = HeldReads()
    a, b = _Holder("a", applied), _Holder("b", applied)
    held.hold(a, b"1", asyncio.get_running_loop())
    held.hold(b, b"2", asyncio.get_running_loop())
    held.hold(a, b"3", asyncio.get_running_loop())
    for _ in range(3):
        await asyncio.sleep(0)  # turns of the loop that do not sleep
    assert applied == []
    await asyncio.sleep(heldreads.DELAY * 4)
    assert applied == [("a", b"1"), ("b", b"2"), ("a", b"3")]
    assert held.reads == []
    held.hold(a, b"4", asyncio.get_running_loop())  # the timer is armed again
    await asyncio.sleep(heldreads.DELAY * 4)
    assert applied[-1] == ("a", b"4")


async def test_apply_keeps_what_follows_a_read_that_raises() -> None:
    applied: list[tuple[str, bytes]] = []
    held = HeldReads()
    a = _Holder("a", applied)
    for data in (b"1", b"boom", b"2"):
        held.hold(a, data, asyncio.get_running_loop())
    with pytest.raises(RuntimeError, match="boom"):
        held.apply()
    assert applied == [("a", b"1")] and held.reads == [(a, b"2")]
    held.apply()
    assert applied == [("a", b"1"), ("a", b"2")]


def test_reads_held_by_a_loop_that_stopped_are_not_applied_in_the_next() -> None:
    applied: list[tuple[str, bytes]] = []
    held = HeldReads()
    a = _Holder("a", applied)

    async def hold(data: bytes, wait: float) -> None:
        held.hold(a, data, asyncio.get_running_loop())
        await asyncio.sleep(wait)

    asyncio.run(hold(b"left behind", 0))  # the loop ends before its timer
    assert held.reads == [(a, b"left behind")]
    asyncio.run(hold(b"new", heldreads.DELAY * 20))
    assert applied == [("a", b"new")]


async def test_a_gateway_handles_a_held_end_before_anything_else_of_its_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With the timer an hour away, the held FIN is still handled at once: the next
    callback of the thread -- here the client node's link reading the FIN the gateway
    passed on -- applies it first. So the gateway knows the server's side half-closed
    before the client has even read its EOF."""
    monkeypatch.setattr(heldreads, "DELAY", 3600.0)
    async with gateway() as gw, \
            tether.Node("server", gateway=address(gw)) as server, \
            tether.Node("client", gateway=address(gw)) as client:
        flow, peer = await served_pair(gw, server, client)
        order: list[str] = []

        def spy(conn: LinkConnection, event: Event,
                handle: Handle) -> None:
            if isinstance(event, FinReceived):
                order.append("gateway handled the FIN")
            handle(conn, event)

        spy_on_links(gw._conns, spy)
        splice, side = next(iter(gw._ends.values()))
        b = splice.b if side is splice.a else side
        await peer.close_write()
        assert await asyncio.wait_for(read_to_eof(flow), 5) == b""
        order.append("client read EOF")
        assert order == ["gateway handled the FIN", "client read EOF"]
        assert b.conn.link.flow_state(b.stream) is FlowState.REMOTE_FIN
        assert heldreads.current().reads == []
        await flow.close_write()
        assert await asyncio.wait_for(read_to_eof(peer), 5) == b""
        await eventually("the splice ended", lambda: not gw._ends)
