"""The mesh with each node in its own OS process (tests/meshnode.py), on loopback:
broadcast variants over 3- and 5-node clusters; exactly-once delivery while the
receiver is SIGKILLed and restarted and a proxy cuts the link at random; a SIGSTOPped
peer reported down within the liveness timeout and, once SIGCONTed, sent everything
that was queued for it.

Every process is ended by PID at teardown (`procs.ProcGroup`), whatever happened.
"""

from __future__ import annotations

import itertools
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnode import Proxy, parse_ranges
from procs import Proc, ProcGroup

pytestmark = pytest.mark.slow

NODE = Path(__file__).resolve().with_name("meshnode.py")
RECV = re.compile(r"^recv (\S+) (\d+) (.*)$")
FAILURE = re.compile(r"^failure (\S+) unconfirmed=(\d+) n=(\d+) numbers=(\S+) reason=(.*)$")
# Scheduling, process wake-up and pipe latency on a loaded 2-CPU machine.
SLACK = 0.15


@pytest.fixture
def procs() -> Iterator[ProcGroup]:
    with ProcGroup() as group:
        yield group


def free_ports(n: int) -> list[int]:
    """`n` distinct ports with nothing listening (bound together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_argv(name: str, port: int, peers: dict[str, int], *args: str) -> list[str]:
    argv = [sys.executable, str(NODE), "--name", name, "--listen", f"127.0.0.1:{port}"]
    for peer, peer_port in peers.items():
        argv += ["--peer", f"{peer}=127.0.0.1:{peer_port}"]
    return argv + list(args)


def start(procs: ProcGroup, name: str, argv: list[str]) -> Proc:
    proc = procs.start(name, argv)
    proc.expect(r"^ready port=\d+")
    return proc


def received(proc: Proc) -> list[tuple[str, int, str]]:
    out = []
    for line in proc.lines("stdout"):
        match = RECV.match(line.text)
        if match:
            out.append((match[1], int(match[2]), match[3]))
    return out


def failures(proc: Proc) -> list[tuple[list[int], int, str]]:
    out = []
    for line in proc.lines("stdout"):
        match = FAILURE.match(line.text)
        if match:
            numbers = parse_ranges(match[4])
            assert len(numbers) == int(match[3]), line.text
            out.append((numbers, int(match[2]), match[5]))
    return out


@pytest.mark.parametrize("n", [3, 5])
def test_broadcast_variants_reach_exactly_the_intended_nodes(procs: ProcGroup, n: int) -> None:
    names = [f"n{i}" for i in range(n)]
    servers = names[: n // 2 + 1]
    ports = dict(zip(names, free_ports(n), strict=True))
    custom = {name: [names[(i + 1) % n], names[(i + 2) % n]][: n // 2]
              for i, name in enumerate(names)}
    nodes = {}
    for name in names:
        peers = {p: ports[p] for p in names if p != name}
        argv = node_argv(name, ports[name], peers, "--servers", ",".join(servers),
                         "--broadcast", "--custom", ",".join(custom[name]),
                         "--establish-timeout", "20", "--retry-interval", "0.1")
        nodes[name] = procs.start(name, argv)
    for proc in nodes.values():
        proc.expect(r"^ready port=\d+")
    for proc in nodes.values():  # all its messages acknowledged: consumed by their targets
        proc.expect(r"^settled ", timeout=30)
    time.sleep(0.3)  # room for anything that should not come
    for name, proc in nodes.items():
        expected = sorted(
            [(o, 1, f"broadcast:{o}") for o in names if o != name]
            + [(o, 2, f"server:{o}") for o in names if o != name and name in servers]
            + [(o, 3, f"custom:{o}") for o in names if name in custom[o]])
        assert sorted(received(proc)) == expected, (name, procs.describe())
        assert failures(proc) == [], (name, procs.describe())


def test_exactly_once_in_order_across_kills_restarts_and_cuts(procs: ProcGroup) -> None:
    """A sends 0..9999 to B through a proxy that cuts every connection at random, while
    B is SIGKILLed and restarted twice. Every number reaches B's application (its
    three incarnations together) at most once and in order; the ones that did not are
    exactly those A reported in failures; a reported number that B did receive is one
    of a report's `unconfirmed` (sent to a killed incarnation, never acknowledged)."""
    count = 10_000
    pa, pb = free_ports(2)
    with Proxy(pb) as proxy:
        b_argv = node_argv("B", pb, {"A": pa}, "--liveness", "1")
        incarnations = [start(procs, "B1", b_argv)]
        a = start(procs, "A", node_argv(
            "A", pa, {"B": proxy.port}, "--send", "B", "--count", str(count), "--rate",
            "2500", "--liveness", "1", "--establish-timeout", "10",
            "--retry-interval", "0.1"))
        stop = threading.Event()
        rng = random.Random(7)

        def cutter() -> None:
            while not stop.wait(rng.uniform(0.1, 0.4)):
                proxy.cut()

        thread = threading.Thread(target=cutter, daemon=True)
        thread.start()
        try:
            for i in (2, 3):
                seen = sum(len(received(p)) for p in incarnations)
                deadline = time.monotonic() + 20
                while sum(len(received(p)) for p in incarnations) < seen + 2500:
                    assert time.monotonic() < deadline, procs.describe()
                    time.sleep(0.01)
                incarnations[-1].kill()
                incarnations[-1].wait()
                time.sleep(0.2)
                incarnations.append(start(procs, f"B{i}", b_argv))
            a.expect(r"^sent 10000$", timeout=30)
            a.expect(r"^settled ", timeout=30)
        finally:
            stop.set()
            thread.join()
        cuts = proxy.cuts

    got = [int(body) for p in incarnations for (_, _, body) in received(p)]
    assert all(x < y for x, y in itertools.pairwise(got)), "duplicate or out of order"
    reports = failures(a)
    doubtful = [x for numbers, u, _ in reports for x in numbers[:u]]
    certain = [x for numbers, u, _ in reports for x in numbers[u:]]
    failed = doubtful + certain
    assert len(failed) == len(set(failed)), "a number reported twice"
    missing = set(range(count)) - set(got)
    assert missing <= set(failed), f"lost without a report: {sorted(missing)[:20]}"
    assert not set(certain) & set(got), "reported as undelivered, but delivered"
    assert set(failed) - set(got) == missing
    overlap = set(doubtful) & set(got)
    assert all("restarted" in reason for _, _, reason in reports), reports
    print(f"cuts={cuts} delivered={len(got)} failed={len(failed)} "
          f"unconfirmed={len(doubtful)} of which delivered={len(overlap)} "
          f"reports={[(len(n), u) for n, u, _ in reports]}")
    assert cuts >= 3


def test_sigstopped_peer_is_down_within_liveness_and_gets_everything_after_sigcont(
        procs: ProcGroup) -> None:
    liveness = 1.0
    count = 80
    pa, pb = free_ports(2)
    b = start(procs, "B", node_argv("B", pb, {"A": pa}, "--liveness", str(liveness)))
    a = start(procs, "A", node_argv("A", pa, {"B": pb}, "--send", "B", "--count",
                                    str(count), "--rate", "20", "--liveness", str(liveness),
                                    "--establish-timeout", "8", "--retry-interval", "0.2"))
    b.expect(r"^recv A 7 5$")
    t0 = b.stop()
    assert not a.find(r"peer B down", stream="stderr"), procs.describe()  # no false DOWN
    _, line = a.expect(r"peer B down: link lost", stream="stderr", timeout=5)
    # B's last heartbeat left at most liveness/4 before the stop: a DOWN sooner than
    # the link timeout (0.9 * liveness) less that is not the liveness timeout's
    low = 0.9 * liveness - liveness / 4 - SLACK
    assert low <= line.t - t0 <= liveness + SLACK, (line.t - t0, line.text)
    time.sleep(max(0.0, t0 + 2.5 - time.monotonic()))  # well before establish_timeout
    b.cont()
    a.expect(r"^settled ", timeout=20)
    assert [int(body) for _, _, body in received(b)] == list(range(count)), procs.describe()
    assert failures(a) == []


def test_first_contact_failure_is_reported(procs: ProcGroup) -> None:
    """Nothing listens at the peer's address: after establish_timeout the node's
    application gets every message back, none of them unconfirmed."""
    pa, nobody = free_ports(2)
    a = procs.start("A", node_argv("A", pa, {"ghost": nobody}, "--send", "ghost", "--count",
                                   "3", "--establish-timeout", "0.5"))
    _, ready = a.expect(r"^ready port=\d+")
    _, line = a.expect(r"^failure ghost ", timeout=10)
    # both times are when this test read the lines: a few ms of jitter either way
    assert 0.5 - 0.05 <= line.t - ready.t < 0.5 + 1.0, line.t - ready.t
    assert failures(a) == [([0, 1, 2], 0, failures(a)[0][2])]
    assert "ghost unreachable for 0.5s: cannot connect" in line.text, line.text
    a.expect(r"^settled ")
    a.expect(r"cannot reach ghost at 127\.0\.0\.1:\d+", stream="stderr")
