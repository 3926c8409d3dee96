"""The daemons' operational surface, from review: signals, option errors, the admin
endpoint and its metrics. Real processes and sockets (tests/relayrig.py)."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator

import pytest

from relayrig import HOST, Rig


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig() as r:
        yield r


@pytest.mark.parametrize("role", ["agent", "gateway", "connector"])
def test_a_second_signal_ends_the_drain_at_once(rig: Rig, role: str) -> None:
    """SIGTERM starts a drain of up to `--drain` seconds; a second signal (SIGTERM, or
    SIGINT: an operator's second Ctrl-C) ends it at once: the open connection is reset
    and the daemon exits 0. Before, the second signal was ignored and the daemon waited
    for the whole drain (here 60 s)."""
    echo = rig.echo_server()
    drain = ["--drain", "60"]
    gw, co, ag = rig.relay({"echo": echo.port}, gateway_args=drain, connector_args=drain,
                           agent_args=drain)
    daemon = {"agent": ag, "gateway": gw, "connector": co}[role]
    with socket.create_connection((HOST, ag.ports["echo"]), timeout=10) as app:
        app.sendall(b"ping")
        assert app.recv(10) == b"ping"
        daemon.proc.popen.send_signal(signal.SIGTERM)
        if role != "gateway":  # (the gateway's drain says nothing)
            daemon.wait_log("draining 1 connection")
        else:
            time.sleep(0.5)
        assert daemon.proc.running, "exited before the drain's deadline"
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
