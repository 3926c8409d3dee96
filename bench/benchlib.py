"""What the benchmarks share: one JSON line per result, the machine's state, the child
processes a benchmark starts (`Proc`, `processes`), and the minimal relay that tether
is measured against.

The minimal relay is an asyncio Protocol splice -- what a relay costs when it does
nothing but pass bytes and ends on: `pause/resume_reading` for backpressure,
`write_eof` for a half-close, `close` for a close, an abort with SO_LINGER 0 for a
reset. `bench/relay.py` chains it (one process per hop) and `bench/flows.py` runs one
beside its gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

__all__ = ["Downstream", "Proc", "Side", "cpu_of", "cpu_pressure", "emit", "processes",
           "set_pad", "source_rev", "start_relay"]

HOST = "127.0.0.1"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
READY_TIMEOUT = 20.0  # how long a child process may take to print that it is ready
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LINGER_ZERO = b"\1\0\0\0\0\0\0\0"


def emit(bench: str, name: str, value: float | None, unit: str, **context: Any) -> None:
    """Print one result as one JSON line (floats to 4 significant digits)."""
    row: dict[str, Any] = {"bench": bench, "name": name, "value": _round(value), "unit": unit}
    row.update({k: _round(v) for k, v in context.items()})
    print(json.dumps(row), flush=True)


def _round(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    if not isinstance(value, float) or value == 0:
        return value
    return float(f"{value:.4g}")


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def source_rev() -> str:
    """The commit benchmarked, with "+dirty" if src/ has uncommitted changes."""
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "src"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def cpu_pressure() -> float | None:
    """/proc/pressure/cpu "some avg10": % of the last 10 s some task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# child processes


class Proc:
    """A child process whose output goes to a file (read for readiness lines): no thread
    of this process reads it, so the daemons' logging costs this process nothing."""

    def __init__(self, name: str, argv: list[str], *, cwd: str = ROOT,
                 env: dict[str, str] | None = None) -> None:
        """`env`: variables set for the child on top of this process's."""
        self.name = name
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.log = tempfile.TemporaryFile("w+", errors="replace")  # noqa: SIM115
        # The child writes through the same open file, whose offset `lines` moves to
        # 0 to read: without O_APPEND its next line overwrote the start of the file.
        fd = self.log.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                      stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.popen.pid

    @property
    def lines(self) -> list[str]:
        self.log.seek(0)
        return self.log.read().splitlines()

    def wait_for(self, pattern: str, timeout: float = READY_TIMEOUT) -> re.Match[str]:
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            self.log.seek(0)
            if m := rx.search(self.log.read()):
                return m
            if time.monotonic() > deadline or self.popen.poll() is not None:
                tail = "\n  ".join(self.lines[-10:])
                raise RuntimeError(f"{self.name} did not print {pattern!r}:\n  {tail}")
            time.sleep(0.01)

    def cpu(self) -> float:
        return cpu_of(self.pid)

    def rss(self) -> int:
        """Resident memory in bytes (VmRSS of /proc/PID/status)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{self.name}: no VmRSS")

    def fds(self) -> int:
        """Open file descriptors (/proc/PID/fd)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> None:
        """SIGTERM (a clean exit: cProfile dumps), then SIGKILL; reap."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(10)
        self.log.close()


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """A list to append every `Proc` started to: each is stopped (by PID, last first)
    when the block ends, however it ends."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for proc in reversed(started):
            proc.stop()


# ---------------------------------------------------------------------------------------
# the minimal relay

_pad = 0.0  # seconds of CPU a side spends before passing an EOF on (`set_pad`)


def set_pad(microseconds: float) -> None:
    """Make every relay side spend this much CPU before it passes an EOF on
    (`bench/relay.py --chain-pad-us`: close latency against per-hop work)."""
    global _pad
    _pad = microseconds / 1e6


class Side(asyncio.Protocol):
    """One socket of a relayed connection; `peer` is the other one."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if _pad:
            until = time.perf_counter() + _pad
            while time.perf_counter() < until:
                pass
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if peer.eof:
                peer.transport.close()
                return False
            peer.transport.write_eof()
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if exc is not None:  # a reset stays a reset
                sock = peer.transport.get_extra_info("socket")
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                peer.transport.abort()
            else:
                peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Downstream(Side):
    """The accepted side: connects to `upstream`, reading nothing until that is done."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream
        self.early: list[bytes] | None = []
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        self.connecting = asyncio.ensure_future(self._connect())

    def data_received(self, data: bytes) -> None:
        if self.early is not None:  # uvloop may deliver before pause_reading applies
            self.early.append(data)
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        if self.early is not None:
            self.early_eof = True
            return True
        return super().eof_received()

    async def _connect(self) -> None:
        up = Side()
        up.peer = self
        try:
            await asyncio.get_running_loop().create_connection(lambda: up, *self.upstream)
        except OSError:
            assert self.transport is not None
            self.transport.close()
            return
        self.peer = up
        assert self.transport is not None and up.transport is not None
        early, self.early = self.early, None
        for data in early or ():
            up.transport.write(data)
        if self.early_eof:
            self.eof_received()
        if not self.transport.is_closing():
            self.transport.resume_reading()
        else:
            up.transport.close()


async def start_relay(upstream: tuple[str, int]) -> asyncio.Server:
    """Listen on HOST, an ephemeral port; relay every connection to `upstream`."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Downstream(upstream), HOST, 0, backlog=1024)


async def at_a_time(n: int, width: int, one: Callable[[], Awaitable[None]]) -> None:
    """``n`` calls of ``one``, ``width`` at a time."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    await asyncio.gather(*(worker() for _ in range(width)))
