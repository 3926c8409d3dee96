"""The hub's contract at its edges (asyncio hub and the thread facade): one Closed per
connection even when a half-closed one overflows, no event lost at shutdown, opens not
held back by unread data, no silent send after a handed Closed, no hub left listening
by a close during start. Each test failed on the code before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from typing import Any

import pytest

from test_hub_support import Run, connect, until
from tether.errors import FlowClosed
from tether.hub import Closed, Data, Hub, HubClosed, Opened
from tether.sync import Hub as SyncHub


# 1. A connection whose peer half-closed (lingering) gets a second Closed when a
#    reply overflows its write buffer (slow-consumer policy "disconnect").
def test_lingering_overflow_gets_exactly_one_closed(arun: Run) -> None:
    async def main() -> None:
        async with Hub(max_write_buffer=64 * 1024) as hub:
            events: list[Any] = []

            async def consume() -> None:
                async for event in hub:
                    events.append(event)
                    if isinstance(event, Data):
                        for _ in range(20):  # 160 KiB in one iteration > 64 KiB
                            try:
                                hub.send(event.id, b"r" * 8192)
                            except FlowClosed:
                                break

            _, writer = await connect(hub.port)
            writer.write(b"hello\n")
            writer.write_eof()  # half-close: the hub lingers, replies allowed
            await until(lambda: hub.stats().closed.get("peer") == 1)  # Data, then EOF
            task = asyncio.ensure_future(consume())  # one batch: Opened, Data, Closed
            await until(lambda: any(isinstance(e, Closed) for e in events))
            await asyncio.sleep(0.2)
            closes = [e for e in events if isinstance(e, Closed)]
            writer.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert len(closes) == 1, closes
            assert hub.stats().closed_total == 1, hub.stats().closed

    arun(main())


# 2. recv_close raises HubClosed after shutdown while a Closed is still deferred
#    behind data that recv_data has not taken yet: that Closed is never delivered.
def test_recv_close_after_shutdown_waits_for_data(arun: Run) -> None:
    async def main() -> None:
        hub = await Hub().start()
        _, writer = await connect(hub.port)
        opened = await hub.recv_open()
        writer.write(b"a\nb\n")
        await until(lambda: hub.stats().messages_in == 2)
        closer = asyncio.ensure_future(hub.recv_close())  # a close receiver, waiting
        await asyncio.sleep(0.05)
        await hub.aclose()
        await asyncio.sleep(0.05)  # the close receiver runs before the data receiver
        got = [(await hub.recv_data()).data, (await hub.recv_data()).data]
        assert got == [b"a", b"b"]
        try:
            closed = await asyncio.wait_for(closer, 2)
        finally:
            writer.close()
        assert closed == Closed(opened.id, "shutdown")

    arun(main())


def test_sync_recv_close_after_shutdown_waits_for_data() -> None:
    hub = SyncHub().start()
    sock = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
    try:
        opened = hub.recv_open(timeout=5)
        sock.sendall(b"a\nb\n")
        deadline = time.monotonic() + 5
        while hub.stats().messages_in < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        result: list[Any] = []

        def closer() -> None:
            try:
                result.append(hub.recv_close(timeout=5))
            except BaseException as exc:
                result.append(exc)

        t = threading.Thread(target=closer)
        t.start()
        time.sleep(0.05)
        hub.shutdown()
        time.sleep(0.1)  # the close receiver runs before the data receiver
        assert [hub.recv_data(timeout=1).data for _ in range(2)] == [b"a", b"b"]
        t.join(6)
        assert result == [Closed(opened.id, "shutdown")], result
    finally:
        sock.close()
        hub.shutdown()


# 3. After shutdown, with the facade's queue above thread_queue, recv_data loses a
#    message (already dequeued) and raises HubClosed while data is still queued.
def test_sync_recv_data_after_shutdown_loses_nothing() -> None:
    hub = SyncHub(thread_queue=4096).start()
    sock = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
    try:
        hub.recv_open(timeout=5)
        n = 200
        sock.sendall(b"".join(b"m%04d" % i + b"x" * 50 + b"\n" for i in range(n)))
        deadline = time.monotonic() + 5
        while hub.stats().messages_in < n and time.monotonic() < deadline:
            time.sleep(0.01)
        hub.shutdown()
        got: list[bytes] = []
        error: BaseException | None = None
        try:
            while True:
                got.append(hub.recv_data(timeout=1).data[:5])
        except HubClosed as exc:
            error = exc
        assert got == [b"m%04d" % i for i in range(n)], (len(got), error)
    finally:
        sock.close()


# 4. The facade says "opens and closes are never held back by unread data"; with its
#    thread queue full, the pump stops and a new connection's Opened never arrives.
def test_sync_opens_not_held_back_by_unread_data() -> None:
    with SyncHub(thread_queue=8192, queue_high=8192) as hub:
        a = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
        b = None
        try:
            hub.recv_open(timeout=5)
            a.sendall(b"y" * 99 + b"\n" * 1 + (b"z" * 99 + b"\n") * 500)
            time.sleep(0.3)  # nobody calls recv_data
            b = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
            opened = hub.recv_open(timeout=2)  # TimeoutError on the current code
            assert isinstance(opened, Opened)
        finally:
            a.close()
            if b is not None:
                b.close()


# 5. Sync facade: after recv_close() returned Closed(id, "peer"), send(id) is
#    documented to raise FlowClosed; it returns and the message is dropped silently.
def test_sync_send_after_handed_peer_close_raises() -> None:
    with SyncHub() as hub:
        silent = 0
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", hub.port), timeout=5)
            fid = hub.recv_open(timeout=5).id
            sock.shutdown(socket.SHUT_WR)
            assert hub.recv_close(timeout=5) == Closed(fid, "peer")
            try:
                hub.send(fid, b"late")
            except FlowClosed:
                pass
            else:
                silent += 1
            sock.close()
        assert silent == 0, f"{silent}/20 sends after the handed Closed were dropped silently"


# 6. A TLS handshake that never completes: the contract wants a log line and a counter
#    (more in test_hub_tls.py).
def test_tls_handshake_timeout_is_logged(arun: Run, tls: Any,
                                                caplog: pytest.LogCaptureFixture) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.server_cert, tls.server_key)

    async def main() -> None:
        async with Hub(tls=ctx, handshake_timeout=0.2) as hub:
            _, writer = await connect(hub.port)  # never starts the handshake
            await asyncio.sleep(0.6)
            writer.close()
            stats = hub.stats()
            assert (stats.opened, stats.handshakes_failed) == (0, 1), stats
            return None

    with caplog.at_level(logging.DEBUG, logger="tether"):
        arun(main())
    assert any("handshake" in r.getMessage().lower() and "timed out" in r.getMessage()
               for r in caplog.records if r.name.startswith("tether")), \
        [r.getMessage() for r in caplog.records]


# 7. aclose() while start() is still binding: the hub says it closed, then start()
#    finishes and leaves it open, listening and accepting.
def test_aclose_during_start_leaves_nothing_listening(arun: Run) -> None:
    async def main() -> None:
        hub = Hub()
        starting = asyncio.ensure_future(hub.start())
        await asyncio.sleep(0)
        await hub.aclose()
        with contextlib.suppress(Exception):
            await starting
        serving = hub._server is not None and hub._server.is_serving()
        if hub._server is not None:
            hub._server.close()
            await hub._server.wait_closed()
        assert not serving and hub.closed

    arun(main())
