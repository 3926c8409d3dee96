"""tether.hub — very many long-held connections, each known by a serializable id.

A :class:`Hub` listens on one address and turns every accepted socket into events:
``Opened(id, peer)``, ``Data(id, data)`` for each framed message, and exactly one
``Closed(id, reason)``. The application answers with ``hub.send(id, data)``,
``hub.send_many(ids, data)`` and ``hub.close(id)``. Ids are :class:`~tether.FlowId`\\ s:
they serialize to a string or an int and back, and are never reused by a hub, so an
application can keep them in an external store and route to them later.

How it stays fast and bounded (see docs/hub.md):

* one :class:`asyncio.Protocol` per connection with ``__slots__`` and no task, no
  future, no timer of its own (a TLS hub runs each handshake in a task, until the
  connection is open: :class:`~tether.aio.TLSServer`);
* events go into the hub's queues and wake the consumer once per loop iteration; the
  consumer takes everything queued at once (``hub.batches()``), or one event at a time
  from that batch (``async for event in hub``);
* ``send`` only queues the framed message on its connection: one flush per loop
  iteration writes each connection's pending messages with a single ``transport.write``;
* the data queue has high and low watermarks: above the high one the sockets that
  feed it stop being read, and they are resumed below the low one. Opens and closes
  are queued apart and never paused (there is at most one of each per connection), so
  an application that ignores them can never stall data;
* a connection's write buffer is bounded; a peer that does not read is disconnected
  (``"slow consumer"``) or, by policy, has messages dropped and counted;
* idle timeouts live on one timing wheel (:mod:`tether.liveness`) driven by one loop
  timer for the whole hub; receiving data only stores a timestamp.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Generic,
    Literal,
    Protocol,
    TypeAlias,
    TypeVar,
    cast,
    overload,
)

from .aio import (
    SocketOptions,
    TLSServer,
    format_address,
    listening_port,
    listening_sockets,
    reset_socket,
    serve_tls,
)
from .errors import FlowClosed, TetherError
from .fdlimit import resolve_limit
from .floodlog import FloodLog
from .framing import Decoder, Framing, Lines, MessageTooLarge
from .ids import FlowId
from .liveness import TimingWheel
from .tlsfiles import ServerTLS

if TYPE_CHECKING:
    from .workers import Handler, WorkerPool

__all__ = [
    "Closed",
    "Data",
    "FlowsClosed",
    "GroupedEvent",
    "Hub",
    "HubClosed",
    "HubEvent",
    "HubStats",
    "Messages",
    "Opened",
]

log = logging.getLogger("tether.hub")
E = TypeVar("E")

# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Opened:
    """A connection was accepted: ``id`` names it from now on; ``peer`` is the remote
    address as ``"host:port"`` (``"[v6]:port"`` for IPv6)."""

    id: FlowId
    peer: str


@dataclass(frozen=True, slots=True)
class Data:
    """One message received on connection ``id`` (framing removed)."""

    id: FlowId
    data: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """Connection ``id`` ended; nothing more will be received from it and ``send`` to
    it raises :class:`~tether.FlowClosed` (see :meth:`Hub.send` for the one grace case).

    ``reason``: ``"peer"`` (the peer closed), ``"reset"`` (the peer aborted),
    ``"local"`` (:meth:`Hub.close`), ``"idle"`` (inactivity timeout), ``"slow
    consumer"`` (the peer did not read what was sent), ``"shutdown"`` (the hub
    closed), ``"error: ..."`` (``"error: message too large"``, a socket error).
    """

    id: FlowId
    reason: str


@dataclass(frozen=True, slots=True)
class Messages:
    """Several messages received on connection ``id`` in one read, in order (framing
    removed). Only :meth:`Hub.batches` with ``grouped=True`` hands these out; answer
    them with :meth:`Hub.send_batch`. ``messages`` is a tuple."""

    id: FlowId
    messages: Sequence[bytes]


HubEvent: TypeAlias = Opened | Data | Closed
"""An event of ``async for event in hub`` and ``hub.batches()``."""

GroupedEvent: TypeAlias = Opened | Messages | Closed
"""An event of ``hub.batches(grouped=True)``."""

# Fast construction of the frozen, slotted events on the hot path: the generated
# __init__ goes through object.__setattr__ twice; the slot descriptors do not.
_new = object.__new__
MAX_IDLE_TIMEOUT: Final = 1e9
"""The largest idle timeout, in seconds (about 31 years): the timing wheel holds
deadlines only so far ahead (``math.inf`` is refused: None means no timeout)."""


def _check_idle_timeout(seconds: float | None, what: str = "idle timeout") -> None:
    """``ValueError`` unless ``seconds`` is None or within 0.01 s .. MAX_IDLE_TIMEOUT."""
    if seconds is not None and not 0.01 <= seconds <= MAX_IDLE_TIMEOUT:
        raise ValueError(f"{what} must be at least 0.01 s and at most {MAX_IDLE_TIMEOUT:g} s, "
                         f"or None, got {seconds!r}")


_DATA_ID: Final[Any] = Data.__dict__["id"].__set__
_DATA_DATA: Final[Any] = Data.__dict__["data"].__set__
_MSGS_ID: Final[Any] = Messages.__dict__["id"].__set__
_MSGS_MESSAGES: Final[Any] = Messages.__dict__["messages"].__set__


def _data(fid: FlowId, message: bytes) -> Data:
    event: Data = _new(Data)
    _DATA_ID(event, fid)
    _DATA_DATA(event, message)
    return event


class HubClosed(TetherError):
    """The hub is closed and every event it queued has been taken."""


class FlowsClosed(FlowClosed):
    """:meth:`Hub.send_many` found ids that are closed or unknown; ``ids`` lists them.
    Every other id of the call was sent to."""

    def __init__(self, ids: list[FlowId]) -> None:
        """Name the ``ids`` that could not be sent to."""
        shown = ", ".join(str(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
        super().__init__(f"{len(ids)} connection(s) closed or unknown: {shown}")
        self.ids = ids


@dataclass(frozen=True, slots=True)
class HubStats:
    """A snapshot of a hub's counters (:meth:`Hub.stats`)."""

    open: int
    """Connections open now (including those whose peer closed, until handed over)."""
    opened: int
    """Connections accepted since the start."""
    closed: dict[str, int]
    """Connections ended since the start, by reason."""
    bytes_in: int
    """Bytes received from peers."""
    bytes_out: int
    """Bytes written to peers (handed to the transports)."""
    messages_in: int
    """Messages received (``Data`` events queued)."""
    messages_out: int
    """Messages accepted by ``send``/``send_many`` (per connection)."""
    queued: int
    """Events waiting to be taken by the application."""
    queued_bytes: int
    """Approximate memory of the queued data events (payload + per-message overhead)."""
    paused: int
    """Sockets not being read because the data queue is above its high watermark."""
    dropped: int
    """Messages dropped by the ``"drop"`` slow-consumer policy."""
    incomplete: int
    """Connections that ended with an incomplete message buffered (discarded)."""
    handshakes_failed: int = 0
    """TLS handshakes that failed or did not complete within ``handshake_timeout``
    (each logged with the peer's address and why); such a connection is never opened,
    so it is in no other counter."""
    refused: int = 0
    """Connections reset as they were accepted (never opened: in no other counter):
    ``max_unseen_opens`` ``Opened`` events were waiting for the application already, or
    ``max_connections`` were open (``over_limit`` of them)."""
    over_limit: int = 0
    """Of ``refused``: connections reset as they were accepted because
    ``max_connections`` were open."""

    @property
    def closed_total(self) -> int:
        """Connections ended since the start, all reasons."""
        return sum(self.closed.values())


# --- connections -------------------------------------------------------------------------

_OPEN: Final = 0  # reading and writing
_LINGER: Final = 1  # the peer sent EOF: replies may still be sent until handed over
_CLOSING: Final = 2  # closed by the hub, the transport is flushing its buffer
_GONE: Final = 3  # the transport is gone

_MSG_OVERHEAD: Final = 120  # bytes of Python objects per queued message (Data, bytes)
_RELEASE_ALL: Final = -1


def _reason_of(exc: Exception | None) -> str:
    if exc is None:
        return "peer"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, OSError) and exc.strerror:
        return f"error: {exc.strerror.lower()}"
    return f"error: {exc}"


# A flood of failed TLS handshakes (a scanner, a misconfigured fleet) must not flood the
# log: at most _HANDSHAKE_LOG_BURST lines per _HANDSHAKE_LOG_WINDOW seconds, then one
# line for the rest of that window (`FloodLog`).
_HANDSHAKE_LOG_BURST: Final = 10
_HANDSHAKE_LOG_WINDOW: Final = 10.0


class _Conn(asyncio.Protocol):
    """One accepted socket. Minimal state; everything else is the hub's."""

    __slots__ = ("carry", "decoder", "fid", "hub", "last_rx", "npending", "paused", "pending",
                 "rx", "state", "timeout", "transport", "wblocked")

    fid: FlowId
    decoder: Decoder
    transport: asyncio.Transport

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.state = _GONE  # _OPEN once the hub accepted it
        self.pending: bytes | list[bytes] | None = None
        self.rx: list[bytes] | None = None  # messages queued, not yet taken
        self.npending = 0
        self.carry = 0  # bytes of reads that completed no message: not counted yet
        self.paused = False
        self.wblocked = False
        self.timeout: float | None = None
        self.last_rx = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.hub._accepted(self, self.transport)

    def data_received(self, data: bytes) -> None:
        if self.state:
            return
        hub = self.hub
        try:
            msgs = self.decoder.feed(data)
        except MessageTooLarge as exc:
            hub._too_large(self, exc, len(data))
            return
        nbytes = len(data)
        hub._bytes_in += nbytes
        if self.timeout is not None:
            self.last_rx = hub._time()
        if not msgs:
            self.carry += nbytes  # counted with the read that completes the message
            return
        carry = self.carry
        if carry:
            nbytes += carry
            self.carry = 0
        rx = self.rx
        if rx is None:
            self.rx = msgs
            hub._data.append(self)
            hub._enq += 1
        else:
            rx += msgs
        hub._msgs_in += len(msgs)
        q = hub._qbytes + nbytes + len(msgs) * _MSG_OVERHEAD
        hub._qbytes = q
        if hub._w_data or hub._w_any:
            hub._wake_data()
        if q > hub._high and not self.paused:
            hub._pause(self)

    def eof_received(self) -> bool:
        if self.state:
            return False
        return self.hub._peer_eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub._lost(self, exc)

    def pause_writing(self) -> None:
        self.wblocked = True

    def resume_writing(self) -> None:
        self.wblocked = False


class _Router(Protocol):
    """Where a worker of ``Hub(workers=N)`` (or its supervisor) sends what concerns ids
    held by another worker (:mod:`tether.workers`); each method raises
    :class:`~tether.FlowClosed` for an id it cannot route."""

    def send(self, id: FlowId, frame: bytes, count: int) -> None: ...
    def send_many(self, ids: list[FlowId], frame: bytes) -> list[FlowId]: ...
    def close(self, id: FlowId) -> bool: ...
    def set_idle_timeout(self, id: FlowId, seconds: float | None) -> None: ...
    def opened(self, serial: int) -> None: ...
    def ended(self, serial: int, reason: str) -> None: ...


# --- the hub -----------------------------------------------------------------------------


class Hub:
    """A server for very many concurrent, long-held connections, each known by an id.

    ``framing`` cuts each connection's bytes into messages (default ``Lines()``);
    ``max_message``, if given, replaces the framing's ``max_size``. ``idle_timeout``
    (seconds, or None) ends a connection from which nothing was received for that long
    (reason ``"idle"``; sending does not count as activity; see
    :meth:`set_idle_timeout`). ``backlog``, ``reuse_port`` and ``sockopts`` (a
    :class:`~tether.SocketOptions`, applied to the listening socket and inherited by
    accepted ones) configure the listening socket; ``tls`` is an ``ssl.SSLContext``
    or a :class:`~tether.ServerTLS` (files: what ``workers`` need, since a context
    cannot be handed to another process) for TLS; a TLS handshake that fails or does
    not complete within ``handshake_timeout`` seconds of its accept ends only that
    connection, which is never opened: it is logged (peer, why; a flood is summed up)
    and counted in ``stats().handshakes_failed``. ``name`` is the node part of every id.

    Bounds: ``queue_high``/``queue_low`` are the data queue's watermarks in bytes
    (payload plus about 120 bytes of overhead per message). What the application has
    taken is its own, and the queue refills behind it: while it works through a full
    batch (``async for`` over the hub hands out one batch an event at a time), up to
    twice ``queue_high`` is in memory. ``max_write_buffer`` bounds
    what may wait to be written to one connection, and ``slow_consumer`` says what
    happens beyond it: ``"disconnect"`` (reason ``"slow consumer"``) or ``"drop"`` the
    message (counted in ``stats().dropped``). ``linger`` is how long a connection whose
    peer closed stays writable at most, and ``close_timeout`` how long a closing
    connection may take to flush before it is aborted. ``max_unseen_opens`` bounds the
    ``Opened`` events the application has not taken: beyond it, a new connection is
    reset as it is accepted (logged, counted in ``stats().refused``), so that
    connections coming and going while the application takes no events cannot grow
    the event queues without bound. ``max_connections`` bounds the connections open at
    once (default: the open-file limit less 128, :func:`tether.fdlimit.default_max_connections`;
    None: no bound of the hub's own): one more is reset as it is accepted (logged,
    counted in ``stats().refused`` and ``stats().over_limit``). The bound is the hub's
    so that the kernel's is never met: out of files, libuv closes every connection
    waiting to be accepted, and those clients read an EOF that nothing logs or counts.

    Use ``async with Hub(...) as hub`` or ``await hub.start()`` / ``await hub.aclose()``.
    """

    __slots__ = (
        "__weakref__",
        "_backlog",
        "_bytes_in",
        "_bytes_out",
        "_call_soon",
        "_close_timeout",
        "_closed_by",
        "_closes",
        "_closing",
        "_conns",
        "_data",
        "_deferred",
        "_dhead",
        "_dirty",
        "_dpos",
        "_dropped",
        "_encode",
        "_encode_many",
        "_ended",
        "_enq",
        "_finishing",
        "_flushing",
        "_framing",
        "_handshake_log",
        "_handshake_timeout",
        "_handshakes_failed",
        "_high",
        "_host",
        "_idle_timeout",
        "_incomplete",
        "_linger",
        "_lingering",
        "_loop",
        "_low",
        "_max_conns",
        "_max_conns_given",
        "_max_unseen",
        "_msg_cost",
        "_msgs_in",
        "_msgs_out",
        "_name",
        "_next_serial",
        "_opened",
        "_opens",
        "_over_limit",
        "_paused",
        "_pool",
        "_port",
        "_qbytes",
        "_refusal_log",
        "_refused",
        "_reuse_port",
        "_router",
        "_seal",
        "_server",
        "_shutdown_done",
        "_slow_drop",
        "_sockopts",
        "_state",
        "_taken",
        "_time",
        "_timer",
        "_timer_at",
        "_tls",
        "_tls_files",
        "_w_any",
        "_w_close",
        "_w_data",
        "_w_open",
        "_wheel",
        "_wlimit",
        "_worker",
    )

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        framing: Framing | None = None,
        idle_timeout: float | None = None,
        max_message: int | None = None,
        backlog: int = 4096,
        reuse_port: bool = False,
        sockopts: SocketOptions | None = None,
        tls: ssl.SSLContext | ServerTLS | None = None,
        handshake_timeout: float = 10.0,
        name: str = "hub",
        worker: int = 0,
        queue_high: int = 4 * 1024 * 1024,
        queue_low: int | None = None,
        max_write_buffer: int = 1024 * 1024,
        slow_consumer: Literal["disconnect", "drop"] = "disconnect",
        linger: float = 5.0,
        close_timeout: float = 5.0,
        max_unseen_opens: int = 10_000,
        max_connections: int | Literal["default"] | None = "default",
        workers: int = 1,
        handler: Handler | None = None,
    ) -> None:
        """Configure a hub; nothing listens until :meth:`start`.

        With ``handler`` (``"module:function"`` or a module-level async function taking
        the hub), :meth:`start` runs ``workers`` processes instead, each with its own
        hub on the same port and the handler consuming its events; this object is
        then their supervisor (:mod:`tether.workers`, docs/workers.md).
        """
        framing = framing if framing is not None else Lines()
        if max_message is not None:
            if max_message < 1:
                raise ValueError(f"max_message must be positive, got {max_message!r}")
            framing = framing.with_max_size(max_message)
        _check_idle_timeout(idle_timeout, "idle_timeout")
        if slow_consumer not in ("disconnect", "drop"):
            raise ValueError(f"slow_consumer must be 'disconnect' or 'drop', got {slow_consumer!r}")
        if queue_high < 1:
            raise ValueError(f"queue_high must be positive, got {queue_high!r}")
        low = queue_high // 2 if queue_low is None else queue_low
        if not 0 <= low <= queue_high:
            raise ValueError(f"queue_low must be within [0, queue_high], got {queue_low!r}")
        if max_write_buffer < 1:
            raise ValueError(f"max_write_buffer must be positive, got {max_write_buffer!r}")
        if not linger >= 0 or not close_timeout >= 0:
            raise ValueError("linger and close_timeout must be >= 0")
        if max_unseen_opens < 1:
            raise ValueError(f"max_unseen_opens must be positive, got {max_unseen_opens!r}")
        if tls is not None and not handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be positive, got {handshake_timeout!r}")
        FlowId(node=name, serial=0, worker=worker)  # validates name and worker
        self._host = host
        self._port = port
        self._framing = framing
        self._encode = framing.encode
        self._encode_many = framing.encode_many
        self._seal = framing.decoded_type
        self._idle_timeout = idle_timeout
        self._backlog = backlog
        self._reuse_port = reuse_port
        self._sockopts = sockopts
        self._tls_files = tls if isinstance(tls, ServerTLS) else None  # (for workers)
        self._tls = tls.context() if isinstance(tls, ServerTLS) else tls
        self._handshake_timeout = handshake_timeout
        self._name = name
        self._worker = worker
        self._high = queue_high
        self._low = low
        self._wlimit = max_write_buffer
        self._slow_drop = slow_consumer == "drop"
        self._linger = linger
        self._close_timeout = close_timeout
        self._max_unseen = max_unseen_opens
        # (as given, for workers: each takes the default from its own open-file limit)
        self._max_conns_given = max_connections
        self._max_conns = resolve_limit(max_connections, "max_connections")
        # what a message taken gives back to queued_bytes: its framing's bytes too, as
        # they were counted when it was read
        self._msg_cost = _MSG_OVERHEAD + framing.per_message
        self._refused = 0
        self._over_limit = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | TLSServer | None = None
        self._state = "new"
        self._shutdown_done: asyncio.Future[None] | None = None
        self._ended = False
        self._next_serial = 1
        self._conns: dict[int, _Conn] = {}
        self._closing: dict[int, _Conn] = {}
        self._lingering: dict[int, _Conn] = {}
        self._finishing: list[_Conn] = []
        # queues: opens and closes are bounded by the connections; data is watermarked
        self._opens: deque[Opened] = deque()
        self._data: list[_Conn] = []  # connections with messages queued (in .rx), in order
        self._dhead = 0  # entries of _data taken by recv_data
        self._dpos = 0  # messages of _data[_dhead].rx taken by recv_data
        self._closes: deque[Closed] = deque()
        self._deferred: deque[tuple[int, Closed]] = deque()
        self._enq = 0  # data entries ever queued
        self._taken = 0  # data entries ever taken whole
        self._qbytes = 0
        self._paused: list[_Conn] = []
        self._w_any: list[asyncio.Future[None]] = []
        self._w_open: list[asyncio.Future[None]] = []
        self._w_data: list[asyncio.Future[None]] = []
        self._w_close: list[asyncio.Future[None]] = []
        # writes
        self._dirty: list[_Conn] = []
        self._flushing = False
        # timers
        self._wheel: TimingWheel[int] = TimingWheel(tick=0.01)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._time = _no_clock
        self._call_soon: Any = _no_clock
        # counters
        self._opened = 0
        self._closed_by: dict[str, int] = {}
        self._bytes_in = 0
        self._bytes_out = 0
        self._msgs_in = 0
        self._msgs_out = 0
        self._dropped = 0
        self._incomplete = 0
        self._handshakes_failed = 0
        self._handshake_log = FloodLog(
            log, f"hub {self._name}: %d more TLS handshakes failed within "
                 f"{_HANDSHAKE_LOG_WINDOW:g} s (not logged one by one); the last: %s",
            level=logging.INFO, burst=_HANDSHAKE_LOG_BURST, window=_HANDSHAKE_LOG_WINDOW,
            with_last=True)
        self._refusal_log = FloodLog(
            log, f"hub {self._name}: %d more new connection(s) reset within 1s; the last: "
                 f"%s", with_last=True)
        # Hub(workers=N): the ids of other workers are routed (tether.workers)
        self._router: _Router | None = None
        self._pool: WorkerPool | None = None
        if handler is not None or workers != 1:
            from .workers import WorkerPool  # workers imports this module

            self._pool = WorkerPool(self, workers, handler)

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port}"
        return f"<Hub {self._name} {where} {self._state} open={len(self._conns)}>"

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the hub listens on (known after :meth:`start`, also for port 0)."""
        if self._server is None and (self._pool is None or self._state == "new"):
            raise RuntimeError("the hub is not started")
        return self._port

    @property
    def name(self) -> str:
        """The node name in every id of this hub."""
        return self._name

    @property
    def worker(self) -> int:
        """The worker index in every id of this hub: 0 for a hub of its own, 1..N in
        the workers of ``Hub(workers=N)``."""
        return self._worker

    @property
    def framing(self) -> Framing:
        """The framing of every connection."""
        return self._framing

    async def start(self) -> Hub:
        """Start listening; returns the hub."""
        if self._pool is not None:
            await self._pool.start()
            return self
        if self._state != "new":
            raise RuntimeError(f"the hub is {self._state}: a hub starts only once")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._time = loop.time
        self._call_soon = loop.call_soon
        self._state = "starting"
        factory = functools.partial(_Conn, self)
        server: asyncio.Server | TLSServer
        try:
            if self._tls is None:
                server = await loop.create_server(
                    factory, self._host, self._port, backlog=self._backlog,
                    reuse_port=self._reuse_port or None)
            else:  # not create_server(ssl=...): it drops failed handshakes (see TLSServer)
                server = await serve_tls(
                    factory, self._host, self._port, self._tls,
                    handshake_timeout=self._handshake_timeout,
                    on_failure=self._handshake_failed, backlog=self._backlog,
                    reuse_port=self._reuse_port)
        except BaseException:
            self._state = "closed"
            self._ended = True
            raise
        if self._state != "starting":  # aclose() was called meanwhile
            server.close()
            raise RuntimeError("the hub was closed while starting")
        self._server = server
        if self._sockopts is not None:
            for sock in listening_sockets(server):
                self._sockopts.apply(sock)  # accepted sockets inherit the options
        self._port = listening_port(server)
        self._state = "open"
        return self

    async def __aenter__(self) -> Hub:
        """``await start()``."""
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        """``await aclose()``."""
        await self.aclose()

    async def aclose(self, timeout: float | None = None) -> None:
        """Shut down: stop accepting, end every connection (reason ``"shutdown"``)
        after writing what was sent to it, and wait up to ``timeout`` seconds (default
        ``close_timeout``) for the sockets to flush before aborting them.

        Queued events stay available: ``async for`` and the ``recv_*`` methods deliver
        them, then end (``HubClosed``). With ``workers``, every worker drains this way.
        """
        if self._pool is not None:
            await self._pool.aclose(timeout)
            return
        if self._state in ("new", "starting"):
            self._state = "closed"
            self._ended = True
            self._wake_all()
            return
        if self._shutdown_done is not None:
            await asyncio.shield(self._shutdown_done)
            return
        loop = self._loop
        assert loop is not None and self._server is not None
        self._shutdown_done = loop.create_future()
        self._state = "closing"
        try:
            self._server.close()
            self._flush()
            wheel = self._wheel
            for conn in list(self._conns.values()):
                if conn.state == _OPEN:
                    self._end(conn, "shutdown")
                else:
                    self._finalize(conn)
                # flushing is bounded by this call's timeout (below), not close_timeout
                wheel.cancel(conn.fid.serial)
            self._finishing.clear()
            wait = self._close_timeout if timeout is None else timeout
            deadline = loop.time() + wait
            while self._closing and loop.time() < deadline:
                await asyncio.sleep(0.005)
            for conn in list(self._closing.values()):
                conn.state = _GONE
                conn.transport.abort()
            self._closing.clear()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            for _ in range(3):  # let connection_lost callbacks run
                await asyncio.sleep(0)
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._handshake_log.close()
            self._refusal_log.close()
            self._state = "closed"
            self._ended = True
            self._wake_all()
            self._shutdown_done.set_result(None)

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` has completed (queued events may remain)."""
        return self._state == "closed"

    # --- sending -----------------------------------------------------------------------

    def _conn_of(self, id: FlowId) -> _Conn:
        try:
            conn = self._conns.get(id.serial)
        except AttributeError:
            raise TypeError(f"expected a FlowId, got {type(id).__name__}") from None
        if conn is None or (conn.fid is not id and conn.fid != id):
            raise FlowClosed(f"connection {id} is closed or unknown")
        return conn

    def send(self, id: FlowId, data: bytes) -> None:
        """Frame ``data`` and queue it for connection ``id``; it is written at the end of
        this loop iteration, together with every other message sent to ``id``.

        Raises :class:`~tether.FlowClosed` if ``id`` is closed or unknown (a connection
        whose peer closed stays writable until its ``Closed`` event has been handed over
        and you come back for the next event), and ``LocalProtocolError`` if the framing
        cannot carry ``data``. Beyond ``max_write_buffer`` the slow-consumer policy
        applies: the connection is closed (``"slow consumer"``) or the message dropped.
        """
        try:
            conn = self._conns.get(id.serial)
        except AttributeError:
            raise TypeError(f"expected a FlowId, got {type(id).__name__}") from None
        if conn is None or (conn.fid is not id and conn.fid != id):
            if self._router is None or (id.worker == self._worker and id.node == self._name):
                raise FlowClosed(f"connection {id} is closed or unknown")
            self._router.send(id, self._encode(data), 1)  # held by another worker
            return
        # _queue(conn, frame, 1), inlined: this is the per-message hot path
        frame = self._encode(data)
        self._msgs_out += 1
        if conn.wblocked:
            self._blocked(conn)
            return
        pending = conn.pending
        if pending is None:
            conn.pending = frame
            conn.npending = len(frame)
            self._dirty.append(conn)
            if not self._flushing:
                self._flushing = True
                self._call_soon(self._flush)
            return
        n = conn.npending + len(frame)
        if n > self._wlimit:
            self._overflow(conn)
            return
        conn.npending = n
        if type(pending) is list:
            pending.append(frame)
        else:
            conn.pending = [pending, frame]  # type: ignore[list-item]

    def send_batch(self, id: FlowId, messages: Sequence[bytes]) -> None:
        """Frame every message of ``messages`` (at once) and queue them for ``id``, in
        order: ``send`` for many messages, at the cost of one. Same errors as
        :meth:`send`; the policy applies to the batch as a whole."""
        try:
            conn = self._conns.get(id.serial)
        except AttributeError:
            raise TypeError(f"expected a FlowId, got {type(id).__name__}") from None
        if conn is None or (conn.fid is not id and conn.fid != id):
            if self._router is None or (id.worker == self._worker and id.node == self._name):
                raise FlowClosed(f"connection {id} is closed or unknown")
            frame = self._encode_many(messages)
            if frame:
                self._router.send(id, frame, len(messages))
            return
        self._queue(conn, self._encode_many(messages), len(messages))

    def send_many(self, ids: Iterable[FlowId], data: bytes) -> None:
        """Send ``data`` to every connection of ``ids``, framing it once.

        Every open id is sent to; then, if some ids were closed or unknown,
        :class:`FlowsClosed` (a :class:`~tether.FlowClosed`) is raised naming them.
        """
        frame = self._encode(data)
        conns = self._conns
        dirty = self._dirty
        size = len(frame)
        limit = self._wlimit
        missing: list[FlowId] | None = None
        sent = 0
        for id in ids:
            try:
                conn = conns.get(id.serial)
            except AttributeError:
                raise TypeError(f"expected a FlowId, got {type(id).__name__}") from None
            if conn is None or (conn.fid is not id and conn.fid != id):
                if missing is None:
                    missing = []
                missing.append(id)
                continue
            sent += 1
            if conn.wblocked:
                self._blocked(conn)
                continue
            pending = conn.pending
            if pending is None:
                conn.pending = frame
                conn.npending = size
                dirty.append(conn)
                continue
            n = conn.npending + size
            if n > limit:
                self._overflow(conn)
                continue
            conn.npending = n
            if type(pending) is list:
                pending.append(frame)
            else:
                conn.pending = [pending, frame]  # type: ignore[list-item]
        self._msgs_out += sent
        if dirty and not self._flushing:
            self._flushing = True
            self._call_soon(self._flush)
        if missing and self._router is not None:  # one message per other worker
            missing = self._router.send_many(missing, frame)
        if missing:
            raise FlowsClosed(missing)

    def _send_encoded(self, id: FlowId, frame: bytes, count: int) -> None:
        """Queue an already framed ``frame`` (``count`` messages) for ``id``."""
        self._queue(self._conn_of(id), frame, count)

    def _deliver(self, serial: int, frame: bytes, count: int) -> bool:
        """Queue ``frame`` (``count`` messages, framed by another worker) for the
        connection ``serial`` of this hub; False if it is closed or unknown."""
        conn = self._conns.get(serial)
        if conn is None:
            return False
        self._queue(conn, frame, count)
        return True

    def _queue(self, conn: _Conn, frame: bytes, count: int) -> None:
        self._msgs_out += count
        if not frame:
            return
        if conn.wblocked:
            self._blocked(conn, count)
            return
        pending = conn.pending
        if pending is None:
            conn.pending = frame
            conn.npending = len(frame)
            self._dirty.append(conn)
            if not self._flushing:
                self._flushing = True
                self._call_soon(self._flush)
            return
        n = conn.npending + len(frame)
        if n > self._wlimit:
            self._overflow(conn, count)
            return
        conn.npending = n
        if type(pending) is list:
            pending.append(frame)
        else:
            conn.pending = [pending, frame]  # type: ignore[list-item]

    def _blocked(self, conn: _Conn, count: int = 1) -> None:
        """A message for ``conn`` while its transport is above its high-water mark."""
        if self._slow_drop:
            self._dropped += count
        else:
            self._end(conn, "slow consumer", abort=True)

    def _overflow(self, conn: _Conn, count: int = 1) -> None:
        """A message would take ``conn``'s pending bytes over ``max_write_buffer``."""
        if self._slow_drop:
            self._dropped += count
        else:
            self._end(conn, "slow consumer", abort=True)

    def _flush(self) -> None:
        """Write each dirty connection's pending messages with one write."""
        self._flushing = False
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        out = 0
        for conn in dirty:
            pending = conn.pending
            if pending is None:
                continue
            conn.pending = None
            if conn.state >= _CLOSING:
                continue
            buf = pending if isinstance(pending, bytes) else b"".join(pending)
            out += len(buf)
            conn.transport.write(buf)
            if conn.wblocked and not self._slow_drop:
                self._end(conn, "slow consumer", abort=True)
        self._bytes_out += out

    def close(self, id: FlowId) -> bool:
        """End connection ``id`` (reason ``"local"``) after writing what was sent to it.

        Returns False if it was already closed or is unknown (nothing happens then).
        Data it sent before is still delivered, before its ``Closed``.
        """
        try:
            conn = self._conn_of(id)
        except FlowClosed:
            if self._router is None:
                return False
            return self._router.close(id)  # held by another worker
        if conn.state == _LINGER:
            self._finalize(conn)
        else:
            self._end(conn, "local")
        return True

    def set_idle_timeout(self, id: FlowId, seconds: float | None) -> None:
        """Set the inactivity timeout of connection ``id`` (None: none), measured from
        the last data received from it. Raises :class:`~tether.FlowClosed` if ``id`` is
        closed or unknown."""
        try:
            conn = self._conn_of(id)
        except FlowClosed:
            if self._router is None:
                raise
            conn = None
        _check_idle_timeout(seconds)
        if conn is None:
            assert self._router is not None
            self._router.set_idle_timeout(id, seconds)  # held by another worker
            return
        if conn.state != _OPEN:
            return
        serial = id.serial
        if seconds is None:
            conn.timeout = None
            self._wheel.cancel(serial)
            return
        if conn.timeout is None:
            conn.last_rx = self._time()
        conn.timeout = seconds
        self._schedule(serial, conn.last_rx + seconds)

    def is_open(self, id: FlowId) -> bool:
        """Whether ``send`` to ``id`` would be accepted now."""
        try:
            self._conn_of(id)
        except FlowClosed:
            return False
        return True

    def __len__(self) -> int:
        """Connections open now."""
        return len(self._conns)

    def ids(self) -> list[FlowId]:
        """The ids of the connections open now."""
        return [conn.fid for conn in self._conns.values()]

    # --- receiving ---------------------------------------------------------------------

    def __aiter__(self) -> _Events:
        """``async for event in hub``: every event, in order per connection."""
        return _Events(self)

    @overload
    def batches(self, *, grouped: Literal[False] = False) -> _Batches[HubEvent]: ...

    @overload
    def batches(self, *, grouped: Literal[True]) -> _Batches[GroupedEvent]: ...

    def batches(self, *, grouped: bool = False) -> _Batches[Any]:
        """``async for events in hub.batches()``: every event queued at each wake-up, as a
        list, in order per connection (the opens, then the data, then the closes of the
        batch). With ``grouped=True`` the messages of one read come as one
        :class:`Messages` event instead of one :class:`Data` each: the fastest form."""
        return _Batches(self, grouped)

    async def _next_batch(self, grouped: bool, handoff: bool = True) -> list[Any] | None:
        while True:
            batch = self._take_batch(grouped, handoff)
            if batch:
                return batch
            if self._ended:
                return None
            await self._wait(self._w_any)

    def _take_batch(self, grouped: bool, handoff: bool = True) -> list[Any]:
        """Everything queued, in per-connection order. The consumer is done with the
        previous batch: lingering connections handed over before are closed now.
        With ``handoff=False`` (a relay such as the thread facade) the caller reports
        when each Closed reaches the application (:meth:`_linger_done`)."""
        if self._finishing and handoff:
            self._finish_lingering()
        data = self._data
        opens = self._opens
        closes = self._closes
        events: list[Any] = data
        if data:
            if self._dhead or self._dpos:
                del data[:self._dhead]
                self._dhead = 0
                if self._dpos:
                    head = data[0]
                    head.rx = head.rx[self._dpos:]  # type: ignore[index]
                    self._dpos = 0
            self._data = []
            self._taken = self._enq
            self._qbytes = 0
            if self._paused:
                self._resume()
            events = []
            append = events.append
            if grouped:
                seal = self._seal
                for conn in data:
                    event = _new(Messages)
                    _MSGS_ID(event, conn.fid)
                    _MSGS_MESSAGES(event, seal(conn.rx))  # type: ignore[arg-type]
                    conn.rx = None
                    append(event)
            else:
                for conn in data:
                    fid = conn.fid
                    for m in conn.rx:  # type: ignore[union-attr]
                        item = _new(Data)
                        _DATA_ID(item, fid)
                        _DATA_DATA(item, m)
                        append(item)
                    conn.rx = None
        if self._deferred:
            self._release(_RELEASE_ALL)
        if opens or closes:
            batch: list[Any] = [*opens, *events, *closes]
            opens.clear()
            if closes:
                if self._lingering and handoff:
                    self._handed(closes)
                closes.clear()
            return batch
        return events

    async def recv_open(self) -> Opened:
        """The next ``Opened`` (the source design's style; see :meth:`recv_data`)."""
        while True:
            if self._opens:
                return self._opens.popleft()
            if self._ended:
                raise HubClosed("the hub is closed")
            await self._wait(self._w_open)

    async def recv_data(self) -> Data:
        """The next ``Data`` of any connection.

        With the ``recv_*`` methods each kind has its own queue: a connection's
        ``Opened`` is queued before its data, and its ``Closed`` is delivered by
        :meth:`recv_close` only after all its data was taken here. Only data is
        subject to backpressure: ignoring opens or closes never stalls data.
        """
        while True:
            data = self._data
            head = self._dhead
            if head < len(data):
                conn = data[head]
                messages = conn.rx
                assert messages is not None
                pos = self._dpos
                message = messages[pos]
                pos += 1
                if pos == len(messages):
                    conn.rx = None
                    pos = 0
                    head += 1
                    self._taken += 1
                    if head == len(data):
                        data.clear()
                        head = 0
                    elif head >= 256 and head * 2 >= len(data):
                        del data[:head]
                        head = 0
                    deferred = self._deferred
                    if deferred and deferred[0][0] <= self._taken:
                        self._release(self._taken)
                self._dhead = head
                self._dpos = pos
                if data:  # (as counted: its bytes on the wire, framing included)
                    self._qbytes -= len(message) + self._msg_cost
                else:
                    self._qbytes = 0
                if self._paused and self._qbytes <= self._low:
                    self._resume()
                return _data(conn.fid, message)
            if self._ended:
                raise HubClosed("the hub is closed")
            await self._wait(self._w_data)

    async def recv_close(self) -> Closed:
        """The next ``Closed``, always after all the data of its connection was taken
        (after all the data queued before it, of any connection: one counter orders both
        queues).

        A connection whose peer closed stays writable until the next ``recv_close()``
        call after the one that returned its ``Closed``."""
        if self._finishing:
            self._finish_lingering()
        while True:
            if self._closes:
                event = self._closes.popleft()
                if self._lingering:
                    self._handed((event,))
                return event
            if self._ended and not self._deferred:  # a deferred one waits for its data
                raise HubClosed("the hub is closed")
            await self._wait(self._w_close)

    async def _wait(self, waiters: list[asyncio.Future[None]]) -> None:
        if self._pool is not None:
            raise RuntimeError("this hub supervises workers: its events go to the handler "
                               "in each worker process (see docs/workers.md)")
        fut: asyncio.Future[None] = self._loop.create_future()  # type: ignore[union-attr]
        waiters.append(fut)
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()
                with contextlib.suppress(ValueError):
                    waiters.remove(fut)

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        waiters.clear()

    def _wake_data(self) -> None:
        if self._w_data:
            self._wake(self._w_data)
        if self._w_any:
            self._wake(self._w_any)

    def _wake_all(self) -> None:
        for waiters in (self._w_any, self._w_open, self._w_data, self._w_close):
            self._wake(waiters)

    def _push_open(self, event: Opened) -> None:
        self._opens.append(event)
        if self._w_open:
            self._wake(self._w_open)
        if self._w_any:
            self._wake(self._w_any)

    def _push_close(self, event: Closed) -> None:
        """Queue ``event`` behind every data event queued so far."""
        if self._taken >= self._enq:
            self._closes.append(event)
            if self._w_close:
                self._wake(self._w_close)
        else:
            self._deferred.append((self._enq, event))
        if self._w_any:
            self._wake(self._w_any)

    def _release(self, taken: int) -> None:
        """Move the deferred closes whose data was all taken to the close queue."""
        deferred = self._deferred
        closes = self._closes
        if taken == _RELEASE_ALL:
            closes.extend(event for _, event in deferred)
            deferred.clear()
        else:
            while deferred and deferred[0][0] <= taken:
                closes.append(deferred.popleft()[1])
        if self._w_close:
            self._wake(self._w_close)

    # --- backpressure ------------------------------------------------------------------

    def _pause(self, conn: _Conn) -> None:
        conn.paused = True
        self._paused.append(conn)
        conn.transport.pause_reading()

    def _resume(self) -> None:
        paused = self._paused
        self._paused = []
        for conn in paused:
            if conn.paused:
                conn.paused = False
                if conn.state == _OPEN:
                    conn.transport.resume_reading()

    # --- connection life ---------------------------------------------------------------

    def _accepted(self, conn: _Conn, transport: asyncio.Transport) -> None:
        if self._state != "open":
            conn.state = _GONE
            transport.abort()
            return
        if len(self._opens) >= self._max_unseen:
            self._refuse(conn, transport, f"{len(self._opens)} Opened events not taken by "
                         f"the application (max_unseen_opens)")
            return
        limit = self._max_conns
        if limit is not None and len(self._conns) >= limit:
            self._over_limit += 1
            self._refuse(conn, transport, f"{len(self._conns)} connections open "
                         f"(max_connections {limit})")
            return
        conn.state = _OPEN
        serial = self._next_serial
        self._next_serial = serial + 1
        fid = FlowId(self._name, serial, self._worker)
        conn.fid = fid
        conn.decoder = self._framing.decoder()
        self._conns[serial] = conn
        transport.set_write_buffer_limits(high=self._wlimit)
        timeout = self._idle_timeout
        if timeout is not None:
            conn.timeout = timeout
            now = self._time()
            conn.last_rx = now
            self._schedule(serial, now + timeout)
        self._opened += 1
        self._push_open(Opened(fid, format_address(transport.get_extra_info("peername"))))
        if self._router is not None:
            self._router.opened(serial)

    def _refuse(self, conn: _Conn, transport: asyncio.Transport, why: str) -> None:
        """End a connection as it is accepted (a reset), for `why`: a line, or counted
        in the next second's (`FloodLog`)."""
        conn.state = _GONE
        reset_socket(transport)
        self._refused += 1
        self._refusal_log.event("hub %s: reset a new connection from %s: %s", self._name,
                                format_address(transport.get_extra_info("peername")), why)

    def _handshake_failed(self, peer: object, why: str) -> None:
        """A TLS handshake failed or timed out (:class:`~tether.aio.TLSServer`)."""
        self._handshakes_failed += 1
        self._handshake_log.event("hub %s: TLS handshake with %s failed: %s", self._name,
                                  format_address(peer), why)

    def _peer_eof(self, conn: _Conn) -> bool:
        """The peer closed its side: its data, then Closed("peer"); stay writable for
        replies until the Closed is handed over (not with TLS: no half-close there)."""
        if self._tls is not None:
            self._end(conn, "peer")
            return False
        conn.state = _LINGER
        serial = conn.fid.serial
        self._lingering[serial] = conn
        if conn.paused:
            conn.paused = False
        self._schedule(serial, self._time() + self._linger)
        self._ended_conn(conn, "peer")
        return True

    def _ended_conn(self, conn: _Conn, reason: str) -> None:
        """Count and queue the single Closed of ``conn``."""
        self._closed_by[reason] = self._closed_by.get(reason, 0) + 1
        if conn.decoder.buffered:
            self._incomplete += 1
        self._push_close(Closed(conn.fid, reason))
        if self._router is not None:
            self._router.ended(conn.fid.serial, reason)

    def _end(self, conn: _Conn, reason: str, *, abort: bool = False) -> None:
        """End an open connection now: queue its Closed, stop reading, write what is
        pending (unless ``abort``), close its transport."""
        serial = conn.fid.serial
        del self._conns[serial]
        conn.paused = False
        if conn.state == _LINGER:  # its Closed("peer") is queued already: not another
            self._lingering.pop(serial, None)
            log.info("hub %s: closing %s (its peer closed): %s", self._name, conn.fid, reason)
        else:
            self._ended_conn(conn, reason)
        pending = conn.pending
        conn.pending = None
        transport = conn.transport
        if abort:
            conn.state = _GONE
            self._wheel.cancel(serial)
            transport.abort()
            return
        if pending:
            transport.write(pending if isinstance(pending, bytes) else b"".join(pending))
        conn.state = _CLOSING
        self._closing[serial] = conn
        self._schedule(serial, self._time() + self._close_timeout)
        transport.close()

    def _handed(self, closes: Iterable[Closed]) -> None:
        """These Closed events were handed to the application: their lingering
        connections close when it comes back for more."""
        lingering = self._lingering
        for event in closes:
            serial = event.id.serial
            conn = lingering.get(serial)
            if conn is not None and conn.fid is event.id:  # not another worker's id
                del lingering[serial]
                self._finishing.append(conn)

    def _linger_done(self, id: FlowId) -> None:
        """The application took the Closed of ``id``: a lingering connection closes."""
        conn = self._lingering.pop(id.serial, None)
        if conn is not None and conn.state == _LINGER:
            self._finalize(conn)

    def _finish_lingering(self) -> None:
        finishing = self._finishing
        self._finishing = []
        for conn in finishing:
            if conn.state == _LINGER:
                self._finalize(conn)

    def _finalize(self, conn: _Conn) -> None:
        """Close a lingering connection (its Closed is already queued)."""
        serial = conn.fid.serial
        self._conns.pop(serial, None)
        self._lingering.pop(serial, None)
        pending = conn.pending
        conn.pending = None
        transport = conn.transport
        if pending:
            transport.write(pending if isinstance(pending, bytes) else b"".join(pending))
        conn.state = _CLOSING
        self._closing[serial] = conn
        self._schedule(serial, self._time() + self._close_timeout)
        transport.close()

    def _too_large(self, conn: _Conn, exc: MessageTooLarge, nbytes: int) -> None:
        self._bytes_in += nbytes
        nbytes += conn.carry
        conn.carry = 0
        log.info("hub %s: closing %s: %s", self._name, conn.fid, exc)
        if exc.messages:
            n = len(exc.messages)
            if conn.rx is None:
                conn.rx = exc.messages
                self._data.append(conn)
                self._enq += 1
            else:
                conn.rx += exc.messages
            self._msgs_in += n
            self._qbytes += nbytes + n * _MSG_OVERHEAD
            self._wake_data()
        self._end(conn, "error: message too large")

    def _lost(self, conn: _Conn, exc: Exception | None) -> None:
        state = conn.state
        if state == _GONE:
            return
        conn.state = _GONE
        conn.pending = None
        serial = conn.fid.serial
        self._wheel.cancel(serial)
        if state == _OPEN:
            del self._conns[serial]
            conn.paused = False
            self._ended_conn(conn, _reason_of(exc))
        elif state == _LINGER:
            self._conns.pop(serial, None)
            self._lingering.pop(serial, None)
        else:
            self._closing.pop(serial, None)

    # --- timers ------------------------------------------------------------------------

    def _schedule(self, serial: int, deadline: float) -> None:
        self._wheel.schedule(serial, deadline)
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is None or self._loop is None:
            return
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._time()
        wheel = self._wheel
        conns = self._conns
        for serial in wheel.expire(now):
            conn = conns.get(serial)
            if conn is not None:
                if conn.state == _LINGER:
                    self._finalize(conn)
                    continue
                timeout = conn.timeout
                if timeout is None:
                    continue
                due = conn.last_rx + timeout
                if conn.paused:  # not read because of backpressure: not idle
                    wheel.schedule(serial, now + timeout)
                elif now >= due:
                    log.debug("hub %s: %s idle for %.3f s", self._name, conn.fid, timeout)
                    self._end(conn, "idle")
                else:
                    wheel.schedule(serial, due)
                continue
            closing = self._closing.pop(serial, None)
            if closing is not None:
                closing.state = _GONE
                closing.transport.abort()
        deadline = wheel.next_deadline()
        if deadline is not None and (self._timer is None or deadline < self._timer_at):
            self._arm(deadline)

    def _queued_messages(self) -> int:
        data = self._data
        return sum(len(data[i].rx or ()) for i in range(self._dhead, len(data))) - self._dpos

    # --- stats -------------------------------------------------------------------------

    def stats(self) -> HubStats:
        """Counters: connections, bytes and messages in and out, queue depth, pauses.

        With ``workers``: the sum over every worker, dead ones included (their open
        connections counted as closed ``"down"``); connection counts are live, the
        other counters as of each worker's last report (see docs/workers.md)."""
        if self._pool is not None:
            return self._pool.hub_stats()
        return HubStats(
            open=len(self._conns),
            opened=self._opened,
            closed=dict(self._closed_by),
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            messages_in=self._msgs_in,
            messages_out=self._msgs_out,
            queued=len(self._opens) + self._queued_messages() + len(self._closes)
            + len(self._deferred),
            queued_bytes=self._qbytes,
            paused=sum(1 for conn in self._paused if conn.paused),
            dropped=self._dropped,
            incomplete=self._incomplete,
            handshakes_failed=self._handshakes_failed,
            refused=self._refused,
            over_limit=self._over_limit,
        )


def _no_clock() -> float:
    raise RuntimeError("the hub is not started")


class _Events:
    """The iterator of ``async for event in hub``: one event at a time, from batches."""

    __slots__ = ("_batch", "_hub", "_i")

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._batch: list[HubEvent] = []
        self._i = 0

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> HubEvent:
        i = self._i
        batch = self._batch
        if i < len(batch):
            self._i = i + 1
            return batch[i]
        got = await self._hub._next_batch(False)
        if got is None:
            raise StopAsyncIteration
        self._batch = got
        self._i = 1
        return cast(HubEvent, got[0])


class _Batches(Generic[E]):
    """The iterator of ``async for events in hub.batches()``."""

    __slots__ = ("_grouped", "_hub")

    def __init__(self, hub: Hub, grouped: bool) -> None:
        self._hub = hub
        self._grouped = grouped

    def __aiter__(self) -> _Batches[E]:
        return self

    async def __anext__(self) -> list[E]:
        got = await self._hub._next_batch(self._grouped)
        if got is None:
            raise StopAsyncIteration
        return got
