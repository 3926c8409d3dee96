"""The relay end to end with real processes and real clients (issue 6), one gateway:

    client --TCP--> tether agent ==link==> tether gateway ==link==> tether connector --TCP--> server

The daemons are `python -m tether.cli` processes (tests/relayrig.py); the clients and
servers are programs no one here wrote (curl, nc, socat, redis-cli, redis-benchmark,
python -m http.server, redis-server), or asyncio code in this process where the test
must count, time or verify every byte. Every test ends with the daemons' status showing
no open flow, and every process it started is ended by PID (the `Rig` fixtures).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import re
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from procs import tether_argv
from relayrig import (
    HOST,
    LINGER_ZERO,
    Daemon,
    EchoServer,
    Rig,
    Server,
    echo_once,
    free_port,
    get_status,
    need,
    reset_close,
    rss_bytes,
    wait_reset_after_eof,
    wait_until,
)
from tether.relay import Connector, connect_failure

# Bounds for subprocess clients: generous for a loaded 2-CPU machine, never hit when
# the relay works (each finishes in well under a second).
CLIENT_TIMEOUT = 20.0


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig() as r:
        yield r


# one relay shared by the tests that need no special daemon options -------------------------

@dataclass
class Shared:
    rig: Rig
    site: Path
    gw: Daemon
    co: Daemon
    ag: Daemon
    servers: dict[str, Server]

    def port(self, service: str) -> int:
        if service not in self.ag.ports:
            need({"cat": "socat", "sha": "socat", "redis": "redis-server"}.get(service, service))
        return self.ag.ports[service]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """http.server ("web"), socat EXEC:cat ("cat"), socat SYSTEM:sha256sum ("sha", answers
    only after EOF) and redis-server ("redis"), as far as they are installed, behind one
    gateway, connector and agent."""
    site = tmp_path_factory.mktemp("site")
    (site / "big.bin").write_bytes(random.Random(1).randbytes(3 * 1024 * 1024 + 17))
    (site / "index.html").write_text("<h1>through tether</h1>\n")
    with Rig() as rig:
        servers = {"web": rig.http_server(site)}
        with contextlib.suppress(pytest.skip.Exception):
            servers["cat"] = rig.socat_server("EXEC:cat")
            servers["sha"] = rig.socat_server("SYSTEM:sha256sum")
        with contextlib.suppress(pytest.skip.Exception):
            servers["redis"] = rig.redis_server()
        gw, co, ag = rig.relay({name: s.port for name, s in servers.items()})
        yield Shared(rig, site, gw, co, ag, servers)


@pytest.fixture
def relay(shared: Shared) -> Iterator[Shared]:
    """The shared relay; after the test, every flow must have ended everywhere."""
    yield shared
    shared.rig.wait_idle(shared.gw, shared.co, shared.ag)


def run(argv: list[str], data: bytes = b"", timeout: float = CLIENT_TIMEOUT
        ) -> subprocess.CompletedProcess[bytes]:
    need(argv[0])
    return subprocess.run(argv, input=data, capture_output=True, timeout=timeout, check=False)


# real clients --------------------------------------------------------------------------------

def test_curl_gets_the_exact_page(relay: Shared) -> None:
    """curl through agent -> gateway -> connector -> http.server: the exact bytes (a 3 MB
    file and a small page), HTTP 200, and the flows end with the server's close."""
    port = relay.port("web")
    for name in ("big.bin", "index.html"):
        out = run(["curl", "-sS", "--fail", "--max-time", "15", f"http://{HOST}:{port}/{name}"])
        assert out.returncode == 0, out.stderr
        expected = (relay.site / name).read_bytes()
        assert len(out.stdout) == len(expected)
        assert hashlib.sha256(out.stdout).hexdigest() == hashlib.sha256(expected).hexdigest()


def test_nc_half_close_gets_the_whole_reply(relay: Shared) -> None:
    """`printf 'data' | nc -N`: nc shuts down its write side at the end of its input and
    keeps reading. The "sha" server (socat SYSTEM:sha256sum) answers only once it read
    EOF, so the reply proves that the FIN crossed the relay while the way back stayed
    open. Then 1 MB both ways with socat EXEC:cat."""
    for data in (b"data", random.Random(2).randbytes(1_000_000)):
        out = run(["nc", "-N", HOST, str(relay.port("sha"))], data)
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode().split() == [hashlib.sha256(data).hexdigest(), "-"]
    data = random.Random(3).randbytes(1_000_000)
    out = run(["nc", "-N", HOST, str(relay.port("cat"))], data)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data


def test_socat_client_half_close(relay: Shared) -> None:
    """socat as the client: at the end of its stdin it shuts down the socket's write side
    and waits (-t) for the other direction's EOF."""
    data = b"hello through tether\n" * 1000
    out = run(["socat", "-t", "10", "-", f"TCP:{HOST}:{relay.port('sha')}"], data)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().split() == [hashlib.sha256(data).hexdigest(), "-"]
    out = run(["socat", "-t", "10", "-", f"TCP:{HOST}:{relay.port('cat')}"], data)
    assert out.returncode == 0, out.stderr
    assert out.stdout == data


def test_redis_cli_through_the_tunnel(relay: Shared) -> None:
    port = str(relay.port("redis"))
    assert run(["redis-cli", "-p", port, "ping"]).stdout == b"PONG\n"
    assert run(["redis-cli", "-p", port, "set", "tether", "relay"]).stdout == b"OK\n"
    assert run(["redis-cli", "-p", port, "get", "tether"]).stdout == b"relay\n"


def test_redis_benchmark_through_the_tunnel_has_no_error(relay: Shared) -> None:
    """redis-benchmark, 50 connections, 20,000 SETs and 20,000 GETs: it finishes (bounded)
    with no error, and redis-server saw every command and no rejected connection."""
    port = relay.port("redis")
    redis = str(relay.servers["redis"].port)

    def info(section: str) -> dict[str, str]:
        out = run(["redis-cli", "-p", redis, "info", section]).stdout.decode()
        return dict(line.split(":", 1) for line in out.split("\r\n") if ":" in line)

    before = int(info("stats")["total_commands_processed"])
    out = run(["redis-benchmark", "-h", HOST, "-p", str(port), "-c", "50", "-n", "20000",
               "-q", "-t", "set,get"], timeout=60)
    text = (out.stdout + out.stderr).decode(errors="replace")
    assert out.returncode == 0, text
    assert "rror" not in text, text
    rates = dict(re.findall(r"(SET|GET): ([\d.]+) requests per second", text))
    assert set(rates) == {"SET", "GET"}, text
    stats = info("stats")
    # 40,000 commands, plus redis-benchmark's own CONFIG GETs and our INFO.
    assert int(stats["total_commands_processed"]) - before >= 40_000
    assert stats["rejected_connections"] == "0"
    print(f"redis-benchmark through tether: {rates}")


def test_tether_status_prints_json_and_metrics(relay: Shared) -> None:
    """`tether status HOST:PORT` prints each daemon's JSON (links, flows with age and bytes,
    counters); `--metrics` prints Prometheus text with tether_ metrics. An open connection
    is listed while it is open."""
    with socket.create_connection((HOST, relay.port("cat")), timeout=5) as app:
        app.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += app.recv(65536)
        docs = {}
        for d in (relay.gw, relay.co, relay.ag):
            out = run(tether_argv("status", d.admin))
            assert out.returncode == 0, out.stderr
            docs[d.role] = json.loads(out.stdout)
    gw, co, ag = docs["gateway"], docs["connector"], docs["agent"]
    assert gw["role"] == "gateway" and gw["name"] == "gw1"
    assert gw["links"] == 2 and gw["flows"] == 1
    assert set(gw["services"]) >= {"web", "cat"} and gw["services"]["cat"] == ["connector"]
    for key in ("links_accepted", "flows_spliced", "flows_ended", "flows_closed",
                "flows_refused", "flows_down", "flows_reset", "bytes_up", "bytes_down",
                "no_such_service", "denied", "protocol_errors"):
        assert isinstance(gw[key], int), key
    (spliced,) = gw["open_flows"]
    assert spliced["service"] == "cat" and spliced["age"] >= 0, spliced
    assert spliced["from"].startswith("agent#") and spliced["to"].startswith("connector#")
    assert spliced["bytes_up"] == spliced["bytes_down"] == 1000, spliced  # (cat echoes)
    for doc, mine in ((ag, "bytes_up"), (co, "bytes_down")):
        assert doc["open"] == 1 and doc["node"]["flows"] == 1 and doc["node"]["links"] == 1
        (flow,) = doc["flows"]
        assert flow["service"] == "cat" and flow["state"] == "OPEN"
        assert flow["age"] >= 0 and flow[mine] == 1000
        for key in ("connections", "refused", "fin_timeouts", "bytes_up", "bytes_down"):
            assert isinstance(doc[key], int), key
    for d in (relay.gw, relay.co, relay.ag):
        out = run(tether_argv("status", d.admin, "--metrics"))
        assert out.returncode == 0, out.stderr
        text = out.stdout.decode()
        samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        assert samples and all(ln.startswith("tether_") for ln in samples), text
        assert f'role="{d.role}"' in text and f'node="{d.name}"' in text
    metrics = relay.gw.metrics()
    # what only grows is a counter (`_total`: `rate()` copes with a restart), what is
    # now a gauge
    assert re.search(r'^tether_flows_spliced_total\{node="gw1",role="gateway"\} \d+',
                     metrics, re.M)
    assert "# TYPE tether_flows_spliced_total counter" in metrics
    assert "# TYPE tether_bytes_up_total counter" in metrics
    assert "# TYPE tether_flows gauge" in metrics and "# TYPE tether_links gauge" in metrics
    agent = relay.ag.metrics()
    assert "# TYPE tether_open gauge" in agent and "# TYPE tether_node_flows gauge" in agent
    assert "# TYPE tether_linked gauge" in agent
    assert "# TYPE tether_connections_total counter" in agent
    assert get_status(relay.gw.admin_port, "/metrics").count("# TYPE tether_") > 5

    def not_counted() -> dict[str, Any] | None:  # the closed flow, in the gateway's counters
        now = relay.gw.status()  # (its bytes were in the totals while it was open)
        done = (now["flows_closed"] == gw["flows_closed"] + 1 and not now["open_flows"]
                and now["bytes_up"] >= gw["bytes_up"] >= 1000)
        return None if done else now
    wait_until(not_counted, 5.0, "the gateway's counters after the close")


def test_cascade_full_closes_both_directions(rig: Rig) -> None:
    """`--cascade full` is the source design's rule: one side's EOF closes the whole flow,
    so `nc -N` to a server that answers only after EOF gets no answer (EOF instead),
    where the default half-close got the whole reply (test above)."""
    sha = rig.socat_server("SYSTEM:sha256sum")
    gw, co, ag = rig.relay({"sha": sha.port}, agent_args=["--cascade", "full"])
    out = run(["nc", "-N", HOST, str(ag.ports["sha"])], b"data")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b""
    rig.wait_idle(gw, co, ag, bridges=False)
    rig.wait_no_bridges(co, ag)


# many connections ----------------------------------------------------------------------------

class Crowd:
    """Book-keeping of many client connections: how many are open, the peak, and an
    event set once every one of them has connected."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.connected = 0
        self.live = 0
        self.peak = 0
        self.all_connected = asyncio.Event()

    def opened(self) -> None:
        self.connected += 1
        self.live += 1
        self.peak = max(self.peak, self.live)
        if self.connected == self.n:
            self.all_connected.set()

    def closed(self) -> None:
        self.live -= 1


async def _one_connection(port: int, rng: random.Random, kind: str, crowd: Crowd) -> str:
    """One client connection of the kind drawn; returns what happened. "echo" connections
    must come back byte-exact; the others end early on purpose. "echo" and "reset"
    connections stay open until every connection of the crowd has connected, so that
    they are all open at once; then each lives on for a random time."""
    await asyncio.sleep(rng.uniform(0, 0.5))
    size = int(2 ** rng.uniform(0, 18)) if kind != "reset-at-once" else 1
    payload = rng.randbytes(size)
    pauses = [rng.uniform(0, 0.3) for _ in range(rng.randint(1, 4))]
    reader, writer = await asyncio.open_connection(HOST, port)
    crowd.opened()
    local = writer.get_extra_info("sockname")[1]
    try:
        if kind == "reset-at-once":  # before the agent has its flow: a reset in setup
            writer.write(payload)
            _abort(writer)
            return kind
        pieces = _split(payload, len(pauses), rng)
        got = bytearray()
        for i, (piece, pause) in enumerate(zip(pieces, pauses, strict=True)):
            writer.write(piece)
            await writer.drain()
            if i == 0 and kind != "close":
                await asyncio.wait_for(crowd.all_connected.wait(), 30)
            await asyncio.sleep(pause)
        if kind == "close":  # a full close without reading the echo
            writer.close()
            return kind
        if kind == "reset":  # a reset once some echo came back
            got += await reader.read(65536)
            assert payload.startswith(bytes(got)), "echo corrupted before the reset"
            _abort(writer)
            return kind
        writer.write_eof()
        while chunk := await reader.read(1 << 20):
            got += chunk
        assert bytes(got) == payload, f"echo of {size} bytes came back as {len(got)} bytes"
        writer.close()
        return kind
    except Exception as exc:
        exc.add_note(f"{kind} connection from port {local}")
        raise
    finally:
        crowd.closed()
        if not writer.is_closing():
            writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _explain(failures: list[tuple[str, BaseException]], *daemons: Daemon) -> str:
    """The failed echo connections, each with every line a daemon logged about it (by
    its client port, then by the flow ids those lines name), then the daemons' warnings
    by kind and their counters, and this process's descriptors: enough to tell a reset
    the application caused from a refusal, a timeout or a daemon's own fault."""
    out = [f"{sum(kind == 'echo' for kind, _ in failures)} echo connections failed, "
           f"{len(failures)} connections in all; this process holds "
           f"{len(os.listdir('/proc/self/fd'))} descriptors"]
    logs = {d: [ln.text for ln in d.proc.lines("stderr")] for d in daemons}
    shown = 0
    for kind, exc in failures:
        if kind != "echo" or shown >= 8:
            continue
        shown += 1
        note = " ".join(getattr(exc, "__notes__", []))
        out.append(f"{exc!r} ({note})")
        port = re.search(r"from port (\d+)", note)
        if port is None:
            continue
        about = {f"127.0.0.1:{port[1]}"}
        for d, lines in logs.items():
            mine = [ln for ln in lines if any(a in ln for a in about)]
            about |= {f"flow {m[1]} " for ln in mine
                      if (m := re.search(r"flow (\S+@\S+|\S+) ", ln))}
            mine = [ln for ln in lines if any(a in ln for a in about)]
            out += [f"    {d.name}: {ln}" for ln in mine[:10]]
    for d, lines in logs.items():
        kinds = collections.Counter(
            re.sub(r"\d+", "N", re.sub(r"flow \S+", "flow F", ln.split(" WARNING ", 1)[1]))[:100]
            for ln in lines if " WARNING " in ln)
        out += [f"{d.name} warned {n}x: {what}" for what, n in kinds.most_common(8)]
        with contextlib.suppress(Exception):  # (a daemon that died says so above)
            status = d.status()
            out.append(f"{d.name} counters: " + ", ".join(
                f"{k}={v}" for k, v in status.items() if type(v) is int))
    return "\n".join(out)


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    writer.transport.abort()


def _split(data: bytes, n: int, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.randint(0, len(data)) for _ in range(n - 1))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


N_CONNECTIONS = 1000
KINDS = ("echo",) * 14 + ("close",) * 2 + ("reset",) * 3 + ("reset-at-once",)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_thousand_concurrent_connections_with_random_lifetimes(rig: Rig) -> None:
    """1,000 concurrent connections through the relay to an in-process echo server, with
    random sizes (1 B to 256 KiB) and lifetimes, 70 % echoing to the end, 10 % closing
    without reading, 15 % resetting (SO_LINGER 0) mid-way and 5 % resetting at once.
    Every completed echo is byte-exact; afterwards no flow is left in any daemon, and
    every daemon's fd count is back to its baseline. (One loop only: what is tested
    runs in the daemons, not in this process.)"""
    async with EchoServer() as echo:
        gw, co, ag = await asyncio.to_thread(rig.relay, {"echo": echo.port})
        port = ag.ports["echo"]
        rng = random.Random(6)
        assert await _one_connection(port, rng, "echo", Crowd(1)) == "echo"  # warm-up
        await asyncio.to_thread(rig.wait_idle, gw, co, ag)
        baseline = {d: d.fds() for d in (gw, co, ag)}
        kinds = [rng.choice(KINDS) for _ in range(N_CONNECTIONS)]
        crowd = Crowd(N_CONNECTIONS)
        started = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(
            *(_one_connection(port, random.Random(i), kind, crowd)
              for i, kind in enumerate(kinds)), return_exceptions=True), 60)
        elapsed = time.monotonic() - started
        failures = [(kinds[i], r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        # Only connections that reset or closed early may fail (e.g. their peer's reset).
        assert not [f for f in failures if f[0] == "echo"], _explain(failures, ag, gw, co)
        assert not [f for f in failures if isinstance(f[1], AssertionError)], failures[:10]
        assert results.count("echo") == kinds.count("echo")
        # Every "echo" and "reset" connection was open when the last one connected.
        assert crowd.peak >= kinds.count("echo") + kinds.count("reset"), crowd.peak
        await echo.wait_all_closed()
        await asyncio.to_thread(rig.wait_idle, gw, co, ag, bridges=False)
        await asyncio.to_thread(rig.wait_fds, baseline)
        print(f"{N_CONNECTIONS} connections in {elapsed:.1f}s, {crowd.peak} at once, "
              f"{echo.accepted} reached the server")
        # Last, the lists of connections of the agent and the connector: none left.
        await asyncio.to_thread(rig.wait_no_bridges, co, ag)


def test_a_burst_of_connections_waits_in_the_agents_backlog_not_in_syn_retries(
        rig: Rig) -> None:
    """300 clients connect while the agent cannot accept (it is stopped): the kernel
    completes every handshake and queues them for the agent, so each connect returns
    at once and each gets its flow once the agent runs. With asyncio's default backlog
    (100), only 101 connected; the others' SYNs were dropped and their connects waited
    for the retry a second later (and, under load, longer)."""
    n = 300
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    if somaxconn <= n:
        pytest.skip(f"net.core.somaxconn is {somaxconn}: the kernel caps every backlog "
                    f"below the {n} connections this test queues")
    echo = rig.echo_server()
    gw, co, ag = rig.relay({"echo": echo.port})
    apps = [socket.socket() for _ in range(n)]
    try:
        ag.proc.stop()
        try:
            for app in apps:
                app.setblocking(False)
                assert app.connect_ex((HOST, ag.ports["echo"])) in (0, errno.EINPROGRESS)
            poller = select.poll()
            for app in apps:
                poller.register(app, select.POLLOUT)
            pending = {app.fileno() for app in apps}
            deadline = time.monotonic() + 0.8  # (a dropped SYN is sent again after 1 s)
            while pending and time.monotonic() < deadline:
                for fd, _ in poller.poll(50):
                    poller.unregister(fd)
                    pending.discard(fd)
            assert not pending, f"{n - len(pending)} of {n} connected at once"
            assert all(app.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                       for app in apps)
        finally:
            ag.proc.cont()
        for app in apps:
            app.setblocking(True)
            app.settimeout(5)
            app.sendall(b"x")
        for app in apps:
            assert app.recv(10) == b"x"
    finally:
        for app in apps:
            app.close()
    rig.wait_idle(gw, co, ag, bridges=False)


def test_agent_forgets_a_connection_reset_before_allocation(rig: Rig) -> None:
    """Applications that connect, send a byte and reset at once, before the agent has
    allocated their flow (uvloop sees the reset while the allocation is under way):
    every flow ends, and the agent must list no connection afterwards."""
    echo = rig.echo_server()
    gw, co, ag = rig.relay({"echo": echo.port})
    for _ in range(20):
        app = socket.create_connection((HOST, ag.ports["echo"]), timeout=5)
        app.sendall(b"x")
        reset_close(app)
    rig.wait_idle(gw, co, ag, bridges=False)
    rig.wait_no_bridges(ag)


def test_applications_that_reset_during_a_slow_allocation_free_their_sockets(
        rig: Rig) -> None:
    """While allocations wait (the connector is frozen: they are answered only at the
    liveness timeout), applications that send a request and reset are let go at once:
    the agent had stopped reading them, saw no reset, and held each socket until its
    allocation was answered. Their flows still end (DOWN at the liveness timeout)."""
    echo = rig.echo_server()
    gw, co, ag = rig.relay({"echo": echo.port}, agent_args=["--liveness", "5"])
    baseline = ag.fds()
    co.proc.stop()
    try:
        apps = []
        for _ in range(10):
            app = socket.create_connection((HOST, ag.ports["echo"]), timeout=5)
            app.sendall(b"request")
            apps.append(app)
        wait_until(lambda: ag.fds() < baseline + 10, 5, "the agent's accepts",
                   rig.describe)
        for app in apps:
            reset_close(app)
        wait_until(lambda: ag.fds() > baseline, 2, "the agent letting go of the "
                   "reset sockets (before the allocations are answered)", rig.describe)
    finally:
        co.proc.cont()
    rig.wait_idle(gw, co, ag, bridges=False)
    rig.wait_no_bridges(ag)


@pytest.mark.parametrize("sent", [b"x", b""], ids=["after-a-byte", "before-any-byte"])
def test_reset_before_allocation_reaches_the_server_as_a_reset(rig: Rig, sent: bytes) -> None:
    """A reset stays a reset end to end, also when the application resets before its
    flow exists: the server's connection must end in a reset, never in EOF.

    As TCP itself has it (the same client and server connected directly behave so),
    bytes sent before the RST may still be read before it: the server may read what
    the application sent, then must get the reset. So the server reads to the end
    instead of judging by its first `recv`. With a byte, the agent (uvloop) reads and
    holds it until the flow exists and sees the RST only after `set_flow`; without
    one, it sees the RST while the allocation is under way (`set_flow`'s reset branch)."""
    srv = socket.create_server((HOST, 0))
    srv.settimeout(10)
    with srv:
        gw, co, ag = rig.relay({"svc": srv.getsockname()[1]})
        app = socket.create_connection((HOST, ag.ports["svc"]), timeout=5)
        if sent:
            app.sendall(sent)
        reset_close(app)
        conn, _ = srv.accept()
        received, end = b"", "nothing within 5s"
        with conn:
            conn.settimeout(5)
            try:
                while data := conn.recv(100):
                    received += data
                end = "eof"
            except ConnectionResetError:
                end = "reset"
            except TimeoutError:
                pass
        rig.wait_idle(gw, co, ag, bridges=False)
        assert sent.startswith(received), f"the server read {received!r}, sent: {sent!r}"
        assert end == "reset", f"the server read {received!r}, then {end}"


def test_connector_forgets_a_flow_that_ended_while_connecting(rig: Rig) -> None:
    """100 connections that half-close at once to a server that closes as soon as it
    accepts: the whole flow can end (both FINs) in the few loop iterations between the
    connector's `connection_made` and its task resuming; then the connector adopts a
    bridge that already ended and lists it for ever. Every connection still ends
    properly (EOF at the client); only the bookkeeping leaks."""
    srv = socket.create_server((HOST, 0))
    srv.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = srv.accept()
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        gw, co, ag = rig.relay({"closer": srv.getsockname()[1]})
        for _ in range(100):
            with socket.create_connection((HOST, ag.ports["closer"]), timeout=5) as app:
                app.shutdown(socket.SHUT_WR)
                assert app.recv(10) == b""
        rig.wait_idle(gw, co, ag, bridges=False)
        rig.wait_no_bridges(co, ag)
    finally:
        stop.set()
        thread.join(5)
        srv.close()


# backpressure --------------------------------------------------------------------------------

BULK = 200 * 1024 * 1024
RSS_GROWTH_limit = 50 * 1024 * 1024


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_backpressure_bounds_memory_and_spares_other_flows(rig: Rig) -> None:
    """A sender pushes 200 MB as fast as it can to a receiver that reads ~3 MB/s for the
    first 3 s: no daemon's RSS grows by 50 MB or more (credit propagates across hops, and
    the sender is held back, not buffered), while a second connection on the same links
    echoes 16 MB meanwhile. Then the receiver speeds up and gets all 200 MB, byte-exact.
    (One loop only: what is tested runs in the daemons.)"""
    fast = asyncio.Event()
    sink_result: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest, n = hashlib.sha256(), 0
        while True:
            if fast.is_set():
                data = await reader.read(1 << 20)
            else:
                data = await reader.read(64 * 1024)
                await asyncio.sleep(0.02)
            if not data:
                break
            digest.update(data)
            n += len(data)
        writer.write(f"{n} {digest.hexdigest()}".encode())
        writer.close()
        await writer.wait_closed()
        sink_result.set_result((n, digest.hexdigest()))

    block = os.urandom(1 << 20)
    sent = [0]

    async def sender(port: int) -> str:
        reader, writer = await asyncio.open_connection(HOST, port)
        digest = hashlib.sha256()
        for i in range(BULK // len(block)):
            chunk = block[i % 997:] + block[:i % 997]
            digest.update(chunk)
            writer.write(chunk)
            await writer.drain()
            sent[0] += len(chunk)
        writer.write_eof()
        reply = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert reply.decode() == f"{BULK} {digest.hexdigest()}"
        return digest.hexdigest()

    server = await asyncio.start_server(sink, HOST, 0)
    try:
        async with EchoServer() as echo:
            sink_port = server.sockets[0].getsockname()[1]
            gw, co, ag = await asyncio.to_thread(
                rig.relay, {"sink": sink_port, "echo": echo.port})
            daemons = (ag, gw, co)
            other = random.Random(5).randbytes(16 * 1024 * 1024)
            assert await _echo_through(ag.ports["echo"], b"warm-up") == b"warm-up"
            base = {d.name: rss_bytes(d.pid) for d in daemons}
            peak = dict(base)
            bulk = asyncio.ensure_future(sender(ag.ports["sink"]))
            await asyncio.sleep(0.5)  # the pipe is full by now
            t0 = time.monotonic()
            echoed = await asyncio.wait_for(_echo_through(ag.ports["echo"], other), 15)
            other_took = time.monotonic() - t0
            assert echoed == other
            while time.monotonic() - t0 < 2.5:
                for d in daemons:
                    peak[d.name] = max(peak[d.name], rss_bytes(d.pid))
                await asyncio.sleep(0.1)
            assert not bulk.done()
            held = sent[0]
            assert held < BULK // 2, f"{held} bytes accepted from a sender nobody reads"
            fast.set()
            await asyncio.wait_for(bulk, 60)
            n, _ = await asyncio.wait_for(sink_result, 10)
            assert n == BULK
            growth = {name: peak[name] - base[name] for name in base}
            print(f"RSS growth while stalled: {growth}; {held / 1e6:.0f} MB accepted; "
                  f"16 MB echo alongside in {other_took:.2f}s")
            assert all(g < RSS_GROWTH_limit for g in growth.values()), growth
            assert other_took < 10
            await asyncio.to_thread(rig.wait_idle, *daemons)
    finally:
        server.close()
        await server.wait_closed()


class Unbounded(AssertionError):
    """A daemon took in (and held) far more than its bounded buffers allow."""


def _keepalive_timer(filter_: str) -> str:
    """`ss`'s line for the one established TCP socket matching `filter_` (an ss filter)
    once it shows a keepalive timer ("timer:(keepalive,...)"; until the last ACK it
    shows the retransmission timer), or the last line seen after 2 s."""
    deadline = time.monotonic() + 2.0
    while True:
        out = subprocess.run(["ss", "-Htno", "state", "established", filter_],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        if "timer:(keepalive," in lines[0] or time.monotonic() > deadline:
            return lines[0]
        time.sleep(0.05)


def test_both_edge_sockets_have_tcp_keepalive(rig: Rig) -> None:
    """The daemons as deployed: the agent's socket for the application (inherited from
    its listening socket) and the connector's socket to the server both run a TCP
    keepalive timer, as `ss` shows it (`--keepalive`, default 60 s: probes after 30 s)."""
    need("ss")
    echo = rig.echo_server()
    gw, co, ag = rig.relay({"echo": echo.port})
    port = ag.ports["echo"]
    with socket.create_connection((HOST, port), timeout=5) as app:
        app.sendall(b"ping\n")
        assert app.recv(100) == b"ping\n"
        agent_side = _keepalive_timer(f"sport = :{port}")
        server_side = _keepalive_timer(f"dport = :{echo.port}")
        assert "timer:(keepalive," in agent_side, agent_side
        assert "timer:(keepalive," in server_side, server_side
    rig.wait_idle(gw, co, ag)


def test_a_failed_connect_is_told_without_the_address() -> None:
    """What the agent's side hears of a server the connector cannot reach: the error,
    never the address that asyncio's own loop puts in its message; and a connect timeout
    that is not positive is refused at once."""
    refused = OSError(errno.ECONNREFUSED, "Connect call failed ('10.0.0.5', 8080)")
    assert connect_failure(refused) == "Connection refused"
    assert connect_failure(TimeoutError()) == "timed out"
    assert connect_failure(OSError("Multiple exceptions: [Errno 111] Connect call "
                                   "failed ('10.0.0.5', 8080)")) == "OSError"
    assert connect_failure(socket.gaierror(socket.EAI_NONAME, "Name or service not known")) \
        == "Name or service not known"
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="connect_timeout"):
            Connector("127.0.0.1:1", [], connect_timeout=bad)


def test_agent_holds_little_before_the_flow_is_allocated(rig: Rig) -> None:
    """While the gateway is frozen, the agent cannot allocate a flow for a new connection.
    An application that writes as fast as it can meanwhile must be held back by TCP
    (the agent stops reading), not buffered in the agent: the kernel takes at most its
    socket buffers (a few MB on loopback), the agent's RSS does not grow by tens of MB."""
    # Loopback socket buffers hold up to tcp_wmem[2] + tcp_rmem[2] (4 + 6 MB by default).
    limit = 24 * 1024 * 1024
    echo = rig.echo_server()
    gw, co, ag = rig.relay({"echo": echo.port})
    base = ag.rss()
    app = socket.create_connection((HOST, ag.ports["echo"]), timeout=5)
    with app:
        gw.proc.stop()
        try:
            app.setblocking(False)
            block, accepted, stalled_since = b"x" * 65536, 0, None
            deadline = time.monotonic() + 10
            while accepted < limit and time.monotonic() < deadline:
                try:
                    accepted += app.send(block)
                    stalled_since = None
                except BlockingIOError:
                    stalled_since = stalled_since or time.monotonic()
                    if time.monotonic() - stalled_since > 0.5:
                        break  # held back: what a bounded agent does
                    time.sleep(0.005)
            growth = ag.rss() - base
        finally:
            gw.proc.cont()
        print(f"accepted {accepted / 1e6:.1f} MB; agent RSS +{growth / 1e6:.1f} MB")
        if accepted >= limit or growth >= limit:
            raise Unbounded(f"the agent took {accepted / 1e6:.1f} MB from an application "
                            f"with no flow yet; its RSS grew by {growth / 1e6:.1f} MB")
    rig.wait_idle(gw, co, ag)


async def _echo_through(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(HOST, port)

    async def send() -> None:
        writer.write(data)
        await writer.drain()
        writer.write_eof()

    task = asyncio.ensure_future(send())
    got = await reader.read(-1)
    await task
    writer.close()
    await writer.wait_closed()
    return got


# bad input -----------------------------------------------------------------------------------

def _expect_reset(port: int, timeout: float = 5.0) -> float:
    """Connect, send a little, and expect the connection to be reset (at the connect or
    the send too, if the reset is that quick); returns how long from the connect."""
    t0 = time.monotonic()
    with pytest.raises(ConnectionResetError):
        app = socket.create_connection((HOST, port), timeout=timeout)
        t0 = time.monotonic()
        with app:
            app.sendall(b"hello")
            while app.recv(65536):
                pass
    return time.monotonic() - t0


def test_garbage_on_the_gateway_port_is_refused_logged_and_counted(rig: Rig) -> None:
    """An HTTP request (not a tether HELLO) on the gateway's port: the connection is ended
    at once with a protocol error, the gateway logs it, counts it, and keeps serving."""
    echo = rig.echo_server()
    gw, co, ag = rig.relay({"echo": echo.port})
    with socket.create_connection((HOST, gw.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: tether\r\n\r\n" + os.urandom(64))
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                reply += chunk
    assert b"protocol error" in reply  # the GOAWAY's reason, then EOF
    gw.wait_log(r"link from \? \(127\.0\.0\.1:\d+\) closed: protocol error")
    assert gw.status()["protocol_errors"] == 1
    assert echo_once(ag.ports["echo"], b"still serving") == b"still serving"
    rig.wait_idle(gw, co, ag)


def test_agent_with_a_wrong_token_is_refused(rig: Rig) -> None:
    """Gateway `--token`: a connector with the token is served; an agent with a wrong one
    gets a clear error and exits 1, with `--start-wait` too (a refusal is not waited
    out); the gateway logs and counts the refusal."""
    echo = rig.echo_server()
    gw = rig.gateway("--token", "s3cret")
    rig.connector(gw, {"echo": echo.port}, "--token", "s3cret")
    bad = rig.agent(gw, ["echo"], "--token", "wrong", "--start-wait", "60",
                    expect_ready=False)
    assert bad.proc.wait(CLIENT_TIMEOUT) == 1
    bad.wait_log(r"^tether agent: .*bad token")
    gw.wait_log(r"link from agent \(127\.0\.0\.1:\d+\) closed: .*bad token")
    assert gw.status()["protocol_errors"] == 1
    good = rig.agent(gw, ["echo"], "--token", "s3cret", name="agent2")
    assert echo_once(good.ports["echo"], b"welcome") == b"welcome"


def test_refused_link_is_counted_as_refused(rig: Rig) -> None:
    """A link refused for its token is a refusal, not garbage: `links_refused` counts it
    (`protocol_errors` counts it too today, with garbage and malformed frames)."""
    gw = rig.gateway("--token", "s3cret")
    bad = rig.agent(gw, ["echo"], "--token", "wrong", expect_ready=False)
    assert bad.proc.wait(CLIENT_TIMEOUT) == 1
    gw.wait_log(r"closed: .*bad token")
    assert gw.status()["links_refused"] == 1


def test_policy_denial_resets_the_application(rig: Rig, tmp_path: Path) -> None:
    """Gateway `--policy {"agent": ["echo"]}`: the agent may reach "echo" but not "sha";
    a connection to "sha" is reset, the gateway logs "denied" and counts it, the agent
    counts the refusal; "echo" still works."""
    echo = rig.echo_server()
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"agent": ["echo"]}))
    gw = rig.gateway("--policy", str(policy))
    co = rig.connector(gw, {"echo": echo.port, "sha": echo.port})
    ag = rig.agent(gw, ["echo", "sha"])
    assert _expect_reset(ag.ports["sha"]) < 2
    gw.wait_log(r"denied agent access to service sha \(policy\)")
    ag.wait_log(r"connection from 127\.0\.0\.1:\d+ to sha refused: denied by policy")
    assert gw.status()["denied"] == 1
    assert ag.status()["refused"] == 1
    assert echo_once(ag.ports["echo"], b"allowed") == b"allowed"
    rig.wait_idle(gw, co, ag)


def test_unknown_service_resets_the_application(rig: Rig) -> None:
    """The agent forwards to a service no connector serves: the application's connection
    is reset at once, the gateway counts no_such_service."""
    echo = rig.echo_server()
    gw = rig.gateway()
    co = rig.connector(gw, {"echo": echo.port})
    ag = rig.agent(gw, ["nosuch"])
    assert _expect_reset(ag.ports["nosuch"]) < 2
    gw.wait_log(r"agent asked for unknown service 'nosuch'")
    assert gw.status()["no_such_service"] == 1
    assert ag.status()["refused"] == 1
    rig.wait_idle(gw, co, ag)


def test_unreachable_server_resets_the_application_without_its_address(rig: Rig) -> None:
    """The connector serves a service whose server is not listening: the application's
    connection is reset at once; the agent hears why ("Connection refused") but not
    where, which only the connector's log says; the connector counts the refusal."""
    gw = rig.gateway()
    port = free_port()  # nobody listens there
    co = rig.connector(gw, {"down": port})
    ag = rig.agent(gw, ["down"])
    assert _expect_reset(ag.ports["down"]) < 2
    co.wait_log(rf"flow \S+: cannot connect to service down at 127\.0\.0\.1:{port}: ")
    told = ag.wait_log(r"flow \S+ reset: cannot connect to service down: Connection refused$")
    assert str(port) not in told, told
    assert co.status()["refused"] == 1
    rig.wait_idle(gw, co, ag)


# fin timeout ---------------------------------------------------------------------------------

FIN_TIMEOUT = 0.5


def _fin_timeout_relay(rig: Rig, srv: socket.socket) -> tuple[Daemon, Daemon, Daemon]:
    """A relay to the server `srv` (service "hold"), `--fin-timeout FIN_TIMEOUT` on both
    edges."""
    args = ["--fin-timeout", str(FIN_TIMEOUT)]
    return rig.relay({"hold": srv.getsockname()[1]}, connector_args=args, agent_args=args)


def _half_closed_pair(ag: Daemon, srv: socket.socket) -> tuple[socket.socket, socket.socket]:
    app = socket.create_connection((HOST, ag.ports["hold"]), timeout=5)
    app.sendall(b"request")
    conn, _ = srv.accept()
    conn.settimeout(5)
    assert conn.recv(100) == b"request"
    return app, conn


def test_fin_timeout_resets_a_half_closed_connection(rig: Rig) -> None:
    """The client half-closes; the server reads EOF and never closes its side. With
    `--fin-timeout 0.5` on the agent and the connector, both ends are reset after
    0.5-1 s (the reaper runs every fin_timeout/4), and it is counted and logged."""
    srv = socket.create_server((HOST, 0))
    srv.settimeout(5)
    with srv:
        gw, co, ag = _fin_timeout_relay(rig, srv)
        app, conn = _half_closed_pair(ag, srv)
        with app, conn:
            app.shutdown(socket.SHUT_WR)
            t0 = time.monotonic()
            assert conn.recv(100) == b""  # the FIN crossed; the server keeps its side open
            app.settimeout(5)
            with pytest.raises(ConnectionResetError):
                app.recv(100)
            took = time.monotonic() - t0
            wait_reset_after_eof(conn)  # the server, which read EOF, is reset too
        assert FIN_TIMEOUT * 0.9 <= took <= FIN_TIMEOUT * 2 + 0.3, took
        rig.wait_idle(gw, co, ag)
        counted = ag.status()["fin_timeouts"] + co.status()["fin_timeouts"]
        assert counted >= 1
        assert ag.log_has("fin timeout") or co.log_has("fin timeout")


def test_fin_timeout_spares_an_upload_the_server_still_reads(rig: Rig) -> None:
    """The application uploads 4 MB and half-closes; the server reads it at about
    1.3 MB/s, then replies. The agent's socket is idle from the application's FIN on
    while the tunnel and the connector's kernel still hold megabytes for the server: the
    agent reset such an upload after its fin timeout. The edge that passed the FIN on
    (the connector) times its server instead, counting what its kernel hands it."""
    total = 4 * 1024 * 1024

    def slow_reader(conn: socket.socket) -> None:
        got = 0
        with conn:
            while chunk := conn.recv(32 * 1024):
                got += len(chunk)
                time.sleep(0.025)
            conn.sendall(f"got {got}".encode())

    srv = socket.create_server((HOST, 0))
    srv.settimeout(5)
    with srv:
        gw, co, ag = _fin_timeout_relay(rig, srv)
        with socket.create_connection((HOST, ag.ports["hold"]), timeout=20) as app:
            conn, _ = srv.accept()
            conn.settimeout(20)
            reader = threading.Thread(target=slow_reader, args=(conn,))
            reader.start()
            try:
                app.sendall(os.urandom(total))
                app.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := app.recv(100):
                    reply += chunk
            finally:
                reader.join(20)
        assert reply == f"got {total}".encode()
        rig.wait_idle(gw, co, ag)
        assert ag.status()["fin_timeouts"] == 0 and co.status()["fin_timeouts"] == 0


def test_fin_timeout_spares_a_half_closed_connection_still_transferring(rig: Rig) -> None:
    """A TCP proxy's client-fin/server-fin timeouts (the issue's model, e.g. HAProxy's
    `timeout client-fin`) are *inactivity* timeouts for half-closed connections: a
    client that sent its request and half-closed while the server streams a long reply
    must get all of it. Here the reply streams for 3x the fin timeout."""
    srv = socket.create_server((HOST, 0))
    srv.settimeout(5)
    with srv:
        gw, co, ag = _fin_timeout_relay(rig, srv)
        app, conn = _half_closed_pair(ag, srv)
        with app, conn:
            app.shutdown(socket.SHUT_WR)
            assert conn.recv(100) == b""
            app.settimeout(5)
            got = 0
            for _ in range(15):
                conn.sendall(b"x" * 1000)
                time.sleep(FIN_TIMEOUT / 5)
                got += len(app.recv(65536))
            conn.close()
            while chunk := app.recv(65536):
                got += len(chunk)
        assert got == 15_000
        rig.wait_idle(gw, co, ag)
