"""SocketBridge: one TCP socket joined to one flow, at the edge of a relay.

The agent bridges each application connection it accepts, the connector each
connection it makes to a server. A bridge is an `asyncio.Protocol` for the socket and
a `FlowSink` for the flow, so it pumps both ways with no task of its own:

* socket -> flow: bytes go out as the flow's credit allows; without credit the socket
  stops being read (`pause_reading`) until credit comes back, so a slow receiver at the
  far end holds at most one window here.
* flow -> socket: bytes are written to the socket; credit is returned to the far end
  only while the socket's write buffer is below its high-water mark, so a slow
  application holds at most one window here too.

Ends travel TCP-correctly: the socket's EOF becomes a FIN on the flow and the flow's
FIN a `write_eof()` on the socket (half-close); a clean end of the flow closes the
socket after its data; a reset or DOWN flow resets the socket (RST, via SO_LINGER 0),
and a reset socket resets the flow.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging
import socket
import sys
import termios
from collections.abc import Callable

from . import coalesce, heldreads, readbuf
from .aio import SocketOptions, format_address, reset_socket, writelines
from .errors import ErrorCode, FlowError
from .flow import Flow
from .flowstate import FlowState

__all__ = ["SocketBridge", "shutdown_write"]

log = logging.getLogger("tether.relay")
_SIOCOUTQ = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
_HELD_MAX = 64 * 1024
"""Bytes an application's socket may send before its flow is allocated (then reading
pauses until it is)."""


def _libc_shutdown() -> Callable[[int, int], int] | None:
    """The C library's `shutdown(2)`, or None where ctypes cannot find it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).shutdown
    except (OSError, AttributeError):  # pragma: no cover - not a POSIX C library
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_SHUTDOWN = _libc_shutdown()
_SHUT_WR = socket.SHUT_WR


def shutdown_write(transport: asyncio.WriteTransport, fd: int | None = None) -> None:
    """Send the socket's FIN now: `write_eof()` once what the transport holds is sent.

    uvloop's `write_eof()` only asks libuv for a `shutdown(2)`, which runs after the
    callback in progress returns: the end of a stream would wait behind whatever else
    that callback does (the rest of the link's read, log lines). With nothing buffered,
    this calls `shutdown(2)` itself, on the transport's descriptor (`fd`, when the
    caller knows it), and does not call `write_eof()` too: a second `shutdown(2)` fails
    with ENOTCONN once the peer's ACK has closed a socket both sides had shut down, and
    uvloop takes that as fatal. The call goes straight to the C library: a Python
    socket object made for it costs two `getsockname(2)` calls (one to find the
    transport's socket, one to check it), on the path of every close. Where ctypes
    finds no C library, `write_eof()` it is.
    """
    if transport.get_write_buffer_size() or _SHUTDOWN is None:
        transport.write_eof()  # after the buffered bytes
        return
    if fd is None:
        sock = transport.get_extra_info("socket")
        if sock is None:  # pragma: no cover - every TCP transport has one
            transport.write_eof()
            return
        fd = sock.fileno()
    _SHUTDOWN(fd, _SHUT_WR)  # -1 if the peer reset: the transport reports it


class SocketBridge(asyncio.Protocol):
    """Pumps bytes and ends between a TCP socket and a `Flow`. See the module docstring.

    Small reads come from the loop; large ones go into the thread's `ReadBuffer` (no
    copy), through a `readbuf.LargeReads` face.

    Create it with the flow and hand it to `loop.create_connection` (connector), or
    create it without one as a server's protocol (agent): `on_connect` is then called
    when the socket arrives, what it sends is held (reading pauses past `_HELD_MAX`)
    and its end noted, and `set_flow` starts the pumping.
    `on_done` is called once when both the socket and the flow have ended.
    `sockopts` are set on the socket when it arrives (without: TCP_NODELAY only).
    """

    __slots__ = (
        "_coalescer",
        "_fd",
        "_fin_pending",
        "_flow",
        "_flow_done",
        "_held",
        "_held_reads",
        "_loop",
        "_lost_exc",
        "_out",
        "_out_bytes",
        "_parked",
        "_pending",
        "_read_paused",
        "_reads",
        "_sending",
        "_socket_done",
        "_timed_out",
        "_unconsumed",
        "_write_paused",
        "bytes_at_reap",
        "bytes_down",
        "bytes_up",
        "first_end",
        "half_closed_at",
        "label",
        "on_connect",
        "on_done",
        "opened_at",
        "peer",
        "sockopts",
        "transport",
    )

    def __init__(self, flow: Flow | None, *, label: str = "socket",
                 on_done: Callable[[SocketBridge], None] | None = None,
                 on_connect: Callable[[SocketBridge], None] | None = None,
                 sockopts: SocketOptions | None = None) -> None:
        self._flow = flow
        self.label = label
        self.sockopts = sockopts
        self.on_done = on_done
        self.on_connect = on_connect
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self._pending: memoryview | None = None  # read, not yet taken by the flow
        self._parked = 0  # its length, counted in the thread's `ReadBuffer.parked`
        self._reads = readbuf.current()
        self._fin_pending = False
        self._read_paused = False
        self._sending = False  # in `_send`: a `flow_credit` now is for it to see
        self._write_paused = False
        self._unconsumed = 0
        self._socket_done = False
        self._flow_done = False
        self.bytes_up = 0  # socket -> flow
        self.bytes_down = 0  # flow -> socket
        self._loop = asyncio.get_running_loop()
        self._fd: int | None = None  # the socket's descriptor, for `shutdown_write`
        self.opened_at = self._loop.time()
        self.half_closed_at: float | None = None  # for the fin timeout
        self.first_end: str | None = None  # what ended first, for the flow's log line
        self._lost_exc: Exception | None = None
        self._timed_out = False
        self.bytes_at_reap = 0
        self._coalescer = coalesce.current()
        self._held_reads = heldreads.current()  # applied before each callback's work
        self._held = False  # registered with the coalescer
        self._out: list[bytes | memoryview] = []  # flow -> socket, held until written
        self._out_bytes = 0

    @property
    def flow(self) -> Flow:
        """The bridged flow."""
        if self._flow is None:
            raise RuntimeError("this bridge has no flow yet")
        return self._flow

    @property
    def timed_out(self) -> bool:
        """The flow was reset because the kernel ended the socket, its peer having
        stopped answering (ETIMEDOUT: TCP keepalive, see `SocketOptions.for_edge`, or
        retransmissions); not when the flow had ended before."""
        return self._timed_out

    def _end_flow_for_socket(self, flow: Flow, exc: Exception | None) -> None:
        """The socket is gone: end `flow` the same way (a close, a reset, a timeout)."""
        if isinstance(exc, TimeoutError):  # (its address stays in this side's log)
            self._timed_out = True
            flow.reset_nowait(f"the {self.label} stopped answering: {exc}")
        elif exc is not None:
            flow.reset_nowait(f"connection reset: {exc}")
        else:
            flow.dealloc_nowait()

    @property
    def has_flow(self) -> bool:
        """`set_flow` was called (or the flow was given at creation)."""
        return self._flow is not None

    def set_flow(self, flow: Flow) -> None:
        """Join the socket to `flow` and start reading it."""
        self._flow = flow
        if self._socket_done:  # the application left while the flow was being set up
            self._end_flow_for_socket(flow, self._lost_exc)
            self._flow_done = True
            self._maybe_done()
            return
        flow.attach(self)
        if self._flow_done:
            return
        if self._pending is not None:  # uvloop may deliver bytes despite pause_reading
            self._send(self._pending)
        elif self._fin_pending:
            self._fin_pending = False
            flow.fin_nowait()
        if self._pending is None and self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    # the socket side --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._held_reads.apply()
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = format_address(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
            if self.sockopts is not None:
                try:
                    self.sockopts.apply(sock)  # (TCP only)
                except OSError as exc:  # pragma: no cover - depends on the platform
                    log.warning("%s %s: cannot set socket options: %s", self.label,
                                self.peer, exc)
            elif sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._flow is not None:
            self._flow.attach(self)
        elif self.on_connect is not None:  # reading goes on (up to _HELD_MAX held): an
            self.on_connect(self)  # application that resets or leaves while its flow is
            # allocated frees its socket at once, not when the allocation is answered

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes read from the socket (through the loop, or `readbuf.LargeReads`)."""
        if self._held_reads.reads:  # (per read: no call when nothing is held)
            self._held_reads.apply()
        if len(data) >= readbuf.LARGE_READ:
            readbuf.read_large(self, self.transport)
        self.bytes_up += len(data)
        if self._flow is None:  # held until set_flow, up to _HELD_MAX
            held = b"" if self._pending is None else bytes(self._pending)
            self._set_pending(memoryview(held + data))
            if self._parked >= _HELD_MAX and self.transport is not None \
                    and not self._read_paused:
                self._read_paused = True
                self.transport.pause_reading()
            return
        if self._pending is not None:  # reading is paused; this was already in flight
            self._set_pending(memoryview(bytes(self._pending) + data))
            return
        self._send(memoryview(data))

    def _send(self, view: memoryview) -> None:
        """Send `view` as the flow takes it; the rest waits in `_pending`, reading
        paused, until `flow_credit`. `try_write` flushes the link, and the flush may
        hand out the very credit (or queue room) this waits for: `flow_credit` then
        only notes it, and the loop looks again (`send_credit`) before parking."""
        if self._pending is not None:  # this call owns the bytes until it parks them
            self._set_pending(None)
        self._sending = True
        try:
            while True:
                try:
                    n = self.flow.try_write(view)
                except FlowError:
                    return  # the flow ended; flow_ended does the rest
                if n == len(view):
                    break
                view = view[n:]
                if not self.flow.send_credit():
                    # a writable view is a read lent for this call (`ReadBuffer.take`)
                    self._set_pending(view if view.readonly else memoryview(view.tobytes()))
                    transport = self.transport
                    if not self._read_paused and transport is not None:
                        self._read_paused = True
                        transport.pause_reading()
                        reads = self._reads
                        if reads.parked > reads.park_budget:  # from now on, reads
                            readbuf.read_large(self, transport)  # sized by `read_room`
                    return
        finally:
            self._sending = False
        if self._fin_pending:
            self._fin_pending = False
            self.flow.fin_nowait()

    def _set_pending(self, view: memoryview | None) -> None:
        """Hold `view` (None: nothing) for the flow, counted in `ReadBuffer.parked`."""
        n = 0 if view is None else len(view)
        self._reads.parked += n - self._parked
        self._parked = n
        self._pending = view

    @property
    def parked(self) -> int:
        """Bytes read from the socket that wait for the flow's credit (or for the flow)."""
        return self._parked

    def read_room(self) -> int:
        """How much the socket's next read may take when the thread's parked bytes are
        over `ReadBuffer.park_budget`: the flow's credit, and at least `LARGE_READ`
        (a smaller read costs more calls per byte, and a read under `SMALL_READ` would
        give the reads back to the loop, which reads 256 KiB)."""
        flow = self._flow
        if flow is None or self._flow_done:
            return readbuf.LARGE_READ
        return max(flow.send_credit(), readbuf.LARGE_READ)

    def eof_received(self) -> bool:
        held = self._held_reads
        if held.reads:  # (no call when nothing is held: the path of a close)
            held.apply()
        if self._pending is not None or self._flow is None:
            self._fin_pending = True
        else:
            self._flow.fin_nowait()  # first: the FIN leaves before any bookkeeping
        # (no fin timeout here: the far edge, which passes this FIN on to its own peer,
        # times that peer, whose progress it sees; this side's peer is done sending)
        if self.first_end is None:
            self.first_end = f"EOF from the {self.label}"
        return True  # keep our write side open: TCP half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._held_reads.apply()
        self._socket_done = True
        self._lost_exc = exc
        if self.first_end is None:
            self.first_end = f"the {self.label} stopped answering" if isinstance(
                exc, TimeoutError) else f"reset by the {self.label}" if exc is not None \
                else f"the {self.label} closed"
        if not self._flow_done and self._flow is not None:
            self._end_flow_for_socket(self._flow, exc)
        self._maybe_done()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._held_reads.apply()
        self._write_paused = False
        if self._unconsumed and not self._flow_done:
            n, self._unconsumed = self._unconsumed, 0
            self.flow.consumed(n)

    # the flow side (FlowSink) --------------------------------------------------------------

    def flow_data(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self.flow.consumed(len(data))
            return
        self.bytes_down += len(data)
        if self._coalescer.depth:  # the link's read is being handled: one write at its end
            self._out.append(data)
            self._out_bytes += len(data)
            if not self._held:
                self._held = True
                self._coalescer.defer(self)
            return
        transport.write(data)
        self._written(len(data))

    def write_deferred(self) -> None:
        """Write the flow's bytes held while the link's read was handled (`coalesce`)."""
        self._held = False
        if not self._out:
            return
        out, self._out = self._out, []
        n, self._out_bytes = self._out_bytes, 0
        transport = self.transport
        if transport is not None and not transport.is_closing():
            writelines(transport, out)
        if not self._flow_done:
            self._written(n)

    def _written(self, n: int) -> None:
        """`n` bytes went to the socket: credit back now, or once it drains."""
        if self._write_paused:
            self._unconsumed += n
        else:
            self.flow.consumed(n)

    def _half_closed(self) -> None:
        if self.half_closed_at is None:
            self.half_closed_at = self._loop.time()

    def flow_fin(self) -> None:
        if self._out:  # the bytes before the FIN (no call when there are none: the path of
            self.write_deferred()  # a close, see `shutdown_write`)
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            shutdown_write(transport, self._fd)
        self._half_closed()
        if self.first_end is None:
            self.first_end = f"FIN from {self.flow.peer}"

    def flow_credit(self) -> None:
        if self._sending:
            return  # `_send` is in `try_write`: it looks again when that returns
        if self._pending is not None:
            self._send(self._pending)
        if self._pending is None and self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    def flow_ended(self, state: FlowState, error: FlowError) -> None:
        self._flow_done = True
        if self._pending is not None:  # nothing more can be sent: dropped
            self._set_pending(None)
        if self.first_end is None:
            self.first_end = f"CLOSE from {self.flow.peer}" if state is FlowState.CLOSED \
                else f"flow {state.name.lower()}"
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if state is FlowState.CLOSED:
                self.write_deferred()
                transport.close()  # after the data already written
                self._half_closed()  # (what it still holds drains under the fin timeout)
            else:
                log.info("flow %s %s: resetting %s socket (%s)", self.flow.id,
                         state.name.lower(), self.label, error)
                reset_socket(transport)
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._pending is not None and self._socket_done and self._flow_done:
            self._set_pending(None)  # (a socket that left before it had a flow)
        if self._socket_done and self._flow_done and self.on_done is not None:
            done, self.on_done = self.on_done, None
            done(self)

    @property
    def unsent(self) -> int:
        """Bytes of the flow's handed to the socket but not yet taken by the kernel."""
        transport = self.transport
        held = self._out_bytes
        if transport is not None and not self._socket_done:
            held += transport.get_write_buffer_size()
        return held

    @property
    def kernel_unsent(self) -> int:
        """Bytes the kernel still holds for the socket's peer (sent but not acknowledged,
        or not sent yet: `SIOCOUTQ`); 0 where that cannot be asked."""
        if self._fd is None or self._socket_done or _SIOCOUTQ is None:
            return 0
        try:
            return int.from_bytes(fcntl.ioctl(self._fd, _SIOCOUTQ, bytes(4)), sys.byteorder)
        except OSError:
            return 0

    @property
    def socket_done(self) -> bool:
        """The socket is gone (`connection_lost`)."""
        return self._socket_done

    def abort(self, reason: str, code: int = ErrorCode.RESET) -> None:
        """End both sides now: reset the flow and the socket (also a socket already
        closing, still waiting to write what it holds)."""
        if self._flow is not None:
            self._flow.reset_nowait(reason, code)
        if self.transport is not None and not self._socket_done:
            reset_socket(self.transport)
