"""Liveness under real faults, on real hosts: issue 7's scenarios 1 to 5, with `tether`
daemons, the oecho example, mesh nodes and plain TCP programs as processes inside
network namespaces (tests/hosts/rig.py), and faults injected by the kernel: nft DROP (a
silent host: no RST, no FIN), nft random loss, tc tbf, and delay and jitter by the
packet delay line (tests/hosts/delayline.py; the kernel has no netem) or, for one test,
the delaying relay (tests/hosts/delayer.py). Scenario 6 is in test_faults_flap.py.

Independent scenarios that only wait (for timers, processes, the network) run at the
same time, each on a rig of its own (`_concurrently`): the time budget of these tests
is most of `make test`'s.

Timing. Every time is `time.monotonic()`, one clock for all namespaces: a fault returns
the time just after it took effect; a process's line carries the time it arrived here
(`Line.t`) and the rig's tools print their own (`t=`). SLACK covers process wake-up,
pipes and a loaded 2-CPU machine; TICK is the link's timing-wheel resolution.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hosts.rig import Daemon, HostProc, Rig, Server, require_netns
from tether.link import LinkConfig

pytestmark = pytest.mark.netns

SLACK = 0.25
TICK = LinkConfig(name="-").tick
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


LIVENESS = (0.2, 1.0, 5.0)


def test_unresponsive_peer_on_a_silent_host(make_rig: MakeRig) -> None:
    """oecho clients, a gateway and an oecho server on three hosts: three flows, with
    liveness timeouts T of 0.2 s, 1 s and 5 s, each of a client of its own. Right after
    the server's replies one host goes silent (nft DROP both ways, interface up: no RST,
    no FIN): the server's host, or the gateway's (then the clients hear nothing at all);
    two rigs at once, one for each. Each client's pending read raises PeerDown
    "unresponsive peer" after its own T, measured from the DROP, within
    [T - T/4 - TICK - SLACK, T + TICK + SLACK].

    Why T - T/4 and not T: a client times the silence from the last frame it received
    on its flow. While the server ran, it sent a frame at least every T/4 (the echo,
    then a KEEPALIVE whenever it had sent nothing for a quarter of the timeout, to a
    tick), relayed by the gateway; so the last one left no earlier than T/4 + TICK
    before the DROP, and none left after it. The DOWN comes T after that frame.

    (One server serves the three flows: an accepted flow takes the liveness its client
    asked for in its OPEN. The three timeouts share one rig and one DROP; they used to
    be three tests, each building the same three hosts.)"""
    _concurrently(lambda: _silent_host(make_rig, "server"), lambda: _silent_host(make_rig, "gw"))


def _silent_host(make_rig: MakeRig, silent: str) -> None:
    rig = make_rig(["client", "gw", "server"])
    gw = rig["gw"].gateway()
    rig["server"].oecho_server(gw, hold=True)
    clients = {T: rig["client"].oecho_client(gw, name=f"oecho-client-{T:g}", liveness=T)
               for T in LIVENESS}
    for client in clients.values():
        client.expect(r"^reply: Client says hi!$")
    dropped_at = rig[silent].silence()
    results = []
    for T, client in clients.items():
        _, line = client.expect(r"^second read: ", timeout=T + 15)
        elapsed = line.t - dropped_at
        match = SECOND_READ.match(line.text)
        assert match is not None, f"T={T:g}s: the second read did not fail: {line.text}"
        assert (match["type"], match["reason"], int(match["code"])) == \
            ("PeerDown", "unresponsive peer", 5), line.text
        low, high = T - T / 4 - TICK - SLACK, T + TICK + SLACK
        assert low <= elapsed <= high, \
            (f"T={T:g}s: PeerDown {elapsed:.3f}s after the DROP on {silent}, expected "
             f"[{low:.3f}, {high:.3f}]")
        assert client.wait() == 0, rig.describe()
        results.append(f"T={T:g}s: {elapsed:.3f}s")
    print(f"\nunresponsive peer, {silent} silent: PeerDown after {', '.join(results)}")


# 2. no false positives ------------------------------------------------------------------------

@dataclass
class FlowGroup:
    """The interactive flows of one agent in `_lossy_run`, all with one liveness."""

    liveness: float
    downs: list[str]  # the agent's log lines of flows that went DOWN or failed to allocate
    down_at: list[float]  # when (s after the loss began)
    idle_replies: list[str]
    ping: dict[str, Any]

    @property
    def flows_down(self) -> int:
        return len(self.downs)

    def describe(self) -> str:
        return (f"T={self.liveness:g}s: {self.flows_down} of {len(self.idle_replies) + 1} "
                f"flows DOWN at {[round(t, 1) for t in self.down_at]} s {self.downs[:2]}; "
                f"idle flows after the wait: {self.idle_replies}; chatty flow: {self.ping}")


@dataclass
class LossyRun:
    """What happened in `_lossy_run`."""

    groups: dict[str, FlowGroup]
    bulk: dict[str, Any]
    bulk_downs: list[str]
    gaps: dict[str, float] = field(default_factory=dict)  # "a->b" -> longest gap (s)
    kernel: dict[str, list[str]] = field(default_factory=dict)  # tuned TCP: how each ended
    ends: list[str] = field(default_factory=list)  # links that ended, resets: the daemons'

    def describe(self) -> str:
        return "; ".join(
            [g.describe() for g in self.groups.values()]
            + [f"bulk: { {k: v for k, v in self.bulk.items() if 'sha' not in k} } "
               f"{self.bulk_downs[:1]}",
               f"longest gap in what TCP delivered, per link direction: {self.gaps}"]
            + [f"plain TCP, {label}: {outcomes}" for label, outcomes in self.kernel.items()]
            + [f"links ended and flows reset, as logged: {self.ends}"])


LOSSY_HOSTS = ["agent", "gw", "connector", "server"]
# A flow that went DOWN (the node's line, whatever the reason), or whose allocation did.
DOWN_LINE = re.compile(r"flow \S+ down: (?!resetting ).*$|refused: allocation of .*$")
# A link that ended (at a node or the gateway), a flow reset: what explains a failure.
END_LINE = re.compile(r"link to \S+ ended: .*$|link from .* closed: .*$|"
                      r"node \S+ disconnected: .*$|flow \S+ reset(?: here)?: .*$")


def _link_gaps(rig: Rig, gw: Daemon, since: float, until: float) -> dict[str, float]:
    """The longest gap in what each direction of each tether link delivered between
    `since` and `until`, from the delay lines' reports: "agent-0->gw" is what the
    gateway's TCP delivered from node agent-0 (the nodes' addresses are in the
    gateway's log)."""
    nodes = {m.group(2): m.group(1) for m in gw.proc.find(
        r"node (\S+) connected from (\S+)$", stream="stderr")}
    gaps: dict[str, float] = {}
    for host in rig:
        assert host.line is not None
        for report in host.line.json_lines():
            if not since <= report["t"] <= until:
                continue
            for conn, acks in report["acks"].items():
                here, there = conn.split("<")
                label = (f"{nodes[there]}->gw" if there in nodes
                         else f"gw->{nodes[here]}" if here in nodes else None)
                if label is not None:
                    gaps[label] = max(gaps.get(label, 0.0), acks["gap"])
    return gaps


def _lossy_run(rig: Rig, *, loss: int, idle: float, groups: dict[str, float],
               bulk_liveness: float, kernel: dict[str, float] | None = None,
               bulk_bytes: int = 128 << 10) -> LossyRun:
    """Agents, a gateway, connectors and an echo server on four hosts (LOSSY_HOSTS); 200
    ms ± 50 ms each way on each link between hosts; `loss`% of the packets dropped at
    random on the input of every host. The flows' echo server runs on the connector's
    host: the scenario is about tether's links (agent-gateway, gateway-connector), and
    a plain TCP hop to a lossy server failed the test on its own now and then (a connect
    that took over the connector's 5 s, an echo whose retransmissions the server's
    backed-off timer put 60 s away: ~3 % of runs, tether behaving as it should). For
    each of `groups` (label -> liveness T), an agent with six flows: five idle (one line
    each way, then nothing for `idle` seconds, then one more line), one chatty (a
    request every 0.5 s for `idle` seconds). A bulk transfer (`bulk_bytes` echoed,
    liveness `bulk_liveness`) through an agent and a connector of its own, so that the
    idle flows' keepalives never wait behind its data (that head-of-line blocking is
    scenario 5's). With `kernel` (label -> T), five plain TCP connections per label, from
    the agent's host to the echo server on the server's host (one lossy link),
    keepalive and TCP_USER_TIMEOUT tuned to T as in bench/faults.py, blocked in a read:
    which ones the kernel aborts.

    The delay is a packet delay line (tests/hosts/delayline.py) on the links of the
    gateway's and the server's hosts: every link crosses exactly one, and tether's own
    TCP connections are the ones that see the delay (in their RTT, so in their
    retransmission timeout) and lose the packets. The lines of the agent's and the
    connector's hosts delay nothing; every line reports the gaps in what its host's TCP
    delivered (`LossyRun.gaps`)."""
    for seed, host in enumerate(rig):
        delay = 0.2 if host.name in ("gw", "server") else 0.0
        host.delay(delay, delay / 4, seed=seed)
    gw = rig["gw"].gateway()
    echo = rig["server"].echo_server()  # for the plain TCP connections
    local = rig["connector"].echo_server()  # for the flows: over the host's loopback
    co = rig["connector"].connector(gw, {"echo": local.address})
    cob = rig["connector"].connector(gw, {"bulk": local.address}, name="connector-bulk")
    agents = {label: rig["agent"].agent(gw, ["echo"], name=f"agent-{i}", liveness=T)
              for i, (label, T) in enumerate(groups.items())}
    agb = rig["agent"].agent(gw, ["bulk"], name="agent-bulk", liveness=bulk_liveness)
    conns = {label: [rig["agent"].tool(
        f"tcp-{label}-{i}", "tcpwait", "--connect", echo.address, "--bound", "600",
        "--keepalive", f"{max(1, int(T / 2))},{max(1, int(T / 4))},2",
        "--user-timeout", str(round(T * 1000))) for i in range(5)]
        for label, T in (kernel or {}).items()}
    for group in conns.values():
        for conn in group:
            conn.expect(r"^reply: ")
    began = max(host.loss(loss) for host in rig)
    apps = {label: [rig["agent"].tool(f"idle-{label}-{i}", "app", "--connect",
                                      f"127.0.0.1:{ag.ports['echo']}", stdin=True)
                    for i in range(5)] for label, ag in agents.items()}
    for app in (a for group in apps.values() for a in group):
        app.expect(r"^connected ")
        app.send("send hi")
    pings = {label: rig["agent"].tool(f"chatty-{label}", "ping", "--connect",
                                      f"127.0.0.1:{ag.ports['echo']}", "--interval", "0.5",
                                      "--seconds", str(idle), "--timeout", "60")
             for label, ag in agents.items()}
    bulk = rig["agent"].tool("bulk", "bulk", "--connect", f"127.0.0.1:{agb.ports['bulk']}",
                             "--bytes", str(bulk_bytes), "--timeout", "120")
    answer = r"^(recv b'{}\\n'|reset|eof|closed)"
    first = {label: [app.expect(answer.format("hi"), timeout=60)[1].text for app in group]
             for label, group in apps.items()}
    summaries = {label: json.loads(ping.expect(r'^\{"sent"', timeout=idle + 90)[0].string)
                 for label, ping in pings.items()}
    for label, group in apps.items():
        for app, line in zip(group, first[label], strict=True):
            if line.startswith("recv "):
                app.send("send bye")
    replies = {label: [app.expect(answer.format("bye"), timeout=60)[1].text.split(" t=")[0]
                       if line.startswith("recv ") else line.split(" t=")[0]
                       for app, line in zip(group, first[label], strict=True)]
               for label, group in apps.items()}
    bulk_summary = json.loads(bulk.expect(r'^\{"sent"', timeout=150)[0].string)
    until = time.monotonic()
    kernel_outcomes = {
        label: [ln.text.split(" t=")[0] for c in group for ln in c.lines("stdout")
                if ln.text.startswith("second read: ") and ln.t <= until
                and not ln.text.startswith("second read: bound")]
        for label, group in conns.items()}
    result = {}
    for label, ag in agents.items():
        lines = [ln for ln in ag.proc.lines("stderr") if DOWN_LINE.search(ln.text)]
        result[label] = FlowGroup(groups[label], [ln.text.split(": ", 1)[-1] for ln in lines],
                                  [ln.t - began for ln in lines], replies[label],
                                  summaries[label])
    bulk_downs = [ln.text for ln in agb.proc.lines("stderr") if DOWN_LINE.search(ln.text)]
    bulk_downs += [ln.text for ln in cob.proc.lines("stderr") if DOWN_LINE.search(ln.text)]
    ends = [f"{d.name}: {m.group(0)}" for d in (gw, co, cob, agb, *agents.values())
            for ln in d.proc.lines("stderr") if (m := END_LINE.search(ln.text))]
    return LossyRun(result, bulk_summary, bulk_downs, _link_gaps(rig, gw, began, until),
                    kernel_outcomes, ends)


def _check_group(run: LossyRun, label: str) -> None:
    """No flow of the group went DOWN, and nothing was lost: every idle flow answered
    its last line, the chatty flow every request."""
    group = run.groups[label]
    assert not group.downs, f"false DOWN: {run.describe()}"
    assert group.ping["error"] is None and group.ping["received"] == group.ping["sent"], \
        run.describe()
    assert group.idle_replies == ["recv b'bye\\n'"] * 5, run.describe()


def _check_bulk(run: LossyRun) -> None:
    assert not run.bulk_downs, run.describe()
    assert run.bulk["error"] is None and run.bulk["received"] == run.bulk["sent"] \
        and run.bulk["received_sha256"] == run.bulk["sent_sha256"], run.describe()


IDLE = 20.0  # the issue says 60 s; 20 s keeps this file within its time budget
LOSSY_T = 12.0
"""The liveness that holds at 200 ms ± 50 ms and 20% loss, with margin. Derived from
the longest stall measured on such a link (7.5 s, TCP_RTO_MAX_MS 1 s, docs/faults.md)
plus 1.5 s of margin, over the 3/4 of T that an end can wait between the peer's
keepalives: 3T/4 >= 7.5 + 1.5."""
R = TypeVar("R")


def _concurrently(*jobs: Callable[[], R]) -> list[R]:
    """Run independent scenarios, each on a rig of its own, at the same time (threads:
    they spend their time waiting for processes, timers and the network) and return
    their results; the first failure is raised."""
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [future.result() for future in futures]


def test_no_false_down_with_delay_jitter_and_loss(make_rig: MakeRig) -> None:
    """Issue 7's scenario 2, on two rigs at once: 200 ms ± 50 ms each way on every link,
    without loss and with 20% of the packets lost on every host's input.

    Asserted, without loss: flows with a 2 s liveness, idle or chatty, never go DOWN,
    and the bulk transfer is byte-exact.

    Asserted, with 20% loss: flows with a LOSSY_T (12 s) liveness never go DOWN, idle or
    chatty; the bulk transfer is byte-exact. What the issue asked -- a 2 s liveness --
    does NOT hold there, and cannot over TCP: a lost segment holds back every frame
    behind it until it is retransmitted, so a live link falls silent for a second at
    each loss and for several seconds at a few losses in a row (7.5 s at worst,
    measured, with the retransmission timeout capped at 1 s; up to 73 s with the
    kernel's default backoff), longer than the 3T/4 that an end waits between its
    peer's keepalives. Flows with T = 2 s and plain TCP connections with keepalive and
    TCP_USER_TIMEOUT tuned to 2 s and to 12 s (the kernel's own answer) run beside
    them on the same hosts; how many of those end is printed, not asserted, except
    that nothing hangs nor is corrupted: every DOWN is "unresponsive peer" (or, for an
    open whose answer was lost for 2 s, "open not answered within 2s"), every
    idle flow answers or is reset. See docs/faults.md for the rule for choosing T."""
    clean, lossy = _concurrently(
        lambda: _lossy_run(make_rig(LOSSY_HOSTS), loss=0, idle=IDLE, groups={"2s": 2.0},
                           bulk_liveness=LOSSY_T),  # (2 s: see the test below)
        lambda: _lossy_run(make_rig(LOSSY_HOSTS), loss=20, idle=IDLE,
                           groups={"safe": LOSSY_T, "2s": 2.0}, bulk_liveness=LOSSY_T,
                           kernel={"2s": 2.0, "safe": LOSSY_T}))
    print(f"\ndelay 200±50 ms, no loss, {IDLE:g}s: {clean.describe()}")
    print(f"delay 200±50 ms, 20% loss, {IDLE:g}s: {lossy.describe()}")
    fast = lossy.groups["2s"]
    print(f"20% loss: T={LOSSY_T:g}s: {lossy.groups['safe'].flows_down} of 6 flows DOWN; "
          f"T=2s: {fast.flows_down} of 6; plain TCP tuned to 2 s: "
          f"{len(lossy.kernel['2s'])} of 5 aborted, tuned to {LOSSY_T:g} s: "
          f"{len(lossy.kernel['safe'])} of 5")
    _check_group(clean, "2s")
    _check_bulk(clean)
    _check_group(lossy, "safe")
    _check_bulk(lossy)
    assert all(d.endswith(("unresponsive peer", "open not answered within 2s"))
               for d in fast.downs), lossy.describe()
    assert all(r in ("recv b'bye\\n'", "reset err=ConnectionResetError")
               for r in fast.idle_replies), lossy.describe()
    assert fast.ping["error"] is None or "ConnectionResetError" in fast.ping["error"], \
        lossy.describe()


class BigFrameDown(AssertionError):
    """A live flow went DOWN while one of its own DATA frames was on the way."""


def test_bulk_flow_with_a_2s_liveness_over_200ms_links(make_rig: MakeRig) -> None:
    """200 ms ± 50 ms each way on every link, no loss: a flow with a 2 s liveness echoes
    128 KiB. Both ends are alive all along: it must not go DOWN.

    A DATA frame takes ~1.2 s per hop here (slow start on a fresh 400 ms connection).
    It used to count as a sign of life only once whole, and the gateway relayed whole
    frames, so the far end heard nothing for ~2.4 s and declared the peer down. Links
    decode DATA cut-through now: each piece that arrives is passed on at once and
    counts as life (`FrameDecoder(split_data=True)`)."""
    rig = make_rig(LOSSY_HOSTS)
    for host in ("gw", "server"):
        rig[host].delay(0.2, 0.05)
    gw = rig["gw"].gateway()
    echo = rig["server"].echo_server()
    rig["connector"].connector(gw, {"bulk": echo.address})
    ag = rig["agent"].agent(gw, ["bulk"], liveness=2.0)
    bulk = rig["agent"].tool("bulk", "bulk", "--connect", f"127.0.0.1:{ag.ports['bulk']}",
                             "--bytes", str(128 << 10), "--timeout", "30")
    summary = json.loads(bulk.expect(r'^\{"sent"', timeout=60)[0].string)
    downs = ag.proc.find(r"flow \S+ down: unresponsive peer$", stream="stderr")
    if downs:
        raise BigFrameDown(f"the bulk flow went DOWN: {summary}")
    assert summary["error"] is None and summary["received"] == summary["sent"], summary


# 3. the close cascade across hosts -------------------------------------------------------------

CASCADE_LIVENESS = 1.0


def _cascade_rig(make_rig: MakeRig) -> tuple[Rig, list[Daemon], Server, int]:
    """Agent, gateway, connector and an echo server on four hosts; the agent forwards
    "echo" on the port returned."""
    rig = make_rig(["agent", "gw", "connector", "server"])
    gw = rig["gw"].gateway()
    echo = rig["server"].echo_server()
    co = rig["connector"].connector(gw, {"echo": echo.address}, liveness=CASCADE_LIVENESS)
    ag = rig["agent"].agent(gw, ["echo"], liveness=CASCADE_LIVENESS)
    return rig, [ag, gw, co], echo, ag.ports["echo"]


def _cascade_app(rig: Rig, echo: Server, port: int, name: str, host: str = "agent"
                 ) -> tuple[HostProc, str]:
    """An application connected through the agent (in `host`), one line echoed; its
    connection's number at the echo server."""
    app = rig[host].tool(name, "app", "--connect", f"127.0.0.1:{port}", stdin=True)
    app.expect(r"^connected ")
    app.send("send hello")
    app.expect(r"^recv b'hello\\n'")
    match, _ = echo.proc.expect(r"^conn (\d+) ")
    return app, match.group(1)


def _cascade_closes(make_rig: MakeRig) -> None:
    """The server closes one connection: the application reads EOF; the application
    closes another: the server reads EOF -- each within half a second."""
    rig, daemons, echo, port = _cascade_rig(make_rig)
    app, conn = _cascade_app(rig, echo, port, "app1")
    closed_at = echo.proc.send(f"close {conn}")
    _, line = app.expect(r"^(eof|reset|closed) ")
    assert line.text.startswith("eof "), app.output()
    assert _t(line.text) - closed_at < 0.5, line.text
    app.send("close")
    app, conn = _cascade_app(rig, echo, port, "app2")
    closed_at = app.send("close")
    _, line = echo.proc.expect(rf"^(eof|reset|closed) {conn} ")
    assert line.text.startswith("eof "), echo.proc.output()
    assert _t(line.text) - closed_at < 0.5, line.text
    _wait_no_flows(daemons)


def _cascade_cut(make_rig: MakeRig, host: str) -> None:
    """The connector's or the gateway's host is cut (DROP): the application's connection
    is reset within the liveness timeout (and, the gateway cut, the server's too)."""
    rig, daemons, echo, port = _cascade_rig(make_rig)
    app, conn = _cascade_app(rig, echo, port, "app")
    T = CASCADE_LIVENESS
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
    _wait_no_flows(daemons)


def test_cascade_across_hosts(make_rig: MakeRig) -> None:
    """Agent, gateway, connector and an echo server on four hosts; the application runs
    in the agent's host. However the connection ends -- the server closes, the
    application closes, the connector's host is cut, the gateway's host is cut -- both
    applications learn it (EOF within a fraction of a second for a close, a reset within
    the liveness timeout for a cut host) and every daemon's flow count returns to zero.
    Three rigs at once: the two closes share one (two connections), each cut has its
    own."""
    _concurrently(lambda: _cascade_closes(make_rig),
                  lambda: _cascade_cut(make_rig, "connector"),
                  lambda: _cascade_cut(make_rig, "gw"))


# 4b. a server that vanished: TCP keepalive on the relay's edges ---------------------------------

EDGE_KEEPALIVE = 4.0  # `SocketOptions.for_edge`: 1 s idle, then 3 probes 1 s apart


def _edge_rig(make_rig: MakeRig, tcp_mem_max: int | None = None
              ) -> tuple[Rig, list[Daemon], Server, HostProc]:
    """Gateway, agent and connector (`--keepalive 4`) on one host, an echo server on
    another; an application on the relay's host with one line echoed. `tcp_mem_max`:
    both hosts' TCP buffers autotune up to that many bytes at most (tcp_rmem and
    tcp_wmem), set before anything starts."""
    rig = make_rig(["relay", "server"])
    if tcp_mem_max is not None:
        for host in ("relay", "server"):
            rig[host].sysctl("net.ipv4.tcp_rmem", f"4096 131072 {tcp_mem_max}")
            rig[host].sysctl("net.ipv4.tcp_wmem", f"4096 16384 {tcp_mem_max}")
    gw = rig["relay"].gateway()
    echo = rig["server"].echo_server()
    keepalive = ["--keepalive", f"{EDGE_KEEPALIVE:g}"]
    co = rig["relay"].connector(gw, {"echo": echo.address}, args=keepalive)
    ag = rig["relay"].agent(gw, ["echo"], args=keepalive)
    app, _ = _cascade_app(rig, echo, ag.ports["echo"], "app", host="relay")
    return rig, [ag, gw, co], echo, app


def _edge_silent_server(make_rig: MakeRig) -> None:
    """The server's host goes silent (DROP: no RST, no FIN) while the flow is idle: the
    connector's keepalive gets no answer, the flow is reset end to end about
    EDGE_KEEPALIVE after the last packet, logged and counted at the connector."""
    rig, daemons, _, app = _edge_rig(make_rig)
    ag, _, co = daemons
    cut_at = rig["server"].silence()
    _, line = app.expect(r"^(eof|reset|closed) ", timeout=EDGE_KEEPALIVE + 10)
    assert line.text.startswith("reset "), app.output()
    elapsed = _t(line.text) - cut_at
    assert EDGE_KEEPALIVE - 1 - SLACK <= elapsed <= EDGE_KEEPALIVE + 1 + SLACK, \
        f"application reset {elapsed:.3f}s after the server's host went silent " \
        f"(keepalive {EDGE_KEEPALIVE:g}s)"
    co.proc.expect(r"flow \S+: the server at \S+ stopped answering \(no answer to TCP "
                   r"keepalive or retransmissions\): flow reset$", stream="stderr")
    _, told = ag.proc.expect(r"flow \S+ reset: .*the server stopped answering",
                             stream="stderr")
    assert rig["server"].ip not in told.text, told.text  # the address stays at the connector
    assert co.status()["edge_timeouts"] == 1
    assert ag.status()["edge_timeouts"] == 0
    _wait_no_flows(daemons)


EDGE_TCP_MEM_MAX = 1 << 20
EDGE_BULK = 64 << 20
"""Far more than the kernels and the flow windows on the way can hold: with the edge
rig's TCP buffers autotuned up to EDGE_TCP_MEM_MAX (four TCP connections on the way,
each a sender's and a receiver's buffer: 8 MiB) and three flow windows (agent, gateway,
connector: each at most `DEFAULT_MAX_WINDOW`, 4 MiB), about 20 MiB. The kernels'
default maxima (6 MiB to receive, 4 to send) alone would hold 40 MiB: 16 MiB was
not enough for a faster relay."""


def _edge_stopped_server(make_rig: MakeRig) -> None:
    """The server's process is frozen (SIGSTOP) for three times EDGE_KEEPALIVE, with an
    idle flow and a bulk flow whose sender is held back once the server's receive
    window is closed: the server's kernel still answers keepalive and window probes,
    so both flows stay open (TCP_USER_TIMEOUT on the edge would reset the bulk flow:
    see `SocketOptions.for_edge`), and both complete once the server is thawed."""
    rig, daemons, echo, app = _edge_rig(make_rig, EDGE_TCP_MEM_MAX)
    ag, _, co = daemons
    echo.proc.stop()
    try:
        bulk = rig["relay"].tool("bulk", "bulk", "--connect",
                                 f"127.0.0.1:{ag.ports['echo']}", "--bytes", str(EDGE_BULK),
                                 "--sndbuf", "65536", "--timeout", "60")
        bulk.expect(r"^connected ")
        time.sleep(3 * EDGE_KEEPALIVE)
        sent = [int(m.group(1)) for ln in bulk.lines("stdout")
                if (m := re.match(r"progress sent=(\d+) ", ln.text))]
        assert len(sent) >= 2 and sent[-1] == sent[-2] < EDGE_BULK, \
            f"the sender was not held back: {bulk.output()}"
        print(f"held back after {sent[-1]} bytes of {EDGE_BULK}")
    finally:
        echo.proc.cont()
    summary = json.loads(bulk.expect(r'^\{"sent"', timeout=60)[0].string)
    assert summary["error"] is None and summary["received"] == summary["sent"] == EDGE_BULK \
        and summary["received_sha256"] == summary["sent_sha256"], summary
    ended = [ln.text for ln in app.lines() if re.match(r"(eof|reset|closed) ", ln.text)]
    assert not ended, app.output()
    app.send("send again")
    app.expect(r"^recv b'again\\n'")
    assert co.status()["edge_timeouts"] == 0 and ag.status()["edge_timeouts"] == 0
    app.send("close")
    _wait_no_flows(daemons)


def _edge_connect_timeout(make_rig: MakeRig) -> None:
    """The server's host is silent before the flow opens: the connector's connect gets
    no answer, and the flow is reset after `--connect-timeout` (1 s), "timed out"."""
    rig = make_rig(["relay", "server"])
    gw = rig["relay"].gateway()
    echo = rig["server"].echo_server()
    co = rig["relay"].connector(gw, {"echo": echo.address}, args=["--connect-timeout", "1"])
    ag = rig["relay"].agent(gw, ["echo"])
    rig["server"].silence()
    app = rig["relay"].tool("app", "app", "--connect", f"127.0.0.1:{ag.ports['echo']}",
                            stdin=True)
    _, connected = app.expect(r"^connected ")
    _, line = app.expect(r"^(eof|reset|closed) ", timeout=10)
    assert line.text.startswith("reset "), app.output()
    elapsed = _t(line.text) - _t(connected.text)
    assert 1 - SLACK <= elapsed <= 1 + 1 + SLACK, f"reset {elapsed:.3f}s after connecting"
    ag.proc.expect(r"flow \S+ reset: cannot connect to service echo: timed out$",
                   stream="stderr")
    assert co.status()["refused"] == 1
    _wait_no_flows([ag, gw, co])


def test_edge_keepalive_resets_a_flow_whose_server_vanished(make_rig: MakeRig) -> None:
    """TCP keepalive on the relay's edge sockets (`--keepalive`): a flow whose server's
    host vanished while the flow was idle does not stay open for ever; a server merely
    frozen keeps its flow; a server that never answers the connect is given up after
    `--connect-timeout`. Three rigs at once."""
    _concurrently(lambda: _edge_silent_server(make_rig),
                  lambda: _edge_stopped_server(make_rig),
                  lambda: _edge_connect_timeout(make_rig))


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
    """A 1 Mbit/s link between gateway and connector, two rigs at once: a bulk sender
    allocated before it sends (`_slow_link`), and one that sends from its first byte
    (`_first_byte`)."""
    _concurrently(lambda: _slow_link(make_rig), lambda: _first_byte(make_rig))


def _slow_link(make_rig: MakeRig) -> None:
    """A bulk sender pushes as fast as it can for 5 s through a 1 Mbit/s link between
    gateway and connector. Every hop's memory stays bounded (VmRSS growth < 50 MB),
    the sender is held to the link's pace, everything arrives byte-exact, and an
    interactive flow over the same links still gets every reply, within 5 s (what it
    waits for is the bulk flow's data ahead of it: the link's queue, held to its limit
    (64 KiB at this rate), the kernel's unsent bytes and the capped link's queue --
    typically 1-2 s at 125 kB/s)."""
    rig = make_rig(["agent", "gw", "connector", "server"])
    ag, gw, co, sink, _ = _slow_link_rig(rig)
    daemons = {"agent": ag, "gateway": gw, "connector": co}
    before = {name: d.proc.rss() for name, d in daemons.items()}
    peak = dict(before)
    echo_port, bulk_port = ag.ports["echo"], ag.ports["bulk"]
    ping = rig["agent"].tool("interactive", "ping", "--connect", f"127.0.0.1:{echo_port}",
                             "--interval", "0.5", "--seconds", "12", "--timeout", "10")
    ping.expect(r"^rtt 1 ")  # the interactive flow is up before the bulk starts
    # The bulk flow is allocated before it sends (see `_first_byte` for why).
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
    """An idle flow with a 3 s liveness shares the 1 Mbit/s link with a bulk flow. Its
    peer is alive all along: it must not go DOWN.

    Its keepalives overtake the bulk flow's data queued in the gateway's link (urgent
    control frames, `Link.take_output`), so they wait only behind what was already
    handed to the network: the kernel's unsent bytes (TCP_NOTSENT_LOWAT, from 16 KiB,
    sized to the link's speed), one write (likewise) and the bottleneck's queue (tbf,
    400 ms here): about 0.8 s on this link. Without the overtaking they wait behind
    the link's whole queue and in-flight data (here 2-5 s: this test failed 1 run in 2
    with it disabled). With a 3 s liveness it still failed about 1 run in 5: the link's
    TCP itself stalled after burst losses, with up to 310 KB in flight ahead of every
    keepalive (BBR's estimate from before the cap overfilling the tail-drop queue; `ss`
    evidence in docs/faults.md). A slow link now holds its data back beyond about
    twice its bandwidth-delay product in flight, 32 KiB at least (`tether.inflight`):
    0 failures in 88 runs since."""
    rig = make_rig(["agent", "gw", "connector", "server"])
    gw = rig["gw"].gateway()
    sink = rig["server"].echo_server(sink=True)
    echo = rig["server"].echo_server()
    rig["connector"].connector(gw, {"bulk": sink.address, "echo": echo.address},
                               liveness=3.0)
    ag = rig["agent"].agent(gw, ["bulk", "echo"], liveness=3.0)
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


def _first_byte(make_rig: MakeRig) -> None:
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


def test_mesh_under_partition(make_rig: MakeRig) -> None:
    """Five mesh nodes (tests/meshnode.py) on five hosts, each sending numbered messages
    to the next one in a ring (120 a second for 10 s); meanwhile one host goes silent
    for a while, shorter (1 s) or longer (6 s) than `establish_timeout` (3 s), and comes
    back (two rigs at once, one per cut). For every pair, what the receiver got is
    compared with what the sender was told: every number arrives once and in order, or
    is returned in a Failure (a number in both only among a Failure's first
    `unconfirmed`); a cut shorter than the establish timeout loses nothing and fails
    nothing, a longer one fails messages into and out of the cut host, and only
    those."""
    _concurrently(lambda: _mesh_partition(make_rig, 1.0), lambda: _mesh_partition(make_rig, 6.0))


def _mesh_partition(make_rig: MakeRig, cut: float) -> None:
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
        # n1's messages to n2 and n2's to n3 waited the whole cut less the liveness
        # (5 s) for a peer with no session: longer than the establish timeout
        assert {p.split(":")[0] for p in failed_pairs} >= {"n1->n2", "n2->n3"}, \
            f"a {cut:g}s cut, establish timeout {ESTABLISH:g}s: failed only {failed_pairs}"
