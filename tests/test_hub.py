"""The Hub over real sockets, under asyncio's loop and uvloop: events and their order,
every close reason exactly once, sending, framing errors, idle timeouts, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import subprocess
from collections import deque
from pathlib import Path

import pytest

from test_hub_support import Recorder, Run, connect, reset, until
from tether.aio import SocketOptions
from tether.errors import FlowClosed, LocalProtocolError
from tether.framing import LengthPrefixed, Lines, Raw
from tether.hub import Closed, Data, FlowsClosed, Hub, HubClosed, Messages, Opened
from tether.ids import FlowId


def test_echo_events_in_order_and_ids_round_trip(arun: Run) -> None:
    async def main() -> None:
        async with Hub(name="gw1") as hub:
            rec = Recorder(hub, echo=True).start()
            reader, writer = await connect(hub.port)
            writer.write(b"hello\nworld\npart")
            assert await reader.readline() == b"hello\n"
            assert await reader.readline() == b"world\n"
            writer.write(b"ial\n")
            assert await reader.readline() == b"partial\n"
            writer.close()
            await until(lambda: rec.closed)
            (fid,) = rec.opened
            assert fid.node == "gw1" and FlowId.parse(str(fid)) == fid
            assert FlowId.from_int(int(fid), "gw1") == fid
            events = rec.by_id[fid]
            assert isinstance(events[0], Opened) and events[0].peer.startswith("127.0.0.1:")
            assert rec.data(fid) == [b"hello", b"world", b"partial"]
            assert events[-1] == Closed(fid, "peer")
            with pytest.raises(FlowClosed, match="closed or unknown"):
                hub.send(FlowId.parse(str(fid)), b"late")
            with pytest.raises(FlowClosed):
                hub.send(FlowId("other", fid.serial), b"x")
            with pytest.raises(TypeError, match="FlowId"):
                hub.send(str(fid), b"x")  # type: ignore[arg-type]
            stats = hub.stats()
            assert (stats.opened, stats.open, stats.closed) == (1, 0, {"peer": 1})
            assert stats.messages_in == stats.messages_out == 3
            assert stats.bytes_in == stats.bytes_out == 20
            await rec.stop()

    arun(main())


def test_serials_are_never_reused(arun: Run) -> None:
    async def main() -> None:
        async with Hub() as hub:
            rec = Recorder(hub).start()
            for _ in range(5):
                _, writer = await connect(hub.port)
                writer.close()
            await until(lambda: len(rec.closed) == 5)
            serials = [fid.serial for fid in rec.opened]
            assert len(set(serials)) == 5 and serials == sorted(serials)
            await rec.stop()

    arun(main())


def test_peer_half_close_gets_replies_then_closes(arun: Run) -> None:
    """A client that sends and shuts down its side still gets its replies."""
    async def main() -> None:
        async with Hub() as hub:
            rec = Recorder(hub, echo=True).start()
            reader, writer = await connect(hub.port)
            writer.write(b"one\ntwo\n")
            writer.write_eof()
            assert await reader.read() == b"one\ntwo\n"  # then EOF: the hub closed
            await until(lambda: rec.closed)
            assert list(rec.closed.values()) == ["peer"]
            assert len(hub) == 0
            writer.close()
            await rec.stop()

    arun(main())


def test_local_close_after_writing_pending(arun: Run) -> None:
    async def main() -> None:
        async with Hub() as hub:
            reader, writer = await connect(hub.port)
            opened = await hub.recv_open()
            writer.write(b"before\n")
            data = await hub.recv_data()
            hub.send(opened.id, b"bye")
            assert hub.close(opened.id) is True
            assert hub.close(opened.id) is False
            assert not hub.is_open(opened.id)
            with pytest.raises(FlowClosed):
                hub.send(opened.id, b"after")
            assert data == Data(opened.id, b"before")
            assert await reader.read() == b"bye\n"
            assert await hub.recv_close() == Closed(opened.id, "local")
            writer.close()

    arun(main())


def test_reset_by_peer(arun: Run) -> None:
    async def main() -> None:
        async with Hub() as hub:
            rec = Recorder(hub).start()
            _, writer = await connect(hub.port)
            writer.write(b"x\n")
            await until(lambda: rec.opened and rec.data(rec.opened[0]))
            reset(writer)
            await until(lambda: rec.closed)
            assert list(rec.closed.values()) == ["reset"]
            await rec.stop()

    arun(main())


def test_message_too_large_closes_only_that_connection(arun: Run) -> None:
    async def main() -> None:
        async with Hub(framing=Lines(max_size=100)) as hub:
            rec = Recorder(hub, echo=True).start()
            r1, w1 = await connect(hub.port)
            r2, w2 = await connect(hub.port)
            w1.write(b"fine\n" + b"x" * 500)
            # closed at once (a RST if our bytes were still unread there)
            with contextlib.suppress(ConnectionResetError):
                assert await r1.read() == b""
            w2.write(b"still here\n")
            assert await r2.readline() == b"still here\n"
            await until(lambda: len(rec.closed) == 1)
            assert list(rec.closed.values()) == ["error: message too large"]
            assert rec.data(rec.opened[0]) == [b"fine"]  # what came before is delivered
            assert hub.stats().closed == {"error: message too large": 1}
            for w in (w1, w2):
                w.close()
            await rec.stop()

    arun(main())


def test_max_message_overrides_the_framing(arun: Run) -> None:
    async def main() -> None:
        async with Hub(framing=LengthPrefixed(2), max_message=3) as hub:
            assert hub.framing == LengthPrefixed(2, 3)
            rec = Recorder(hub, echo=True).start()
            reader, writer = await connect(hub.port)
            writer.write(b"\x00\x03abc\x00\x04abcd")
            await until(lambda: rec.closed)
            assert list(rec.closed.values()) == ["error: message too large"]
            assert rec.data(rec.opened[0]) == [b"abc"]
            writer.close()
            del reader
            await rec.stop()

    arun(main())


def test_idle_timeout_per_hub_and_per_connection(arun: Run) -> None:
    async def main() -> None:
        async with Hub(idle_timeout=0.2) as hub:
            rec = Recorder(hub).start()
            r1, w1 = await connect(hub.port)  # silent: idle
            r2, w2 = await connect(hub.port)  # talks: stays
            _, w3 = await connect(hub.port)  # no timeout
            await until(lambda: len(rec.opened) == 3)
            a, b, c = rec.opened
            hub.set_idle_timeout(c, None)
            loop = asyncio.get_running_loop()
            start = loop.time()
            while loop.time() - start < 0.5:
                w2.write(b"ping\n")
                await asyncio.sleep(0.05)
            assert await r1.read() == b""
            assert rec.closed == {a: "idle"}
            hub.set_idle_timeout(b, 0.05)
            assert await r2.read() == b""
            assert rec.closed[b] == "idle"
            assert hub.is_open(c)
            with pytest.raises(FlowClosed):
                hub.set_idle_timeout(a, 1.0)
            with pytest.raises(ValueError):
                hub.set_idle_timeout(c, 0.0)
            for w in (w1, w2, w3):
                w.close()
            await rec.stop()

    arun(main())


def test_send_many_fans_out_and_names_the_gone(arun: Run) -> None:
    async def main() -> None:
        async with Hub() as hub:
            rec = Recorder(hub).start()
            clients = [await connect(hub.port) for _ in range(20)]
            await until(lambda: len(rec.opened) == 20)
            gone = FlowId("hub", 999)
            with pytest.raises(FlowsClosed) as info:
                hub.send_many([*rec.opened, gone], b"news")
            assert info.value.ids == [gone] and isinstance(info.value, FlowClosed)
            hub.send_many(rec.opened, b"more")
            for reader, _ in clients:
                assert await reader.readline() == b"news\n"
                assert await reader.readline() == b"more\n"
            assert hub.stats().messages_out == 40
            for _, writer in clients:
                writer.close()
            await rec.stop()

    arun(main())


def test_send_coalesces_and_refuses_unframable_data(arun: Run) -> None:
    async def main() -> None:
        async with Hub() as hub:
            reader, writer = await connect(hub.port)
            opened = await hub.recv_open()
            for i in range(100):
                hub.send(opened.id, b"%d" % i)
            hub.send_batch(opened.id, [b"a", b"b"])
            with pytest.raises(LocalProtocolError):
                hub.send(opened.id, b"bad\nline")
            expected = b"".join(b"%d\n" % i for i in range(100)) + b"a\nb\n"
            assert await reader.readexactly(len(expected)) == expected
            writer.close()
            assert (await hub.recv_close()).reason == "peer"

    arun(main())


def test_grouped_batches_and_send_batch(arun: Run) -> None:
    async def main() -> None:
        async with Hub() as hub:
            reader, writer = await connect(hub.port)
            writer.write(b"a\nb\nc\n")
            seen: list[bytes] = []
            async for events in hub.batches(grouped=True):
                for event in events:
                    if isinstance(event, Messages):
                        seen += event.messages
                        hub.send_batch(event.id, event.messages)
                if len(seen) == 3:
                    break
            assert seen == [b"a", b"b", b"c"]
            assert await reader.readexactly(6) == b"a\nb\nc\n"
            writer.close()

    arun(main())


def test_raw_framing(arun: Run) -> None:
    async def main() -> None:
        async with Hub(framing=Raw()) as hub:
            rec = Recorder(hub, echo=True).start()
            reader, writer = await connect(hub.port)
            writer.write(b"no\nframing")
            assert await reader.readexactly(10) == b"no\nframing"
            writer.close()
            await until(lambda: rec.closed)
            await rec.stop()

    arun(main())


def test_recv_close_comes_after_the_data_was_taken(arun: Run) -> None:
    """Flamingo style: ignoring opens and closes never stalls data, and a Closed is
    delivered only once that connection's data has been taken."""
    async def main() -> None:
        async with Hub() as hub:
            clients = [await connect(hub.port) for _ in range(30)]
            for i, (_, writer) in enumerate(clients):
                writer.write(b"m%d\n" % i)
                writer.close()
            await until(lambda: hub.stats().closed_total == 30)
            closer = asyncio.ensure_future(hub.recv_close())
            await asyncio.sleep(0.05)
            assert not closer.done()  # all data still queued: no close yet
            got = [await hub.recv_data() for _ in range(30)]
            assert sorted(d.data for d in got) == sorted(b"m%d" % i for i in range(30))
            closes = [await closer] + [await hub.recv_close() for _ in range(29)]
            assert {c.reason for c in closes} == {"peer"}
            assert {c.id for c in closes} == {d.id for d in got}
            opens = [await hub.recv_open() for _ in range(30)]
            assert {o.id for o in opens} == {d.id for d in got}

    arun(main())


def test_shutdown_closes_everyone_once_and_ends_iteration(arun: Run) -> None:
    async def main() -> None:
        hub = await Hub().start()
        clients = [await connect(hub.port) for _ in range(10)]
        rec = Recorder(hub)
        consumer = asyncio.ensure_future(rec.run())
        await until(lambda: len(rec.opened) == 10)
        await hub.aclose()
        await asyncio.wait_for(consumer, 5)  # the iteration ended by itself
        assert set(rec.closed.values()) == {"shutdown"} and len(rec.closed) == 10
        rec.check_exactly_once()
        for reader, writer in clients:
            assert await reader.read() == b""
            writer.close()
        with pytest.raises(HubClosed):
            await hub.recv_data()
        with pytest.raises(HubClosed):
            await hub.recv_open()
        with pytest.raises(HubClosed):
            await hub.recv_close()
        assert hub.closed
        await hub.aclose()  # idempotent
        with pytest.raises(ConnectionRefusedError):
            await connect(hub.port)

    arun(main())


def test_aclose_timeout_longer_than_close_timeout_lets_writes_flush(arun: Run) -> None:
    """``aclose(timeout)`` gives the connections ``timeout`` seconds to flush what was
    sent to them, even when it is longer than ``close_timeout``: a peer that reads
    only after a while still gets everything, then a clean EOF (no abort)."""
    async def main() -> None:
        hub = await Hub(close_timeout=0.1, max_write_buffer=64 * 1024 * 1024).start()
        rec = Recorder(hub).start()
        sock = socket.create_connection(("127.0.0.1", hub.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await until(lambda: len(rec.opened) == 1)
            (fid,) = rec.opened
            total = 16 * 1024 * 1024  # far more than the kernel buffers hold
            hub.send(fid, b"z" * (total - 1))  # with the delimiter: `total` bytes
            await asyncio.sleep(0.05)
            closing = asyncio.ensure_future(hub.aclose(timeout=5.0))
            await asyncio.sleep(0.4)  # past close_timeout, well within aclose's timeout
            got = 0
            while True:
                chunk = await loop.sock_recv(sock, 1 << 20)
                if not chunk:
                    break
                got += len(chunk)
            assert got == total
            await closing
            assert rec.closed == {fid: "shutdown"}
        finally:
            sock.close()
        await rec.stop()

    arun(main())


def test_options_are_validated_and_the_listen_socket_configured(arun: Run) -> None:
    for bad in ({"idle_timeout": 0}, {"slow_consumer": "ignore"}, {"queue_high": 0},
                {"queue_low": -1}, {"max_write_buffer": 0}, {"name": "a@b"},
                {"max_message": 0}, {"linger": -1}):
        with pytest.raises(ValueError):
            Hub(**bad)
    with pytest.raises(RuntimeError, match="not started"):
        _ = Hub().port

    async def main() -> None:
        opts = SocketOptions(keepalive=True, keepidle=42)
        async with Hub(sockopts=opts, reuse_port=True, backlog=16) as hub:
            assert "open" in repr(hub)
            _, writer = await connect(hub.port)
            await hub.recv_open()
            with pytest.raises(RuntimeError):
                await hub.start()
            writer.close()

    arun(main())


def _self_signed(tmp: Path) -> tuple[Path, Path] | None:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "1", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return cert, key


def test_tls(arun: Run, tmp_path: Path) -> None:
    pair = _self_signed(tmp_path)
    if pair is None:
        pytest.skip("openssl is not available to make a test certificate")
    cert, key = pair
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        async with Hub(tls=server_ctx) as hub:
            rec = Recorder(hub, echo=True).start()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", hub.port, ssl=client_ctx, server_hostname="localhost")
            writer.write(b"secret\n")
            assert await reader.readline() == b"secret\n"
            writer.close()
            await until(lambda: rec.closed)
            assert list(rec.closed.values()) == ["peer"]
            await rec.stop()

    arun(main())


def test_many_clients_leave_with_sends_in_flight(arun: Run) -> None:
    """Hundreds of clients vanish (reset or close) while echoes to them are queued:
    the hub keeps serving the others, every one gets exactly one Closed, and sending
    to a gone id raises FlowClosed (the source design deadlocked here)."""
    async def main() -> None:
        async with Hub() as hub:
            rec = Recorder(hub, echo=True).start()
            stayers = [await connect(hub.port) for _ in range(20)]
            leavers = [await connect(hub.port) for _ in range(300)]
            await until(lambda: len(rec.opened) == 320)
            for i, (_, writer) in enumerate(leavers):
                writer.write(b"x" * 100 + b"\n" * 50)
                if i % 2:
                    reset(writer)
                else:
                    writer.close()
            for _, writer in stayers:
                writer.write(b"alive\n")
            for reader, _ in stayers:
                assert await reader.readline() == b"alive\n"
            await until(lambda: len(rec.closed) == 300, timeout=10)
            for fid in rec.closed:
                with pytest.raises(FlowClosed):
                    hub.send(fid, b"late")
            rec.check_exactly_once(still_open=20)
            assert set(rec.closed.values()) <= {"peer", "reset"}
            for reader, writer in stayers:
                writer.write(b"still\n")
                assert await reader.readline() == b"still\n"
                writer.close()
            await rec.stop()

    arun(main())


def _socket_pair_sizes(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


def test_slow_consumer_is_disconnected(arun: Run) -> None:
    async def main() -> None:
        async with Hub(max_write_buffer=64 * 1024) as hub:
            sock = socket.socket()
            _socket_pair_sizes(sock)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", hub.port))
            opened = await hub.recv_open()
            chunk = b"y" * 1000
            with pytest.raises(FlowClosed):
                for _ in range(100_000):  # the peer never reads
                    hub.send(opened.id, chunk)
                    await asyncio.sleep(0)
            closed = await hub.recv_close()
            assert closed == Closed(opened.id, "slow consumer")
            sock.close()

    arun(main())


def test_slow_consumer_drop_policy_counts(arun: Run) -> None:
    async def main() -> None:
        async with Hub(max_write_buffer=64 * 1024, slow_consumer="drop") as hub:
            sock = socket.socket()
            _socket_pair_sizes(sock)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("127.0.0.1", hub.port))
            opened = await hub.recv_open()
            chunk = b"z" * 999
            for _ in range(5000):
                hub.send(opened.id, chunk)
                await asyncio.sleep(0)
            stats = hub.stats()
            assert stats.dropped > 0 and hub.is_open(opened.id)
            received = 0
            sock.setblocking(True)
            sock.settimeout(2)
            try:
                while True:
                    got = await loop.run_in_executor(None, sock.recv, 1 << 20)
                    if not got:
                        break
                    received += len(got)
                    if received + stats.dropped * 1000 >= 5000 * 1000:
                        break
            except TimeoutError:
                pass
            assert received % 1000 == 0  # whole messages only
            assert received // 1000 + stats.dropped == 5000
            sock.close()

    arun(main())


def test_stalled_consumer_bounded_memory_nothing_lost(arun: Run) -> None:
    """The application stops reading for a while: the hub pauses the sockets feeding
    its queue (memory stays bounded), then resumes; every message arrives once."""
    async def main() -> None:
        high = 64 * 1024
        async with Hub(queue_high=high) as hub:
            clients = [await connect(hub.port) for _ in range(8)]
            line = b"q" * 99 + b"\n"
            per_client = 3000  # 300 kB each, 2.4 MB in all: far above the watermark

            async def push(writer: asyncio.StreamWriter) -> None:
                for _ in range(per_client // 100):
                    writer.write(line * 100)
                    await writer.drain()

            pushers = [asyncio.ensure_future(push(w)) for _, w in clients]
            peak = 0
            for _ in range(100):  # the application is stalled for a while
                await asyncio.sleep(0.01)
                stats = hub.stats()
                peak = max(peak, stats.queued_bytes)
            assert stats.paused > 0
            # bounded: the watermark plus at most one read per paused socket
            assert peak <= high + 8 * 256 * 1024
            got = 0
            while got < 8 * per_client:
                events = await hub._next_batch(False)
                assert events is not None
                got += sum(1 for e in events if isinstance(e, Data))
            await asyncio.gather(*pushers)
            assert got == 8 * per_client
            assert hub.stats().paused == 0
            for _, writer in clients:
                writer.close()

    arun(main())


def test_messages_arriving_in_pieces_count_whole_against_the_queue_bound(arun: Run) -> None:
    """A message completed over several reads counts with all its bytes against
    ``queue_high``, not only with those of its last read: a peer that sends its
    messages in pieces cannot fill the queue past the bound while the application
    is stalled."""
    async def main() -> None:
        high = 64 * 1024
        async with Hub(queue_high=high, framing=LengthPrefixed()) as hub:
            loop = asyncio.get_running_loop()
            sock = socket.create_connection(("127.0.0.1", hub.port))
            sock.setblocking(False)
            message = b"m" * 20_000
            frame = LengthPrefixed().encode(message)
            pieces = [frame[i:i + 5000] for i in range(0, len(frame), 5000)]
            sent = complete = 0
            try:
                while complete < 40 and not hub.stats().paused:
                    for piece in pieces:  # one read each: wait for it to be read
                        await loop.sock_sendall(sock, piece)
                        sent += len(piece)
                        await until(lambda: hub.stats().bytes_in == sent)  # noqa: B023
                    complete += 1
                queued = sum(len(m) for conn in hub._data for m in conn.rx or ())
                assert hub.stats().paused == 1, (complete, queued)
                assert queued <= high + len(frame), queued
                got = 0
                while got < complete:
                    events = await hub._next_batch(False)
                    assert events is not None
                    got += sum(1 for e in events if isinstance(e, Data) and e.data == message)
                assert got == complete and hub.stats().paused == 0
            finally:
                sock.close()

    arun(main())


def test_a_vanished_peer_we_keep_writing_to_ends_idle_within_its_timeout(arun: Run) -> None:
    """A peer that went silent without a FIN and reads nothing more (its window full)
    while the application keeps writing to it: our writes do not keep it alive; it
    ends with one Closed("idle") within about the timeout, and its socket is aborted
    after ``close_timeout`` (the unsent data cannot flush)."""
    async def main() -> None:
        async with Hub(idle_timeout=0.3, max_write_buffer=64 * 1024 * 1024,
                       close_timeout=0.3) as hub:
            rec = Recorder(hub).start()
            sock = socket.create_connection(("127.0.0.1", hub.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            try:
                await until(lambda: len(rec.opened) == 1)
                (fid,) = rec.opened
                loop = asyncio.get_running_loop()
                start = loop.time()
                while not rec.closed and loop.time() - start < 3.0:
                    with contextlib.suppress(FlowClosed):
                        hub.send(fid, b"x" * 65536)
                    await asyncio.sleep(0.02)
                took = loop.time() - start
                assert rec.closed == {fid: "idle"}
                assert 0.25 <= took < 0.8, took
                await asyncio.sleep(0.6)  # past close_timeout: aborted, nothing kept
                assert hub.stats().open == 0 and not hub._closing and not hub._conns
                assert hub.stats().closed == {"idle": 1}
            finally:
                sock.close()
            await rec.stop()

    arun(main())


def _sizes(hub: Hub) -> dict[str, int]:
    """The size of every container the hub holds (and of its timing wheel), but the
    counters of closes by reason."""
    sizes = {"wheel": len(hub._wheel)}
    for name in type(hub).__slots__:
        value = getattr(hub, name, None)
        if isinstance(value, (dict, list, set, tuple, deque)) and name != "_closed_by":
            sizes[name] = len(value)
    return sizes


def test_no_per_connection_state_is_left_after_many_connects_and_closes(arun: Run) -> None:
    """400 connections ended every way (peer EOF with linger, local close, RST, idle,
    a message too large), each with data and a reply queued: afterwards every dict,
    list, set and deque of the hub, and its timing wheel, is back to its size before."""
    async def main() -> None:
        async with Hub(idle_timeout=5.0, linger=0.05, close_timeout=0.2,
                       max_message=64) as hub:
            rec = Recorder(hub, echo=True).start()
            reader, writer = await connect(hub.port)  # warm-up, then the baseline
            writer.write(b"warm\n")
            await reader.readline()
            writer.close()
            await until(lambda: rec.closed)
            await asyncio.sleep(0.3)
            baseline = _sizes(hub)
            for round_ in range(40):
                pairs = [await connect(hub.port) for _ in range(10)]
                for i, (_, w) in enumerate(pairs):
                    w.write(b"m%d\n" % i)
                for r, _ in pairs:
                    assert (await r.readline()).startswith(b"m")
                want = 1 + 10 * (round_ + 1)
                await until(lambda: len(rec.opened) == want)  # noqa: B023 - awaited here
                mine = rec.opened[-10:]
                for i, (_, w) in enumerate(pairs):
                    kind = i % 5
                    if kind == 0:
                        w.write_eof()  # half-close: replies may still go for `linger`
                    elif kind == 1:
                        hub.close(mine[i])
                    elif kind == 2:
                        reset(w)
                    elif kind == 3:
                        hub.set_idle_timeout(mine[i], 0.05)
                    else:
                        w.write(b"y" * 100 + b"\n")  # too large
                await until(lambda: all(f in rec.closed for f in mine))  # noqa: B023
                for _, w in pairs:
                    w.close()
            await asyncio.sleep(0.5)  # past linger and close_timeout
            rec.check_exactly_once()
            reasons = set(rec.closed.values())
            assert reasons == {"peer", "local", "reset", "idle",
                               "error: message too large"}, reasons
            assert _sizes(hub) == baseline
            await rec.stop()

    arun(main())


def test_connections_beyond_max_unseen_opens_are_refused_while_nobody_takes_events(
        arun: Run, caplog: pytest.LogCaptureFixture) -> None:
    """Connections that come and go while the application takes no events left an
    Opened and a Closed each in the hub's queues, without bound (1.8 KB per connection
    measured). With `max_unseen_opens` Opened events waiting, a new connection is ended
    as it is accepted, logged and counted; the application then gets exactly the ones
    it was told of, each opened and closed."""
    async def main() -> None:
        async with Hub(max_unseen_opens=10) as hub:
            for _ in range(30):  # each comes and goes; nobody takes events
                _, writer = await asyncio.open_connection("127.0.0.1", hub.port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            await until(lambda: hub.stats().refused == 20)
            stats = hub.stats()
            assert (stats.opened, stats.refused) == (10, 20), stats
            opened = [await asyncio.wait_for(hub.recv_open(), 2) for _ in range(10)]
            closed = [await asyncio.wait_for(hub.recv_close(), 2) for _ in range(10)]
            assert sorted(c.id for c in closed) == sorted(o.id for o in opened)
            _, writer = await asyncio.open_connection("127.0.0.1", hub.port)
            assert (await asyncio.wait_for(hub.recv_open(), 2)).id.serial == 11
            writer.close()

    with caplog.at_level(logging.WARNING, logger="tether.hub"):
        arun(main())
    assert "max_unseen_opens" in caplog.text


def test_connections_beyond_max_connections_are_reset_logged_and_counted(
        arun: Run, caplog: pytest.LogCaptureFixture) -> None:
    """`max_connections=3`: a fourth connection is reset as it is accepted (the client
    reads a reset, not an EOF), logged, counted in `refused` and `over_limit`, and never
    opened; once one of the three has closed, a new one is opened."""
    async def main() -> None:
        async with Hub(max_connections=3, linger=0) as hub:
            held = [await connect(hub.port) for _ in range(3)]
            opened = [await asyncio.wait_for(hub.recv_open(), 2) for _ in range(3)]
            with pytest.raises(ConnectionResetError):  # (at connect, or after)
                reader, writer = await connect(hub.port)
                try:
                    writer.write(b"over\n")
                    await writer.drain()
                    assert await asyncio.wait_for(reader.read(100), 5) != b"", "an EOF"
                    raise AssertionError("neither reset nor EOF")
                finally:
                    writer.close()
            stats = hub.stats()
            assert (stats.open, stats.opened, stats.refused, stats.over_limit) == \
                (3, 3, 1, 1), stats
            held[0][1].close()
            closed = await asyncio.wait_for(hub.recv_close(), 2)
            assert closed.id == opened[0].id
            await until(lambda: hub.stats().open == 2)
            _, again = await connect(hub.port)
            assert (await asyncio.wait_for(hub.recv_open(), 2)).id.serial == 4
            for _, w in [*held[1:], (None, again)]:
                w.close()

    with caplog.at_level(logging.WARNING, logger="tether.hub"):
        arun(main())
    assert "3 connections open (max_connections 3)" in caplog.text


def test_a_flood_of_refused_connections_is_a_line_and_a_count(
        arun: Run, caplog: pytest.LogCaptureFixture) -> None:
    """Five connections beyond `max_connections=1` within a second: one line names the
    first (peer and why), one more, at the second's end, counts the other four and
    names the last (`FloodLog`), not a line each nor a running total."""
    async def main() -> None:
        async with Hub(max_connections=1, linger=0, name="h") as hub:
            _, held = await connect(hub.port)
            await asyncio.wait_for(hub.recv_open(), 2)
            for _ in range(5):
                with contextlib.suppress(ConnectionError):
                    _, writer = await connect(hub.port)
                    writer.close()
            await until(lambda: hub.stats().refused == 5)
            await asyncio.sleep(1.2)  # (the second ends: its count is said)
            held.close()

    with caplog.at_level(logging.WARNING, logger="tether.hub"):
        arun(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "tether.hub"
             and r.levelno == logging.WARNING]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"hub h: reset a new connection from 127\.0\.0\.1:\d+: 1 "
                        r"connections open \(max_connections 1\)", lines[0]), lines
    assert re.fullmatch(r"hub h: 4 more new connection\(s\) reset within 1s; the last: "
                        r"hub h: reset a new connection from 127\.0\.0\.1:\d+: 1 "
                        r"connections open \(max_connections 1\)", lines[1]), lines


def test_max_connections_is_checked() -> None:
    with pytest.raises(ValueError, match="max_connections must be 1 or more"):
        Hub(max_connections=0)
    assert Hub(max_connections=None)._max_conns is None


@pytest.mark.parametrize("framing", [Lines(), LengthPrefixed(width=4)],
                         ids=["lines", "length-prefixed"])
def test_queued_bytes_give_back_what_they_counted(arun: Run,
                                                  framing: Lines | LengthPrefixed) -> None:
    """`stats().queued_bytes` counts a message's bytes on the wire (its framing's too)
    and gave back only its payload when it was taken: under a queue that never empties,
    the framing's bytes piled up (the bound then paused reading earlier and earlier)."""
    async def main() -> None:
        async with Hub(framing=framing) as hub:
            _, writer = await connect(hub.port)
            try:
                writer.write(b"".join(framing.encode(b"0123456789") for _ in range(100)))
                await hub.recv_open()
                await until(lambda: hub.stats().queued == 100)
                full = hub.stats().queued_bytes
                for _ in range(50):
                    await hub.recv_data()
                assert hub.stats().queued == 50
                assert hub.stats().queued_bytes == full // 2, full
            finally:
                writer.close()

    arun(main())
