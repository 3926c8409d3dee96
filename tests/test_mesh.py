"""tether.Mesh over real loopback sockets, in one process (each test on both loops).

The multi-process scenarios (broadcast clusters, SIGKILL and restart, SIGSTOP) are in
test_mesh_procs.py; here are the API contract, the delivery guarantee through a proxy
that cuts connections, first-contact failure, queue bounds, restarts (crash and
graceful), the simultaneous-dial tie-break, bad input and TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from meshnode import Proxy
from tether import wire
from tether.aio import LinkConnection, open_link
from tether.errors import (
    ErrorCode,
    HandshakeError,
    LocalProtocolError,
    PeerUnreachable,
)
from tether.events import Event
from tether.link import LinkConfig
from tether.mesh import Failure, Mesh, Message, PeerState, QueueFull

FAST = {"liveness": 0.5, "retry_interval": 0.05, "establish_timeout": 2.0}


def free_port() -> int:
    """A port with nothing listening on it (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def eventually(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll `cond` every 5 ms until it holds; fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.005)


class Receiver:
    """Consumes a mesh's messages in the background (so that they are acknowledged)."""

    def __init__(self, mesh: Mesh) -> None:
        self.got: list[Message] = []
        self.task = asyncio.ensure_future(self._run(mesh))

    async def _run(self, mesh: Mesh) -> None:
        async for m in mesh.messages():
            self.got.append(m)

    async def wait(self, n: int, timeout: float = 5.0) -> list[Message]:
        await eventually(lambda: len(self.got) >= n, timeout, f"{n} messages, got "
                         f"{len(self.got)}")
        return self.got

    def numbers(self) -> list[int]:
        return [int(m.body) for m in self.got]

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def next_failure(mesh: Mesh, timeout: float = 5.0) -> Failure:
    return await asyncio.wait_for(anext(mesh.failures()), timeout)


@contextlib.asynccontextmanager
async def cluster(*names: str, **options: object) -> AsyncIterator[dict[str, Mesh]]:
    """Meshes on ephemeral ports, each knowing all the others."""
    kw = {**FAST, **options}
    meshes = {n: Mesh(n, listen="127.0.0.1:0", **kw) for n in names}  # type: ignore[arg-type]
    try:
        for m in meshes.values():
            await m.start()
        for m in meshes.values():
            for other in meshes.values():
                if other is not m:
                    m.add_peer(other.name, f"127.0.0.1:{other.port}")
        yield meshes
    finally:
        for m in meshes.values():
            await m.aclose()


async def crash(mesh: Mesh) -> None:
    """End `mesh` as a killed process would: sockets reset, no CLOSING, no goodbye."""
    assert mesh._server is not None
    mesh._server.close()  # nobody reconnects to the dead
    for conn in list(mesh._conns):
        if conn.transport is not None:
            conn.transport.abort()
    await asyncio.sleep(0.02)  # connection_lost runs
    await mesh.aclose()


def _all_gone(conns: list[LinkConnection], meshes: list[Mesh]) -> bool:
    return not any(c in m._conns for c in conns for m in meshes)


# the basic contract --------------------------------------------------------------------

async def test_messages_flow_both_ways_once_and_in_order() -> None:
    async with cluster("a", "b") as m:
        ra, rb = Receiver(m["a"]), Receiver(m["b"])
        n = 1000

        async def pump(src: str, dst: str) -> None:
            for i in range(n):
                await m[src].send(dst, str(i).encode(), kind=5)

        await asyncio.gather(pump("a", "b"), pump("b", "a"))
        await ra.wait(n)
        await rb.wait(n)
        assert rb.numbers() == list(range(n)) and ra.numbers() == list(range(n))
        assert {(x.remote, x.kind) for x in rb.got} == {("a", 5)}
        await eventually(lambda: m["a"].peers()["b"].queued == 0, what="all acknowledged")
        info = m["a"].peers()["b"]
        assert info.state is PeerState.UP and info.down_since is None
        assert info.counters["sent"] == n and info.counters["received"] == n
        assert info.counters["failures"] == 0 and info.incarnation == m["b"].incarnation
        assert m["a"].stats()["links"] == 1 and m["b"].stats()["links"] == 1
        await ra.stop()
        await rb.stop()


async def test_argument_errors() -> None:
    mesh = Mesh("a", peers={"b": "127.0.0.1:9", "a": "ignored:1"}, servers={"a", "b"})
    with pytest.raises(LocalProtocolError, match="not started"):
        await mesh.send("b", b"x")
    await mesh.start()
    try:
        assert list(mesh.peers()) == ["b"]
        with pytest.raises(PeerUnreachable, match="not a peer"):
            await mesh.send("c", b"x")
        with pytest.raises(PeerUnreachable, match="this node itself"):
            await mesh.send("a", b"x")
        for kind in (-1, wire.CONTROL_KIND_BASE, 0xFF10, 0x10000):
            with pytest.raises(ValueError, match="kind"):
                await mesh.send("b", b"x", kind=kind)
        with pytest.raises(ValueError, match="max_message"):
            await mesh.send("b", b"x" * (mesh.max_message + 1))
        with pytest.raises(PeerUnreachable):
            mesh.custom_broadcast(["b", "nobody"], b"x")
        assert mesh.peers()["b"].queued == 0  # nothing queued for anyone
        with pytest.raises(ValueError, match="own name"):
            mesh.add_peer("a", "127.0.0.1:1")
        with pytest.raises(PeerUnreachable):
            mesh.remove_peer("nobody")
    finally:
        await mesh.aclose()
    with pytest.raises(LocalProtocolError, match="closed"):
        await mesh.send("b", b"x")
    with pytest.raises(ValueError, match="queue_bytes"):
        Mesh("a", queue_bytes=1000)


# failure reports --------------------------------------------------------------------------

async def test_first_contact_failure_is_reported_after_establish_timeout() -> None:
    timeout = 0.4
    port = free_port()
    async with Mesh("a", peers={"ghost": f"127.0.0.1:{port}"}, liveness=0.5,
                    retry_interval=0.05, establish_timeout=timeout) as mesh:
        loop = asyncio.get_running_loop()
        assert mesh.peers()["ghost"].state is PeerState.IDLE
        t0 = loop.time()
        await mesh.send("ghost", b"hello", kind=3)
        assert mesh.peers()["ghost"].state is PeerState.CONNECTING
        failure = await next_failure(mesh)
        took = loop.time() - t0
        assert timeout - 1e-9 <= took < timeout + 0.3, took  # float subtraction of loop times
        assert failure == Failure("ghost", failure.reason, [Message("ghost", 3, b"hello")], 0)
        assert "unreachable for 0.4s" in failure.reason
        assert "cannot connect" in failure.reason, failure.reason
        info = mesh.peers()["ghost"]
        assert info.queued == 0 and info.state is PeerState.DOWN
        assert info.down_since is not None and info.counters["connect_errors"] >= 1
        assert info.counters["failures"] == 1 and info.counters["failure_reports"] == 1
        errors = info.counters["connect_errors"]
        await asyncio.sleep(0.15)  # nothing left to send: no more attempts
        assert mesh.peers()["ghost"].counters["connect_errors"] == errors


async def test_a_flood_of_failures_is_a_line_and_a_count_said_even_when_it_stops(
        caplog: pytest.LogCaptureFixture) -> None:
    """Five broadcasts handed back at once (queue full) within a second: one line for
    the first, and one counting the other four and naming the last -- said at shutdown
    too, before its second is up (the mesh's own limited lines once folded the count
    into the next such line, so a flood that stopped never had it said)."""
    port = free_port()
    body = b"x" * 1000
    limit = 3 * (len(body) + 64) + 10
    with caplog.at_level(logging.WARNING, logger="tether.mesh"):
        async with Mesh("a", peers={"b": f"127.0.0.1:{port}"}, queue_bytes=limit,
                        retry_interval=0.05, establish_timeout=5.0, max_message=1024) as a:
            for _ in range(3):
                await a.send("b", body, nowait=True)
            for i in range(5):
                assert a.broadcast(b"late %d" % i) == []
    lines = [r.getMessage() for r in caplog.records
             if r.name == "tether.mesh" and "queue full" in r.getMessage()]
    first = "mesh a: 1 message(s) to b failed (0 unconfirmed): outgoing queue full ("
    assert len(lines) == 2 and lines[0].startswith(first), lines
    assert lines[1].startswith(f"mesh a: 4 more like it within 1s; the last: {first}"), lines


async def test_queue_is_bounded_send_waits_or_raises() -> None:
    port = free_port()
    body = b"x" * 1000
    limit = 3 * (len(body) + 64) + 10
    async with Mesh("a", peers={"b": f"127.0.0.1:{port}"}, queue_bytes=limit, liveness=0.5,
                    retry_interval=0.05, establish_timeout=5.0, max_message=1024) as a:
        for _ in range(3):
            await a.send("b", body, nowait=True)
        with pytest.raises(QueueFull, match="full"):
            await a.send("b", body, nowait=True)
        # broadcasts never wait: the message comes back in a Failure
        assert a.broadcast(b"late") == []
        failure = await next_failure(a)
        assert "queue full" in failure.reason and failure.undelivered[0].body == b"late"
        waiting = asyncio.ensure_future(a.send("b", b"4" * 1000))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        async with Mesh("b", listen=f"127.0.0.1:{port}", peers={"a": "127.0.0.1:9"},
                        **FAST) as b:  # type: ignore[arg-type]
            rb = Receiver(b)
            await asyncio.wait_for(waiting, 5)
            got = await rb.wait(4)
            assert [m.body[:1] for m in got] == [b"x", b"x", b"x", b"4"]
            await rb.stop()


async def test_broadcast_variants_reach_exactly_their_sets() -> None:
    names = ["n0", "n1", "n2", "n3"]
    async with cluster(*names, servers={"n0", "n1"}) as m:
        rs = {n: Receiver(m[n]) for n in names}
        for n in names:
            assert sorted(m[n].broadcast(f"b:{n}".encode(), kind=1)) == \
                sorted(set(names) - {n})
            m[n].server_broadcast(f"s:{n}".encode(), kind=2)
            m[n].custom_broadcast([names[(names.index(n) + 1) % 4]], f"c:{n}".encode(),
                                  kind=3)
        expected = {n: {(o, 1, f"b:{o}") for o in names if o != n}
                    | ({(o, 2, f"s:{o}") for o in names if o != n} if n in ("n0", "n1")
                       else set())
                    | {(names[(names.index(n) - 1) % 4], 3,
                        f"c:{names[(names.index(n) - 1) % 4]}")}
                    for n in names}
        for n in names:
            await rs[n].wait(len(expected[n]))
        await asyncio.sleep(0.05)
        for n in names:
            got = [(x.remote, x.kind, x.body.decode()) for x in rs[n].got]
            assert len(got) == len(set(got)) and set(got) == expected[n], n
        for r in rs.values():
            await r.stop()


# connections ------------------------------------------------------------------------------

async def test_simultaneous_dial_leaves_one_link() -> None:
    async with cluster("a", "b") as m:
        ra, rb = Receiver(m["a"]), Receiver(m["b"])
        for rnd in range(3):
            for _ in range(50):  # both sides dial at the same moment
                await asyncio.gather(m["a"].send("b", b"1"), m["b"].send("a", b"1"))
            await ra.wait(50 * (rnd + 1))
            await rb.wait(50 * (rnd + 1))
            await eventually(lambda: all(len(x._conns) == 1 for x in m.values()),
                             what="one link each")
            a_conn, = m["a"]._conns
            b_conn, = m["b"]._conns
            assert a_conn.link.peer_name == "b" and b_conn.link.peer_name == "a"
            cut = [a_conn, b_conn]
            for conn in cut:  # cut it from outside, both ends: dial again at once
                assert conn.transport is not None
                conn.transport.abort()
            await eventually(functools.partial(_all_gone, cut, list(m.values())))
        assert len(ra.got) == len(rb.got) == 150
        await ra.stop()
        await rb.stop()


async def test_exactly_once_in_order_through_a_proxy_that_cuts() -> None:
    n = 3000
    async with cluster("a", "b") as m:
        with Proxy(m["b"].port) as proxy:
            m["a"].add_peer("b", f"127.0.0.1:{proxy.port}")
            rb = Receiver(m["b"])
            rng = random.Random(5)
            done = asyncio.Event()

            async def cutter() -> None:
                while not done.is_set():
                    await asyncio.sleep(rng.uniform(0.005, 0.03))
                    proxy.cut()

            cutting = asyncio.ensure_future(cutter())
            try:
                for i in range(n):  # ~30 bursts over >= 300 ms: cut every 5-30 ms
                    await m["a"].send("b", str(i).encode())
                    if i % 100 == 0:
                        await asyncio.sleep(0.01)
                await rb.wait(n, timeout=15)
            finally:
                done.set()
                await cutting
            assert rb.numbers() == list(range(n))
            info = m["a"].peers()["b"]
            assert info.counters["disconnects"] >= 3, (proxy.cuts, info)
            assert info.counters["failures"] == 0
            assert m["b"].peers()["a"].counters["duplicates"] == 0
            await eventually(lambda: m["a"].peers()["b"].queued == 0)
            await rb.stop()


async def test_silent_link_is_declared_down_within_liveness() -> None:
    liveness = 0.5
    async with cluster("a", "b", liveness=liveness, establish_timeout=5.0) as m:
        with Proxy(m["b"].port) as proxy:
            m["a"].add_peer("b", f"127.0.0.1:{proxy.port}")
            rb = Receiver(m["b"])
            await m["a"].send("b", b"0")
            await rb.wait(1)
            loop = asyncio.get_running_loop()
            proxy.freeze()
            t0 = loop.time()
            await m["a"].send("b", b"1")
            await eventually(lambda: m["a"].peers()["b"].state is not PeerState.UP,
                             timeout=2 * liveness)
            assert loop.time() - t0 <= liveness + 0.05
            assert m["a"].peers()["b"].down_since is not None
            await asyncio.sleep(0.3)
            proxy.thaw()
            await rb.wait(2)
            assert rb.numbers() == [0, 1]
            assert m["a"].peers()["b"].counters["failures"] == 0
            await rb.stop()


async def test_crashed_peer_restart_reports_unconfirmed_then_delivers_the_rest() -> None:
    port = free_port()
    async with Mesh("a", listen="127.0.0.1:0", peers={"b": f"127.0.0.1:{port}"},
                    **FAST) as a:  # type: ignore[arg-type]
        peers = {"a": f"127.0.0.1:{a.port}"}
        b = Mesh("b", listen=f"127.0.0.1:{port}", peers=peers, **FAST)  # type: ignore[arg-type]
        await b.start()
        for i in range(5):  # b's application never takes them: never acknowledged
            await a.send("b", str(i).encode())
        await eventually(lambda: b.peers()["a"].counters["received"] == 5)
        old = b.incarnation
        await crash(b)
        await eventually(lambda: a.peers()["b"].state is not PeerState.UP)
        for i in range(5, 8):
            await a.send("b", str(i).encode())
        async with Mesh("b", listen=f"127.0.0.1:{port}", peers=peers,
                        **FAST) as b2:  # type: ignore[arg-type]
            assert b2.incarnation != old
            rb = Receiver(b2)
            failure = await next_failure(a)
            assert [int(x.body) for x in failure.undelivered] == [0, 1, 2, 3, 4]
            assert failure.unconfirmed == 5 and "restarted" in failure.reason
            await rb.wait(3)
            assert rb.numbers() == [5, 6, 7]
            assert a.peers()["b"].incarnation == b2.incarnation
            await rb.stop()


async def test_graceful_restart_hands_the_rest_to_the_next_incarnation() -> None:
    port = free_port()
    peers = {"a": "127.0.0.1:9"}  # a does not listen: b never dials it
    async with Mesh("a", peers={"b": f"127.0.0.1:{port}"}, **FAST) as a:  # type: ignore[arg-type]
        b = Mesh("b", listen=f"127.0.0.1:{port}", peers=peers, **FAST)  # type: ignore[arg-type]
        await b.start()
        for i in range(5):
            await a.send("b", str(i).encode())
        it = b.messages()
        assert (await anext(it)).body == b"0"
        assert (await anext(it)).body == b"1"  # consumed 0; 1 taken
        await eventually(lambda: b.peers()["a"].counters["received"] == 5)
        await b.aclose()  # 0 and 1 consumed; 2..4 discarded, and a is told so
        with pytest.raises(StopAsyncIteration):
            await anext(it)
        await eventually(lambda: a.peers()["b"].state is not PeerState.UP)
        async with Mesh("b", listen=f"127.0.0.1:{port}", peers=peers,
                        **FAST) as b2:  # type: ignore[arg-type]
            rb = Receiver(b2)
            await rb.wait(3)
            assert rb.numbers() == [2, 3, 4]
            await eventually(lambda: a.peers()["b"].queued == 0)
            assert a.peers()["b"].counters["failures"] == 0
            await rb.stop()


async def test_remove_and_add_peer() -> None:
    async with cluster("a", "b") as m:
        a = m["a"]
        a.add_peer("ghost", f"127.0.0.1:{free_port()}")
        await a.send("ghost", b"x")
        a.remove_peer("ghost")
        failure = await next_failure(a)
        assert failure.remote == "ghost" and "removed" in failure.reason
        with pytest.raises(PeerUnreachable):
            await a.send("ghost", b"x")
        rb = Receiver(m["b"])
        a.remove_peer("b")
        a.add_peer("b", f"127.0.0.1:{m['b'].port}")
        await a.send("b", b"again")
        await rb.wait(1)
        await rb.stop()


async def test_aclose_reports_what_is_queued_and_ends_the_iterators() -> None:
    a = Mesh("a", peers={"ghost": f"127.0.0.1:{free_port()}"}, **FAST)  # type: ignore[arg-type]
    await a.start()
    await a.send("ghost", b"1")
    await a.send("ghost", b"2")
    messages = asyncio.ensure_future(anext(a.messages()))
    await asyncio.sleep(0)
    await a.aclose()
    with pytest.raises(StopAsyncIteration):
        await messages
    reports = [f async for f in a.failures()]
    assert len(reports) == 1 and [x.body for x in reports[0].undelivered] == [b"1", b"2"]
    assert reports[0].reason.startswith("shutdown")


# bad input --------------------------------------------------------------------------------

async def _raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 5.0)  # everything, up to EOF
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


class _Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def link_event(self, conn: LinkConnection, event: Event) -> None:
        self.events.append(event)


async def test_bad_input_is_closed_logged_counted_and_the_mesh_keeps_working(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tether.mesh")
    async with cluster("a", "b", token="s3cret") as m:
        port = m["a"].port
        # garbage
        data = await _raw_exchange(port, b"GET / HTTP/1.1\r\n\r\n")
        frames = wire.FrameDecoder().feed(data) if data else []
        assert len(frames) == 1 and isinstance(frames[0], wire.GoAway) \
            and frames[0].code == ErrorCode.PROTOCOL_ERROR, frames
        # a HELLO of another protocol version
        data = await _raw_exchange(port, wire.encode(wire.Hello(name="b", version=2)))
        frames = wire.FrameDecoder().feed(data) if data else []
        assert len(frames) == 1 and isinstance(frames[0], wire.GoAway) \
            and frames[0].code == ErrorCode.VERSION_MISMATCH, frames
        # the wrong token
        with pytest.raises(HandshakeError) as info:
            await open_link("127.0.0.1", port, LinkConfig(name="b", token=b"wrong"),
                            _Collect())
        assert info.value.code == ErrorCode.BAD_TOKEN
        await eventually(lambda: m["a"].counters["protocol_errors"] == 3)
        # a node that is not a peer
        conn = await open_link("127.0.0.1", port, LinkConfig(name="mallory", token=b"s3cret"),
                               _Collect())
        ended = await asyncio.wait_for(conn.closed, 5)
        assert ended.code == ErrorCode.REFUSED and "not a peer" in ended.reason
        assert m["a"].counters["refused"] == 1
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == "tether.mesh" and r.levelno == logging.WARNING]
        assert any("protocol error: unknown frame type 0x47" in w for w in warnings), warnings
        assert any("version 2 not supported" in w for w in warnings), warnings
        assert any("bad token" in w for w in warnings), warnings
        assert any("'mallory' is an unknown node" in w for w in warnings), warnings
        # and the mesh goes on
        rb = Receiver(m["b"])
        await m["a"].send("b", b"still here")
        await rb.wait(1)
        assert m["a"].counters["protocol_errors"] == 3
        await rb.stop()


async def test_message_before_session_is_a_protocol_error(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tether.mesh")
    async with Mesh("a", listen="127.0.0.1:0", peers={"b": "127.0.0.1:9"}, **FAST) as a:  # type: ignore[arg-type]
        conn = await open_link("127.0.0.1", a.port, LinkConfig(name="b"), _Collect())
        conn.link.send_message(1, 1, b"too early", conn.now)
        conn.flush()
        ended = await asyncio.wait_for(conn.closed, 5)
        assert ended.code == ErrorCode.PROTOCOL_ERROR and "MSG before SESSION" in ended.reason
        assert a.counters["protocol_errors"] == 1


async def test_tls(tls: object) -> None:
    material = tls
    server = material.server_context()  # type: ignore[attr-defined]
    client = material.client_context()  # type: ignore[attr-defined]
    async with cluster("a", "b", tls=client, server_tls=server) as m:
        ra, rb = Receiver(m["a"]), Receiver(m["b"])
        await m["a"].send("b", b"over tls")
        await m["b"].send("a", b"back")
        assert [x.body for x in await rb.wait(1)] == [b"over tls"]
        assert [x.body for x in await ra.wait(1)] == [b"back"]
        conn, = m["a"]._conns
        assert conn.get_extra_info("ssl_object") is not None
        await ra.stop()
        await rb.stop()


def test_backoff_is_exponential_jittered_and_bounded() -> None:
    mesh = Mesh("a", retry_interval=0.3)
    delays = [[mesh._backoff(attempt) for _ in range(200)] for attempt in range(1, 12)]
    assert all(0 < d <= 0.3 for row in delays for d in row)
    assert max(delays[0]) <= 0.04 and min(delays[2]) >= 0.04  # 20 ms, doubling
    assert len({round(d, 6) for d in delays[-1]}) > 100  # jitter even at the bound


async def test_links_over_max_links_are_reset_and_their_messages_failed(
        caplog: pytest.LogCaptureFixture) -> None:
    """A node with `max_links=1` takes one peer's link; a second peer's is reset as it
    is accepted (logged, counted in `links_over_limit`), so its message comes back in a
    failure report once `establish_timeout` has passed, not lost."""
    srv = Mesh("srv", listen="127.0.0.1:0", max_links=1, **FAST)  # type: ignore[arg-type]
    a = Mesh("a", listen="127.0.0.1:0", **FAST)  # type: ignore[arg-type]
    b = Mesh("b", listen="127.0.0.1:0", **FAST)  # type: ignore[arg-type]
    for mesh in (srv, a, b):
        await mesh.start()
    for mesh in (a, b):
        mesh.add_peer("srv", f"127.0.0.1:{srv.port}")
        srv.add_peer(mesh.name, f"127.0.0.1:{mesh.port}")
    got = Receiver(srv)
    try:
        with caplog.at_level(logging.WARNING, logger="tether.mesh"):
            await a.send("srv", b"first", kind=1)
            assert [m.body for m in await got.wait(1)] == [b"first"]
            await b.send("srv", b"second", kind=1)
            failure = await next_failure(b, timeout=FAST["establish_timeout"] + 3)
            assert failure.remote == "srv", failure
            assert [m.body for m in failure.undelivered] == [b"second"], failure
        assert srv.counters["links_over_limit"] >= 1
        assert "1 link(s) open, at the limit (max_links 1)" in caplog.text
    finally:
        await got.stop()
        for mesh in (a, b, srv):
            await mesh.aclose()
