"""The close cascade through one gateway and through a two-gateway cluster, as a matrix
of real processes and real sockets:

    1gw:  application --TCP--> agent ==> gateway ==> connector --TCP--> server
    2gw:  application --TCP--> agent ==> gw1 ==> gw2 ==> connector --TCP--> server

In the cluster the agent is attached to gw1 and the connector to gw2, each gateway
started with `--peer` naming the other (tests/relayrig.py, `Rig.cluster`); every row
of the matrix acting on "the gateway" becomes two rows, one per gateway (gw1 killed,
gw2 killed, ...): a gateway between the other gateway and an edge must relay the end
of its peer link as it relays the end of an edge's link. A killed gateway must also be
forgotten by the cluster: the survivor logs its peer down, and the agent's gateway
stops listing the service of a dead connector's gateway within a second.

A connection is set up end to end (a round trip proves it), then one part ends it in
one way, and the other end(s) must observe the expected end -- EOF (a FIN: the peer
closed cleanly), RESET (an RST: the peer aborted, or the flow went DOWN), or nothing at
all -- within the expected time; afterwards every surviving daemon shows no open flow.

The application and (except where a process is needed) the server are plain blocking
sockets held by the test itself, so the test closes or resets them exactly when it
wants and observes both ends with one `select` loop and one clock.

Expected times: a clean close, a reset and a killed process (whose kernel closes its
sockets at once) cross the relay in milliseconds; `QUICK` is a bound for a loaded
2-CPU machine, not the expectation. A frozen (SIGSTOPped) process closes nothing: the
flow's end-to-end liveness (`--liveness 1` on the agent and the connector; keepalives
after a quarter of it) takes the flow DOWN after 0.75-1 s of silence, and both edges
reset their sockets; `LIVENESS_WINDOW` bounds that with slack.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import pytest

from relayrig import HOST, Daemon, Relay, Rig, Server, reset_close, wait_until

QUICK = (0.0, 0.5)
LIVENESS = 1.0
# DOWN after the whole liveness timeout of silence, which began up to a quarter of it
# before the SIGSTOP (the last keepalive), plus the wheel's tick and scheduling.
LIVENESS_WINDOW = (LIVENESS * 0.75 - 0.1, LIVENESS + 1.0)
# How long "nothing happens" is watched for: well past the liveness timeout.
HOLD = 2.5 * LIVENESS

EOF, RESET, OPEN = "eof", "reset", "open"
# A killed process's sockets are closed by its kernel: FIN if everything sent to it
# was read (the daemons read eagerly), RST if unread data was left; either is an end.
KERNEL = "eof|reset"


@dataclass
class World:
    """The running relay and the two ends of one established connection."""

    rig: Rig
    relay: Relay
    app: socket.socket
    conn: socket.socket | None  # the server's end, when the server is this test
    server: Server | None  # the server process, when it is one
    stopped: list[Daemon | Server] = field(default_factory=list)
    killed: list[Daemon] = field(default_factory=list)

    def daemon(self, role: str) -> Daemon:
        """"agent", "connector", "gateway" (the only one) or a gateway's name ("gw2")."""
        if role == "gateway":
            (gw,) = self.relay.gateways
            return gw
        (daemon,) = [d for d in self.relay.daemons if role in (d.role, d.name)]
        return daemon


@dataclass(frozen=True)
class Case:
    """One row of the matrix. `act` is done to `target` (an end: "app", "server"; or a
    process: "server", a daemon's role, a gateway's name). `app` / `server`: what that
    end must observe (None: that end is the one acting, nothing to observe). `thaw`:
    the same, observed after the stopped process was resumed (SIGCONT). `logs`: (role,
    pattern) of the line with which a surviving edge logs the flow's end: what a socket
    cannot tell (a reset or a DOWN, and why) its log must. `finish`: what ends a flow
    that is still half open."""

    name: str
    act: Callable[[World, str], float]
    target: str
    app: str | None
    server: str | None
    within: tuple[float, float] = QUICK
    liveness: bool = False
    process_server: bool = False
    thaw: dict[str, str] = field(default_factory=dict)
    logs: tuple[tuple[str, str], ...] = ()
    finish: Callable[[World], None] | None = None
    why: str = ""


def _close(w: World, end: str) -> float:
    sock = w.app if end == "app" else w.conn
    assert sock is not None
    sock.close()
    return time.monotonic()


def _reset(w: World, end: str) -> float:
    sock = w.app if end == "app" else w.conn
    assert sock is not None
    reset_close(sock)
    return time.monotonic()


def _kill(w: World, role: str) -> float:
    d = w.daemon(role)
    w.killed.append(d)
    return d.proc.kill()


def _stop(w: World, role: str) -> float:
    target: Daemon | Server
    if role == "server":
        assert w.server is not None
        target = w.server
    else:
        target = w.daemon(role)
    w.stopped.append(target)
    return target.proc.stop()


def _server_closes_too(w: World) -> None:
    """After the application's close (half-close mode), the server closes its side."""
    assert w.conn is not None
    w.conn.close()


def _app_closes_too(w: World) -> None:
    w.app.close()


def _still_carries_data(w: World) -> None:
    """The flow survived the freeze: a round trip works, then a clean half-close."""
    w.app.setblocking(True)
    w.app.sendall(b"again")
    assert _recv_exact(w.app, 5) == b"again"
    w.app.shutdown(socket.SHUT_WR)
    assert w.app.recv(10) == b""  # the echo server shuts down its side after our EOF


CASES = [
    Case("application closes", _close, "app", None, EOF, finish=_server_closes_too,
         logs=(("agent", "ended: CLOSED, first EOF from the application,"),
               ("connector", r"ended: CLOSED, first FIN from \S+,")),
         why="the application's FIN becomes a FIN on the flow (half-close, the default): "
             "the server reads EOF and may still answer"),
    Case("server closes", _close, "server", EOF, None, finish=_app_closes_too,
         logs=(("agent", r"ended: CLOSED, first FIN from \S+,"),
               ("connector", "ended: CLOSED, first EOF from the server,")),
         why="the server's FIN travels back the same way: the application reads EOF"),
    Case("application resets", _reset, "app", None, RESET,
         logs=(("connector", "reset: connection reset"),
               ("agent", "ended: RESET, first reset by the application,")),
         why="an RST from the application resets the flow, and the connector resets the "
             "server's socket (SO_LINGER 0): a reset stays a reset end to end"),
    Case("server resets", _reset, "server", RESET, None,
         logs=(("agent", "reset: connection reset"),
               ("connector", "ended: RESET, first reset by the server,")),
         why="the same the other way"),
    Case("agent killed", _kill, "agent", KERNEL, RESET,
         logs=(("connector", "down: link lost"),),
         why="the agent's kernel closes its sockets: the application sees that close; "
             "the gateway sees the agent's link end and relays a DOWN, so the connector "
             "resets the server's socket"),
    Case("gateway killed", _kill, "gateway", RESET, RESET,
         logs=(("agent", "down: link lost"), ("connector", "down: link lost"),
               ("agent", "ended: DOWN, first flow down,")),
         why="both edges see their link end: every flow on it goes DOWN, and each edge "
             "resets its socket"),
    Case("connector killed", _kill, "connector", RESET, KERNEL,
         logs=(("agent", "down: link lost"),),
         why="the connector's kernel closes the server's socket; the gateway relays the "
             "DOWN of its link, so the agent resets the application's socket"),
    Case("server stopped", _stop, "server", OPEN, None, liveness=True, process_server=True,
         finish=_still_carries_data,
         logs=(("agent", "ended: CLOSED"), ("connector", "ended: CLOSED")),
         why="a frozen server's kernel still ACKs and buffers, so no TCP-level part (and "
             "no proxy) can tell it from an idle one; the connector is alive and keeps "
             "the flow alive with its keepalives, so nothing may end it: the liveness "
             "timeout must not fire. After SIGCONT the connection carries data again"),
    Case("connector stopped", _stop, "connector", RESET, None, within=LIVENESS_WINDOW,
         liveness=True, thaw={"server": RESET},
         logs=(("agent", "down: unresponsive peer"),),
         why="a frozen connector sends no keepalive: the agent's side of the flow goes "
             "DOWN (unresponsive peer) after the liveness timeout and the application's "
             "socket is reset; once thawed, the connector gets the reset (or finds its "
             "own liveness expired) and resets the server's socket"),
    Case("agent stopped", _stop, "agent", None, RESET, within=LIVENESS_WINDOW,
         liveness=True, thaw={"app": RESET},
         logs=(("connector", "down: unresponsive peer"),),
         why="the mirror image: the connector's side goes DOWN and resets the server; "
             "the thawed agent resets the application"),
    Case("gateway stopped", _stop, "gateway", RESET, RESET, within=LIVENESS_WINDOW,
         liveness=True,
         logs=(("agent", "down: unresponsive peer"), ("connector", "down: unresponsive peer")),
         why="the gateway keeps no liveness of its own on relayed flows; the edges' "
             "keepalives stop crossing it, so both edges' flows go DOWN after the "
             "liveness timeout and both sockets are reset; the thawed gateway then "
             "drops its splice (both sides sent RESET)"),
]

# The topologies: how many gateways between the agent and the connector.
TOPOLOGIES = {"1gw": 1, "2gw": 2}


def _matrix() -> list[pytest.ParameterSet]:
    """CASES x TOPOLOGIES; in a cluster, a row acting on "the gateway" is one row per
    gateway ("gw1 killed", "gw2 killed")."""
    rows = []
    for topology, gateways in TOPOLOGIES.items():
        for case in CASES:
            variants = [case] if case.target != "gateway" or gateways == 1 else [
                replace(case, name=case.name.replace("gateway", gw), target=gw)
                for gw in (f"gw{i}" for i in range(1, gateways + 1))]
            rows += [pytest.param(gateways, c, id=f"{topology}-{c.name.replace(' ', '-')}")
                     for c in variants]
    return rows


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig() as r:
        yield r


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"EOF after {got!r}"
        got += chunk
    return got


@contextlib.contextmanager
def _establish(rig: Rig, case: Case, gateways: int) -> Iterator[World]:
    """Start the relay for `case` through `gateways` gateways and set up one connection
    end to end."""
    args = ["--liveness", str(LIVENESS)] if case.liveness else []
    with contextlib.ExitStack() as stack:
        server: Server | None = None
        srv: socket.socket | None = None
        if case.process_server:
            server = rig.echo_server()
            port = server.port
        else:
            srv = stack.enter_context(socket.create_server((HOST, 0)))
            srv.settimeout(10)
            port = srv.getsockname()[1]
        relay = rig.tunnel({"svc": port}, gateways=gateways, connector_args=args,
                           agent_args=args)
        ag, co = relay.agent, relay.connector
        app = stack.enter_context(socket.create_connection((HOST, ag.ports["svc"]),
                                                           timeout=10))
        app.sendall(b"ping")
        conn: socket.socket | None = None
        if srv is not None:
            conn = stack.enter_context(srv.accept()[0])
            conn.settimeout(10)
            assert _recv_exact(conn, 4) == b"ping"
            conn.sendall(b"pong")
            assert _recv_exact(app, 4) == b"pong"
        else:
            assert _recv_exact(app, 4) == b"ping"
        # Established also in the daemons' books: both edges list the connection (the
        # connector adopts it only when its connecting task resumes, which may come
        # after the round trip above), and it crosses every gateway of the path.
        wait_until(lambda: [d.name for d in (ag, co) if d.status()["open"] != 1]
                   + [g.name for g in relay.gateways if g.status()["flows"] != 1], 5.0,
                   "connection not listed by", rig.describe)
        yield World(rig, relay, app, conn, server)


def _watch(ends: dict[str, socket.socket], expect: dict[str, str], t0: float,
           timeout: float) -> dict[str, tuple[str, float]]:
    """Watch `ends` until each one expected to end has ended, or `timeout` after `t0`.
    Returns, per end, what was seen ("eof", "reset", "data", or "open" if nothing) and
    when, in seconds after `t0`."""
    seen: dict[str, tuple[str, float]] = {}
    waiting = {name: ends[name] for name in expect}
    for sock in waiting.values():
        sock.setblocking(False)
    while waiting:
        left = t0 + timeout - time.monotonic()
        if left <= 0:
            break
        if all(expect[name] == OPEN for name in waiting):
            readable, _, _ = select.select(list(waiting.values()), [], [], left)
        else:
            readable, _, _ = select.select(list(waiting.values()), [], [], min(left, 0.05))
        for name, sock in list(waiting.items()):
            if sock not in readable:
                continue
            try:
                data = sock.recv(65536)
                what = "eof" if not data else "data"
            except ConnectionResetError:
                what = "reset"
            seen[name] = (what, time.monotonic() - t0)
            del waiting[name]
    for name in waiting:
        seen[name] = (OPEN, time.monotonic() - t0)
    return seen


def _check(seen: dict[str, tuple[str, float]], expect: dict[str, str],
           within: tuple[float, float], describe: Callable[[], str]) -> None:
    for name, wanted in expect.items():
        what, after = seen[name]
        assert what in wanted.split("|"), \
            f"{name}: expected {wanted}, saw {what} after {after:.3f}s\n{describe()}"
        if wanted != OPEN:
            low, high = within
            assert low <= after <= high, \
                f"{name}: {what} after {after:.3f}s, expected within [{low}, {high}]s\n" \
                f"{describe()}"


@pytest.mark.parametrize(("gateways", "case"), _matrix())
def test_close_cascade(rig: Rig, gateways: int, case: Case) -> None:
    with _establish(rig, case, gateways) as world:
        _run_case(world, case)


def _run_case(w: World, case: Case) -> None:
    ends = {"app": w.app}
    if w.conn is not None:
        ends["server"] = w.conn
    expect = {name: wanted for name, wanted in (("app", case.app), ("server", case.server))
              if wanted is not None and name in ends}
    t0 = case.act(w, case.target)
    timeout = HOLD if OPEN in expect.values() else case.within[1] + 0.5
    seen = _watch(ends, expect, t0, timeout)
    print(f"{case.name}: " + ", ".join(f"{n} {what} after {after * 1000:.1f} ms"
                                       for n, (what, after) in seen.items()))
    def describe() -> str:
        return f"expected because {case.why}\n{w.rig.describe()}"

    _check(seen, expect, case.within, describe)

    for target in w.stopped:  # thaw, then what the thawed part does
        target.proc.cont()
    if case.thaw:
        t1 = time.monotonic()
        seen = _watch(ends, case.thaw, t1, QUICK[1] + 2.0)
        print("  after SIGCONT: " + ", ".join(f"{n} {what} after {after * 1000:.1f} ms"
                                              for n, (what, after) in seen.items()))
        _check(seen, case.thaw, (0.0, QUICK[1] + 1.0), describe)
    if case.finish is not None:
        case.finish(w)

    survivors = [d for d in w.relay.daemons if d not in w.killed]
    for dead in [d for d in w.killed if d.role == "gateway"]:  # the cluster forgets it
        for gw in [g for g in survivors if g.role == "gateway"]:
            gw.wait_log(rf"gateway {gw.name}: peer gateway {dead.name} down", timeout=1.0)
        if dead is w.relay.gateways[-1] and dead is not w.relay.gateways[0]:
            wait_until(lambda: "svc" in w.relay.gateways[0].status()["services"], 1.0,
                       "the service of a dead gateway still listed", w.rig.describe)
    for role, pattern in case.logs:  # how the surviving edges saw the flow end
        w.daemon(role).wait_log(rf"flow \S+ {pattern}")
    w.rig.wait_idle(*survivors, bridges=False)
    w.rig.wait_no_bridges(*[d for d in survivors if d.role != "gateway"])
