"""The host rig itself (tests/hosts/rig.py): hosts as network namespaces on one bridge,
every fault injected and lifted, the delaying relay and the packet delay line, and a
teardown that leaves nothing behind -- namespaces, interfaces, processes -- even when
the test fails.

Each check drives real TCP through the hosts with the rig's tools (`echo`, `app`,
`ping`, `bulk`) and reads what they printed, with their own `t=` timestamps (one
monotonic clock for every namespace).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from hosts import rig as rigmod
from hosts.rig import PREFIX, SUBNET, HostProc, Rig, leftovers, require_netns

pytestmark = pytest.mark.netns

MakeRig = Callable[[int | Sequence[str]], Rig]


@pytest.fixture
def make_rig() -> Iterator[MakeRig]:
    """Rigs, each torn down after the test (skips, one reason, without CAP_NET_ADMIN)."""
    require_netns()
    rigs: list[Rig] = []

    def make(hosts: int | Sequence[str]) -> Rig:
        rig = Rig(hosts)
        rigs.append(rig)
        return rig.__enter__()

    yield make
    for rig in rigs:
        rig.close()


def _t(line: str) -> float:
    match = re.search(r"\bt=(\d+\.\d+)", line)
    assert match is not None, line
    return float(match.group(1))


def _app(rig: Rig, host: str, address: str, name: str = "app") -> HostProc:
    app = rig[host].tool(name, "app", "--connect", address, stdin=True)
    app.expect(r"^connected ")
    return app


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


# topology ---------------------------------------------------------------------------------

def test_hosts_are_namespaces_on_one_bridge(make_rig: MakeRig) -> None:
    rig = make_rig(["a", "b", "c"])
    namespaces = set(rigmod._netns_list())
    assert {h.ns for h in rig} | {rig.switch_ns} <= namespaces
    for host in rig:
        assert host.ns.startswith(PREFIX) and len(host.iface) <= 15
        addr = host.exec("ip", "-o", "addr", "show").stdout
        assert f"inet {host.ip}/24" in addr, addr
        assert re.search(r"\blo\b.*\binet 127\.0\.0\.1/8", addr), addr
        assert "state UP" in host.exec("ip", "link", "show", host.iface).stdout
    bridge = rig["a"].exec("true")  # (a command in a host works at all)
    assert bridge.returncode == 0
    ports = subprocess.run(["ip", "-n", rig.switch_ns, "-o", "link", "show", "master",
                            rig.bridge], capture_output=True, text=True, check=True).stdout
    assert all(h.switch_port in ports for h in rig), ports
    # The test range lives only inside the rig: not on any interface of the root namespace.
    root = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True,
                          check=True).stdout
    assert f" {SUBNET}." not in root
    # Every host reaches every other over TCP.
    echo = rig["c"].echo_server()
    for client in ("a", "b"):
        ping = rig[client].tool(f"ping-{client}", "ping", "--connect", echo.address,
                                "--interval", "0.01", "--seconds", "0.2")
        match, _ = ping.expect(r'^\{"sent"')
        assert '"error": null' in match.string, match.string


# teardown ---------------------------------------------------------------------------------

def test_teardown_leaves_nothing_even_when_the_test_fails() -> None:
    require_netns()
    pids: list[int] = []
    rig = Rig(["a", "b"])
    with pytest.raises(RuntimeError, match="the test failed"), rig:
        echo = rig["b"].echo_server()
        frozen = rig["a"].tool("frozen", "ping", "--connect", echo.address,
                               "--interval", "0.1", "--seconds", "60")
        frozen.expect(r"^rtt 1 ")
        frozen.stop()
        # Processes our process started, that the rig never heard of: one in its process
        # group (holding its pipes), ended with the group; one in a session of its own,
        # found by `ip netns pids` at teardown and ended by its PID.
        shell = rig["a"].run("shell", ["sh", "-c", "sleep 300 & echo child $!; "
                                       "setsid sleep 301 </dev/null >/dev/null 2>&1 & "
                                       "echo other $!; wait"])
        child, _ = shell.expect(r"^child (\d+)$")
        other, _ = shell.expect(r"^other (\d+)$")
        pids += [echo.proc.pid, frozen.pid, shell.pid, int(child.group(1)),
                 int(other.group(1))]
        assert all(_alive(pid) for pid in pids)
        raise RuntimeError("the test failed")
    assert rig.closed
    assert leftovers(rig.prefix) == []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout
    links = subprocess.run(["ip", "link"], capture_output=True, text=True, check=True).stdout
    assert rig.prefix not in namespaces and rig.prefix not in links
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # the orphaned `sleep` is reaped by init, not by us
    assert not [pid for pid in pids if _alive(pid)]


# faults -----------------------------------------------------------------------------------

UDP_LISTEN = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9999))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    print("got", s.recvfrom(100)[0].decode(), flush=True)
except TimeoutError:
    print("nothing", flush=True)
"""
UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(10):
    try:
        s.sendto(b"probe", (sys.argv[1], 9999))
    except OSError:
        pass
    time.sleep(0.05)
"""


def _udp_probe(rig: Rig, src: str, dst: str, name: str) -> HostProc:
    """Datagrams from `src` to a listener on `dst` for half a second; the listener prints
    "got" or, after 1 s, "nothing". (No answer needed: one direction at a time.)"""
    listener = rig[dst].run(f"{name}-listen", [sys.executable, "-c", UDP_LISTEN,
                                               rig[dst].ip, "1.0"])
    listener.expect(r"^ready")
    rig[src].run(f"{name}-send", [sys.executable, "-c", UDP_SEND, rig[dst].ip])
    return listener


def test_silence_drops_everything_both_ways_without_a_reset(make_rig: MakeRig) -> None:
    rig = make_rig(["a", "b"])
    echo = rig["b"].echo_server()
    app = _app(rig, "a", echo.address)
    app.send("send one")
    app.expect(r"^recv b'one\\n'")
    rig["b"].silence()
    assert "silence" in rig["b"].faults
    sent = app.send("send two")
    # each way on its own: a lost request and a lost reply look the same to the app
    probes = {"into b": _udp_probe(rig, "a", "b", "in"),
              "out of b": _udp_probe(rig, "b", "a", "out")}
    for way, probe in probes.items():
        _, line = probe.expect(r"^(got|nothing)", timeout=5)
        assert line.text == "nothing", f"silence let a datagram {way} through"
    time.sleep(max(0.0, sent + 1.0 - time.monotonic()))
    # Nothing came back, and nothing ended: no RST, no FIN, no ICMP error.
    assert not app.find(r"^(recv b'two|reset|eof|closed)"), app.output()
    # Inside the silent host, traffic over loopback still flows (to its own address too).
    local = rig["b"].tool("local", "ping", "--connect", echo.address, "--interval", "0.01",
                          "--seconds", "0.1")
    match, _ = local.expect(r'^\{"sent"')
    assert json.loads(match.string)["error"] is None, match.string
    rig["b"].unsilence()
    _, line = app.expect(r"^recv b'two\\n'", timeout=10)  # TCP retransmits once lifted
    assert line.t - sent > 1.0
    assert not rig["b"].faults


def test_loss_drops_the_given_share_and_lifts(make_rig: MakeRig) -> None:
    rig = make_rig(["a", "b"])
    echo = rig["b"].echo_server()
    rig["b"].loss(30)
    rules = rig["b"].exec("nft", "list", "table", "inet", "tt_loss").stdout
    assert "numgen random mod 100 < 30" in rules, rules
    pings = [rig["a"].tool(f"ping{i}", "ping", "--connect", echo.address, "--interval",
                           "0.005", "--seconds", "3", "--size", "200") for i in range(4)]
    for ping in pings:  # (TCP stalls under loss: four connections make enough packets)
        ping.expect(r'^\{"sent"', timeout=60)
    seen, dropped = rig["b"].loss_counts()
    assert seen >= 80, (seen, dropped)
    assert 0.12 <= dropped / seen <= 0.48, (seen, dropped)
    rig["b"].unloss()
    assert rig["b"].exec("nft", "list", "ruleset").stdout.strip() == ""
    # 100% on output only: b hears a, a never hears b.
    app = _app(rig, "a", echo.address)
    rig["b"].loss(100, direction="out")
    app.send("send lost")
    time.sleep(0.7)
    assert not app.find(r"^recv b'lost"), app.output()
    seen, dropped = rig["b"].loss_counts()
    assert seen == dropped > 0, (seen, dropped)
    rig["b"].unloss()
    app.expect(r"^recv b'lost\\n'", timeout=10)


def test_link_down_at_either_end_and_up_again(make_rig: MakeRig) -> None:
    rig = make_rig(["a", "b"])
    echo = rig["b"].echo_server()
    app = _app(rig, "a", echo.address)
    for end in ("switch", "host"):
        rig["b"].link_down(end=end)
        state = rig["b"].exec("ip", "link", "show", rig["b"].iface).stdout
        assert ("NO-CARRIER" in state) if end == "switch" else ("state DOWN" in state), state
        app.send(f"send {end}")
        time.sleep(0.7)
        assert not app.find(rf"^recv b'{end}"), app.output()
        rig["b"].link_up(end=end)
        app.expect(rf"^recv b'{end}\\n'", timeout=15)
    assert not app.find(r"^(reset|eof|closed)")


def test_bandwidth_cap_slows_both_directions_and_lifts(make_rig: MakeRig) -> None:
    rig = make_rig(["a", "b"])
    echo = rig["b"].echo_server()
    rig["b"].bandwidth("1mbit")
    for ns, dev in ((rig["b"].ns, rig["b"].iface), (rig.switch_ns, rig["b"].switch_port)):
        qdisc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev],
                               capture_output=True, text=True, check=True).stdout
        assert "tbf" in qdisc and "rate 1Mbit" in qdisc, qdisc

    def echo_seconds(label: str, nbytes: int) -> float:
        bulk = rig["a"].tool(label, "bulk", "--connect", echo.address, "--bytes", str(nbytes))
        match, _ = bulk.expect(r'^\{"sent"', timeout=60)
        summary = json.loads(match.string)
        assert summary["received"] == nbytes, summary
        return float(summary["seconds"])

    # 128 KiB each way at 1 Mbit/s: at least a second (both directions are capped).
    capped = echo_seconds("capped", 131072)
    assert capped >= 0.9, capped
    rig["b"].unbandwidth()
    free = echo_seconds("free", 131072)
    assert free < capped / 4, (free, capped)


def test_stop_cont_and_kill_a_process(make_rig: MakeRig) -> None:
    rig = make_rig(["a", "b"])
    echo = rig["b"].echo_server()
    app = _app(rig, "a", echo.address)
    echo.proc.stop()
    sent = app.send("send frozen")
    time.sleep(0.5)
    assert not app.find(r"^recv b'frozen"), app.output()
    thawed = echo.proc.cont()
    _, line = app.expect(r"^recv b'frozen\\n'")
    assert line.t >= thawed > sent
    killed = echo.proc.kill()
    _, line = app.expect(r"^(eof|reset) ")
    assert _t(line.text) - killed < 1.0
    assert echo.proc.popen.wait(10) == -9


# the delayer ------------------------------------------------------------------------------

def test_delayer_adds_delay_and_jitter_keeping_order_and_ends(make_rig: MakeRig) -> None:
    rig = make_rig(["a", "b"])
    echo = rig["b"].echo_server()
    delay, jitter = 0.1, 0.03
    relay = rig["a"].delayer(echo.address, delay=delay, jitter=jitter, seed=1)
    via = f"127.0.0.1:{relay.port}"
    ping = rig["a"].tool("ping", "ping", "--connect", via, "--interval", "0.02",
                         "--seconds", "2")
    ping.expect(r'^\{"sent"', timeout=30)
    rtts = [float(m.group(1)) for m in ping.find(r"^rtt \d+ ([\d.]+)")]
    # One delay each way: 2D +- 2J, plus a little for the hops themselves.
    assert len(rtts) >= 5
    assert all(2 * (delay - jitter) - 0.005 <= r <= 2 * (delay + jitter) + 0.05 for r in rtts), \
        rtts
    assert statistics.pstdev(rtts) > 0.005, rtts  # the jitter is there
    # Many chunks, each delayed by its own random amount, arrive in order, byte-exact.
    bulk = rig["a"].tool("bulk", "bulk", "--connect", via, "--bytes", str(4 << 20))
    match, _ = bulk.expect(r'^\{"sent"', timeout=60)
    sums = re.findall(r'"(?:sent|received)_sha256": "(\w+)"', match.string)
    assert '"received": 4194304' in match.string and sums[0] == sums[1], match.string
    # The end of a connection is passed on too: a reset as a reset, after the delay.
    app = _app(rig, "a", via)
    app.send("send hello")
    app.expect(r"^recv b'hello\\n'")
    echo.proc.send("reset all")
    _, line = echo.proc.expect(r"^did reset all on 1 ")
    t_reset = _t(line.text)
    _, line = app.expect(r"^reset ")
    assert delay - jitter - 0.01 <= _t(line.text) - t_reset <= delay + jitter + 0.2
    # Its stats: one JSON line per connection, with the longest gap between chunks.
    stats = relay.proc.json_lines()
    assert stats and {"conn", "up", "down"} <= set(stats[-1]), stats[-1:]


# the delay line ---------------------------------------------------------------------------

def test_delay_line_delays_every_packet_keeping_order_and_lifts(make_rig: MakeRig) -> None:
    """`Host.delay`: the hosts' own TCP connections see the delay (it is in their RTT),
    a transfer through it stays byte-exact and in order, its reports show what each
    connection's TCP delivered, and `undelay` puts the link back on the bridge."""
    rig = make_rig(["a", "b"])
    echo = rig["b"].echo_server()
    delay, jitter = 0.1, 0.03
    line = rig["b"].delay(delay, jitter, seed=1)
    assert "delay" in rig["b"].faults
    ping = rig["a"].tool("ping", "ping", "--connect", echo.address, "--interval", "0.05",
                         "--seconds", "1")
    ping.expect(r'^\{"sent"', timeout=30)
    rtts = [float(m.group(1)) for m in ping.find(r"^rtt \d+ ([\d.]+)")]
    # Each way crosses the line once: 2D +- 2J, plus what the hosts and the line add.
    assert len(rtts) >= 5
    assert all(2 * (delay - jitter) - 0.005 <= r <= 2 * (delay + jitter) + 0.06 for r in rtts), \
        rtts
    assert statistics.pstdev(rtts) > 0.005, rtts
    # Its reports: what b's TCP delivered, per connection (the ping's, here).
    line.expect(rf'"acks": \{{.*"{rig["b"].ip}:{echo.port}<{rig["a"].ip}:\d+"', timeout=5)
    # TCP through it: segmentation offload and checksums carried through, order kept.
    bulk = rig["a"].tool("bulk", "bulk", "--connect", echo.address, "--bytes", str(1 << 20))
    match, _ = bulk.expect(r'^\{"sent"', timeout=60)
    sums = re.findall(r'"(?:sent|received)_sha256": "(\w+)"', match.string)
    assert '"received": 1048576' in match.string and sums[0] == sums[1], match.string
    rig["b"].undelay()
    assert not rig["b"].faults and line.popen.poll() is not None
    ports = subprocess.run(["ip", "-n", rig.switch_ns, "-o", "link", "show", "master",
                            rig.bridge], capture_output=True, text=True, check=True).stdout
    assert rig["b"].switch_port in ports, ports
    ping = rig["a"].tool("ping2", "ping", "--connect", echo.address, "--interval", "0.02",
                         "--seconds", "0.2")
    match, _ = ping.expect(r'^\{"sent"', timeout=30)
    assert json.loads(match.string)["max_rtt"] < 0.05, match.string


# no CAP_NET_ADMIN -------------------------------------------------------------------------

def test_without_namespaces_every_rig_test_skips_with_one_reason(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where `ip netns add` fails (no CAP_NET_ADMIN), require_netns() skips, and says why."""
    fake = tmp_path / "ip"
    fake.write_text("#!/bin/sh\necho 'mount --make-shared /run/netns failed: "
                    "Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    for tool in ("nft", "tc"):  # present (never reached): the namespace is what fails
        (tmp_path / tool).write_text("#!/bin/sh\nexit 0\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(rigmod, "_unavailable", [])
    reasons = set()
    for _ in range(3):
        with pytest.raises(pytest.skip.Exception) as skipped:
            require_netns()
        reasons.add(str(skipped.value))
    assert len(reasons) == 1
    (reason,) = reasons
    assert "ip netns add" in reason and "CAP_NET_ADMIN" in reason, reason


# last: nothing of this test process is left ----------------------------------------------

def test_nothing_of_this_process_is_left() -> None:
    """Run last in this module: every rig made so far by this test process is gone."""
    require_netns()
    assert leftovers(PREFIX) == [], "a rig of this test process left something behind"
