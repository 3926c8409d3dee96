"""The admin endpoint of every tether daemon: `GET /status` (JSON) and `GET /metrics`
(Prometheus text exposition), on loopback by default. `tether status HOST:PORT`
reads the first.

It is a deliberately tiny HTTP/1.0 server on an asyncio Protocol: one request per
connection, GET only, a bounded request size, so it cannot be turned into a resource
sink by a misbehaving client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from . import heldreads
from .aio import format_address, listening_port, reset_socket

__all__ = ["AdminServer", "fetch_status", "flatten"]

log = logging.getLogger("tether.admin")
_MAX_REQUEST = 8192
GAUGES: frozenset[str] = frozenset({
    "links", "flows", "open", "queued", "queued_bytes", "paused", "workers", "pid", "rss",
    "rss_total", "unread_bytes", "failed_bytes", "down_since", "up_since", "exit",
    "serials_above", "linked", "max_connections", "max_links", "parked_bytes"})
"""The stats keys that say what is now (exported as gauges); every other number in a
daemon's stats only grows while the daemon runs (a counter: `..._total`)."""


def flatten(stats: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Numeric leaves of a stats dict as (dotted_name, value); lists are skipped."""
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, (bool, int | float)):
            yield name, float(value)
        elif isinstance(value, dict):
            yield from flatten(value, f"{name}_")


class _StatsCollector:
    """Turns the daemon's stats() into metrics, read at scrape time: counters, and
    gauges for the keys in `GAUGES` (a stats dict nested under a key: its keys joined)."""

    def __init__(self, role: str, name: str, stats: Callable[[], dict[str, Any]],
                 responses: dict[str, int]) -> None:
        self.role = role
        self.name = name
        self.stats = stats
        self.responses = responses

    def collect(self) -> Iterator[Metric]:
        stats = dict(self.stats())
        # A gateway's peers are label values, not parts of metric names: "gw-2" and
        # "gw_2" made the same name twice (a scrape Prometheus rejects), and each peer
        # and service a metric of its own.
        peers: dict[str, Any] = stats.pop("peers", None) or {}
        for key, value in flatten(stats):
            metric = "tether_" + "".join(c if c.isascii() and c.isalnum() else "_"
                                         for c in key)
            gauge = key in GAUGES or any(key.endswith("_" + g) for g in GAUGES)
            family: GaugeMetricFamily | CounterMetricFamily = (
                GaugeMetricFamily if gauge else CounterMetricFamily)(
                metric, f"tether {self.role} {key}", labels=["role", "node"])
            family.add_metric([self.role, self.name], value)
            yield family
        if peers:
            up = GaugeMetricFamily("tether_peer_up", f"tether {self.role}: 1 while the "
                                   "link to this peer gateway is up",
                                   labels=["role", "node", "peer"])
            hops = GaugeMetricFamily("tether_peer_service_hops", f"tether {self.role}: "
                                     "gateway hops from this peer to the service",
                                     labels=["role", "node", "peer", "service"])
            for peer, info in sorted(peers.items()):
                up.add_metric([self.role, self.name, peer], float(info["up"]))
                for service, n in sorted(info["services"].items()):
                    hops.add_metric([self.role, self.name, peer, service], float(n))
            yield up
            yield hops
        answered = CounterMetricFamily(
            "tether_admin_responses", f"tether {self.role}: admin endpoint answers by "
            "HTTP status (not 200: bad requests, timeouts, clients turned away)",
            labels=["role", "node", "code"])
        for code, n in sorted(self.responses.items()):
            answered.add_metric([self.role, self.name, code], n)
        yield answered


class AdminServer:
    """Serves `/status` and `/metrics` for one daemon. `stats` is called per request.
    A client that has not sent its whole request within `request_timeout` seconds gets
    "408 Request Timeout" and is closed (before, a silent client was held for ever);
    one that does not read its answer is reset after as long again.
    At most `max_connections` are held at once: a new one beyond that ends the oldest
    still waiting for its request ("503 Service Unavailable"), so that idle clients
    cannot take the file descriptors the daemon's own connections need, nor keep a
    status request out.
    Every answer is counted by its status code (`responses`: in /status under
    "admin", and `tether_admin_responses_total`); every one but a 200 is logged at
    INFO, with the client and why."""

    request_timeout: float = 10.0
    max_connections: int = 64
    listed_flows: int = 100  # open flows a /status lists unless asked (`?flows=N|all`)

    def __init__(self, listen: tuple[str, int], role: str, name: str,
                 stats: Callable[..., dict[str, Any]]) -> None:
        """`stats` may take a keyword `flows`: how many open flows to list (None: all).
        Then `/status` lists the `listed_flows` oldest (`?flows=N` or `?flows=all` for
        more), and `/metrics` none: the status of a gateway with 400,000 open flows
        took about 2.5 s to build and serialise, in which none of its flows moved."""
        self.listen = listen
        self.role = role
        self.name = name
        self._limits = "flows" in inspect.signature(stats).parameters
        self.stats = stats
        self.responses: dict[str, int] = {}  # answers by status code ("200", "404")
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(
            role, name, functools.partial(stats, flows=0) if self._limits else stats,
            self.responses))
        self._server: asyncio.Server | None = None
        self.waiting: dict[_AdminProtocol, None] = {}  # no request yet, oldest first

    async def start(self) -> None:
        """Listen."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _AdminProtocol(self), *self.listen)
        log.info("%s %s: admin endpoint on %s", self.role, self.name,
                 format_address((self.listen[0], self.port)))

    @property
    def port(self) -> int:
        """The port listened on."""
        assert self._server is not None
        return listening_port(self._server)

    async def aclose(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def respond(self, path: str) -> tuple[str, str, bytes]:
        """(status line, content type, body) for a GET of `path`. The reads a relay
        hop still holds (`tether.heldreads`) are applied first: the answer counts every
        frame read, not only those handled by then."""
        heldreads.current().apply()
        path, _, query = path.partition("?")
        if path in ("/", "/status"):
            if not self._limits:
                stats = self.stats()
            else:
                try:
                    stats = self.stats(flows=self._flows_asked(query))
                except ValueError as exc:
                    return "400 Bad Request", "text/plain", f"{exc}\n".encode()
            body = json.dumps({"role": self.role, **stats,
                               "admin": {"responses": dict(sorted(self.responses.items()))}},
                              indent=2, default=str)
            return "200 OK", "application/json", body.encode() + b"\n"
        if path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4", generate_latest(self.registry)
        return "404 Not Found", "text/plain", b"not found: try /status or /metrics\n"

    def _flows_asked(self, query: str) -> int | None:
        """The `flows` of a /status query: a count, `all` (None), or the default."""
        for item in query.split("&"):
            key, _, value = item.partition("=")
            if key == "flows":
                if value == "all":
                    return None
                if not value.isascii() or not value.isdigit():
                    raise ValueError(f"flows={value[:20]!r}: expected a count or 'all'")
                return int(value)
        return self.listed_flows


class _AdminProtocol(asyncio.Protocol):
    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        waiting = self.server.waiting
        if len(waiting) >= self.server.max_connections:
            oldest = next(iter(waiting))
            oldest._reply("503 Service Unavailable", "text/plain", b"too many clients\n",
                          f"{len(waiting)} clients without a request, the oldest turned "
                          "away")
        waiting[self] = None
        self.timer = asyncio.get_running_loop().call_later(
            self.server.request_timeout, self._reply, "408 Request Timeout", "text/plain",
            b"no request\n", f"no request within {self.server.request_timeout:g} s")

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.waiting.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing():  # answered already: the rest is not read
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer and b"\n\n" not in self.buffer:
            if len(self.buffer) > _MAX_REQUEST:
                self._reply("431 Request Header Fields Too Large", "text/plain",
                            b"too large\n", f"no request in the first {len(self.buffer)} bytes")
            return
        line = bytes(self.buffer).split(b"\n", 1)[0].strip()
        parts = line.split()
        request = repr(line[:100].decode("ascii", "replace"))
        if len(parts) < 2 or parts[0] != b"GET":
            self._reply("405 Method Not Allowed", "text/plain", b"GET only\n", request)
            return
        try:
            status, ctype, body = self.server.respond(parts[1].decode("ascii", "replace"))
        except Exception as exc:  # a stats() bug must not kill the daemon
            log.exception("admin endpoint failed")
            status, ctype, body = "500 Internal Server Error", "text/plain", f"{exc}\n".encode()
        why = request if status.startswith("500") else \
            f"{request}: {body.decode(errors='replace').strip()[:200]}"
        self._reply(status, ctype, body, why)

    def _reply(self, status: str, ctype: str, body: bytes, why: str = "") -> None:
        assert self.transport is not None
        server = self.server
        server.waiting.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
        code = status.partition(" ")[0]
        server.responses[code] = server.responses.get(code, 0) + 1
        if code != "200":
            peer = format_address(self.transport.get_extra_info("peername"))
            log.info("%s %s: admin endpoint answered %s to %s: %s", server.role, server.name,
                     status, peer, why)
        head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        self.transport.close()
        if self.transport.get_write_buffer_size():  # a client that does not read: it
            self.timer = asyncio.get_running_loop().call_later(  # gets as long again
                self.server.request_timeout, reset_socket, self.transport)


async def fetch_status(host: str, port: int, path: str = "/status",
                       timeout: float = 5.0) -> bytes:
    """GET `path` from an admin endpoint; the body."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                raw = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:  # its own text is empty: "tether status: " said nothing
        raise TimeoutError(f"no answer from {host}:{port} within {timeout:g}s") from None
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not raw:
        raise OSError(f"admin endpoint {host}:{port} answered: nothing")
    if not status or not status[0].startswith(b"HTTP/1."):  # (a gateway's link port?)
        raise OSError(f"{host}:{port} is not an admin endpoint (no HTTP answer); a daemon "
                      "prints its own at start: \"... admin endpoint on port N\"")
    if len(status) < 2 or status[1] != b"200":
        first = head.splitlines()[0].decode("ascii", "replace")
        first = "".join(c if c.isprintable() else "?" for c in first)
        raise OSError(f"admin endpoint {host}:{port} answered: {first[:200]}")
    return body
