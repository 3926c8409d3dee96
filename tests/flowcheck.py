"""One conformance suite for every transport a flow can take (trio's `_check_streams.py`).

    await check_flow(make_pair)

`make_pair()` is an async context manager factory: each call builds a fresh, isolated
transport (nodes, and gateways or TLS if the transport has them) and yields a
`FlowEnv`, whose `open()` returns a fresh connected `(client Flow, server Flow)` pair.
Every check runs in an environment of its own, so a check that breaks its transport on
purpose (liveness: a server that goes silent) cannot disturb the next one, and after
every check the suite verifies the "exactly one end" contract: no flow is left at
either node or at any relay, and every flow a node allocated or accepted was ended
exactly once (its closed + down + reset counters add up).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

import tether
from tether import Flow, FlowClosed, FlowDown, FlowReset, FlowState, PeerDown
from tether.link import LinkConfig

__all__ = ["CHECKS", "FlowEnv", "MakePair", "check_flow", "mute_sender"]

# A check must finish well within this; a hang is a failure, not a pytest-timeout.
CHECK_TIMEOUT = 15.0
# How long the "nothing is left" conditions may take to settle after a check.
SETTLE_TIMEOUT = 2.0
_NODE_DEFAULT: Any = object()


@dataclass
class FlowEnv:
    """A transport under test: a client node, a server node offering `service`, and
    whatever relays (gateways) sit in between. `window` is the receive window every
    hop gives its sender."""

    client: tether.Node
    server: tether.Node
    service: str
    window: int
    relays: Sequence[tether.Gateway] = ()
    opened: int = field(default=0, init=False)

    async def open(self, *, liveness: Any = _NODE_DEFAULT,
                   mode: str = "half-close") -> tuple[Flow, Flow]:
        """Allocate a flow at the client and accept it at the server. `liveness` in
        seconds (None: none); the client node's default if not given."""
        kwargs: dict[str, Any] = {"mode": mode}
        if liveness is not _NODE_DEFAULT:
            kwargs["liveness"] = liveness
        async with asyncio.TaskGroup() as tg:
            client = tg.create_task(self.client.alloc(self.service, **kwargs))
            server = tg.create_task(self.server.accept())
        c, s = client.result(), server.result()
        assert c.state is FlowState.OPEN, c
        assert s.state is FlowState.OPEN, s
        assert s.service == self.service
        self.opened += 1
        return c, s


MakePair = Callable[[], AbstractAsyncContextManager[FlowEnv]]
Check = Callable[[FlowEnv], Awaitable[None]]


async def check_flow(make_pair: MakePair, checks: Sequence[str] | None = None) -> None:
    """Run the conformance checks (all, or those named in `checks`) over `make_pair`."""
    for name in checks if checks is not None else CHECKS:
        async with make_pair() as env:
            try:
                async with asyncio.timeout(CHECK_TIMEOUT):
                    await CHECKS[name](env)
                await _check_all_ended(env)
            except BaseException as exc:
                exc.add_note(f"flowcheck: check {name!r} failed")
                raise


# helpers ---------------------------------------------------------------------------------

def _blob(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


async def read_exactly(flow: Flow, n: int, *, max_chunk: int = -1) -> bytes:
    """Read exactly `n` bytes; fails on an early EOF."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await flow.read(max_chunk)
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


async def read_to_eof(flow: Flow, *, rng: random.Random | None = None) -> bytes:
    """Read until EOF (`b""`), with assorted `max` sizes when `rng` is given."""
    buf = bytearray()
    while True:
        size = rng.choice((-1, -1, 1, 3, 4096, 65536, 100_001)) if rng else -1
        chunk = await flow.read(size)
        if not chunk:
            return bytes(buf)
        assert size < 0 or len(chunk) <= size, f"read({size}) returned {len(chunk)} bytes"
        buf += chunk


async def _no_flows_left(label: str, stats: Callable[[], dict[str, Any]],
                         timeout: float = SETTLE_TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (now := stats())["flows"] != 0:
        if loop.time() >= deadline:
            raise AssertionError(f"{label} still holds flows after {timeout}s: {now}")
        await asyncio.sleep(0.005)


async def _check_all_ended(env: FlowEnv) -> None:
    """Exactly one end: nothing is left anywhere, and every flow ended once."""
    holders: list[tuple[str, tether.Node | tether.Gateway]] = [
        ("client node", env.client), ("server node", env.server),
        *((f"gateway {gw.name}", gw) for gw in env.relays)]
    for label, holder in holders:
        await _no_flows_left(label, holder.stats)
    for label, node, made in (("client", env.client, "allocated"),
                              ("server", env.server, "accepted")):
        counters = node.stats()
        ends = counters["closed"] + counters["down"] + counters["reset"]
        assert counters[made] == env.opened, (label, counters)
        assert ends == env.opened, f"{label}: {env.opened} flows but {ends} ends: {counters}"


class _MuteTransport:
    """A transport that drops everything written to it: the network between this side
    and its peer stopped carrying this side's bytes (a cut cable, a frozen process),
    while the socket itself stays open."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.dropped = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.dropped += len(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def mute_sender(flow: Flow) -> _MuteTransport:
    """From now on, drop every byte the link carrying `flow` sends at this end.

    This simulates the network, not the code under test: the LinkConnection, its
    timers and its liveness logic run untouched; only the bytes it hands to the
    transport never reach the wire. (uvloop's transports are extension types whose
    methods cannot be patched, so the transport is wrapped instead.)
    """
    conn = flow._conn
    assert conn.transport is not None, "the flow's link has no transport"
    mute = _MuteTransport(conn.transport)
    conn.transport = mute  # type: ignore[assignment]
    return mute


# the checks ------------------------------------------------------------------------------

ORDERING_SIZES = (1, 2, 3, 7, 100, 1000, 4095, 4096, 4097, 65535, 65536, 65537,
                  100_000, 199_999, 200_000)


async def check_ordering(env: FlowEnv) -> None:
    """Many writes of 1 byte to 200 kB each way at once arrive in order, byte-exact."""
    c, s = await env.open()
    rng = random.Random(0x7E7E)
    sizes = list(ORDERING_SIZES) + [rng.randint(1, 200_000) for _ in range(5)]
    rng.shuffle(sizes)
    up = [_blob(rng, n) for n in sizes]
    down = [_blob(rng, n) for n in reversed(sizes)]

    async def send(flow: Flow, blobs: list[bytes]) -> None:
        for blob in blobs:
            await flow.write(blob)
        await flow.close_write()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(send(c, up))
        tg.create_task(send(s, down))
        at_server = tg.create_task(read_to_eof(s, rng=random.Random(1)))
        at_client = tg.create_task(read_to_eof(c, rng=random.Random(2)))
    assert at_server.result() == b"".join(up)
    assert at_client.result() == b"".join(down)
    assert await c.read() == b""
    assert await s.read() == b""


async def check_half_close_client_first(env: FlowEnv) -> None:
    """Client close_write: the server reads the rest then EOF, and can still answer."""
    c, s = await env.open()
    request = b"request:" + _blob(random.Random(3), 10_000)
    await c.write(request)
    await c.close_write()
    await c.close_write()  # idempotent
    assert c.state is FlowState.LOCAL_FIN
    with pytest.raises(FlowClosed):
        await c.write(b"more")
    assert await read_to_eof(s) == request
    assert await s.read() == b"", "EOF must repeat"
    assert s.state is FlowState.REMOTE_FIN
    reply = b"reply:" + _blob(random.Random(4), 3 * env.window)  # more than a window
    async with asyncio.TaskGroup() as tg:
        tg.create_task(s.write(reply))
        got = tg.create_task(read_exactly(c, len(reply)))
    assert got.result() == reply
    await s.close_write()
    # cast: mypy keeps s.state narrowed to REMOTE_FIN across the await
    assert cast(FlowState, s.state) is FlowState.CLOSED
    assert await c.read() == b""
    # cast: mypy keeps c.state narrowed to LOCAL_FIN across the awaits
    assert cast(FlowState, c.state) is FlowState.CLOSED


async def check_half_close_server_first(env: FlowEnv) -> None:
    """The mirror: the server half-closes first, the client reads EOF and answers."""
    c, s = await env.open()
    greeting = b"hello:" + _blob(random.Random(5), 2 * env.window)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(s.write(greeting))
        got = tg.create_task(read_exactly(c, len(greeting)))
    assert got.result() == greeting
    await s.close_write()
    assert s.state is FlowState.LOCAL_FIN
    with pytest.raises(FlowClosed):
        await s.write(b"more")
    assert await c.read() == b""
    assert await c.read() == b""
    assert c.state is FlowState.REMOTE_FIN
    await c.write(b"bye")
    await c.close_write()
    # cast: mypy keeps c.state narrowed to REMOTE_FIN across the await
    assert cast(FlowState, c.state) is FlowState.CLOSED
    assert await read_to_eof(s) == b"bye"
    # cast: mypy keeps s.state narrowed to LOCAL_FIN across the awaits
    assert cast(FlowState, s.state) is FlowState.CLOSED


async def check_dealloc(env: FlowEnv) -> None:
    """Server writes then deallocs: the client reads the data, then EOF at once (no
    waiting for a timeout), and its writes raise FlowClosed."""
    c, s = await env.open()
    data = _blob(random.Random(6), env.window // 2)
    await s.write(data)
    await s.dealloc()
    await s.dealloc()  # idempotent
    assert s.state is FlowState.CLOSED
    with pytest.raises(FlowClosed):
        await s.write(b"x")
    assert await read_exactly(c, len(data)) == data
    assert await asyncio.wait_for(c.read(), 1.0) == b""
    assert c.state is FlowState.CLOSED
    with pytest.raises(FlowClosed):
        await c.write(b"too late")
    await c.dealloc()  # a no-op on a closed flow
    assert await c.read() == b""


async def check_reset(env: FlowEnv) -> None:
    """A reset at one end makes the other's pending read, and its writes, raise
    FlowReset with the reason; both directions."""
    for resetter_is_client in (True, False):
        c, s = await env.open()
        resetter, victim = (c, s) if resetter_is_client else (s, c)
        await resetter.write(b"partial")
        assert await read_exactly(victim, 7) == b"partial"
        pending = asyncio.create_task(victim.read())
        await asyncio.sleep(0.01)
        assert not pending.done()
        await resetter.reset("boom")
        assert resetter.state is FlowState.RESET
        with pytest.raises(FlowReset) as caught:
            await asyncio.wait_for(pending, 2.0)
        assert "boom" in caught.value.reason, caught.value.reason
        assert victim.state is FlowState.RESET
        with pytest.raises(FlowReset):
            await victim.write(b"x")
        with pytest.raises(FlowReset):
            await victim.read()


async def check_backpressure(env: FlowEnv) -> None:
    """A reader that does not read stops its writer (credit exhausted); once it reads,
    the write completes and every byte arrives."""
    c, s = await env.open()
    data = _blob(random.Random(7), 10 * env.window)
    write = asyncio.create_task(c.write(data))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(write), 0.3)
    assert not write.done(), "a write of 10x the window completed with nobody reading"
    got = await read_exactly(s, len(data))
    await asyncio.wait_for(write, 5.0)
    assert got == data
    await c.close_write()
    assert await s.read() == b""
    await s.close_write()
    assert await c.read() == b""


LIVENESS = 0.2
LIVENESS_TICK = LinkConfig(name="-").tick  # the link's timing-wheel resolution
LIVENESS_SLACK = 0.09  # loop latency, scheduling and the hop(s) on a loaded machine


async def check_liveness(env: FlowEnv) -> None:
    """A silent (not closed) server: the client's pending read raises PeerDown
    "unresponsive peer" after the liveness timeout, not before, not much later; the
    server end learns that the flow is DOWN too."""
    c, s = await env.open(liveness=LIVENESS)
    assert c.liveness == pytest.approx(LIVENESS)
    loop = asyncio.get_running_loop()
    # The client times the silence from the last frame it *received* on the flow. A
    # keepalive the server sent up to a quarter timeout before the cut could be that
    # frame, so timing from the cut alone only bounds the expiry below by 0.75 x
    # timeout. Instead the server's last frame is a DATA frame sent after `t0`, and then
    # the server goes silent at once: the client's last receipt is in [t0, cut + one
    # network hop], hence DOWN no earlier than t0 + timeout (exact lower bound) and no
    # later than t0 + timeout + one wheel tick + slack (the cut follows the write
    # immediately, in the same loop iteration).
    t0 = loop.time()
    await s.write(b"last words")
    mute = mute_sender(s)
    assert await c.read() == b"last words"
    with pytest.raises(PeerDown) as caught:
        await c.read()
    elapsed = loop.time() - t0
    assert caught.value.reason == "unresponsive peer"
    assert caught.value.code is tether.ErrorCode.FLOW_PEER
    assert c.state is FlowState.DOWN
    # (less a rounding error: uvloop's clock counts milliseconds, so the last receipt
    # can be t0 itself, and the wheel fires at exactly t0 + LIVENESS, whose difference
    # with t0 can come out a few 1e-12 short in floating point)
    assert LIVENESS - 1e-9 <= elapsed <= LIVENESS + LIVENESS_TICK + LIVENESS_SLACK, elapsed
    with pytest.raises(PeerDown):
        await c.read()  # DOWN for ever
    with pytest.raises(PeerDown):
        await c.write(b"x")
    # The server still hears the client: the client's RESET (DOWN) reaches it (through
    # the relay, which turns the end of one side into the end of the other).
    with pytest.raises(FlowDown):
        await asyncio.wait_for(s.read(), 2.0)
    assert s.state is FlowState.DOWN
    assert mute.dropped > 0, "the silent server had keepalives due: they were dropped"


async def check_idle_keepalive(env: FlowEnv) -> None:
    """The converse of `check_liveness`: a healthy flow with nothing to say stays up for
    several liveness timeouts (keepalives flow end to end, through relays too)."""
    c, s = await env.open(liveness=LIVENESS)
    pending = asyncio.create_task(c.read())
    await asyncio.sleep(3 * LIVENESS)
    assert not pending.done(), pending
    assert c.state is FlowState.OPEN and s.state is FlowState.OPEN
    await s.write(b"still here")
    assert await asyncio.wait_for(pending, 1.0) == b"still here"
    await s.close_write()
    assert await c.read() == b""
    await c.close_write()


async def check_async_iteration(env: FlowEnv) -> None:
    """`async for chunk in flow` yields the data, then ends at EOF."""
    c, s = await env.open()
    rng = random.Random(8)
    parts = [_blob(rng, n) for n in (1, 10, 1000, 70_000, 3)]

    async def serve() -> None:
        for part in parts:
            await s.write(part)
        await s.close_write()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(serve())
        chunks = [chunk async for chunk in c]
    assert all(chunks), "async iteration yielded an empty chunk"
    assert b"".join(chunks) == b"".join(parts)
    assert [chunk async for chunk in c] == [], "a second iteration must end at once"
    await c.close_write()
    assert c.state is FlowState.CLOSED


CHECKS: dict[str, Check] = {
    "ordering": check_ordering,
    "half_close_client_first": check_half_close_client_first,
    "half_close_server_first": check_half_close_server_first,
    "dealloc": check_dealloc,
    "reset": check_reset,
    "backpressure": check_backpressure,
    "liveness": check_liveness,
    "idle_keepalive": check_idle_keepalive,
    "async_iteration": check_async_iteration,
}
