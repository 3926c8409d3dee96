"""The daemons' operational surface, from review: signals, option errors, the admin
endpoint and its metrics. Real processes and sockets (tests/relayrig.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from procs import ProcGroup, tether_argv
from relayrig import (
    HOST,
    LINGER_ZERO,
    TCP_CLOSE,
    Daemon,
    Rig,
    echo_once,
    free_port,
    get_status,
    tcp_state,
    wait_until,
)
from tether import wire
from tether.admin import AdminServer
from tether.errors import ErrorCode

LONG_NAME = "s" * 256


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig() as r:
        yield r


@contextlib.contextmanager
def _draining(rig: Rig, role: str) -> Iterator[tuple[Daemon, socket.socket]]:
    """A relay whose daemons drain for up to 60 s, one connection open through it, and
    the daemon of `role` sent SIGTERM: yields it, draining (still running), and the
    application's socket."""
    echo = rig.echo_server()
    drain = ["--drain", "60"]
    gw, co, ag = rig.relay({"echo": echo.port}, gateway_args=drain, connector_args=drain,
                           agent_args=drain)
    daemon = {"agent": ag, "gateway": gw, "connector": co}[role]
    with socket.create_connection((HOST, ag.ports["echo"]), timeout=10) as app:
        app.sendall(b"ping")
        assert app.recv(10) == b"ping"
        daemon.proc.popen.send_signal(signal.SIGTERM)
        daemon.wait_log("draining 1 connection" if role != "gateway" else "shutting down")
        assert daemon.proc.running, "exited before the drain's deadline"
        yield daemon, app


@pytest.mark.parametrize("role", ["agent", "gateway", "connector"])
def test_a_second_signal_ends_the_drain_at_once(rig: Rig, role: str) -> None:
    """SIGTERM starts a drain of up to `--drain` seconds; a second signal (SIGTERM, or
    SIGINT: an operator's second Ctrl-C) ends it at once: the open connection is reset
    and the daemon exits 0. Before, the second signal was ignored and the daemon waited
    for the whole drain (here 60 s)."""
    with _draining(rig, role) as (daemon, app):
        t0 = time.monotonic()
        daemon.proc.popen.send_signal(signal.SIGINT)
        assert daemon.proc.wait(10) == 0
        assert time.monotonic() - t0 < 3, "the second signal did not end the drain"
        daemon.wait_log("signalled again")
        try:
            end = app.recv(10)
        except ConnectionResetError:
            end = b"reset"
        assert end in (b"", b"reset")


def _get(port: int, request: bytes) -> bytes:
    """Send `request` raw to an admin endpoint; its whole answer."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_admin_paths_with_a_query_string_are_served(rig: Rig) -> None:
    """`/metrics?...` (a scrape configured with `params`) and `/status?pretty` are the
    same pages; before, the query made them "404 Not Found"."""
    gw = rig.gateway("--admin", f"{HOST}:0")
    for path in ("/metrics?format=text", "/status?pretty=1"):
        answer = _get(gw.admin_port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n"), answer[:200]


def test_idle_admin_connections_cannot_exhaust_the_daemon(rig: Rig) -> None:
    """Clients that connect to the admin port and send nothing hold no more than a
    bounded number of the daemon's file descriptors (the same per-process limit its
    relayed connections need), and a status request still gets its answer. Before,
    each was held 10 s, with no bound on how many."""
    gw = rig.gateway()
    before = gw.fds()
    idle = []
    try:
        for _ in range(400):
            idle.append(socket.create_connection((HOST, gw.admin_port), timeout=10))
        assert gw.status()["name"] == "gw1"
        wait_until(lambda: gw.fds() - before >= 100, 3.0, "descriptors held")
    finally:
        for s in idle:
            s.close()


@pytest.mark.parametrize(("argv", "said"), [
    (["gateway", "--heartbeat", "-1"], "--heartbeat"),
    (["gateway", "--heartbeat", "0"], "--heartbeat"),
    (["gateway", "--link-timeout", "nan"], "--link-timeout"),
    (["gateway", "--drain", "-3"], "--drain"),
    (["gateway", "--heartbeat", "soon"], "'soon': expected seconds, more than 0"),
    (["gateway", "--name", ""], "node name '' must be 1 to 255 bytes"),
    (["agent", "--gateway", "127.0.0.1:1", "--forward", "127.0.0.1:0=web", "--name", "a@b"],
     "without '@'"),
    (["connector", "--gateway", "127.0.0.1:1", "--service", "web=127.0.0.1:1", "--name",
      "c" * 256], "1 to 255 bytes"),
    (["agent", "--gateway", "127.0.0.1:1", "--forward", "127.0.0.1:0=web", "--drain", "nan"],
     "--drain"),
    (["connector", "--gateway", "127.0.0.1:1", "--service", "web=127.0.0.1:1",
      "--start-wait", "-1"], "--start-wait"),
    (["agent", "--gateway", "127.0.0.1:1", "--forward", "127.0.0.1:0=web",
      "--start-wait", "inf"], "--start-wait"),
    (["agent", "--gateway", "127.0.0.1:1", "--forward", "127.0.0.1:0=web",
      "--max-connections", "0"], "--max-connections"),
    (["connector", "--gateway", "127.0.0.1:1", "--service", "web=127.0.0.1:1",
      "--max-connections", "many"], "--max-connections"),
    (["gateway", "--max-links", "-5"], "--max-links"),
    (["gateway", "--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"],
     "/nonexistent/cert.pem"),
    (["agent", "--gateway", "127.0.0.1:1", "--forward", "127.0.0.1:0=web",
      "--tls-ca", "/nonexistent/ca.pem"], "/nonexistent/ca.pem"),
    (["agent", "--gateway", "127.0.0.1:1", "--forward", f"127.0.0.1:0={LONG_NAME}"],
     "1 to 255 bytes"),
])
def test_bad_option_values_are_refused_naming_what_is_wrong(argv: list[str],
                                                              said: str) -> None:
    """A value no daemon can run with is refused at once, before anything starts: a
    non-zero exit and one line naming the option or file, no traceback. Before: a
    gateway with `--heartbeat -1` started, then failed every link's handshake with a
    traceback in its log; a negative or NaN `--drain` meant no drain; a missing TLS file
    said only "[Errno 2] No such file or directory"; an agent forwarding to a service
    name no gateway can take started, and reset every connection."""
    if argv[0] == "gateway":
        argv = [*argv, "--listen", f"{HOST}:0", "--admin", "none"]
    try:
        done = subprocess.run(tether_argv(*argv), capture_output=True, text=True,
                              timeout=5)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{argv} was not refused: it ran") from exc
    assert done.returncode in (1, 2), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert said in done.stderr.splitlines()[-1], done.stderr


@pytest.mark.parametrize("role", ["agent", "gateway", "connector"])
def test_status_answers_during_the_drain(rig: Rig, role: str) -> None:
    """While a daemon drains (SIGTERM), `tether status` still shows the connection it
    waits for: the moment an operator wants to see what is left. Before, the admin
    endpoint closed first: "connection refused" for the whole drain."""
    with _draining(rig, role) as (daemon, _app):
        assert daemon.open_counts() == {k: 1 for k in daemon.open_counts()}


def test_edge_byte_counters_include_open_connections(rig: Rig) -> None:
    """An edge's `bytes_up`/`bytes_down` (and `tether_bytes_*_total`) count the bytes
    of open connections as they move, not only once a connection has ended: a
    long-lived connection's traffic shows in `rate()` while it flows. Before, they
    stayed 0 for as long as the connection was open, then jumped."""
    echo = rig.echo_server()
    _gw, co, ag = rig.relay({"echo": echo.port})
    with socket.create_connection((HOST, ag.ports["echo"]), timeout=10) as app:
        app.sendall(b"x" * 1000)
        got = 0
        while got < 1000:
            got += len(app.recv(65536))
        for edge in (ag, co):
            status = edge.status()
            assert (status["bytes_up"], status["bytes_down"]) == (1000, 1000), status
            metrics = edge.metrics()
            assert f'tether_bytes_up_total{{node="{edge.name}",role="{edge.role}"}} 1000.0' \
                in metrics, metrics
        app.sendall(b"y" * 500)
        got = 0
        while got < 500:
            got += len(app.recv(65536))
    rig.wait_idle(ag, co)
    for edge in (ag, co):  # (once ended: counted once, not twice)
        status = edge.status()
        assert (status["bytes_up"], status["bytes_down"]) == (1500, 1500), status


def _answer_three_for_one(listener: socket.socket, up: int) -> None:
    """A service that reads `up` bytes, answers three times as many, then waits for EOF."""
    conn, _ = listener.accept()
    with conn:
        got = 0
        while got < up:
            got += len(conn.recv(65536))
        conn.sendall(b"r" * (3 * up))
        while conn.recv(65536):
            pass


def test_bytes_up_and_down_mean_the_same_direction_at_every_daemon(rig: Rig) -> None:
    """`bytes_up` is what went toward the service, `bytes_down` what came back from it,
    at the agent, the gateway and the connector alike, for an open flow (its entry and
    the totals) and once it has ended. Before, the connector counted the other way
    round (what its socket read was "up": the server's answer), and the gateway's
    totals counted only ended flows."""
    listener = socket.create_server((HOST, 0))
    service = threading.Thread(target=_answer_three_for_one, args=(listener, 1000))
    service.start()
    try:
        gw, co, ag = rig.relay({"svc": listener.getsockname()[1]})
        with socket.create_connection((HOST, ag.ports["svc"]), timeout=10) as app:
            app.sendall(b"q" * 1000)
            got = 0
            while got < 3000:
                got += len(app.recv(65536))
            for daemon in (ag, gw, co):
                status = daemon.status()
                (flow,) = status["open_flows" if daemon is gw else "flows"]
                assert (flow["bytes_up"], flow["bytes_down"]) == (1000, 3000), \
                    (daemon.name, flow)
                assert (status["bytes_up"], status["bytes_down"]) == (1000, 3000), \
                    (daemon.name, status)
        rig.wait_idle(gw, co, ag)
        for daemon in (ag, gw, co):  # (ended: counted once)
            status = daemon.status()
            assert (status["bytes_up"], status["bytes_down"]) == (1000, 3000), \
                (daemon.name, status)
    finally:
        service.join(10)
        listener.close()


def test_one_connections_log_lines_name_the_same_streams_at_every_daemon(rig: Rig) -> None:
    """An operator follows one connection across the three daemons' logs: the agent's
    line names its stream to the gateway (`gw1#N`), the gateway's "spliced" line both
    streams (`agent#N -> connector#M`), the connector's its stream (`gw1#M`). Before,
    the gateway named only the two nodes, and nothing tied its flow to theirs."""
    echo = rig.echo_server()
    gw, co, ag = rig.relay({"echo": echo.port})
    for _ in range(3):  # (so that the streams' numbers are not all the same by chance)
        with socket.create_connection((HOST, ag.ports["echo"]), timeout=10) as app:
            app.sendall(b"x")
            assert app.recv(10) == b"x"
        agent, _ = ag.proc.expect(r"flow \S+ allocated service=echo as gw1#(\d+) for ",
                                  stream="stderr")
        spliced, _ = gw.proc.expect(
            r"flow \S+ spliced service=echo agent#(\d+) -> connector#(\d+)$", stream="stderr")
        served, _ = co.proc.expect(r"flow \S+ connected service=echo as gw1#(\d+) to ",
                                   stream="stderr")
        assert (agent[1], served[1]) == (spliced[1], spliced[2]), \
            (agent[0], spliced[0], served[0])


def test_the_gateways_shutdown_line_sums_up_instead_of_listing_every_flow(rig: Rig) -> None:
    """The gateway's "shutting down" line gives its counters and how many flows and
    links are open, in one short line. Before, it was the whole status, every open flow
    listed (at 20,000 connections, a line of megabytes)."""
    echo = rig.echo_server()
    gw, _co, ag = rig.relay({"echo": echo.port}, gateway_args=["--drain", "0"])
    apps = [socket.create_connection((HOST, ag.ports["echo"]), timeout=10)
            for _ in range(30)]
    try:
        for app in apps:
            app.sendall(b"ping")
            assert app.recv(10) == b"ping"
        gw.proc.popen.send_signal(signal.SIGTERM)
        line = gw.wait_log("shutting down")
        assert gw.proc.wait(10) == 0
    finally:
        for app in apps:
            app.close()
    assert len(line) < 1000, line
    assert "'id'" not in line and "open_flows" not in line
    assert "30 flows open, 2 links" in line and "flows_opened=30," in line


async def test_a_client_that_does_not_read_its_answer_is_not_held_for_ever() -> None:
    """A client that asks for a large status and then reads nothing is cut off (reset)
    once `request_timeout` has passed, with what was not sent dropped. Before, the
    endpoint kept the connection and the unsent answer in memory for ever: a few such
    clients against a gateway with many open flows held megabytes each."""
    big = {"open_flows": [{"id": f"{i}@gw1", "service": "web"} for i in range(400_000)]}
    admin = AdminServer((HOST, 0), "gateway", "gw1", lambda: big)
    admin.request_timeout = 0.5
    await admin.start()
    try:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect((HOST, admin.port))
        client.sendall(b"GET /status HTTP/1.0\r\n\r\n")
        with client:
            deadline = time.monotonic() + 5
            while tcp_state(client) != TCP_CLOSE:
                assert time.monotonic() < deadline, "still held: the answer waits for ever"
                await asyncio.sleep(0.05)
    finally:
        await admin.aclose()


def test_an_application_reset_is_logged_with_its_reason_at_both_edges(rig: Rig) -> None:
    """The agent's line for a connection its application reset says so and why ("reset
    here: connection reset: ..."), and the connector's gives the same reason, received.
    Before, the agent's line said only "reset: reset"."""
    echo = rig.echo_server()
    _gw, co, ag = rig.relay({"echo": echo.port})
    app = socket.create_connection((HOST, ag.ports["echo"]), timeout=10)
    app.sendall(b"x")
    assert app.recv(10) == b"x"
    app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    app.close()
    ag.proc.expect(r"flow \S+ reset here: connection reset: .*Connection reset by peer$",
                   stream="stderr")
    co.proc.expect(r"flow \S+ reset: connection reset: .*Connection reset by peer$",
                   stream="stderr")


def test_status_lists_the_oldest_open_flows_and_so_many(rig: Rig) -> None:
    """`tether status` lists the open flows oldest first, at most `--flows N` of them
    (`all` for every one), while the counts still say how many are open; `/metrics`
    does not build the list at all. A query it cannot read is refused."""
    echo = rig.echo_server()
    gw, co, ag = rig.relay({"echo": echo.port})
    apps = []
    try:
        for _ in range(5):
            app = socket.create_connection((HOST, ag.ports["echo"]), timeout=10)
            app.sendall(b"x")
            assert app.recv(10) == b"x"
            apps.append(app)
            time.sleep(0.01)  # (distinct ages)
        for daemon, key, count in ((gw, "open_flows", "flows"), (ag, "flows", "open"),
                                   (co, "flows", "open")):
            everything = daemon.status()[key]
            assert len(everything) == 5, (daemon.name, everything)
            ages = [f["age"] for f in everything]
            assert ages == sorted(ages, reverse=True), (daemon.name, ages)
            out = subprocess.run(tether_argv("status", daemon.admin, "--flows", "2"),
                                 capture_output=True, text=True, timeout=10, check=False)
            assert out.returncode == 0, out.stderr
            two = json.loads(out.stdout)
            assert two[count] == 5 and [f["id"] for f in two[key]] == \
                [f["id"] for f in everything[:2]], (daemon.name, two)
            assert len(get_status(daemon.admin_port, "/status?flows=all")[key]) == 5
        with pytest.raises(AssertionError, match=": 400"):
            get_status(gw.admin_port, "/status?flows=many")
    finally:
        for app in apps:
            app.close()


async def test_the_admin_endpoint_lists_at_most_listed_flows_unless_asked() -> None:
    """With a `stats` that takes `flows`, /status asks for `listed_flows` (100), or what
    the query says, and /metrics for none; a `stats` without it is called as before."""
    asked: list[int | None] = []

    def stats(flows: int | None = None) -> dict[str, object]:
        asked.append(flows)
        return {"flows": 400_000, "open_flows": list(range(400_000 if flows is None
                                                          else min(flows, 400_000)))}
    admin = AdminServer((HOST, 0), "gateway", "gw1", stats)
    plain = AdminServer((HOST, 0), "hub", "h", lambda: {"open": 1})
    await admin.start()
    await plain.start()
    try:
        def get(server: AdminServer, path: str) -> bytes:
            with socket.create_connection((HOST, server.port), timeout=10) as c:
                c.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                return b"".join(iter(lambda: c.recv(1 << 20), b""))
        body = (await asyncio.to_thread(get, admin, "/status")).partition(b"\r\n\r\n")[2]
        assert len(json.loads(body)["open_flows"]) == 100
        await asyncio.to_thread(get, admin, "/status?flows=7")
        await asyncio.to_thread(get, admin, "/metrics")
        assert asked == [100, 7, 0], asked
        assert b'"open": 1' in await asyncio.to_thread(get, plain, "/status?flows=3")
    finally:
        await admin.aclose()
        await plain.aclose()


@pytest.mark.parametrize("level", ["debug", "Warning"])
def test_log_level_is_taken_in_any_case(level: str) -> None:
    """`--log-level debug` is DEBUG, as other daemons take it. Before: "invalid
    choice: 'debug'", exit 2."""
    with ProcGroup() as group:
        proc = group.start("gateway", tether_argv("--log-level", level, "gateway", "--listen",
                                                  f"{HOST}:0", "--admin", "none"))
        proc.expect(r"^gateway gw listening on port \d+$", stream="stderr")
        shown = [ln.text for ln in proc.lines("stderr") if " INFO " in ln.text]
        assert bool(shown) == (level == "debug"), shown


def test_admin_address_errors_name_the_option(rig: Rig) -> None:
    """A bad or busy `--admin` address is told as such. Before: a malformed one was
    found only after the link to the gateway was up, and a busy port said only
    "address already in use" (which port of which option?) after the agent had
    started forwarding."""
    gw = rig.gateway()
    for admin, gateway in (("bogus", "127.0.0.1:1"), (gw.admin, gw.address)):
        done = subprocess.run(tether_argv("agent", "--gateway", gateway, "--forward",
                                          f"{HOST}:0=web", "--admin", admin),
                              capture_output=True, text=True, timeout=10)
        assert done.returncode == 1, done.stderr
        last = done.stderr.splitlines()[-1]
        assert last.startswith(f"tether agent: --admin {admin}: "), done.stderr


async def test_tether_status_takes_an_http_1_1_answer() -> None:
    """`tether status` through a proxy that answers in HTTP/1.1 (nginx does, whatever the
    request's version) prints the status. Before: "admin endpoint ... answered:
    HTTP/1.1 200 OK", exit 1."""
    body = b'{"role": "gateway"}\n'

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            *tether_argv("status", f"{HOST}:{port}"), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        server.close()
        await server.wait_closed()
    assert proc.returncode == 0, err
    assert out == body


def test_agent_status_counts_a_connection_waiting_for_its_flow(rig: Rig) -> None:
    """A connection the agent accepted and holds while its flow is being allocated (here
    the gateway is frozen) is open: `open` counts it. Before, `open` said 0 for as long
    as the allocation took, though the agent held the connection (and would drain it)."""
    echo = rig.echo_server()
    gw, co, ag = rig.relay({"echo": echo.port})
    with socket.create_connection((HOST, ag.ports["echo"]), timeout=10) as app:
        gw.proc.stop()
        try:
            app.sendall(b"ping")
            wait_until(lambda: ag.status()["open"] != 1, 3.0, "the agent's open count")
        finally:
            gw.proc.cont()
        assert app.recv(10) == b"ping"
    rig.wait_idle(gw, co, ag)


def test_forward_listen_errors_say_which_forward(rig: Rig) -> None:
    """An agent refuses a listen address given twice before it starts, and a busy one
    with the forward it is for. Before: it started forwarding the first, then failed
    on the second with only "error while attempting to bind on address ...: address
    already in use"."""
    gw = rig.gateway()
    port = free_port()
    cases = (([f"{HOST}:{port}=web", f"{HOST}:{port}=db"], f"{HOST}:{port} is given twice"),
             ([f"{HOST}:{gw.port}=web"], f"cannot listen on {HOST}:{gw.port} for service web"))
    for forwards, said in cases:
        argv = ["agent", "--gateway", gw.address, "--admin", "none"]
        for forward in forwards:
            argv += ["--forward", forward]
        done = subprocess.run(tether_argv(*argv), capture_output=True, text=True, timeout=10)
        assert done.returncode == 1, done.stderr
        assert said in done.stderr.splitlines()[-1], done.stderr
        if "twice" in said:
            assert "forwarding" not in done.stderr, done.stderr


def test_tether_status_on_a_link_port_says_it_is_not_an_admin_endpoint(rig: Rig) -> None:
    """`tether status` pointed at a gateway's link port (a mistake easily made: both are
    printed at start) says so in words. Before, it printed the gateway's binary GOAWAY
    frame to the terminal."""
    gw = rig.gateway()
    done = subprocess.run(tether_argv("status", gw.address), capture_output=True,
                          timeout=20)
    assert done.returncode == 1
    line = done.stderr.decode()
    assert line.rstrip("\n").isprintable(), line
    assert "not an admin endpoint" in line and "admin endpoint on port" in line, line


def test_edges_started_before_their_gateway_wait_for_it_with_start_wait(rig: Rig) -> None:
    """`--start-wait`: an agent and a connector started before their gateway listens are
    refused, say so once, dial again until it is there, then serve; no order needed."""
    echo = rig.echo_server()
    port = free_port()
    gateway = f"{HOST}:{port}"
    agent = Daemon(rig.start("agent", tether_argv(
        "agent", "--gateway", gateway, "--name", "agent", "--forward", f"{HOST}:0=echo",
        "--start-wait", "30")), "agent", "agent", 0)
    connector = Daemon(rig.start("connector", tether_argv(
        "connector", "--gateway", gateway, "--name", "connector", "--service",
        f"echo={HOST}:{echo.port}", "--start-wait", "30")), "connector", "connector", 0)
    waiting = (rf"(agent|connector): no gateway at {gateway} yet \(Connection refused\): "
               rf"trying again for up to 30s$")
    for edge in (agent, connector):
        edge.wait_log(waiting)
    time.sleep(0.3)  # (a few attempts refused, none of them fatal)
    assert agent.proc.running and connector.proc.running
    gw = rig.gateway(port=port)
    match, _ = agent.proc.expect(r"^agent agent forwarding 127\.0\.0\.1:(\d+) to echo$",
                                 stream="stderr")
    gw.wait_log(r"\bconnector registered service echo$")
    assert echo_once(int(match.group(1)), b"no order") == b"no order"
    for edge in (agent, connector):
        line = edge.wait_log(rf"link to the gateway {gateway} up after (\d+) attempts")
        assert int(line.rsplit(" after ", 1)[1].split()[0]) >= 3, line
        assert len([ln for ln in edge.proc.lines("stderr") if "no gateway at" in ln.text]) == 1


def test_start_wait_ends_with_the_reason_and_the_attempts(rig: Rig) -> None:
    """With no gateway at all, `--start-wait` is a bound: the agent exits 1 once it has
    passed, saying how many attempts over how long, and why the last one failed."""
    gateway = f"{HOST}:{free_port()}"
    started = time.monotonic()
    proc = rig.start("agent", tether_argv("agent", "--gateway", gateway, "--forward",
                                          f"{HOST}:0=echo", "--start-wait", "0.8"))
    assert proc.popen.wait(20) == 1
    took = time.monotonic() - started
    match, _ = proc.expect(rf"^tether agent: no gateway at {gateway} after (\d+) attempts "
                           rf"\((\d+\.\d)s\): Connection refused$", stream="stderr")
    assert int(match.group(1)) >= 3
    assert 0.8 <= float(match.group(2)) < 5
    assert took >= 0.8


def test_without_start_wait_an_edge_with_no_gateway_exits_at_once(rig: Rig) -> None:
    """The default (`--start-wait 0`): no gateway at start is a configuration to fix; the
    edge exits 1 with the reason after one attempt."""
    gateway = f"{HOST}:{free_port()}"
    proc = rig.start("connector", tether_argv("connector", "--gateway", gateway,
                                              "--service", f"echo={HOST}:9"))
    assert proc.popen.wait(20) == 1
    proc.expect(r"^tether connector: .*Connection refused", stream="stderr")
    assert not any("no gateway at" in ln.text for ln in proc.lines("stderr"))


def _round_trip(app: socket.socket, data: bytes) -> bytes | str:
    """`data` sent on an open connection to an echo: what came back, or how it failed
    (`"reset"`; `b""` is an EOF)."""
    try:
        app.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = app.recv(65536)
            if not chunk:
                return got
            got += chunk
        return got
    except ConnectionResetError:
        return "reset"


def _connect_round_trip(port: int, data: bytes) -> bytes | str:
    """A new connection to `port` and `_round_trip` on it; `"reset"` also if the reset
    came before `connect()` returned (the server accepts and resets at once)."""
    try:
        app = socket.create_connection((HOST, port), timeout=10)
    except ConnectionResetError:
        return "reset"
    with app:
        return _round_trip(app, data)


def test_connections_over_max_connections_are_reset_logged_and_counted(rig: Rig) -> None:
    """`--max-connections 3`: three connections open are served; more are reset (not
    left to hang, not an EOF), logged (one line, then one a second counting the rest)
    and counted (`over_limit`, in `refused` too, and in /metrics); once one of the three
    has closed, a new connection is served again."""
    echo = rig.echo_server()
    _, _, ag = rig.relay({"echo": echo.port}, agent_args=["--max-connections", "3"])
    port = ag.ports["echo"]
    held = [socket.create_connection((HOST, port), timeout=10) for _ in range(3)]
    try:
        assert [_round_trip(app, b"held") for app in held] == [b"held"] * 3
        assert [_connect_round_trip(port, b"over") for _ in range(3)] == ["reset"] * 3
        ag.wait_log(r"agent agent: connection from 127\.0\.0\.1:\d+ to echo refused: "
                    r"3 connection\(s\) open, at the limit \(--max-connections 3\)$")
        ag.wait_log(r"agent agent: 2 more connection\(s\) refused in the last second, at "
                    r"the limit \(--max-connections 3\)$", timeout=5)
        status = ag.status()
        assert (status["max_connections"], status["over_limit"], status["refused"],
                status["open"], status["connections"]) == (3, 3, 3, 3, 3), status
        assert re.search(r'^tether_over_limit_total\{node="agent",role="agent"\} 3\.0$',
                         ag.metrics(), re.M)
        assert "# TYPE tether_max_connections gauge" in ag.metrics()
        held.pop().close()
        wait_until(lambda: ag.status()["open"] != 2, 10, "the closed connection still open")
        with socket.create_connection((HOST, port), timeout=10) as again:
            assert _round_trip(again, b"again") == b"again"
    finally:
        for app in held:
            app.close()
    rig.wait_idle(ag)


def test_an_agent_at_its_open_file_limit_resets_instead_of_dropping_silently(
        rig: Rig) -> None:
    """An agent whose open-file limit is 200 takes its default `max_connections` from
    it (100: half of it, so small a limit; 128 less than it above 256) and resets what
    is over it. Before, with no limit of its own,
    it ran out of files: libuv then accepts and closes every connection waiting in the
    backlog (so that its loop does not spin), and those applications read an EOF, a
    "clean" empty answer, with nothing logged or counted anywhere."""
    echo = rig.echo_server()
    gw = rig.gateway()
    rig.connector(gw, {"echo": echo.port})
    proc = rig.start("agent", ["prlimit", "--nofile=200:200", *tether_argv(
        "agent", "--gateway", gw.address, "--name", "agent", "--forward",
        f"{HOST}:0=echo")])
    match, _ = proc.expect(r"^agent agent forwarding 127\.0\.0\.1:(\d+) to echo$",
                           stream="stderr")
    _, line = proc.expect(r"^agent agent admin endpoint on port (\d+)$", stream="stderr")
    ag = Daemon(proc, "agent", "agent", int(line.text.rsplit(" ", 1)[1]),
                ports={"echo": int(match.group(1))})
    assert ag.status()["max_connections"] == 100
    apps: list[socket.socket | None] = []  # all at once: None, reset as it connected
    try:
        for _ in range(150):
            try:
                apps.append(socket.create_connection((HOST, ag.ports["echo"]), timeout=10))
            except ConnectionResetError:
                apps.append(None)
        got = [_round_trip(app, b"%d" % i) if app is not None else "reset"
               for i, app in enumerate(apps)]
    finally:
        for app in apps:
            if app is not None:
                app.close()
    wrong = {i: g for i, g in enumerate(got) if g not in (b"%d" % i, "reset")}
    assert not wrong, f"neither answered nor reset: {wrong}"
    assert got.count("reset") == 150 - 100
    assert ag.status()["over_limit"] == 150 - 100
    rig.wait_idle(ag)



def test_an_agent_takes_the_hard_open_file_limit(rig: Rig) -> None:
    """A soft open-file limit below the hard one (often 1024 against far more) is raised
    to it at start, as Go's runtime does, and the agent's default `max_connections`
    follows: 1000 less 128, not 300 less 128."""
    gw = rig.gateway()
    proc = rig.start("agent", ["prlimit", "--nofile=300:1000", *tether_argv(
        "agent", "--gateway", gw.address, "--name", "agent", "--forward",
        f"{HOST}:0=echo")])
    _, line = proc.expect(r"^agent agent admin endpoint on port (\d+)$", stream="stderr")
    assert get_status(int(line.text.rsplit(" ", 1)[1]))["max_connections"] == 872
    with open(f"/proc/{proc.pid}/limits") as limits:
        files = next(ln for ln in limits if ln.startswith("Max open files")).split()
    assert files[3:5] == ["1000", "1000"], files


def test_links_over_max_links_are_refused_told_logged_and_counted(rig: Rig) -> None:
    """`tether gateway --max-links 2`: two connections in their handshake hold the two
    places; a third is refused as it is accepted -- told why (a GOAWAY with code
    REFUSED and the reason, then EOF; not dropped without a word), logged and counted.
    An agent started meanwhile with `--start-wait` says why it waits and dials again;
    once one of the two has gone, it links up."""
    gw = rig.gateway("--max-links", "2")
    assert gw.status()["max_links"] == 2
    held = [socket.create_connection((HOST, gw.port), timeout=10) for _ in range(2)]
    try:
        with socket.create_connection((HOST, gw.port), timeout=10) as third:
            third.sendall(b"not a HELLO")
            answer = b""
            while chunk := third.recv(4096):
                answer += chunk
        assert wire.FrameDecoder().feed(answer) == [wire.GoAway(
            last_stream=0, code=ErrorCode.REFUSED,
            reason="gateway gw1 is at its limit of 2 link(s) (--max-links)")]
        gw.wait_log(r"gateway gw1: link from 127\.0\.0\.1:\d+ refused: 2 link\(s\) open or "
                    r"in their handshake, at the limit \(--max-links 2\)$")
        status = gw.status()
        assert (status["links_over_limit"], status["links_refused"]) == (1, 1), status
        metrics = gw.metrics()
        assert "# TYPE tether_max_links gauge" in metrics
        assert "# TYPE tether_links_over_limit_total counter" in metrics
        # (no connector: only the agent's link is asked for)
        ag = rig.agent(gw, ["echo"], "--start-wait", "30", expect_ready=False)
        ag.wait_log(rf"agent: the gateway at {re.escape(gw.address)} refused the link "
                    r"\(peer refused the handshake: gateway gw1 is at its limit of 2 "
                    r"link\(s\) \(--max-links\)\): trying again for up to 30s$")
        held.pop().close()
        ag.wait_log(r"agent: link to the gateway \S+ up after \d+ attempts")
        wait_until(lambda: gw.status()["links"] != 1, 10, "the agent's link not up")
        assert ag.proc.running
    finally:
        for sock in held:
            sock.close()


def test_an_agent_without_start_wait_exits_naming_the_gateways_link_limit(rig: Rig) -> None:
    """The default (`--start-wait 0`): a gateway at its `--max-links` ends the agent at
    once (exit 1), with the gateway's reason, not a bare "connection reset"."""
    gw = rig.gateway("--max-links", "1")
    held = socket.create_connection((HOST, gw.port), timeout=10)
    try:
        ag = rig.agent(gw, ["echo"], expect_ready=False)
        ag.proc.expect(r"^tether agent: peer refused the handshake: gateway gw1 is at its "
                       r"limit of 1 link\(s\) \(--max-links\)$", stream="stderr")
        assert ag.proc.wait(10) == 1
    finally:
        held.close()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) here")
def test_the_relay_over_ipv6_names_its_peers_in_brackets(rig: Rig) -> None:
    """Gateway, connector, agent and server all on ::1: the bytes go through, and the
    log lines name IPv6 peers as `[::1]:PORT`, not the ambiguous `::1:PORT`."""
    with socket.socket(socket.AF_INET6) as listener:
        listener.bind(("::1", 0))
        listener.listen()
        server_port = listener.getsockname()[1]

        def serve_one() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(conn.recv(100).upper())

        server = threading.Thread(target=serve_one, daemon=True)
        server.start()
        gw_port = free_port()
        gw = rig.start("gateway", tether_argv("gateway", "--listen", f"[::1]:{gw_port}",
                                              "--name", "gw1"))
        gw.expect(r"gateway gw1 listening on \[::1\]:\d+$", stream="stderr")
        rig.start("connector", tether_argv("connector", "--gateway", f"[::1]:{gw_port}",
                                           "--service", f"up=[::1]:{server_port}"))
        gw.expect(r"node connector connected from \[::1\]:\d+$", stream="stderr")
        gw.expect(r"registered service up$", stream="stderr")
        agent = rig.start("agent", tether_argv("agent", "--gateway", f"[::1]:{gw_port}",
                                               "--forward", "[::1]:0=up"))
        match, _ = agent.expect(r"^agent agent forwarding \[::1\]:(\d+) to up$",
                                stream="stderr")
        with socket.create_connection(("::1", int(match.group(1))), timeout=10) as app:
            app.sendall(b"six")
            assert app.recv(100) == b"SIX"
        server.join(10)
    agent.expect(r"flow \S+ allocated service=up as gw1#\d+ for \[::1\]:\d+$",
                 stream="stderr")


def test_an_outage_is_a_line_and_a_count_not_a_line_per_connection(rig: Rig) -> None:
    """The gateway gone, every application connection is reset at once ("no link to a
    gateway"): the first has its WARNING line, the rest one line a second that counts
    them, so an outage at thousands of connections a second does not flood the log."""
    echo = rig.echo_server()
    gw, _, ag = rig.relay({"echo": echo.port}, agent_args=["--retry-interval", "5"])
    gw.proc.kill()
    ag.wait_log(r"link to the gateway .* lost")
    assert [_connect_round_trip(ag.ports["echo"], b"x") for _ in range(5)] == ["reset"] * 5
    ag.wait_log(r"agent agent: 4 more connection\(s\) refused in the last second: no link "
                r"to the gateway 127\.0\.0\.1:\d+$", timeout=5)
    named = [ln for ln in ag.proc.lines("stderr") if " refused: " in ln.text]
    assert len(named) == 1 and "has no link to a gateway" in named[0].text, named
    assert ag.status()["refused"] == 5


def test_a_connector_over_max_connections_refuses_the_flow_with_the_reason(
        rig: Rig) -> None:
    """`tether connector --max-connections 2`: with two connections to the server open,
    a third flow is reset at once (REFUSED) and the application's socket with it; the
    agent's line says why; the connector logs and counts it."""
    echo = rig.echo_server()
    _, co, ag = rig.relay({"echo": echo.port}, connector_args=["--max-connections", "2"])
    port = ag.ports["echo"]
    held = [socket.create_connection((HOST, port), timeout=10) for _ in range(2)]
    try:
        assert [_round_trip(app, b"held") for app in held] == [b"held"] * 2
        assert _connect_round_trip(port, b"third") == "reset"
        ag.wait_log(r"flow \S+ reset: connector connector has 2 connection\(s\) open, its "
                    r"limit$")
        co.wait_log(r"connector connector: flow \S+ to echo refused: 2 connection\(s\) "
                    r"open, at the limit \(--max-connections 2\)$")
        status = co.status()
        assert (status["max_connections"], status["over_limit"], status["refused"]) == \
            (2, 1, 1), status
        held.pop().close()
        wait_until(lambda: co.status()["open"] != 1, 10, "the closed connection still open")
        assert _connect_round_trip(port, b"again") == b"again"
    finally:
        for app in held:
            app.close()
    rig.wait_idle(co, ag)
