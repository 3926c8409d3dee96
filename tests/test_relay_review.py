"""Relay edge cases found in review (issue 6): real daemons, real sockets, real clients."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from relayrig import HOST, Daemon, Rig, free_port, reset_close, wait_until

ENDED_BY = ("flows_closed", "flows_refused", "flows_down", "flows_reset")


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig() as r:
        yield r


def _gateway_sums(gw: Daemon) -> dict[str, Any]:
    """What does not add up in a gateway's status counters (empty when all does)."""
    st = gw.status()
    wrong: dict[str, Any] = {}
    if st["flows_opened"] != st["flows_ended"] + st["flows"]:
        wrong["opened != ended + open"] = (st["flows_opened"], st["flows_ended"], st["flows"])
    if st["flows_ended"] != sum(st[k] for k in ENDED_BY):
        wrong["ended != sum by reason"] = (st["flows_ended"], {k: st[k] for k in ENDED_BY})
    return wrong


def _app_end(app: socket.socket) -> str:
    try:
        data = app.recv(100)
    except ConnectionResetError:
        return "reset"
    return "eof" if data == b"" else f"data {data!r}"


def test_gateway_counters_add_up_also_for_flows_ended_before_they_were_spliced(
        rig: Rig) -> None:
    """`tether status` of a gateway: every flow it opened is ended (counted once, by
    how) or open, also a flow whose serving side went DOWN before accepting it (the
    connector stopped, then killed, while the flow was being opened). That flow was
    never spliced, so before `flows_opened` the gateway showed more flows ended than
    it ever had (`flows_ended` 1, `flows_spliced` 0), and no counter of what it
    opened."""
    echo = rig.echo_server()
    gw, co, ag = rig.relay({"echo": echo.port})
    with socket.create_connection((HOST, ag.ports["echo"]), timeout=5) as app:  # spliced
        app.sendall(b"a")
        assert app.recv(10) == b"a"
        app.shutdown(socket.SHUT_WR)
        assert app.recv(10) == b""
    rig.wait_idle(gw, co, ag)
    assert not _gateway_sums(gw), _gateway_sums(gw)

    co.proc.stop()  # the OPEN reaches the connector, which answers nothing
    with socket.create_connection((HOST, ag.ports["echo"]), timeout=5) as app:
        app.sendall(b"x")
        wait_until(lambda: gw.status()["flows"] != 1, 5, "the flow open at the gateway",
                   rig.describe)
        assert not _gateway_sums(gw), _gateway_sums(gw)
        co.proc.kill()  # its link is lost: the flow goes DOWN, the application is reset
        assert _app_end(app) == "reset"
    rig.wait_idle(gw, ag)
    st = gw.status()
    assert (st["flows_opened"], st["flows_spliced"], st["flows_ended"], st["flows_down"]) \
        == (2, 1, 2, 1), st
    assert not _gateway_sums(gw), _gateway_sums(gw)
    metrics = gw.metrics()
    assert 'tether_flows_opened_total{node="gw1",role="gateway"} 2.0' in metrics, metrics


def test_gateway_counters_add_up_with_refusals_and_resets(rig: Rig) -> None:
    """A server refusing the connection (the application had sent data and its FIN
    already), applications resetting, a clean echo: the counters add up after each."""
    closed_port = free_port()
    echo = rig.echo_server()
    gw, co, ag = rig.relay({"gone": closed_port, "echo": echo.port})
    for _ in range(3):
        with socket.create_connection((HOST, ag.ports["gone"]), timeout=5) as app:
            app.sendall(b"x" * 10000)
            app.shutdown(socket.SHUT_WR)
            assert _app_end(app) == "reset"
    with socket.create_connection((HOST, ag.ports["echo"]), timeout=5) as app:
        app.sendall(b"a")
        assert app.recv(10) == b"a"
    rig.wait_idle(gw, co, ag)
    st = gw.status()
    assert st["flows_opened"] == 4 and st["flows_reset"] == 3, st
    assert not _gateway_sums(gw), _gateway_sums(gw)


def _unanswering_server() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: a connection to it is not
    answered (its SYN is dropped) until the connect gives up. With the sockets that
    fill the queue, to close afterwards."""
    srv = socket.socket()
    srv.bind((HOST, 0))
    srv.listen(0)
    fill = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(srv.getsockname())
        fill.append(c)
    return srv, fill


def test_connector_abandons_a_connect_whose_flow_ended(rig: Rig) -> None:
    """The application resets while the connector is still connecting to a server
    that does not answer: the connector gives that connection up at once (its socket
    closed, nothing counted as refused, no "cannot connect" warning), instead of
    holding it for the whole `--connect-timeout`, then reporting the flow, which the
    application had ended, as refused by an unreachable server."""
    connect_timeout = 2.0
    srv, fill = _unanswering_server()
    try:
        gw, co, ag = rig.relay({"slow": srv.getsockname()[1]},
                               connector_args=["--connect-timeout", str(connect_timeout)])
        baseline = co.fds()
        app = socket.create_connection((HOST, ag.ports["slow"]), timeout=5)
        try:
            app.sendall(b"hello")
            wait_until(lambda: co.fds() <= baseline, 5, "the connector connecting",
                       rig.describe)
        finally:
            reset_close(app)
        t0 = time.monotonic()
        rig.wait_idle(gw, co, ag, timeout=connect_timeout / 2)
        rig.wait_fds({co: baseline}, timeout=connect_timeout / 2)
        assert time.monotonic() - t0 < connect_timeout / 2 + 0.2
        time.sleep(connect_timeout + 0.5 - (time.monotonic() - t0))  # past the timeout
        st = co.status()
        assert st["refused"] == 0 and st["open"] == 0, st
        assert not co.log_has("cannot connect"), co.log()
        assert co.log_has("ended while connecting"), co.log()
    finally:
        for c in fill:
            c.close()
        srv.close()


def test_a_window_above_four_mib_is_accepted_and_carries_data(rig: Rig) -> None:
    """`--window` is "more is faster in bulk": an 8 MiB window (a long fat path) on the
    gateway, the agent and the connector. Each of them refused to start with it
    ("max_window 4194304 out of [initial_window 8388608, ...]", an option the command
    line does not have); the window's auto-tuning ceiling now rises to the window."""
    window = str(8 << 20)
    echo = rig.echo_server()
    gw, co, ag = rig.relay({"echo": echo.port}, gateway_args=["--window", window],
                           connector_args=["--window", window],
                           agent_args=["--window", window])
    payload = bytes(range(256)) * 8192  # 2 MiB
    with socket.create_connection((HOST, ag.ports["echo"]), timeout=10) as app:
        app.sendall(payload)
        app.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := app.recv(1 << 20):
            got += chunk
    assert bytes(got) == payload
    rig.wait_idle(gw, co, ag)


def _slow_replies(srv: socket.socket, chunks: int, stop: threading.Event) -> None:
    """Each connection: read the request, reply `chunks` chunks of 1000 bytes 0.1 s
    apart, close."""
    srv.settimeout(0.1)
    while not stop.is_set():
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(5)
            conn.recv(100)
            for _ in range(chunks):
                conn.sendall(b"x" * 1000)
                time.sleep(0.1)


def _read_all(app: socket.socket) -> int:
    got = 0
    while chunk := app.recv(65536):
        got += len(chunk)
    return got


@pytest.mark.parametrize("edge", ["agent", "connector"])
def test_sigterm_lets_open_connections_finish_and_takes_no_new_one(rig: Rig,
                                                                   edge: str) -> None:
    """SIGTERM to an edge with `--drain 5`: the connection open through it gets its
    whole reply and its EOF, not a reset (both edges reset every connection at once),
    a new connection is not served, and the edge exits as soon as the open one ended,
    not at the drain's deadline."""
    srv = socket.create_server((HOST, 0))
    stop = threading.Event()
    server = threading.Thread(target=_slow_replies, args=(srv, 10, stop))
    server.start()
    try:
        drain = ["--drain", "5"]
        _gw, co, ag = rig.relay({"slow": srv.getsockname()[1]}, connector_args=drain,
                               agent_args=drain)
        app = socket.create_connection((HOST, ag.ports["slow"]), timeout=5)
        with app:
            app.sendall(b"request")
            got = len(app.recv(65536))
            assert got
            daemon = ag if edge == "agent" else co
            daemon.proc.popen.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            daemon.wait_log("draining 1 connection")
            assert _newcomer(ag) in ("reset", "eof", "refused")
            got += _read_all(app)
        assert got == 10 * 1000
        assert daemon.proc.wait(5) == 0
        assert time.monotonic() - t0 < 3, "the edge waited for the drain's deadline"
        assert not daemon.log_has("still open after")
    finally:
        stop.set()
        server.join(5)
        srv.close()


def _newcomer(ag: Daemon) -> str:
    """How a new application connection (sending a request) during the drain ends:
    "refused" (the agent no longer listens), "reset" or "eof". An agent that resets at
    once may do it before the client's `connect()` has returned (as in `_echo_once`):
    that is a "reset" too."""
    try:
        app = socket.create_connection((HOST, ag.ports["slow"]), timeout=5)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    with app:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            app.sendall(b"request")
        return _app_end(app)


def _echo_once(port: int) -> str:
    """One application connection through the agent: "ok" if it echoes, else how it
    ended ("reset", "eof", ...). An agent that resets at once may do it before the
    client's `connect()` has returned: that is a "reset" too."""
    try:
        app = socket.create_connection((HOST, port), timeout=5)
    except ConnectionResetError:
        return "reset"
    with app:
        try:
            app.sendall(b"ping")
            got = app.recv(10)
        except ConnectionResetError:
            return "reset"
        return "ok" if got == b"ping" else _app_end(app) if got == b"" else repr(got)


def test_edges_connect_again_to_a_restarted_gateway(rig: Rig) -> None:
    """The gateway is killed and started again on its port: the agent and the
    connector dial it again (backoff up to `--retry-interval`), the connector's
    services are registered again, and connections go through as before. Before, both
    edges stayed without a link for good: every application connection was reset
    ("no link to a gateway") until they were restarted by hand. While the gateway is
    away, an application's connection is reset at once, not held."""
    echo = rig.echo_server()
    args = ["--retry-interval", "0.2"]
    gw, co, ag = rig.relay({"echo": echo.port}, connector_args=args, agent_args=args)
    port = ag.ports["echo"]
    assert _echo_once(port) == "ok"
    gw.proc.kill()
    ag.wait_log(r"link to the gateway .* lost")
    co.wait_log(r"link to the gateway .* lost")
    assert not ag.status()["linked"] and not co.status()["linked"]
    t0 = time.monotonic()
    assert _echo_once(port) == "reset"
    assert time.monotonic() - t0 < 1
    time.sleep(0.5)  # a few attempts fail (connection refused)
    gw2 = rig.gateway(name="gw1", port=gw.port)
    ag.wait_log(r"link to the gateway .* is back", timeout=5)
    co.wait_log(r"link to the gateway .* is back", timeout=5)
    gw2.wait_log(r"\bconnector registered service echo$", timeout=5)
    assert _echo_once(port) == "ok"
    assert ag.status()["reconnects"] == 1 and co.status()["reconnects"] == 1
    assert ag.status()["linked"] and co.status()["linked"]
    rig.wait_idle(gw2, co, ag)
