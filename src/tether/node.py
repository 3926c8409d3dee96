"""Node: a named tether endpoint that allocates and accepts flows (Ouroboros' API).

A node connects to a gateway (or directly to another node that listens) over one
link and offers::

    async with tether.Node("client", gateway="127.0.0.1:7443") as node:
        flow = await node.alloc("oecho", liveness=1.0)

    async with tether.Node("server", gateway="127.0.0.1:7443") as node:
        node.register("oecho")
        flow = await node.accept()

A node may also `listen` itself, so that other nodes reach its registered services
over a direct link, without a gateway.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
from collections import deque
from typing import Any, Final, Literal

from . import wire
from .aio import (
    LinkConnection,
    SocketOptions,
    listening_port,
    open_link,
    parse_address,
    serve_links,
)
from .errors import (
    ErrorCode,
    FlowClosed,
    FlowDown,
    FlowReset,
    LocalProtocolError,
    NoSuchService,
    PeerDown,
    PeerUnreachable,
    TetherError,
    caused_by,
)
from .events import (
    DataReceived,
    Event,
    FinReceived,
    FlowAccepted,
    FlowEnded,
    FlowOpenRequested,
    GoAwayReceived,
    HandshakeCompleted,
    LinkTerminated,
    StreamProtocolError,
    WindowUpdated,
)
from .fdlimit import resolve_limit
from .floodlog import FloodLog
from .flow import Flow
from .flowstate import FlowState
from .ids import FlowId, check_node_name, check_service_name
from .link import (
    DEFAULT_MAX_WINDOW,
    MODE_CASCADE,
    MODE_HALF_CLOSE,
    LinkConfig,
    check_liveness,
)

__all__ = ["Node"]

log = logging.getLogger("tether.node")


class _Default(enum.Enum):
    """A typed "not given" (None means "no liveness"): compiled code checks types."""

    LIVENESS = 0


_MODES: Final = {"half-close": MODE_HALF_CLOSE, "cascade": MODE_CASCADE}


class Node:
    """A named endpoint of flows. See the module docstring.

    `liveness` is the node-wide default liveness timeout of the flows it allocates
    (seconds, 10 ms to years; None for none). `token` is the shared secret sent to
    the gateway; a listening node requires it from nodes that connect to it.
    `max_links` bounds the links a listening node holds, those in their handshake
    included (default: from the open-file limit, `tether.fdlimit`; None for none): one
    more is refused as it is accepted (told why in a GOAWAY, or reset over TLS), logged
    and counted (`links_over_limit`).
    """

    def __init__(self, name: str, gateway: str | None = None, *, listen: str | None = None,
                 token: bytes | str = b"", tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None,
                 server_tls: ssl.SSLContext | None = None,
                 liveness: float | None = 30.0, heartbeat: float = 5.0,
                 link_timeout: float = 15.0, window: int = 256 * 1024,
                 sockopts: SocketOptions | None = None, accept_backlog: int = 1024,
                 connect_timeout: float = 10.0,
                 max_links: int | Literal["default"] | None = "default") -> None:
        if gateway is None and listen is None:
            raise ValueError("a Node needs a gateway to connect to, or an address to listen on")
        max_links = resolve_limit(max_links, "max_links")
        self.max_links = max_links
        self.name = check_node_name(name)
        self.gateway = gateway
        self.listen = listen
        self.token = token.encode() if isinstance(token, str) else token
        self.tls = tls
        self.server_hostname = server_hostname
        self.server_tls = server_tls
        check_liveness(liveness)  # (here, not at the first alloc of each flow)
        self.liveness = liveness
        self.heartbeat = heartbeat
        self.link_timeout = link_timeout
        self.window = window
        self.sockopts = sockopts
        self.accept_backlog = accept_backlog
        self.connect_timeout = connect_timeout
        self._services: set[str] = set()
        self._conn: LinkConnection | None = None
        self._server: asyncio.Server | None = None
        self._accepted: set[LinkConnection] = set()  # every accepted link until it ends
        self._conns: set[LinkConnection] = set()
        self._flows: dict[tuple[LinkConnection, int], Flow] = {}
        self._pending: dict[tuple[LinkConnection, int], asyncio.Future[Flow]] = {}
        self._incoming: deque[tuple[LinkConnection, Flow]] = deque()
        self._accepters: deque[asyncio.Future[None]] = deque()
        self._link_waiters: list[asyncio.Future[None]] = []  # `wait_linked` callers
        self._serial = 0
        self._closing = False
        self._link_lost: str | None = None  # why the link to the gateway ended
        self.counters: dict[str, int] = dict.fromkeys(
            ("allocated", "accepted", "refused", "closed", "down", "reset", "links_lost",
             "protocol_errors", "links_over_limit"), 0)
        self._over_log = FloodLog(log, f"node {name}: %d more link(s) refused in the "
                                      f"last second, at the limit (max_links {max_links})")

    # lifecycle ------------------------------------------------------------------------

    def _link_config(self, *, server: bool) -> LinkConfig:
        return LinkConfig(name=self.name, token=b"" if server else self.token,
                          expected_token=(self.token or None) if server else None,
                          heartbeat_interval=self.heartbeat, link_timeout=self.link_timeout,
                          initial_window=self.window,
                          max_window=max(DEFAULT_MAX_WINDOW, self.window))

    async def start(self) -> None:
        """Listen and/or connect to the gateway; returns once the link is up. Raises
        `FlowClosed` if the node is closed, `aclose()` during `start()` included, and
        `LocalProtocolError` while it is started (its link up, or listening); once its
        link was lost, `start()` connects again."""
        self._check_open()
        if self.linked or (self.gateway is None and self._server is not None):
            raise LocalProtocolError(f"node {self.name} is started already")
        listening = self._server is not None  # (a start again, after the link was lost)
        if self.listen is not None and not listening:
            host, port = parse_address(self.listen)
            server = await serve_links(
                host, port, lambda: self._link_config(server=True), self,
                ssl_context=self.server_tls, sockopts=self.sockopts,
                accepted=self._accepted, max_links=self.max_links,
                over_limit=self._link_over_limit,
                refusal=f"node {self.name} is at its limit of {self.max_links} link(s)")
            if self._closing:  # aclose() meanwhile: nothing will close it later
                server.close()
                self._check_open()
            self._server = server
        if self.gateway is not None:
            host, port = parse_address(self.gateway)
            try:
                conn = await open_link(
                    host, port, self._link_config(server=False), self, ssl_context=self.tls,
                    server_hostname=self.server_hostname, sockopts=self.sockopts,
                    connect_timeout=self.connect_timeout)
            except BaseException:
                if not listening:
                    await self._close_server()
                raise
            if self._closing:
                conn.close()
                self._check_open()
            self._conn = conn
            self._conns.add(self._conn)
            self._link_lost = None
            self._wake_link_waiters()
            log.info("node %s: link to %s up (%s)", self.name, self._conn.link.peer_name,
                     self.gateway)
            for service in sorted(self._services):
                self._send_control(wire.KIND_REGISTER, service)

    def _check_open(self) -> None:
        if self._closing:
            raise FlowClosed(f"node {self.name} is closed")

    @property
    def linked(self) -> bool:
        """The link to the gateway is up."""
        return self._conn is not None and not self._conn.closed.done()

    async def link_lost(self) -> str:
        """Wait until the link to the gateway ends; why it ended. Returns at once if it
        has ended already (then `start()` connects again); `LocalProtocolError` if the
        node never connected (no `gateway`, or not started)."""
        conn = self._conn
        if conn is None:
            raise LocalProtocolError(f"node {self.name} has no link to a gateway")
        event = await asyncio.shield(conn.closed)
        return event.reason

    async def wait_linked(self) -> None:
        """Wait until the link to the gateway is up; returns at once when it is. A lost
        link is not dialled again here: this returns once `start()` (called again by
        whoever keeps the link, as an agent or a connector does) has brought it back.
        Raises `FlowClosed` if the node is closed, before or while waiting, and
        `LocalProtocolError` if it has no gateway to link to."""
        while not self.linked:
            self._check_open()
            if self.gateway is None:
                raise LocalProtocolError(f"node {self.name} has no gateway to link to")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._link_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._link_waiters:
                    self._link_waiters.remove(waiter)

    def _wake_link_waiters(self) -> None:
        for waiter in self._link_waiters:
            if not waiter.done():
                waiter.set_result(None)

    @property
    def port(self) -> int:
        """The port this node listens on (with `listen=`)."""
        if self._server is None:
            raise LocalProtocolError("this node does not listen")
        return listening_port(self._server)

    async def aclose(self, drain: float = 0.0) -> None:
        """Close every flow (reason "shutdown") and link. With `drain`, flows get that many
        seconds to finish on their own first. Accepting stops at once: flows waiting in
        the accept backlog are refused ("shutting down"), a waiting `accept()` raises
        `FlowClosed`."""
        self._closing = True
        self._refuse_backlog()
        self._wake_all_accepters()
        self._wake_link_waiters()
        server, self._server = self._server, None
        if server is not None:
            server.close()  # no new links
        conns = list(self._conns)
        await asyncio.gather(*(c.aclose("shutdown", drain) for c in conns))
        for conn in list(self._accepted):  # (still in their handshake)
            conn.close("shutdown")
        self._over_log.close()
        if server is not None:  # (after the links: from Python 3.12 on, it waits for
            await server.wait_closed()  # every connection the server accepted to close)
        self._wake_all_accepters()

    def _link_over_limit(self, peer: str) -> None:
        """A connection beyond `max_links` was refused as it was accepted."""
        self.counters["links_over_limit"] += 1
        self._over_log.event("node %s: link from %s refused: %d link(s) open or in their "
                             "handshake, at the limit (max_links %s)", self.name, peer,
                             len(self._accepted), self.max_links)

    async def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # services -------------------------------------------------------------------------

    def register(self, service: str) -> None:
        """Offer `service`: flows allocated to it reach this node's `accept()`."""
        self._services.add(check_service_name(service))
        self._send_control(wire.KIND_REGISTER, service)
        log.info("node %s: registered service %s", self.name, service)

    def unregister(self, service: str) -> None:
        """Stop offering `service`."""
        self._services.discard(service)
        self._send_control(wire.KIND_UNREGISTER, service)

    def _send_control(self, kind: int, service: str) -> None:
        conn = self._conn
        if conn is not None and not conn.closed.done():
            conn.link.send_message(kind, 0, service.encode(), conn.now)
            conn.flush()

    # flows ----------------------------------------------------------------------------

    async def alloc(self, service: str, *, liveness: float | _Default | None = _Default.LIVENESS,
                    mode: str = "half-close") -> Flow:
        """Allocate a flow to `service`. Raises `NoSuchService` if no node offers it,
        `FlowDown` if the link is down or the answer does not come within the liveness
        timeout, `FlowClosed` if the serving node refused it (its accept backlog full,
        shutting down) or a gateway's policy denied it (code DENIED)."""
        if mode not in _MODES:  # (a wrong call is wrong whatever the link's state)
            raise ValueError(f"mode must be one of {sorted(_MODES)}, not {mode!r}")
        conn = self._conn
        if conn is None or conn.closed.done():
            raise FlowDown(f"node {self.name} has no link to a gateway", ErrorCode.FLOW_DOWN)
        timeout = self.liveness if isinstance(liveness, _Default) else liveness
        try:
            sid = conn.link.open_flow(service, conn.now, liveness=timeout, mode=_MODES[mode])
        except LocalProtocolError as exc:
            raise caused_by(FlowDown(f"cannot allocate a flow: {exc}"), exc)  # noqa: B904
        flow = self._new_flow(conn, sid, service, conn.link.peer_name or "?")
        waiter: asyncio.Future[Flow] = conn.loop.create_future()
        self._pending[(conn, sid)] = waiter
        conn.flush()
        try:
            result = await waiter
        except BaseException:
            self._pending.pop((conn, sid), None)
            # Not answered yet, or answered (OPEN_OK) in the very iteration in which this
            # task was cancelled: either way the flow is nobody's, end it. (A no-op for a
            # stream already ended: refused, DOWN.)
            conn.link.dealloc(sid, conn.now)
            conn.flush()
            raise
        self.counters["allocated"] += 1
        log.debug("flow %s allocated service=%s", flow.id, service)
        return result

    async def accept(self) -> Flow:
        """The next flow allocated to one of this node's services. Raises `FlowClosed`
        once the node is closed, and `FlowDown` once no flow can arrive any more: its
        link to the gateway was lost (a node does not re-dial) and it does not listen."""
        while True:
            while self._incoming:
                conn, flow = self._incoming.popleft()
                if flow.state is not FlowState.OPENING:
                    continue
                conn.link.accept_flow(flow.stream, conn.now)
                flow._opened()
                conn.flush()
                self.counters["accepted"] += 1
                log.debug("flow %s accepted service=%s from %s", flow.id, flow.service,
                         flow.peer)
                return flow
            if self._closing:
                raise FlowClosed(f"node {self.name} is closed")
            if self._link_lost is not None and self._server is None:
                raise FlowDown(f"node {self.name}: link to the gateway lost "
                               f"({self._link_lost}): no flow can arrive",
                               ErrorCode.FLOW_DOWN)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._accepters.append(waiter)
            try:
                await waiter
            except BaseException:
                # Woken for a flow, then cancelled before running: pass the flow on to
                # another acceptor, or it waits in the backlog while one waits.
                if waiter.done() and not waiter.cancelled() and self._incoming:
                    self._wake_accepter()
                raise
            finally:
                if waiter in self._accepters:
                    self._accepters.remove(waiter)

    def _new_flow(self, conn: LinkConnection, sid: int, service: str, peer: str) -> Flow:
        self._serial += 1
        flow = Flow(FlowId(node=self.name, serial=self._serial), conn, sid, service, peer)
        self._flows[(conn, sid)] = flow
        return flow

    def flows(self) -> list[Flow]:
        """The flows this node holds now."""
        return list(self._flows.values())

    def stats(self) -> dict[str, Any]:
        """Counters, and what is open now."""
        return {"name": self.name, "flows": len(self._flows), "links": len(self._conns),
                "services": sorted(self._services), **self.counters,
                "link_stats": [c.link.stats.as_dict() for c in self._conns]}

    # link events ----------------------------------------------------------------------

    def link_event(self, conn: LinkConnection, event: Event) -> None:
        """Dispatch one event of one of this node's links."""
        if isinstance(event, DataReceived):
            flow = self._flows.get((conn, event.stream))
            if flow is not None:
                flow._on_data(event.data)
        elif isinstance(event, WindowUpdated):
            flow = self._flows.get((conn, event.stream))
            if flow is not None:
                flow._on_credit()
        elif isinstance(event, FinReceived):
            flow = self._flows.get((conn, event.stream))
            if flow is not None:
                flow._on_fin()  # pass the end on first; the log line can wait
                log.debug("partial deallocation of flow %s by %s", flow.id, flow.peer)
        elif isinstance(event, FlowEnded):
            self._on_flow_ended(conn, event)
        elif isinstance(event, FlowAccepted):
            flow = self._flows.get((conn, event.stream))
            waiter = self._pending.pop((conn, event.stream), None)
            if flow is not None:
                flow._opened()
                if waiter is not None and not waiter.done():
                    waiter.set_result(flow)
        elif isinstance(event, FlowOpenRequested):
            self._on_open_requested(conn, event)
        elif isinstance(event, GoAwayReceived):
            log.info("node %s: %s is going away (%s)", self.name, conn.link.peer_name,
                     event.reason)
        elif isinstance(event, LinkTerminated):
            self._conns.discard(conn)
            if conn is self._conn:
                self._link_lost = event.reason
                if self._server is None:  # no flow can arrive now: acceptors hear it
                    self._wake_all_accepters()
            if not self._closing:
                self.counters["links_lost"] += 1
                level = logging.INFO if event.code in (ErrorCode.NO_ERROR, ErrorCode.SHUTDOWN) \
                    else logging.WARNING
                log.log(level, "node %s: link to %s ended: %s", self.name,
                            conn.link.peer_name or conn.peer_address, event.reason)
        elif isinstance(event, HandshakeCompleted):
            self._conns.add(conn)
        elif isinstance(event, StreamProtocolError):
            self.counters["protocol_errors"] += 1
            log.warning("node %s: protocol error from %s on stream %d: %s", self.name,
                        conn.link.peer_name, event.stream, event.reason)

    def stream_end_ahead(self, conn: LinkConnection, stream: int, ftype: int) -> bool:
        """A FIN or CLOSE for `stream` is about to be handled: the flow's sink (a socket
        bridge) hears of it now; True if it did (see `LinkHandler`)."""
        flow = self._flows.get((conn, stream))
        return flow is not None and flow._end_ahead()

    def _on_open_requested(self, conn: LinkConnection, event: FlowOpenRequested) -> None:
        now = conn.now
        if event.service not in self._services:
            self.counters["refused"] += 1
            log.warning("node %s: refused flow to unknown service %r from %s", self.name,
                        event.service, event.origin)
            conn.link.reject_flow(event.stream, ErrorCode.NO_SUCH_SERVICE,
                                  f"no such service: {event.service!r}", now)
            return
        if len(self._incoming) >= self.accept_backlog:  # drop those that ended waiting
            self._incoming = deque(e for e in self._incoming
                                   if e[1].state is FlowState.OPENING)
        if len(self._incoming) >= self.accept_backlog or self._closing:
            self.counters["refused"] += 1
            why = "shutting down" if self._closing else \
                f"accept backlog full ({self.accept_backlog})"
            log.warning("node %s: refused flow to %s: %s", self.name, event.service, why)
            conn.link.reject_flow(event.stream, ErrorCode.REFUSED, why, now)
            return
        flow = self._new_flow(conn, event.stream, event.service, event.origin)
        self._incoming.append((conn, flow))
        self._wake_accepter()

    def _wake_accepter(self) -> None:
        while self._accepters:
            waiter = self._accepters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def _refuse_backlog(self) -> None:
        """Refuse the flows no one will accept now (the node is closing)."""
        while self._incoming:
            conn, flow = self._incoming.popleft()
            if flow.state is not FlowState.OPENING:
                continue
            del self._flows[(conn, flow.stream)]  # (never accepted: no "closed" count)
            self.counters["refused"] += 1
            log.info("node %s: refused flow to %s: shutting down", self.name, flow.service)
            conn.link.reject_flow(flow.stream, ErrorCode.REFUSED, "shutting down", conn.now)
            conn.flush()

    def _wake_all_accepters(self) -> None:
        for waiter in self._accepters:
            if not waiter.done():
                waiter.set_result(None)

    def _on_flow_ended(self, conn: LinkConnection, event: FlowEnded) -> None:
        flow = self._flows.pop((conn, event.stream), None)
        if flow is None:
            return
        flow._on_end(event)
        waiter = self._pending.pop((conn, event.stream), None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(_open_error(flow, event))
            return
        if event.state is FlowState.CLOSED:
            self.counters["closed"] += 1
            if event.initiator == "peer":
                log.debug("flow %s deallocated by %s", flow.id, flow.peer)
            else:
                log.debug("flow %s deallocated", flow.id)
        elif event.state is FlowState.DOWN:
            self.counters["down"] += 1
            log.warning("flow %s down: %s", flow.id, event.reason.removeprefix("down: "))
        else:
            self.counters["reset"] += 1
            log.warning("flow %s reset%s: %s", flow.id,
                        " here" if event.initiator == "local" else "",
                        event.reason.removeprefix("reset: "))


def _open_error(flow: Flow, event: FlowEnded) -> TetherError:
    reason = event.reason.removeprefix("refused: ")
    if event.code == ErrorCode.NO_SUCH_SERVICE:
        return NoSuchService(reason)
    if event.code == ErrorCode.UNREACHABLE:
        return PeerUnreachable(reason)
    if event.code == ErrorCode.DENIED:
        return FlowClosed(reason, ErrorCode.DENIED)
    if event.state is FlowState.DOWN:
        cls = PeerDown if event.code == ErrorCode.FLOW_PEER else FlowDown
        return cls(f"allocation of {flow.service!r} failed: {reason.removeprefix('down: ')}")
    if event.state is FlowState.RESET:
        return FlowReset(f"allocation of {flow.service!r} failed: {reason}")
    return FlowClosed(f"allocation of {flow.service!r} refused: {reason}")
