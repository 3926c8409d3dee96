"""The relay's edges: the Agent (applications connect to it) and the Connector (it
connects to servers). Between them, one or more gateways splice the flows.

    application --TCP--> Agent ==flow==> Gateway(s) ==flow==> Connector --TCP--> server

Each TCP connection is one flow, joined to its socket by a `SocketBridge`, so every
end travels end to end: EOF as FIN (half-close, the default) or as a full close
(`cascade="full"`), a reset as a reset, a dead process or link as DOWN (the far
socket is reset). A half-closed connection may stay so for at most `fin_timeout`
seconds; then it is reset, so a peer that never closes its side cannot hold
resources for ever (counted from the last byte moved, as a TCP proxy's fin timeouts).
The edge that passed the FIN on to its own peer (a `write_eof` on its socket) times
that peer, whose progress it sees, down to the bytes its kernel still holds for it:
an upload that the application ended with a FIN runs as long as the server reads,
however much the tunnel and the kernels hold (HAProxy's `client-fin`/`server-fin`
likewise apply to the side the proxy shut).
An idle connection whose application or server vanished (its host gone, no RST) is
reset once TCP keepalive has had no answer for about `keepalive` seconds
(`SocketOptions.for_edge`), so that its flow does not stay open for ever either.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, Literal

from .aio import (
    SocketOptions,
    format_address,
    listening_port,
    listening_sockets,
    parse_address,
    reset_socket,
    spawn_owned,
)
from .backoff import retry_delay
from .bridge import SocketBridge
from .errors import (
    ErrorCode,
    FlowClosed,
    FlowDown,
    HandshakeError,
    PeerUnreachable,
    TetherError,
)
from .fdlimit import resolve_limit
from .floodlog import FloodLog
from .flowstate import FlowState
from .ids import check_service_name
from .listing import oldest
from .node import Node

__all__ = ["Agent", "Connector", "connect_failure", "parse_forward", "parse_service"]

log = logging.getLogger("tether.relay")
_ABANDON_GRACE = 0.25
"""Seconds a connector still waits for a server to answer once the flow has ended."""
FORWARD_BACKLOG = 4096
"""An agent's listen backlog (the kernel caps it at net.core.somaxconn): connections
the kernel has completed and the agent not accepted yet. Past it, a client's SYN is
dropped and its connect waits a second or more for the retry: with asyncio's default
of 100, a burst of clients while the agent was busy did."""
_CASCADE = {"half": "half-close", "full": "cascade"}


def parse_forward(text: str) -> tuple[str, int, str]:
    """``"127.0.0.1:9080=web"`` -> ("127.0.0.1", 9080, "web")."""
    address, sep, service = text.partition("=")
    if not sep or not service:
        raise ValueError(f"--forward {text!r}: expected LISTEN_HOST:PORT=SERVICE")
    _check_service_name(service, "--forward", text)
    host, port = parse_address(address)
    return host, port, service


def _check_service_name(service: str, option: str, text: str) -> None:
    try:
        check_service_name(service)
    except ValueError:  # (saying which option: the name alone may be 255+ bytes long)
        raise ValueError(f"{option} {text[:60]!r}...: a service name must be 1 to 255 "
                         "bytes") from None


def connect_failure(exc: OSError) -> str:
    """Why a connection to a server failed, without where: what a connector tells the
    far end ("Connection refused", "timed out"). The exception's own text may name the
    address (asyncio's loop: "Connect call failed ('10.0.0.5', 8080)"), which a relay
    must not hand to its clients; its error number does not."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return exc.strerror or "name resolution failed"
    if isinstance(exc.errno, int) and exc.errno > 0:
        return os.strerror(exc.errno)
    return type(exc).__name__


def parse_service(text: str) -> tuple[str, str, int]:
    """``"web=127.0.0.1:8080"`` -> ("web", "127.0.0.1", 8080)."""
    service, sep, address = text.partition("=")
    if not sep or not service:
        raise ValueError(f"--service {text!r}: expected SERVICE=HOST:PORT")
    _check_service_name(service, "--service", text)
    host, port = parse_address(address)
    return service, host, port


class _Edge:
    """What the agent and the connector share: a node, bridges, the fin timeout."""

    def __init__(self, name: str, gateway: str, *, token: bytes | str, tls: ssl.SSLContext | None,
                 liveness: float | None, fin_timeout: float, cascade: str,
                 window: int = 256 * 1024, keepalive: float | None = 60.0,
                 retry_interval: float = 2.0, start_wait: float = 0.0,
                 max_connections: int | Literal["default"] | None = "default") -> None:
        if cascade not in _CASCADE:
            raise ValueError(f"cascade must be 'half' or 'full', not {cascade!r}")
        if not 0 < retry_interval < math.inf:
            raise ValueError(f"retry_interval must be positive seconds, not {retry_interval}")
        if not 0 <= start_wait < math.inf:
            raise ValueError(f"start_wait must be 0 (none) or positive seconds, not "
                             f"{start_wait}")
        self.retry_interval = retry_interval
        self.start_wait = start_wait
        self.max_connections = resolve_limit(max_connections, "max_connections")
        self._over_log = FloodLog(
            log, f"{self.role} {name}: %d more connection(s) refused in the last second, at "
                 f"the limit (--max-connections {self.max_connections})")
        self.gateway = gateway
        if not fin_timeout >= 0:  # (NaN too)
            raise ValueError(f"fin_timeout must be 0 (none) or positive seconds, not "
                             f"{fin_timeout}")
        self.sockopts = SocketOptions.for_edge(keepalive)
        self.name = name
        self.node = Node(name, gateway=gateway, token=token, tls=tls, liveness=liveness,
                         window=window)
        self.fin_timeout = fin_timeout
        self.mode = _CASCADE[cascade]
        self.bridges: set[SocketBridge] = set()
        self.arriving: set[SocketBridge] = set()  # accepted, flow not allocated yet
        self.tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            ("connections", "refused", "over_limit", "fin_timeouts", "edge_timeouts",
             "bytes_up", "bytes_down", "reconnects"), 0)
        self._closing = False

    at_service = False  # whether this edge's sockets are the service's (a connector's)
    role = "edge"  # (its lines' first word)

    def bytes_of(self, bridge: SocketBridge) -> tuple[int, int]:
        """A connection's bytes (up, down): up toward the service, down from it, as the
        gateway counts them, whichever end of the flow this edge holds (an agent reads
        what goes up from its sockets, a connector writes it to its servers)."""
        if self.at_service:
            return bridge.bytes_down, bridge.bytes_up
        return bridge.bytes_up, bridge.bytes_down

    async def _first_link(self) -> None:
        """The link at start. A gateway that is not there (refused, unreachable, no
        answer: `PeerUnreachable`) is dialled again, as `_keep_link` does, for up to
        `start_wait` seconds, so that daemons started all at once need no order; so is
        a gateway at its `--max-links` (REFUSED: links may end); then, or at once with
        no `start_wait`, the edge fails with the reason. Any other refusal by the
        gateway (token, TLS: `HandshakeError`) is a configuration to fix: it fails at
        once."""
        loop = asyncio.get_running_loop()
        since = loop.time()
        attempts = 0
        while True:
            try:
                await self.node.start()
                break
            except (PeerUnreachable, HandshakeError) as exc:
                if isinstance(exc, HandshakeError):
                    if exc.code != ErrorCode.REFUSED:
                        raise
                    what, why = f"the gateway at {self.gateway} refused the link", str(exc)
                    first = what
                else:
                    cause = exc.__cause__
                    what = f"no gateway at {self.gateway}"
                    why = (cause.strerror if isinstance(cause, OSError) and cause.strerror
                           else str(cause or exc) or "timed out")
                    first = f"{what} yet"
                left = since + self.start_wait - loop.time()
                if left <= 0:
                    if attempts:
                        raise type(exc)(
                            f"{what} after {attempts + 1} attempts "
                            f"({loop.time() - since:.1f}s): {why}", exc.code) from exc
                    raise
                if not attempts:
                    log.warning("%s: %s (%s): trying again for up to %gs", self.name, first,
                                why, self.start_wait)
                await asyncio.sleep(min(left, retry_delay(attempts, self.retry_interval)))
                attempts += 1
        if attempts:
            log.info("%s: link to the gateway %s up after %d attempts (%.1fs)", self.name,
                     self.gateway, attempts + 1, loop.time() - since)

    def _linked_up(self) -> None:
        """The node's link is up: keep it so (`_keep_link`)."""
        spawn_owned(self.tasks, self._keep_link())

    async def _keep_link(self) -> None:
        """Once the link to the gateway is lost (the gateway restarted, the network), dial
        again until it is back, waiting `tether.backoff.retry_delay` up to
        `retry_interval` between attempts, so that a gateway's restart does not leave
        every edge without one, nor have them all dial it in step. Meanwhile an
        agent refuses its applications' connections (reset, logged), and no flow
        reaches a connector. A line when the link is lost, one a minute while it stays
        so, one when it is back."""
        loop = asyncio.get_running_loop()
        while True:
            reason = await self.node.link_lost()
            if self._closing:
                return
            log.warning("%s: link to the gateway %s lost (%s): connecting again", self.name,
                        self.gateway, reason)
            attempts, since, said = 0, loop.time(), loop.time()
            while True:
                await asyncio.sleep(retry_delay(attempts, self.retry_interval))
                attempts += 1
                try:
                    await self.node.start()
                    break
                except FlowClosed:  # (closing)
                    return
                except (OSError, TetherError) as exc:
                    if loop.time() - said >= 60:
                        said = loop.time()
                        log.warning("%s: still no link to the gateway %s after %d attempts "
                                    "(%.0fs): %s", self.name, self.gateway, attempts,
                                    loop.time() - since, exc)
            self.counters["reconnects"] += 1
            log.warning("%s: link to the gateway %s is back (after %d attempt(s), %.1fs)",
                        self.name, self.gateway, attempts, loop.time() - since)

    def _adopt(self, bridge: SocketBridge) -> None:
        self.bridges.add(bridge)
        self.counters["connections"] += 1
        if self._reaper is None and self.fin_timeout > 0:
            self._schedule_reaper()

    def _done(self, bridge: SocketBridge) -> None:
        self.bridges.discard(bridge)
        if not bridge.has_flow:
            return
        up, down = self.bytes_of(bridge)
        self.counters["bytes_up"] += up
        self.counters["bytes_down"] += down
        if bridge.timed_out:
            self.counters["edge_timeouts"] += 1
            log.warning("flow %s: the %s at %s stopped answering (no answer to TCP "
                        "keepalive or retransmissions): flow reset", bridge.flow.id,
                        bridge.label, bridge.peer)
        log.info("flow %s ended: %s, first %s, %d bytes up, %d bytes down, %.3fs",
                 bridge.flow.id, bridge.flow.state.name, bridge.first_end or "?", up, down,
                 asyncio.get_running_loop().time() - bridge.opened_at)

    def _schedule_reaper(self) -> None:
        period = max(0.05, self.fin_timeout / 4)
        self._reaper = asyncio.get_running_loop().call_later(period, self._reap)

    def _reap(self) -> None:
        """One timer for the whole process: reset connections half-closed too long."""
        now = asyncio.get_running_loop().time()
        for bridge in list(self.bridges):
            since = bridge.half_closed_at
            if since is None:
                continue
            unsent = bridge.unsent
            # what the socket's peer took: a slow reader draining the kernel's buffer
            # (megabytes, on a fast path) is progress too
            moved = bridge.bytes_up + bridge.bytes_down - unsent - bridge.kernel_unsent
            if moved != bridge.bytes_at_reap:  # still transferring: the timeout restarts
                bridge.bytes_at_reap = moved
                bridge.half_closed_at = since = now
            if now - since < self.fin_timeout or not bridge.has_flow:
                continue
            if bridge.flow.state is not FlowState.CLOSED:
                log.warning("flow %s half-closed for %.1fs (fin timeout): resetting",
                            bridge.flow.id, now - since)
            elif unsent and not bridge.socket_done:
                # The flow has ended, but the socket still holds bytes its peer does not
                # take: closing waits for them for ever unless this ends it.
                log.warning("flow %s ended, but the %s at %s took none of its last %d "
                            "bytes for %.1fs (fin timeout): resetting", bridge.flow.id,
                            bridge.label, bridge.peer, unsent, now - since)
            else:
                continue
            self.counters["fin_timeouts"] += 1
            bridge.abort(f"fin timeout ({self.fin_timeout:g}s)")
        self._reaper = None
        if self.bridges:
            self._schedule_reaper()

    async def _close_edge(self, drain: float = 0.0) -> None:
        self._closing = True
        if drain > 0 and (self.bridges or self.arriving or self.node.flows()):
            await self._drain(drain)
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.node.aclose()
        self._over_log.close()
        # every socket still there: adopted, still being allocated (its task was just
        # cancelled), or closing but still holding bytes for its peer
        for bridge in [*self.bridges, *self.arriving]:
            if bridge.transport is not None and not bridge.socket_done:
                reset_socket(bridge.transport)
        self.arriving.clear()

    async def _drain(self, drain: float) -> None:
        """Let the open connections finish on their own for up to `drain` seconds: the
        node's GOAWAY tells the gateway to send no new flow here; each connection ends
        when both its flow and its socket have (its last bytes written)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        log.info("%s: draining %d connection(s) for up to %gs", self.name,
                 len(self.bridges) + len(self.arriving), drain)
        await self.node.aclose(drain)  # (returns once every flow ended, or at the deadline)
        while (self.bridges or self.arriving) and loop.time() < deadline:
            await asyncio.sleep(0.02)  # (sockets still writing their last bytes)
        if self.bridges or self.arriving:
            log.warning("%s: %d connection(s) still open after the %gs drain: resetting",
                        self.name, len(self.bridges) + len(self.arriving), drain)

    def stats(self, flows: int | None = None) -> dict[str, Any]:
        """Counters, the node's view, and the open connections with age and bytes (all,
        or the `flows` oldest). `open` counts the connections held, a flow allocated
        for them or not yet; `parked_bytes`, the bytes read from their sockets that
        wait for their flows' credit; `bytes_up` and `bytes_down` count the open
        connections' bytes too."""
        loop_now = asyncio.get_running_loop().time()
        limit = {} if self.max_connections is None else \
            {"max_connections": self.max_connections}
        counters = dict(self.counters)
        for bridge in self.bridges:  # (`_done` moves its bytes into `counters`)
            up, down = self.bytes_of(bridge)
            counters["bytes_up"] += up
            counters["bytes_down"] += down
        listed = []
        for bridge in oldest(self.bridges, flows):
            up, down = self.bytes_of(bridge)
            listed.append({"id": str(bridge.flow.id), "service": bridge.flow.service,
                           "state": bridge.flow.state.name,
                           "age": round(loop_now - bridge.opened_at, 3),
                           "bytes_up": up, "bytes_down": down})
        parked = sum(bridge.parked for bridge in (*self.bridges, *self.arriving))
        return {"name": self.name, "gateway": self.gateway, "linked": self.node.linked,
                "open": len(self.bridges) + len(self.arriving), "parked_bytes": parked,
                **limit, **counters,
                "node": self.node.stats(), "flows": listed}


class Agent(_Edge):
    """Listens on local ports; each connection accepted is carried as a flow to a service.

    `forwards` maps (host, port) to a service name. A connection whose flow cannot be
    allocated (unknown service, denied, no gateway) is reset, and the reason logged.
    So is one beyond `max_connections` open at once (default: from the open-file
    limit, `default_max_connections`; None for no limit of the agent's own).
    """

    role = "agent"

    def __init__(self, gateway: str, forwards: list[tuple[str, int, str]], *,
                 name: str = "agent", token: bytes | str = b"",
                 tls: ssl.SSLContext | None = None, liveness: float | None = 30.0,
                 fin_timeout: float = 60.0, cascade: str = "half",
                 window: int = 256 * 1024, keepalive: float | None = 60.0,
                 retry_interval: float = 2.0, start_wait: float = 0.0,
                 max_connections: int | Literal["default"] | None = "default") -> None:
        super().__init__(name, gateway, token=token, tls=tls, liveness=liveness,
                         fin_timeout=fin_timeout, cascade=cascade, window=window,
                         keepalive=keepalive, retry_interval=retry_interval,
                         start_wait=start_wait, max_connections=max_connections)
        self.forwards = forwards
        self.servers: list[asyncio.Server] = []
        self._no_link_log = FloodLog(
            log, f"agent {name}: %d more connection(s) refused in the last second: no link "
                 f"to the gateway {gateway}")

    async def start(self) -> None:
        """Connect to the gateway (`_first_link`), then listen on every forward."""
        await self._first_link()
        self._linked_up()
        loop = asyncio.get_running_loop()
        try:
            for host, port, service in self.forwards:
                try:
                    server = await loop.create_server(self._factory(service), host, port,
                                                      backlog=FORWARD_BACKLOG,
                                                      start_serving=False)
                except OSError as exc:  # (its own text names no service)
                    raise OSError(exc.errno, f"cannot listen on {host}:{port} for service "
                                  f"{service}: {connect_failure(exc)}") from exc
                self.servers.append(server)
                # accepted sockets inherit them: no per-accept cost (set before the first)
                for sock in listening_sockets(server):
                    self.sockopts.apply(sock)
                await server.start_serving()
                log.info("agent %s: forwarding %s to service %s", self.name,
                         format_address((host, listening_port(server))), service)
        except BaseException:
            await self.aclose()
            raise

    def _factory(self, service: str) -> Callable[[], SocketBridge]:
        def bridge() -> SocketBridge:
            return SocketBridge(None, label="application", on_done=self._done,
                                on_connect=lambda b: self._connected(b, service))
        return bridge

    def ports(self) -> list[int]:
        """The ports listened on, in the order of `forwards`."""
        return [listening_port(s) for s in self.servers]

    async def aclose(self, drain: float = 0.0) -> None:
        """Stop listening, end every connection and the link. With `drain`, the open
        connections get that many seconds to finish on their own first."""
        for server in self.servers:
            server.close()
        await self._close_edge(drain)
        self._no_link_log.close()
        for server in self.servers:  # (after the connections: from Python 3.12 on, it
            await server.wait_closed()  # waits for every connection it accepted)
        self.servers.clear()

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _connected(self, bridge: SocketBridge, service: str) -> None:
        held = len(self.bridges) + len(self.arriving)
        if self.max_connections is not None and held >= self.max_connections:
            self._over_limit(bridge, service, held)
            return
        self.arriving.add(bridge)
        spawn_owned(self.tasks, self._allocate(bridge, service))

    def _over_limit(self, bridge: SocketBridge, service: str, held: int) -> None:
        """Reset a connection beyond `max_connections`."""
        self.counters["refused"] += 1
        self.counters["over_limit"] += 1
        if bridge.transport is not None and not bridge.transport.is_closing():
            reset_socket(bridge.transport)
        self._over_log.event("agent %s: connection from %s to %s refused: %d "
                             "connection(s) open, at the limit (--max-connections %d)",
                             self.name, bridge.peer, service, held, self.max_connections)

    async def _allocate(self, bridge: SocketBridge, service: str) -> None:
        try:
            flow = await self.node.alloc(service, mode=self.mode)
        except TetherError as exc:
            self.arriving.discard(bridge)
            self.counters["refused"] += 1
            if bridge.transport is not None and not bridge.transport.is_closing():
                reset_socket(bridge.transport)
            # each refusal has its line, but for the flood of an outage
            say = log.warning if self.node.linked else self._no_link_log.event
            say("agent %s: connection from %s to %s refused: %s", self.name, bridge.peer,
                service, exc)
            return
        self.arriving.discard(bridge)
        log.info("flow %s allocated service=%s as %s for %s", flow.id, service,
                 flow.link_stream, bridge.peer)
        self._adopt(bridge)
        bridge.set_flow(flow)


class _AbandonConnect:
    """Gives up a connector's connect to a server that has not answered once its flow
    has ended (the application reset, the agent went away), `_ABANDON_GRACE` seconds
    after that end: it cancels the connecting task. A server that answers within the
    grace is connected, and the bridge passes the flow's end on to it (a reset)."""

    __slots__ = ("_bridge", "_handle", "_loop", "_task", "fired")

    def __init__(self, bridge: SocketBridge, loop: asyncio.AbstractEventLoop) -> None:
        self._bridge = bridge
        self._loop = loop
        self._task = asyncio.current_task()
        self._handle: asyncio.TimerHandle | None = None
        self.fired = False

    def flow_ended(self, _: object) -> None:
        if self._task is not None and self._handle is None:
            self._handle = self._loop.call_later(_ABANDON_GRACE, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if self._bridge.transport is None and self._task is not None \
                and not self._task.done():  # (connected: the bridge has the end)
            self.fired = True
            self._task.cancel()

    def disarm(self) -> None:
        """The connect is over (made, failed or given up): no cancel after this."""
        self._task = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Connector(_Edge):
    """Serves services to the gateway: each flow accepted becomes a TCP connection to
    the service's address. A server that cannot be reached resets the flow with the
    reason (the application's socket is reset at the agent). A flow that ends while its
    server has not answered yet (the application reset) is not waited for: the connect
    is given up `_ABANDON_GRACE` seconds later, not after the whole `connect_timeout`.
    A flow beyond `max_connections` (connected or connecting; default from the
    open-file limit) is reset at once (REFUSED, with the reason), logged and counted."""

    at_service = True
    role = "connector"

    def __init__(self, gateway: str, services: list[tuple[str, str, int]], *,
                 name: str = "connector", token: bytes | str = b"",
                 tls: ssl.SSLContext | None = None, liveness: float | None = 30.0,
                 fin_timeout: float = 60.0, connect_timeout: float = 5.0,
                 window: int = 256 * 1024, keepalive: float | None = 60.0,
                 retry_interval: float = 2.0, start_wait: float = 0.0,
                 max_connections: int | Literal["default"] | None = "default") -> None:
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive seconds, got {connect_timeout!r}")
        super().__init__(name, gateway, token=token, tls=tls, liveness=liveness,
                         fin_timeout=fin_timeout, cascade="half", window=window,
                         keepalive=keepalive, retry_interval=retry_interval,
                         start_wait=start_wait, max_connections=max_connections)
        self._connecting = 0  # flows whose server is being connected to
        self.services = {svc: (host, port) for svc, host, port in services}
        if len(self.services) != len(services):
            names = [svc for svc, _, _ in services]
            twice = sorted({svc for svc in names if names.count(svc) > 1})
            raise ValueError(f"service {', '.join(twice)} given more than once")
        self.connect_timeout = connect_timeout

    async def start(self) -> None:
        """Connect to the gateway (`_first_link`), register the services, start
        accepting flows."""
        await self._first_link()
        for service in self.services:
            self.node.register(service)  # (registered again on every new link)
        self._linked_up()
        spawn_owned(self.tasks, self._accept_loop())

    async def aclose(self, drain: float = 0.0) -> None:
        """End every connection and the link. With `drain`, the open connections get
        that many seconds to finish on their own first (no new flow comes meanwhile)."""
        await self._close_edge(drain)

    async def __aenter__(self) -> Connector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _accept_loop(self) -> None:
        while True:
            try:
                flow = await self.node.accept()
            except FlowDown:  # the link is lost: flows come again once it is back
                try:
                    await self.node.wait_linked()
                except TetherError:  # (closed)
                    return
                continue
            except TetherError:
                return
            held = len(self.bridges) + self._connecting
            if self.max_connections is not None and held >= self.max_connections:
                self._over_limit(flow, held)
                continue
            self._connecting += 1
            spawn_owned(self.tasks, self._connect(flow))
            del flow  # (not held here until the next one comes)

    def _over_limit(self, flow: Any, held: int) -> None:
        """Refuse a flow beyond `max_connections` (reset: the application's socket is
        reset at the agent, with the reason)."""
        self.counters["refused"] += 1
        self.counters["over_limit"] += 1
        flow.reset_nowait(f"connector {self.name} has {held} connection(s) open, its limit",
                          ErrorCode.REFUSED)
        self._over_log.event("connector %s: flow %s to %s refused: %d connection(s) open, "
                             "at the limit (--max-connections %d)", self.name, flow.id,
                             flow.service, held, self.max_connections)

    async def _connect(self, flow: Any) -> None:
        try:
            await self._connect_server(flow)
        finally:
            self._connecting -= 1

    async def _connect_server(self, flow: Any) -> None:
        address = host, port = self.services[flow.service]
        loop = asyncio.get_running_loop()
        bridge = SocketBridge(flow, label="server", on_done=self._done,
                              sockopts=self.sockopts)
        # No task or wait of its own per connection: the flow's end arms a timer that
        # cancels this task if its server has not answered within _ABANDON_GRACE.
        abandon = _AbandonConnect(bridge, loop)
        ended = flow.when_ended()
        ended.add_done_callback(abandon.flow_ended)
        try:
            async with asyncio.timeout(self.connect_timeout):  # (see aio.open_link)
                await loop.create_connection(lambda: bridge, host, port)
        except asyncio.CancelledError:
            if not abandon.fired or (task := asyncio.current_task()) is None \
                    or task.uncancel():  # (cancelled by someone else as well)
                raise
            log.info("flow %s ended while connecting to service %s at %s: "
                     "connection abandoned", flow.id, flow.service, format_address(address))
            return
        except (OSError, TimeoutError) as exc:
            if ended.done():  # (the flow had ended: nobody was refused)
                log.info("flow %s ended while connecting to service %s at %s: %s",
                         flow.id, flow.service, format_address(address),
                         str(exc) or "timed out")
                return
            self.counters["refused"] += 1
            log.warning("connector %s: flow %s: cannot connect to service %s at %s: %s",
                        self.name, flow.id, flow.service, format_address(address),
                        str(exc) or "timed out")
            flow.reset_nowait(f"cannot connect to service {flow.service}: "
                              f"{connect_failure(exc)}", ErrorCode.UNREACHABLE)
            return
        finally:
            abandon.disarm()
            ended.remove_done_callback(abandon.flow_ended)
        log.info("flow %s connected service=%s as %s to %s", flow.id, flow.service,
                 flow.link_stream, format_address(address))
        if bridge.on_done is None:  # the whole flow already ended while connecting
            self.counters["connections"] += 1
            return
        self._adopt(bridge)
