"""The asyncio adapter's edges: TLS links that stop or misbehave, closing links whose
peer stopped reading."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import TYPE_CHECKING

from tether.aio import LinkConnection, open_link, serve_links
from tether.events import (
    Event,
    FlowOpenRequested,
    HandshakeCompleted,
    LinkTerminated,
    WindowUpdated,
)
from tether.link import QUEUE_LIMIT, Link, LinkConfig, Role

if TYPE_CHECKING:
    from conftest import TLSMaterial


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.conns: list[LinkConnection] = []

    def link_event(self, conn: LinkConnection, event: Event) -> None:
        if conn not in self.conns:
            self.conns.append(conn)
        self.events.append(event)


async def test_tls_client_stopping_mid_handshake_ends_the_link(tls: TLSMaterial) -> None:
    """The link's handshake timeout fires before TLS is up: its last frames cannot be
    encrypted (they were, raising SSLWantReadError in the timer: the link stayed open,
    its socket with it, and `closed` was never set).

    The timeout leaves the client a second to send its first bytes: once, with 0.2 s
    on a loaded machine, the link had timed out and closed before they came, so they
    met a closed socket and its reset, and the handshake was never "mid" at all."""
    rec = Recorder()
    server = await serve_links("127.0.0.1", 0, lambda: LinkConfig(name="gw", handshake_timeout=1.0),
                               rec, ssl_context=tls.server_context())
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\x16\x03\x01\x00\xc8\x01\x00")  # the start of a ClientHello
        async with asyncio.timeout(3.0):
            while not any(isinstance(e, LinkTerminated) for e in rec.events):
                await asyncio.sleep(0.01)
        async with asyncio.timeout(2.0):
            await rec.conns[0].closed
            assert await reader.read() == b""  # the connection is closed
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


class StopsReading(Recorder):
    """A server that stops reading its links once their handshake is done."""

    def link_event(self, conn: LinkConnection, event: Event) -> None:
        super().link_event(conn, event)
        if isinstance(event, HandshakeCompleted) and conn.transport is not None:
            conn.transport.pause_reading()


async def test_aclose_ends_the_connection_of_a_peer_that_stopped_reading() -> None:
    """`transport.close()` waits for the kernel to take what the transport holds: from
    a peer that stopped reading, for ever (the socket and its buffers stayed)."""
    server_side = StopsReading()
    server = await serve_links("127.0.0.1", 0, lambda: LinkConfig(name="gw"), server_side)
    port = server.sockets[0].getsockname()[1]
    config = LinkConfig(name="c", heartbeat_interval=0.1, link_timeout=0.5)
    conn = await open_link("127.0.0.1", port, config, Recorder())
    lost = asyncio.Event()
    connection_lost = conn.connection_lost

    def note_lost(exc: Exception | None) -> None:
        lost.set()
        connection_lost(exc)

    conn.connection_lost = note_lost  # type: ignore[method-assign]
    try:
        body = bytes(conn.link.max_payload)
        for seq in range(64):  # 16 MiB: more than the kernel buffers on both sides
            conn.link.send_message(1, seq, body, conn.now)
            conn.flush()
            await asyncio.sleep(0)
        assert conn.link.queued or conn.transport.get_write_buffer_size()  # type: ignore[union-attr]
        async with asyncio.timeout(5.0):
            await conn.aclose()
        async with asyncio.timeout(5.0):
            await lost.wait()  # the connection ends, whatever it still held
    finally:
        await _abort_all(conn, server_side, server)


async def test_a_tls_close_notify_ends_the_link_as_an_eof_does(tls: TLSMaterial) -> None:
    """A peer that ends its TLS session (close_notify) and leaves TCP open has closed
    the link: it ended at once, not after `link_timeout` (15 s) of silence."""
    rec = Recorder()
    server = await serve_links("127.0.0.1", 0, lambda: LinkConfig(name="gw"), rec,
                               ssl_context=tls.server_context())
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    incoming, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = tls.client_context().wrap_bio(incoming, out, server_hostname="localhost")
    try:
        async with asyncio.timeout(5.0):
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    writer.write(out.read())
                    incoming.write(await reader.read(65536))
            link = Link(Role.CLIENT, LinkConfig(name="c"), loop.time())
            obj.write(link.data_to_send())
            writer.write(out.read())
            while not link.is_open:
                incoming.write(await reader.read(65536))
                with contextlib.suppress(ssl.SSLWantReadError):
                    link.receive_data(obj.read(65536), loop.time())
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.unwrap()  # close_notify
        writer.write(out.read())
        async with asyncio.timeout(2.0):
            while not any(isinstance(e, LinkTerminated) for e in rec.events):
                await asyncio.sleep(0.01)
            while await reader.read(65536):
                pass  # then the server closes the connection
        end = next(e for e in rec.events if isinstance(e, LinkTerminated))
        assert "closed" in end.reason
    finally:
        writer.close()
        server.close()


async def _abort_all(conn: LinkConnection, server_side: Recorder,
                     server: asyncio.AbstractServer) -> None:
    """Abort the client's connection and every server-side one; close the server."""
    for c in (conn, *server_side.conns):
        if c.transport is not None:
            c.transport.abort()
    server.close()
    await server.wait_closed()


class Sends(Recorder):
    """A server that accepts every flow and sends on it as much as its credit (and the
    link's queue) lets it."""

    body = bytes(1024 * 1024)

    def link_event(self, conn: LinkConnection, event: Event) -> None:
        super().link_event(conn, event)
        if isinstance(event, FlowOpenRequested):
            conn.link.accept_flow(event.stream, conn.now)
            self.pump(conn, event.stream)
        elif isinstance(event, WindowUpdated):
            self.pump(conn, event.stream)

    def pump(self, conn: LinkConnection, stream: int) -> None:
        while conn.link.send_data(stream, self.body, conn.now):
            pass


async def _held_for_a_peer_that_stopped_reading(
        server_tls: ssl.SSLContext | None, client_tls: ssl.SSLContext | None) -> int:
    """What a server-side link holds (its queue and its transport's buffer) once its
    peer, having given 32 MiB of credit, stopped reading."""
    server_side = Sends()
    server = await serve_links("127.0.0.1", 0, lambda: LinkConfig(name="gw"), server_side,
                               ssl_context=server_tls)
    port = server.sockets[0].getsockname()[1]
    config = LinkConfig(name="c", initial_window=8 << 20, max_window=8 << 20)
    conn = await open_link("127.0.0.1", port, config, Recorder(), ssl_context=client_tls,
                           server_hostname="localhost" if client_tls else None)
    try:
        for _ in range(4):
            conn.link.open_flow("bulk", conn.now)
        conn.flush()
        assert conn.transport is not None
        conn.transport.pause_reading()
        held = 0
        for _ in range(100):  # until the server side holds no more
            await asyncio.sleep(0.02)
            sconn = server_side.conns[0] if server_side.conns else None
            if sconn is None or sconn.transport is None:
                continue
            now = sconn.link.queued + sconn.transport.get_write_buffer_size()
            if now == held and held:
                break
            held = now
        return held
    finally:
        await _abort_all(conn, server_side, server)


async def test_a_tls_gateway_link_holds_no_more_than_a_plain_one(tls: TLSMaterial) -> None:
    """A peer that stopped reading leaves a server-side link holding at most about its
    queue's worth of data (`queue_limit`, at most 4 MiB) and what its transport's
    buffer then holds, as over plain TCP: over the gateway's own TLS, the link handed
    all it had to the transport, which held whatever the flows' credit allowed
    (up to `window_budget`: here 32 MiB)."""
    plain = await _held_for_a_peer_that_stopped_reading(None, None)
    over_tls = await _held_for_a_peer_that_stopped_reading(tls.server_context(),
                                                           tls.client_context())
    print(f"held: plain {plain} B, TLS {over_tls} B, queue_limit {QUEUE_LIMIT} B")
    assert plain <= 4 << 20
    assert over_tls <= 4 << 20, (plain, over_tls)


async def test_open_link_cancelled_while_waiting_for_hello_closes_its_connection() -> None:
    """A dial cancelled after TCP connected but before the peer's HELLO: the connection
    it made is closed at once (it stayed open until the link's handshake timeout, here
    30 s, holding a socket the caller no longer knew of)."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
        asyncio.Queue()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))  # reads nothing, says nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = LinkConfig(name="c", handshake_timeout=30.0)
    dial = asyncio.create_task(open_link("127.0.0.1", port, config, Recorder()))
    reader, writer = await asyncio.wait_for(accepted.get(), 5.0)
    try:
        await asyncio.sleep(0.05)  # the dial now waits for HELLO
        assert not dial.done()
        dial.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dial
        assert dial.cancelled()
        async with asyncio.timeout(2.0):  # the dialler's HELLO, then its end
            while await reader.read(65536):
                pass
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
