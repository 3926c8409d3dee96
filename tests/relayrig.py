"""Real processes for the relay tests: `tether gateway|connector|agent`, and the servers and
clients they carry (an HTTP server, redis-server, socat, a small echo server).

    with Rig() as rig:
        gw = rig.gateway()                                 # waits for "listening on port N"
        web = rig.http_server(directory)                   # python -m http.server
        co = rig.connector(gw, {"web": web.port})          # waits for the gateway's REGISTER
        ag = rig.agent(gw, ["web"])                        # ag.ports["web"]
        ...
        rig.wait_idle(gw, co, ag)                          # open flows back to zero

    A two-gateway cluster, the agent on gw1 and the connector on gw2:

        relay = rig.tunnel({"web": web.port}, gateways=2)  # relay.agent, relay.gateways, ...

Every daemon is started with `sys.executable -m tether.cli` and is ready when it printed
its readiness lines on stderr (never after a sleep); its admin port is read from the line
"ROLE NAME admin endpoint on port N". `Daemon.status()` is the JSON of its `/status`,
`Daemon.fds()` / `Daemon.rss()` read /proc/PID. `Rig.close()` (the context manager's
exit) ends every process it started by PID -- SIGCONT for a stopped one, SIGKILL, wait --
even when the test failed (`procs.ProcGroup` does the work).

Bounds: readiness waits `READY_TIMEOUT`; every wait here takes a timeout and fails
with what the processes printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from procs import READY_TIMEOUT, Proc, ProcGroup, tether_argv

__all__ = [
    "ECHO_SERVER",
    "LINGER_ZERO",
    "BridgesLeaked",
    "Daemon",
    "EchoServer",
    "Relay",
    "Rig",
    "Server",
    "fd_count",
    "free_port",
    "free_ports",
    "get_status",
    "need",
    "open_counts",
    "reset_close",
    "rss_bytes",
    "tcp_state",
    "wait_listening",
    "wait_reset_after_eof",
    "wait_until",
]

HOST = "127.0.0.1"
LINGER_ZERO = struct.pack("ii", 1, 0)
# How long a daemon may take to free a flow's state after both ends have ended.
IDLE_TIMEOUT = 10.0

# An echo server as a separate process (for SIGSTOP): one thread per connection, echoes
# until EOF, then shuts down its write side and waits for the peer to close.
ECHO_SERVER = r"""
import socket, sys, threading
srv = socket.create_server(("127.0.0.1", 0))
print("echo listening on port", srv.getsockname()[1], flush=True)
def serve(conn):
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
        except OSError:
            pass
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class BridgesLeaked(AssertionError):
    """An agent or connector still lists connections ("open" in its status) whose flow
    and socket have both ended (see the report of issue 6's tests: the bridge
    bookkeeping bugs in relay.py / bridge.py). A distinct type, so that an xfail on it
    does not hide any other failure."""


def need(*programs: str) -> None:
    """Skip the test, with the reason, if one of `programs` is not installed."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian packages: "
                    "curl netcat-openbsd socat redis-server redis-tools haproxy)")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for programs that cannot be told port 0)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 now (all held bound while choosing)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]


def echo_once(port: int, data: bytes) -> bytes:
    """`data` sent to `port` (an agent's forward to an echo), the write side shut; the
    whole answer, up to the EOF."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def reset_close(sock: socket.socket) -> None:
    """Close `sock` with a TCP RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    sock.close()


TCP_CLOSE = 7  # include/net/tcp_states.h
TCP_CLOSE_WAIT = 8


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of `sock` (tcpi_state, the first byte of TCP_INFO)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


def wait_reset_after_eof(sock: socket.socket, timeout: float = 5.0) -> float:
    """For a socket that already read EOF (CLOSE_WAIT; `recv` returns b"" at once from
    then on): wait until the peer's RST moves it to CLOSE; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    while (state := tcp_state(sock)) != TCP_CLOSE:
        if time.monotonic() >= deadline:
            raise AssertionError(f"no reset within {timeout:g}s (TCP state {state})")
        time.sleep(0.005)
    return time.monotonic()


def fd_count(pid: int) -> int:
    """The number of open file descriptors of process `pid`."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def get_status(admin_port: int, path: str = "/status", timeout: float = 5.0) -> Any:
    """GET an admin endpoint (plain blocking HTTP; JSON decoded for /status)."""
    conn = http.client.HTTPConnection(HOST, admin_port, timeout=timeout)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        body = reply.read()
    finally:
        conn.close()
    assert reply.status == 200, f"GET {path} on admin port {admin_port}: {reply.status}"
    return json.loads(body) if path.partition("?")[0] == "/status" else body.decode()


def open_counts(role: str, status: dict[str, Any]) -> dict[str, int]:
    """What a daemon holds open now, from its status: must all be 0 when idle."""
    if role == "gateway":
        return {"flows": status["flows"]}
    return {"open": status["open"], "node.flows": status["node"]["flows"],
            "flows listed": len(status["flows"])}


@dataclass
class Server:
    """A server process (HTTP, redis, socat, echo) and the port it serves."""

    proc: Proc
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass(eq=False)
class Daemon:
    """A running tether daemon: its process, role, name, admin port, and listen ports."""

    proc: Proc
    role: str
    name: str
    admin_port: int
    port: int = 0  # the gateway's link port
    ports: dict[str, int] = field(default_factory=dict)  # the agent's forward ports

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def admin(self) -> str:
        return f"{HOST}:{self.admin_port}"

    def status(self) -> dict[str, Any]:
        """The daemon's `/status` JSON."""
        status: dict[str, Any] = get_status(self.admin_port)
        return status

    def metrics(self) -> str:
        """The daemon's `/metrics` text."""
        text: str = get_status(self.admin_port, "/metrics")
        return text

    def open_counts(self) -> dict[str, int]:
        return open_counts(self.role, self.status())

    def fds(self) -> int:
        return fd_count(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def log(self) -> str:
        """Everything it printed so far."""
        return self.proc.output()

    def log_has(self, pattern: str) -> bool:
        rx = re.compile(pattern)
        return any(rx.search(line.text) for line in self.proc.lines())

    def mark(self) -> int:
        """How many lines it printed on stderr so far (for `wait_log(after=...)`)."""
        return len(self.proc.lines("stderr"))

    def wait_log(self, pattern: str, timeout: float = IDLE_TIMEOUT, after: int = 0) -> str:
        """Wait for a line matching `pattern` anywhere in its stderr (not only after the
        last match; only after the first `after` lines, see `mark`); returns it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.proc.lines("stderr")[after:]:
                if rx.search(line.text):
                    return line.text
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.proc.name}: no line matching {pattern!r} "
                                     f"within {timeout:g}s; output:\n{self.log()}")
            time.sleep(0.02)


@dataclass(eq=False)
class Relay:
    """The daemons of one tunnel: agent -> gateways[0] -> ... -> gateways[-1] -> connector."""

    agent: Daemon
    gateways: list[Daemon]
    connector: Daemon

    @property
    def daemons(self) -> list[Daemon]:
        """Every daemon, in the order a flow crosses them."""
        return [self.agent, *self.gateways, self.connector]


class Rig:
    """Starts the relay's daemons and the servers they carry; ends them all on exit."""

    def __init__(self) -> None:
        self.group = ProcGroup()

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.group.close()

    def describe(self, tail: int = 25) -> str:
        """The last `tail` lines of every process's output, for failure messages."""
        return "\n".join(
            f"{p.name} (pid {p.pid}, rc={p.popen.poll()}):\n"
            + "\n".join(f"  [{ln.stream}] {ln.text}" for ln in p.lines()[-tail:])
            for p in self.group.procs)

    def start(self, name: str, argv: Sequence[str]) -> Proc:
        return self.group.start(name, argv)

    # tether daemons -----------------------------------------------------------------------

    def _admin_port(self, proc: Proc, role: str, name: str) -> int:
        match, _ = proc.expect(rf"^{role} {re.escape(name)} admin endpoint on port (\d+)$",
                               stream="stderr")
        return int(match.group(1))

    # Each daemon is started by a `_start_ROLE` method, which returns a function that
    # waits until that daemon is ready: starting several before waiting for any of them
    # overlaps their start-up (a fraction of a second each).

    def gateway(self, *args: str, name: str = "gw1", port: int = 0) -> Daemon:
        """`tether gateway --listen 127.0.0.1:PORT --name NAME ARGS...`, listening."""
        return self._start_gateway(name, port, args)()

    def _start_gateway(self, name: str, port: int, args: Sequence[str]
                       ) -> Callable[[], Daemon]:
        proc = self.start(f"gateway {name}", tether_argv(
            "gateway", "--listen", f"{HOST}:{port}", "--name", name, *args))

        def ready() -> Daemon:
            match, _ = proc.expect(rf"^gateway {re.escape(name)} listening on port (\d+)$",
                                   stream="stderr")
            return Daemon(proc, "gateway", name, self._admin_port(proc, "gateway", name),
                          int(match.group(1)))
        return ready

    def cluster(self, *args: str, size: int = 2) -> list[Daemon]:
        """`size` gateways gw1..gwN in a chain, as the issue's example runs them: each
        listens on a port chosen beforehand and names its neighbours with `--peer` (gw1
        `--peer gw2=...` and the mirror on gw2), so both ends dial and all start at once.
        Returns when every gateway's status shows its peers up."""
        names = [f"gw{i}" for i in range(1, size + 1)]
        ports = free_ports(size)
        started = []
        for i, name in enumerate(names):
            peers = [arg for j in (i - 1, i + 1) if 0 <= j < size
                     for arg in ("--peer", f"{names[j]}={HOST}:{ports[j]}")]
            started.append(self._start_gateway(name, ports[i], [*peers, *args]))
        gws = [ready() for ready in started]

        def down() -> dict[str, list[str]]:
            return {gw.name: down for gw in gws
                    if (down := [p for p, v in gw.status()["peers"].items() if not v["up"]])}
        wait_until(down, READY_TIMEOUT, "peer gateways not up", self.describe)
        return gws

    def connector(self, gw: Daemon, services: dict[str, int], *args: str,
                  name: str = "connector") -> Daemon:
        """`tether connector --gateway GW --service NAME=127.0.0.1:PORT ...`, once the
        gateway logged the REGISTER of every service."""
        return self._start_connector(gw, services, args, name)()

    def _start_connector(self, gw: Daemon, services: dict[str, int], args: Sequence[str],
                         name: str) -> Callable[[], Daemon]:
        argv = ["connector", "--gateway", gw.address, "--name", name]
        for service, port in services.items():
            argv += ["--service", f"{service}={HOST}:{port}"]
        proc = self.start(f"connector {name}", tether_argv(*argv, *args))

        def ready() -> Daemon:
            proc.expect(rf"^connector {re.escape(name)} serving ", stream="stderr")
            admin = self._admin_port(proc, "connector", name)
            for service in services:
                gw.wait_log(rf"\b{re.escape(name)} registered service {re.escape(service)}$",
                            timeout=READY_TIMEOUT)
            return Daemon(proc, "connector", name, admin)
        return ready

    def agent(self, gw: Daemon, services: Iterable[str], *args: str,
              name: str = "agent", expect_ready: bool = True) -> Daemon:
        """`tether agent --gateway GW --forward 127.0.0.1:0=SERVICE ...`; `ports` maps each
        service to the port the agent listens on for it."""
        services = list(services)
        if not expect_ready:
            proc = self.start(f"agent {name}", self._agent_argv(gw, services, args, name))
            return Daemon(proc, "agent", name, 0)
        return self._start_agent(gw, services, args, name)()

    @staticmethod
    def _agent_argv(gw: Daemon, services: list[str], args: Sequence[str],
                    name: str) -> list[str]:
        argv = ["agent", "--gateway", gw.address, "--name", name]
        for service in services:
            argv += ["--forward", f"{HOST}:0={service}"]
        return tether_argv(*argv, *args)

    def _start_agent(self, gw: Daemon, services: list[str], args: Sequence[str],
                     name: str) -> Callable[[], Daemon]:
        proc = self.start(f"agent {name}", self._agent_argv(gw, services, args, name))

        def ready() -> Daemon:
            ports = {}
            for service in services:
                match, _ = proc.expect(
                    rf"^agent {re.escape(name)} forwarding 127\.0\.0\.1:(\d+) to "
                    rf"{re.escape(service)}$", stream="stderr")
                ports[service] = int(match.group(1))
            return Daemon(proc, "agent", name, self._admin_port(proc, "agent", name),
                          ports=ports)
        return ready

    def relay(self, services: dict[str, int], *, gateway_args: Sequence[str] = (),
              connector_args: Sequence[str] = (),
              agent_args: Sequence[str] = ()) -> tuple[Daemon, Daemon, Daemon]:
        """A gateway, a connector serving `services` and an agent forwarding to all of them."""
        relay = self.tunnel(services, gateway_args=gateway_args,
                            connector_args=connector_args, agent_args=agent_args)
        return relay.gateways[0], relay.connector, relay.agent

    def tunnel(self, services: dict[str, int], *, gateways: int = 1,
               gateway_args: Sequence[str] = (), connector_args: Sequence[str] = (),
               agent_args: Sequence[str] = ()) -> Relay:
        """A connector serving `services` on the last of `gateways` gateways (a `cluster`
        when more than one) and an agent forwarding to all of them on the first, once the
        first gateway knows every service."""
        gws = ([self.gateway(*gateway_args)] if gateways == 1
               else self.cluster(*gateway_args, size=gateways))
        connector = self._start_connector(gws[-1], services, connector_args, "connector")
        agent = self._start_agent(gws[0], list(services), agent_args, "agent")
        co = connector()
        self.wait_services(gws[0], services)
        return Relay(agent(), gws, co)

    def wait_services(self, gw: Daemon, services: Iterable[str],
                      timeout: float = READY_TIMEOUT) -> None:
        """Wait until the gateway's status lists every one of `services` (served there or
        through a peer gateway)."""
        wanted = list(services)

        def unknown() -> list[str]:
            known = gw.status()["services"]
            return [s for s in wanted if not known.get(s)]
        wait_until(unknown, timeout, f"services unknown to {gw.name}", self.describe)

    # the servers the relay carries ---------------------------------------------------------

    def http_server(self, directory: Path) -> Server:
        """`python -m http.server 0` serving `directory`."""
        proc = self.start("http.server", [sys.executable, "-m", "http.server", "0",
                                          "--bind", HOST, "--directory", str(directory)])
        match, _ = proc.expect(r"Serving HTTP on \S+ port (\d+)")
        return Server(proc, int(match.group(1)))

    def redis_server(self) -> Server:
        """redis-server on a free loopback port, no persistence."""
        need("redis-server")
        port = free_port()
        proc = self.start("redis-server", [
            "redis-server", "--port", str(port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--maxclients", "1000"])
        proc.expect(r"Ready to accept connections")
        return Server(proc, port)

    def socat_server(self, program: str) -> Server:
        """socat serving `program` (a socat address: "EXEC:cat", "SYSTEM:sha256sum") to
        each connection, in a child of its own."""
        need("socat")
        port = free_port()
        proc = self.start(f"socat {program}", [
            "socat", f"TCP-LISTEN:{port},bind={HOST},fork,reuseaddr", program])
        wait_listening(port, proc)
        return Server(proc, port)

    def echo_server(self) -> Server:
        """`ECHO_SERVER` as a process of its own (so that it can be SIGSTOPped)."""
        proc = self.start("echo server", [sys.executable, "-c", ECHO_SERVER])
        match, _ = proc.expect(r"^echo listening on port (\d+)$")
        return Server(proc, int(match.group(1)))

    # waiting for the relay to be idle -------------------------------------------------------

    def wait_idle(self, *daemons: Daemon, timeout: float = IDLE_TIMEOUT,
                  bridges: bool = True) -> None:
        """Wait until every daemon's status shows no open flow (bounded). With
        `bridges=False`, an agent's or connector's list of connections ("open") is not
        looked at, only the flows of its node (see `wait_no_bridges`)."""
        def left() -> dict[str, dict[str, int]]:
            out = {}
            for d in daemons:
                counts = d.open_counts()
                if not bridges:
                    counts = {k: v for k, v in counts.items() if k in ("flows", "node.flows")}
                if any(counts.values()):
                    out[d.proc.name] = counts
            return out
        wait_until(left, timeout, "open flows left", self.describe)

    def listed_connections(self, *daemons: Daemon, timeout: float = 2.0
                           ) -> list[dict[str, Any]]:
        """Wait (bounded) until no agent or connector lists a connection; what is still
        listed then (each with its daemon's name under "daemon")."""
        deadline = time.monotonic() + timeout
        while True:
            listed = [dict(f, daemon=d.name) for d in daemons for f in d.status()["flows"]]
            if not listed or time.monotonic() >= deadline:
                return listed
            time.sleep(0.05)

    def wait_no_bridges(self, *daemons: Daemon, timeout: float = 2.0) -> None:
        """Wait until no agent or connector lists a connection; raises `BridgesLeaked`."""
        listed = self.listed_connections(*daemons, timeout=timeout)
        if listed:
            raise BridgesLeaked(f"{len(listed)} connections still listed after {timeout:g}s, "
                                f"e.g. {listed[:3]}")

    def wait_fds(self, baseline: dict[Daemon, int], timeout: float = IDLE_TIMEOUT) -> None:
        """Wait until no daemon has more fds open than its `baseline` (bounded)."""
        wait_until(lambda: {d.proc.name: (n, d.fds()) for d, n in baseline.items()
                            if d.fds() > n},
                   timeout, "fds not back to baseline (baseline, now)", self.describe)


def wait_until(problems: Callable[[], Any], timeout: float, what: str,
               describe: Callable[[], str] | None = None, period: float = 0.05) -> None:
    """Poll `problems()` until it returns something falsy; fail with its last value."""
    deadline = time.monotonic() + timeout
    while True:
        left = problems()
        if not left:
            return
        if time.monotonic() >= deadline:
            extra = f"\n{describe()}" if describe is not None else ""
            raise AssertionError(f"{what} after {timeout:g}s: {left}{extra}")
        time.sleep(period)


def wait_listening(port: int, proc: Proc, timeout: float = READY_TIMEOUT) -> None:
    """Wait until something accepts connections on `port` (for programs that print
    nothing when ready, like socat)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        if proc.popen.poll() is not None or time.monotonic() >= deadline:
            raise AssertionError(f"{proc.name} not listening on {port}; rc="
                                 f"{proc.popen.poll()}; output:\n{proc.output()}")
        time.sleep(0.02)


class _Echo(asyncio.Protocol):
    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.open.add(self)
        self.server.accepted += 1
        self.server.peak = max(self.server.peak, len(self.server.open))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> None:
        return None  # close after what is buffered: the peer reads all, then EOF

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open.discard(self)
        if exc is not None:
            self.server.resets += 1


class EchoServer:
    """An in-process asyncio echo server (a Protocol with backpressure): echoes until
    EOF, then closes after what it still has to send. Counts what it saw."""

    def __init__(self) -> None:
        self.open: set[_Echo] = set()
        self.accepted = 0
        self.peak = 0
        self.resets = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> EchoServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Echo(self), HOST, 0, backlog=1024)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.abort()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def wait_all_closed(self, timeout: float = IDLE_TIMEOUT) -> None:
        """Wait (bounded) until every connection it accepted has ended."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.open:
            if asyncio.get_running_loop().time() >= deadline:
                raise AssertionError(f"{len(self.open)} echo connections still open "
                                     f"after {timeout:g}s")
            await asyncio.sleep(0.02)
