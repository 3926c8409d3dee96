"""The data path: writes coalesced per read, the heap thresholds, a flow pumped from callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import socket
import subprocess
import sys
import threading

import pytest

import tether
from linkspy import Handle, spy_on_links
from test_gateway import address, eventually, gateway, read_exactly, read_to_eof, registered
from tether import wire
from tether.aio import LinkConnection
from tether.coalesce import WriteCoalescer, current
from tether.errors import ErrorCode, FlowError
from tether.events import Event, FinReceived, FlowEnded
from tether.flowstate import FlowState


class Holder:
    def __init__(self, co: WriteCoalescer, log: list[str], name: str,
                 then: Holder | None = None, fail: bool = False) -> None:
        self.co, self.log, self.name, self.then, self.fail = co, log, name, then, fail

    def write_deferred(self) -> None:
        self.log.append(self.name)
        if self.fail:
            self.fail = False
            raise RuntimeError("write failed")
        if self.then is not None:  # a write that gives credit back: more to write
            self.co.defer(self.then)


def test_held_writes_happen_once_when_the_outermost_read_ends() -> None:
    co = WriteCoalescer()
    log: list[str] = []
    a, b = Holder(co, log, "a"), Holder(co, log, "b")
    co.begin()
    co.defer(a)
    co.begin()  # a nested read (a protocol callback run synchronously)
    co.defer(b)
    co.end()
    assert log == []  # not yet: the outer read is still being handled
    co.end()
    assert log == ["a", "b"]
    assert co.depth == 0 and not co.queued


def test_writes_that_cause_writes_are_drained_in_the_same_end() -> None:
    co = WriteCoalescer()
    log: list[str] = []
    last = Holder(co, log, "window")
    co.begin()
    co.defer(Holder(co, log, "data", then=last))
    co.end()
    assert log == ["data", "window"]


def test_a_failing_write_keeps_the_others_held_for_the_next_end() -> None:
    co = WriteCoalescer()
    log: list[str] = []
    co.begin()
    co.defer(Holder(co, log, "a", fail=True))
    co.defer(Holder(co, log, "b"))
    with pytest.raises(RuntimeError):
        co.end()
    assert co.depth == 0 and log == ["a"]
    co.begin()
    co.end()
    assert log == ["a", "b"]


def test_one_coalescer_per_thread() -> None:
    """The same one for every call in a thread, and another one in another thread (the
    sync facade's loop thread and the application's threads never share one)."""
    mine = current()
    assert current() is mine
    theirs: list[WriteCoalescer] = []
    thread = threading.Thread(target=lambda: theirs.extend((current(), current())))
    thread.start()
    thread.join(5)
    assert len(theirs) == 2 and theirs[0] is theirs[1], theirs
    assert theirs[0] is not mine


async def test_a_gateway_read_of_many_frames_reaches_the_far_end_intact() -> None:
    """Many small frames arriving at the gateway in few reads, their writes held and
    coalesced until each read is handled: the far end still gets every byte, in order.
    (What this checks is that holding writes loses and reorders nothing; how many
    writes it saves is measured by bench/relay.py, not asserted.)"""
    async with gateway() as gw, \
            tether.Node("server", gateway=address(gw)) as server, \
            tether.Node("client", gateway=address(gw)) as client:
        server.register("svc")
        await registered(gw, "svc")
        flow, peer = await asyncio.gather(client.alloc("svc"), server.accept())
        expected = b"".join(b"%06d," % i for i in range(20_000))
        for i in range(0, len(expected), 7):  # 7-byte DATA frames, back to back
            await flow.write(expected[i:i + 7])
        await flow.close_write()
        got = bytearray()
        while chunk := await asyncio.wait_for(peer.read(), 10):
            got += chunk
        assert bytes(got) == expected


_HEAP_PAGES = r"""
import ctypes
from tether.heap import keep_heap_pages

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = keep_heap_pages()
before = libc.mallinfo2()
block = libc.malloc(2 << 20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
# applied; no mmap of its own; the heap not trimmed at the free; the freed block's bytes
# still in the heap, free (the heap may have grown by less than the block: its top
# could have been free already)
print(applied, during.hblks - before.hblks, during.arena - after.arena,
      after.fordblks >= 2 << 20)
"""


def test_keep_heap_pages_applies_on_glibc() -> None:
    """In a process of its own (the thresholds are the whole process's): a 2 MiB block
    then comes from the heap, not from an mmap of its own, and its pages stay in the
    heap once it is freed (glibc's defaults: an mmap, unmapped at the free)."""
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(n) for n in version.split(".")[:2]) < (2, 33):
        pytest.skip("not glibc 2.33 or later: the thresholds (and mallinfo2) are glibc's")
    out = subprocess.run([sys.executable, "-c", _HEAP_PAGES], capture_output=True,
                         text=True, timeout=30, check=True).stdout.split()
    assert out == ["True", "0", "0", "True"], out  # applied, no mmap, the heap kept it


class CreditSink:
    """An application pumping a flow from callbacks (as the relay's bridges do): it
    writes whenever credit comes."""

    def __init__(self, flow: tether.Flow) -> None:
        self.flow = flow
        self.errors: list[Exception] = []
        self.ended: list[str] = []

    def flow_data(self, data: bytes | memoryview) -> None:
        self.flow.consumed(len(data))

    def flow_fin(self) -> None:
        pass

    def flow_credit(self) -> None:
        try:
            self.flow.try_write(b"more")
        except FlowError as exc:  # the documented way a write fails
            self.errors.append(exc)

    def flow_ended(self, state: object, error: Exception) -> None:
        self.ended.append(str(error))


async def test_credit_and_reset_in_one_read_end_the_flow_not_the_link() -> None:
    """A WINDOW and a RESET of one stream in the same read: the sink, handed the credit
    first, writes into a stream the link has already ended. That write must fail as a
    `FlowError` of that flow, not as an exception that takes the whole link down."""
    got_open: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def fake_gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = wire.FrameDecoder()
        writer.write(wire.encode(wire.Hello(name="fake", max_payload=65536, heartbeat_ms=5000)))
        while not got_open.done():
            for frame in decoder.feed(await reader.read(65536)):
                if isinstance(frame, wire.Open):
                    got_open.set_result(frame.stream)
        sid = got_open.result()
        writer.write(wire.encode(wire.OpenOk(stream=sid, window=0)))
        await asyncio.sleep(0.05)
        writer.write(wire.encode(wire.Window(stream=sid, increment=100))
                     + wire.encode(wire.Reset(stream=sid, code=ErrorCode.RESET, reason="bye")))
        await reader.read()  # until the node closes
        writer.close()

    server = await asyncio.start_server(fake_gateway, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, tether.Node("client", gateway=f"127.0.0.1:{port}") as node:
        flow = await node.alloc("svc")
        sink = CreditSink(flow)
        flow.attach(sink)
        for _ in range(100):
            if sink.ended:
                break
            await asyncio.sleep(0.01)
        assert sink.ended and "bye" in sink.ended[0], sink.ended
        assert all(isinstance(e, FlowError) for e in sink.errors), sink.errors
        assert node._conn is not None and node._conn.link.is_open, \
            "the link must survive one flow's reset"


async def test_a_queue_that_drains_during_a_send_does_not_strand_the_sender() -> None:
    """A link queue far smaller than what a bridged socket pours in: every send is cut
    to what fits, and the flush inside that very send drains the queue and hands the
    room back -- a wake-up that arrives before the bridge has parked its bytes. The
    bridge must notice it then (not wait for one that already came): every byte
    arrives, once, in order."""
    from tether.bridge import SocketBridge

    payload = bytes(range(256)) * (16 << 10)  # 4 MiB
    loop = asyncio.get_running_loop()
    served: asyncio.Future[None] = loop.create_future()

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
            await reader.read()  # until the bridge closes its socket
            writer.close()
            await writer.wait_closed()
        finally:
            served.set_result(None)

    src = await asyncio.start_server(source, "127.0.0.1", 0)
    async with src, gateway() as gw, \
            tether.Node("server", gateway=address(gw)) as server, \
            tether.Node("client", gateway=address(gw)) as client:
        server.register("svc")
        await registered(gw, "svc")
        flow, peer = await asyncio.gather(client.alloc("svc"), server.accept())
        assert client._conn is not None
        client._conn.link.queue_limit = 8192
        bridge = SocketBridge(flow, label="source")
        transport, _ = await loop.create_connection(
            lambda: bridge, "127.0.0.1", src.sockets[0].getsockname()[1])
        try:
            got = bytearray()
            while chunk := await asyncio.wait_for(peer.read(), 10):
                got += chunk
            assert len(got) == len(payload) and bytes(got) == payload
        finally:
            transport.close()
            await asyncio.wait_for(served, 5)
            await peer.dealloc()


async def test_a_write_that_finds_the_queue_full_sees_the_room_its_own_flush_made() -> None:
    """`Flow.write` into a link queue that another flow filled: its first send takes
    nothing, and the flush inside that same call drains the queue and hands the room out
    (a WindowUpdated) while the writer is not waiting yet. The write must notice it (the
    re-check before it parks) rather than wait for a wake-up that already came: it
    completes at once, and both flows' bytes arrive."""
    async with gateway() as gw, \
            tether.Node("server", gateway=address(gw)) as server, \
            tether.Node("client", gateway=address(gw)) as client:
        a, a_peer = await served_pair(gw, server, client)
        b, b_peer = await served_pair(gw, server, client)
        conn = client._conn
        assert conn is not None
        conn.link.queue_limit = 4096
        filler = bytes(range(256)) * 16  # 4 KiB: b fills the queue, and nothing flushes it
        assert conn.link.send_data(b.stream, filler, conn.now) == len(filler)
        assert a.send_credit() == 0  # a is starved until the queue drains
        await asyncio.wait_for(a.write(b"y" * 1000), 2)
        assert await read_exactly(a_peer, 1000) == b"y" * 1000
        assert await read_exactly(b_peer, len(filler)) == filler
        for flow in (a, b):
            await flow.dealloc()


# --- a stream's end is passed on before the link's bookkeeping ---------------------------


async def served_pair(gw: tether.Gateway, server: tether.Node, client: tether.Node,
                       mode: str = "half-close") -> tuple[tether.Flow, tether.Flow]:
    server.register("svc")
    await registered(gw, "svc")
    flow, peer = await asyncio.gather(client.alloc("svc", mode=mode), server.accept())
    return flow, peer


@pytest.mark.parametrize("end", ["fin", "cascade-fin", "dealloc"])
async def test_a_gateway_passes_a_streams_end_on_before_handling_it(end: str) -> None:
    """A read that is one FIN (or CLOSE): the gateway has already written the other
    side's end when its own link hands it the event -- the end left first, ahead of the
    bookkeeping (`Link.peek_stream_end`), with nothing queued -- and the other side's
    link knows it once the event is handled. The far end still reads every byte first,
    then EOF, and the flow ends once at each node."""
    async with gateway() as gw, \
            tether.Node("server", gateway=address(gw)) as server, \
            tether.Node("client", gateway=address(gw)) as client:
        mode = "cascade" if end == "cascade-fin" else "half-close"
        flow, peer = await served_pair(gw, server, client, mode)
        seen: list[tuple[bool, bool, FlowState | None]] = []

        def spy(conn: LinkConnection, event: Event, handle: Handle) -> None:
            if isinstance(event, (FinReceived, FlowEnded)) and (conn, event.stream) in gw._ends:
                splice, side = gw._ends[(conn, event.stream)]
                if side is splice.b:  # the server's end arrived: where is the client's?
                    other = splice.a
                    written, queued = other.end_written, other.conn.link.has_output
                    handle(conn, event)
                    seen.append((written, queued, other.conn.link.flow_state(other.stream)))
                    return
            handle(conn, event)

        spy_on_links(gw._conns, spy)
        await peer.write(b"reply")
        assert await read_exactly(flow, 5) == b"reply"  # so the end comes alone in a read
        if end == "dealloc":
            await peer.dealloc()
        else:
            await peer.close_write()
        assert await asyncio.wait_for(read_to_eof(flow), 5) == b""
        # the client side's end was written before the event, nothing queued; then known
        assert seen and seen[0] == (True, False, {"fin": FlowState.LOCAL_FIN}.get(end)), seen
        if end == "fin":
            await flow.close_write()
            assert await asyncio.wait_for(read_to_eof(peer), 5) == b""
        await eventually("the splice ended", lambda: not gw._ends)


async def test_a_bridged_socket_reads_eof_before_the_node_handles_the_fin() -> None:
    """At a node, a lone FIN for a flow bridged to a socket: the socket's FIN has been
    sent when the node's link hands over the event (the application can already read
    EOF), and the data before it was delivered first."""
    from tether.bridge import SocketBridge

    loop = asyncio.get_running_loop()
    async with gateway() as gw, \
            tether.Node("server", gateway=address(gw)) as server, \
            tether.Node("client", gateway=address(gw)) as client:
        flow, peer = await served_pair(gw, server, client)
        listener = socket.create_server(("127.0.0.1", 0))
        app = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
        listener.close()
        ours.setblocking(False)
        app.setblocking(False)
        transport, _ = await loop.create_connection(lambda: SocketBridge(flow), sock=ours)
        seen: list[bytes | None] = []

        def spy(conn: LinkConnection, event: Event, handle: Handle) -> None:
            if isinstance(event, FinReceived):
                try:
                    seen.append(app.recv(100))
                except BlockingIOError:
                    seen.append(None)  # no FIN yet
            handle(conn, event)

        assert client._conn is not None
        spy_on_links([client._conn], spy)
        try:
            await peer.write(b"hello")
            got = b""
            for _ in range(500):
                with contextlib.suppress(BlockingIOError):
                    got += app.recv(100)
                if got == b"hello":
                    break
                await asyncio.sleep(0.01)
            assert got == b"hello"
            await peer.close_write()
            await eventually("the FIN reached the node", lambda: bool(seen))
            assert seen == [b""], seen
        finally:
            transport.close()
            app.close()


# --- reads and writes sized to the link --------------------------------------------------


class _KindSink:
    """A flow's sink noting, of every piece, whether it is a view of a read buffer (a
    read handed on with no copy) rather than a copy (bytes, or a view of bytes)."""

    def __init__(self, flow: tether.Flow) -> None:
        self.flow = flow
        self.got = 0
        self.views_of_reads = 0
        self.fin: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def flow_data(self, data: bytes | memoryview) -> None:
        self.got += len(data)
        if isinstance(data, memoryview) and data.readonly and isinstance(data.obj, bytearray):
            self.views_of_reads += 1
        self.flow.consumed(len(data))

    def flow_fin(self) -> None:
        if not self.fin.done():
            self.fin.set_result(None)

    def flow_credit(self) -> None:
        pass

    def flow_ended(self, state: object, error: Exception) -> None:
        if not self.fin.done():
            self.fin.set_result(None)


async def test_a_links_large_reads_reach_the_flow_without_a_copy() -> None:
    """Bytes waiting in a link's socket are read in large reads into the thread's read
    buffer (through the link's `BufferedProtocol` face, see `tether.readbuf`), and the
    flow gets views of those reads -- not copies made by the loop, as a plain
    Protocol's `data_received(bytes)` gives. Small reads come from the loop, before the
    bulk and again after a few small ones."""
    window = 4 << 20
    async with tether.Gateway("127.0.0.1:0", name="gw", window=window) as gw, \
            tether.Node("server", gateway=address(gw), window=window) as server, \
            tether.Node("client", gateway=address(gw), window=window) as client:
        flow, peer = await served_pair(gw, server, client)
        conn = client._conn
        assert conn is not None and conn.transport is not None
        assert conn.transport.get_protocol() is conn  # small reads so far
        sink = _KindSink(flow)
        flow.attach(sink)
        conn.transport.pause_reading()  # let the bytes pile up in the socket
        await peer.write(b"v" * (2 << 20))
        await peer.close_write()
        await asyncio.sleep(0.3)
        conn.transport.resume_reading()
        await asyncio.wait_for(sink.fin, 10)
        assert sink.got == 2 << 20
        assert sink.views_of_reads > 0  # (read through the `LargeReads` face)
        flow, peer = await served_pair(gw, server, client)
        for i in range(10):  # small round trips: back to the loop's reads
            await peer.write(b"%d" % i)
            assert await asyncio.wait_for(flow.read(), 5) == b"%d" % i
        assert conn.transport.get_protocol() is conn


async def test_a_links_write_chunk_stays_small_while_writes_are_small() -> None:
    """Hundreds of small round trips on an idle link: every write is taken whole by the
    kernel, but none fills the write chunk, so the chunk does not grow -- a first bulk
    write then cannot leave a megabyte in the transport ahead of urgent frames."""
    from tether.aio import _CHUNK_MIN

    async with gateway() as gw, \
            tether.Node("server", gateway=address(gw)) as server, \
            tether.Node("client", gateway=address(gw)) as client:
        flow, peer = await served_pair(gw, server, client)
        for i in range(300):
            await flow.write(b"%d" % i)
            assert await peer.read() == b"%d" % i
        conns = [client._conn, server._conn, *gw._conns]
        assert all(c is not None and c._chunk == _CHUNK_MIN for c in conns), \
            [c._chunk for c in conns if c is not None]


def test_a_drain_too_short_or_too_small_to_measure_does_not_shrink_the_writes() -> None:
    """A link's write size, TCP_NOTSENT_LOWAT and queue limit follow the rate at which
    its paused transport drained. A few bytes left behind, or a drain within the loop's
    millisecond clock and a busy machine's scheduling, measure nothing: they count only
    when they say the link is fast. (40 bytes seen drained 1 ms later had cut a 700 MB/s
    link's writes to 16 KiB.) A slow link's drain still counts."""
    from tether.aio import _CHUNK_MAX, _CHUNK_MIN, _DRAIN_TARGET, _drain_rate

    assert _drain_rate(0, 0.5) is None
    assert _drain_rate(40, 0.001) is None  # a WINDOW frame, 1 ms
    assert _drain_rate(40, 0.0) is None  # ... within the clock's tick: not "fast" either
    assert _drain_rate(40, 0.05) is None  # ... or a process off the CPU
    assert _drain_rate(20_000, 0.002) is None  # "10 MB/s", within 2 ms
    # a slow link: 64 KiB took half a second (the 1 Mbit/s fault tests' rate)
    assert _drain_rate(65536, 0.5) == 65536 / 0.5
    assert _drain_rate(_CHUNK_MIN, 0.01) == _CHUNK_MIN / 0.01
    # what says the link is fast is taken however short: 1 MiB within the clock's tick
    assert _drain_rate(1 << 20, 0.0) == (1 << 20) / 1e-4
    fast = _drain_rate(65536, 0.001)
    assert fast is not None and fast * _DRAIN_TARGET >= _CHUNK_MAX
