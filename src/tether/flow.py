"""Flow: the application's end of one flow (Ouroboros' flow_read / flow_write).

A `Flow` is a reliable, ordered, bidirectional byte stream to a peer application.
Its contract, in full:

* `read()` returns bytes as they arrive; after the peer's FIN (`close_write`) or
  dealloc it returns everything already received, then `b""` for ever.
* When the flow goes DOWN (the peer was silent for the whole liveness timeout, or
  the link was lost), a pending or later `read()` first returns what was already
  received, then raises `FlowDown` (`PeerDown` for an unresponsive peer) with
  `.reason` and `.code`. It never hangs on a dead peer: that is the point.
* `write()` waits for credit (the peer's receive window): a slow reader slows its
  writer and nobody else. After the peer deallocated, `write()` raises
  `FlowClosed`; on a DOWN or RESET flow it raises `FlowDown` / `FlowReset`.
* `close_write()` half-closes: the peer reads EOF and may still write back.
* `dealloc()` ends the flow from this side. `reset(reason)` aborts it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from .errors import (
    ErrorCode,
    FlowClosed,
    FlowDown,
    FlowError,
    FlowReset,
    LocalProtocolError,
    PeerDown,
)
from .events import FlowEnded
from .flowstate import SENDING_STATES, FlowState
from .ids import FlowId

if TYPE_CHECKING:
    from .aio import LinkConnection

__all__ = ["Flow", "FlowSink"]

log = logging.getLogger("tether.flow")


class Flow:
    """One flow, as seen by the application. Made by `Node.alloc` and `Node.accept`."""

    __slots__ = ("_buffer", "_buffered", "_conn", "_end", "_ended", "_eof", "_fin_told",
                 "_reader", "_sink", "_state", "_wlock", "_writer", "id", "peer", "service",
                 "stream")

    def __init__(self, fid: FlowId, conn: LinkConnection, stream: int, service: str,
                 peer: str) -> None:
        self.id = fid
        self.service = service
        self.peer = peer
        self.stream = stream
        self._conn = conn
        self._state = FlowState.OPENING
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._end: FlowError | None = None
        self._reader: asyncio.Future[None] | None = None
        self._writer: asyncio.Future[None] | None = None
        self._wlock: asyncio.Lock | None = None  # writes one at a time (made on first use)
        self._sink: FlowSink | None = None
        self._fin_told = False  # the sink heard `flow_fin`
        self._ended: asyncio.Future[None] | None = None  # made by `when_ended`

    def __repr__(self) -> str:
        return f"<Flow {self.id} service={self.service} {self._state.name}>"

    @property
    def state(self) -> FlowState:
        """The flow's state (OPENING, OPEN, LOCAL_FIN, REMOTE_FIN, CLOSED, DOWN, RESET)."""
        return self._state

    @property
    def link_stream(self) -> str:
        """Where this flow runs: the node at the other end of its link (its gateway) and
        the stream's number on that link, as `gw1#7`. The gateway names the same stream
        `<this node>#7` in its log, which ties the two sides' lines together."""
        return self._conn.stream_name(self.stream)

    @property
    def liveness(self) -> float | None:
        """This side's liveness timeout in seconds (None: no liveness)."""
        return self._conn.link.liveness_of(self.stream)

    def set_liveness(self, seconds: float | None) -> None:
        """Change this side's liveness timeout (10 ms to years; None for none). The
        peer's silence so far counts against the new timeout: setting it again and again
        never keeps a dead peer's flow alive."""
        if self._state in (FlowState.CLOSED, FlowState.DOWN, FlowState.RESET):
            raise self._closed_error()
        self._conn.link.set_liveness(self.stream, seconds, self._conn.now)
        self._conn.flush()

    # reading --------------------------------------------------------------------------

    async def read(self, max: int = -1) -> bytes:
        """Up to `max` bytes (all that is buffered if -1); `b""` at EOF. Raises
        `FlowDown`/`FlowReset` once buffered data is exhausted on a DOWN/RESET flow.
        One read at a time: a second, concurrent one raises `LocalProtocolError`. A
        cancelled read loses nothing (what arrived stays for the next)."""
        if max == 0:
            return b""
        while not self._buffer:
            if self._end is not None and not isinstance(self._end, FlowClosed):
                raise self._end
            if self._eof or self._end is not None:
                return b""
            if self._reader is not None:
                raise LocalProtocolError(f"flow {self.id}: another read is already pending")
            self._reader = self._conn.loop.create_future()
            try:
                await self._reader
            finally:
                self._reader = None
        if max < 0 or max >= self._buffered:
            data = self._buffer[0] if len(self._buffer) == 1 else b"".join(self._buffer)
            self._buffer.clear()
        else:
            data = self._take(max)
        self._buffered -= len(data)
        self._conn.link.consumed(self.stream, len(data), self._conn.now)
        self._conn.flush()
        return data

    def _take(self, n: int) -> bytes:
        parts = []
        while n > 0:
            head = self._buffer[0]
            if len(head) <= n:
                parts.append(self._buffer.popleft())
                n -= len(head)
            else:
                parts.append(head[:n])
                self._buffer[0] = head[n:]
                n = 0
        return b"".join(parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk

    # writing --------------------------------------------------------------------------

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send all of `data`, waiting for the peer's credit as needed. Concurrent
        writes go one after the other, each one's bytes together."""
        lock = self._wlock
        if lock is None:
            lock = self._wlock = asyncio.Lock()
        async with lock:
            await self._write(data)

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        conn = self._conn
        while True:
            self._check_writable()
            sent = conn.link.send_data(self.stream, mv, conn.now) if len(mv) else 0
            conn.flush()
            mv = mv[sent:]
            if not mv:
                break
            if sent == 0 and not self.send_credit():  # (what came back during the flush
                self._writer = conn.loop.create_future()  # woke nobody: look again)
                try:
                    await self._writer
                finally:
                    self._writer = None
        await conn.drain()

    def _check_writable(self) -> None:
        if self._state in SENDING_STATES:
            if self._conn.link.flow_state(self.stream) is None:
                # The link ended the stream in the batch of events being handed out
                # right now; this flow hears of it (`_on_end`, the reason) further on.
                raise FlowClosed(f"flow {self.id} has ended")
            return
        if self._state is FlowState.LOCAL_FIN:
            raise FlowClosed(f"flow {self.id}: write after close_write()")
        if self._state is FlowState.OPENING:
            raise LocalProtocolError(f"flow {self.id} is not open yet")
        raise self._closed_error()

    def _closed_error(self) -> FlowError:
        if self._end is None or isinstance(self._end, FlowClosed):
            return FlowClosed(f"flow {self.id} is closed"
                              + (f" ({self._end})" if self._end else ""))
        return self._end

    async def close_write(self) -> None:
        """Half-close: the peer reads EOF; this side can still read its reply."""
        if self._state in SENDING_STATES:
            self._conn.link.send_fin(self.stream, self._conn.now)
            self._set_state()
            self._conn.flush()
        elif self._state is not FlowState.LOCAL_FIN:
            raise self._closed_error()

    async def dealloc(self) -> None:
        """End the flow from this side. Idempotent."""
        if self._end is None:
            self._conn.link.dealloc(self.stream, self._conn.now)
            self._conn.flush()

    async def reset(self, reason: str = "reset by application") -> None:
        """Abort the flow; the peer's reads and writes raise `FlowReset`."""
        if self._end is None:
            self._conn.link.reset(self.stream, ErrorCode.RESET, reason, self._conn.now)
            self._conn.flush()

    # the non-blocking surface, for bridges that pump a flow from a Protocol ----------

    def attach(self, sink: FlowSink) -> None:
        """Hand this flow's events to `sink` instead of buffering them for `read()`.
        What was already received is passed on at once. The sink gives credit back
        with `consumed(n)` when it has passed bytes on."""
        self._sink = sink
        if self._buffer:
            data = b"".join(self._buffer)
            self._buffer.clear()
            self._buffered = 0
            sink.flow_data(data)
        if self._eof and self._end is None:
            self._fin_told = True
            sink.flow_fin()
        if self._end is not None:
            self._sink = None  # (see `_on_end`)
            sink.flow_ended(self._state, self._end)

    def try_write(self, data: bytes | memoryview) -> int:
        """Send what the peer's credit allows of `data` now; returns the count sent (0
        when there is no credit: wait for `FlowSink.flow_credit`). Raises like `write`."""
        self._check_writable()
        n = self._conn.link.send_data(self.stream, data, self._conn.now)
        self._conn.flush()
        return n

    def send_credit(self) -> int:
        """How many bytes `try_write` would take now: the peer's credit, within the room
        in the link's queue. When it is 0, `FlowSink.flow_credit` is called (and a
        waiting `write` woken) once that changes."""
        return self._conn.link.send_credit(self.stream)

    def consumed(self, n: int) -> None:
        """Give `n` bytes of credit back to the peer (an attached sink passed them on).
        Raises `LocalProtocolError` if `n` is more than the sink was handed and has not
        given back yet: that credit would let the peer send beyond its window."""
        self._conn.link.consumed(self.stream, n, self._conn.now)
        self._conn.flush()

    def fin_nowait(self) -> None:
        """`close_write()` without awaiting."""
        conn = self._conn
        if self._state in SENDING_STATES:
            # the FIN first, when it may go at once: on a relay's edge, the path of a close
            # (written: the link knows the stream; else it is asked)
            written = conn.write_end(self.stream, True)
            if written or conn.link.flow_state(self.stream) is not None:
                conn.link.send_fin(self.stream, conn.now, written=written)
                self._set_state()
                conn.flush()

    def dealloc_nowait(self) -> None:
        """`dealloc()` without awaiting."""
        if self._end is None:
            self._conn.link.dealloc(self.stream, self._conn.now)
            self._conn.flush()

    def reset_nowait(self, reason: str, code: int = ErrorCode.RESET) -> None:
        """`reset()` without awaiting."""
        if self._end is None:
            self._conn.link.reset(self.stream, code, reason, self._conn.now)
            self._conn.flush()

    def when_ended(self) -> asyncio.Future[None]:
        """A future done once the flow has ended (closed, reset or DOWN): to wait for
        that without reading. Do not cancel it (it is shared)."""
        if self._ended is None:
            self._ended = self._conn.loop.create_future()
            if self._end is not None:
                self._ended.set_result(None)
        return self._ended

    async def __aenter__(self) -> Flow:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.dealloc()

    # events from the link -------------------------------------------------------------

    def _set_state(self) -> None:
        state = self._conn.link.flow_state(self.stream)
        if state is not None:
            self._state = state

    def _opened(self) -> None:
        self._state = FlowState.OPEN
        self._set_state()

    def _on_data(self, data: bytes | memoryview) -> None:
        if self._sink is not None:
            self._sink.flow_data(data)
            return
        self._buffer.append(data if type(data) is bytes else bytes(data))
        self._buffered += len(data)
        self._wake_reader()

    def _on_fin(self) -> None:
        self._eof = True
        self._set_state()
        self._end_ahead()  # (unless the sink heard it ahead already)
        self._wake_reader()

    def _end_ahead(self) -> bool:
        """The peer's FIN or CLOSE is about to be applied (`Node.stream_end_ahead`): an
        attached sink hears `flow_fin` now, once, so that it passes the end on first (a
        CLOSE ends the peer's sending too); the events follow as usual. True if the
        sink heard it now."""
        if self._sink is not None and not self._fin_told:
            self._fin_told = True
            self._sink.flow_fin()
            return True
        return False

    def _on_credit(self) -> None:
        if self._sink is not None:
            self._sink.flow_credit()
        if self._writer is not None and not self._writer.done():
            self._writer.set_result(None)

    def _on_end(self, event: FlowEnded) -> None:
        self._state = event.state
        if event.state is FlowState.CLOSED:
            self._end = FlowClosed(event.reason, ErrorCode.FLOW_CLOSED)
            self._eof = True
        elif event.state is FlowState.DOWN:
            reason = event.reason.removeprefix("down: ")
            cls = PeerDown if event.code == ErrorCode.FLOW_PEER else FlowDown
            self._end = cls(reason)
        else:
            self._end = FlowReset(event.reason.removeprefix("reset: "),
                                  _code(event.code, ErrorCode.RESET))
        self._wake_reader()
        if self._writer is not None and not self._writer.done():
            self._writer.set_result(None)
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
        sink, self._sink = self._sink, None  # (its last event: the sink, which holds this
        if sink is not None:  # flow, and the flow no longer hold each other, so both are
            sink.flow_ended(event.state, self._end)  # freed when dropped, not by the GC)

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)


class FlowSink(Protocol):
    """Receives a flow's events when attached with `Flow.attach` (a socket bridge)."""

    def flow_data(self, data: bytes | memoryview) -> None:
        """Bytes arrived (a read-only view: copy it to keep it); call
        `Flow.consumed(len)` once they are passed on."""

    def flow_fin(self) -> None:
        """The peer half-closed (or deallocated: `flow_ended` follows): no more data
        will come. Called once."""

    def flow_credit(self) -> None:
        """The peer granted credit: `try_write` may send more."""

    def flow_ended(self, state: FlowState, error: FlowError) -> None:
        """The flow ended (CLOSED, DOWN or RESET); `error` is what a read would raise."""


def _code(code: int, default: ErrorCode) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:
        return default
