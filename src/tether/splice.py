"""Splice: two streams joined end to end, with the close cascade (the relay's heart).

A gateway joins the stream from the allocating node (side A) to the stream it opened
toward the serving node (side B). Bytes go across as credit allows: the gateway
gives credit back to the sender only once the bytes were passed on, so a slow
reader at one end slows the writer at the other and nothing piles up in between
(at most one receive window per direction is held here).

Whatever ends one side ends the other, with the cause carried along:

* FIN -> FIN after the pending bytes (half-close mode), or a full close (cascade mode);
* CLOSE (dealloc) -> CLOSE after the pending bytes;
* RESET -> RESET at once (pending bytes are dropped: the flow is aborted);
* DOWN (liveness, link lost) -> RESET with the DOWN code, so the far end goes DOWN too.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Final

from .errors import ErrorCode
from .events import FlowEnded
from .flowstate import SENDING_STATES, FlowState
from .ids import FlowId
from .link import MODE_CASCADE

if TYPE_CHECKING:
    from .aio import LinkConnection

__all__ = ["Splice", "SpliceEnd"]

log = logging.getLogger("tether.relay")

_FIN: Final = "fin"
_CLOSE: Final = "close"


class SpliceEnd:
    """One side of a splice: a stream on a link, and what waits to be sent into it."""

    __slots__ = ("conn", "end_written", "ended", "pending", "pending_bytes", "pending_end",
                 "stream")

    def __init__(self, conn: LinkConnection, stream: int) -> None:
        self.conn = conn
        self.stream = stream
        self.pending: deque[bytes | memoryview] = deque()
        self.pending_bytes = 0
        self.pending_end: str | None = None
        self.end_written = False  # its end went out ahead; its link is told later
        self.ended = False

    def __repr__(self) -> str:
        return self.conn.stream_name(self.stream)


class Splice:
    """Two `SpliceEnd`s, A (the allocating side) and B (the serving side).

    `bytes_up` counts what went from A to B, `bytes_down` from B to A; `opened_at` is
    the loop time it was made; `first_end` says how the first side to end ended
    ("closed", "refused", "down", "reset"), for the counters, and `first_why` which side
    that was and why, for the log."""

    __slots__ = ("a", "b", "bytes_down", "bytes_up", "first_end", "first_why", "id",
                 "mode", "opened_at", "reported", "service")

    def __init__(self, fid: FlowId, service: str, a: SpliceEnd, b: SpliceEnd,
                 mode: int, opened_at: float = 0.0) -> None:
        self.id = fid
        self.service = service
        self.a = a
        self.b = b
        self.mode = mode
        self.reported = False
        self.opened_at = opened_at
        self.bytes_up = 0
        self.bytes_down = 0
        self.first_end: str | None = None
        self.first_why = ""

    def other(self, end: SpliceEnd) -> SpliceEnd:
        """The side that is not `end`."""
        return self.b if end is self.a else self.a

    @property
    def finished(self) -> bool:
        """Both sides have ended: the splice holds nothing any more."""
        return self.a.ended and self.b.ended

    # what arrives on one side is passed to the other ------------------------------------

    def on_data(self, src: SpliceEnd, data: bytes | memoryview) -> None:
        """Bytes arrived on `src`: pass them on as credit allows, hold the rest."""
        if src is self.a:
            self.bytes_up += len(data)
            dst = self.b
        else:
            self.bytes_down += len(data)
            dst = self.a
        if dst.ended:
            src.conn.link.consumed(src.stream, len(data), src.conn.now)
            src.conn.flush()
            return
        dst.pending.append(data)
        dst.pending_bytes += len(data)
        self._pump(dst)

    def on_credit(self, dst: SpliceEnd) -> None:
        """`dst` received credit: send what waits for it."""
        self._pump(dst)

    def on_fin(self, src: SpliceEnd) -> None:
        """`src` half-closed."""
        dst = self.other(src)
        if self.mode == MODE_CASCADE:
            self._end_after_pending(dst, _CLOSE)
            src.conn.link.dealloc(src.stream, src.conn.now)
            src.conn.flush()
        else:
            self._end_after_pending(dst, _FIN)

    def end_ahead(self, src: SpliceEnd, fin: bool) -> bool:
        """`src`'s link is about to apply a FIN (`fin`) or a CLOSE from its peer: when
        nothing waits to go before it, end the other side now, ahead of the events
        (`on_fin` and `on_end` then find it done), and return True. A cascade-mode FIN
        ends the other side with a CLOSE here; `on_fin` deallocates `src` as usual.

        The path of every close a relayed application sees: the frame is written first
        (`LinkConnection.write_end`), and `dst`'s link is told when `src`'s read is
        handled (`on_fin`, `on_end`): that read is held until then (`tether.heldreads`),
        and nothing else reaches either link before it."""
        dst = self.b if src is self.a else self.a
        if dst.ended or dst.pending or dst.pending_end is not None or dst.end_written:
            return False
        conn = dst.conn
        fin = fin and self.mode != MODE_CASCADE
        if conn.write_end(dst.stream, fin):
            dst.end_written = True
        else:  # (TLS, or a paused link: through the link's queue)
            self._end_after_pending(dst, _FIN if fin else _CLOSE)
        return True

    def on_keepalive(self, src: SpliceEnd) -> None:
        """A sign of life from `src`'s end: pass it on, end to end."""
        dst = self.other(src)
        if not dst.ended:
            dst.conn.link.send_keepalive(dst.stream, dst.conn.now)
            dst.conn.flush()

    def on_end(self, src: SpliceEnd, event: FlowEnded) -> None:
        """`src`'s stream ended: end the other side the same way."""
        self.note_end(src, event)
        src.ended = True
        src.pending.clear()
        src.pending_bytes = 0
        dst = self.other(src)
        if dst.ended or event.initiator == "local":
            return
        if event.state is FlowState.CLOSED:
            self._end_after_pending(dst, _CLOSE)
        elif event.state is FlowState.DOWN:
            code = event.code if event.code == ErrorCode.FLOW_PEER else ErrorCode.FLOW_DOWN
            self._reset(dst, code, event.reason.removeprefix("down: "))
        else:
            self._reset(dst, event.code, event.reason.removeprefix("reset: "))

    def note_end(self, src: SpliceEnd, event: FlowEnded) -> None:
        """Remember how the first side to end, `src`, ended (later ends change nothing)."""
        if self.first_end is None:
            self.first_why = f"{src} {event.reason}"
            self.first_end = "refused" if event.reason.startswith("refused") else \
                event.state.name.lower()

    # internals --------------------------------------------------------------------------

    def _reset(self, dst: SpliceEnd, code: int, reason: str) -> None:
        dst.pending.clear()
        dst.pending_bytes = 0
        dst.conn.link.reset(dst.stream, code, reason, dst.conn.now)
        dst.conn.flush()

    def _end_after_pending(self, dst: SpliceEnd, how: str) -> None:
        if dst.ended:
            return
        if dst.pending_end != _CLOSE:
            dst.pending_end = how
        self._pump(dst)

    def _pump(self, dst: SpliceEnd) -> None:
        src = self.other(dst)
        link = dst.conn.link
        now = dst.conn.now
        moved = 0
        while dst.pending and not dst.ended:
            head = dst.pending[0]
            n = link.send_data(dst.stream, head, now) if link.send_credit(dst.stream) else 0
            if n == 0:
                break
            moved += n
            if n == len(head):
                dst.pending.popleft()
            else:
                dst.pending[0] = head[n:]
        dst.pending_bytes -= moved
        if not dst.pending and dst.pending_end is not None and not dst.ended:
            how, dst.pending_end = dst.pending_end, None
            written, dst.end_written = dst.end_written, False
            if how == _FIN:
                if link.flow_state(dst.stream) in SENDING_STATES:
                    link.send_fin(dst.stream, now, written=written)
            else:
                link.dealloc(dst.stream, now, written=written)
        dst.conn.flush()
        if moved and not src.ended:
            src.conn.link.consumed(src.stream, moved, src.conn.now)
            src.conn.flush()
