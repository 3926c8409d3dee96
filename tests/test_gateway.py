"""The gateway, in-process over real sockets: many flows at once, flow control per flow,
the registry, bad input, dying servers, round-robin.

Every test runs under both event loops (conftest.py); conftest also fails a test that
leaves a task behind or makes the loop's exception handler run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import pytest

import tether
from procs import OECHO, ProcGroup
from tether import ErrorCode, Flow, FlowClosed, FlowDown, FlowReset, FlowState, NoSuchService, wire

SETTLE = 5.0  # how long "everything has ended everywhere" may take to become true
WINDOW = 256 * 1024  # the default receive window of every hop (Node, Gateway)


# helpers ---------------------------------------------------------------------------------

async def eventually(what: str | Callable[[], str], condition: Callable[[], bool],
                     timeout: float = SETTLE) -> None:
    """Poll `condition` until true; fail after `timeout` with `what` (str or callable)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what() if callable(what) else what}")
        await asyncio.sleep(0.005)


async def registered(gw: tether.Gateway, service: str, count: int = 1) -> None:
    """Wait until `count` nodes serve `service` at `gw` (REGISTER is asynchronous)."""
    await eventually(lambda: f"{count} servers of {service!r}: {gw.services()}",
                     lambda: len(gw.services().get(service, [])) == count)


@asynccontextmanager
async def gateway(*, handshake_timeout: float = 10.0) -> AsyncIterator[tether.Gateway]:
    async with tether.Gateway("127.0.0.1:0", name="gw",
                              handshake_timeout=handshake_timeout) as gw:
        yield gw


def address(gw: tether.Gateway) -> str:
    return f"127.0.0.1:{gw.port}"


async def read_exactly(flow: Flow, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await flow.read(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


async def read_to_eof(flow: Flow) -> bytes:
    buf = bytearray()
    while chunk := await flow.read():
        buf += chunk
    return bytes(buf)


class Acceptor:
    """Accept flows at a node in a background task; `async with` cancels and awaits it."""

    def __init__(self, node: tether.Node,
                 handle: Callable[[Flow], None] | None = None) -> None:
        self.node = node
        self.handle = handle
        self.flows: list[Flow] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            flow = await self.node.accept()
            self.flows.append(flow)
            if self.handle is not None:
                self.handle(flow)

    async def __aenter__(self) -> Acceptor:
        self._task = asyncio.create_task(self._run(), name=f"accept@{self.node.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # an accept() that failed is a test failure
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def check_ended_once(node: tether.Node, made: str, expected: int) -> None:
    """`node` made `expected` flows (allocated or accepted) and ended each exactly once."""
    stats = node.stats()
    ends = stats["closed"] + stats["down"] + stats["reset"]
    assert stats[made] == expected, stats
    assert ends == expected, f"{node.name}: {expected} flows but {ends} ends: {stats}"


# 1,000 concurrent flows -------------------------------------------------------------------

N_FLOWS = 1000
N_CLIENTS = 4
MAX_PAYLOAD = 64 * 1024
SEED = 0x7E7E_0001
BEHAVIOURS = ("half-close", "dealloc", "reset")
WEIGHTS = (6, 2, 2)
EDGE_SIZES = (0, 1, 2, MAX_PAYLOAD - 1, MAX_PAYLOAD)


async def _echo(flow: Flow) -> str:
    """The server's side of one flow: echo until EOF, then close_write. Returns how the
    flow ended here."""
    try:
        while chunk := await flow.read():
            await flow.write(chunk)
        await flow.close_write()
    except FlowClosed:
        return "dealloc"  # the client deallocated: read EOF, close_write/write refused
    except FlowReset:
        return "reset"
    return "half-close"


async def _client_flow(node: tether.Node, behaviour: str, payload: bytes,
                       rng: random.Random) -> None:
    flow = await node.alloc("echo", liveness=30.0)
    cuts = sorted(rng.sample(range(1, len(payload)), min(3, len(payload) - 1))) \
        if len(payload) > 1 else []
    pieces = [payload[i:j] for i, j in zip([0, *cuts], [*cuts, len(payload)], strict=True)]

    async def send() -> None:
        for piece in pieces:
            await flow.write(piece)

    if behaviour == "half-close":
        async def send_then_fin() -> None:
            await send()
            await flow.close_write()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(send_then_fin())
            echo = tg.create_task(read_to_eof(flow))
        assert echo.result() == payload, f"{flow}: echo of {len(payload)} bytes differs"
        assert flow.state is FlowState.CLOSED, flow
        assert await flow.read() == b""
        return
    # Leave early: send everything, read a prefix of the echo (it must be right), then
    # dealloc or reset without waiting for the rest.
    await send()
    k = rng.randint(0, len(payload))
    assert await read_exactly(flow, k) == payload[:k]
    if behaviour == "dealloc":
        await flow.dealloc()
        assert flow.state is FlowState.CLOSED, flow
    else:
        await flow.reset("client gave up")
        assert flow.state is FlowState.RESET, flow


@pytest.mark.slow
async def test_thousand_concurrent_flows() -> None:
    """1,000 flows at once through one gateway, from 4 client nodes to one echo server,
    0 to 64 KiB each, ending three ways: half-close and read the whole echo; read a
    prefix of the echo and dealloc; read a prefix and reset. Every echo (and every
    prefix) is byte-exact and in order; every flow ends exactly once on each side, the
    way it was planned; nothing is left at any node or at the gateway."""
    rng = random.Random(SEED)
    plans = []
    for i in range(N_FLOWS):
        if i < len(EDGE_SIZES) * len(BEHAVIOURS):  # every behaviour with every edge size
            behaviour = BEHAVIOURS[i % len(BEHAVIOURS)]
            size = EDGE_SIZES[i // len(BEHAVIOURS)]
        else:
            behaviour = rng.choices(BEHAVIOURS, WEIGHTS)[0]
            size = rng.randint(0, MAX_PAYLOAD)
        plans.append((behaviour, rng.randbytes(size), random.Random(rng.getrandbits(64))))
    rng.shuffle(plans)
    planned = Counter(behaviour for behaviour, _, _ in plans)
    server_ends: Counter[str] = Counter()
    handlers: set[asyncio.Task[str]] = set()

    def handle(flow: Flow) -> None:
        task = asyncio.create_task(_echo(flow))
        handlers.add(task)
        task.add_done_callback(
            lambda t: t.cancelled() or t.exception() or server_ends.update([t.result()]))

    async with AsyncExitStack() as stack:
        gw = await stack.enter_async_context(gateway())
        server = await stack.enter_async_context(tether.Node("server", gateway=address(gw)))
        server.register("echo")
        await registered(gw, "echo")
        clients = [await stack.enter_async_context(
            tether.Node(f"client{i}", gateway=address(gw))) for i in range(N_CLIENTS)]
        async with Acceptor(server, handle):
            try:
                async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
                    for i, (behaviour, payload, flow_rng) in enumerate(plans):
                        tg.create_task(_client_flow(clients[i % N_CLIENTS], behaviour,
                                                    payload, flow_rng))
                # The server's ends arrive after the clients' (a hop later).
                await eventually(lambda: f"server handlers: {server_ends}, {server.stats()}",
                                 lambda: len(handlers) == N_FLOWS
                                 and all(t.done() for t in handlers))
            finally:
                for task in handlers:
                    task.cancel()
                results = await asyncio.gather(*handlers, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:5]
        assert server_ends == planned, (server_ends, planned)

        # Nothing is left anywhere, and every flow ended exactly once on both sides.
        nodes = [server, *clients]
        await eventually(lambda: f"flows left: {[n.stats()['flows'] for n in nodes]}, "
                                 f"gateway {gw.stats()}",
                         lambda: all(n.stats()["flows"] == 0 for n in nodes)
                         and gw.stats()["flows"] == 0)
        check_ended_once(server, "accepted", N_FLOWS)
        for client in clients:
            check_ended_once(client, "allocated", N_FLOWS // N_CLIENTS)
        clean = planned["half-close"] + planned["dealloc"]
        for label, counts in (("server", [server.stats()]),
                              ("clients", [c.stats() for c in clients])):
            totals = {key: sum(s[key] for s in counts) for key in ("closed", "down", "reset")}
            assert totals == {"closed": clean, "down": 0, "reset": planned["reset"]}, \
                (label, totals, planned)
        stats = gw.stats()
        assert stats["flows_spliced"] == N_FLOWS, stats
        assert stats["flows_ended"] == N_FLOWS, stats
        by_how = {how: stats[f"flows_{how}"] for how in ("closed", "refused", "down", "reset")}
        assert by_how == {"closed": clean, "refused": 0, "down": 0,
                          "reset": planned["reset"]}, (by_how, planned)
        assert stats["open_flows"] == [] and stats["bytes_up"] > 0, stats
        assert stats["protocol_errors"] == 0, stats


# flow control: a slow reader slows its own writer only ------------------------------------

@pytest.mark.slow
async def test_slow_reader_blocks_only_its_own_writer() -> None:
    """Two flows on one client link and one server link, through the gateway: the server
    never reads flow A, while flow B carries 20 MB. B completes promptly; A's writer
    stays blocked (no credit) all along, and completes once A is read."""
    rng = random.Random(2)
    data_a = rng.randbytes(2 * 1024 * 1024)  # 8x the window of each hop
    size_b = 20 * 1024 * 1024
    block = rng.randbytes(256 * 1024)
    async with gateway() as gw, \
            tether.Node("server", gateway=address(gw)) as server, \
            tether.Node("client", gateway=address(gw)) as client:
        server.register("a")
        server.register("b")
        await registered(gw, "a")
        await registered(gw, "b")
        async with asyncio.TaskGroup() as tg:
            alloc_a = tg.create_task(client.alloc("a"))
            sa = await server.accept()
        a = alloc_a.result()
        async with asyncio.TaskGroup() as tg:
            alloc_b = tg.create_task(client.alloc("b"))
            sb = await server.accept()
        b = alloc_b.result()
        assert (sa.service, sb.service) == ("a", "b")
        assert a._conn is b._conn, "both flows must share the client's one link"

        write_a = asyncio.create_task(a.write(data_a))
        try:
            done, _ = await asyncio.wait([write_a], timeout=0.2)
            assert not done, "a write of 8 windows completed with nobody reading"

            async def send_b() -> None:
                for _ in range(size_b // len(block)):
                    await b.write(block)
                await b.close_write()

            async def sink_b() -> tuple[int, str]:
                digest = hashlib.sha256()
                n = 0
                while chunk := await sb.read():
                    n += len(chunk)
                    digest.update(chunk)
                return n, digest.hexdigest()

            # B is not held back by A: its 20 MB go through in bounded time (a fraction
            # of a second here; the bound leaves room for a loaded machine). Were A's
            # unread bytes blocking the shared links, B would never complete.
            try:
                async with asyncio.timeout(20), asyncio.TaskGroup() as tg:
                    tg.create_task(send_b())
                    received = tg.create_task(sink_b())
            except TimeoutError:
                raise AssertionError("flow B stalled behind the unread flow A") from None
            expected = hashlib.sha256(block * (size_b // len(block))).hexdigest()
            assert received.result() == (size_b, expected)
            assert not write_a.done(), "A's writer finished although A was never read"
            assert a.state is FlowState.OPEN and sa.state is FlowState.OPEN
            # A's writer waits for credit, and what it could send is bounded: at most a
            # window at the server (plus at most one held by the gateway).
            assert client._conn is not None
            assert client._conn.link.send_credit(a.stream) == 0
            assert 0 < sa._buffered <= WINDOW, sa._buffered

            # Now read A: its writer gets credit and completes, every byte in order.
            async with asyncio.timeout(10):
                got = await read_exactly(sa, len(data_a))
                await write_a
            assert got == data_a
        finally:
            if not write_a.done():
                write_a.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await write_a
        await sb.close_write()
        assert await b.read() == b""
        await a.dealloc()
        assert await sa.read() == b""
        await eventually(lambda: f"{client.stats()} {server.stats()} {gw.stats()}",
                         lambda: client.stats()["flows"] == server.stats()["flows"]
                         == gw.stats()["flows"] == 0)
        check_ended_once(client, "allocated", 2)
        check_ended_once(server, "accepted", 2)


# the registry -----------------------------------------------------------------------------

async def test_alloc_of_unknown_service_raises_no_such_service_at_once() -> None:
    async with gateway() as gw, tether.Node("client", gateway=address(gw)) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(NoSuchService) as caught:
            await asyncio.wait_for(client.alloc("nobody-serves-this", liveness=10.0), 5.0)
        took = loop.time() - t0
        assert took < 0.5, took
        assert caught.value.code is ErrorCode.NO_SUCH_SERVICE
        assert "nobody-serves-this" in caught.value.reason
        assert gw.stats()["no_such_service"] == 1
        assert client.stats()["flows"] == 0
        assert gw.stats()["flows"] == 0


async def test_round_robin_across_servers() -> None:
    async with gateway() as gw, \
            tether.Node("s1", gateway=address(gw)) as s1, \
            tether.Node("s2", gateway=address(gw)) as s2, \
            tether.Node("client", gateway=address(gw)) as client:
        s1.register("rr")
        s2.register("rr")
        await registered(gw, "rr", 2)
        assert sorted(gw.services()["rr"]) == ["s1", "s2"]
        async with Acceptor(s1) as at1, Acceptor(s2) as at2:
            flows = [await asyncio.wait_for(client.alloc("rr"), 5.0) for _ in range(10)]
            await eventually("10 flows accepted",
                             lambda: len(at1.flows) + len(at2.flows) == 10)
        assert (len(at1.flows), len(at2.flows)) == (5, 5)
        assert {f.peer for f in flows} == {"gw"}  # the client's link goes to the gateway
        assert {f.peer for f in at1.flows + at2.flows} == {"client"}  # the origin, relayed
        for flow in flows:
            await flow.dealloc()
        await eventually(lambda: f"{s1.stats()} {s2.stats()} {gw.stats()}",
                         lambda: s1.stats()["flows"] == s2.stats()["flows"]
                         == gw.stats()["flows"] == 0)
        check_ended_once(s1, "accepted", 5)
        check_ended_once(s2, "accepted", 5)


async def test_round_robin_state_of_services_that_went_away_is_forgotten() -> None:
    """Nodes that come and go with service names of their own must not grow the
    gateway: the round-robin position of a service went with its last server (it was
    kept for every name ever allocated to)."""
    async with gateway() as gw, \
            tether.Node("server", gateway=address(gw)) as server, \
            tether.Node("client", gateway=address(gw)) as client:
        for i in range(50):
            service = f"svc-{i}"
            server.register(service)
            await registered(gw, service)
            async with asyncio.timeout(5), asyncio.TaskGroup() as tg:
                alloc = tg.create_task(client.alloc(service, liveness=1.0))
                served = await server.accept()
            await alloc.result().dealloc()
            await served.dealloc()
            server.unregister(service)
            await eventually(lambda: str(gw.services()), lambda: not gw.services())
        assert not gw._services
        assert len(gw._rr) == 0, f"{len(gw._rr)} round-robin entries for 0 services"


async def _oecho_round(gw: tether.Gateway, service: str = "oecho") -> None:
    """One oecho exchange through `gw`: alloc, write, reply, server deallocs, EOF."""
    async with tether.Node("oecho-server", gateway=address(gw)) as server, \
            tether.Node("oecho-client", gateway=address(gw)) as client:
        server.register(service)
        await registered(gw, service)
        async with asyncio.timeout(5), asyncio.TaskGroup() as tg:
            alloc = tg.create_task(client.alloc(service, liveness=1.0))
            served = await server.accept()
        flow = alloc.result()
        await flow.write(b"Client says hi!")
        msg = await asyncio.wait_for(served.read(), 5.0)
        await served.write(msg)
        await served.dealloc()
        assert await asyncio.wait_for(flow.read(), 5.0) == b"Client says hi!"
        assert await asyncio.wait_for(flow.read(), 0.5) == b""


# a server that dies -----------------------------------------------------------------------

@pytest.mark.parametrize("death", ["abort", "sigkill"])
async def test_dead_server_leaves_registry_and_its_flows_go_down(death: str) -> None:
    """A server node's link ends abruptly (its transport aborted in-process, or its
    process SIGKILLed): the gateway drops it from the registry, a new alloc raises
    NoSuchService, and the client's flow to it goes DOWN "link lost" at once."""
    async with gateway() as gw, tether.Node("client", gateway=address(gw)) as client:
        with ProcGroup() as procs:
            server: tether.Node | None = None
            kill: Callable[[], object]
            if death == "abort":
                server = node = tether.Node("oecho-server", gateway=address(gw))
                await node.start()
                node.register("oecho")
                kill = _abort_link(node)
            else:
                proc = procs.start("oecho-server", [
                    *_oecho_argv(gw), "server", "--hold", "--name", "oecho-server"])
                await asyncio.to_thread(proc.expect, r"^ready$")
                kill = proc.kill
            try:
                await registered(gw, "oecho")
                assert gw.services() == {"oecho": ["oecho-server"]}
                async with asyncio.timeout(10):
                    if server is not None:
                        async with asyncio.TaskGroup() as tg:
                            alloc = tg.create_task(client.alloc("oecho", liveness=30.0))
                            served = await server.accept()
                        flow = alloc.result()
                        await flow.write(b"Client says hi!")
                        await served.write(await served.read())  # echo, hold the flow
                    else:
                        flow = await client.alloc("oecho", liveness=30.0)
                        await flow.write(b"Client says hi!")
                    assert await flow.read() == b"Client says hi!"
                pending = asyncio.create_task(flow.read())
                done, _ = await asyncio.wait([pending], timeout=0.05)
                assert not done, "the second read returned while the server held the flow"

                loop = asyncio.get_running_loop()
                t0 = loop.time()
                kill()
                with pytest.raises(FlowDown) as caught:
                    await asyncio.wait_for(pending, 5.0)
                took = loop.time() - t0
                assert type(caught.value) is FlowDown, caught.value  # not PeerDown
                assert caught.value.reason == "link lost"
                assert caught.value.code is ErrorCode.FLOW_DOWN
                assert flow.state is FlowState.DOWN
                assert took < 0.5, took

                await eventually(lambda: f"registry {gw.services()}",
                                 lambda: "oecho" not in gw.services())
                with pytest.raises(NoSuchService):
                    await asyncio.wait_for(client.alloc("oecho"), 5.0)
                await eventually(lambda: f"{client.stats()} {gw.stats()}",
                                 lambda: client.stats()["flows"] == gw.stats()["flows"] == 0)
                check_ended_once(client, "allocated", 1)
                assert client.stats()["down"] == 1
                assert gw.stats()["links"] == 1  # the client's
                if server is not None:
                    assert server.stats()["links_lost"] == 1
                    assert server.stats()["down"] == 1
                    assert server.stats()["flows"] == 0
            finally:
                if server is not None:
                    await server.aclose()


def _abort_link(node: tether.Node) -> Callable[[], None]:
    def abort() -> None:
        conn = node._conn
        assert conn is not None and conn.transport is not None
        conn.transport.abort()
    return abort


def _oecho_argv(gw: tether.Gateway) -> list[str]:
    return [sys.executable, str(OECHO), "--gateway", address(gw)]


# bad input --------------------------------------------------------------------------------

def _only_goaway(data: bytes) -> wire.GoAway:
    """What a refused raw connection received before EOF: one GOAWAY, and nothing else
    (the acceptor says why it closes, §6.1 and §6.7 of docs/protocol.md; it sends no
    HELLO before it has accepted the client's)."""
    assert data, "the connection was closed without a GOAWAY"
    frames = wire.FrameDecoder().feed(data)
    assert len(frames) == 1 and isinstance(frames[0], wire.GoAway), frames
    return frames[0]


async def test_garbage_is_refused_logged_counted_and_gateway_keeps_serving(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tether.gateway")
    async with gateway() as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 5.0)  # everything, up to EOF
            assert reader.at_eof()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        goaway = _only_goaway(data)
        assert (goaway.last_stream, goaway.code) == (0, ErrorCode.PROTOCOL_ERROR), goaway
        assert "protocol error" in goaway.reason, goaway
        assert gw.stats()["protocol_errors"] == 1, gw.stats()
        warnings = [r for r in caplog.records if r.name == "tether.gateway"
                    and r.levelno == logging.WARNING and "protocol error" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        assert gw.stats()["links"] == 0

        await _oecho_round(gw)
        assert gw.stats()["protocol_errors"] == 1, gw.stats()
        assert gw.stats()["flows_spliced"] == 1


async def test_silent_connection_is_closed_after_handshake_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tether.gateway")
    timeout = 0.3
    async with gateway(handshake_timeout=timeout) as gw:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            try:
                data = await asyncio.wait_for(reader.read(), timeout + 2.0)  # up to EOF
            except TimeoutError:
                raise AssertionError(f"a silent connection still open {timeout + 2.0}s "
                                     f"after its accept (handshake timeout {timeout}s)"
                                     ) from None
            took = loop.time() - t0
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        # The deadline counts from the accept, which follows t0; one wheel tick of
        # resolution and some scheduling on top. Not before it: a client may take its
        # time to say HELLO.
        assert timeout - 0.01 <= took <= timeout + 0.5, took
        # The gateway says why (GOAWAY HANDSHAKE_FAILED), then closes.
        assert _only_goaway(data) == wire.GoAway(
            last_stream=0, code=ErrorCode.HANDSHAKE_FAILED,
            reason=f"handshake not completed within {timeout:g}s")
        assert gw.stats()["protocol_errors"] == 1, gw.stats()
        assert any("handshake" in r.getMessage() for r in caplog.records
                   if r.name == "tether.gateway" and r.levelno == logging.WARNING), \
            [r.getMessage() for r in caplog.records]
        await _oecho_round(gw)


@pytest.mark.parametrize("server", ["gateway", "listening node"])
async def test_close_ends_connections_still_in_their_handshake(server: str) -> None:
    """A client that connected and said nothing yet (no HELLO) is no link of the
    server's yet: closing the server left its connection open until the handshake
    timeout (10 s), and on Python >= 3.12 `aclose()` itself waited that long
    (`Server.wait_closed()` waits for every accepted connection)."""
    if server == "gateway":
        closer: tether.Gateway | tether.Node = tether.Gateway("127.0.0.1:0", name="gw")
    else:
        closer = tether.Node("n", listen="127.0.0.1:0")
    await closer.start()
    port = closer.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.sleep(0.05)  # accepted: in its handshake
        await asyncio.wait_for(closer.aclose(), 2)
        assert await asyncio.wait_for(reader.read(), 2) == b""  # not 10 s later
    finally:
        writer.close()
