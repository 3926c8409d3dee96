"""A TLS hub's handshakes, with real sockets and real TLS clients, on both loops: a
handshake that fails or never completes is logged at the hub (peer address, why) and
counted (``HubStats.handshakes_failed``), ends only that connection and is never opened;
a flood of them takes a few log lines; a shutdown during handshakes leaves no task,
socket or count behind. Before the hub ran its handshakes itself
(``tether.aio.TLSServer``), the loop's SSL layer ended them unseen: no line, no count."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

import tether.hub
from test_hub_support import Recorder, connect, reset, until
from tether.aio import TLSServer
from tether.errors import FlowClosed
from tether.hub import Closed, Data, Hub, Opened

HUB_LOG = "tether.hub"


@contextlib.asynccontextmanager
async def echo_hub(ctx: ssl.SSLContext, **options: Any) -> AsyncIterator[Hub]:
    """A started TLS hub that echoes every message."""
    async with Hub(tls=ctx, **options) as hub:
        recorder = Recorder(hub, echo=True).start()
        try:
            yield hub
        finally:
            await recorder.stop()


async def served(hub: Hub, ctx: ssl.SSLContext, text: bytes = b"still here") -> None:
    """A TLS client of ``ctx`` gets its echo."""
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port, ssl=ctx,
                                                   server_hostname="localhost")
    try:
        writer.write(text + b"\n")
        assert await asyncio.wait_for(reader.readline(), 5) == text + b"\n"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def hung_up(reader: asyncio.StreamReader) -> None:
    """The hub ended the connection (EOF, or a reset if bytes were left unread)."""
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 5) == b""


def address(writer: asyncio.StreamWriter) -> str:
    """The client's own address, as the hub logs its peer."""
    return "{}:{}".format(*writer.get_extra_info("sockname")[:2])


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The hub's log lines about failed TLS handshakes."""
    return [r.getMessage() for r in caplog.records
            if r.name == HUB_LOG and "TLS handshake" in r.getMessage()
            and r.levelno >= logging.INFO]


async def test_plain_text_client_is_logged_counted_and_others_served(
        tls: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, HUB_LOG)
    async with echo_hub(tls.server_context()) as hub:
        reader, writer = await connect(hub.port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")  # not TLS
        await hung_up(reader)
        writer.close()
        await until(lambda: hub.stats().handshakes_failed == 1)
        await served(hub, tls.client_context())
        stats = hub.stats()
        assert (stats.handshakes_failed, stats.opened, stats.open) == (1, 1, 0), stats
    [line] = failures(caplog)
    assert address(writer) in line and line.endswith("failed: HTTP_REQUEST"), line


async def test_silent_and_stalled_clients_time_out(
        tls: Any, caplog: pytest.LogCaptureFixture) -> None:
    """One connects and sends nothing, one stops in the middle of its ClientHello: each
    is ended at ``handshake_timeout``, while a good client is served meanwhile."""
    caplog.set_level(logging.INFO, HUB_LOG)
    async with echo_hub(tls.server_context(), handshake_timeout=0.3) as hub:
        silent_reader, silent = await connect(hub.port)
        stalled_reader, stalled = await connect(hub.port)
        stalled.write(b"\x16\x03\x01\x00\xff")  # a TLS record header, then nothing
        await served(hub, tls.client_context())
        assert hub.stats().handshakes_failed == 0
        await hung_up(silent_reader)
        await hung_up(stalled_reader)
        silent.close()
        stalled.close()
        await until(lambda: hub.stats().handshakes_failed == 2)
        await served(hub, tls.client_context())
        assert hub.stats().opened == 2
    lines = failures(caplog)
    assert len(lines) == 2 and all(x.endswith("failed: timed out after 0.3 s")
                                   for x in lines), lines
    assert {address(silent), address(stalled)} == {x.split()[5] for x in lines}, lines


async def test_mutual_tls_refuses_clients_without_a_good_certificate(
        tls: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, HUB_LOG)
    async with echo_hub(tls.server_context(require_client_cert=True)) as hub:
        stranger = ssl.create_default_context(cafile=tls.ca)
        stranger.load_cert_chain(tls.other_client_cert, tls.other_client_key)
        # Each client hears why, in the TLS alert the hub writes before it closes
        # (the loop's SSL layer dropped it: the client read an EOF)
        with pytest.raises(ssl.SSLError, match="ALERT_CERTIFICATE_REQUIRED"):
            await served(hub, tls.client_context())  # no certificate
        with pytest.raises(ssl.SSLError, match="ALERT_UNKNOWN_CA"):
            await served(hub, stranger)
        await until(lambda: hub.stats().handshakes_failed == 2)
        await served(hub, tls.client_context(cert=True))
        stats = hub.stats()
        assert (stats.handshakes_failed, stats.opened) == (2, 1), stats
    none, unknown = failures(caplog)
    assert none.endswith("failed: PEER_DID_NOT_RETURN_A_CERTIFICATE"), none
    assert "CERTIFICATE_VERIFY_FAILED" in unknown, unknown


async def test_peers_that_leave_during_the_handshake(
        tls: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A client that does not trust the hub's certificate, one that closes before
    sending a byte and one that resets: each counted, with what the hub could tell."""
    caplog.set_level(logging.INFO, HUB_LOG)
    async with echo_hub(tls.server_context()) as hub:
        with pytest.raises(ssl.SSLCertVerificationError):
            await served(hub, tls.client_context(trust="other"))
        await until(lambda: hub.stats().handshakes_failed == 1)
        _, writer = await connect(hub.port)
        writer.close()
        await until(lambda: hub.stats().handshakes_failed == 2)
        _, writer = await connect(hub.port)
        reset(writer)
        await until(lambda: hub.stats().handshakes_failed == 3)
        await served(hub, tls.client_context())
        assert hub.stats().opened == 1
    lines = failures(caplog)
    # (Python's client closes without an alert when it refuses the certificate)
    assert [x.partition(" failed: ")[2] for x in lines] == [
        "closed by the peer during the handshake"] * 2 + ["connection reset by peer"], lines


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")
async def test_openssl_s_client_without_a_certificate(
        tls: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, HUB_LOG)
    async with echo_hub(tls.server_context(require_client_cert=True)) as hub:
        client = await asyncio.create_subprocess_exec(
            "openssl", "s_client", "-connect", f"127.0.0.1:{hub.port}", "-tls1_2",
            "-CAfile", str(tls.ca), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(client.communicate(), 10)
        assert client.returncode != 0  # its handshake failed, and it was told why:
        assert b"alert handshake failure" in output, output.decode(errors="replace")
        await until(lambda: hub.stats().handshakes_failed == 1)
        assert hub.stats().opened == 0
    [line] = failures(caplog)
    assert line.endswith("failed: PEER_DID_NOT_RETURN_A_CERTIFICATE"), line


async def test_a_flood_of_failures_takes_a_few_log_lines(
        tls: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """25 failures within a window: 10 lines, then one line for the other 15 at the end
    of the window; the next window logs one by one again. All 26 are counted."""
    caplog.set_level(logging.INFO, HUB_LOG)
    monkeypatch.setattr(tether.hub, "_HANDSHAKE_LOG_WINDOW", 0.5)
    async with echo_hub(tls.server_context()) as hub:
        for _ in range(25):
            _, writer = await connect(hub.port)
            writer.close()
        await until(lambda: hub.stats().handshakes_failed == 25)
        assert len(failures(caplog)) == 10, failures(caplog)
        await until(lambda: len(failures(caplog)) == 11, timeout=2)
        summary = failures(caplog)[10]
        assert "15 more TLS handshakes failed within 0.5 s" in summary, summary
        assert summary.endswith("closed by the peer during the handshake"), summary
        reader, writer = await connect(hub.port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        await hung_up(reader)
        writer.close()
        await until(lambda: len(failures(caplog)) == 12)
        assert failures(caplog)[11].endswith("failed: HTTP_REQUEST")
        assert hub.stats().handshakes_failed == 26


async def test_shutdown_with_failures_not_yet_logged_logs_them(
        tls: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, HUB_LOG)
    async with echo_hub(tls.server_context()) as hub:
        for _ in range(12):
            _, writer = await connect(hub.port)
            writer.close()
        await until(lambda: hub.stats().handshakes_failed == 12)
        assert len(failures(caplog)) == 10
    assert "2 more TLS handshakes failed" in failures(caplog)[-1], failures(caplog)


async def test_shutdown_during_handshakes_leaves_nothing_and_counts_nothing(
        tls: Any, caplog: pytest.LogCaptureFixture) -> None:
    """aclose() ends the handshakes under way at once: none of them lives on to time
    out (0.5 s) and be counted."""
    caplog.set_level(logging.INFO, HUB_LOG)
    hub = await Hub(tls=tls.server_context(), handshake_timeout=0.5).start()
    try:
        server = hub._server
        assert isinstance(server, TLSServer)
        clients = [await connect(hub.port) for _ in range(3)]  # silent
        for _ in range(3):  # handshakes started, never finished
            reader, writer = await connect(hub.port)
            writer.write(b"\x16\x03\x01\x00\xff")
            clients.append((reader, writer))
        await until(lambda: server.handshakes() == 6)
    finally:
        await hub.aclose()
    assert server.handshakes() == 0 and not server.is_serving()
    for reader, writer in clients:
        await hung_up(reader)
        writer.close()
    await asyncio.sleep(0.6)
    stats = hub.stats()
    assert (stats.handshakes_failed, stats.opened) == (0, 0), stats
    assert failures(caplog) == []


async def test_close_before_the_handshake_tasks_ran_closes_their_sockets(tls: Any) -> None:
    """Connections accepted in the same loop iteration as ``close()``: their tasks never
    run (cancelled first), so close() itself closes their sockets."""
    hub = await Hub(tls=tls.server_context()).start()
    clients = [socket.create_connection(("127.0.0.1", hub.port)) for _ in range(3)]
    try:
        server = hub._server
        assert isinstance(server, TLSServer)
        server._accept(server.sockets[0])  # (what the loop calls when it is readable)
        accepted = set(server._unstarted)
        assert len(accepted) == 3
        await hub.aclose()  # closes the server before the tasks' first step
        assert all(sock.fileno() == -1 for sock in accepted)
        assert server.handshakes() == 0 and hub.stats().handshakes_failed == 0
    finally:
        await hub.aclose()
        for sock in clients:
            sock.close()


async def test_data_sent_with_the_handshake_and_a_close_at_once_arrive(tls: Any) -> None:
    """Blocking clients that send right after their handshake and close at once: the
    hub's connection exists from the end of the handshake on, so nothing is lost and
    each is an ordinary connection (Opened, Data, Closed; counted as opened)."""
    client_ctx = tls.client_context()
    async with Hub(tls=tls.server_context()) as hub:
        port = hub.port

        def clients() -> None:
            for i in range(20):
                with socket.create_connection(("127.0.0.1", port)) as raw, \
                        client_ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                    sock.sendall(b"m%d\n" % i)

        thread = threading.Thread(target=clients)
        thread.start()
        recorder = Recorder(hub).start()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        await until(lambda: len(recorder.closed) == 20)
        await recorder.stop()
        events = [e for es in recorder.by_id.values() for e in es]
        got = sorted(e.data for e in events if isinstance(e, Data))
        assert got == sorted(b"m%d" % i for i in range(20))
        assert sum(isinstance(e, Opened) for e in events) == 20
        assert all(isinstance(e, Closed) for e in events[2::3])
        recorder.check_exactly_once()
        stats = hub.stats()
        assert (stats.opened, stats.handshakes_failed, stats.open) == (20, 0, 0), stats


def test_handshake_timeout_must_be_positive(tls: Any) -> None:
    with pytest.raises(ValueError, match="handshake_timeout must be positive"):
        Hub(tls=tls.server_context(), handshake_timeout=0)


async def test_a_tls_error_after_the_handshake_is_no_handshake_failure(tls: Any) -> None:
    """A client whose handshake completed and who then sends bytes that are no TLS
    record: its connection was opened, so it ends as a connection does (Opened, then
    Closed); it is not counted as a failed handshake, and others are served."""
    async with Hub(tls=tls.server_context()) as hub:
        recorder = Recorder(hub, echo=True).start()
        try:
            def client() -> None:
                with socket.create_connection(("127.0.0.1", hub.port), timeout=5) as raw, \
                        tls.client_context().wrap_socket(
                            raw, server_hostname="localhost") as tsock:
                    tsock.sendall(b"first\n")
                    assert tsock.recv(100) == b"first\n"
                    os.write(tsock.fileno(), b"\x17\x03\x03\x00\x10" + b"x" * 16)
                    with contextlib.suppress(OSError):  # the hub's alert or reset
                        while tsock.recv(100):
                            pass

            await asyncio.to_thread(client)
            await until(lambda: hub.stats().open == 0)
            await served(hub, tls.client_context())
            stats = hub.stats()
            assert (stats.handshakes_failed, stats.opened) == (0, 2), stats
            first = recorder.opened[0]
            await until(lambda: first in recorder.closed)
            assert len(recorder.opened) == 2, recorder.by_id
            assert "bad record mac" in recorder.closed[first], recorder.closed
        finally:
            await recorder.stop()


async def test_a_client_of_an_older_protocol_version_is_told_so(
        tls: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, HUB_LOG)
    server = tls.server_context()
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    old = tls.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    async with echo_hub(server) as hub:
        with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
            await served(hub, old)
        await until(lambda: hub.stats().handshakes_failed == 1)
        await served(hub, tls.client_context())
    [line] = failures(caplog)
    assert line.endswith("failed: UNSUPPORTED_PROTOCOL"), line


async def test_close_notify_both_ways(tls: Any) -> None:
    """The hub's close() ends a TLS connection with a close_notify (a clean end, not a
    truncation the client must suspect), and a client's close_notify is the peer's
    end: Closed("peer"), and the hub answers with its own."""
    client_ctx = tls.client_context()
    async with Hub(tls=tls.server_context()) as hub:
        port = hub.port

        def client(close_first: bool) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname="localhost",
                                           suppress_ragged_eofs=False) as tsock:
                tsock.sendall(b"hello\n")
                if close_first:
                    tsock.unwrap()  # ours, then waits for the hub's: raises without it
                    return b"unwrapped"
                got: bytes = tsock.recv(100)  # b"" at a close_notify; SSLEOFError at EOF
                return got

        ended = asyncio.ensure_future(asyncio.to_thread(client, False))
        opened = await asyncio.wait_for(hub.recv_open(), 5)
        data = await asyncio.wait_for(hub.recv_data(), 5)
        assert data.data == b"hello"
        hub.close(opened.id)
        assert await asyncio.wait_for(ended, 5) == b""
        assert await asyncio.wait_for(hub.recv_close(), 5) == Closed(opened.id, "local")

        ended = asyncio.ensure_future(asyncio.to_thread(client, True))
        opened = await asyncio.wait_for(hub.recv_open(), 5)
        assert (await asyncio.wait_for(hub.recv_data(), 5)).data == b"hello"
        assert await asyncio.wait_for(ended, 5) == b"unwrapped"
        assert await asyncio.wait_for(hub.recv_close(), 5) == Closed(opened.id, "peer")
        assert hub.stats().open == 0


async def test_flow_control_through_tls_both_ways(tls: Any) -> None:
    """Over TLS as over TCP: a stalled application pauses the sockets that feed its
    queue and loses nothing; a client that reads nothing is a slow consumer."""
    high = 64 * 1024
    async with Hub(tls=tls.server_context(), queue_high=high,
                   max_write_buffer=64 * 1024) as hub:
        clients = [await asyncio.open_connection("127.0.0.1", hub.port,
                                                 ssl=tls.client_context(),
                                                 server_hostname="localhost")
                   for _ in range(4)]
        line = b"q" * 99 + b"\n"
        per_client = 3000  # 300 kB each: far above the watermark

        async def push(writer: asyncio.StreamWriter) -> None:
            for _ in range(per_client // 100):
                writer.write(line * 100)
                await writer.drain()

        pushers = [asyncio.ensure_future(push(w)) for _, w in clients]
        await until(lambda: hub.stats().paused > 0)
        await asyncio.sleep(0.2)  # stalled a while longer: still bounded
        assert hub.stats().queued_bytes <= high + 4 * 256 * 1024
        opens = [await hub.recv_open() for _ in clients]
        got = 0
        while got < 4 * per_client:
            events = await hub._next_batch(False)
            assert events is not None
            got += sum(1 for e in events if isinstance(e, Data) and e.data == line[:-1])
        await asyncio.gather(*pushers)
        assert got == 4 * per_client and hub.stats().paused == 0

        with pytest.raises(FlowClosed):  # the first client reads nothing
            for _ in range(100_000):
                hub.send(opens[0].id, b"y" * 1000)
                await asyncio.sleep(0)
        assert await asyncio.wait_for(hub.recv_close(), 5) == Closed(opens[0].id,
                                                                     "slow consumer")
        for _, writer in clients:
            writer.close()


async def test_a_connection_refused_after_its_handshake_is_no_failed_handshake(
        tls: Any) -> None:
    """`max_unseen_opens` refuses a connection as it is accepted, which for TLS is
    when its handshake completed: it counts as refused only."""
    async with Hub(tls=tls.server_context(), max_unseen_opens=1) as hub:
        first = await asyncio.open_connection("127.0.0.1", hub.port,
                                              ssl=tls.client_context(),
                                              server_hostname="localhost")
        await until(lambda: hub.stats().opened == 1)
        reader, writer = await asyncio.open_connection("127.0.0.1", hub.port,
                                                       ssl=tls.client_context(),
                                                       server_hostname="localhost")
        await hung_up(reader)
        await until(lambda: hub.stats().refused == 1)
        await asyncio.sleep(0.05)
        stats = hub.stats()
        assert (stats.refused, stats.handshakes_failed, stats.opened) == (1, 0, 1), stats
        for _, w in (first, (reader, writer)):
            w.close()
