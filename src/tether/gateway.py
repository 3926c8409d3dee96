"""Gateway: accepts links from nodes, knows who serves what, splices flows between them.

Nodes `register` service names over their link; an `alloc` that reaches the gateway
is routed to one node serving that name (round-robin across instances) and the two
streams are joined by a `Splice`, which relays data, credit, FIN, CLOSE, RESET and
KEEPALIVE end to end. The gateway keeps no liveness of its own on relayed flows: the
two endpoints' keepalives pass through, so a frozen server is seen by its client as
exactly that ("unresponsive peer"), not masked by a healthy gateway in between.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import ssl
from collections import Counter, defaultdict
from typing import Any, Final, Literal

from . import wire
from .aio import (
    LinkConnection,
    SocketOptions,
    format_address,
    listening_port,
    open_link,
    parse_address,
    serve_links,
    spawn_owned,
)
from .backoff import retry_delay
from .errors import ErrorCode, HandshakeError, LocalProtocolError, TetherError
from .events import (
    DataReceived,
    Event,
    FinReceived,
    FlowAccepted,
    FlowEnded,
    FlowOpenRequested,
    HandshakeCompleted,
    KeepAliveReceived,
    LinkTerminated,
    MessageReceived,
    StreamProtocolError,
    WindowUpdated,
)
from .fdlimit import resolve_limit
from .floodlog import FloodLog
from .ids import FlowId, check_node_name
from .link import DEFAULT_MAX_WINDOW, LinkConfig, Role
from .listing import oldest
from .splice import Splice, SpliceEnd

__all__ = ["Gateway"]

log = logging.getLogger("tether.gateway")

# The events a splice handles, tested first (a tuple: `A | B` would build a union per call)
_SPLICED = (DataReceived, WindowUpdated, FinReceived, KeepAliveReceived)
_MAX_HOPS: Final = 8
_FIN: Final = int(wire.FrameType.FIN)
MAX_SERVICES_PER_NODE: Final = 4096
"""Services one node may register on its link: one that registers more is refused (its
link closed), so that no node can grow the gateway's service table without bound."""
SECOND_LINK_DRAIN: Final = 60.0
"""Seconds a second link between two peer gateways may carry the flows that began on
it before it was found to be one (`Gateway._drop_second_link`)."""


def _hops(n: int) -> str:
    return f"{n} hop" if n == 1 else f"{n} hops"


class Gateway:
    """A tether gateway. `await start()` (or `async with`), then nodes connect to `port`.

    `token`, when set, is required in every node's HELLO; a wrong one gets a GOAWAY
    with BAD_TOKEN (the node raises `HandshakeError`) and a log line here. `tokens`
    gives each node name its own token (a name not listed is refused). `tls` is a
    server-side `ssl.SSLContext` (require client certificates in it for mutual TLS).
    `policy` maps a node name (or "*") to the services it may allocate; when given,
    anything not allowed is denied (DENIED, logged).

    `peers` ({name: "host:port"}) makes a cluster: the gateway keeps a link to each
    peer gateway (re-dialled while down, with backoff up to `retry_interval`), tells it which
    services it can reach (a SERVICES control message, sent again on every change,
    with hop counts so that chains of gateways work and loops do not), and forwards a
    flow for a service it does not serve itself to the nearest peer that reaches it,
    with the same splice. A peer whose link is lost takes its routes with it, and the
    flows through it go DOWN on both ends. Either side may dial, and only while it has no
    link to that peer; when both dial at once, the pair keeps one link
    (`_drop_second_link`). The `policy` is
    enforced where a flow enters the cluster: flows forwarded by a gateway named in
    `peers` (or dialled by this one) skip it here; those from any other node, one
    posing as a gateway included, are checked against its name.
    """

    def __init__(self, listen: str = "127.0.0.1:7443", *, name: str = "gw",
                 token: bytes | str | None = None, tls: ssl.SSLContext | None = None,
                 heartbeat: float = 5.0, link_timeout: float = 15.0,
                 handshake_timeout: float = 10.0, window: int = 256 * 1024,
                 sockopts: SocketOptions | None = None,
                 tokens: dict[str, bytes] | None = None,
                 policy: dict[str, set[str]] | None = None,
                 peers: dict[str, str] | None = None,
                 retry_interval: float = 2.0,
                 peer_tls: ssl.SSLContext | None = None,
                 max_links: int | Literal["default"] | None = "default") -> None:
        max_links = resolve_limit(max_links, "max_links")
        self.max_links = max_links
        self._over_log = FloodLog(log, f"gateway {name}: %d more link(s) refused in the "
                                      f"last second, at the limit (--max-links {max_links})")
        self.listen = listen
        self.name = check_node_name(name)
        self.token = token.encode() if isinstance(token, str) else token
        self.tls = tls
        self.heartbeat = heartbeat
        self.link_timeout = link_timeout
        self.handshake_timeout = handshake_timeout
        self.window = window
        self.sockopts = sockopts
        self.tokens = tokens
        self.policy = policy
        self.peers = dict(peers or {})
        self.retry_interval = retry_interval
        self.peer_tls = peer_tls
        self._server: asyncio.Server | None = None
        # the cluster: links to peer gateways, and what each peer says it can reach
        self._peer_links: dict[str, set[LinkConnection]] = defaultdict(set)
        self._routes: dict[str, dict[str, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._advertised: dict[str, int] = {}
        self._conns: set[LinkConnection] = set()
        self._services: dict[str, list[LinkConnection]] = defaultdict(list)
        self._registered: Counter[LinkConnection] = Counter()  # services per link
        self._rr: dict[str, int] = defaultdict(int)
        self._ends: dict[tuple[LinkConnection, int], tuple[Splice, SpliceEnd]] = {}
        self._accepted: set[LinkConnection] = set()  # every accepted link until it ends
        self._serial = 0
        self.counters: dict[str, int] = dict.fromkeys(
            ("links_accepted", "links_refused", "links_over_limit", "flows_opened",
             "flows_spliced", "flows_ended", "flows_closed", "flows_refused", "flows_down",
             "flows_reset", "bytes_up", "bytes_down", "no_such_service", "denied",
             "protocol_errors"), 0)
        # Settings a link would refuse are refused here, at once, not by every link later
        # (a gateway with window 0 printed "listening", then failed each connection).
        if not retry_interval > 0:
            raise ValueError(f"retry_interval must be positive seconds, got {retry_interval}")
        for address in self.peers.values():
            parse_address(address)
        self._config()

    def _config(self, *, dial: bool = False) -> LinkConfig:
        return LinkConfig(name=self.name, token=(self.token or b"") if dial else b"",
                          expected_token=None if dial else self.token,
                          heartbeat_interval=self.heartbeat, link_timeout=self.link_timeout,
                          handshake_timeout=self.handshake_timeout,
                          initial_window=self.window,
                          max_window=max(DEFAULT_MAX_WINDOW, self.window), relay_streams=True,
                          authorize=self._authorize
                          if self.tokens is not None and not dial else None)

    def _authorize(self, name: str, token: bytes) -> bool:
        assert self.tokens is not None
        expected = self.tokens.get(name)
        return expected is not None and hmac.compare_digest(expected, token)  # (see Link)

    def allowed(self, node: str, service: str) -> bool:
        """Whether the policy lets `node` allocate flows to `service`."""
        if self.policy is None:
            return True
        return service in self.policy.get(node, ()) or service in self.policy.get("*", ())

    async def start(self) -> None:
        """Start listening."""
        host, port = parse_address(self.listen)
        self._server = await serve_links(host, port, self._config, self, ssl_context=self.tls,
                                         sockopts=self.sockopts, accepted=self._accepted,
                                         max_links=self.max_links,
                                         over_limit=self._link_over_limit,
                                         refusal=f"gateway {self.name} is at its limit of "
                                                 f"{self.max_links} link(s) (--max-links)")
        log.info("gateway %s listening on %s", self.name, format_address((host, self.port)))
        for peer, address in self.peers.items():
            spawn_owned(self._tasks, self._keep_peer(peer, address))

    def _link_over_limit(self, peer: str) -> None:
        """A connection beyond `max_links` was refused as it was accepted."""
        self.counters["links_refused"] += 1
        self.counters["links_over_limit"] += 1
        self._over_log.event("gateway %s: link from %s refused: %d link(s) open or in "
                             "their handshake, at the limit (--max-links %s)", self.name,
                             peer, len(self._accepted), self.max_links)

    async def _keep_peer(self, peer: str, address: str) -> None:
        """Dial a peer gateway and keep the link up: re-dial while it is down, waiting
        `tether.backoff.retry_delay` up to `retry_interval` between attempts (the rule of
        the edges and the mesh: a peer that is back is found within tens of
        milliseconds, and gateways that lost the same peer do not dial it in step)."""
        host, port = parse_address(address)
        attempts = 0
        refused = ""
        while True:
            existing = self._peer_link(peer)
            if existing is not None:  # (it dialled this gateway: one link is the pair's)
                await asyncio.shield(existing.closed)
                await asyncio.sleep(retry_delay(0, self.retry_interval))
                continue
            try:
                conn = await open_link(host, port, self._config(dial=True), self,
                                       ssl_context=self.peer_tls, sockopts=self.sockopts,
                                       connect_timeout=self.retry_interval * 2)
            except TetherError as exc:
                # A peer that answers and refuses the link (TLS, token, version) is not a
                # peer still starting but a misconfiguration: said once per reason.
                if isinstance(exc, HandshakeError) and str(exc) != refused:
                    refused = str(exc)
                    log.warning("gateway %s: peer %s at %s refused the link: %s", self.name,
                                peer, address, exc)
                else:
                    log.debug("gateway %s: peer %s at %s unreachable: %s", self.name, peer,
                              address, exc)
                await asyncio.sleep(retry_delay(attempts, self.retry_interval))
                attempts += 1
                continue
            attempts = 0
            refused = ""
            if conn.link.peer_name != peer:
                log.warning("gateway %s: %s answered as %r, not %r", self.name, address,
                            conn.link.peer_name, peer)
            await asyncio.shield(conn.closed)
            await asyncio.sleep(retry_delay(0, self.retry_interval))

    @property
    def port(self) -> int:
        """The port the gateway listens on."""
        if self._server is None:
            raise LocalProtocolError("gateway not started")
        return listening_port(self._server)

    async def aclose(self, drain: float = 0.0) -> None:
        """Stop accepting, then close every link (their flows end "shutdown")."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(c.aclose("shutdown", drain) for c in list(self._conns)))
        for conn in list(self._accepted):  # (still in their handshake)
            conn.close("shutdown")
        self._over_log.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        """Start if needed and serve until cancelled."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    def services(self) -> dict[str, list[str]]:
        """Which node names serve which service (here, or via which peer gateway)."""
        table = {svc: [c.link.peer_name or "?" for c in conns]
                 for svc, conns in self._services.items() if conns}
        for peer, routes in self._routes.items():
            if self._peer_link(peer) is not None:
                for svc, hops in routes.items():
                    table.setdefault(svc, []).append(f"{peer} (gateway, {_hops(hops + 1)})")
        return table

    def cluster(self) -> dict[str, Any]:
        """Peer gateways: whether a link is up, and the services each reaches."""
        names = set(self.peers) | set(self._peer_links)
        return {peer: {"up": self._peer_link(peer) is not None,
                       "address": self.peers.get(peer, "(dialled us)"),
                       "services": dict(self._routes.get(peer, {}))}
                for peer in sorted(names)}

    def stats(self, flows: int | None = None) -> dict[str, Any]:
        """Counters (flows ended by how their first side ended; bytes, open flows'
        included, as they move), and what is open now: `flows` counts the open flows,
        `open_flows` lists them with their age and bytes (up: from the allocating side
        toward the service, as the edges count them), all of them or the `flows`
        oldest.

        They add up: `flows_opened` (splices made: the gateway forwarded the OPEN) is
        `flows_ended` + `flows`, and `flows_ended` is `flows_closed` + `flows_refused` +
        `flows_down` + `flows_reset`. `flows_spliced` counts only the flows the serving
        side accepted: one refused, reset or gone DOWN before that is opened and ended,
        never spliced."""
        splices = {id(s): s for s, _ in self._ends.values()}.values()
        now = asyncio.get_running_loop().time()
        counters = dict(self.counters)
        for s in splices:  # (a flow's bytes move into `counters` when it ends)
            counters["bytes_up"] += s.bytes_up
            counters["bytes_down"] += s.bytes_down
        limit = {} if self.max_links is None else {"max_links": self.max_links}
        return {"name": self.name, "links": len(self._conns), "flows": len(splices), **limit,
                "services": self.services(), "peers": self.cluster(), **counters,
                "open_flows": [{"id": str(s.id), "service": s.service, "from": repr(s.a),
                                "to": repr(s.b), "age": round(now - s.opened_at, 3),
                                "bytes_up": s.bytes_up, "bytes_down": s.bytes_down}
                               for s in oldest(splices, flows)]}

    # link events ----------------------------------------------------------------------

    def link_event(self, conn: LinkConnection, event: Event) -> None:
        """Dispatch one event of one node's link."""
        if isinstance(event, _SPLICED):
            entry = self._ends.get((conn, event.stream))
            if entry is None:
                return
            splice, end = entry
            if isinstance(event, DataReceived):
                splice.on_data(end, event.data)
            elif isinstance(event, WindowUpdated):
                splice.on_credit(end)
            elif isinstance(event, FinReceived):
                splice.on_fin(end)
            else:
                splice.on_keepalive(end)
        elif isinstance(event, FlowEnded):
            self._on_ended(conn, event)
        elif isinstance(event, FlowAccepted):
            self._on_accepted(conn, event.stream)
        elif isinstance(event, FlowOpenRequested):
            self._on_open(conn, event)
        elif isinstance(event, MessageReceived):
            self._on_control(conn, event)
        elif isinstance(event, HandshakeCompleted):
            self._conns.add(conn)
            self.counters["links_accepted"] += 1
            log.info("gateway %s: node %s connected from %s", self.name, event.peer_name,
                     conn.peer_address)
            if event.peer_name in self.peers or conn.link.role is Role.CLIENT:
                self._peer_links[event.peer_name].add(conn)
                log.info("gateway %s: peer gateway %s up (%s)", self.name, event.peer_name,
                         conn.peer_address)
                self._send_table(conn)
                self._drop_second_link(event.peer_name)
        elif isinstance(event, LinkTerminated):
            self._on_link_terminated(conn, event)
        elif isinstance(event, StreamProtocolError):
            self.counters["protocol_errors"] += 1
            log.warning("gateway %s: protocol error from %s on stream %d: %s", self.name,
                        conn.link.peer_name, event.stream, event.reason)

    def stream_end_ahead(self, conn: LinkConnection, stream: int, ftype: int) -> bool:
        """A FIN or CLOSE (`ftype`) for `stream` is about to be handled: the splice passes
        it on now; True if it did (see `LinkHandler`)."""
        entry = self._ends.get((conn, stream))
        return entry is not None and entry[0].end_ahead(entry[1], ftype == _FIN)

    def _on_control(self, conn: LinkConnection, event: MessageReceived) -> None:
        if event.kind == wire.KIND_SERVICES:
            self._on_services(conn, event.body)
            return
        if event.kind == wire.KIND_REGISTER or event.kind == wire.KIND_UNREGISTER:
            if conn.link.is_closed:  # (refused: the rest of its read is not heard)
                return
            service = event.body.decode(errors="replace")
            if event.kind == wire.KIND_REGISTER:
                servers = self._services[service]
                if conn not in servers:
                    if self._registered[conn] >= MAX_SERVICES_PER_NODE:
                        if not servers:
                            del self._services[service]
                        self._too_many_services(conn)
                        return
                    servers.append(conn)
                    self._registered[conn] += 1
                log.info("gateway %s: %s registered service %s", self.name,
                         conn.link.peer_name, service)
            elif conn in self._services.get(service, ()):
                self._forget_server(service, conn)
                log.info("gateway %s: %s unregistered service %s", self.name,
                         conn.link.peer_name, service)
            self._advertise()
        else:
            log.warning("gateway %s: ignored message kind %#x from %s", self.name, event.kind,
                        conn.link.peer_name)

    # the cluster ----------------------------------------------------------------------

    def _drop_second_link(self, peer: str) -> None:
        """Two gateways that name each other with `--peer` both dial, and at start (or
        after a loss) both links may come up. Each gateway keeps the one dialled by the
        gateway whose name sorts first, so both keep the same, and drains the other
        (GOAWAY: a flow that began on it meanwhile finishes, for up to
        `SECOND_LINK_DRAIN` seconds); `_keep_peer` dials only while there is no link."""
        links = [c for c in self._peer_links.get(peer, ()) if c.link.is_open]
        if len(links) < 2:
            return
        dialled_by_first = Role.CLIENT if self.name < peer else Role.SERVER
        keep = [c for c in links if c.link.role is dialled_by_first]
        if len(keep) != 1:  # (not the pair's two dials: left as they are)
            return
        for conn in links:
            if conn is not keep[0]:
                self._peer_links[peer].discard(conn)
                log.info("gateway %s: a second link with peer %s (%s): keeping the one %s "
                         "dialled", self.name, peer, conn.peer_address,
                         "this gateway" if dialled_by_first is Role.CLIENT else peer)
                spawn_owned(self._tasks, conn.aclose("a second link", SECOND_LINK_DRAIN))

    def _peer_link(self, peer: str) -> LinkConnection | None:
        for conn in self._peer_links.get(peer, ()):
            if conn.link.is_open:
                return conn
        return None

    def _on_services(self, conn: LinkConnection, body: bytes) -> None:
        """A peer gateway's table: {service: hops from it}."""
        peer = conn.link.peer_name or "?"
        try:
            table = json.loads(body)
            routes = {str(k): int(v) for k, v in table.items()}
        except (ValueError, AttributeError, TypeError) as exc:
            self.counters["protocol_errors"] += 1
            log.warning("gateway %s: bad SERVICES message from %s: %s", self.name, peer, exc)
            return
        if not conn.link.is_open:  # (a second link, draining: the first one tells)
            return
        new_peer = conn not in self._peer_links[peer]
        self._peer_links[peer].add(conn)
        if new_peer and len(self._peer_links[peer]) == 1:
            log.info("gateway %s: peer gateway %s up (%s)", self.name, peer, conn.peer_address)
            self._send_table(conn)
        if routes != self._routes.get(peer):
            self._routes[peer] = routes
            log.info("gateway %s: peer %s reaches %s", self.name, peer,
                     ", ".join(f"{s} ({_hops(h + 1)})" for s, h in sorted(routes.items()))
                     or "nothing")
            self._advertise()

    def _table_for(self, peer: str) -> dict[str, int]:
        """What this gateway reaches, as told to `peer` (never what `peer` told us:
        split horizon, so that two gateways do not count to infinity)."""
        table = {svc: 0 for svc, conns in self._services.items()
                 if any(c.link.is_open for c in conns)}
        for other, routes in self._routes.items():
            if other == peer or self._peer_link(other) is None:
                continue
            for svc, hops in routes.items():
                if hops + 1 < _MAX_HOPS and hops + 1 < table.get(svc, _MAX_HOPS):
                    table[svc] = hops + 1
        return table

    def _send_table(self, conn: LinkConnection) -> None:
        table = self._table_for(conn.link.peer_name or "?")
        if conn.link.is_open:
            conn.link.send_message(wire.KIND_SERVICES, 0,
                                   json.dumps(table, sort_keys=True).encode(), conn.now)
            conn.flush()

    def _advertise(self) -> None:
        """Tell every peer gateway (and every gateway we dialled) what we reach now."""
        for conns in self._peer_links.values():
            for conn in conns:
                self._send_table(conn)

    def _pick(self, service: str) -> LinkConnection | None:
        servers = [c for c in self._services.get(service, ()) if c.link.is_open]
        if servers:
            i = self._rr[service] % len(servers)
            self._rr[service] = i + 1
            return servers[i]
        best: tuple[int, str] | None = None
        for peer, routes in self._routes.items():
            hops = routes.get(service)
            if hops is not None and self._peer_link(peer) is not None \
                    and (best is None or (hops, peer) < best):
                best = (hops, peer)
        return self._peer_link(best[1]) if best is not None else None

    def _on_open(self, conn: LinkConnection, event: FlowOpenRequested) -> None:
        now = conn.now
        who = conn.link.peer_name or "?"
        # Policy is enforced at the first gateway only, so only a trusted gateway's flows
        # skip it: one named in `peers`, or one we dialled. Any other node that sends a
        # SERVICES message is a peer for routes, but does not get past the policy (an
        # agent that posed as a gateway reached every service).
        from_peer = conn in self._peer_links.get(who, ()) and (
            who in self.peers or conn.link.role is Role.CLIENT)
        if not from_peer and not self.allowed(who, event.service):
            self.counters["denied"] += 1
            log.warning("gateway %s: denied %s access to service %s (policy)", self.name, who,
                        event.service)
            conn.link.reject_flow(event.stream, ErrorCode.DENIED,
                                  f"denied by policy: {who} may not reach {event.service!r}",
                                  now)
            return
        target = self._pick(event.service)
        if target is None:
            self.counters["no_such_service"] += 1
            log.warning("gateway %s: %s asked for unknown service %r", self.name,
                        event.origin or conn.link.peer_name, event.service)
            conn.link.reject_flow(event.stream, ErrorCode.NO_SUCH_SERVICE,
                                  f"no such service: {event.service!r}", now)
            return
        try:
            sid = target.link.open_flow(event.service, target.now, liveness=event.liveness,
                                        mode=event.mode, origin=event.origin)
        except (LocalProtocolError, ValueError) as exc:
            conn.link.reject_flow(event.stream, ErrorCode.REFUSED, str(exc), now)
            return
        self._serial += 1
        splice = Splice(FlowId(node=self.name, serial=self._serial), event.service,
                        SpliceEnd(conn, event.stream), SpliceEnd(target, sid), event.mode,
                        now)
        self._ends[(conn, event.stream)] = (splice, splice.a)
        self._ends[(target, sid)] = (splice, splice.b)
        self.counters["flows_opened"] += 1
        target.flush()

    def _on_accepted(self, conn: LinkConnection, stream: int) -> None:
        entry = self._ends.get((conn, stream))
        if entry is None:
            return
        splice, end = entry
        a = splice.a
        if end is splice.b and not a.ended:
            a.conn.link.accept_flow(a.stream, a.conn.now)
            a.conn.flush()
            self.counters["flows_spliced"] += 1
            log.info("flow %s spliced service=%s %r -> %r", splice.id, splice.service, a,
                     splice.b)

    def _on_ended(self, conn: LinkConnection, event: FlowEnded) -> None:
        entry = self._ends.pop((conn, event.stream), None)
        if entry is None:
            return
        splice, end = entry
        b_refused = end is splice.b and event.reason.startswith("refused")
        if b_refused and not splice.a.ended:
            splice.note_end(end, event)
            a = splice.a
            a.ended = True
            end.ended = True
            self._ends.pop((a.conn, a.stream), None)
            a.conn.link.reject_flow(a.stream, event.code, event.reason.removeprefix("refused: "),
                                    a.conn.now)
            a.conn.flush()
        else:
            splice.on_end(end, event)
        if splice.finished and not splice.reported:
            splice.reported = True
            counters = self.counters
            counters["flows_ended"] += 1
            counters[f"flows_{splice.first_end or 'closed'}"] += 1
            counters["bytes_up"] += splice.bytes_up
            counters["bytes_down"] += splice.bytes_down
            log.info("flow %s ended: %s, first %s, %d bytes up, %d bytes down, %.3fs",
                     splice.id, (splice.first_end or "closed").upper(), splice.first_why,
                     splice.bytes_up, splice.bytes_down, conn.now - splice.opened_at)

    def _too_many_services(self, conn: LinkConnection) -> None:
        self.counters["protocol_errors"] += 1
        why = f"more than {MAX_SERVICES_PER_NODE} services registered on one link"
        log.warning("gateway %s: %s: %s; link closed", self.name, conn.link.peer_name, why)
        conn.close(why, ErrorCode.REFUSED)

    def _forget_server(self, service: str, conn: LinkConnection) -> None:
        """`conn` no longer serves `service` (an entry left empty goes: nodes that come
        and go with names of their own must not grow the table)."""
        servers = self._services[service]
        servers.remove(conn)
        if not servers:
            del self._services[service]
            self._rr.pop(service, None)  # (its round-robin turn goes with it)
        self._registered[conn] -= 1
        if not self._registered[conn]:
            del self._registered[conn]

    def _on_link_terminated(self, conn: LinkConnection, event: LinkTerminated) -> None:
        self._conns.discard(conn)
        changed = False
        for service in [svc for svc, servers in self._services.items() if conn in servers]:
            self._forget_server(service, conn)
            changed = True
        peer = conn.link.peer_name or "?"
        if conn in self._peer_links.get(peer, ()):
            self._peer_links[peer].discard(conn)
            if not self._peer_links[peer]:
                del self._peer_links[peer]
                self._routes.pop(peer, None)
                changed = True
                log.warning("gateway %s: peer gateway %s down: %s", self.name, peer,
                            event.reason)
        if changed:
            self._advertise()
        if event.code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.FRAME_TOO_LARGE,
                          ErrorCode.BAD_TOKEN, ErrorCode.VERSION_MISMATCH,
                          ErrorCode.HANDSHAKE_FAILED):
            self.counters["protocol_errors"] += 1
            if event.code in (ErrorCode.BAD_TOKEN, ErrorCode.HANDSHAKE_FAILED,
                              ErrorCode.VERSION_MISMATCH):
                self.counters["links_refused"] += 1
            log.warning("gateway %s: link from %s (%s) closed: %s", self.name,
                        conn.link.peer_name or "?", conn.peer_address, event.reason)
        elif not conn.ready.done():  # no HELLO completed: it never was a node's link
            log.info("gateway %s: link %s %s ended before its handshake: %s", self.name,
                     "to" if conn.link.role is Role.CLIENT else "from", conn.peer_address,
                     event.reason)
        else:
            log.info("gateway %s: node %s disconnected: %s", self.name,
                     conn.link.peer_name or conn.peer_address, event.reason)
