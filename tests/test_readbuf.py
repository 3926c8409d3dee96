"""ReadBuffer: large reads passed on as views, never changed under a holder, bounded."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tether.readbuf import ReadBuffer


def _read(rb: ReadBuffer, payload: bytes) -> bytes | memoryview:
    """What a transport does: fill the buffer `get` gave, then `take`."""
    buf = rb.get()
    assert len(buf) == rb.size
    buf[:len(payload)] = payload
    return rb.take(len(payload))


def test_a_small_read_is_copied_and_the_scratch_reused() -> None:
    rb = ReadBuffer(size=1024, copy_below=256)
    first = rb.get().obj  # (the bytearray: a view kept here would pin it)
    data = _read(rb, b"x" * 100)
    assert type(data) is bytes and data == b"x" * 100
    assert rb.get().obj is first
    assert rb.pinned == 0


def test_a_large_read_is_a_read_only_view_and_pins_its_scratch() -> None:
    rb = ReadBuffer(size=1024, copy_below=256)
    view = _read(rb, b"a" * 512)
    assert isinstance(view, memoryview) and view.readonly and view == b"a" * 512
    _read(rb, b"b" * 512)  # goes elsewhere: the first scratch is held by `view`
    assert rb.pinned == 1
    assert view == b"a" * 512
    view.release()
    rb.get()  # the first scratch is free again: used again, nothing pinned
    assert rb.pinned == 0


def test_at_the_cap_a_read_is_lent_and_its_scratch_reused() -> None:
    """At the cap a large read is a writable view, for the callback only: the next read
    goes into the same scratch (nothing is allocated, nothing more is pinned)."""
    rb = ReadBuffer(size=1024, copy_below=256, max_pinned=2)
    held = [_read(rb, bytes([i]) * 600) for i in range(2)]
    assert all(isinstance(v, memoryview) and v.readonly for v in held)
    third = _read(rb, b"z" * 600)
    assert rb.pinned == 2
    assert isinstance(third, memoryview) and not third.readonly and third == b"z" * 600
    scratch = third.obj
    third.release()  # its reader copied what it keeps and let go
    fourth = _read(rb, b"w" * 600)
    assert isinstance(fourth, memoryview) and fourth.obj is scratch and fourth == b"w" * 600
    assert rb.pinned == 2
    assert [bytes(v) for v in held] == [b"\0" * 600, b"\1" * 600]


def test_a_lent_read_kept_all_the_same_is_never_written_again() -> None:
    """A reader that keeps a lent view (against the contract) pins its scratch like any
    holder: the next reads go elsewhere and the view keeps its bytes."""
    rb = ReadBuffer(size=1024, copy_below=256, max_pinned=1)
    first = _read(rb, b"a" * 600)
    lent = _read(rb, b"b" * 600)
    assert isinstance(lent, memoryview) and not lent.readonly
    for i in range(5):
        _read(rb, bytes([i]) * 600)
    assert bytes(first) == b"a" * 600 and bytes(lent) == b"b" * 600


def test_a_free_scratch_beyond_the_one_in_use_is_let_go() -> None:
    rb = ReadBuffer(size=1024, copy_below=256)
    held = [_read(rb, b"q" * 600) for _ in range(4)]
    rb.get()
    assert rb.pinned == 4  # the read to come goes into a fifth
    for v in held:
        assert isinstance(v, memoryview)
        v.release()
    rb.get()
    assert rb.pinned == 0


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="copy_below"):
        ReadBuffer(size=100, copy_below=200)
    with pytest.raises(ValueError, match="max_pinned"):
        ReadBuffer(max_pinned=-1)
    with pytest.raises(RuntimeError, match="without get"):
        ReadBuffer().take(1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1024), st.booleans(), st.integers(0, 3)),
                min_size=1, max_size=60))
@example([(600, True, 0)] * 5)  # more large reads held than may pin: the cap must hold
def test_a_held_view_never_changes_and_pinning_is_capped(
        steps: list[tuple[int, bool, int]]) -> None:
    """Reads of random sizes; some results are held, some of those let go later (one
    step in four, so that held views pile up past the cap), a lent (writable) one
    copied to be held, as its contract says: every held result keeps its bytes, and at
    most `max_pinned` scratches are ever pinned."""
    rb = ReadBuffer(size=1024, copy_below=256, max_pinned=3)
    held: list[tuple[bytes | memoryview, bytes]] = []
    for i, (n, keep, let_go) in enumerate(steps):
        payload = os.urandom(n)
        data = _read(rb, payload)
        assert data == payload
        if isinstance(data, memoryview) and not data.readonly:
            assert rb.pinned == rb.max_pinned  # lent only at the cap
            kept: bytes | memoryview = data.tobytes()
            data.release()
            data = kept
        if keep:
            held.append((data, payload))
        if let_go == 3 and held:
            view, _ = held.pop(n % len(held))
            if isinstance(view, memoryview):
                view.release()
        assert rb.pinned <= rb.max_pinned
        for got, want in held:
            assert got == want, f"step {i}: a held read changed"


def _connected_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a TCP connection on loopback (client, server)."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


async def test_a_buffered_protocol_on_real_sockets_reads_large_chunks() -> None:
    """Through a real transport (both loops): 8 MiB sent at once arrive whole, the large
    reads as read-only views, each still intact after the reads that followed it."""
    from tether import readbuf

    rb = readbuf.ReadBuffer()
    received: list[bytes | memoryview] = []
    done = asyncio.get_running_loop().create_future()

    class Reader(asyncio.BufferedProtocol):
        def get_buffer(self, sizehint: int) -> memoryview:
            return rb.get()

        def buffer_updated(self, nbytes: int) -> None:
            received.append(rb.take(nbytes))

        def eof_received(self) -> bool:
            done.set_result(None)
            return False

    a, b = _connected_pair()
    payload = os.urandom(8 << 20)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(Reader, b)
    try:
        transport.pause_reading()
        sending = loop.run_in_executor(None, a.sendall, payload)
        await asyncio.sleep(0.2)  # the kernel's buffers fill up: reads will be large
        transport.resume_reading()
        await asyncio.wait_for(sending, 10)
        a.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(done, 10)
        assert b"".join(bytes(r) for r in received) == payload
        assert any(isinstance(r, memoryview) and r.readonly for r in received)
    finally:
        transport.close()
        a.close()
        await asyncio.sleep(0)


async def test_a_protocol_reads_small_through_the_loop_and_large_through_the_buffer() -> None:
    """`read_large` on real sockets (both loops): small reads come as the loop's
    `bytes`; after a large one the transport reads into the buffer, every callback
    (here: the EOF) still reaching the protocol; a few small reads in a row give the
    reads back to the loop. Nothing is lost or reordered."""
    from tether import readbuf

    loop = asyncio.get_running_loop()
    received: list[tuple[bytes | memoryview, bool]] = []  # (read, through the loop)
    done = loop.create_future()

    class Reader(asyncio.Protocol):
        transport: asyncio.Transport

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes | memoryview) -> None:
            received.append((data, self.transport.get_protocol() is self))
            if len(data) >= readbuf.LARGE_READ:
                readbuf.read_large(self, self.transport)

        def eof_received(self) -> bool:
            done.set_result(self.transport.get_protocol() is self)
            return False

    a, b = _connected_pair()
    bulk = os.urandom(8 << 20)
    transport, _ = await loop.connect_accepted_socket(Reader, b)
    sent = bytearray()

    async def send(data: bytes) -> None:
        sent.extend(data)
        await loop.run_in_executor(None, a.sendall, data)

    async def all_read() -> None:  # (so that each small send is a read of its own)
        for _ in range(1000):
            if sum(len(r) for r, _ in received) == len(sent):
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"{len(sent)} bytes sent, not all read")

    try:
        await send(b"hello")
        await all_read()
        transport.pause_reading()
        sending = asyncio.ensure_future(send(bulk))
        await asyncio.sleep(0.2)  # the kernel's buffers fill up: reads will be large
        transport.resume_reading()
        await asyncio.wait_for(sending, 10)
        await all_read()
        for i in range(readbuf.SMALL_READS + 2):  # back to the loop after SMALL_READS
            await send(b"small %d" % i)
            await all_read()
        after_small = len(received)
        transport.pause_reading()  # large again (waiting in the kernel), then the EOF
        sending = asyncio.ensure_future(send(b"x" * (1 << 20)))
        await asyncio.sleep(0.1)
        transport.resume_reading()
        await asyncio.wait_for(sending, 10)
        await all_read()
        a.shutdown(socket.SHUT_WR)
        eof_through_loop = await asyncio.wait_for(done, 10)
        assert b"".join(bytes(r) for r, _ in received) == bytes(sent)
        # Replay the rule over what was read: through the loop until a large read, then
        # through the buffer until SMALL_READS small reads in a row (the face gives the
        # reads back before handing on the last of them).
        mode, run = "loop", 0
        modes: list[str] = []
        for data, through_loop in received:
            if mode == "loop":
                assert through_loop, modes
                if len(data) >= readbuf.LARGE_READ:
                    mode, run = "large", 0
            else:
                run = run + 1 if len(data) < readbuf.SMALL_READ else 0
                if run >= readbuf.SMALL_READS:
                    mode = "loop"
                assert through_loop == (mode == "loop"), modes
            modes.append(mode)
        assert "large" in modes[:after_small] and modes[after_small - 1] == "loop", modes
        assert "large" in modes[after_small:], modes
        assert eof_through_loop == (mode == "loop")
    finally:
        transport.close()
        a.close()
        await asyncio.sleep(0)


def test_scratches_let_go_are_used_again_not_allocated_anew() -> None:
    """A scratch whose views are all gone is kept for the next time the scratch in use
    is pinned: a new one is `size` bytes zeroed by `memset` (in a bulk transfer, 5 % of
    a gateway's CPU when they were dropped: perf)."""
    rb = ReadBuffer(size=1024, copy_below=16, max_pinned=4)
    held: list[memoryview] = []

    def read() -> None:  # a large read: a view of the scratch, held
        rb.get()
        view = rb.take(512)
        assert isinstance(view, memoryview)
        held.append(view)

    for _ in range(3):  # three reads whose views stay held: three scratches
        read()
    scratches = [view.obj for view in held]  # (kept: no new one can reuse their ids)
    assert len({id(obj) for obj in scratches}) == 3
    for view in held:
        view.release()
    held.clear()
    for _ in range(3):  # three reads held again: the same three scratches, no new one
        read()
        assert any(held[-1].obj is obj for obj in scratches)
    assert {id(view.obj) for view in held} == {id(obj) for obj in scratches}
