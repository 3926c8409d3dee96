"""tether.sync.Hub: the source design's style with threads, over real sockets."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from tether.errors import FlowClosed
from tether.framing import Lines
from tether.hub import Closed, FlowsClosed, HubClosed
from tether.ids import FlowId
from tether.sync import Hub


def client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_lines(sock: socket.socket, n: int) -> list[bytes]:
    buf = b""
    while buf.count(b"\n") < n:
        got = sock.recv(65536)
        if not got:
            break
        buf += got
    return buf.split(b"\n")[:n]


def test_threads_echo_open_data_close() -> None:
    with Hub(framing=Lines()) as hub:
        opens: list[FlowId] = []
        closes: list[Closed] = []
        errors: list[BaseException] = []

        def open_loop() -> None:
            try:
                while True:
                    opens.append(hub.recv_open().id)
            except HubClosed:
                pass

        def data_loop() -> None:
            try:
                while True:
                    event = hub.recv_data()
                    with contextlib.suppress(FlowClosed):
                        hub.send(event.id, event.data)
            except HubClosed:
                pass
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def close_loop() -> None:
            try:
                while True:
                    closes.append(hub.recv_close())
            except HubClosed:
                pass

        threads = [threading.Thread(target=open_loop), threading.Thread(target=close_loop)]
        threads += [threading.Thread(target=data_loop) for _ in range(10)]
        for t in threads:
            t.start()
        socks = [client(hub.port) for _ in range(50)]
        for i, sock in enumerate(socks):
            sock.sendall(b"".join(b"c%d m%d\n" % (i, j) for j in range(20)))
        for i, sock in enumerate(socks):
            got = read_lines(sock, 20)
            # ten data threads: messages of one connection may be answered out of order
            assert sorted(got) == sorted(b"c%d m%d" % (i, j) for j in range(20))
        for sock in socks:
            sock.close()
        deadline = time.monotonic() + 10
        while len(closes) < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(closes) == 50 and {c.reason for c in closes} == {"peer"}
        assert set(opens) == {c.id for c in closes}
        stats = hub.stats()
        assert stats.messages_in == stats.messages_out == 1000 and stats.open == 0
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert not errors


def test_sync_send_many_close_timeouts_and_errors() -> None:
    with Hub() as hub:
        with pytest.raises(TimeoutError):
            hub.recv_open(timeout=0.05)
        socks = [client(hub.port) for _ in range(3)]
        ids = [hub.recv_open(timeout=5).id for _ in range(3)]
        gone = FlowId("hub", 12345)
        with pytest.raises(FlowsClosed) as info:
            hub.send_many([*ids, gone], b"all")
        assert info.value.ids == [gone]
        for sock in socks:
            assert read_lines(sock, 1) == [b"all"]
        hub.send_batch(ids[0], [b"x", b"y"])
        assert read_lines(socks[0], 2) == [b"x", b"y"]
        hub.set_idle_timeout(ids[1], 0.05)
        assert hub.recv_close(timeout=5) == Closed(ids[1], "idle")
        assert hub.close(ids[2]) is True
        assert socks[2].recv(10) == b""
        assert hub.recv_close(timeout=5) == Closed(ids[2], "local")
        assert hub.close(ids[2]) is False and not hub.is_open(ids[2]) and hub.is_open(ids[0])
        with pytest.raises(FlowClosed):
            hub.send(gone, b"x")
        with pytest.raises(FlowClosed):
            hub.set_idle_timeout(gone, 1.0)
        with pytest.raises(TypeError):
            hub.send("nope", b"x")  # type: ignore[arg-type]
        for sock in socks:
            sock.close()
    # after shutdown: the queued Closed is still there, then HubClosed
    assert hub.recv_close(timeout=1).id == ids[0]
    with pytest.raises(HubClosed):
        hub.recv_data(timeout=1)
    with pytest.raises(HubClosed):
        hub.stats()


def test_sync_backpressure_bounds_the_thread_queue() -> None:
    with Hub(thread_queue=32 * 1024, queue_high=32 * 1024) as hub:
        sock = client(hub.port)
        hub.recv_open(timeout=5)
        line = b"p" * 99 + b"\n"
        total = 5000

        def push() -> None:
            sock.sendall(line * total)

        pusher = threading.Thread(target=push)
        pusher.start()
        time.sleep(0.3)  # nobody reads: the hub must stop reading the socket
        stats = hub.stats()
        assert stats.queued_bytes <= 32 * 1024 * 2 + 2 * 256 * 1024
        got = sum(1 for _ in range(total) if hub.recv_data(timeout=5).data == line[:-1])
        assert got == total
        pusher.join(5)
        sock.close()


def test_start_failure_is_raised() -> None:
    with Hub() as first, pytest.raises(OSError):
        Hub(port=first.port).start()


def test_a_second_concurrent_shutdown_waits_for_the_first() -> None:
    """shutdown() called from two threads: the second must not return before the hub
    has finished shutting down (its thread gone, every Closed queued, then HubClosed).
    One peer reads nothing while the hub has megabytes for it, so the first shutdown
    drains for its whole timeout (1.5 s)."""
    hub = Hub(max_write_buffer=64 * 1024 * 1024).start()
    sock = client(hub.port)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        fid = hub.recv_open(timeout=5).id
        hub.send(fid, b"x" * (16 * 1024 * 1024))  # far more than the socket buffers hold
        first = threading.Thread(target=hub.shutdown, args=(1.5,))
        started = time.monotonic()
        first.start()
        time.sleep(0.2)  # the first shutdown is draining
        hub.shutdown(1.5)
        waited = time.monotonic() - started
        # the shutdown is over: the Closed is queued and then the hub reports its end
        assert hub.recv_close(timeout=0) == Closed(fid, "shutdown"), waited
        with pytest.raises(HubClosed):
            hub.recv_open(timeout=0)
        assert waited >= 1.4, waited
        first.join(5)
        assert not first.is_alive()
    finally:
        sock.close()
        hub.shutdown()
