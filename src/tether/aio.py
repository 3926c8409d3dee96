"""tether.aio — the asyncio adapter: the one place that owns sockets, TLS and the clock.

`LinkConnection` is an `asyncio.Protocol` wrapped around one sans-IO `Link`: bytes
from the transport go into the link (large reads with no copy, see `readbuf`), the
link's bytes go to the transport, its events go to a `LinkHandler`, and **one** timer
per link (`loop.call_at`) drives `handle_timer` at the link's `next_deadline()` —
never a timer per flow. The timer is re-armed only when the deadline moves earlier; a
deadline that moved later is found when the timer fires early, which costs one cheap
call instead of a new timer handle per frame.

uvloop is used when installed (`run`, `new_event_loop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import struct
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from . import coalesce, heldreads, readbuf, wire
from .errors import ErrorCode, HandshakeError, PeerUnreachable, caused_by
from .events import Event, HandshakeCompleted, LinkTerminated
from .inflight import InflightBound
from .link import Link, LinkConfig, Role
from .tlsbio import ServerTLSSession, TLSServerStream
from .wire import HEADER

__all__ = [
    "LinkConnection",
    "LinkHandler",
    "RefusedAtAccept",
    "SocketOptions",
    "TLSServer",
    "format_address",
    "listening_port",
    "listening_sockets",
    "new_event_loop",
    "open_link",
    "parse_address",
    "reset_socket",
    "run",
    "serve_links",
    "serve_tls",
    "writelines",
]

log = logging.getLogger("tether.link")
# How much of a link's queued frames is handed to the transport at a time: what the
# link drains in about _DRAIN_TARGET, as measured the last time the kernel left bytes
# behind (an urgent frame waits behind at most that), doubling while the kernel takes
# whole chunks (not mere small writes: an idle link keeps a small one); so a fast link
# gets few, large writes and a slow one small writes.
_CHUNK_MIN = 16 * 1024
_CHUNK_MAX = 1024 * 1024
_DRAIN_TARGET = 0.05
# A drain that took less than this, or of fewer than _CHUNK_MIN bytes (the kernel took
# nearly all of a write), tells nothing of a slow link: the loop's clock counts
# milliseconds (uvloop's), and a busy machine keeps a process off the CPU that long. Such
# a sample counts only if it says the link is fast (writes of _CHUNK_MAX): the write
# size, TCP_NOTSENT_LOWAT, the queue limit and the in-flight bound all follow it. 40
# bytes left behind, seen 1 ms later, had cut a 700 MB/s link's writes and lowat to
# 16 KiB (and its frames, cut to the writes, at every hop after it).
_RATE_MIN_TIME = 0.01
_LOWAT_MAX = 1024 * 1024  # the kernel's unsent bytes, likewise sized to the link's speed
# The link's own queue (`Link.queue_limit`): what the link sends in about _QUEUE_TIME,
# the longest another flow's data then waits behind it (at most its turns: `SendQueue`
# serves the streams in turns). 4 MiB on a fast link, 4 ms at 1 GB/s: at 1 MiB, a
# relay's sends to a link whose socket had paused were cut to what fit below it, a
# frame each. The bytes in it are a flow's credit, held by the relay either way.
_QUEUE_TIME = 0.25
_QUEUE_MIN = 64 * 1024
_QUEUE_MAX = 4 * 1024 * 1024
_HEADER_SIZE = HEADER.size  # a FIN or CLOSE frame, alone in a read (`data_received`)
_LARGE_READ = readbuf.LARGE_READ
_INFLIGHT_RECHECK = 0.02  # a link holding data back for its bytes in flight looks again
_HANDSHAKE_CODES = frozenset({ErrorCode.PROTOCOL_ERROR, ErrorCode.HANDSHAKE_FAILED,
                              ErrorCode.BAD_TOKEN, ErrorCode.VERSION_MISMATCH,
                              ErrorCode.FRAME_TOO_LARGE, ErrorCode.REFUSED})
T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when installed, else asyncio's default."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a default dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T], *, debug: bool = False) -> T:
    """Run `main` to completion on a new loop (uvloop when installed)."""
    with asyncio.Runner(loop_factory=new_event_loop, debug=debug) as runner:
        return runner.run(main)


_LINGER_ZERO = struct.pack("ii", 1, 0)


def reset_socket(transport: asyncio.BaseTransport) -> None:
    """Close `transport` with a TCP RST (SO_LINGER 0), so the peer sees a reset, not EOF
    (`abort()` alone closes with a FIN when nothing is unread)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    transport.abort()  # type: ignore[attr-defined]


def listening_sockets(server: object) -> list[socket.socket]:
    """The sockets `server` listens on. (uvloop's `Server.sockets` is a list, asyncio's a
    tuple, typeshed says tuple; read untyped so that compiled code takes either.)"""
    return list(getattr(server, "sockets", None) or ())


def listening_port(server: object) -> int:
    """The port of `server`'s first listening socket (the one bound to port 0, say)."""
    port: int = listening_sockets(server)[0].getsockname()[1]
    return port


def format_address(peer: object) -> str:
    """A socket address (``getpeername()``) as logs and stats show it: ``host:port``,
    ``[v6]:port``, "?" for none."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer) if peer else "?"


def parse_address(address: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``"host:port"``, ``":port"`` or ``"[v6]:port"`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        raise ValueError(f"not an address: {address!r} (expected HOST:PORT)")
    if int(port) > 65535:  # the loop would bind port % 65536 without a word
        raise ValueError(f"not an address: {address!r} (port {port} out of [0, 65535])")
    host = host.strip("[]") or default_host
    return host, int(port)


# The longest `SocketOptions.for_edge`: Linux takes TCP_KEEPIDLE up to 32767 s, and the
# split gives idle about half of it.
_KEEPALIVE_MAX = 65533


@dataclass(slots=True)
class SocketOptions:
    """Socket options applied to every link socket. Times in seconds.

    TCP keepalive and TCP_USER_TIMEOUT let the kernel notice a dead peer on its own;
    tether's heartbeat does not depend on them, they only make it faster.

    `notsent_lowat` (TCP_NOTSENT_LOWAT) keeps the kernel from accepting more than that
    many bytes not yet sent: what a slow link cannot send yet stays in the link's own
    queue, where a flow's keepalive or credit can overtake another flow's data.

    `rto_max` caps TCP's retransmission timeout (TCP_RTO_MAX_MS, Linux 6.15 and later;
    left to the kernel where it is missing, and with None). TCP doubles the timeout
    after every retransmission lost in a row, up to 120 s, and every frame on the link
    waits behind the lost one: on a lossy path that is how a live link falls silent
    for longer than a flow's liveness timeout. Capped at 1 s, a link retransmits at
    least once a second, and a stall of `k` seconds needs about `k` losses in a row
    (200 ms ± 50 ms and 20% loss each way, 24 connections for 3 minutes: the longest
    stall 73 s by default, 6.4 s capped at 1 s; docs/faults.md). The kernel allows 1
    to 120 s.
    The cost: more retransmissions while a path is down (one per second per link), and
    the kernel, which gives up after `tcp_retries2` (15) retransmissions counted in
    time with the capped timeout, aborts a link whose data goes unacknowledged for
    15 s (measured) instead of about 15 minutes: no sooner than tether's own default
    `link_timeout`, but a longer `link_timeout` needs a longer `rto_max` or a
    `user_timeout` (which, if set, decides instead).
    """

    nodelay: bool = True
    keepalive: bool = True
    keepidle: int = 30
    keepintvl: int = 10
    keepcnt: int = 3
    user_timeout: float | None = None
    notsent_lowat: int | None = 16 * 1024
    rto_max: float | None = 1.0

    # <linux/tcp.h> (not a field: no annotation); not in the socket module yet.
    _TCP_RTO_MAX_MS = getattr(socket, "TCP_RTO_MAX_MS", 44)

    @classmethod
    def for_edge(cls, keepalive: float | None) -> SocketOptions:
        """Options for a relay's edge socket (an application's connection at the agent,
        a server's at the connector): TCP_NODELAY, and TCP keepalive that declares the
        peer dead once it answered nothing for about `keepalive` seconds while the
        connection was idle (None or 0: no keepalive).

        Without it, an idle connection whose peer's host vanished (powered off, cut off
        by a firewall) stays open for ever, and so does its flow, end to end. The time
        is split in whole seconds as idle + 3 probes (60: 30 s idle, then a probe every
        10 s), at least 1 s each. There is no TCP_USER_TIMEOUT here: it also aborts a
        live peer that keeps its receive window closed longer than that (a stopped or
        busy server: measured), and a relay must not end a flow the server still
        holds. Nor the link-only options (`notsent_lowat`, `rto_max`)."""
        if not keepalive:
            return cls(keepalive=False, notsent_lowat=None, rto_max=None)
        if not 0 < keepalive <= _KEEPALIVE_MAX:  # (NaN and infinity included)
            raise ValueError(f"keepalive must be within (0, {_KEEPALIVE_MAX}] seconds or "
                             f"None, got {keepalive!r}")
        whole = max(1, round(keepalive))
        interval = max(1, whole // 6)
        return cls(keepalive=True, keepidle=max(1, whole - 3 * interval),
                   keepintvl=interval, keepcnt=3, notsent_lowat=None, rto_max=None)

    def __post_init__(self) -> None:
        if self.rto_max is not None and not 1.0 <= self.rto_max <= 120.0:
            raise ValueError(f"rto_max must be within [1, 120] seconds or None, "
                             f"got {self.rto_max!r}")

    def apply(self, sock: socket.socket) -> None:
        """Set the options on `sock` (a TCP socket; others are left alone)."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self.nodelay))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(self.keepalive))
        if self.keepalive and hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, self.keepidle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, self.keepintvl)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, self.keepcnt)
        if self.user_timeout is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            int(self.user_timeout * 1000))
        if self.notsent_lowat is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, self.notsent_lowat)
        if self.rto_max is not None and hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
            with contextlib.suppress(OSError):  # ENOPROTOOPT before Linux 6.15
                sock.setsockopt(socket.IPPROTO_TCP, self._TCP_RTO_MAX_MS,
                                round(self.rto_max * 1000))


_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)  # Linux's value


# asyncio's own socket transport, from Python 3.12 on, writes `writelines` with sendmsg
# and never checks its high-water mark there (`write` does): the protocol was never
# paused, and a link's flows filled the transport's buffer (tens of MB) instead of
# waiting in the link behind its queue_limit. (uvloop's transports pause as they should.)
_WRITELINES_SKIPS_PAUSE = sys.version_info >= (3, 12)


def writelines(transport: asyncio.WriteTransport, pieces: list[bytes | memoryview]) -> None:
    """`transport.writelines(pieces)` (one writev, no join), then the protocol is paused
    as after a `write` if the transport's buffer went above its high-water mark."""
    transport.writelines(pieces)
    if _WRITELINES_SKIPS_PAUSE and hasattr(transport, "_high_water"):  # (a socket's own
        check = getattr(transport, "_maybe_pause_protocol", None)  # transport: an SSL
        if check is not None:  # transport's writelines goes through its write)
            check()


def _drain_rate(paused_bytes: int, elapsed: float) -> float | None:
    """The rate of a link whose transport, paused holding `paused_bytes`, resumed
    `elapsed` seconds later; None when that says nothing of the link (see
    `_RATE_MIN_TIME`), unless it says the link is fast."""
    if not paused_bytes:
        return None
    rate = paused_bytes / max(elapsed, 1e-4)
    if rate * _DRAIN_TARGET >= _CHUNK_MAX or (elapsed >= _RATE_MIN_TIME
                                              and paused_bytes >= _CHUNK_MIN):
        return rate
    return None


def _paced(rate: float, seconds: float, low: int, high: int, previous: int) -> int:
    """What a link sending `rate` bytes/s sends in `seconds`, within [low, high], and at
    most double `previous`: a queue filling at the bottleneck drains fast at first."""
    return int(min(max(rate * seconds, low), high, 2 * previous))


class LinkHandler(Protocol):
    """Who receives a link's events (a Node, a Gateway).

    A handler may also have a `stream_end_ahead(conn, stream, ftype) -> bool` method:
    it is then called when a read is exactly one FIN or CLOSE frame (`ftype`) that the
    link will apply to `stream` (`Link.peek_stream_end`), before the link handles it,
    so that the end is passed on at once. It returns whether it passed the end on;
    then the link handles the read once the loop has slept (`tether.heldreads`), else
    at once. The events follow as usual."""

    def link_event(self, conn: LinkConnection, event: Event) -> None:
        """Called for every event of `conn.link`, in order, including the final
        `LinkTerminated`. May call back into `conn.link`; `conn.flush()` is implied."""


class LinkConnection(asyncio.Protocol):
    """One socket carrying one `Link`. Create with `open_link` or `serve_links`.

    Reads come in two ways, chosen by their size. Small ones come from the loop as
    `bytes` (`data_received`: the loop's C code reads and makes the object). Once a
    read is large, a `readbuf.LargeReads` face takes the transport's reads into the
    thread's `ReadBuffer`, up to 1 MiB at a time, handed to the link with no copy,
    until a few small reads in a row give them back (see `readbuf`): a bulk flow keeps
    its large, copy-free reads, and a lone FIN on a relay's close path costs one Python
    call to read instead of three. A server-side TLS link (memory BIOs) always reads
    small."""

    def __init__(self, role: Role, config: LinkConfig, handler: LinkHandler,
                 sockopts: SocketOptions | None = None,
                 server_tls: ssl.SSLContext | None = None) -> None:
        self.role = role
        self.config = config
        self.handler = handler
        self.sockopts = sockopts or SocketOptions()
        self.loop = asyncio.get_running_loop()
        self.link = Link(role, config, self.loop.time())
        self.transport: asyncio.Transport | None = None
        self.peer_address: str = "?"
        self.ready: asyncio.Future[HandshakeCompleted] = self.loop.create_future()
        self.closed: asyncio.Future[LinkTerminated] = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._flushing = False
        self._held = False
        self._chunk = _CHUNK_MIN  # grows while the kernel takes everything
        self._paused_at = 0.0  # when the transport last paused, holding _paused_bytes
        self._paused_bytes = 0
        self._sock: Any = None  # the TCP socket whose TCP_NOTSENT_LOWAT follows the link
        self._inflight: InflightBound | None = None  # on a slow link: see `tether.inflight`
        self._recheck: asyncio.TimerHandle | None = None
        self._abort_at_close: asyncio.TimerHandle | None = None
        self._lowat = self.sockopts.notsent_lowat or 0
        self._prioritized = False  # urgent frames overtake queued ones (plain TCP only)
        self._coalescer = coalesce.current()
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._tls = ServerTLSSession(server_tls) if server_tls is not None else None
        self._end_ahead: Callable[[LinkConnection, int, int], bool] | None = getattr(
            handler, "stream_end_ahead", None)
        self._held_reads = heldreads.current()

    def __repr__(self) -> str:
        return f"<LinkConnection {self.config.name}<->{self.link.peer_name or '?'} " \
               f"{self.peer_address}>"

    def stream_name(self, stream: int) -> str:
        """`stream` as the logs name it: the node at the other end and the number,
        `gw1#7` (a gateway logs the same stream as `<that node>#7`)."""
        return f"{self.link.peer_name or '?'}#{stream}"

    @property
    def now(self) -> float:
        """The loop's clock, the only clock tether uses."""
        return self.loop.time()

    # asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_address = format_address(peer)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                self.sockopts.apply(sock)
            except OSError as exc:  # pragma: no cover - depends on the platform
                log.warning("link %s: cannot set socket options: %s", self.peer_address, exc)
        if self._tls is None and transport.get_extra_info("ssl_object") is None:
            # Paused as soon as the transport holds anything the kernel refused: the
            # rest waits in the link, behind the urgent frames (see `_write_out`). TLS
            # transports keep their own buffer and pace: there, frames go in order, and
            # only the urgent ones while the transport is paused.
            transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]
            self._prioritized = True
            if self._lowat and sock is not None and sock.family in (socket.AF_INET,
                                                                    socket.AF_INET6):
                self._sock = sock
                self._inflight = InflightBound(sock)
        self.flush()

    def data_received(self, data: bytes | memoryview) -> None:
        """Bytes read from the socket (through the loop, or `readbuf.LargeReads`)."""
        n = len(data)
        if n >= _LARGE_READ and self._tls is None:
            readbuf.read_large(self, self.transport)
        held = self._held_reads
        if held.reads:
            held.apply()
        if n == _HEADER_SIZE and self._end_ahead is not None and self._tls is None:
            ahead = self.link.peek_stream_end(data)  # a lone FIN or CLOSE: pass it on
            # first, written at once (nothing is coalescing yet); the rest, later
            if ahead is not None and self._end_ahead(self, ahead[1], ahead[0]):
                held.hold(self, bytes(data), self.loop)
                return
        self.apply_held(data)

    def apply_held(self, data: bytes | memoryview) -> None:
        """Handle a read (one that `HeldReads` held, or one just read)."""
        coalescer = self._coalescer
        coalescer.begin()
        try:
            self._received(data)
        finally:
            coalescer.end()

    def _received(self, data: bytes | memoryview) -> None:
        if self._tls is not None:
            try:
                data = self._tls.receive(data)
            except ssl.SSLError as exc:
                self._write_raw(self._tls.outgoing())  # the TLS alert, if any
                self.link.abort(ErrorCode.HANDSHAKE_FAILED, f"TLS failed: {exc}",
                                self.loop.time())
                self.flush()
                return
            self._write_raw(self._tls.outgoing())
            if self._tls.peer_closed:  # close_notify: the peer's EOF, as `eof_received`
                if data:
                    self.link.receive_data(data, self.loop.time())
                self.link.connection_lost("peer closed the TLS session", self.loop.time())
                self.flush()
                return
            if not data:
                return
        self.link.receive_data(data, self.loop.time())
        self.flush()

    def _write_raw(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def get_extra_info(self, name: str) -> Any:
        """Like `transport.get_extra_info`, TLS included ("ssl_object", "peercert")."""
        if self._tls is not None and name in ("ssl_object", "peercert", "cipher"):
            obj = self._tls.obj
            return {"ssl_object": obj, "peercert": obj.getpeercert(),
                    "cipher": obj.cipher()}[name] if self._tls.established else None
        return self.transport.get_extra_info(name) if self.transport is not None else None

    def eof_received(self) -> bool:
        self._held_reads.apply()
        self.link.connection_lost("peer closed the connection", self.loop.time())
        self.flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._held_reads.apply()
        reason = f"connection lost: {exc}" if exc else "connection closed"
        self.link.connection_lost(reason, self.loop.time())
        self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if self._abort_at_close is not None:
            self._abort_at_close.cancel()
            self._abort_at_close = None
        self._wake_drainers()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._held_reads.apply()
        self._paused = False
        rate = _drain_rate(self._paused_bytes, self.loop.time() - self._paused_at)
        self._paused_bytes = 0
        if rate is not None:  # size the writes to the link's rate
            self._chunk = _paced(rate, _DRAIN_TARGET, _CHUNK_MIN, _CHUNK_MAX, self._chunk)
            self.link.queue_limit = _paced(rate, _QUEUE_TIME, _QUEUE_MIN, _QUEUE_MAX,
                                           self.link.queue_limit)
            if self._sock is not None:
                self._follow_lowat(rate)
            if self._inflight is not None:
                bounded = self._inflight.cap
                self._inflight.follow(rate)
                if self._inflight.cap and not bounded:
                    log.debug("link %s: slow (%.0f kB/s): at most %d KiB in flight", self,
                              rate / 1000, self._inflight.cap // 1024)
        self.flush()  # writes what waited; streams woken by the queue draining send more
        self._wake_drainers()

    # driving the link ---------------------------------------------------------------

    def flush(self) -> None:
        """Write what the link has to send, hand its events to the handler, re-arm the
        timer. Re-entrant: a handler that acts on this link inside an event is fine.

        While a read is being handled (this link's or another's: a gateway splicing),
        the bytes are held and written once when that read is done (`coalesce`)."""
        if self._flushing:
            return
        self._flushing = True
        terminated: LinkTerminated | None = None
        coalescer = self._coalescer
        try:
            link = self.link
            while True:
                if not coalescer.depth:
                    self._write_out()  # (may wake streams: events, taken just below)
                elif not self._held and link.has_output and (
                        not self._paused or link.has_urgent):
                    self._held = True
                    coalescer.defer(self)
                events = link.next_events()
                if not events:
                    break
                for event in events:
                    if isinstance(event, HandshakeCompleted) and not self.ready.done():
                        self.ready.set_result(event)
                    elif isinstance(event, LinkTerminated):
                        terminated = event
                    self.handler.link_event(self, event)
        finally:
            self._flushing = False
        if terminated is not None:
            self._finish(terminated)
        else:
            self._arm()

    def write_deferred(self) -> None:
        """Write the bytes held while a read was handled (see `coalesce`)."""
        self._held = False
        self._write_out()
        if self.link.has_events:  # streams woken by the queue draining (queue_limit)
            self.flush()

    def _follow_lowat(self, rate: float) -> None:
        """Let the kernel hold unsent what the link sends in about _DRAIN_TARGET: on a
        fast link, few writes that the kernel takes whole; on a slow one, little for an
        urgent frame to wait behind. Never below `SocketOptions.notsent_lowat`."""
        lowat = _paced(rate, _DRAIN_TARGET, self.sockopts.notsent_lowat or 0, _LOWAT_MAX,
                       self._lowat)
        if lowat > self._lowat or lowat < self._lowat // 2:  # only real changes
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, lowat)
            except OSError:  # pragma: no cover - the socket is going away
                self._sock = None
                return
            self._lowat = lowat

    def _write_out(self) -> None:
        """Hand the link's frames to the transport: all of them while the kernel takes
        them; once it leaves some behind (the transport pauses), only the urgent control
        frames, until it has sent what it holds (`resume_writing`)."""
        link = self.link
        transport = self.transport
        if not self._prioritized or transport is None or transport.is_closing():
            # TLS: frames go in order, whole; but while the transport is paused only the
            # urgent ones, the rest waiting in the link (its queue_limit bounds it), not
            # in the transport's buffer (it held whatever the flows' credit allowed)
            self._write(link.take_output(0) if self._paused else link.buffers_to_send())
            return
        inflight = self._inflight
        while link.has_output:
            queued = link.queued
            held = (not self._paused and inflight is not None and inflight.cap != 0
                    and inflight.exceeded())  # (no call per write on a fast link)
            pieces = link.take_output(0 if self._paused or held else self._chunk)
            if pieces:
                writelines(transport, pieces)
            if self._paused:  # the kernel did not take it all: see resume_writing
                self._paused_at = self.loop.time()
                self._paused_bytes = transport.get_write_buffer_size()
                return
            if held:  # a slow link with enough in flight: the rest waits (urgent went)
                if self._recheck is None:
                    self._recheck = self.loop.call_later(_INFLIGHT_RECHECK, self._look_again)
                return
            if 2 * (queued - link.queued) >= self._chunk:  # the chunk was used and the
                self._chunk = min(2 * self._chunk, _CHUNK_MAX)  # kernel took it: grow

    def _look_again(self) -> None:
        self._held_reads.apply()
        self._recheck = None
        self.flush()

    def _write(self, pieces: list[bytes | memoryview]) -> None:
        transport = self.transport
        if pieces and transport is not None and not transport.is_closing():
            if self._tls is not None:
                if not self._tls.established:  # (a link ended mid-handshake: no TLS
                    return  # session carries its last frames; the connection closes)
                transport.write(self._tls.send(b"".join(pieces)))
            else:
                transport.writelines(pieces)  # (TLS, or closing: no pause to follow)

    def _finish(self, event: LinkTerminated) -> None:
        self._write(self.link.buffers_to_send())  # the last frames (GOAWAY) go first
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.ready.done():
            code = ErrorCode(event.code) if event.code in _HANDSHAKE_CODES \
                else ErrorCode.HANDSHAKE_FAILED
            reason = event.reason
            if event.code == ErrorCode.FLOW_DOWN:  # the connection ended before HELLO
                reason = f"handshake with {self.peer_address} failed: {reason}"
                if self.get_extra_info("ssl_object") is not None:
                    reason += (" right after the TLS handshake: the peer probably refused "
                               "this node's TLS client certificate (or its absence)")
            self.ready.set_exception(HandshakeError(reason, code))
            self.ready.exception()  # retrieved: no "exception never retrieved" warning
        if not self.closed.done():
            self.closed.set_result(event)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # (once the kernel took what it holds: a peer that
            # stopped reading never takes it, and gets link_timeout to do so)
            self._abort_at_close = self.loop.call_later(self.config.link_timeout,
                                                        self.transport.abort)
        self._wake_drainers()

    def _arm(self) -> None:
        deadline = self.link.next_deadline()
        if deadline is None:
            return
        if self._timer is not None:
            if deadline >= self._timer_at:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._held_reads.apply()
        self._timer = None
        self.link.handle_timer(self.loop.time())
        self.flush()

    # backpressure ---------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        while self._paused and not self.closed.done():
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def close(self, reason: str = "shutdown", code: int = ErrorCode.SHUTDOWN) -> None:
        """End the link now: its flows end with `reason` (once the reads held for this
        thread are applied: a flow whose end was passed on ahead ends as it did)."""
        self._held_reads.apply()
        self.link.close(code, reason, self.loop.time())
        self.flush()

    def write_end(self, stream: int, fin: bool) -> bool:
        """Write `stream`'s FIN (`fin`) or CLOSE now, if the link allows it ahead of what
        it has queued (`Link.end_frame`) and the transport takes it at once (plain TCP,
        not paused); True if written. The caller then tells the link, with
        `send_fin(..., written=True)` or `dealloc(..., written=True)`, before anything
        else reaches it (a gateway's splice: when the read it passes on is handled)."""
        transport = self.transport
        if not self._prioritized or self._paused or transport is None \
                or transport.is_closing():
            return False
        frame = self.link.end_frame(stream, fin)
        if frame is None:
            return False
        transport.write(frame)
        return True

    async def aclose(self, reason: str = "shutdown", drain: float = 0.0) -> None:
        """Graceful close: GOAWAY, let flows finish for up to `drain` seconds, then close.
        Cancelled while draining, it closes at once (and raises `CancelledError`)."""
        self._held_reads.apply()
        try:
            if drain > 0:
                self.link.goaway(self.loop.time(), reason)
                self.flush()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self.closed), drain)
        finally:
            self.close(reason)
        if self.transport is not None:
            await _wait_closed(self.transport)


async def _wait_closed(transport: asyncio.BaseTransport) -> None:
    for _ in range(100):
        if transport.is_closing() and transport.get_extra_info("socket") is None:
            return
        await asyncio.sleep(0)


async def open_link(host: str, port: int, config: LinkConfig, handler: LinkHandler, *,
                    ssl_context: ssl.SSLContext | None = None,
                    server_hostname: str | None = None,
                    sockopts: SocketOptions | None = None,
                    connect_timeout: float = 10.0) -> LinkConnection:
    """Connect to a tether node and complete the HELLO handshake.

    Raises `PeerUnreachable` if the TCP (or TLS) connection cannot be made and
    `HandshakeError` if the peer refuses the handshake (bad token, version).
    """
    loop = asyncio.get_running_loop()

    def factory() -> LinkConnection:
        return LinkConnection(Role.CLIENT, config, handler, sockopts)

    # asyncio.timeout, not wait_for: Python 3.11's wait_for, cancelled in the iteration
    # its connect failed, raises the connect's error and loses the cancellation (a
    # gateway re-dialling a peer then never stopped: its aclose() hung)
    try:
        async with asyncio.timeout(connect_timeout):
            _, conn = await loop.create_connection(
                factory, host, port, ssl=ssl_context,
                server_hostname=server_hostname if ssl_context else None)
    except ssl.SSLError as exc:
        raise caused_by(HandshakeError(f"TLS handshake with {host}:{port} failed: {exc}"), exc)  # noqa: B904
    except (OSError, TimeoutError) as exc:
        why = str(exc) or "timed out"
        raise caused_by(PeerUnreachable(f"cannot connect to {host}:{port}: {why}"), exc)  # noqa: B904
    try:
        await conn.ready
    except asyncio.CancelledError:
        # Cancelled before the peer answered HELLO: the caller never gets this link, so
        # it ends here (else it stayed open until the handshake timeout, and for good if
        # the answer came late: a link no one holds)
        conn.close("connection attempt cancelled", ErrorCode.NO_ERROR)
        raise
    return conn


REFUSALS_TOLD = 32
"""Refused connections a server waits on at once to tell them why (`RefusedAtAccept`)."""
REFUSAL_WAIT = 1.0
"""How long a refused connection is waited on for its dialler's HELLO."""


class RefusedAtAccept(asyncio.Protocol):
    """The protocol for a connection accepted beyond a server's limit (`max_links`),
    reported to `refused(peer)`.

    With a `reason` (a plaintext server), the dialler is told: its HELLO is read (whole,
    should it come in pieces; anything else, as it comes), then a GOAWAY with code
    REFUSED and the reason is written and the connection closed, so
    that the dialler fails with "peer refused the handshake: <reason>" -- and an edge
    with `--start-wait` dials again -- instead of a bare reset. The HELLO is read first
    because closing a socket with unread bytes sends a reset instead of a FIN, and drops
    whatever of the GOAWAY the kernel has not sent yet. At most `REFUSALS_TOLD` wait at once in
    `waiting` (each for `REFUSAL_WAIT` at most, a descriptor each); beyond that, and
    without a reason (TLS: a plaintext frame would mean nothing to the dialler), the
    connection is reset as it is accepted."""

    __slots__ = ("_read", "_reason", "_refused", "_timer", "_transport", "_waiting")

    def __init__(self, refused: Callable[[str], None] | None, reason: str | None = None,
                 waiting: set[RefusedAtAccept] | None = None) -> None:
        self._refused = refused
        self._reason = reason
        self._waiting = waiting
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._read = b""  # the dialler's first bytes, until its first frame is whole

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = format_address(transport.get_extra_info("peername"))
        waiting = self._waiting
        if self._reason is None or waiting is None or len(waiting) >= REFUSALS_TOLD:
            reset_socket(transport)
        else:
            waiting.add(self)
            self._transport = transport  # type: ignore[assignment]
            self._timer = asyncio.get_running_loop().call_later(REFUSAL_WAIT, self._end)
        if self._refused is not None:
            self._refused(peer)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self._reason is None:
            return
        read = self._read = self._read + data
        if len(read) < HEADER.size:
            return
        ftype, _, _, length = HEADER.unpack_from(read)
        if ftype == wire.FrameType.HELLO and length <= wire.CONTROL_PAYLOAD_MAX \
                and len(read) < HEADER.size + length:
            return  # (the rest of the HELLO is coming; anything else is answered now)
        self._transport = None  # (told once; what else arrives is dropped with the socket)
        transport.write(wire.encode(wire.GoAway(last_stream=0, code=ErrorCode.REFUSED,
                                                reason=self._reason)))
        transport.close()  # after the GOAWAY: a FIN, nothing being unread

    def _end(self) -> None:
        """No HELLO in time: reset."""
        self._timer = None
        transport, self._transport = self._transport, None
        if transport is not None:
            reset_socket(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        if self._waiting is not None:
            self._waiting.discard(self)


async def serve_links(host: str, port: int, config_factory: Callable[[], LinkConfig],
                      handler: LinkHandler, *, ssl_context: ssl.SSLContext | None = None,
                      sockopts: SocketOptions | None = None, backlog: int = 1024,
                      reuse_port: bool = False,
                      accepted: set[LinkConnection] | None = None,
                      max_links: int | None = None,
                      over_limit: Callable[[str], None] | None = None,
                      refusal: str | None = None) -> asyncio.Server:
    """Listen for links; each accepted socket becomes a server-side `LinkConnection`.
    With `ssl_context`, each connection is upgraded to TLS, which must complete within
    the link config's `handshake_timeout`; a failure ends the link with
    HANDSHAKE_FAILED (the handler sees it like any other). `accepted`, if given, holds
    every connection until its link ends, those still in their handshake included (the
    handler knows them only from `HandshakeCompleted` on): a server that closes ends
    them too, not their handshake timeout (and from Python 3.12 on,
    `Server.wait_closed()` waits for them). With `accepted`, `max_links` bounds them:
    one more is refused as it is accepted and reported to `over_limit(peer)` (see
    `tether.fdlimit`: the bound keeps the process below its open-file limit, where
    libuv would drop the connections waiting to be accepted without a word): told
    `refusal` in a GOAWAY if given (and no TLS), else reset (`RefusedAtAccept`)."""
    loop = asyncio.get_running_loop()
    told = None if ssl_context is not None else refusal
    waiting: set[RefusedAtAccept] = set()

    def factory() -> asyncio.Protocol:
        if max_links is not None and accepted is not None and len(accepted) >= max_links:
            return RefusedAtAccept(over_limit, told, waiting)
        conn = LinkConnection(Role.SERVER, config_factory(), handler, sockopts,
                              server_tls=ssl_context)
        if accepted is not None:
            accepted.add(conn)
            conn.closed.add_done_callback(lambda _: accepted.discard(conn))
        return conn

    return await loop.create_server(factory, host, port, backlog=backlog,
                                    reuse_port=reuse_port or None)


# TLS servers that see their handshakes fail ------------------------------------------

# accept() failing for want of resources (file descriptors, memory): stop accepting for
# this long, as asyncio's own server does (Linux keeps the listening socket readable)
_ACCEPT_RETRY = 1.0
_ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_server_log = logging.getLogger("tether.aio")


class TLSServer:
    """A TCP listener that runs the TLS handshake of each connection it accepts in a
    task of its own, and reports every handshake that fails or does not complete in
    time to ``on_failure(peer, why)`` (:func:`serve_tls` makes one).

    ``loop.create_server(ssl=...)`` ends such a handshake inside the loop's SSL layer,
    before the application's protocol exists, and drops the error (asyncio logs it in
    debug mode only); it does not send the client the TLS alert that says why either.
    ``loop.start_tls`` called from a task that a plain protocol starts in
    ``connection_made`` works under asyncio, which honours ``pause_reading()`` there,
    but not under uvloop: uvloop starts reading once ``connection_made`` has returned,
    whatever the protocol did, so the client's ClientHello is read by the plain protocol
    before the task runs, and the handshake stalls until its timeout (uvloop 0.23: its
    transport calls ``_start_reading()`` after ``connection_made``; tried, it stalled
    every time). Here the socket is accepted by this object and handed to
    ``loop.connect_accepted_socket`` with a :class:`~tether.tlsbio.TLSServerStream` as
    its protocol, which runs the handshake over memory BIOs: a refused client gets the
    alert (``certificate required``, ``unknown ca``) before the socket closes, and the
    error comes to the task. One task per handshake is also what asyncio's own server
    runs per connection.

    The tasks are owned: :meth:`close` stops accepting and cancels the handshakes under
    way (nothing is reported for them); :meth:`wait_closed` awaits them. Once a
    handshake completed, the application's protocol has a
    :class:`~tether.tlsbio.TLSTransport` (plaintext in and out, flow control as on the
    loop's TLS transports): nothing of this object is left on it.
    """

    __slots__ = ("_batch", "_context", "_factory", "_loop", "_on_failure", "_retry",
                 "_serving", "_tasks", "_timeout", "_unstarted", "sockets")

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket],
                 factory: Callable[[], asyncio.BaseProtocol], context: ssl.SSLContext,
                 handshake_timeout: float, on_failure: Callable[[Any, str], None],
                 batch: int) -> None:
        """Serve on listening, non-blocking ``sockets`` (taken over: closed by
        :meth:`close`); accept up to ``batch`` connections each time one is readable."""
        self.sockets = sockets
        self._loop = loop
        self._factory = factory
        self._context = context
        self._timeout = handshake_timeout
        self._on_failure = on_failure
        self._batch = max(1, batch)
        self._tasks: set[asyncio.Task[None]] = set()
        self._unstarted: set[socket.socket] = set()  # accepted; their task has not run yet
        self._retry: asyncio.TimerHandle | None = None
        self._serving = True
        self._start_accepting()

    def is_serving(self) -> bool:
        """Whether it accepts connections (until :meth:`close`)."""
        return self._serving

    def handshakes(self) -> int:
        """Handshakes under way."""
        return len(self._tasks)

    def close(self) -> None:
        """Stop accepting, close the listening sockets, and end the handshakes under
        way (their connections are aborted; none is reported as failed)."""
        if self._serving:
            self._serving = False
            self._stop_accepting()
            for sock in self.sockets:
                sock.close()
            if self._retry is not None:
                self._retry.cancel()
                self._retry = None
        for sock in self._unstarted:
            sock.close()
        self._unstarted.clear()
        for task in self._tasks:
            task.cancel()

    async def wait_closed(self) -> None:
        """After :meth:`close`: wait until the handshake tasks have ended."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start_accepting(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _stop_accepting(self) -> None:
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(self._batch):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # nothing more to accept (or that client is gone already)
            except OSError as exc:
                if exc.errno not in _ACCEPT_EXHAUSTED:
                    _server_log.warning("TLS server %s: accept failed: %s",
                                        listener.getsockname(), exc)
                    return
                _server_log.warning("TLS server %s: accept failed: %s; accepting again "
                                    "in %g s", listener.getsockname(), exc, _ACCEPT_RETRY)
                self._stop_accepting()
                self._retry = self._loop.call_later(_ACCEPT_RETRY, self._resume)
                return
            sock.setblocking(False)
            self._unstarted.add(sock)
            task = self._loop.create_task(self._handshake(sock, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume(self) -> None:
        self._retry = None
        if self._serving:
            self._start_accepting()

    async def _handshake(self, sock: socket.socket, peer: Any) -> None:
        # (a task cancelled before it ran never gets here: close() closes its socket)
        self._unstarted.discard(sock)
        stream = TLSServerStream(self._context, self._factory, self._loop)
        try:
            async with asyncio.timeout(self._timeout):
                await self._loop.connect_accepted_socket(lambda: stream, sock)
                await stream.handshake
        except TimeoutError:
            stream.abort()
            self._on_failure(peer, f"timed out after {self._timeout:g} s")
        except asyncio.CancelledError:
            stream.abort()  # (close(): no failure)
            raise
        except Exception as exc:  # (the stream wrote the alert and ended the socket)
            if stream.transport is None:  # (the loop did not take the socket)
                sock.close()
            self._on_failure(peer, _handshake_failure(exc))


def _handshake_failure(exc: Exception) -> str:
    """Why a server-side TLS handshake failed, in a few words, for a log line."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason or 'certificate verify failed'}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.strerror or exc)
    if isinstance(exc, ConnectionResetError) and not exc.args:  # EOF in the handshake
        return "closed by the peer during the handshake"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


async def _listening_sockets(host: str | None, port: int, backlog: int,
                             reuse_port: bool) -> list[socket.socket]:
    """Non-blocking listening sockets on every address of ``host`` (every interface for
    ``""`` or None), made as ``loop.create_server`` makes them."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, family=socket.AF_UNSPEC,
                                   type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # (no duplicates)
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this host lacks (IPv6 off)
                continue
            sockets.append(sock)
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # one socket per family, as asyncio does
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address "
                              f"{address!r}: {(exc.strerror or '').lower()}") from None
            sock.listen(backlog)
            sock.setblocking(False)
        if not sockets:
            raise OSError(f"cannot listen on {host!r}: no usable address")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve_tls(factory: Callable[[], asyncio.BaseProtocol], host: str | None, port: int,
                    context: ssl.SSLContext, *, handshake_timeout: float,
                    on_failure: Callable[[Any, str], None], backlog: int = 100,
                    reuse_port: bool = False) -> TLSServer:
    """Listen on ``host:port`` for TLS: like ``loop.create_server(factory, host, port,
    ssl=context, ssl_handshake_timeout=handshake_timeout)``, but every handshake that
    fails or does not complete within ``handshake_timeout`` seconds of its accept is
    reported to ``on_failure(peer, why)`` (``peer`` as ``accept()`` gave it, ``why`` a
    few words: ``"HTTP_REQUEST"``, ``"timed out after 10 s"``); see :class:`TLSServer`.
    """
    if not handshake_timeout > 0:
        raise ValueError(f"handshake_timeout must be positive, got {handshake_timeout!r}")
    sockets = await _listening_sockets(host, port, backlog, reuse_port)
    return TLSServer(asyncio.get_running_loop(), sockets, factory, context,
                     handshake_timeout, on_failure, backlog)


def spawn_owned(tasks: set[asyncio.Task[Any]], coro: Awaitable[Any]) -> asyncio.Task[Any]:
    """Start a task owned by `tasks` (the owner awaits or cancels the set when it closes)."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task
