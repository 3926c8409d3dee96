"""The oecho scenario end to end, as real processes: `tether gateway`, an oecho server and
an oecho client (examples/oecho.py), over real sockets, with real signals.

The client allocates a flow, writes, prints the reply, then reads again. What that
second read does depends on what happened to the server:

* it deallocated: the read returns b"" at once;
* it was SIGKILLed: the kernel closes its socket, the gateway sees its link end and
  relays the DOWN: FlowDown "link lost" within milliseconds;
* it was SIGSTOPped (frozen, socket open): nothing closes anything; the client's
  liveness monitor takes the flow DOWN, PeerDown "unresponsive peer", after the
  liveness timeout.

Timings are measured here, from the moment the signal was sent to the moment the
client's line arrived, as well as read from what the client printed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import ProcGroup, tether_argv

# Scheduling, process wake-up and pipe latency on a loaded 2-CPU machine.
SLACK = 0.15
# The link's timing-wheel resolution (LinkConfig.tick): a timer fires up to one late.
TICK = 0.01
SECOND_READ = re.compile(r"^second read: (?P<what>.+) after=(?P<after>\d+\.\d+)s$")
SECOND_READ_ERROR = re.compile(
    r"^(?P<type>\w+) reason='(?P<reason>[^']*)' code=(?P<code>\d+)$")


@pytest.fixture
def procs() -> Iterator[ProcGroup]:
    with ProcGroup() as group:
        yield group


def _second_read(line: str) -> tuple[str, float]:
    match = SECOND_READ.match(line)
    assert match is not None, line
    return match["what"], float(match["after"])


def _error(what: str) -> tuple[str, str, int]:
    match = SECOND_READ_ERROR.match(what)
    assert match is not None, f"the second read did not fail: {what}"
    return match["type"], match["reason"], int(match["code"])


def test_server_dealloc_gives_eof_at_once(procs: ProcGroup) -> None:
    """The server echoes and deallocates: the client's second read returns b"" at once."""
    gw = procs.gateway()
    procs.oecho_server(gw)
    client = procs.oecho_client(gw)
    client.expect(r"^reply: Client says hi!$")
    _, line = client.expect(r"^second read: ")
    what, after = _second_read(line.text)
    assert what == "b''", procs.describe()
    assert after < 0.1, line.text
    assert client.wait() == 0, procs.describe()
    # The gateway saw the flow spliced and ended.
    gw.proc.expect(r"flow \S+ spliced service=oecho oecho-client#\d+ -> oecho-server#\d+",
                   stream="stderr")
    gw.proc.expect(r"flow \S+ ended: CLOSED, first ", stream="stderr")


def test_server_killed_gives_link_lost_at_once(procs: ProcGroup) -> None:
    """The server (holding the flow open) is SIGKILLed after its reply: the kernel closes
    its socket, the gateway relays the DOWN, and the client's pending read raises
    FlowDown "link lost" within milliseconds, not after any timeout."""
    gw = procs.gateway()
    server = procs.oecho_server(gw, hold=True)
    # A long liveness, so that only the link's end can explain a prompt DOWN.
    client = procs.oecho_client(gw, liveness=30.0)
    client.expect(r"^reply: Client says hi!$")
    killed_at = server.kill()
    _, line = client.expect(r"^second read: ")
    elapsed = line.t - killed_at
    what, after = _second_read(line.text)
    kind, reason, code = _error(what)
    assert (kind, reason, code) == ("FlowDown", "link lost", 4), line.text
    assert elapsed < 0.5, f"{elapsed:.3f}s from SIGKILL to {line.text!r}"
    assert after < 0.5, line.text
    assert client.wait() == 0, procs.describe()
    assert server.wait() == -9
    gw.proc.expect(r"node oecho-server disconnected", stream="stderr")


@pytest.mark.parametrize("liveness", [1.0, 0.3])
def test_server_frozen_gives_unresponsive_peer_after_liveness(procs: ProcGroup,
                                                              liveness: float) -> None:
    """The server (holding the flow open) is SIGSTOPped after its reply: its socket stays
    open, nothing is closed, the gateway (which keeps no liveness of its own on relayed
    flows) stays quiet. The client's read raises PeerDown "unresponsive peer" once
    nothing came from the server for the whole liveness timeout T."""
    gw = procs.gateway()
    server = procs.oecho_server(gw, hold=True, liveness=liveness)
    client = procs.oecho_client(gw, liveness=liveness)
    # The client starts its second read right after printing the reply: freeze the
    # server as soon as that line is here.
    client.expect(r"^reply: Client says hi!$")
    stopped_at = server.stop()
    _, line = client.expect(r"^second read: ", timeout=liveness + 10.0)
    elapsed = line.t - stopped_at
    what, after = _second_read(line.text)
    kind, reason, code = _error(what)
    assert (kind, reason, code) == ("PeerDown", "unresponsive peer", 5), line.text
    # The client times the silence from the last frame it *received* from the server,
    # never from anything earlier. While it ran, the server sent a frame on the flow at
    # least every T/4 (the echo, then a KEEPALIVE whenever it had sent nothing for a
    # quarter of the timeout), so that last frame left the server no earlier than T/4
    # (and a wheel tick) before the SIGSTOP, and no later than the SIGSTOP itself (plus
    # the hop through the gateway). Hence, measured from the SIGSTOP, the DOWN comes
    # between T - T/4 and T (each with a tick of timer resolution), plus scheduling and
    # pipe latency above: the lower bound is T minus up to a quarter, not T.
    low = liveness - liveness / 4 - TICK - SLACK
    high = liveness + TICK + SLACK
    assert low <= elapsed <= high, \
        f"PeerDown {elapsed:.3f}s after SIGSTOP, expected in [{low:.3f}, {high:.3f}]"
    # What the client printed counts from just after the reply, before the SIGSTOP.
    assert low <= after <= high + SLACK, line.text
    assert client.wait() == 0, procs.describe()
    assert server.stopped and server.popen.poll() is None  # ended (SIGCONT, SIGKILL) below


# the CLI's help ---------------------------------------------------------------------------

def _help(*args: str) -> str:
    result = subprocess.run(tether_argv(*args), capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result
    assert result.stdout.startswith("usage: tether"), result.stdout
    return result.stdout


def test_help() -> None:
    text = _help("--help")
    for word in ("gateway", "--log-level", "SUBCOMMAND"):
        assert word in text, text


def test_gateway_help() -> None:
    text = _help("gateway", "--help")
    for option in ("--listen", "--name", "--token", "--tls-cert", "--tls-key",
                   "--tls-client-ca", "--heartbeat", "--link-timeout", "--drain"):
        assert option in text, f"{option} missing from:\n{text}"
    assert "port 0 picks one" in " ".join(text.split()), text  # help wraps with the terminal


def test_console_script_help() -> None:
    """The installed `tether` command is the same program."""
    script = Path(sys.executable).with_name("tether")
    if not script.exists():
        pytest.skip(f"no console script at {script} (package not installed)")
    result = subprocess.run([str(script), "gateway", "--help"], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result
    assert "--listen" in result.stdout
