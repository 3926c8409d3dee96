"""The host rig: N hosts as network namespaces on one bridge, real processes inside them,
and faults injected on a host or its link, and lifted again.

    with Rig(["client", "gw", "server"]) as rig:
        gw = rig["gw"].gateway()                                  # tether gateway, ready
        rig["server"].oecho_server(gw, hold=True, liveness=1.0)
        client = rig["client"].oecho_client(gw, liveness=1.0)
        client.expect(r"^reply: ")
        t = rig["server"].silence()                               # nft DROP, both ways
        client.expect(r"^second read: ")

Topology. Every host is a namespace `tt<pid>-<r>h<i>` with loopback up and one veth,
`tt<pid>-<r>h<i>` on its side with address 10.231.0.<i+1>/24, whose other end
`tt<pid>-<r>s<i>` is a port of the bridge `tt<pid>-<r>br` in a switch namespace
`tt<pid>-<r>sw` (`<r>` is a letter per rig, so that rigs made one after another never
meet half-deleted names). Both ends of every veth are created inside their namespaces,
so nothing ever appears in the root namespace, and 10.231.0.0/24 exists only on these
interfaces: the test process itself cannot reach the hosts (it drives them through the
processes it runs in them, with `ip netns exec`).

Faults (each returns the `time.monotonic()` just after it took effect, and is lifted
by its counterpart):

* `Host.silence()` / `unsilence()`: an nft table in the host's namespace drops every
  packet in and out except on loopback. The interface stays up; nobody gets a RST, a
  FIN or an ICMP error: the unresponsive peer.
* `Host.loss(percent)` / `unloss()`: nft `numgen random mod 100 < N drop` on the host's
  input (or output, or both), loopback excluded.
* `Host.link_down()` / `link_up()`: `ip link set ... down` on the switch end (the cable
  pulled at the switch: the host's interface loses its carrier) or on the host end.
* `Host.bandwidth(rate)` / `unbandwidth()`: `tc qdisc ... root tbf` on both ends of
  the host's veth, so both directions of the link are capped.
* `HostProc.stop()` / `cont()` / `kill()`: SIGSTOP, SIGCONT, SIGKILL of one process.
* Delay and jitter: the kernel has no netem. `Host.delay(D, J)` / `undelay()` joins
  the host's link to the bridge through tests/hosts/delayline.py, a packet delay line
  run in the switch's namespace: every packet in and out of the host `D ± J` later,
  order kept, the hosts' own TCP connections seeing the delay. `Host.delayer()` runs
  tests/hosts/delayer.py, a TCP relay that forwards one port with a per-chunk delay
  (it terminates TCP: what crosses it sees the delay, its own sockets do not). See
  docs/faults.md for why both, and what each does not model.

Processes. `Host.run()` starts `ip netns exec NS ARGV...` (ip execs the program: the PID
is the program's), keeps every stdout and stderr line with the `time.monotonic()` at
which it arrived (`HostProc.expect`), and remembers the PID. Readiness is awaited by
reading lines, never by sleeping. Helpers start the tether daemons (`gateway`, `agent`,
`connector`), the oecho example, and the small TCP tools of this file (run as
`python tests/hosts/rig.py TOOL ...`: `echo`, `app`, `ping`, `bulk`, `tcpwait`).

Teardown (`Rig.close`, the context manager's exit), even when the test failed: every
process started is ended by its PID (SIGCONT if stopped, SIGKILL, reaped), then any
process still inside one of the rig's namespaces (`ip netns pids`), then every
namespace is deleted (which destroys the veths, the bridge, the nft tables and the
qdiscs with it), and what is left is checked (`leftovers()`): a failure there raises.

Where network namespaces cannot be made (no CAP_NET_ADMIN, no iproute2/nftables/tc),
`require_netns()` skips with one reason, the same for every test.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (run as a script too)
from procs import Line, Proc

__all__ = [
    "PREFIX",
    "ROOT",
    "SUBNET",
    "Daemon",
    "Host",
    "HostProc",
    "Line",
    "Rig",
    "Server",
    "leftovers",
    "netns_unavailable",
    "require_netns",
    "rss_bytes",
]

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()
DELAYER = THIS.with_name("delayer.py")
DELAYLINE = THIS.with_name("delayline.py")
OECHO = ROOT / "examples" / "oecho.py"
PREFIX = f"tt{os.getpid()}-"
SUBNET = "10.231.0"
# A Python process importing tether (and uvloop) takes a fraction of a second to start;
# on a loaded 2-CPU CI machine it can take a few.
READY_TIMEOUT = 20.0
REAP_TIMEOUT = 10.0
_LINGER_ZERO = struct.pack("ii", 1, 0)
_STALE = re.compile(r"^tt(\d+)-[a-z](?:h\d+|sw|probe)$")
_serial = itertools.count()
_open_rigs: weakref.WeakSet[Rig] = weakref.WeakSet()


# ------------------------------------------------------------------------------ helpers

def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                            input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _root_links() -> list[str]:
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
            if line.count(":") >= 2]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)


def leftovers(prefix: str = PREFIX) -> list[str]:
    """Namespaces (`ip netns list`) and root-namespace interfaces (`ip link`) whose name
    starts with `prefix`: what a rig left behind. Empty after a clean teardown."""
    found = [f"netns {ns}" for ns in _netns_list() if ns.startswith(prefix)]
    found += [f"link {name}" for name in _root_links() if name.startswith(prefix)]
    return found


def sweep_stale() -> list[str]:
    """Delete the namespaces of rigs whose test process is gone (killed with SIGKILL, say:
    no teardown ran). Only names of this rig's exact pattern, only for dead PIDs."""
    swept = []
    for ns in _netns_list():
        match = _STALE.match(ns)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        for pid in _netns_pids(ns):
            _kill_pid(pid)
        _run(["ip", "netns", "del", ns], check=False)
        swept.append(ns)
    return swept


_unavailable: list[str | None] = []


def netns_unavailable() -> str | None:
    """Why the rig cannot run here (None if it can). Probed once per process: `ip netns
    add` of a scratch namespace, nft and tc inside it."""
    if _unavailable:
        return _unavailable[0]
    reason = None
    missing = [p for p in ("ip", "nft", "tc") if shutil.which(p) is None]
    if missing:
        reason = (f"the host rig needs {', '.join(missing)} (packages iproute2, nftables): "
                  "not installed")
    else:
        probe = f"{PREFIX}zprobe"
        added = _run(["ip", "netns", "add", probe], check=False)
        if added.returncode != 0:
            reason = ("network namespaces unavailable: `ip netns add` failed "
                      f"({added.stderr.strip() or added.returncode}); the host rig needs "
                      "root with CAP_NET_ADMIN")
        else:
            try:
                nft = _run(["ip", "netns", "exec", probe, "nft", "list", "ruleset"],
                           check=False)
                if nft.returncode != 0:
                    reason = f"nft does not work in a namespace: {nft.stderr.strip()}"
            finally:
                _run(["ip", "netns", "del", probe], check=False)
        if reason is None:
            sweep_stale()
    _unavailable.append(reason)
    return reason


def require_netns() -> None:
    """Skip the calling test (one reason for all) if the rig cannot run here."""
    reason = netns_unavailable()
    if reason is not None:
        import pytest

        pytest.skip(reason)


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of process `pid`, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# ------------------------------------------------------------------------------ processes

class HostProc(Proc):
    """One process running in a host (`ip netns exec`); see `procs.Proc`."""

    def __init__(self, name: str, ns: str, argv: Sequence[str], *, stdin: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.ns = ns
        super().__init__(name, ["ip", "netns", "exec", ns, *argv], cwd=ROOT, stdin=stdin,
                         env=env)

    def __repr__(self) -> str:
        return f"<HostProc {self.name} in {self.ns} pid={self.pid} rc={self.popen.returncode}>"

    def rss(self) -> int:
        """The process's VmRSS in bytes."""
        return rss_bytes(self.pid)

    def kill_group(self) -> None:
        """SIGCONT then SIGKILL to the process's group (its own: it was started in a new
        session), so that children it started, holding its pipes, end with it."""
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
        if self.popen.poll() is None:  # (not a group leader any more, somehow)
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGCONT)
                self.popen.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """End the process and its group (SIGCONT, SIGKILL), reap it, join its readers and
        close its pipes. Idempotent."""
        self.kill_group()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(REAP_TIMEOUT)
        self.stopped = False
        for pipe in (self.popen.stdin,):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        for thread in self._threads:
            thread.join(REAP_TIMEOUT)
        if any(thread.is_alive() for thread in self._threads):
            # Someone outside the group still holds the pipes: closing them under a
            # blocked reader would block here too. Leave them to the garbage collector.
            return
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


@dataclass(eq=False)
class Daemon:
    """A tether daemon running in a host: its process, role and name, its ports."""

    proc: HostProc
    host: Host
    role: str
    name: str
    admin_port: int = 0
    port: int = 0  # the gateway's link port
    ports: dict[str, int] = field(default_factory=dict)  # the agent's forward ports

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        """HOST:PORT of the gateway (on its host's address)."""
        return f"{self.host.ip}:{self.port}"

    def status(self, timeout: float = 15.0) -> dict[str, Any]:
        """`tether status 127.0.0.1:ADMIN`, run inside the daemon's host: its JSON."""
        return self.host.status(self.admin_port, timeout=timeout)

    def open_flows(self, timeout: float = 15.0) -> dict[str, int]:
        """What it holds open now, from its status: all 0 once every flow ended."""
        status = self.status(timeout)
        if self.role == "gateway":
            return {"flows": status["flows"]}
        return {"open": status["open"], "node.flows": status["node"]["flows"],
                "flows listed": len(status["flows"])}


@dataclass(eq=False)
class Server:
    """A TCP tool listening in a host, and its port."""

    proc: HostProc
    host: Host
    port: int
    listen_host: str | None = None  # None: the host's address

    @property
    def address(self) -> str:
        """HOST:PORT to connect to (127.0.0.1 for a server on loopback: from its host)."""
        return f"{self.listen_host or self.host.ip}:{self.port}"


# ------------------------------------------------------------------------------ hosts

class Host:
    """One host of a rig: a network namespace, its veth, its address. See the module
    docstring for the faults and programs."""

    def __init__(self, rig: Rig, name: str, index: int) -> None:
        self.rig = rig
        self.name = name
        self.index = index
        self.ns = f"{rig.prefix}h{index}"
        self.iface = f"{rig.prefix}h{index}"  # in self.ns
        self.switch_port = f"{rig.prefix}s{index}"  # in rig.switch_ns
        self.ip = f"{SUBNET}.{index + 1}"
        self.faults: set[str] = set()
        self.line: HostProc | None = None  # the packet delay line, while `delay` is on

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ns} {self.ip}>"

    # running things -------------------------------------------------------------------

    def exec(self, *argv: str, check: bool = True, timeout: float = 30.0,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the host and wait for it."""
        return _run(["ip", "netns", "exec", self.ns, *argv], check=check, timeout=timeout,
                    input=input)

    def run(self, name: str, argv: Sequence[str], *, stdin: bool = False) -> HostProc:
        """Start `argv` inside the host; it is ended (by PID) when the rig closes."""
        return self.rig._start(self, name, argv, stdin=stdin)

    def tool(self, name: str, tool: str, *args: str, stdin: bool = False) -> HostProc:
        """Start one of this file's TCP tools (`echo`, `app`, `ping`, `bulk`, `tcpwait`)."""
        return self.run(name, [sys.executable, str(THIS), tool, *args], stdin=stdin)

    def tether(self, name: str, *args: str) -> HostProc:
        """Start `tether ARGS...` (this interpreter's tether) inside the host."""
        return self.run(name, [sys.executable, "-m", "tether.cli", *args])

    def status(self, admin_port: int, timeout: float = 15.0) -> dict[str, Any]:
        """`tether status 127.0.0.1:PORT` run inside the host, decoded."""
        result = self.exec(sys.executable, "-m", "tether.cli", "status",
                           f"127.0.0.1:{admin_port}", timeout=timeout)
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def sysctl(self, key: str, value: str) -> None:
        """Set a per-namespace sysctl in this host (net.ipv4.tcp_rmem, say)."""
        self.exec("sysctl", "-q", "-w", f"{key}={value}")

    # faults ---------------------------------------------------------------------------

    def _nft(self, rules: str) -> float:
        self.exec("nft", "-f", "-", input=rules)
        return time.monotonic()

    def silence(self) -> float:
        """Drop every packet in and out, loopback excepted; the interface stays up: no RST,
        no FIN, no ICMP. Returns the time just after the rules took effect."""
        t = self._nft("table inet tt_silence {\n"
                      "  chain input { type filter hook input priority -200; policy accept;\n"
                      '    iifname "lo" accept; drop; }\n'
                      "  chain output { type filter hook output priority -200; "
                      "policy accept;\n"
                      '    oifname "lo" accept; drop; }\n'
                      "}\n")
        self.faults.add("silence")
        return t

    def unsilence(self) -> float:
        """Lift `silence`."""
        self.exec("nft", "delete", "table", "inet", "tt_silence")
        self.faults.discard("silence")
        return time.monotonic()

    def loss(self, percent: int, *, direction: str = "in") -> float:
        """Drop `percent`% of the packets at random (nft numgen), loopback excepted, on the
        host's input ("in": every packet reaching the host crosses it once), output
        ("out") or both."""
        if not 0 <= percent <= 100:
            raise ValueError(f"percent {percent} out of [0, 100]")
        match = f"< {percent}" if percent < 100 else "<= 99"  # (nft: 100 is out of range)
        chains = []
        if direction in ("in", "both"):
            chains.append("  chain input { type filter hook input priority -150; "
                          "policy accept;\n"
                          f'    iifname != "lo" counter numgen random mod 100 {match} counter '
                          "drop; }\n")
        if direction in ("out", "both"):
            chains.append("  chain output { type filter hook output priority -150; "
                          "policy accept;\n"
                          f'    oifname != "lo" counter numgen random mod 100 {match} counter '
                          "drop; }\n")
        if not chains:
            raise ValueError(f"direction must be in, out or both, not {direction!r}")
        if "loss" in self.faults:
            self.unloss()
        t = self._nft("table inet tt_loss {\n" + "".join(chains) + "}\n")
        self.faults.add("loss")
        return t

    def loss_counts(self) -> tuple[int, int]:
        """(packets seen, packets dropped) by `loss` so far, from its nft counters."""
        out = self.exec("nft", "-j", "list", "table", "inet", "tt_loss").stdout
        seen = dropped = 0
        for item in json.loads(out)["nftables"]:
            counters = [e["counter"]["packets"] for e in item.get("rule", {}).get("expr", [])
                        if "counter" in e]
            if len(counters) == 2:
                seen += counters[0]
                dropped += counters[1]
        return seen, dropped

    def unloss(self) -> float:
        """Lift `loss`."""
        self.exec("nft", "delete", "table", "inet", "tt_loss")
        self.faults.discard("loss")
        return time.monotonic()

    def _link(self, end: str, state: str) -> float:
        if end == "switch":
            _run(["ip", "-n", self.rig.switch_ns, "link", "set", self.switch_port, state])
        elif end == "host":
            _run(["ip", "-n", self.ns, "link", "set", self.iface, state])
        else:
            raise ValueError(f"end must be 'switch' or 'host', not {end!r}")
        return time.monotonic()

    def link_down(self, *, end: str = "switch") -> float:
        """`ip link set ... down` on one end of the host's link: "switch" (the cable
        pulled at the switch: the host sees its carrier go) or "host"."""
        t = self._link(end, "down")
        self.faults.add(f"link-down-{end}")
        return t

    def link_up(self, *, end: str = "switch") -> float:
        """Lift `link_down`."""
        t = self._link(end, "up")
        self.faults.discard(f"link-down-{end}")
        return t

    def bandwidth(self, rate: str = "1mbit", *, burst: str = "32kbit",
                  latency: str = "400ms") -> float:
        """Cap both directions of the host's link with tbf (egress of both veth ends)."""
        for ns, dev in ((self.ns, self.iface), (self.rig.switch_ns, self.switch_port)):
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                  "tbf", "rate", rate, "burst", burst, "latency", latency])
        self.faults.add("bandwidth")
        return time.monotonic()

    def unbandwidth(self) -> float:
        """Lift `bandwidth`."""
        for ns, dev in ((self.ns, self.iface), (self.rig.switch_ns, self.switch_port)):
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"])
        self.faults.discard("bandwidth")
        return time.monotonic()

    def delay(self, delay: float, jitter: float = 0.0, *, seed: int | None = None) -> HostProc:
        """Delay every packet in and out of the host by `delay` ± `jitter` seconds (order
        kept): the host's link is cut at the switch and joined again through a packet
        delay line (tests/hosts/delayline.py, run in the switch's namespace), so the
        hosts' own TCP connections see the delay. A path between two delayed hosts
        crosses two lines. The host is off the network for the fraction of a second the
        line takes to start: delay it before the traffic. Returns the line's process
        (its JSON lines report, per TCP connection, the longest gap in what the host's
        TCP delivered)."""
        sw, prefix = self.rig.switch_ns, self.rig.prefix
        line_port, bridge_port = f"{prefix}x{self.index}", f"{prefix}y{self.index}"
        _run(["ip", "-n", sw, "link", "add", line_port, "type", "veth", "peer", "name",
              bridge_port])
        _run(["ip", "-n", sw, "link", "set", self.switch_port, "nomaster"])
        _run(["ip", "-n", sw, "link", "set", bridge_port, "master", self.rig.bridge])
        for port in (line_port, bridge_port):
            _run(["ip", "-n", sw, "link", "set", port, "up"])
        argv = [sys.executable, str(DELAYLINE), "--a", self.switch_port, "--b", line_port,
                "--delay", str(delay), "--jitter", str(jitter)]
        if seed is not None:
            argv += ["--seed", str(seed)]
        proc = self.rig._start_in(sw, f"delayline@{self.name}", argv)
        proc.expect(r"^delayline ready$", stream="stderr")
        self.faults.add("delay")
        self.line = proc
        return proc

    def undelay(self) -> float:
        """Lift `delay`: the host's link joins the bridge directly again."""
        sw, prefix = self.rig.switch_ns, self.rig.prefix
        if self.line is not None:
            self.line.close()
            if self.line in self.rig.procs:
                self.rig.procs.remove(self.line)
            self.line = None
        _run(["ip", "-n", sw, "link", "del", f"{prefix}x{self.index}"])  # and its peer
        _run(["ip", "-n", sw, "link", "set", self.switch_port, "master", self.rig.bridge])
        self.faults.discard("delay")
        return time.monotonic()

    def lift(self) -> None:
        """Lift every fault on this host and its link."""
        for fault in sorted(self.faults):
            if fault == "delay":
                self.undelay()
            elif fault == "silence":
                self.unsilence()
            elif fault == "loss":
                self.unloss()
            elif fault == "bandwidth":
                self.unbandwidth()
            elif fault.startswith("link-down-"):
                self.link_up(end=fault.removeprefix("link-down-"))

    # tether and the tools ---------------------------------------------------------------

    def _admin(self, proc: HostProc, role: str, name: str) -> int:
        match, _ = proc.expect(rf"^{role} {re.escape(name)} admin endpoint on port (\d+)$",
                               stream="stderr")
        return int(match.group(1))

    def gateway(self, name: str = "gw", *args: str) -> Daemon:
        """`tether gateway --listen IP:0 --name NAME ARGS...`, once it listens."""
        proc = self.tether(f"gateway {name}", "gateway", "--listen", f"{self.ip}:0",
                           "--name", name, *args)
        match, _ = proc.expect(rf"^gateway {re.escape(name)} listening on port (\d+)$",
                               stream="stderr")
        admin = self._admin(proc, "gateway", name)
        return Daemon(proc, self, "gateway", name, admin_port=admin, port=int(match.group(1)))

    def agent(self, gateway: str | Daemon, services: Sequence[str], *, name: str = "agent",
              liveness: float | None = None, args: Sequence[str] = ()) -> Daemon:
        """`tether agent --forward 127.0.0.1:0=SVC...`, once it forwards every service
        (the ports, on the host's loopback, are in `Daemon.ports`)."""
        gw = gateway.address if isinstance(gateway, Daemon) else gateway
        argv = ["agent", "--gateway", gw, "--name", name]
        for service in services:
            argv += ["--forward", f"127.0.0.1:0={service}"]
        if liveness is not None:
            argv += ["--liveness", str(liveness)]
        proc = self.tether(f"agent {name}", *argv, *args)
        ports = {}
        for service in services:
            match, _ = proc.expect(rf"^agent {re.escape(name)} forwarding 127\.0\.0\.1:(\d+) "
                                   rf"to {re.escape(service)}$", stream="stderr")
            ports[service] = int(match.group(1))
        admin = self._admin(proc, "agent", name)
        return Daemon(proc, self, "agent", name, admin_port=admin, ports=ports)

    def connector(self, gateway: str | Daemon, services: dict[str, str], *,
                  name: str = "connector", liveness: float | None = None,
                  args: Sequence[str] = (), registered_at: Daemon | None = None) -> Daemon:
        """`tether connector --service SVC=HOST:PORT...`, once serving; with
        `registered_at` (the gateway), once that gateway logged every REGISTER."""
        gw = gateway.address if isinstance(gateway, Daemon) else gateway
        argv = ["connector", "--gateway", gw, "--name", name]
        for service, address in services.items():
            argv += ["--service", f"{service}={address}"]
        if liveness is not None:
            argv += ["--liveness", str(liveness)]
        proc = self.tether(f"connector {name}", *argv, *args)
        proc.expect(rf"^connector {re.escape(name)} serving ", stream="stderr")
        admin = self._admin(proc, "connector", name)
        registrar = registered_at or (gateway if isinstance(gateway, Daemon) else None)
        if registrar is not None:
            for service in services:
                registrar.proc.expect(rf"\b{re.escape(name)} registered service "
                                      rf"{re.escape(service)}$", stream="stderr")
        return Daemon(proc, self, "connector", name, admin_port=admin)

    def oecho_server(self, gateway: str | Daemon, *, name: str = "oecho-server",
                     liveness: float | None = None, hold: bool = False,
                     registered_at: Daemon | None = None) -> HostProc:
        """`examples/oecho.py server`, once it printed "ready" and the gateway (`gateway`
        or `registered_at`) logged its REGISTER."""
        gw = gateway.address if isinstance(gateway, Daemon) else gateway
        argv = [sys.executable, str(OECHO), "server", "--gateway", gw, "--name", name]
        if liveness is not None:
            argv += ["--liveness", str(liveness)]
        if hold:
            argv.append("--hold")
        proc = self.run(name, argv)
        proc.expect(r"^ready$")
        registrar = registered_at or (gateway if isinstance(gateway, Daemon) else None)
        if registrar is not None:
            registrar.proc.expect(rf"\b{re.escape(name)} registered service oecho$",
                                  stream="stderr")
        return proc

    def oecho_client(self, gateway: str | Daemon, *, name: str = "oecho-client",
                     liveness: float | None = None) -> HostProc:
        """`examples/oecho.py client` (it runs on its own: `expect` its lines)."""
        gw = gateway.address if isinstance(gateway, Daemon) else gateway
        argv = [sys.executable, str(OECHO), "client", "--gateway", gw, "--name", name]
        if liveness is not None:
            argv += ["--liveness", str(liveness)]
        return self.run(name, argv)

    def echo_server(self, *, sink: bool = False, name: str | None = None) -> Server:
        """The `echo` tool on IP:0 (with `sink`, it reads and discards, and reports the
        byte count and SHA-256 of each connection at its EOF). Commands on stdin."""
        label = name or ("sink" if sink else "echo")
        args = ["--listen", f"{self.ip}:0"] + (["--sink"] if sink else [])
        proc = self.tool(label, "echo", *args, stdin=True)
        match, _ = proc.expect(r"^listening on port (\d+)$", stream="stderr")
        return Server(proc, self, int(match.group(1)))

    def delayer(self, connect: str, *, delay: float, jitter: float = 0.0,
                seed: int | None = None, only: str | None = None, public: bool = False,
                name: str = "delayer") -> Server:
        """tests/hosts/delayer.py in this host, relaying to `connect` with `delay` ±
        `jitter` (in the direction `only`, "up" or "down", if given). It listens on
        127.0.0.1 (for the host's own programs), or with `public` on the host's address.
        `Server.address` is where to connect to it."""
        listen = f"{self.ip}:0" if public else "127.0.0.1:0"
        args = ["--listen", listen, "--connect", connect, "--delay", str(delay),
                "--jitter", str(jitter)]
        if seed is not None:
            args += ["--seed", str(seed)]
        if only is not None:
            args += ["--only", only]
        proc = self.run(name, [sys.executable, str(DELAYER), *args])
        match, _ = proc.expect(r"^delayer listening on port (\d+)$", stream="stderr")
        return Server(proc, self, int(match.group(1)), None if public else "127.0.0.1")


# ------------------------------------------------------------------------------ the rig

class Rig:
    """N hosts on one bridge. `Rig(3)` names them h0, h1, h2; `Rig(["a", "b"])` by name.
    A context manager; see the module docstring."""

    def __init__(self, hosts: int | Sequence[str] = 2) -> None:
        names = [f"h{i}" for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        if not 1 <= len(names) <= 200 or len(set(names)) != len(names):
            raise ValueError(f"hosts must be 1 to 200 distinct names, got {names!r}")
        letter = "abcdefghijklmnopqrstuvwxyz"[next(_serial) % 26]
        self.prefix = f"{PREFIX}{letter}"
        self.switch_ns = f"{self.prefix}sw"
        self.bridge = f"{self.prefix}br"
        self.hosts = {name: Host(self, name, i) for i, name in enumerate(names)}
        self.procs: list[HostProc] = []
        self.namespaces: list[str] = []
        self.closed = False

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    def __enter__(self) -> Rig:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(raise_leftovers=exc is None)

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def up(self) -> None:
        """Create the switch, the hosts and their links."""
        _open_rigs.add(self)
        self._add_ns(self.switch_ns)
        sw = self.switch_ns
        _run(["ip", "-n", sw, "link", "add", self.bridge, "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", self.bridge, "up"])
        for host in self.hosts.values():
            self._add_ns(host.ns)
            _run(["ip", "link", "add", host.iface, "netns", host.ns, "type", "veth",
                  "peer", "name", host.switch_port, "netns", sw])
            _run(["ip", "-n", sw, "link", "set", host.switch_port, "master", self.bridge])
            _run(["ip", "-n", sw, "link", "set", host.switch_port, "up"])
            _run(["ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", host.iface])
            _run(["ip", "-n", host.ns, "link", "set", host.iface, "up"])

    def _start(self, host: Host, name: str, argv: Sequence[str], *, stdin: bool) -> HostProc:
        return self._start_in(host.ns, f"{name}@{host.name}", argv, stdin=stdin)

    def _start_in(self, ns: str, name: str, argv: Sequence[str], *,
                  stdin: bool = False) -> HostProc:
        if self.closed:
            raise RuntimeError("the rig is closed")
        proc = HostProc(name, ns, argv, stdin=stdin)
        self.procs.append(proc)
        return proc

    def reset(self) -> None:
        """End every process started so far and lift every fault: the hosts as new, for
        the next trial of a benchmark (the namespaces stay)."""
        for proc in self.procs:
            proc.kill_group()
        while self.procs:
            self.procs.pop().close()
        for host in self.hosts.values():
            host.lift()

    def describe(self) -> str:
        """Every process's recent output, for failure messages."""
        return "\n".join(f"{p.name} (pid {p.pid}, rc={p.popen.poll()}):\n{p.output(30)}"
                         for p in self.procs)

    def close(self, *, raise_leftovers: bool = True) -> None:
        """End every process, delete every namespace, check nothing is left. Idempotent."""
        if self.closed:
            return
        self.closed = True
        errors: list[str] = []
        for proc in self.procs:  # first end them all, and what they started ...
            proc.kill_group()
        for ns in self.namespaces:
            for pid in _netns_pids(ns):
                _kill_pid(pid)
        while self.procs:  # ... then reap them and close their pipes
            proc = self.procs.pop()
            try:
                proc.close()
            except Exception as exc:  # keep going: the namespaces must go
                errors.append(f"closing {proc.name}: {exc!r}")
        for ns in self.namespaces:
            for pid in _netns_pids(ns):  # anything started in there since
                _kill_pid(pid)
        for ns in reversed(self.namespaces):
            result = _run(["ip", "netns", "del", ns], check=False)
            if result.returncode != 0:
                errors.append(f"ip netns del {ns}: {result.stderr.strip()}")
        self.namespaces.clear()
        _open_rigs.discard(self)
        left = leftovers(self.prefix)
        if left:
            errors.append(f"left behind: {', '.join(left)}")
        if errors and raise_leftovers:
            raise RuntimeError("rig teardown: " + "; ".join(errors))


@atexit.register
def _close_open_rigs() -> None:  # a rig used without its context manager
    for rig in list(_open_rigs):
        with contextlib.suppress(Exception):
            rig.close(raise_leftovers=False)


# ------------------------------------------------------------------------------ tools
# `python tests/hosts/rig.py TOOL ARGS...`: small TCP programs run inside the hosts. Plain
# asyncio (no tether), standard library only. Every event is one stdout line, with
# `t=` the time.monotonic() at which it happened (the clock is shared by all namespaces).

def _now() -> str:
    return f"t={time.monotonic():.4f}"


def _say(*parts: object) -> None:
    print(*parts, flush=True)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def _stdin_commands(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """Lines of stdin, as a queue (None at EOF), read by a daemon thread."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line.strip())
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=reader, daemon=True).start()
    return queue


def _rst(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    transport.abort()  # type: ignore[attr-defined]


class _EchoConn(asyncio.Protocol):
    serial = 0

    def __init__(self, conns: dict[int, _EchoConn], sink: bool) -> None:
        _EchoConn.serial += 1
        self.id = _EchoConn.serial
        self.conns = conns
        self.sink = sink
        self.bytes = 0
        self.sha = hashlib.sha256()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conns[self.id] = self
        _say(f"conn {self.id} from {transport.get_extra_info('peername')} {_now()}")

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.sink:
            self.sha.update(data)
        elif self.transport is not None:
            self.transport.write(data)

    def eof_received(self) -> bool:
        extra = f" sha256={self.sha.hexdigest()}" if self.sink else ""
        _say(f"eof {self.id} bytes={self.bytes}{extra} {_now()}")
        return False  # close (after what was written): the peer has finished

    def connection_lost(self, exc: Exception | None) -> None:
        self.conns.pop(self.id, None)
        what = f"reset {self.id} err={type(exc).__name__}" if exc is not None \
            else f"closed {self.id}"
        _say(f"{what} bytes={self.bytes} {_now()}")


async def _tool_echo(args: argparse.Namespace) -> None:
    """TCP echo (or `--sink`) server. stdin: `close ID|all`, `reset ID|all`."""
    loop = asyncio.get_running_loop()
    conns: dict[int, _EchoConn] = {}
    server = await loop.create_server(lambda: _EchoConn(conns, args.sink), *_addr(args.listen))
    print(f"listening on port {server.sockets[0].getsockname()[1]}", file=sys.stderr,
          flush=True)
    commands = _stdin_commands(loop)
    while (command := await commands.get()) is not None:
        verb, _, which = command.partition(" ")
        targets = list(conns.values()) if which == "all" else \
            [c for c in conns.values() if str(c.id) == which]
        for conn in targets:
            if conn.transport is None:
                continue
            if verb == "close":
                conn.transport.close()
            elif verb == "reset":
                _rst(conn.transport)
        _say(f"did {command} on {len(targets)} {_now()}")
    await asyncio.Event().wait()  # stdin closed: keep serving until killed


class _AppConn(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        _say(f"recv {data!r} {_now()}")

    def eof_received(self) -> bool:
        _say(f"eof {_now()}")
        return True  # keep our write side: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            _say(f"reset err={type(exc).__name__} {_now()}")
        else:
            _say(f"closed {_now()}")
        if not self.done.done():
            self.done.set_result(None)


async def _tool_app(args: argparse.Namespace) -> None:
    """An application's TCP connection, driven by stdin: `send TEXT`, `shutdown`
    (half-close), `close`, `reset`, `quit`."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    try:
        transport, _ = await loop.create_connection(lambda: _AppConn(done), *_addr(args.connect))
    except OSError as exc:
        _say(f"connect failed err={type(exc).__name__} {exc} {_now()}")
        return
    _say(f"connected {_now()}")
    commands = _stdin_commands(loop)
    while (command := await commands.get()) is not None:
        verb, _, rest = command.partition(" ")
        if verb == "send" and not transport.is_closing():
            transport.write(rest.encode() + b"\n")
        elif verb == "shutdown" and not transport.is_closing():
            transport.write_eof()
        elif verb == "close":
            transport.close()
        elif verb == "reset":
            _rst(transport)
        elif verb == "quit":
            break
        _say(f"did {verb} {_now()}")
    transport.abort()


async def _tool_ping(args: argparse.Namespace) -> int:
    """Request/reply over one connection to an echo server: a numbered line every
    `--interval` for `--seconds`; one `rtt SEQ SECONDS` line per reply, then a JSON
    summary (max RTT, max gap between two replies)."""
    try:
        reader, writer = await asyncio.open_connection(*_addr(args.connect))
    except OSError as exc:
        _say(f"connect failed err={type(exc).__name__} {exc} {_now()}")
        return 1
    _say(f"connected {_now()}")
    rtts: list[float] = []
    gaps: list[float] = []
    last_reply = time.monotonic()
    start = time.monotonic()
    pad = "x" * max(0, args.size - 12)
    error = None
    seq = 0
    try:
        while time.monotonic() - start < args.seconds:
            seq += 1
            t0 = time.monotonic()
            writer.write(f"{seq} {pad}\n".encode())
            line = await asyncio.wait_for(reader.readline(), args.timeout)
            t1 = time.monotonic()
            if not line:
                error = "eof"
                break
            if int(line.split()[0]) != seq:
                error = f"out of order: got {line[:20]!r} for {seq}"
                break
            rtts.append(t1 - t0)
            gaps.append(t1 - last_reply)
            last_reply = t1
            _say(f"rtt {seq} {t1 - t0:.4f} {_now()}")
            await asyncio.sleep(max(0.0, t0 + args.interval - time.monotonic()))
    except (OSError, TimeoutError) as exc:
        error = f"{type(exc).__name__} {exc}"
    summary: dict[str, Any] = {
        "sent": seq, "received": len(rtts), "error": error,
        "max_rtt": round(max(rtts, default=0.0), 4),
        "p50_rtt": round(statistics.median(rtts), 4) if rtts else None,
        "max_gap": round(max(gaps, default=0.0), 4)}
    _say(json.dumps(summary))
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return 0 if error is None else 1


async def _tool_bulk(args: argparse.Namespace) -> int:
    """Send pseudo-random bytes (seeded) as fast as the connection takes them, for
    `--bytes` or `--seconds`, then half-close; with `--echo`, read them back and compare.
    Prints `progress` lines every second and a JSON summary with SHA-256s."""
    sock = socket.socket()
    if args.sndbuf:  # keep the kernel from absorbing megabytes before backpressure shows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args.sndbuf)
    try:
        await asyncio.get_running_loop().sock_connect(sock, _addr(args.connect))
        reader, writer = await asyncio.open_connection(sock=sock)
    except OSError as exc:
        sock.close()
        _say(f"connect failed err={type(exc).__name__} {exc} {_now()}")
        return 1
    _say(f"connected {_now()}")
    if args.start_after:
        await asyncio.sleep(args.start_after)
    rng = random.Random(args.seed)
    block = rng.randbytes(65536)
    sent_sha = hashlib.sha256()
    got_sha = hashlib.sha256()
    counts = {"sent": 0, "received": 0}
    start = time.monotonic()

    async def receive() -> None:
        while data := await reader.read(65536):
            counts["received"] += len(data)
            got_sha.update(data)

    async def progress() -> None:
        while True:
            await asyncio.sleep(1.0)
            _say(f"progress sent={counts['sent']} received={counts['received']} {_now()}")

    receiver = asyncio.ensure_future(receive())
    ticker = asyncio.ensure_future(progress())
    error = None
    try:
        i = 0
        while (args.bytes is None or counts["sent"] < args.bytes) and \
                (args.seconds is None or time.monotonic() - start < args.seconds):
            chunk = block[i % 7:] + block[:i % 7]  # vary the data a little per chunk
            if args.bytes is not None:
                chunk = chunk[:args.bytes - counts["sent"]]
            writer.write(chunk)
            sent_sha.update(chunk)
            counts["sent"] += len(chunk)
            i += 1
            if args.seconds is None:
                await writer.drain()
                continue
            try:  # blocked by backpressure past the end of the sending time: stop there
                await asyncio.wait_for(writer.drain(),
                                       max(0.0, start + args.seconds - time.monotonic()))
            except TimeoutError:
                break
        writer.write_eof()
        _say(f"sent all {counts['sent']} {_now()}")
        await asyncio.wait_for(receiver, args.timeout)
    except (OSError, TimeoutError) as exc:
        error = f"{type(exc).__name__} {exc}"
    finally:
        ticker.cancel()
        receiver.cancel()
        await asyncio.gather(ticker, receiver, return_exceptions=True)
    summary = {"sent": counts["sent"], "sent_sha256": sent_sha.hexdigest(),
               "received": counts["received"], "received_sha256": got_sha.hexdigest(),
               "seconds": round(time.monotonic() - start, 3), "error": error}
    _say(json.dumps(summary))
    if error is not None:  # do not wait for what is still buffered to drain
        writer.transport.abort()
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return 0 if error is None else 1


def _tool_tcpwait(args: argparse.Namespace) -> int:
    """Plain TCP, the baseline: connect, send a line, read the echo, then block in recv()
    (for at most `--bound` seconds) and report how that read ended and when. With
    `--keepalive IDLE,INTVL,CNT` (whole seconds, the kernel's unit) and/or
    `--user-timeout MS`, the kernel's own dead-peer detection is tuned."""
    sock = socket.create_connection(_addr(args.connect), timeout=10)
    if args.keepalive:
        idle, intvl, cnt = (int(x) for x in args.keepalive.split(","))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt)
    if args.user_timeout:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, args.user_timeout)
    sock.sendall(b"hi\n")
    reply = sock.recv(100)
    _say(f"reply: {reply!r} {_now()}")
    t0 = time.monotonic()
    sock.settimeout(args.bound)
    try:
        data = sock.recv(100)
        what = "EOF" if not data else f"data {data!r}"
    except OSError as exc:  # (the kernel's ETIMEDOUT is a TimeoutError too: errno 110)
        what = "bound" if exc.errno is None else f"{type(exc).__name__} errno={exc.errno}"
    _say(f"second read: {what} after={time.monotonic() - t0:.4f}s {_now()}")
    sock.close()
    return 0


def _tool_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rig.py", description="TCP tools for the hosts")
    sub = parser.add_subparsers(dest="tool", required=True)
    p = sub.add_parser("echo")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--sink", action="store_true")
    p = sub.add_parser("app")
    p.add_argument("--connect", required=True)
    p = sub.add_parser("ping")
    p.add_argument("--connect", required=True)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--timeout", type=float, default=30.0)
    p = sub.add_parser("bulk")
    p.add_argument("--connect", required=True)
    p.add_argument("--bytes", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--sndbuf", type=int, default=0, help="SO_SNDBUF (0: the kernel's)")
    p.add_argument("--start-after", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long after connecting before sending")
    p = sub.add_parser("tcpwait")
    p.add_argument("--connect", required=True)
    p.add_argument("--keepalive", default=None, metavar="IDLE,INTVL,CNT")
    p.add_argument("--user-timeout", type=int, default=0, metavar="MS")
    p.add_argument("--bound", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.tool == "tcpwait":
        return _tool_tcpwait(args)
    tools = {"echo": _tool_echo, "app": _tool_app, "ping": _tool_ping, "bulk": _tool_bulk}
    result = asyncio.run(tools[args.tool](args))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(_tool_main())
