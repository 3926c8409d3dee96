"""Issue 7, scenario 6: reconnect. A host's link flaps (down 2 s, up) ten times: the
gateway cluster re-forms each time and the gateways re-learn their peer's services, and
a mesh across the same link reconnects each time, losing nothing.

Two hosts, `a` and `b`, each with a gateway (gw1 on `a`, gw2 on `b`) peered with each
other (both dial: two links), short timers (heartbeat 0.2 s, link timeout 1 s, retry
0.3 s). An echo server and a connector registering it as "echo" with gw2 on `b`; an
agent forwarding "echo" through gw1 on `a`. Two mesh nodes (tests/meshnode.py), one on
each host, send each other numbered messages all along.

The flap is `ip link set ... down` on the switch end of `b`'s veth (the cable pulled at
the switch: `b` loses its carrier, keeps its address, so what runs inside `b` still
reaches `b`'s address over loopback -- the connector stays registered with gw2).

What gw1 says is watched by a poller inside `a` (`fetch_status` every 50 ms, one JSON
line each, stamped with `time.monotonic()`, the clock shared by all namespaces), so
that each transition is timed to within a poll, not a `tether status` process start.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from hosts.rig import HostProc, Rig
from test_faults import MESHNODE, MakeRig, make_rig  # noqa: F401

pytestmark = pytest.mark.netns

FLAPS = 10
DOWN = 2.0  # seconds each flap keeps the link down
HEARTBEAT = 0.2
LINK_TIMEOUT = 1.0
RETRY = 0.3
DOWN_SLACK = 0.4  # poll period, a timer tick, process wake-up on a loaded machine
RELEARN = 5.0  # link up -> gw1 lists gw2 up with "echo" again
GW_PORT = 7443
MESH_PORT = 7001
MESH_RATE = 40.0
MESH_COUNT = 1200  # 30 s at MESH_RATE: sending spans the ten flaps (~2.4 s each)
ESTABLISH = 10.0  # longer than a flap: the mesh reconnects, nothing is failed

POLLER = """
import asyncio, json, sys, time
from tether.admin import fetch_status

async def main(port):
    while True:
        try:
            s = json.loads(await fetch_status("127.0.0.1", port, timeout=2.0))
            line = {"t": time.monotonic(), "peers": s["peers"], "services": s["services"]}
        except Exception as exc:
            line = {"t": time.monotonic(), "error": repr(exc)}
        print(json.dumps(line), flush=True)
        await asyncio.sleep(0.05)

asyncio.run(main(int(sys.argv[1])))
"""


def _learned(status: dict[str, Any]) -> bool:
    """gw1 has its peer gw2 up, reaching "echo", and routes "echo" through it."""
    peer = status.get("peers", {}).get("gw2", {})
    return bool(peer.get("up")) and "echo" in peer.get("services", {}) \
        and any("gw2" in s for s in status.get("services", {}).get("echo", []))


def _forgotten(status: dict[str, Any]) -> bool:
    """gw1 has its peer gw2 down, and no route to "echo" left."""
    peer = status.get("peers", {}).get("gw2", {})
    return "peers" in status and not peer.get("up") and not peer.get("services") \
        and "echo" not in status.get("services", {})


def _await_status(poller: HostProc, since: float, pred: Callable[[dict[str, Any]], bool],
                  timeout: float, what: str) -> dict[str, Any]:
    """The first status line polled at or after `since` satisfying `pred`."""
    deadline = time.monotonic() + timeout
    seen = 0
    last: dict[str, Any] = {}
    while True:
        lines = poller.lines("stdout")
        for ln in lines[seen:]:
            if not ln.text.startswith("{"):
                continue
            status: dict[str, Any] = json.loads(ln.text)
            if status["t"] >= since:
                last = status
                if pred(status):
                    return status
        seen = len(lines)
        if time.monotonic() > deadline or not poller.running:
            raise AssertionError(f"gw1 never showed {what} within {timeout:g}s; last status "
                                 f"{last}; poller:\n{poller.output(5)}")
        time.sleep(0.02)


ECHOER = """
import asyncio, json, sys

async def check(port):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except Exception as exc:
        return {"sent": 0, "received": 0, "error": repr(exc)}
    received, error = 0, None
    try:
        for seq in range(5):
            writer.write(f"{seq}\\n".encode())
            line = await asyncio.wait_for(reader.readline(), 5)
            if line != f"{seq}\\n".encode():
                error = f"got {line!r} for {seq}"
                break
            received += 1
            await asyncio.sleep(0.05)
    except Exception as exc:
        error = repr(exc)
    writer.close()
    return {"sent": 5, "received": received, "error": error}

async def main():
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        print(json.dumps(await check(int(line))), flush=True)

asyncio.run(main())
"""


def _echo_works(rig: Rig, echoer: HostProc, port: int, label: str) -> dict[str, Any]:
    """A fresh connection through the agent: five request/replies, all answered (by a
    process kept in `a` for that: one new connection per call, no process start)."""
    echoer.send(str(port))
    match, _ = echoer.expect(r'^\{"sent"', timeout=30)
    summary: dict[str, Any] = json.loads(match.string)
    assert summary["error"] is None and summary["sent"] == summary["received"] > 0, \
        f"{label}: {summary}\n{rig.describe()}"
    return summary


def _mesh_node(rig: Rig, name: str, host: str, peer: tuple[str, str]) -> HostProc:
    return rig[host].run(name, [
        sys.executable, str(MESHNODE), "--name", name,
        "--listen", f"{rig[host].ip}:{MESH_PORT}",
        f"--peer={peer[0]}={rig[peer[1]].ip}:{MESH_PORT}", "--liveness", "1",
        "--establish-timeout", str(ESTABLISH), "--retry-interval", "0.2",
        "--send", peer[0], "--count", str(MESH_COUNT), "--rate", str(MESH_RATE)])


def test_link_flaps_ten_times(make_rig: MakeRig) -> None:  # noqa: F811
    rig = make_rig(["a", "b"])
    a, b = rig["a"], rig["b"]
    timers = ["--heartbeat", str(HEARTBEAT), "--link-timeout", str(LINK_TIMEOUT),
              "--retry-interval", str(RETRY)]
    gw1 = a.gateway("gw1", "--listen", f"{a.ip}:{GW_PORT}",
                    "--peer", f"gw2={b.ip}:{GW_PORT}", *timers)
    gw2 = b.gateway("gw2", "--listen", f"{b.ip}:{GW_PORT}",
                    "--peer", f"gw1={a.ip}:{GW_PORT}", *timers)
    echo = b.echo_server()
    b.connector(gw2, {"echo": echo.address})
    agent = a.agent(gw1, ["echo"])
    port = agent.ports["echo"]
    poller = a.run("poller", [sys.executable, "-c", POLLER, str(gw1.admin_port)])
    echoer = a.run("echoer", [sys.executable, "-c", ECHOER], stdin=True)
    _await_status(poller, 0.0, _learned, 20.0, "gw2 reaching echo (initially)")
    _echo_works(rig, echoer, port, "echo0")

    m1 = _mesh_node(rig, "m1", "a", ("m2", "b"))
    m2 = _mesh_node(rig, "m2", "b", ("m1", "a"))
    for node in (m1, m2):
        node.expect(r"^ready ")
    m1.expect(r"^recv m2 7 ", timeout=10)  # the mesh is up before the first flap
    m2.expect(r"^recv m1 7 ", timeout=10)

    downs: list[float] = []
    relearns: list[float] = []
    for flap in range(FLAPS):
        down_at = b.link_down()
        status = _await_status(poller, down_at, _forgotten, LINK_TIMEOUT + DOWN_SLACK + 1.0,
                               f"gw2 down and echo gone (flap {flap + 1})")
        downs.append(status["t"] - down_at)
        time.sleep(max(0.0, down_at + DOWN - time.monotonic()))
        up_at = b.link_up()
        status = _await_status(poller, up_at, _learned, RELEARN,
                               f"gw2 up reaching echo again (flap {flap + 1})")
        relearns.append(status["t"] - up_at)
        _echo_works(rig, echoer, port, f"echo{flap + 1}")

    for node in (m1, m2):
        node.expect(r"^sent ", timeout=MESH_COUNT / MESH_RATE + 30)
        node.expect(r"^settled ", timeout=30)
    mesh: dict[str, str] = {}
    for sender, receiver in ((m1, m2), (m2, m1)):
        s, r = sender.name.split("@")[0], receiver.name.split("@")[0]
        got = [int(m.group(1)) for m in receiver.find(rf"^recv {s} 7 (\d+)$")]
        failures = sender.find(rf"^failure {r} .*numbers=(\S*) reason=(.*)$")
        assert not failures, f"{s}->{r}: failed {[f.group(0) for f in failures]}"
        assert got == list(range(MESH_COUNT)), \
            (f"{s}->{r}: {len(got)} received; missing "
             f"{sorted(set(range(MESH_COUNT)) - set(got))[:20]}; duplicated or out of "
             f"order: {[x for i, x in enumerate(got) if i and x <= got[i - 1]][:20]}")
        mesh[f"{s}->{r}"] = f"{len(got)} in order"
    reconnects = {n.name: len(n.find(r"mesh \S+: peer \S+ up \(", stream="stderr"))
                  for n in (m1, m2)}

    print(f"\n{FLAPS} flaps of {DOWN:g}s: gw1 saw gw2 down after "
          f"{[round(d, 2) for d in downs]} s (max {max(downs):.2f}, link timeout "
          f"{LINK_TIMEOUT:g}); re-learned echo after {[round(r, 2) for r in relearns]} s "
          f"(max {max(relearns):.2f}); mesh {mesh}; mesh 'peer up' log lines {reconnects}")
    # the mesh came up once, then again after every flap (a link lost per flap)
    assert all(n >= FLAPS + 1 for n in reconnects.values()), reconnects
    low = LINK_TIMEOUT - HEARTBEAT - 0.1
    assert all(low <= d <= LINK_TIMEOUT + DOWN_SLACK for d in downs), \
        f"peer DOWN after {downs}, expected within [{low:g}, {LINK_TIMEOUT + DOWN_SLACK:g}]"
