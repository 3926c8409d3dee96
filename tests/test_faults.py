"""Liveness under real faults, on real hosts: issue 7's scenarios 1, 2, 3 and 5, with
`tether` daemons, the oecho example and plain TCP programs as processes inside network
namespaces (tests/hosts/rig.py), and faults injected by the kernel: nft DROP (a silent
host: no RST, no FIN), nft random loss, tc tbf, and delay and jitter by the delaying
relay (tests/hosts/delayer.py; the kernel has no netem).

Scenarios 4 (mesh under partition) and 6 (reconnect) need `tether.Mesh`; they are not
here: when this was written src/tether/mesh.py existed only as uncommitted work in
progress of another engineer (`git log -- src/tether/mesh.py` was empty).

Timing. Every time is `time.monotonic()`, one clock for all namespaces: a fault returns
the time just after it took effect; a process's line carries the time it arrived here
(`Line.t`) and the rig's tools print their own (`t=`). SLACK covers process wake-up,
pipes and a loaded 2-CPU machine; TICK is the link's timing-wheel resolution.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hosts.rig import Daemon, HostProc, Rig, require_netns

pytestmark = pytest.mark.netns

SLACK = 0.25
TICK = 0.01
MakeRig = Callable[[Sequence[str]], Rig]


@pytest.fixture
def make_rig() -> Iterator[MakeRig]:
    """Rigs, each torn down after the test (skips, one reason, without CAP_NET_ADMIN)."""
    require_netns()
    rigs: list[Rig] = []

    def make(hosts: Sequence[str]) -> Rig:
        rig = Rig(hosts)
        rigs.append(rig)
        return rig.__enter__()

    yield make
    for rig in rigs:
        rig.close()


def _t(text: str) -> float:
    """The `t=` a tool printed on a line."""
    match = re.search(r"\bt=(\d+\.\d+)", text)
    assert match is not None, text
    return float(match.group(1))


def _wait_no_flows(daemons: Sequence[Daemon], timeout: float = 20.0) -> dict[str, Any]:
    """Poll every daemon's `tether status` until none holds a flow; fail if one still
    does after `timeout`. Returns the last counts."""
    deadline = time.monotonic() + timeout
    counts: dict[str, dict[str, int]] = {}
    for daemon in daemons:
        while True:
            counts[daemon.name] = daemon.open_flows()
            if not any(counts[daemon.name].values()):
                break
            assert time.monotonic() < deadline, \
                f"{daemon.name} still holds flows after {timeout:g}s: {counts}"
            time.sleep(0.2)
    return counts


# 1. the unresponsive peer -------------------------------------------------------------------

SECOND_READ = re.compile(r"^second read: (?P<type>\w+) reason='(?P<reason>[^']*)' "
                         r"code=(?P<code>\d+) after=(?P<after>\d+\.\d+)s$")


@pytest.mark.parametrize("liveness", [0.2, 1.0, 5.0])
@pytest.mark.parametrize("silent", ["server", "gw"])
def test_unresponsive_peer_on_a_silent_host(make_rig: MakeRig, silent: str,
                                            liveness: float) -> None:
    """oecho client, gateway and server on three hosts. Right after the server's reply
    one host goes silent (nft DROP both ways, interface up: no RST, no FIN): the server's
    host, or the gateway's (then the client hears nothing at all). The client's pending
    read raises PeerDown "unresponsive peer" after its liveness timeout T, measured
    from the DROP, within [T - T/4 - TICK - SLACK, T + TICK + SLACK].

    Why T - T/4 and not T: the client times the silence from the last frame it received
    on the flow. While the server ran, it sent a frame at least every T/4 (the echo,
    then a KEEPALIVE whenever it had sent nothing for a quarter of the timeout, to a
    tick), relayed by the gateway; so the last one left no earlier than T/4 + TICK
    before the DROP, and none left after it. The DOWN comes T after that frame."""
    rig = make_rig(["client", "gw", "server"])
    gw = rig["gw"].gateway()
    rig["server"].oecho_server(gw, hold=True, liveness=liveness)
    client = rig["client"].oecho_client(gw, liveness=liveness)
    client.expect(r"^reply: Client says hi!$")
    dropped_at = rig[silent].silence()
    _, line = client.expect(r"^second read: ", timeout=liveness + 15)
    elapsed = line.t - dropped_at
    match = SECOND_READ.match(line.text)
    assert match is not None, f"the second read did not fail: {line.text}"
    assert (match["type"], match["reason"], int(match["code"])) == \
        ("PeerDown", "unresponsive peer", 5), line.text
    low = liveness - liveness / 4 - TICK - SLACK
    high = liveness + TICK + SLACK
    assert low <= elapsed <= high, \
        f"PeerDown {elapsed:.3f}s after the DROP on {silent}, expected [{low:.3f}, {high:.3f}]"
    assert client.wait() == 0, rig.describe()
    print(f"\nunresponsive peer: {silent} silent, T={liveness:g}s: PeerDown after "
          f"{elapsed:.3f}s")


# 2. no false positives ------------------------------------------------------------------------

@dataclass
class LossyRun:
    """What happened in `_lossy_run`."""

    downs: list[str]
    idle_replies: list[str]
    ping: dict[str, Any]
    bulk: dict[str, Any]
    gaps: dict[str, float] = field(default_factory=dict)  # delayer -> longest gap (s)

    def describe(self) -> str:
        return (f"{len(self.downs)} DOWN log lines {self.downs[:4]}; idle flows after the "
                f"wait: {self.idle_replies}; chatty flow: {self.ping}; bulk: "
                f"{ {k: v for k, v in self.bulk.items() if 'sha' not in k} }; longest gap "
                f"between frames TCP delivered over each lossy link: {self.gaps}")


def _lossy_run(rig: Rig, *, loss: int, idle: float, liveness: float) -> LossyRun:
    """Agent, gateway, connector and echo server on four hosts; 200 ms ± 50 ms each way
    on each of the three links; `loss`% of the packets dropped at random on the input of
    every host. Then, for `idle` seconds: five flows idle (one line each way, then
    nothing), one chatty (a request every 0.5 s), one bulk (256 KiB echoed), all with a
    `liveness` timeout; then a last line on each idle flow.

    Each tether link (agent-gateway, connector-gateway) runs through two delayers, one
    at each end, each delaying only what arrives over the lossy link: so each sees,
    and reports, the gaps in what TCP delivered in its direction."""
    gw = rig["gw"].gateway()
    echo = rig["server"].echo_server()
    delay = {"delay": 0.2, "jitter": 0.05}
    relays = {}
    for seed, edge in enumerate(("agent", "connector")):
        far = rig["gw"].delayer(gw.address, only="up", public=True, seed=2 * seed,
                                name=f"{edge}-link", **delay)
        near = rig[edge].delayer(far.address, only="down", seed=2 * seed + 1,
                                 name="gw-link", **delay)
        relays[f"{edge}->gw"] = (far, "up")
        relays[f"gw->{edge}"] = (near, "down")
    to_server = rig["connector"].delayer(echo.address, seed=9, name="server-link", **delay)
    co = rig["connector"].connector(relays["gw->connector"][0].address,
                                    {"echo": to_server.address}, liveness=liveness,
                                    registered_at=gw)
    ag = rig["agent"].agent(relays["gw->agent"][0].address, ["echo"], liveness=liveness)
    for host in rig:
        host.loss(loss)
    address = f"127.0.0.1:{ag.ports['echo']}"
    apps: list[HostProc] = []
    for i in range(5):
        app = rig["agent"].tool(f"idle{i}", "app", "--connect", address, stdin=True)
        app.expect(r"^connected ")
        app.send("send hi")
        apps.append(app)
    ping = rig["agent"].tool("chatty", "ping", "--connect", address, "--interval", "0.5",
                             "--seconds", str(idle), "--timeout", "30")
    bulk = rig["agent"].tool("bulk", "bulk", "--connect", address, "--bytes", str(256 << 10),
                             "--timeout", "120")  # (at 20% loss it took 2 to 50 s)
    first = [app.expect(r"^(recv b'hi\\n'|reset|eof|closed)", timeout=30)[1].text
             for app in apps]
    steady_from = time.monotonic()
    match, _ = ping.expect(r'^\{"sent"', timeout=idle + 60)
    ping_summary = json.loads(match.string)
    match, _ = bulk.expect(r'^\{"sent"', timeout=150)
    bulk_summary = json.loads(match.string)
    replies = []
    for app, line in zip(apps, first, strict=True):
        if line.startswith("recv "):
            app.send("send bye")
            line = app.expect(r"^(recv b'bye\\n'|reset|eof|closed)", timeout=30)[1].text
        replies.append(line.split(" t=")[0])
    steady_to = time.monotonic()
    downs = [m.group(0) for p in (ag.proc, co.proc)
             for m in p.find(r"flow \S+ down: .*", stream="stderr")]
    gaps = {label: max((s[direction]["gap"] for s in relay.proc.json_lines()
                        if steady_from + 1.0 <= s["t"] <= steady_to), default=0.0)
            for label, (relay, direction) in relays.items()}
    return LossyRun(downs, replies, ping_summary, bulk_summary, gaps)


def _check_lossy_run(run: LossyRun) -> None:
    """Everything but the DOWNs: nothing hung, nothing was corrupted."""
    assert run.bulk["error"] is None and run.bulk["received"] == run.bulk["sent"] \
        and run.bulk["received_sha256"] == run.bulk["sent_sha256"], run.describe()
    assert run.ping["error"] is None and run.ping["received"] == run.ping["sent"], \
        run.describe()
    assert run.idle_replies == ["recv b'bye\\n'"] * 5, run.describe()


IDLE = 20.0  # the issue says 60 s; 20 s keeps this file within its time budget


def test_no_false_down_with_delay_and_jitter(make_rig: MakeRig) -> None:
    """200 ms ± 50 ms on every link (no loss): flows with a 2 s liveness, idle, chatty
    or bulk, never go DOWN, and the bulk transfer is byte-exact."""
    rig = make_rig(["agent", "gw", "connector", "server"])
    run = _lossy_run(rig, loss=0, idle=IDLE, liveness=2.0)
    print(f"\ndelay 200±50 ms, no loss, T=2s, {IDLE:g}s: {run.describe()}")
    assert not run.downs, run.describe()
    _check_lossy_run(run)


def test_delay_jitter_and_20pct_loss_never_hang_nor_corrupt(make_rig: MakeRig) -> None:
    """The issue's case: 200 ms ± 50 ms and 20% loss on every link, 2 s liveness.

    What holds, and is asserted: nothing hangs and nothing is lost silently -- every
    idle flow answers its last line or is reset, the chatty flow completes or is reset,
    the bulk transfer is byte-exact or reset, never corrupted -- and every DOWN is
    "unresponsive peer".

    What the issue asked and does NOT hold, measured instead of asserted (a real
    finding, see docs/faults.md): "flows never go DOWN". At 20% loss a TCP hop stalls
    for 1-2.5 s (retransmission timeouts backing off from 200 ms, the frames behind
    waiting in order), an end hears nothing for longer than T - T/4 (its margin
    between the peer's keepalives and its own deadline), and declares the peer down.
    Most 20-second runs see such false DOWNs; the counts are printed."""
    rig = make_rig(["agent", "gw", "connector", "server"])
    run = _lossy_run(rig, loss=20, idle=IDLE, liveness=2.0)
    flows_down = len({d.split()[1] for d in run.downs if "@agent" in d})
    print(f"\ndelay 200±50 ms, 20% loss, T=2s, {IDLE:g}s: {flows_down} of 7 flows DOWN "
          f"while both ends were alive; {run.describe()}")
    assert run.bulk["error"] is None or "ConnectionResetError" in run.bulk["error"], \
        run.describe()
    if run.bulk["error"] is None:
        assert run.bulk["received"] == run.bulk["sent"] \
            and run.bulk["received_sha256"] == run.bulk["sent_sha256"], run.describe()
    assert run.ping["error"] is None or "ConnectionResetError" in run.ping["error"], \
        run.describe()
    if run.ping["error"] is None:
        assert run.ping["received"] == run.ping["sent"], run.describe()
    assert all(r in ("recv b'bye\\n'", "reset err=ConnectionResetError")
               for r in run.idle_replies), run.describe()
    assert all(d.endswith("unresponsive peer") or d.endswith("(unresponsive peer)")
               for d in run.downs), run.describe()


# 3. the close cascade across hosts -------------------------------------------------------------

CASCADE_LIVENESS = 1.0


@pytest.mark.parametrize("end", ["server closes", "app closes", "connector host cut",
                                 "gateway host cut"])
def test_cascade_across_hosts(make_rig: MakeRig, end: str) -> None:
    """Agent, gateway, connector and an echo server on four hosts; the application runs
    in the agent's host. However the connection ends, both applications learn it --
    EOF within a fraction of a second for a close, a reset within the liveness
    timeout for a cut host -- and every daemon's flow count returns to zero."""
    rig = make_rig(["agent", "gw", "connector", "server"])
    gw = rig["gw"].gateway()
    echo = rig["server"].echo_server()
    co = rig["connector"].connector(gw, {"echo": echo.address}, liveness=CASCADE_LIVENESS)
    ag = rig["agent"].agent(gw, ["echo"], liveness=CASCADE_LIVENESS)
    app = rig["agent"].tool("app", "app", "--connect", f"127.0.0.1:{ag.ports['echo']}",
                            stdin=True)
    app.expect(r"^connected ")
    app.send("send hello")
    app.expect(r"^recv b'hello\\n'")
    match, _ = echo.proc.expect(r"^conn (\d+) ")
    conn = match.group(1)
    T = CASCADE_LIVENESS
    if end == "server closes":
        closed_at = echo.proc.send(f"close {conn}")
        _, line = app.expect(r"^(eof|reset|closed) ")
        assert line.text.startswith("eof "), app.output()
        assert _t(line.text) - closed_at < 0.5, line.text
        app.send("close")
    elif end == "app closes":
        closed_at = app.send("close")
        _, line = echo.proc.expect(rf"^(eof|reset|closed) {conn} ")
        assert line.text.startswith("eof "), echo.proc.output()
        assert _t(line.text) - closed_at < 0.5, line.text
    else:
        host = "connector" if end == "connector host cut" else "gw"
        cut_at = rig[host].silence()
        _, line = app.expect(r"^(eof|reset|closed) ", timeout=T + 10)
        assert line.text.startswith("reset "), app.output()
        elapsed = _t(line.text) - cut_at
        assert T - T / 4 - TICK - SLACK <= elapsed <= T + TICK + SLACK, \
            f"application reset {elapsed:.3f}s after the {host} host was cut (T={T:g}s)"
        if host == "gw":  # the connector hears nothing either: the server is reset too
            _, line = echo.proc.expect(rf"^(eof|reset|closed) {conn} ", timeout=T + 10)
            assert line.text.startswith("reset "), echo.proc.output()
            elapsed = _t(line.text) - cut_at
            assert elapsed <= T + TICK + SLACK, \
                f"server reset {elapsed:.3f}s after the gateway host was cut (T={T:g}s)"
        rig[host].unsilence()
    _wait_no_flows([ag, gw, co])


# 5. backpressure across a slow link ---------------------------------------------------------------

RATE = 125_000  # bytes per second: tbf rate 1mbit
RSS_GROWTH = 50 << 20


def _slow_link_rig(rig: Rig) -> tuple[Daemon, Daemon, Daemon, Any, Any]:
    """Agent, gateway, connector, server (a sink and an echo); the connector's link (the
    one between gateway and connector) capped at 1 Mbit/s both ways. The agent's host
    keeps its TCP buffers small (tcp_rmem/tcp_wmem max 256 KiB), so that what the
    sender pushes shows up within seconds instead of after megabytes of kernel
    buffering (which is not tether's memory, and would take a minute to drain)."""
    gw = rig["gw"].gateway()
    sink = rig["server"].echo_server(sink=True)
    echo = rig["server"].echo_server()
    co = rig["connector"].connector(gw, {"bulk": sink.address, "echo": echo.address})
    ag = rig["agent"].agent(gw, ["bulk", "echo"])
    rig["agent"].sysctl("net.ipv4.tcp_rmem", "4096 65536 262144")
    rig["agent"].sysctl("net.ipv4.tcp_wmem", "4096 65536 262144")
    rig["connector"].bandwidth("1mbit", burst="32kbit", latency="400ms")
    return ag, gw, co, sink, echo


def test_backpressure_across_a_slow_link(make_rig: MakeRig) -> None:
    """A bulk sender pushes as fast as it can for 5 s through a 1 Mbit/s link between
    gateway and connector. Every hop's memory stays bounded (VmRSS growth < 50 MB),
    the sender is held to the link's pace, everything arrives byte-exact, and an
    interactive flow over the same links still gets every reply, within 5 s (what it
    waits for is the bulk flow's window ahead of it in the capped TCP link: 256 KiB
    at 125 kB/s is about 2.1 s)."""
    rig = make_rig(["agent", "gw", "connector", "server"])
    ag, gw, co, sink, _ = _slow_link_rig(rig)
    daemons = {"agent": ag, "gateway": gw, "connector": co}
    before = {name: d.proc.rss() for name, d in daemons.items()}
    peak = dict(before)
    echo_port, bulk_port = ag.ports["echo"], ag.ports["bulk"]
    ping = rig["agent"].tool("interactive", "ping", "--connect", f"127.0.0.1:{echo_port}",
                             "--interval", "0.5", "--seconds", "12", "--timeout", "10")
    ping.expect(r"^rtt 1 ")  # the interactive flow is up before the bulk starts
    # The bulk flow is allocated before it sends (see the test below for why).
    bulk = rig["agent"].tool("bulk", "bulk", "--connect", f"127.0.0.1:{bulk_port}",
                             "--seconds", "5", "--start-after", "0.5", "--timeout", "40")
    bulk.expect(r"^connected ")
    while bulk.running:
        for name, daemon in daemons.items():
            peak[name] = max(peak[name], daemon.proc.rss())
        time.sleep(0.1)
    match, _ = bulk.expect(r'^\{"sent"')
    summary = json.loads(match.string)
    match, _ = ping.expect(r'^\{"sent"', timeout=30)
    interactive = json.loads(match.string)
    growth = {name: peak[name] - before[name] for name in daemons}
    print(f"\nslow link: bulk {summary['sent']} bytes in {summary['seconds']}s; VmRSS growth "
          f"{ {k: f'{v / 1e6:.2f} MB' for k, v in growth.items()} }; interactive "
          f"{interactive}")
    assert all(g < RSS_GROWTH for g in growth.values()), growth
    assert summary["error"] is None, summary
    # Held to the pace of the link: what it got rid of in 5 s is what 1 Mbit/s carries
    # in that time plus the buffers on the way (kernel, one window per hop): < 2 MB.
    assert summary["sent"] <= 5 * RATE + (2 << 20), summary
    _, line = sink.proc.expect(r"^eof \d+ ", timeout=30)
    assert f"bytes={summary['sent']} sha256={summary['sent_sha256']} " in line.text, line.text
    assert interactive["error"] is None and interactive["received"] == interactive["sent"], \
        interactive
    assert interactive["max_rtt"] < 5.0, interactive


class HeadOfLineDown(AssertionError):
    """A live flow went DOWN because its keepalives waited behind another flow's data
    in the shared link."""


def test_idle_flow_beside_a_bulk_flow_on_a_slow_link(make_rig: MakeRig) -> None:
    """An idle flow with a 2 s liveness shares the 1 Mbit/s link with a bulk flow. Its
    peer is alive all along: it must not go DOWN.

    Its keepalives overtake the bulk flow's data queued in the gateway's link (urgent
    control frames, `Link.take_output`), so they wait only behind what was already
    handed to the network: the kernel's unsent bytes (TCP_NOTSENT_LOWAT, 16 KiB), one
    write (at most 32 KiB once the link is known to be slow) and the bottleneck's
    queue (tbf, 400 ms here): about 0.8 s on this link, within the 1.5 s a 2 s
    liveness tolerates (T minus the keepalive interval T/4). Before, they waited
    behind the whole window in flight (2.1 s at 256 KiB, more once windows grow), and
    this flow went DOWN after 2.0 s. A 1 s liveness is below this link's bound."""
    rig = make_rig(["agent", "gw", "connector", "server"])
    gw = rig["gw"].gateway()
    sink = rig["server"].echo_server(sink=True)
    echo = rig["server"].echo_server()
    rig["connector"].connector(gw, {"bulk": sink.address, "echo": echo.address},
                               liveness=2.0)
    ag = rig["agent"].agent(gw, ["bulk", "echo"], liveness=2.0)
    rig["agent"].sysctl("net.ipv4.tcp_rmem", "4096 65536 262144")
    rig["agent"].sysctl("net.ipv4.tcp_wmem", "4096 65536 262144")
    rig["connector"].bandwidth("1mbit", burst="32kbit", latency="400ms")
    idle = rig["agent"].tool("idle", "app", "--connect", f"127.0.0.1:{ag.ports['echo']}",
                             stdin=True)
    idle.expect(r"^connected ")
    idle.send("send hi")
    idle.expect(r"^recv b'hi\\n'")
    bulk = rig["agent"].tool("bulk", "bulk", "--connect", f"127.0.0.1:{ag.ports['bulk']}",
                             "--seconds", "3", "--start-after", "0.5", "--timeout", "1")
    _, started = bulk.expect(r"^connected ")
    time.sleep(4.0)
    idle.send("send bye")
    _, line = idle.expect(r"^(recv b'bye\\n'|reset|eof|closed)", timeout=15)
    if line.text.startswith("reset "):
        raise HeadOfLineDown(f"the idle flow was reset {_t(line.text) - started.t - 0.5:.2f}s "
                             f"after the bulk flow started sending")
    assert line.text.startswith("recv b'bye"), idle.output()


def test_backpressure_from_the_first_byte(make_rig: MakeRig) -> None:
    """The same slow link, but the bulk sender starts writing the moment it connects,
    while the agent is still allocating its flow (a round trip through the gateway and
    the connector, here made 2 x 200 ms by a delayer). The agent must hold at most one
    read of it meanwhile: the sender is held back from its first byte.

    (Found by this test: uvloop ignores a pause_reading() made in connection_made, and
    the bridge held everything the application sent before its flow existed -- 8-10 MB
    in 2 s here, the agent's VmRSS +20 MB. Fixed in bridge.py by c2e46a4.)"""
    rig = make_rig(["agent", "gw", "connector", "server"])
    gw = rig["gw"].gateway()
    sink = rig["server"].echo_server(sink=True)
    rig["connector"].connector(gw, {"bulk": sink.address})
    slow = rig["agent"].delayer(gw.address, delay=0.2)
    ag = rig["agent"].agent(slow.address, ["bulk"])
    rig["agent"].sysctl("net.ipv4.tcp_rmem", "4096 65536 262144")
    rig["agent"].sysctl("net.ipv4.tcp_wmem", "4096 65536 262144")
    rig["connector"].bandwidth("1mbit", burst="32kbit", latency="400ms")
    before = ag.proc.rss()
    bulk = rig["agent"].tool("bulk", "bulk", "--connect", f"127.0.0.1:{ag.ports['bulk']}",
                             "--seconds", "2", "--timeout", "1")
    peak = before
    while bulk.running:
        peak = max(peak, ag.proc.rss())
        time.sleep(0.05)
    match, _ = bulk.expect(r'^\{"sent"')
    summary = json.loads(match.string)
    growth = peak - before
    print(f"\nfirst byte: sent {summary['sent']} bytes in 2 s; agent VmRSS growth "
          f"{growth / 1e6:.2f} MB")
    # 2 s of a 1 Mbit/s link plus the buffers on the way (kernel, one window per hop)
    # is well under 4 MB; the agent itself should grow by a read or two, not megabytes.
    assert summary["sent"] <= 4 << 20 and growth <= 8 << 20, \
        (f"the sender got rid of {summary['sent'] / 1e6:.1f} MB in 2 s over a 1 Mbit/s "
         f"path; the agent's VmRSS grew by {growth / 1e6:.1f} MB")


# 4. the mesh under partition -----------------------------------------------------------------

MESHNODE = Path(__file__).resolve().with_name("meshnode.py")
MESH_COUNT = 1200
ESTABLISH = 3.0


def _numbers(text: str) -> list[int]:
    """"1-3,7" -> [1, 2, 3, 7]."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out


@pytest.mark.parametrize("cut", [1.0, 6.0], ids=["shorter", "longer"])
def test_mesh_under_partition(make_rig: MakeRig, cut: float) -> None:
    """Five mesh nodes (tests/meshnode.py) on five hosts, each sending numbered messages
    to the next one in a ring (120 a second for 10 s); meanwhile one host goes silent
    for `cut` seconds, shorter or longer than `establish_timeout` (3 s), and comes back.
    For every pair, what the receiver got is compared with what the sender was told:
    every number arrives once and in order, or is returned in a Failure (a number in
    both only among a Failure's first `unconfirmed`); a cut shorter than the
    establish timeout loses nothing and fails nothing."""
    names = [f"n{i}" for i in range(5)]
    rig = make_rig(names)
    nodes: dict[str, HostProc] = {}
    for i, name in enumerate(names):
        host = rig[name]
        peers = [f"--peer={p}={rig[p].ip}:7001" for p in names if p != name]
        nodes[name] = host.run(name, [
            sys.executable, str(MESHNODE), "--name", name, "--listen", f"{host.ip}:7001",
            *peers, "--liveness", "1", "--establish-timeout", str(ESTABLISH),
            "--retry-interval", "0.2", "--send", names[(i + 1) % 5],
            "--count", str(MESH_COUNT), "--rate", "120"])
    for proc in nodes.values():
        proc.expect(r"^ready ")
    time.sleep(3.0)
    rig["n2"].silence()
    time.sleep(cut)
    rig["n2"].unsilence()
    for proc in nodes.values():
        proc.expect(r"^settled ", timeout=60)
    failed_pairs = []
    for i, sender in enumerate(names):
        receiver = names[(i + 1) % 5]
        got = [int(m.group(1)) for m in nodes[receiver].find(rf"^recv {sender} 7 (\d+)$")]
        failures = nodes[sender].find(rf"^failure {receiver} unconfirmed=(\d+) n=\d+ "
                                      r"numbers=(\S*) reason=(.*)$")
        failed: list[int] = []
        maybe: set[int] = set()
        for f in failures:
            numbers = _numbers(f.group(2))
            failed += numbers
            maybe |= set(numbers[:int(f.group(1))])
        assert got == sorted(set(got)), f"{sender}->{receiver}: not once and in order"
        assert set(got) | set(failed) == set(range(MESH_COUNT)), \
            f"{sender}->{receiver}: lost silently: " \
            f"{sorted(set(range(MESH_COUNT)) - set(got) - set(failed))[:20]}"
        assert set(got) & set(failed) <= maybe, \
            f"{sender}->{receiver}: delivered and reported failed: " \
            f"{sorted(set(got) & set(failed) - maybe)[:20]}"
        if failed:
            failed_pairs.append(f"{sender}->{receiver}: {len(failed)} failed "
                                f"({failures[0].group(3)})")
    print(f"\nmesh, n2 cut for {cut:g}s (establish timeout {ESTABLISH:g}s): "
          f"{failed_pairs or 'nothing failed'}")
    if cut < ESTABLISH:
        assert not failed_pairs, failed_pairs
    else:
        assert all(p.split("->")[0] == "n2" or p.split("->")[1].startswith("n2")
                   for p in failed_pairs), failed_pairs
