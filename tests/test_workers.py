"""Hub(workers=N): ids routed across worker processes, fan-out, a worker killed and
restarted, graceful drain, summed stats, `tether status`, the `tether hub` command, and
(slow) 4 workers holding 15,000 connections each from several client processes.

The worker processes run the handlers of tests/test_workers_apps.py. Every process a
test starts is ended by PID: the pool's ``aclose`` stops its workers by PID (and each
test checks that none is left); client processes are killed by PID in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import select
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from procs import ProcGroup
from tether import wire
from tether.admin import AdminServer, fetch_status
from tether.errors import FlowClosed, RemoteProtocolError
from tether.framing import Lines
from tether.hub import FlowsClosed, Hub
from tether.ids import FlowId
from tether.mesh import Mesh
from tether.tlsfiles import ServerTLS
from tether.workers import WorkerPool, WorkersFailed, pool_of
from tether.workers_link import LocalLink, Router
from tether.workers_wire import (
    KIND_ROUTE,
    OP_CLOSE,
    OP_FANOUT,
    OP_IDLE,
    OP_SEND,
    close_record,
    decode_closed,
    decode_down,
    encode_closed,
    encode_down,
    fanout_record,
    idle_record,
    idle_seconds,
    iter_records,
    msg,
    send_record_header,
    unpack_serials,
)

APP = "test_workers_apps:commands"
TIMEOUT = 10.0


# --- the codec (sans-IO) ---------------------------------------------------------------------

serials = st.integers(1, 2**48 - 1)
records = st.one_of(
    st.tuples(st.just(OP_SEND), serials, st.integers(1, 5), st.binary(max_size=40)),
    st.tuples(st.just(OP_CLOSE), serials),
    st.tuples(st.just(OP_IDLE), serials, st.one_of(st.none(), st.floats(0.01, 1e9))),
    st.tuples(st.just(OP_FANOUT), st.binary(max_size=40), st.lists(serials, max_size=20)),
)


def _encode(rec: tuple[Any, ...]) -> bytes:
    if rec[0] == OP_SEND:
        return send_record_header(rec[1], rec[2], len(rec[3])) + cast(bytes, rec[3])
    if rec[0] == OP_CLOSE:
        return close_record(rec[1])
    if rec[0] == OP_IDLE:
        return idle_record(rec[1], rec[2])
    return fanout_record(rec[1], rec[2])


@given(st.lists(records, max_size=20))
def test_route_records_round_trip_in_order(recs: list[tuple[Any, ...]]) -> None:
    body = b"".join(_encode(r) for r in recs)
    out = list(iter_records(body))
    assert len(out) == len(recs)
    for rec, (op, serial, count, payload) in zip(recs, out, strict=True):
        assert op == rec[0]
        if op == OP_SEND:
            assert (serial, count, payload) == rec[1:]
        elif op == OP_CLOSE:
            assert (serial, count, payload) == (rec[1], 0, b"")
        elif op == OP_IDLE:
            assert serial == rec[1] and idle_seconds(payload) == rec[2]
        else:
            cut = len(payload) - 8 * count
            assert payload[:cut] == rec[1] and list(unpack_serials(payload[cut:])) == rec[2]
    # a ROUTE message is a tether MSG frame, decodable by tether.wire
    (frame,) = wire.FrameDecoder(max_payload=wire.HARD_MAX_PAYLOAD).feed(msg(KIND_ROUTE, body))
    assert frame == wire.Msg(kind=KIND_ROUTE, seq=0, body=body)


@given(st.lists(records, min_size=1, max_size=5), st.data())
def test_truncated_or_unknown_records_raise_the_protocol_error(
        recs: list[tuple[Any, ...]], data: st.DataObject) -> None:
    body = b"".join(_encode(r) for r in recs)
    cut = data.draw(st.integers(1, len(_encode(recs[-1])) - 1))  # inside the last record
    with pytest.raises(RemoteProtocolError, match="truncated ROUTE"):
        list(iter_records(body[:-cut]))
    with pytest.raises(RemoteProtocolError, match="unknown ROUTE op 9"):
        list(iter_records(b"\x09" + body[1:]))


def test_control_bodies() -> None:
    assert decode_closed(encode_closed("slow consumer", [1, 2**40])) == \
        ("slow consumer", (1, 2**40))
    assert decode_down(encode_down(3, [7, 9])) == (3, (7, 9))
    assert msg(0xFF26, b"{}") == wire.encode(wire.Msg(kind=0xFF26, seq=0, body=b"{}"))
    with pytest.raises(RemoteProtocolError):
        unpack_serials(b"1234567")


# --- configuration errors (no process) ----------------------------------------------------


async def _handler(hub: Hub) -> None:
    """A module-level handler (never started here)."""


def test_configuration_errors_are_clear(tls: Any) -> None:
    with pytest.raises(ValueError, match="needs a handler"):
        Hub(workers=2)
    with pytest.raises(ValueError, match="workers must be an int"):
        Hub(workers=0, handler=APP)
    with pytest.raises(ValueError, match="expected 'module:function'"):
        Hub(workers=2, handler="no-colon")
    with pytest.raises(ValueError, match="module-level function"):
        Hub(workers=2, handler=lambda hub: _handler(hub))
    with pytest.raises(ValueError, match=r"takes TLS as files, tls=tether\.ServerTLS"):
        Hub(workers=2, handler=APP, tls=tls.server_context())
    with pytest.raises(FileNotFoundError):  # a bad file fails at once, not in a worker
        Hub(workers=2, handler=APP, tls=ServerTLS(str(tls.server_cert) + ".missing"))
    hub = Hub(workers=2, handler=_handler, framing=Lines(b"\r\n", 100))
    pool = pool_of(hub)
    assert isinstance(pool, WorkerPool)
    assert pool.handler == {"module": __name__, "qualname": "_handler"}
    with pytest.raises(RuntimeError, match="not started"):
        _ = hub.port
    with pytest.raises(FlowClosed):
        hub.send(FlowId("hub", 1, 1), b"x")
    with pytest.raises(ValueError, match="no workers"):
        pool_of(Hub())


# --- two hubs of one process, linked as two workers ----------------------------------------


@dataclass
class LinkedHubs:
    hubs: dict[int, Hub]
    routers: dict[int, Router]


class _Owner:
    def __init__(self, router: Router) -> None:
        self.router = router

    def link_up(self, link: LocalLink) -> None:
        pass

    def link_message(self, link: LocalLink, kind: int, body: bytes) -> None:
        assert kind == KIND_ROUTE
        self.router.apply(body)

    def link_lost(self, link: LocalLink, exc: Exception | None) -> None:
        self.router.link_lost(link)


@contextlib.asynccontextmanager
async def linked_hubs() -> AsyncIterator[LinkedHubs]:
    """Worker 1 and worker 2 of hub "h", in this process, with real local links."""
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="tether-test-") as tmp:
        hubs = {i: Hub(name="h", worker=i) for i in (1, 2)}
        routers = {i: Router(hubs[i], me=i, workers=2, max_buffer=1 << 20) for i in (1, 2)}
        servers = []
        links: list[LocalLink] = []
        for i in (1, 2):
            hubs[i]._router = routers[i]
            await hubs[i].start()
            servers.append(await loop.create_unix_server(
                lambda i=i: LocalLink(f"h/w{i}", _Owner(routers[i]), initiator=False),  # type: ignore[misc]
                f"{tmp}/w{i}.sock"))
        for i, j in ((1, 2), (2, 1)):
            _, link = await loop.create_unix_connection(
                lambda i=i: LocalLink(f"h/w{i}", _Owner(routers[i]), initiator=True),  # type: ignore[misc]
                f"{tmp}/w{j}.sock")
            links.append(link)
            routers[i].dest_up(j, 0, link)
        try:
            yield LinkedHubs(hubs, routers)
        finally:
            for link in links:
                link.close()
            for server in servers:
                server.close()
            for hub in hubs.values():
                await hub.aclose()


async def test_routed_sends_and_close_keep_their_order_in_process() -> None:
    async with linked_hubs() as lh:
        h1, h2 = lh.hubs[1], lh.hubs[2]
        reader, writer = await asyncio.open_connection("127.0.0.1", h2.port)
        opened = await h2.recv_open()
        fid = opened.id
        assert (fid.worker, fid.node) == (2, "h")
        for i in range(500):
            h1.send(fid, b"m%d" % i)
        h1.send_batch(fid, [b"a", b"b"])
        h1.send_many([fid], b"fan")
        h1.set_idle_timeout(fid, None)
        assert h1.close(fid) is True
        expected = b"".join(b"m%d\n" % i for i in range(500)) + b"a\nb\nfan\n"
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == expected  # then EOF
        assert (await h2.recv_close()).reason == "local"
        h1.send(fid, b"late")  # forwarded: the holder finds it closed and counts it
        for _ in range(200):
            if lh.routers[2].unroutable:
                break
            await asyncio.sleep(0.005)
        assert lh.routers[2].unroutable == 1
        assert lh.routers[1].counters()["fanouts"] == 1
        writer.close()
        await writer.wait_closed()


async def test_routing_beyond_the_buffer_drops_counts_and_logs(
        caplog: pytest.LogCaptureFixture) -> None:
    async with linked_hubs() as lh:
        h1, h2 = lh.hubs[1], lh.hubs[2]
        reader, writer = await asyncio.open_connection("127.0.0.1", h2.port)
        fid = (await h2.recv_open()).id
        lh.routers[1].max_buffer = 10_000
        with caplog.at_level(logging.WARNING, logger="tether.workers"):
            for _ in range(1000):  # 64 KiB in one iteration, over the 10 kB bound
                h1.send(fid, b"x" * 63)
        dropped = lh.routers[1].route_dropped
        assert 0 < dropped < 1000
        assert "dropping" in caplog.text and "drain()" in caplog.text
        got = 0
        while got < 64 * (1000 - dropped):
            got += len(await asyncio.wait_for(reader.read(65536), TIMEOUT))
        writer.close()
        await writer.wait_closed()


async def test_ids_that_cannot_be_routed_raise_flow_closed_with_the_reason() -> None:
    async with linked_hubs() as lh:
        h1 = lh.hubs[1]
        with pytest.raises(FlowClosed, match=r"held by node 'other'.*mesh"):
            h1.send(FlowId("other", 1, 2), b"x")
        with pytest.raises(FlowClosed, match=r"has workers 1\.\.2"):
            h1.send(FlowId("h", 1, 7), b"x")
        with pytest.raises(FlowClosed, match="closed or unknown"):
            h1.send(FlowId("h", 99, 1), b"x")  # its own worker: not routed
        lh.routers[1].worker_down(2, [5])
        with pytest.raises(FlowClosed, match="worker 2 of hub 'h' is down"):
            h1.send(FlowId("h", 5, 2), b"x")
        with pytest.raises(FlowsClosed) as info:
            h1.send_many([FlowId("h", 5, 2), FlowId("h", 6, 9)], b"x")
        assert len(info.value.ids) == 2
        assert h1.close(FlowId("h", 5, 2)) is False
        closed = await asyncio.wait_for(h1.recv_close(), TIMEOUT)
        assert (closed.id, closed.reason) == (FlowId("h", 5, 2), "down")
        lh.routers[1].dest_up(2, 1 << 24, None)
        with pytest.raises(FlowClosed, match="restarted since"):
            h1.send(FlowId("h", 5, 2), b"x")


# --- worker processes -------------------------------------------------------------------


@dataclass
class Client:
    id: FlowId
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def line(self, timeout: float = TIMEOUT) -> str:
        raw = await asyncio.wait_for(self.reader.readline(), timeout)
        assert raw.endswith(b"\n"), f"{self.id}: connection ended: {raw!r}"
        return raw[:-1].decode()

    async def ask(self, command: str) -> str:
        self.writer.write(command.encode() + b"\n")
        return await self.line()

    def send(self, command: str) -> None:
        self.writer.write(command.encode() + b"\n")

    async def eof(self, timeout: float = TIMEOUT) -> bytes:
        """Everything until the server closes the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    def close(self) -> None:
        self.writer.close()


async def connect(port: int, tls: ssl.SSLContext | None = None) -> Client:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    writer.write(b"ID\n")
    line = await asyncio.wait_for(reader.readline(), TIMEOUT)
    assert line.startswith(b"ID "), line
    return Client(FlowId.parse(line[3:-1].decode()), reader, writer)


async def spread(port: int, workers: int, each: int = 1, start: int = 8,
                 limit: int = 400, tls: ssl.SSLContext | None = None
                 ) -> tuple[list[Client], dict[int, list[Client]]]:
    """Connect until every worker holds at least ``each`` of the clients (the kernel
    spreads connections over the workers by a hash)."""
    clients = [await connect(port, tls) for _ in range(start)]
    while True:
        by: dict[int, list[Client]] = {w: [] for w in range(1, workers + 1)}
        for c in clients:
            by[c.id.worker].append(c)
        if all(len(v) >= each for v in by.values()):
            return clients, by
        assert len(clients) < limit, f"the kernel sent nothing to some worker: {by.keys()}"
        clients.append(await connect(port, tls))


@contextlib.asynccontextmanager
async def running(workers: int, handler: Any = APP, **options: Any) -> AsyncIterator[Hub]:
    """A started Hub(workers=...); on exit it is closed and no worker is left."""
    hub = Hub("127.0.0.1", 0, workers=workers, handler=handler, **options)
    pool = pool_of(hub)
    pool.stats_interval = 0.2
    await hub.start()
    seen = set(pool.pids().values())
    try:
        yield hub
    finally:
        seen |= set(pool.pids().values())
        await hub.aclose(2.0)
        assert pool.pids() == {}
        for pid in seen:  # reaped by the pool: none may be left
            assert not Path(f"/proc/{pid}").exists() or _zombie_or_other(pid), pid


def _zombie_or_other(pid: int) -> bool:
    """A PID reused by an unrelated process since (or a zombie) is not ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] == "Z" or int(fields[1]) != os.getpid()


async def test_cross_worker_send_and_close_in_order() -> None:
    async with running(2) as hub:
        clients, by = await spread(hub.port, 2, each=2)
        a, b, c = by[1][0], by[2][0], by[2][1]
        # 300 messages from worker 1 to a connection of worker 2, in one read
        a.writer.write(b"".join(b"SEND %s m%d\n" % (str(b.id).encode(), i) for i in range(300)))
        a.send(f"BATCH {b.id} x,y,z")
        assert [await b.line() for _ in range(303)] == [f"m{i}" for i in range(300)] + \
            ["x", "y", "z"]
        # from the supervisor
        hub.send(b.id, b"sup")
        hub.send_batch(b.id, [b"s1", b"s2"])
        assert [await b.line() for _ in range(3)] == ["sup", "s1", "s2"]
        # a routed idle timeout closes c
        assert await a.ask(f"IDLE {c.id} 0.05") == "IDLE set"
        assert await c.eof() == b""
        # a close after a send: the send arrives first, then EOF
        a.send(f"SEND {b.id} last")
        assert await a.ask(f"CLOSE {b.id}") == "CLOSE True"
        assert await b.eof() == b"last\n"
        # errors are told to the sender
        assert (await a.ask("SEND 9:1@hub x")).startswith(
            "ERR connection 9:1@hub is unknown: hub 'hub' has workers 1..2")
        assert "held by node 'elsewhere'" in await a.ask("SEND 2:1@elsewhere x")
        with pytest.raises(FlowClosed):
            hub.send(FlowId("hub", 1, 0), b"x")
        assert hub.close(FlowId("hub", 1, 0)) is False
        stats = await pool_of(hub).refresh_stats()
        assert stats.closed == {"local": 1, "idle": 1}
        assert stats.open == len(clients) - 2
        assert stats.opened == len(clients)
        routing = pool_of(hub).routing_stats()
        assert routing["routed_in"] >= 306 and routing["closes_out"] == 1
        for cl in clients:
            cl.close()


async def test_every_worker_serves_tls_from_files(tls: Any) -> None:
    """`Hub(workers=2, tls=ServerTLS(...))`: every worker serves TLS (each holds some of
    the clients) and ids route across workers as without it; with `client_ca`, a client
    without a certificate is refused in its handshake and one with a certificate is
    served; each refusal is counted by the worker that made it, and `hub.stats()` sums
    them (``handshakes_failed``)."""
    async with running(2, tls=ServerTLS(str(tls.server_cert), str(tls.server_key))) as hub:
        clients, by = await spread(hub.port, 2, tls=tls.client_context())
        a, b = by[1][0], by[2][0]
        a.send(f"SEND {b.id} over tls")
        assert await b.line() == "over tls"
        for c in clients:
            c.close()
    mutual = ServerTLS(str(tls.server_cert), str(tls.server_key), client_ca=str(tls.ca))
    async with running(2, tls=mutual) as hub:
        pool = pool_of(hub)
        refused = 0
        while refused < 4 or not all(  # until both workers refused some (kernel's pick)
                s.stats and s.stats["hub"]["handshakes_failed"] for s in pool._slots):
            assert refused < 40, [s.stats for s in pool._slots]
            with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
                await connect(hub.port, tls.client_context())  # no client certificate
            refused += 1
            stats = await pool.refresh_stats()
        assert (stats.handshakes_failed, stats.opened) == (refused, 0), stats
        clients, by = await spread(hub.port, 2, tls=tls.client_context(cert=True))
        assert await by[2][0].ask("ID") == f"ID {by[2][0].id}"
        for c in clients:
            c.close()


async def test_send_many_fans_out_with_one_message_per_worker() -> None:
    async with running(3) as hub:
        clients, by = await spread(hub.port, 3, each=2, start=12)
        a = by[1][0]
        ids = ",".join(str(c.id) for c in clients)
        assert await a.ask(f"MANY hello {ids}") == "hello"  # a is among them
        assert await a.line() == "MANY sent"
        for c in clients:
            if c is not a:
                assert await c.line() == "hello"
        await pool_of(hub).refresh_stats()
        assert pool_of(hub).routing_stats()["fanouts"] == 2  # workers 2 and 3
        # from the supervisor, with an unknown id among them
        with pytest.raises(FlowsClosed) as info:
            hub.send_many([c.id for c in clients] + [FlowId("hub", 1, 9)], b"all")
        assert info.value.ids == [FlowId("hub", 1, 9)]
        for c in clients:
            assert await c.line() == "all"
        await pool_of(hub).refresh_stats()
        assert pool_of(hub).routing_stats()["fanouts"] == 5
        for c in clients:
            c.close()


async def test_sigkill_worker_closed_reported_down_restarted(
        caplog: pytest.LogCaptureFixture) -> None:
    async with running(3) as hub:
        pool = pool_of(hub)
        downs: list[tuple[int, list[FlowId]]] = []
        pool.on_worker_down = lambda w, ids: downs.append((w, ids))
        clients, by = await spread(hub.port, 3, each=3, start=15)
        watchers = [by[1][0], by[3][0]]
        for w in watchers:
            assert await w.ask("WATCH") == "WATCHING"
        victims = {c.id for c in by[2]}
        old_pid = pool.pids()[2]
        with caplog.at_level(logging.WARNING, logger="tether.workers"):
            os.kill(old_pid, signal.SIGKILL)
            # the surviving workers' handlers get Closed(id, "down") for each
            for w in watchers:
                got = {FlowId.parse((await w.line()).removeprefix("DOWN ")) for _ in victims}
                assert got == victims
            for c in by[2]:
                assert await c.eof() == b""
            # new connections keep being accepted meanwhile and after
            fresh = [await connect(hub.port) for _ in range(6)]
            deadline = time.monotonic() + TIMEOUT
            while pool.worker_states()[2] != "up":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
        assert f"worker 2 (pid {old_pid})" in caplog.text and "SIGKILL" in caplog.text
        assert f"its {len(victims)} connection(s) are closed" in caplog.text
        assert downs == [(2, sorted(victims))]
        assert pool.pids()[2] != old_pid and pool.restarts == 1
        old = next(iter(victims))
        with pytest.raises(FlowClosed, match="restarted since"):
            hub.send(old, b"x")
        more, by2 = await spread(hub.port, 3, each=1, start=0)
        assert all(c.id.serial > 1 << 24 for c in by2[2])  # never an old id again
        for c in by2[2]:
            hub.send(c.id, b"routed")
            assert await c.line() == "routed"
        stats = await pool.refresh_stats()
        assert stats.closed == {"down": len(victims)}
        assert stats.open == len(clients) + len(fresh) + len(more) - len(victims)
        for c in clients + fresh + more:
            c.close()


async def test_graceful_shutdown_drains_every_worker() -> None:
    hub = Hub("127.0.0.1", 0, workers=2, handler=APP)
    pool = pool_of(hub)
    await hub.start()
    pids = pool.pids()
    try:
        clients, _ = await spread(hub.port, 2, each=2)
        for c in clients:
            hub.send(c.id, b"bye")  # routed before the SHUTDOWN: written before the end
        await hub.aclose(2.0)
        for c in clients:
            assert await c.eof() == b"bye\n"
            c.close()
        assert hub.closed and pool.pids() == {}
        assert pool.exit_codes() == {1: 0, 2: 0}
        assert pool.worker_states() == {1: "stopped", 2: "stopped"}
        stats = hub.stats()
        assert stats.closed == {"shutdown": len(clients)} and stats.open == 0
        assert stats.messages_out >= 2 * len(clients)
    finally:
        await hub.aclose()
        for pid in pids.values():
            assert not Path(f"/proc/{pid}").exists() or _zombie_or_other(pid)


async def test_stats_sum_over_workers_and_tether_status_reads_them() -> None:
    async with running(2) as hub:
        pool = pool_of(hub)
        clients, _ = await spread(hub.port, 2, each=1)
        for c in clients:
            assert await c.ask("PING") == f"PONG {c.id.worker}"
        stats = await pool.refresh_stats()
        assert (stats.open, stats.opened) == (len(clients), len(clients))
        assert stats.messages_in == stats.messages_out == 2 * len(clients)
        assert hub.stats() == stats
        admin = AdminServer(("127.0.0.1", 0), "hub", hub.name, pool.status)
        await admin.start()
        try:
            status = json.loads(await fetch_status("127.0.0.1", admin.port))
            metrics = (await fetch_status("127.0.0.1", admin.port, "/metrics")).decode()
        finally:
            await admin.aclose()
        assert status["role"] == "hub" and status["workers"] == 2
        assert status["hub"]["open"] == len(clients)
        assert {w["worker"]: w["pid"] for w in status["per_worker"]} == pool.pids()
        assert sum(w["open"] for w in status["per_worker"]) == len(clients)
        assert all(w["rss"] > 0 for w in status["per_worker"])
        assert status["rss_total"] > sum(w["rss"] for w in status["per_worker"])
        assert 'tether_hub_open{node="hub",role="hub"}' in metrics  # a gauge
        assert 'tether_hub_opened_total{node="hub",role="hub"}' in metrics  # a counter
        for c in clients:
            c.close()


async def test_a_handler_that_cannot_load_fails_start_cleanly() -> None:
    hub = Hub("127.0.0.1", 0, workers=2, handler="no_such_module_here:handler")
    with pytest.raises(WorkersFailed, match="exit code 3: the handler could not be loaded"):
        await hub.start()
    assert hub.closed and pool_of(hub).pids() == {}


async def test_a_failing_handler_is_restarted_with_backoff() -> None:
    async with running(1, "test_workers_apps:crash_on_start") as hub:
        pool = pool_of(hub)
        deadline = time.monotonic() + TIMEOUT
        while pool.restarts < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert pool.exit_codes()[1] == 1


@contextlib.asynccontextmanager
async def meshed_hubs(workers: int, establish_timeout: float, liveness: float
                      ) -> AsyncIterator[tuple[dict[str, Hub], dict[str, Mesh], list[Client]]]:
    """Hubs "a" and "b" of `workers` workers each, started, their supervisors' meshes
    peering with each other; and a list for the test's clients. On exit the clients
    are closed, then the hubs, and no worker may be left."""
    meshes = {n: Mesh(n, listen="127.0.0.1:0", establish_timeout=establish_timeout,
                      liveness=liveness, retry_interval=0.2) for n in ("a", "b")}
    hubs = {n: Hub("127.0.0.1", 0, name=n, workers=workers, handler=APP) for n in ("a", "b")}
    for n in hubs:
        pool_of(hubs[n]).mesh = meshes[n]
    clients: list[Client] = []
    try:
        for hub in hubs.values():
            await hub.start()
        meshes["a"].add_peer("b", f"127.0.0.1:{meshes['b'].port}")
        meshes["b"].add_peer("a", f"127.0.0.1:{meshes['a'].port}")
        yield hubs, meshes, clients
    finally:
        for c in clients:
            c.close()
        for hub in hubs.values():
            await hub.aclose(1.0)
        for hub in hubs.values():
            assert pool_of(hub).pids() == {}


async def until_node_b_is_known(client: Client) -> None:
    """Until the worker of hub "a" holding `client` knows node "b": an id above any
    serial of b is routed there, then found unknown."""
    deadline = time.monotonic() + TIMEOUT
    nobody = FlowId("b", 1 << 47, 1)
    while await client.ask(f"CLOSE {nobody}") != "CLOSE True":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_hubs_on_two_machines_route_ids_over_the_mesh() -> None:
    """Hubs "a" and "b" (2 workers each) join a mesh: ids of either are used from the
    other; when "b" goes away, its ids we sent to are closed "down" and then raise
    FlowClosed saying that node "b" is gone."""
    async with meshed_hubs(2, establish_timeout=1.0, liveness=1.0) as (hubs, _, clients):
        clients_a, by_a = await spread(hubs["a"].port, 2, each=2)
        clients_b, by_b = await spread(hubs["b"].port, 2, each=2)
        clients += clients_a + clients_b
        a1, watcher, b1, b2 = by_a[1][0], by_a[2][0], by_b[1][0], by_b[2][0]
        assert b2.id.node == "b" and a1.id.node == "a"
        await until_node_b_is_known(a1)
        assert "'zzz', which is not in the mesh of hub 'a'" in await a1.ask("SEND 1:1@zzz x")
        # 200 messages from a worker of hub a to a connection of hub b, in order
        a1.writer.write(b"".join(b"SEND %s m%d\n" % (str(b2.id).encode(), i)
                                 for i in range(200)))
        assert [await b2.line() for _ in range(200)] == [f"m{i}" for i in range(200)]
        # from the supervisor of a; and a fan-out over both hubs
        hubs["a"].send(b1.id, b"from a")
        assert await b1.line() == "from a"
        everyone = [c for c in clients_a + clients_b if c is not a1]
        assert await a1.ask("MANY hi " + ",".join(str(c.id) for c in everyone)) == "MANY sent"
        for c in everyone:
            assert await c.line() == "hi"
        # a routed close, after a send
        a1.send(f"SEND {b1.id} last")
        assert await a1.ask(f"CLOSE {b1.id}") == "CLOSE True"
        assert await b1.eof() == b"last\n"
        # hub b goes away: what a sent to b2 is given back by the mesh, b2 is closed
        # "down" for the handlers of a, and b's ids then raise FlowClosed
        assert await watcher.ask("WATCH") == "WATCHING"
        await hubs["b"].aclose(1.0)
        a1.send(f"SEND {b2.id} lost")
        assert await watcher.line(5 * TIMEOUT) == f"DOWN {b2.id}"
        assert "node 'b' is gone (b unreachable for 1s" in await a1.ask(f"SEND {b2.id} x")
        status = pool_of(hubs["a"]).status()
        assert status["mesh"]["nodes"]["b"].startswith("b unreachable")
        assert status["mesh"]["mesh_failed"] >= 1


def test_supervisor_hub_has_no_events() -> None:
    async def main() -> None:
        async with running(1) as hub:
            with pytest.raises(RuntimeError, match="handler in each worker"):
                await hub.recv_data()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 30))


def test_tether_hub_command_serves_reports_and_drains() -> None:
    with ProcGroup() as procs:
        proc = procs.start("tether hub", [
            sys.executable, "-m", "tether.workers", "hub", "--workers", "2",
            "--listen", "127.0.0.1:0", "--framing", "lines", "--admin", "127.0.0.1:0",
            "--handler", "tether.workers:echo", "--name", "cli"])
        port = int(proc.expect(r"^hub cli listening on port (\d+) with 2 worker", stream="stderr")
                   [0].group(1))
        admin = int(proc.expect(r"^hub cli admin endpoint on port (\d+)$", stream="stderr")
                    [0].group(1))
        import socket

        socks = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                 for _ in range(8)]
        try:
            for i, s in enumerate(socks):
                s.sendall(b"hi %d\n" % i)
                assert s.makefile("rb").readline() == b"hi %d\n" % i
            out = subprocess.run([sys.executable, "-m", "tether.cli", "status",
                                  f"127.0.0.1:{admin}"], capture_output=True, timeout=30,
                                 check=True).stdout
            status = json.loads(out)
            assert status["workers"] == 2 and status["name"] == "cli"
            assert status["hub"]["open"] == 8
            pids = [w["pid"] for w in status["per_worker"]]
            assert all(pids)
            proc.popen.send_signal(signal.SIGTERM)
            assert proc.wait() == 0
            for s in socks:
                assert s.recv(10) == b""  # drained: closed by the hub, not reset
        finally:
            for s in socks:
                s.close()
        deadline = time.monotonic() + TIMEOUT
        while any(Path(f"/proc/{pid}").exists() for pid in pids):
            if time.monotonic() > deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"workers {pids} outlived the command")
            time.sleep(0.02)


def _socat_line(socat: str, address: str, line: bytes) -> bytes:
    """Send `line` with socat to `address` (a socat address) and return the first line
    that comes back within TIMEOUT (b"" if none); then close socat's input."""
    client = subprocess.Popen([socat, "-", address], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert client.stdin is not None and client.stdout is not None
    try:
        client.stdin.write(line)
        client.stdin.flush()
        got = b""
        deadline = time.monotonic() + TIMEOUT
        while not got.endswith(b"\n"):
            ready, _, _ = select.select([client.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            chunk = os.read(client.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                break
            got += chunk
        return got
    finally:
        client.stdin.close()
        try:
            client.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
        client.stdout.close()


def test_tether_hub_command_serves_tls_to_socat(tls: Any) -> None:
    """`tether hub --workers 2 --tls-cert --tls-key`: socat, a TLS client no one here
    wrote, gets its lines echoed by whichever worker the kernel picks; a plain TCP client
    gets nothing back (its bytes are no TLS handshake)."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.skip("socat is not installed (.ci/run installs it)")
    with ProcGroup() as procs:
        proc = procs.start("tether hub", [
            sys.executable, "-m", "tether.workers", "hub", "--workers", "2",
            "--listen", "127.0.0.1:0", "--admin", "none", "--name", "tls",
            "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)])
        port = int(proc.expect(r"^hub tls listening on port (\d+) with 2 worker", stream="stderr")
                   [0].group(1))
        for i in range(6):
            line = b"over tls %d\n" % i
            assert _socat_line(socat, f"OPENSSL:127.0.0.1:{port},cafile={tls.ca}", line) == line
        assert _socat_line(socat, f"TCP:127.0.0.1:{port}", b"in clear\n") == b""
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.wait() == 0


# --- 4 workers x 15,000 connections ----------------------------------------------------

HOLDER = textwrap.dedent("""
    # Hold N connections to 127.0.0.1:PORT from source address SRC; on "go", send one
    # line on each and read its echo; on "close", close them all. The source port is
    # chosen at connect (IP_BIND_ADDRESS_NO_PORT): a port chosen at bind would be
    # withheld from every other connect() on the machine until its TIME_WAIT ends.
    import selectors, socket, sys
    NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
    port, n, src = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sel = selectors.DefaultSelector()
    socks, pending, i = [], {}, 0
    while i < n or pending:
        while i < n and len(pending) < 512:
            s = socket.socket()
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_IP, NO_PORT, 1)
            s.bind((src, 0))
            s.connect_ex(("127.0.0.1", port))
            pending[s.fileno()] = s
            sel.register(s, selectors.EVENT_WRITE)
            i += 1
        for key, _ in sel.select(10):
            s = pending.pop(key.fd)
            sel.unregister(s)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert err == 0, err
            socks.append(s)
    print("held", len(socks), flush=True)
    assert sys.stdin.readline() == "go\\n"
    for s in socks:
        s.send(b"x\\n")
        sel.register(s, selectors.EVENT_READ)
    got = 0
    while got < len(socks):
        for key, _ in sel.select(30):
            assert key.fileobj.recv(16) == b"x\\n"
            sel.unregister(key.fileobj)
            got += 1
    print("echoed", got, flush=True)
    assert sys.stdin.readline() == "close\\n"
    for s in socks:
        s.close()
    print("closed", flush=True)
""")


@contextlib.contextmanager
def holders(port: int, counts: list[int]) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        for i, n in enumerate(counts):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(port), str(n), f"127.0.0.{10 + i}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        yield procs
    finally:
        for p in procs:  # by PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    pipe.close()


async def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), timeout)


def _tell(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


@pytest.mark.slow
def test_four_workers_hold_fifteen_thousand_connections_each() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_worker = min(soft * 3 // 4, int(os.environ.get("TETHER_TEST_MAX_PER_WORKER", 30_000)))
    if per_worker < 1000:
        pytest.skip(f"the file limit ({soft}) is too low for this test")
    workers = 4
    total = workers * per_worker  # 60,000 with the limit of 20,000 here
    per_client = min(soft - 1000, 25_000)  # a client's descriptors, and one source address
    counts = [per_client] * (total // per_client)
    if total % per_client:
        counts.append(total % per_client)
    # spread them evenly: several client processes of the same size
    k = len(counts)
    counts = [total // k + (1 if i < total % k else 0) for i in range(k)]

    async def main() -> None:
        async with running(workers, "tether.workers:echo", backlog=4096) as hub:
            pool = pool_of(hub)
            with holders(hub.port, counts) as procs:
                for p, n in zip(procs, counts, strict=True):
                    assert await _readline(p, 120) == f"held {n}\n"
                # A client's connect() returns once the kernel queued the connection; the
                # worker that accepts it may still be behind (seen in CI on a busy machine).
                deadline = time.monotonic() + 60
                while (stats := await pool.refresh_stats()).open < total:
                    assert time.monotonic() < deadline, stats
                    await asyncio.sleep(0.2)
                assert stats.open == total, stats
                status = pool.status()
                per = [w["open"] for w in status["per_worker"]]
                assert sum(per) == total and all(0 < n < soft - 100 for n in per), per
                for p in procs:
                    _tell(p, "go")
                for p, n in zip(procs, counts, strict=True):
                    assert await _readline(p, 120) == f"echoed {n}\n"
                rss = sum(w["rss"] for w in status["per_worker"])
                print(f"\n{workers} workers hold {total} connections {per}; workers' RSS "
                      f"{rss / 2**20:.0f} MiB ({rss / total:.0f} B per connection incl. "
                      f"the interpreters)")
                for p in procs:
                    _tell(p, "close")
                for p in procs:
                    assert await _readline(p, 120) == "closed\n"
                deadline = time.monotonic() + 60
                while (await pool.refresh_stats()).open:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
                stats = hub.stats()
                assert stats.closed_total == stats.opened == total
                assert stats.messages_in == stats.messages_out == total

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 300))


async def test_each_worker_takes_max_connections_as_given() -> None:
    """`Hub(workers=2, max_connections=1)`: each worker holds one connection at most, so
    of three clients at least one is reset as it is accepted, and the supervisor's sum
    counts it in `refused` and `over_limit`."""
    async with running(2, max_connections=1) as hub:
        results = []
        writers = []
        for _ in range(3):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
                writers.append(writer)
                writer.write(b"PING\n")
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), TIMEOUT)
                results.append("eof" if not line else "served")
            except ConnectionResetError:
                results.append("reset")
        try:
            assert results.count("reset") >= 1 and "eof" not in results, results

            async def counted() -> bool:
                stats = await pool_of(hub).refresh_stats()
                return stats.over_limit == stats.refused == results.count("reset")
            deadline = time.monotonic() + TIMEOUT
            while not await counted():
                assert time.monotonic() < deadline, await pool_of(hub).refresh_stats()
                await asyncio.sleep(0.05)
        finally:
            for writer in writers:
                writer.close()
