"""Relay edge cases found in review (issue 6): real daemons, real sockets, real clients."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from relayrig import HOST, Daemon, Rig, free_port, wait_until

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
    assert 'tether_flows_opened{node="gw1",role="gateway"} 2.0' in metrics, metrics


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
