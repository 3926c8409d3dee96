"""tether.mesh — named nodes that message each other (the connection manager's job).

::

    mesh = tether.Mesh("server1", listen="127.0.0.1:7001",
                       peers={"server2": "127.0.0.1:7002"}, servers={"server1", "server2"})
    await mesh.start()
    await mesh.send("server2", b"...", kind=1)
    mesh.broadcast(b"...", kind=1)            # also server_broadcast, custom_broadcast
    async for message in mesh.messages(): ... # Message(remote, kind, body)
    async for failure in mesh.failures(): ... # Failure(remote, reason, undelivered)

**Delivery.** Per ordered pair of nodes, every message `send` accepts is delivered to
the receiving application once and in send order, across lost links and reconnects,
or it is returned in a `Failure`: when the peer stays unreachable for
`establish_timeout` (the very first connection attempt included), when the mesh
closes, or when the peer *restarted* before acknowledging messages it may have
received (those are counted in `Failure.unconfirmed`: the dead process may have
delivered some of them; tether never re-sends them blindly). Nothing is dropped
silently. A call that raises (`QueueFull`, `FailuresNotTaken`, ...) accepted nothing.
Memory is bounded per peer by `queue_bytes`, whether or not the application reads its
failure reports, and whatever the peer sends. `docs/mesh.md` has the whole contract
and its one limitation.

**How.** One link (`tether.link` over `tether.aio`) per pair of nodes, dialled on
demand by whichever side has something to send; when both dial at once, the node
whose name sorts first (the *leader* of the pair) keeps the newest link and closes
the other. On each new link the two nodes exchange SESSION control messages (their
incarnation, what they have received and consumed, and their receive window), after
which the sender re-sends what is missing, with never more in flight than the window;
messages carry sequence numbers, the receiver drops duplicates, and acknowledges
(cumulatively, once per loop turn) what its application has consumed. The sequencing
arithmetic is `tether.meshstate`, without I/O. A silent peer is found by the link
heartbeat within `liveness` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, Literal

from . import wire
from .aio import (
    LinkConnection,
    RefusedAtAccept,
    SocketOptions,
    format_address,
    listening_port,
    parse_address,
    spawn_owned,
)
from .backoff import retry_delay
from .errors import (
    ErrorCode,
    HandshakeError,
    LocalProtocolError,
    PeerUnreachable,
    RemoteProtocolError,
    TetherError,
)
from .events import (
    AckReceived,
    Event,
    FlowOpenRequested,
    GoAwayReceived,
    HandshakeCompleted,
    LinkTerminated,
    MessageReceived,
    StreamProtocolError,
)
from .fdlimit import resolve_limit
from .floodlog import FloodLog
from .link import LinkConfig, Role
from .meshstate import (
    KIND_CLOSING,
    KIND_SESSION,
    MESSAGE_OVERHEAD,
    ClosingInfo,
    Entry,
    Inbox,
    Outbox,
    SessionInfo,
)

__all__ = [
    "KIND_CLOSING",
    "KIND_SESSION",
    "Failure",
    "FailuresNotTaken",
    "Mesh",
    "Message",
    "PeerInfo",
    "PeerState",
    "QueueFull",
]

log = logging.getLogger("tether.mesh")

MAX_KIND: Final = wire.CONTROL_KIND_BASE - 1
# A link is written as soon as this many bytes of messages wait for it (else once per
# loop turn), and `send` lets the loop run at that point: the receiver works while the
# sender produces, and a sender in a tight loop does not starve the loop.
_FLUSH_BYTES: Final = 64 * 1024
_BAD_INPUT: Final = frozenset({ErrorCode.PROTOCOL_ERROR, ErrorCode.FRAME_TOO_LARGE,
                               ErrorCode.BAD_TOKEN, ErrorCode.VERSION_MISMATCH,
                               ErrorCode.HANDSHAKE_FAILED})
_QUIET_ENDS: Final = frozenset({ErrorCode.NO_ERROR, ErrorCode.SHUTDOWN})
_PEER_COUNTERS: Final = ("connects", "disconnects", "connect_errors", "sent", "received",
                         "retransmits", "duplicates", "failures", "failure_reports",
                         "refused_sends", "refused_sessions")


@dataclass(frozen=True, slots=True)
class Message:
    """A mesh message. `remote` is the other node: the sender of a received message,
    the destination of an undelivered one. `kind` is the application's (0..0xFEFF)."""

    remote: str
    kind: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Failure:
    """Messages the mesh gives back, whole, with the reason.

    `undelivered` holds them in send order. The first `unconfirmed` of them were
    transmitted to `remote` and never acknowledged before the mesh gave up on them --
    its incarnation ended (crashed, was killed), it could not be reached again within
    `establish_timeout`, it was removed (`remove_peer`), or this node closed: its
    application *may* have received some of them (a removed peer that still runs
    often has). The rest were certainly not delivered.
    """

    remote: str
    reason: str
    undelivered: list[Message]
    unconfirmed: int = 0


class PeerState(Enum):
    """Where the mesh stands with one peer."""

    IDLE = "idle"  # never contacted, nothing to send
    CONNECTING = "connecting"  # dialling, or setting up a session on a new link
    UP = "up"  # a session is established: messages flow
    DOWN = "down"  # was up (or could not be reached), no link now


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerInfo:
    """A snapshot of one peer, from `Mesh.peers()`.

    `down_since` is a wall-clock time (`time.time()`), None while up or never
    contacted. `queued` counts the messages not yet acknowledged (sent or not),
    `queued_bytes` their cost against the queue bound. `failed_bytes` is the cost of
    the messages to the peer in failure reports the application has not taken yet,
    `unread_bytes` that of the messages received from it and not yet taken (both
    bounded by `queue_bytes`, see `Mesh`). `incarnation` is the peer's current run as
    last seen (None before the first session). `counters`: connects, disconnects,
    connect_errors, sent, received, retransmits, duplicates, failures (messages),
    failure_reports, refused_sends (messages refused by `FailuresNotTaken`),
    refused_sessions (a new incarnation of the peer refused while too many messages
    of its previous ones are unread).
    """

    name: str
    address: str
    state: PeerState
    down_since: float | None
    queued: int
    queued_bytes: int
    incarnation: int | None
    last_error: str | None
    failed_bytes: int = 0
    unread_bytes: int = 0
    counters: dict[str, int] = field(default_factory=dict)


class QueueFull(TetherError):
    """The outgoing queue to a peer is full (`send(..., nowait=True)`)."""

    code = ErrorCode.REFUSED


class FailuresNotTaken(QueueFull):
    """A message was refused, not queued: the failure reports for one of its
    destinations that the application has not taken from `Mesh.failures()` hold more
    than `queue_bytes`. Take them, and send again.

    Raised by `send` (also when waiting for room) and by the broadcasts (which then
    queue the message for no one). The message was never accepted: the application
    still has it, and no report will name it."""


class _Peer:
    """Everything the mesh knows about one peer."""

    __slots__ = ("address", "change_waiters", "counters", "dialer", "down_since", "flaps",
                 "host", "inbox", "last_error", "link", "link_max", "name", "outbox",
                 "pending", "port", "removed", "space_waiters", "stale_bytes",
                 "stalled_since", "timer", "unflushed", "up", "up_since", "written")

    def __init__(self, name: str, address: str, queue_bytes: int) -> None:
        self.name = name
        self.address = address
        self.host, self.port = parse_address(address)
        self.outbox = Outbox(queue_bytes)
        self.inbox = Inbox(queue_bytes)
        # received from earlier incarnations of the peer, not yet taken by the app (the
        # current one's are `inbox.held`)
        self.stale_bytes = 0
        self.link: LinkConnection | None = None  # the link the session lives on
        self.up = False  # SESSIONs exchanged on `link`
        self.link_max = 0  # the largest body `link` carries
        self.up_since = 0.0  # loop time
        self.flaps = 0  # sessions in a row that lasted less than retry_interval
        self.pending: set[LinkConnection] = set()  # follower: waiting for the leader's SESSION
        self.dialer: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None  # establish_timeout
        self.stalled_since: float | None = None
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.space_waiters: deque[asyncio.Future[None]] = deque()
        self.change_waiters: list[asyncio.Future[None]] = []
        self.counters = dict.fromkeys(_PEER_COUNTERS, 0)
        self.removed = False
        self.unflushed = 0  # bytes of messages given to `link` since it was last written
        # the link `send` last wrote a batch of messages to: the next send waits for its
        # socket's write buffer to drain (backpressure) before it accepts its message
        self.written: LinkConnection | None = None

    @property
    def unread_bytes(self) -> int:
        """Messages received from the peer (any incarnation), not yet taken."""
        return self.inbox.held + self.stale_bytes

    @property
    def state(self) -> PeerState:
        if self.up:
            return PeerState.UP
        if self.dialer is not None or self.link is not None or self.pending:
            return PeerState.CONNECTING
        return PeerState.DOWN if self.down_since is not None else PeerState.IDLE

    def wake_change(self) -> None:
        waiters, self.change_waiters = self.change_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def wake_space(self) -> None:
        while self.space_waiters:
            w = self.space_waiters.popleft()
            if not w.done():
                w.set_result(None)


class _Dialled:
    """The handler of a link this node dialled: it knows whom it meant to reach."""

    __slots__ = ("mesh", "peer")

    def __init__(self, mesh: Mesh, peer: _Peer) -> None:
        self.mesh = mesh
        self.peer = peer

    def link_event(self, conn: LinkConnection, event: Event) -> None:
        self.mesh._on_event(conn, event, self.peer)


class Mesh:
    """A named node of a mesh. See the module docstring and `docs/mesh.md`.

    `peers` maps node names to "host:port" (this node's own name is ignored there);
    `servers` names the nodes `server_broadcast` reaches. Times are in seconds:
    `retry_interval` bounds the backoff between connection attempts,
    `establish_timeout` is how long a peer may stay unreachable while messages wait
    for it before they are failed, `liveness` how soon a silent peer is declared
    down. `token` is the shared secret every node presents and requires. `tls` is
    the client context used to dial, `server_tls` the server context to listen with.
    `queue_bytes` bounds, per peer, the outgoing queue (a message costs its body plus
    64 bytes), the failure reports not taken (beyond it, sends to the peer raise
    `FailuresNotTaken`) and the messages received and not taken (the receive window
    announced to the peer); `max_message` bounds a body.
    """

    def __init__(self, name: str, listen: str | None = None,
                 peers: Mapping[str, str] | None = None, servers: Iterable[str] = (), *,
                 retry_interval: float = 1.0, establish_timeout: float = 10.0,
                 liveness: float = 5.0, token: bytes | str = b"",
                 tls: ssl.SSLContext | None = None, server_tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, queue_bytes: int = 4 * 1024 * 1024,
                 max_message: int = wire.DEFAULT_MAX_PAYLOAD,
                 sockopts: SocketOptions | None = None,
                 max_links: int | Literal["default"] | None = "default") -> None:
        if not name or len(name.encode()) > 255:
            raise ValueError(f"node name {name!r} must be 1 to 255 bytes")
        if retry_interval <= 0 or establish_timeout <= 0 or liveness <= 0:
            raise ValueError("retry_interval, establish_timeout and liveness must be > 0")
        if not 1024 <= max_message <= wire.HARD_MAX_PAYLOAD:
            raise ValueError(f"max_message {max_message} must lie in "
                             f"[1024, {wire.HARD_MAX_PAYLOAD}]")
        if queue_bytes < max_message + MESSAGE_OVERHEAD:
            raise ValueError(f"queue_bytes {queue_bytes} must hold at least one message of "
                             f"max_message {max_message} bytes (+{MESSAGE_OVERHEAD})")
        self.name = name
        self.listen = listen
        self.servers = frozenset(servers)
        self.retry_interval = retry_interval
        self.establish_timeout = establish_timeout
        self.liveness = liveness
        self.token = token.encode() if isinstance(token, str) else token
        self.tls = tls
        self.server_tls = server_tls
        self.server_hostname = server_hostname
        self.queue_bytes = queue_bytes
        self.max_message = max_message
        self.sockopts = sockopts
        self.max_links = resolve_limit(max_links, "max_links")
        # This run of the process: lets peers tell a restart from a reconnect.
        self.incarnation = secrets.randbits(64) or 1
        self._peers: dict[str, _Peer] = {}
        # Sequencing state of removed peers, by name: a peer added again under the same
        # name continues both numberings (the other node still remembers them).
        self._retired: dict[str, tuple[Inbox, int, int]] = {}
        for peer_name, address in (peers or {}).items():
            if peer_name != name:
                self._add(peer_name, address)
        self._handshake_timeout = min(max(liveness, 0.05), 10.0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[LinkConnection] = set()  # every live link, identified or not
        self._conn_peer: dict[LinkConnection, _Peer] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inbox: deque[tuple[_Peer, int, int, Message]] = deque()
        self._msg_waiters: list[asyncio.Future[None]] = []
        self._failures: deque[tuple[Failure, int]] = deque()  # (report, its cost)
        self._failure_waiters: list[asyncio.Future[None]] = []
        # Peer name -> the cost of its messages in reports not taken yet (0: absent).
        self._failed_bytes: dict[str, int] = {}
        # (peer, kind of line) -> its lines (`_flood_log`)
        self._floods: dict[tuple[str, str], FloodLog] = {}
        self._refusing: set[RefusedAtAccept] = set()  # told why they are refused
        # The peer of the message the application took last, until it asks for the next
        # one (there is never more than one such message: every take commits the last).
        self._taken_from: _Peer | None = None
        self._ack_dirty: set[_Peer] = set()
        self._dirty_conns: set[LinkConnection] = set()
        self._flush_handle: asyncio.Handle | None = None
        self._stopping = False  # aclose() called: no new sends
        self._closer: asyncio.Future[None] | None = None  # aclose()'s shutdown
        self._drain_cut = False  # aclose() was cancelled: drain no longer
        self._closing = False  # past the drain: links are being closed
        self._closed = False
        self.counters: dict[str, int] = dict.fromkeys(
            ("links_accepted", "links_dialled", "refused", "protocol_errors",
             "session_timeouts", "links_over_limit"), 0)
        # links past HELLO whose session is not up yet: the deadline of their SESSION
        self._session_deadlines: dict[LinkConnection, asyncio.TimerHandle] = {}

    def __repr__(self) -> str:
        return f"<Mesh {self.name} peers={sorted(self._peers)}>"

    # lifecycle ------------------------------------------------------------------------

    def _link_config(self, *, server: bool) -> LinkConfig:
        return LinkConfig(name=self.name, token=b"" if server else self.token,
                          expected_token=(self.token or None) if server else None,
                          max_payload=self.max_message,
                          heartbeat_interval=self.liveness / 4,
                          link_timeout=self.liveness * 0.9,
                          handshake_timeout=self._handshake_timeout)

    async def start(self) -> None:
        """Start listening (with `listen`). Links are dialled when there is something to
        send."""
        if self._loop is not None:
            raise LocalProtocolError(f"mesh {self.name} already started")
        self._loop = asyncio.get_running_loop()
        if self.listen is not None:
            host, port = parse_address(self.listen)
            self._server = await self._loop.create_server(self._accepted, host, port,
                                                          backlog=1024)
            log.info("mesh %s: listening on %s (incarnation %016x)", self.name,
                     format_address((host, self.port)), self.incarnation)

    def _accepted(self) -> asyncio.Protocol:
        if self.max_links is not None and len(self._conns) >= self.max_links:
            return RefusedAtAccept(
                self._link_over_limit, None if self.server_tls is not None else
                f"mesh {self.name} is at its limit of {self.max_links} link(s)", self._refusing)
        conn = LinkConnection(Role.SERVER, self._link_config(server=True), self,
                              self.sockopts, server_tls=self.server_tls)
        self._conns.add(conn)
        return conn

    def _link_over_limit(self, peer: str) -> None:
        """A connection beyond `max_links` (links dialled and accepted) was refused as it
        was accepted (see `tether.fdlimit`, `RefusedAtAccept`)."""
        self.counters["links_over_limit"] += 1
        self._flood_log("", "over_limit").event(
            "mesh %s: link from %s refused: %d link(s) open, at the limit (max_links %s)",
            self.name, peer, len(self._conns), self.max_links)

    @property
    def port(self) -> int:
        """The port this node listens on."""
        if self._server is None:
            raise LocalProtocolError(f"mesh {self.name} does not listen")
        return listening_port(self._server)

    async def aclose(self, drain: float = 0.0) -> None:
        """Shut down. With `drain`, first wait up to that many seconds for every queued
        message to be acknowledged. Each peer with a session is told (CLOSING) exactly
        which of its messages this node consumed; messages still queued here are
        returned in `Failure`s (reason "shutdown: ..."), which `failures()` still yields.
        `messages()` ends; messages received and not yet taken are discarded (their
        senders know they were not delivered).

        Cancelled (or timed out), it ends the drain at once and the shutdown completes
        all the same (in the background; a later `aclose` waits for it). A second call
        waits for the first one's shutdown."""
        if self._closer is None:
            self._stopping = True
            if self._server is not None:
                self._server.close()
            self._closer = asyncio.ensure_future(self._shutdown(drain))
        try:
            await asyncio.shield(self._closer)
        except asyncio.CancelledError:
            self._drain_cut = True  # the shutdown goes on without waiting any longer
            raise

    async def _shutdown(self, drain: float) -> None:
        if drain > 0 and self._loop is not None:
            deadline = self._loop.time() + drain
            while not self._drain_cut and any(p.outbox for p in self._peers.values()) \
                    and self._loop.time() < deadline:
                await asyncio.sleep(0.01)
        self._closing = True
        _wake(self._msg_waiters)  # messages() ends
        self._commit()
        self._send_acks()
        for peer in self._peers.values():
            conn = peer.link
            if peer.up and conn is not None and not conn.link.is_closed:
                info = ClosingInfo(self.incarnation, peer.inbox.incarnation,
                                   peer.inbox.consumed)
                conn.link.send_message(KIND_CLOSING, 0, info.encode(), conn.now)
                conn.flush()
            self._cancel_timer(peer)
            if peer.outbox:
                self._fail_all(peer, f"shutdown: mesh {self.name} closed before {peer.name} "
                                     "acknowledged")
        self._inbox.clear()
        for handle in self._session_deadlines.values():
            handle.cancel()
        self._session_deadlines.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(c.aclose("shutdown") for c in list(self._conns)))
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._closed = True
        for peer in self._peers.values():
            peer.wake_space()
            peer.wake_change()
        _wake(self._msg_waiters)
        _wake(self._failure_waiters)
        for flood in self._floods.values():
            flood.close()  # (what was counted and not yet said)
        log.info("mesh %s: closed", self.name)

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # peers ----------------------------------------------------------------------------

    def _add(self, name: str, address: str) -> _Peer:
        if not name or len(name.encode()) > 255:
            raise ValueError(f"node name {name!r} must be 1 to 255 bytes")
        peer = _Peer(name, address, self.queue_bytes)
        retired = self._retired.pop(name, None)
        if retired is not None:
            peer.inbox, peer.outbox.next_seq, peer.outbox.peer_incarnation = retired
            # (the peer may hold any of them: its SESSION may name them)
            peer.outbox.sent_high = peer.outbox.next_seq - 1
        self._peers[name] = peer
        return peer

    def add_peer(self, name: str, address: str) -> None:
        """Add a peer, or change the address of a known one (used from the next dial)."""
        if name == self.name:
            raise ValueError(f"{name!r} is this node's own name")
        peer = self._peers.get(name)
        if peer is None:
            self._add(name, address)
            log.info("mesh %s: added peer %s at %s", self.name, name, address)
        else:
            peer.host, peer.port = parse_address(address)
            peer.address = address

    def remove_peer(self, name: str) -> None:
        """Forget a peer: its queued messages are failed ("peer removed"), its link closed."""
        peer = self._peers.pop(name, None)
        if peer is None:
            raise PeerUnreachable(f"{name!r} is not a peer of mesh {self.name}")
        peer.removed = True
        self._cancel_timer(peer)
        if peer.outbox:
            self._fail_all(peer, f"peer {name} removed")
        # Its messages not yet handed out are not consumed: drop them here (the sender
        # still holds them, and re-sends them if the peer is added again).
        if self._taken_from is peer:
            self._commit()
        if any(entry[0] is peer for entry in self._inbox):
            self._inbox = deque(e for e in self._inbox if e[0] is not peer)
        peer.inbox.drop_unread()
        peer.stale_bytes = 0
        self._retired[name] = (peer.inbox, peer.outbox.next_seq, peer.outbox.peer_incarnation)
        if peer.dialer is not None:
            peer.dialer.cancel()
        for conn in [peer.link, *peer.pending]:
            if conn is not None:
                conn.close("peer removed", ErrorCode.SHUTDOWN)
        peer.wake_space()
        peer.wake_change()
        log.info("mesh %s: removed peer %s", self.name, name)

    def peers(self) -> dict[str, PeerInfo]:
        """Each peer's state now, by name."""
        return {name: PeerInfo(name=name, address=p.address, state=p.state,
                               down_since=p.down_since, queued=len(p.outbox),
                               queued_bytes=p.outbox.bytes,
                               incarnation=p.inbox.incarnation or None,
                               last_error=p.last_error,
                               failed_bytes=self._failed_bytes.get(name, 0),
                               unread_bytes=p.unread_bytes,
                               counters=dict(p.counters))
                for name, p in self._peers.items()}

    def stats(self) -> dict[str, Any]:
        """Counters and per-peer state, JSON-friendly."""
        return {"name": self.name, "incarnation": self.incarnation,
                "links": len(self._conn_peer), **self.counters,
                "peers": {name: {"state": i.state.value, "down_since": i.down_since,
                                 "queued": i.queued, "queued_bytes": i.queued_bytes,
                                 "failed_bytes": i.failed_bytes,
                                 "unread_bytes": i.unread_bytes,
                                 "last_error": i.last_error, **i.counters}
                          for name, i in self.peers().items()}}

    # sending --------------------------------------------------------------------------

    def _target(self, remote: str) -> _Peer:
        if self._loop is None:
            raise LocalProtocolError(f"mesh {self.name} is not started")
        if self._stopping:
            raise LocalProtocolError(f"mesh {self.name} is closed")
        peer = self._peers.get(remote)
        if peer is None:
            what = "this node itself" if remote == self.name else "not a peer"
            raise PeerUnreachable(f"{remote!r} is {what} of mesh {self.name}")
        return peer

    def _check(self, body: bytes | bytearray | memoryview, kind: int) -> bytes:
        if not 0 <= kind <= MAX_KIND:
            raise ValueError(f"message kind {kind:#x} out of range: applications use "
                             f"0..{MAX_KIND:#x} (kinds from {wire.CONTROL_KIND_BASE:#x} "
                             "are tether's own)")
        data = bytes(body)
        if len(data) > self.max_message:
            raise ValueError(f"message body of {len(data)} bytes exceeds max_message "
                             f"{self.max_message}")
        return data

    async def send(self, remote: str, body: bytes | bytearray | memoryview, kind: int = 0,
                   *, nowait: bool = False) -> None:
        """Queue `body` for `remote`; it is delivered once, in order, or returned in a
        `Failure`. Raises `PeerUnreachable` at once if `remote` is not a peer. When the
        peer's queue is full, waits for room, or raises `QueueFull` with `nowait`.
        Raises `FailuresNotTaken` (queuing nothing) while the failure reports for
        `remote` not taken from `failures()` hold more than `queue_bytes`."""
        peer = self._target(remote)
        data = self._check(body, kind)
        written = peer.written
        if written is not None:
            # The last send wrote a batch to the link: honour the socket's backpressure
            # and let the loop run (ACKs, other tasks), before accepting this message: a
            # send cancelled while it waits has accepted nothing.
            await written.drain()
            await asyncio.sleep(0)
            if peer.written is written:
                peer.written = None
            peer = self._target(remote)  # (closed or removed meanwhile: raises)
        cost = len(data) + MESSAGE_OVERHEAD
        if self._failed_bytes:
            self._refuse_if_reports_pile_up([peer])
        while not peer.outbox.fits(cost):
            if nowait:
                raise QueueFull(f"outgoing queue to {remote} is full ({peer.outbox.bytes} of "
                                f"{peer.outbox.limit} bytes)")
            assert self._loop is not None
            waiter: asyncio.Future[None] = self._loop.create_future()
            peer.space_waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    peer.space_waiters.remove(waiter)
            if self._stopping:
                raise LocalProtocolError(f"mesh {self.name} closed while waiting to send")
            if peer.removed:
                raise PeerUnreachable(f"peer {remote} was removed while waiting to send")
            if self._failed_bytes:
                self._refuse_if_reports_pile_up([peer])
        written = self._enqueue(peer, kind, data)
        if written is not None:  # a batch went out: the next send waits for the socket
            peer.written = written

    def broadcast(self, body: bytes | bytearray | memoryview, kind: int = 0) -> list[str]:
        """Queue `body` for every peer. See `custom_broadcast`."""
        return self._multicast(list(self._peers), body, kind)

    def server_broadcast(self, body: bytes | bytearray | memoryview,
                         kind: int = 0) -> list[str]:
        """Queue `body` for every peer named in `servers`. See `custom_broadcast`."""
        return self._multicast([n for n in self._peers if n in self.servers], body, kind)

    def custom_broadcast(self, names: Iterable[str], body: bytes | bytearray | memoryview,
                         kind: int = 0) -> list[str]:
        """Queue `body` for each of `names` (raises `PeerUnreachable`, queuing nothing, if
        one is not a peer). Does not wait: a peer whose queue is full gets the message
        back at once in a `Failure` ("outgoing queue full"). Returns the names it was
        queued for. Raises `FailuresNotTaken`, queuing nothing, while the failure
        reports not taken from `failures()` for one of `names` hold more than
        `queue_bytes`."""
        return self._multicast(list(dict.fromkeys(names)), body, kind)

    def _multicast(self, names: list[str], body: bytes | bytearray | memoryview,
                   kind: int) -> list[str]:
        peers = [self._target(n) for n in names]
        data = self._check(body, kind)
        cost = len(data) + MESSAGE_OVERHEAD
        if self._failed_bytes:
            self._refuse_if_reports_pile_up(peers)
        queued = []
        for peer in peers:
            if peer.outbox.fits(cost):
                self._enqueue(peer, kind, data)
                queued.append(peer.name)
            else:
                self._report(peer, [Message(peer.name, kind, data)],
                             f"outgoing queue full ({peer.outbox.bytes} of "
                             f"{peer.outbox.limit} bytes)", 0, quiet="queue full")
        return queued

    def _refuse_if_reports_pile_up(self, peers: list[_Peer]) -> None:
        """Refuse a message (`FailuresNotTaken`) if the reports not taken for one of
        its destinations hold more than `queue_bytes`: the mesh does not accept what it
        could neither deliver nor hand back within its bounds."""
        over = [p for p in peers if self._failed_bytes.get(p.name, 0) > self.queue_bytes]
        if not over:
            return
        for peer in over:
            peer.counters["refused_sends"] += 1
            self._flood_log(peer.name, "refused").event(
                "mesh %s: refused a message to %s: %d bytes of its failure reports not "
                "taken from failures()", self.name, peer.name, self._failed_bytes[peer.name])
        first = over[0]
        raise FailuresNotTaken(
            f"mesh {self.name} refused the message: the failure reports for {first.name} "
            f"not taken from failures() hold {self._failed_bytes[first.name]} bytes, more "
            f"than queue_bytes {self.queue_bytes}; take them, then send again")

    def _flood_log(self, name: str, what: str) -> FloodLog:
        """The lines of one kind of event (`what`) about one peer (`name`, or "" for the
        node), which may come once per message or connection: one a second, and the
        count of the rest (`FloodLog`)."""
        flood = self._floods.get((name, what))
        if flood is None:
            flood = self._floods[(name, what)] = FloodLog(
                log, f"mesh {self.name}: %d more like it within 1s; the last: %s",
                with_last=True)
        return flood

    def _enqueue(self, peer: _Peer, kind: int, data: bytes) -> LinkConnection | None:
        """Queue a message, and transmit it if a session is up. Returns the link if it
        was just written (a batch of `_FLUSH_BYTES` was reached)."""
        outbox = peer.outbox
        peer.counters["sent"] += 1
        conn = peer.link
        if peer.up and conn is not None:
            if len(data) <= peer.link_max:
                entry = outbox.push_transmitted(kind, data)
                if entry is not None:  # else it waits for ACKs to open the window
                    conn.link.send_message(kind, entry.seq, data, conn.now)
            else:
                outbox.push(kind, data)
                self._transmit_window(peer, conn)  # (reports it, in its turn)
            peer.unflushed += len(data) + MESSAGE_OVERHEAD
            if peer.unflushed >= _FLUSH_BYTES:
                peer.unflushed = 0
                conn.flush()
                return conn
            self._dirty_conns.add(conn)
            self._schedule_flush()
        else:
            outbox.push(kind, data)
            self._stall(peer)
            self._ensure_dialing(peer)
        return None

    def _transmit(self, peer: _Peer, conn: LinkConnection, entry: Entry) -> None:
        """Write `entry`, which the outbox counts as transmitted already (or fail it,
        if it is larger than the peer accepts)."""
        link = conn.link
        if len(entry.body) > link.max_payload:  # the peer accepts less than max_message
            peer.outbox.remove(entry)
            self._report(peer, [Message(peer.name, entry.kind, entry.body)],
                         f"message body of {len(entry.body)} bytes exceeds the maximum "
                         f"payload {link.max_payload} of the link to {peer.name}", 0,
                         quiet="too large")
            return
        link.send_message(entry.kind, entry.seq, entry.body, conn.now)

    def _transmit_window(self, peer: _Peer, conn: LinkConnection) -> bool:
        """Transmit the waiting messages the peer's receive window has room for.
        Returns whether any was."""
        outbox = peer.outbox
        before = outbox.retransmits
        sent = False
        while (entry := outbox.sendable()) is not None:
            outbox.transmitted(entry)
            self._transmit(peer, conn, entry)
            sent = True
        if outbox.retransmits != before:
            peer.counters["retransmits"] += outbox.retransmits - before
        return sent

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Once per loop turn: send the ACKs that are due and write every link that has
        something queued (one write per link, however many messages)."""
        self._flush_handle = None
        self._send_acks()
        conns, self._dirty_conns = self._dirty_conns, set()
        for conn in conns:
            peer = self._conn_peer.get(conn)
            if peer is not None:
                peer.unflushed = 0
            conn.flush()

    def _send_acks(self) -> None:
        dirty, self._ack_dirty = self._ack_dirty, set()
        for peer in dirty:
            conn = peer.link
            if peer.up and conn is not None:
                seq = peer.inbox.ack_due()
                if seq is not None:
                    conn.link.send_ack(seq, conn.now)
                    self._dirty_conns.add(conn)
            # else: the next SESSION carries what was consumed

    # receiving ------------------------------------------------------------------------

    def messages(self) -> AsyncIterator[Message]:
        """The messages that arrive, from every peer, each peer's in send order. A
        message is acknowledged to its sender when the application asks for the next
        one (or closes the mesh): until then it counts as not yet consumed. Ends when
        the mesh closes."""
        return _MessageStream(self)

    def failures(self) -> AsyncIterator[Failure]:
        """Failure reports, as they happen. Ends when the mesh is closed and every
        report was taken."""
        return _FailureStream(self)

    def _commit(self) -> None:
        """The application is done with the message it took last: acknowledge it (with
        the next flush, once per loop turn)."""
        peer = self._taken_from
        if peer is not None:
            self._taken_from = None
            if peer.inbox.commit():
                self._ack_dirty.add(peer)
                if self._flush_handle is None:
                    self._schedule_flush()

    # link events ----------------------------------------------------------------------

    def link_event(self, conn: LinkConnection, event: Event) -> None:
        """Dispatch one event of a link a peer dialled to this node."""
        self._on_event(conn, event, None)

    def _on_event(self, conn: LinkConnection, event: Event, dialled: _Peer | None) -> None:
        if isinstance(event, MessageReceived):  # the hot path first
            peer = self._conn_peer.get(conn)
            if peer is None:
                return
            if event.kind >= wire.CONTROL_KIND_BASE:
                self._on_control(peer, conn, event)
            elif conn is peer.link and peer.up:
                inbox = peer.inbox
                body = event.body
                cost = len(body) + MESSAGE_OVERHEAD
                try:
                    fresh = inbox.accept(event.seq, cost)
                except RemoteProtocolError as exc:  # beyond the window this node announced
                    self._protocol_error(conn, peer, str(exc))
                    self._session_lost(peer, f"protocol error: {exc}")  # (the rest of
                    return  # this read is ignored; LinkTerminated follows)
                if fresh:
                    peer.counters["received"] += 1
                    self._inbox.append((peer, inbox.incarnation, event.seq,
                                        _message(peer.name, event.kind, body)))
                    if self._msg_waiters:
                        _wake(self._msg_waiters)
                else:
                    peer.counters["duplicates"] += 1
            elif (conn is peer.link or conn in peer.pending) and not conn.link.is_closed:
                self._protocol_error(conn, peer, "MSG before SESSION")
        elif isinstance(event, AckReceived):
            peer = self._conn_peer.get(conn)
            if peer is None or conn is not peer.link or not peer.up:
                return
            try:
                acked = peer.outbox.ack_transmitted(event.seq)
            except RemoteProtocolError as exc:  # it acknowledges what it never received
                self._protocol_error(conn, peer, str(exc))
                self._session_lost(peer, f"protocol error: {exc}")
                return
            if acked:
                # (the link may have ended later in the same read, GOAWAY after the ACK:
                # its LinkTerminated follows; what waits goes on the next link)
                if (peer.outbox.waiting and not conn.link.is_closed
                        and self._transmit_window(peer, conn)):
                    self._dirty_conns.add(conn)  # the window opened: written this turn
                    self._schedule_flush()
                peer.wake_space()
        elif isinstance(event, HandshakeCompleted):
            self._on_handshake(conn, event, dialled)
        elif isinstance(event, LinkTerminated):
            self._on_terminated(conn, event, dialled)
        elif isinstance(event, FlowOpenRequested):
            # (unless the peer reset it, or the link ended, later in the same read)
            if conn.link.flow_state(event.stream) is not None:
                conn.link.reject_flow(event.stream, ErrorCode.NO_SUCH_SERVICE,
                                      "mesh links carry no flows", conn.now)
        elif isinstance(event, GoAwayReceived):
            log.info("mesh %s: %s is going away: %s", self.name, conn.link.peer_name,
                     event.reason)
        elif isinstance(event, StreamProtocolError):
            self.counters["protocol_errors"] += 1

    def _on_handshake(self, conn: LinkConnection, event: HandshakeCompleted,
                      dialled: _Peer | None) -> None:
        name = event.peer_name
        if self._closing:
            conn.close("shutting down", ErrorCode.SHUTDOWN)
            return
        if dialled is not None and name != dialled.name:
            dialled.last_error = (f"dialled {dialled.name} at {dialled.address} but the "
                                  f"node there is {name!r}")
            log.warning("mesh %s: %s", self.name, dialled.last_error)
            conn.close(f"expected node {dialled.name!r}, not {name!r}", ErrorCode.REFUSED)
            return
        peer = self._peers.get(name)
        if peer is None:
            self.counters["refused"] += 1
            what = "this node's own name" if name == self.name else "an unknown node"
            log.warning("mesh %s: refused link from %s: %r is %s", self.name,
                        conn.peer_address, name, what)
            conn.close(f"{name!r} is not a peer of mesh {self.name}", ErrorCode.REFUSED)
            return
        self._conn_peer[conn] = peer
        self.counters["links_dialled" if conn.role is Role.CLIENT else "links_accepted"] += 1
        if conn.link.is_closed:
            return  # HELLO and the end in one read: its LinkTerminated follows
        self._session_deadlines[conn] = conn.loop.call_later(
            self._handshake_timeout, self._session_expired, peer, conn)
        if self.name < name:  # leader of the pair: the newest link wins
            self._adopt(peer, conn)
            self._send_session(peer, conn)
        else:  # follower: wait for the leader's SESSION on this link
            peer.pending.add(conn)
        peer.wake_change()

    def _adopt(self, peer: _Peer, conn: LinkConnection) -> None:
        peer.pending.discard(conn)
        old = peer.link
        if old is conn:
            return
        peer.link = conn
        if old is not None:
            if peer.up:
                self._session_lost(peer, "replaced by a newer link", logging.INFO)
            old.close("replaced by a newer link", ErrorCode.REFUSED)

    def _send_session(self, peer: _Peer, conn: LinkConnection) -> None:
        inbox = peer.inbox
        info = SessionInfo(self.incarnation, inbox.incarnation, inbox.consumed,
                           inbox.received, inbox.window)
        conn.link.send_message(KIND_SESSION, 0, info.encode(), conn.now)
        inbox.acked = max(inbox.acked, inbox.consumed)

    def _on_control(self, peer: _Peer, conn: LinkConnection, event: MessageReceived) -> None:
        try:
            if event.kind == KIND_SESSION:
                info = SessionInfo.decode(event.body)
                if conn.link.is_closed:
                    return  # it ended in the same read (its LinkTerminated follows)
                if info.window < conn.link.max_payload + MESSAGE_OVERHEAD:
                    raise RemoteProtocolError(
                        f"SESSION window {info.window} cannot hold one message of the "
                        f"link's maximum payload {conn.link.max_payload} (+"
                        f"{MESSAGE_OVERHEAD})")
                if conn is peer.link and peer.up:
                    raise RemoteProtocolError("second SESSION on a link")
                if self.name < peer.name and conn is not peer.link:
                    return  # a link this side replaced already
                peer.outbox.check_session(info.incarnation, info.known == self.incarnation,
                                          info.received)
                if (info.incarnation != peer.inbox.incarnation
                        and peer.unread_bytes > self.queue_bytes):
                    self._refuse_session(peer, conn)
                    return
                if self.name > peer.name:
                    self._adopt(peer, conn)
                self._session_up(peer, conn, info)
            elif event.kind == KIND_CLOSING:
                closing = ClosingInfo.decode(event.body)
                if conn is peer.link:
                    peer.outbox.peer_closing(closing.incarnation,
                                             closing.known == self.incarnation,
                                             closing.consumed)
                    log.info("mesh %s: peer %s is shutting down", self.name, peer.name)
                    if peer.up:  # it delivers nothing more: transmit nothing more to it
                        self._session_lost(peer, "peer shut down", logging.INFO)
                    else:
                        peer.last_error = "peer shut down"
                    peer.wake_space()
            else:
                log.warning("mesh %s: ignored control message kind %#x from %s", self.name,
                            event.kind, peer.name)
        except RemoteProtocolError as exc:
            self._protocol_error(conn, peer, str(exc))

    def _refuse_session(self, peer: _Peer, conn: LinkConnection) -> None:
        """A new incarnation of `peer` would open a new receive window while the
        messages of its earlier ones not yet taken hold more than one: refuse it (it
        dials again with backoff, and fails its messages after its establish_timeout
        if this node's application still does not read)."""
        peer.counters["refused_sessions"] += 1
        reason = (f"{peer.unread_bytes} bytes of messages from an earlier incarnation of "
                  f"{peer.name} not yet read by mesh {self.name}'s application")
        self._flood_log(peer.name, "refused session").event(
            "mesh %s: refused a session with a new incarnation of %s: %s", self.name,
            peer.name, reason)
        conn.close(reason, ErrorCode.REFUSED)

    def _session_expired(self, peer: _Peer, conn: LinkConnection) -> None:
        """The SESSION exchange on `conn` did not complete in time: the peer answered
        HELLO but sent no SESSION (or none this side could take). Bad input, like a
        handshake that never completes: only that link ends."""
        self._session_deadlines.pop(conn, None)
        if conn.link.is_closed or (conn is peer.link and peer.up) or self._closing:
            return
        self.counters["session_timeouts"] += 1
        log.warning("mesh %s: link with %s (%s) closed: no SESSION within %gs", self.name,
                    peer.name, conn.peer_address, self._handshake_timeout)
        conn.close(f"no SESSION within {self._handshake_timeout:g}s",
                   ErrorCode.HANDSHAKE_FAILED)

    def _session_up(self, peer: _Peer, conn: LinkConnection, info: SessionInfo) -> None:
        deadline = self._session_deadlines.pop(conn, None)
        if deadline is not None:
            deadline.cancel()
        previous = peer.inbox.incarnation
        if info.incarnation != previous:  # what its last one sent us and we hold is stale
            peer.stale_bytes += peer.inbox.held
        restarted = peer.inbox.session(info.incarnation) and previous != 0
        result = peer.outbox.session(info.incarnation, info.known == self.incarnation,
                                     info.consumed, info.received, info.window)
        if self.name > peer.name:  # the follower answers the leader's SESSION
            self._send_session(peer, conn)
        peer.up = True
        peer.up_since = conn.now
        peer.link_max = conn.link.max_payload
        peer.counters["connects"] += 1
        peer.down_since = None
        peer.last_error = None
        self._cancel_timer(peer)
        how = "dialled" if conn.role is Role.CLIENT else "accepted"
        log.info("mesh %s: peer %s up (%s link %s, incarnation %016x)", self.name, peer.name,
                 how, conn.peer_address, info.incarnation)
        if restarted:
            log.warning("mesh %s: peer %s restarted (incarnation %016x -> %016x)", self.name,
                        peer.name, previous, info.incarnation)
        if result.unconfirmed:
            self._report(peer, [Message(peer.name, e.kind, e.body) for e in result.unconfirmed],
                         f"peer {peer.name} restarted before acknowledging these messages; "
                         "its previous incarnation may have delivered some of them",
                         len(result.unconfirmed))
        for entry in result.resend:
            self._transmit(peer, conn, entry)
        if result.retransmits:
            peer.counters["retransmits"] += result.retransmits
            log.info("mesh %s: re-sent %d message(s) to %s", self.name, result.retransmits,
                     peer.name)
        if peer.inbox.consumed > peer.inbox.acked:
            self._ack_dirty.add(peer)
            self._schedule_flush()
        peer.wake_space()
        peer.wake_change()

    def _session_lost(self, peer: _Peer, reason: str, level: int = logging.WARNING) -> None:
        peer.up = False
        assert self._loop is not None
        short = self._loop.time() - peer.up_since < self.retry_interval
        peer.flaps = peer.flaps + 1 if short else 0  # a flapping peer keeps its backoff
        peer.counters["disconnects"] += 1
        peer.down_since = time.time()
        peer.last_error = reason
        log.log(level, "mesh %s: peer %s down: %s (%d message(s) queued)", self.name,
                peer.name, reason, len(peer.outbox))
        if peer.outbox:
            self._stall(peer)
            self._ensure_dialing(peer)

    def _on_terminated(self, conn: LinkConnection, event: LinkTerminated,
                       dialled: _Peer | None) -> None:
        self._conns.discard(conn)
        self._dirty_conns.discard(conn)
        deadline = self._session_deadlines.pop(conn, None)
        if deadline is not None:
            deadline.cancel()
        peer = self._conn_peer.pop(conn, None)
        if peer is None:
            if conn.role is Role.SERVER and event.code in _BAD_INPUT:
                self.counters["protocol_errors"] += 1
                log.warning("mesh %s: closed connection from %s (%s): %s", self.name,
                            conn.peer_address, conn.link.peer_name or "no HELLO",
                            event.reason)
            return
        if event.code in _BAD_INPUT and event.initiator == "peer":
            self.counters["protocol_errors"] += 1
            log.warning("mesh %s: link with %s (%s) closed: %s", self.name, peer.name,
                        conn.peer_address, event.reason)
        peer.pending.discard(conn)
        if conn is peer.link:
            peer.link = None
            if peer.up:
                quiet = event.code in _QUIET_ENDS or self._closing
                self._session_lost(peer, event.reason,
                                   logging.INFO if quiet else logging.WARNING)
            else:
                peer.last_error = event.reason
                if peer.outbox:
                    self._ensure_dialing(peer)
        elif not peer.up and peer.link is None:
            peer.last_error = event.reason
        peer.wake_change()

    def _protocol_error(self, conn: LinkConnection, peer: _Peer, reason: str) -> None:
        self.counters["protocol_errors"] += 1
        log.warning("mesh %s: protocol error from %s: %s", self.name, peer.name, reason)
        conn.close(f"protocol error: {reason}", ErrorCode.PROTOCOL_ERROR)

    # connecting -----------------------------------------------------------------------

    def _ensure_dialing(self, peer: _Peer) -> None:
        if (peer.dialer is None and not self._closing and not peer.removed and not peer.up
                and peer.outbox):
            peer.dialer = spawn_owned(self._tasks, self._dial(peer))

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter, never above `retry_interval`."""
        return retry_delay(attempt, self.retry_interval)

    async def _dial(self, peer: _Peer) -> None:
        loop = asyncio.get_running_loop()
        attempt = peer.flaps
        try:
            while not self._closing and not peer.removed and not peer.up and peer.outbox:
                if peer.link is not None or peer.pending:
                    # A session is being set up on some link: give it its time (a link
                    # whose SESSION does not come is ended by `_session_expired`).
                    waiter: asyncio.Future[None] = loop.create_future()
                    peer.change_waiters.append(waiter)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(waiter, self._handshake_timeout)
                    continue
                if attempt:
                    await asyncio.sleep(self._backoff(attempt))
                    if peer.up or peer.link is not None or peer.pending:
                        continue
                attempt += 1
                try:
                    await self._connect(peer)
                except (TetherError, OSError) as exc:
                    peer.counters["connect_errors"] += 1
                    first = peer.last_error != str(exc)
                    peer.last_error = str(exc)
                    if peer.down_since is None:
                        peer.down_since = time.time()
                    log.log(logging.WARNING if first else logging.DEBUG,
                            "mesh %s: cannot reach %s at %s: %s", self.name, peer.name,
                            peer.address, exc)
        finally:
            if peer.dialer is asyncio.current_task():
                peer.dialer = None

    async def _connect(self, peer: _Peer) -> None:
        """Dial `peer` and complete the HELLO exchange (what `aio.open_link` does, but
        the mesh holds the connection from the start, so that a dial abandoned half-way
        is closed, not leaked)."""
        loop = asyncio.get_running_loop()
        config = self._link_config(server=False)
        handler = _Dialled(self, peer)
        made: list[LinkConnection] = []

        def factory() -> LinkConnection:
            conn = LinkConnection(Role.CLIENT, config, handler, self.sockopts)
            made.append(conn)
            self._conns.add(conn)
            return conn

        try:
            async with asyncio.timeout(self._handshake_timeout):  # (see aio.open_link)
                await loop.create_connection(
                    factory, peer.host, peer.port, ssl=self.tls,
                    server_hostname=self.server_hostname if self.tls else None)
        except BaseException as exc:
            for conn in made:
                self._conns.discard(conn)
            if isinstance(exc, ssl.SSLError):
                raise HandshakeError(f"TLS handshake with {peer.address} failed: "
                                     f"{exc}") from exc
            if isinstance(exc, OSError | TimeoutError):
                raise PeerUnreachable(f"cannot connect to {peer.address}: "
                                      f"{str(exc) or 'timed out'}") from exc
            raise
        conn = made[0]
        try:
            await conn.ready
        except BaseException:
            conn.close("dial abandoned", ErrorCode.SHUTDOWN)
            raise

    def _stall(self, peer: _Peer) -> None:
        """Messages wait for a peer with no session: start the establish_timeout clock."""
        if peer.timer is None and not peer.up and peer.outbox and self._loop is not None:
            peer.stalled_since = self._loop.time()
            peer.timer = self._loop.call_at(peer.stalled_since + self.establish_timeout,
                                            self._establish_expired, peer)

    def _cancel_timer(self, peer: _Peer) -> None:
        if peer.timer is not None:
            peer.timer.cancel()
            peer.timer = None
        peer.stalled_since = None

    def _establish_expired(self, peer: _Peer) -> None:
        assert self._loop is not None
        due = (peer.stalled_since or 0.0) + self.establish_timeout
        if self._loop.time() < due:  # loop timers may fire a hair early (uvloop: ms)
            peer.timer = self._loop.call_at(due, self._establish_expired, peer)
            return
        peer.timer = None
        peer.stalled_since = None
        if peer.up or not peer.outbox or peer.removed:
            return
        if peer.down_since is None:
            peer.down_since = time.time()
        why = f": {peer.last_error}" if peer.last_error else ""
        self._fail_all(peer, f"{peer.name} unreachable for "
                             f"{self.establish_timeout:g}s{why}")

    # failures -------------------------------------------------------------------------

    def _fail_all(self, peer: _Peer, reason: str) -> None:
        if peer.dialer is not None and not peer.up:  # nothing left to dial for
            peer.dialer.cancel()
            peer.dialer = None
        entries, unconfirmed = peer.outbox.take_all()
        self._report(peer, [Message(peer.name, e.kind, e.body) for e in entries], reason,
                     unconfirmed)

    def _report(self, peer: _Peer, messages: list[Message], reason: str,
                unconfirmed: int, quiet: str | None = None) -> None:
        """Hand `messages` back in a `Failure`. With `quiet` (a kind of report that may
        come once per message), its log line is limited (`_flood_log`)."""
        if not messages:
            return
        cost = sum(len(m.body) for m in messages) + MESSAGE_OVERHEAD * len(messages)
        self._failures.append((Failure(peer.name, reason, messages, unconfirmed), cost))
        self._failed_bytes[peer.name] = self._failed_bytes.get(peer.name, 0) + cost
        peer.counters["failures"] += len(messages)
        peer.counters["failure_reports"] += 1
        line = "mesh %s: %d message(s) to %s failed (%d unconfirmed): %s"
        args = (self.name, len(messages), peer.name, unconfirmed, reason)
        if quiet is None:
            log.warning(line, *args)
        else:
            self._flood_log(peer.name, quiet).event(line, *args)
        _wake(self._failure_waiters)
        peer.wake_space()

    def _failure_taken(self) -> Failure:
        """The application takes the oldest report."""
        failure, cost = self._failures.popleft()
        left = self._failed_bytes[failure.remote] - cost
        if left:
            self._failed_bytes[failure.remote] = left
        else:
            del self._failed_bytes[failure.remote]
        return failure


_new = object.__new__
_set_remote = Message.__dict__["remote"].__set__
_set_kind = Message.__dict__["kind"].__set__
_set_body = Message.__dict__["body"].__set__


def _message(remote: str, kind: int, body: bytes) -> Message:
    """`Message(remote, kind, body)` for the receive path: a frozen dataclass's
    `__init__` goes through `object.__setattr__` three times; the slots' own setters
    take a third of the time (the instance is the same, and as frozen)."""
    m: Message = _new(Message)
    _set_remote(m, remote)
    _set_kind(m, kind)
    _set_body(m, body)
    return m


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    pending = waiters[:]
    waiters.clear()
    for w in pending:
        if not w.done():
            w.set_result(None)


class _MessageStream:
    """`Mesh.messages()`: an async iterator over the shared inbox."""

    __slots__ = ("_mesh",)

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    def __aiter__(self) -> _MessageStream:
        return self

    async def __anext__(self) -> Message:
        mesh = self._mesh
        if mesh._taken_from is not None:
            mesh._commit()  # the application is done with what it took before
        while True:
            if mesh._closing:
                raise StopAsyncIteration
            if mesh._inbox:
                peer, incarnation, seq, message = mesh._inbox.popleft()
                cost = len(message.body) + MESSAGE_OVERHEAD
                if peer.inbox.take(incarnation, seq, cost):
                    mesh._taken_from = peer
                elif incarnation != peer.inbox.incarnation:
                    peer.stale_bytes -= cost
                return message
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            mesh._msg_waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    mesh._msg_waiters.remove(waiter)


class _FailureStream:
    """`Mesh.failures()`: an async iterator over failure reports."""

    __slots__ = ("_mesh",)

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    def __aiter__(self) -> _FailureStream:
        return self

    async def __anext__(self) -> Failure:
        mesh = self._mesh
        while True:
            if mesh._failures:
                return mesh._failure_taken()
            if mesh._closed:
                raise StopAsyncIteration
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            mesh._failure_waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    mesh._failure_waiters.remove(waiter)
