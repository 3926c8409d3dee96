"""What a relay's edge holds for flows whose consumers do not read is bounded in total,
not only per flow (`readbuf`, "Parked reads").

A server sends fast to many applications that never read. The connector reads the
server's socket before it knows how much of a read the flow's credit will take; the
rest is *parked* until credit comes. A read is up to 1 MiB where a window is 256 KiB,
so each stalled flow parked about 1 MB (400 of them: 412 MB of RSS). Past the thread's
`park_budget`, reads are sized by the flow's credit: each stalled flow then parks at
most about `LARGE_READ`.

In-process Gateway, Agent and Connector over real loopback sockets.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import tether
from test_gateway import eventually
from test_relay_edge_cleanup import relay
from tether import readbuf
from tether.relay import Agent, Connector

HOST = "127.0.0.1"
FLOWS = 24
PAYLOAD = os.urandom(8 << 20)  # per connection: many reads, more than the windows
UPLOAD = PAYLOAD[:4 << 20]
BUDGET = 1 << 20
UPLOAD_BUDGET = 128 << 10  # (an upload parks less, more unevenly: the loop reads 256 KiB)


@contextmanager
def park_budget(budget: int) -> Iterator[readbuf.ReadBuffer]:
    """This thread's `ReadBuffer` with `park_budget` set to `budget` for the block."""
    reads = readbuf.current()
    before = reads.park_budget
    reads.park_budget = budget
    try:
        yield reads
    finally:
        reads.park_budget = before


async def _serve_fast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send PAYLOAD as fast as the peer takes it, then close."""
    try:
        writer.write(PAYLOAD)
        await writer.drain()
        writer.close()
    except ConnectionError:
        writer.close()


def _parked(*edges: Agent | Connector) -> int:
    return sum(int(edge.stats()["parked_bytes"]) for edge in edges)


async def _stalled_apps(agent: Agent, count: int) -> list[socket.socket]:
    """`count` applications connected through `agent` that read nothing: small receive
    buffers, and the agent's side of each made small too, so that the kernel does not
    take megabytes for them (loopback buffers grow to 4 MB) and the flows stall in the
    relay."""
    loop = asyncio.get_running_loop()
    apps = []
    for i in range(count):
        app = socket.socket()
        app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        app.setblocking(False)
        apps.append(app)
        await loop.sock_connect(app, (HOST, agent.ports()[0]))
        def adopted(n: int = i + 1) -> bool:
            return len(agent.bridges) + len(agent.arriving) >= n

        await eventually("the agent adopted the connection", adopted)
        for bridge in (*agent.bridges, *agent.arriving):
            sock = bridge.transport.get_extra_info("socket") if bridge.transport else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return apps


async def _read_all_and_close(app: socket.socket) -> bytes:
    try:
        return await _read_all(app)
    finally:
        app.close()  # (the agent waits for the application's FIN: half-close)


def _held_at_gateway(gw: tether.Gateway) -> tuple[int, int]:
    """(bytes the gateway's splices hold for credit, bytes those keep alive): a payload
    that is a view keeps its whole read alive, once however many views share it."""
    held = 0
    reads: dict[int, int] = {}
    for _splice, end in gw._ends.values():
        for data in end.pending:
            held += len(data)
            if isinstance(data, memoryview):
                reads[id(data.obj)] = len(data.obj)  # type: ignore[arg-type]
            else:
                reads[id(data)] = len(data)
    return held, sum(reads.values())


async def _all_ended_nothing_parked(co: Connector, ag: Agent) -> None:
    await eventually(lambda: f"connections still open: {co.stats()['open']}, "
                     f"{ag.stats()['open']}",
                     lambda: not co.bridges and not ag.bridges, timeout=10)
    assert _parked(co, ag) == 0


async def _peak_while_stalled(sample: Callable[[], int], budget: int = BUDGET) -> int:
    """The most `sample()` (what an edge parks; it also checks what it must) returned,
    every 50 ms for 2 s once it went over `budget` (the stall reached the cap's regime;
    it is awaited for up to 10 s, then the peak is returned as it is)."""
    loop = asyncio.get_running_loop()
    peak, over_at, deadline = 0, None, loop.time() + 10
    while loop.time() < (deadline if over_at is None else over_at + 2):
        await asyncio.sleep(0.05)
        peak = max(peak, sample())
        if over_at is None and peak > budget:
            over_at = loop.time()
    return peak


async def _read_all(app: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while chunk := await asyncio.wait_for(loop.sock_recv(app, 1 << 20), 10):
        got += chunk
    return bytes(got)


async def test_stalled_flows_park_little_past_the_budget_and_nothing_when_done() -> None:
    """FLOWS applications connect and read nothing (small receive buffers): every flow
    stalls with the server still sending. What the connector parks stays within the
    budget plus `LARGE_READ` per flow plus the read that crossed it (without the cap:
    13-16 MB here). It is counted exactly: the thread's total is the bridges' sum. What
    the gateway holds for credit keeps alive no more than itself and the pinned reads.
    Then half the applications read everything -- every byte as sent, in order, through
    reads sized by credit -- and half reset while stalled: nothing stays parked."""
    server = await asyncio.start_server(_serve_fast, HOST, 0)
    apps: list[socket.socket] = []
    try:
        with park_budget(BUDGET) as reads:
            baseline = reads.parked
            async with relay(server.sockets[0].getsockname()[1]) as (gw, co, ag):
                apps += await _stalled_apps(ag, FLOWS)
                await eventually("every flow reached the connector",
                                 lambda: len(co.bridges) == FLOWS)
                # the flows fill their windows and stall; sample while they do
                bound = BUDGET + FLOWS * readbuf.LARGE_READ + reads.size
                pinned = (reads.max_pinned + 1) * reads.size

                def check() -> int:
                    assert reads.parked - baseline == _parked(co, ag)
                    held, alive = _held_at_gateway(gw)  # (views of pinned reads, or
                    assert alive <= held + pinned, (held, alive)  # bytes of their own)
                    return _parked(co)

                peak = await _peak_while_stalled(check)
                assert BUDGET < peak <= bound, (peak, bound)
                readers, resetters = apps[:FLOWS // 2], apps[FLOWS // 2:]
                for app in resetters:
                    app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    app.close()
                got = await asyncio.gather(*(_read_all_and_close(app) for app in readers))
                want = hashlib.sha256(PAYLOAD).hexdigest()
                assert [hashlib.sha256(g).hexdigest() for g in got] == [want] * len(readers)
                await _all_ended_nothing_parked(co, ag)
            assert reads.parked == baseline
    finally:
        for app in apps:
            app.close()
        server.close()
        await server.wait_closed()


async def test_under_the_budget_reads_stay_large() -> None:
    """The cap is for pressure only: with a budget no flow reaches, a stalled flow parks
    what its large reads brought beyond its credit (the bulk path is unchanged)."""
    server = await asyncio.start_server(_serve_fast, HOST, 0)
    apps: list[socket.socket] = []
    try:
        with park_budget(1 << 40):
            async with relay(server.sockets[0].getsockname()[1]) as (_gw, co, ag):
                apps += await _stalled_apps(ag, 4)
                peak = 0
                for _ in range(40):
                    await asyncio.sleep(0.05)
                    peak = max(peak, max((b.parked for b in co.bridges), default=0))
                assert peak > readbuf.LARGE_READ, peak
                got = await asyncio.gather(*(_read_all_and_close(app) for app in apps))
                assert all(g == PAYLOAD for g in got)
    finally:
        for app in apps:
            app.close()
        server.close()
        await server.wait_closed()


async def test_uploads_to_a_server_that_does_not_read_park_little_at_the_agent() -> None:
    """The other direction: FLOWS applications each send UPLOAD as fast as they can to
    a server that does not read (reading paused, small buffers at the connector too).
    The agent parks within the budget plus `LARGE_READ` per flow plus a read, counted
    exactly; once the server reads, every upload arrives whole and in order, and
    nothing stays parked."""
    received: list[hashlib._Hash] = []
    servers: list[asyncio.StreamWriter] = []
    done: list[asyncio.Future[None]] = []

    async def stalled_server(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        received.append(digest)
        finished = asyncio.get_running_loop().create_future()
        done.append(finished)
        transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        transport.pause_reading()
        servers.append(writer)
        while chunk := await reader.read(1 << 20):
            digest.update(chunk)
        finished.set_result(None)
        writer.close()

    server = await asyncio.start_server(stalled_server, HOST, 0)
    # small receive buffers from the SYN on (inherited): the kernel does not take MBs
    server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    apps: list[socket.socket] = []
    sends: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    try:
        with park_budget(UPLOAD_BUDGET) as reads:
            baseline = reads.parked
            async with relay(server.sockets[0].getsockname()[1]) as (_gw, co, ag):
                for _ in range(FLOWS):
                    app = socket.socket()
                    app.setblocking(False)
                    apps.append(app)
                    await loop.sock_connect(app, (HOST, ag.ports()[0]))
                    sends.append(asyncio.ensure_future(loop.sock_sendall(app, UPLOAD)))
                await eventually("every flow reached the server",
                                 lambda: len(servers) == FLOWS)
                for bridge in co.bridges:
                    sock = bridge.transport.get_extra_info("socket") \
                        if bridge.transport else None
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                bound = UPLOAD_BUDGET + FLOWS * readbuf.LARGE_READ + reads.size
                def check() -> int:
                    assert reads.parked - baseline == _parked(co, ag)
                    return _parked(ag)

                peak = await _peak_while_stalled(check, UPLOAD_BUDGET)
                assert UPLOAD_BUDGET < peak <= bound, (peak, bound)
                for writer in servers:
                    writer.transport.resume_reading()  # type: ignore[attr-defined]
                await asyncio.wait_for(asyncio.gather(*sends), 30)
                for app in apps:
                    app.shutdown(socket.SHUT_WR)
                await asyncio.wait_for(asyncio.gather(*done), 30)
                want = hashlib.sha256(UPLOAD).hexdigest()
                assert [d.hexdigest() for d in received] == [want] * FLOWS
                for app in apps:
                    app.close()
                await _all_ended_nothing_parked(co, ag)
            assert reads.parked == baseline
    finally:
        for task in sends:
            task.cancel()
        for app in apps:
            app.close()
        server.close()
        await server.wait_closed()
