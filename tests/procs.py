"""Real processes for the end-to-end tests: the `tether gateway` CLI and examples/oecho.py.

    with ProcGroup() as procs:
        gw = procs.gateway()                      # waits for "listening on port N"
        server = procs.oecho_server(gw, hold=True)  # waits for "ready" and the REGISTER
        client = procs.oecho_client(gw, liveness=1.0)
        line = client.expect(r"^reply: ")         # the time the line arrived: line.t

Every process is started with `sys.executable` (the venv's Python), its stdout and
stderr are read line by line by one thread each, and every line is kept with the
`time.monotonic()` at which it arrived, so that a test can time what a process printed
against what it did to another one (SIGKILL, SIGSTOP). Readiness is awaited by
reading lines, with a timeout, never by sleeping.

`ProcGroup.__exit__` ends every process it started, by PID, even when the test failed:
SIGCONT first for a stopped one, then SIGKILL, then `wait()`; it joins the reader
threads and closes the pipes (no ResourceWarning, no zombie).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["OECHO", "ROOT", "GatewayProc", "Line", "Proc", "ProcGroup", "tether_argv"]

ROOT = Path(__file__).resolve().parent.parent
OECHO = ROOT / "examples" / "oecho.py"

# Starting a Python process that imports tether (and uvloop) takes a fraction of a
# second; on a loaded CI machine it can take a few.
READY_TIMEOUT = 20.0
# How long a killed process may take to be reaped, and a reader thread to see EOF.
REAP_TIMEOUT = 10.0


def tether_argv(*args: str) -> list[str]:
    """The command line of `tether ARGS...`, run by this interpreter."""
    return [sys.executable, "-m", "tether.cli", *args]


@dataclass(frozen=True)
class Line:
    """One line a process printed: which stream, when it arrived here, its text."""

    stream: str
    t: float
    text: str


def _proc_state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, T, ...), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


class Proc:
    """One running process, its output lines timestamped as they arrive."""

    def __init__(self, name: str, argv: Sequence[str], *, cwd: Path = ROOT,
                 stdin: bool = False, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv, cwd=cwd, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True)
        self.pid = self.popen.pid
        self.stopped = False
        self._lines: list[Line] = []
        self._cursor = {"stdout": 0, "stderr": 0}
        self._eof = {"stdout": False, "stderr": False}
        self._cond = threading.Condition()
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=("stdout", self.popen.stdout),
                             name=f"{name}-stdout", daemon=True),
            threading.Thread(target=self._pump, args=("stderr", self.popen.stderr),
                             name=f"{name}-stderr", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self.popen.returncode}>"

    def _pump(self, stream: str, pipe: IO[bytes]) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                line = Line(stream, time.monotonic(),
                            raw.decode(errors="replace").rstrip("\r\n"))
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
        except (OSError, ValueError):  # the pipe was closed under us at teardown
            pass
        finally:
            with self._cond:
                self._eof[stream] = True
                self._cond.notify_all()

    # output ---------------------------------------------------------------------------

    def lines(self, stream: str | None = None) -> list[Line]:
        """Every line received so far (of one stream, or both)."""
        with self._cond:
            return [ln for ln in self._lines if stream is None or ln.stream == stream]

    def output(self, last: int = 200) -> str:
        """The last `last` lines received, for failure messages."""
        lines = self.lines()[-last:]
        return "\n".join(f"  [{ln.stream}] {ln.text}" for ln in lines) or "  (nothing)"

    def find(self, pattern: str, stream: str = "stdout") -> list[re.Match[str]]:
        """Every line so far matching `pattern`, without moving `expect`'s cursor."""
        regex = re.compile(pattern)
        return [m for ln in self.lines(stream) if (m := regex.search(ln.text)) is not None]

    def json_lines(self, stream: str = "stdout") -> list[dict[str, Any]]:
        """Every line so far that is a JSON object."""
        found = []
        for ln in self.lines(stream):
            if ln.text.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(ln.text))
        return found

    def expect(self, pattern: str, *, stream: str = "stdout",
               timeout: float = READY_TIMEOUT) -> tuple[re.Match[str], Line]:
        """Wait for the next line of `stream` (after the last one `expect` matched there)
        that matches `pattern` (`re.search`). Fails with the process's output if the
        line does not come within `timeout` or the stream ends first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                mine = [ln for ln in self._lines if ln.stream == stream]
                for i in range(self._cursor[stream], len(mine)):
                    match = regex.search(mine[i].text)
                    if match is not None:
                        self._cursor[stream] = i + 1
                        return match, mine[i]
                self._cursor[stream] = len(mine)
                if self._eof[stream]:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        why = "its output ended" if self._eof[stream] else f"not within {timeout:g}s"
        raise AssertionError(f"{self.name} (pid {self.pid}): no {stream} line matching "
                             f"{pattern!r}: {why}; rc={self.popen.poll()}; output:\n"
                             f"{self.output()}")

    # input and signals ----------------------------------------------------------------

    def send(self, line: str) -> float:
        """Write one command line to the process's stdin (started with stdin=True);
        returns the `time.monotonic()` just after."""
        assert self.popen.stdin is not None, f"{self.name} was started without stdin"
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()
        return time.monotonic()

    def kill(self) -> float:
        """SIGKILL; returns the `time.monotonic()` just after the signal was sent. A
        stopped process dies as it is: a SIGCONT first would let it run, and act on what
        reached it while it was stopped, before the SIGKILL lands."""
        self.popen.send_signal(signal.SIGKILL)
        self.stopped = False
        return time.monotonic()

    def stop(self) -> float:
        """SIGSTOP (freeze); returns the `time.monotonic()` just after it was sent, once
        the process is stopped (a signal is delivered when the process next runs: on a
        loaded machine it could still act on what the test does next)."""
        self.popen.send_signal(signal.SIGSTOP)
        t = time.monotonic()
        self.stopped = True
        deadline = t + 2.0
        while _proc_state(self.pid) not in ("T", "t", None) and time.monotonic() < deadline:
            time.sleep(0.001)
        return t

    def cont(self) -> float:
        """SIGCONT (thaw); returns the `time.monotonic()` just after."""
        self.popen.send_signal(signal.SIGCONT)
        self.stopped = False
        return time.monotonic()

    def terminate(self, timeout: float = REAP_TIMEOUT) -> int | None:
        """SIGTERM and wait (a daemon's clean shutdown); None if it did not exit."""
        if self.popen.poll() is None:
            if self.stopped:
                self.cont()
            self.popen.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.popen.wait(timeout)
        return None

    @property
    def running(self) -> bool:
        """The process has not exited."""
        return self.popen.poll() is None

    def wait(self, timeout: float = READY_TIMEOUT) -> int:
        """Wait for the process to exit on its own; fails with its output if it does not."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} (pid {self.pid}) still running after "
                                 f"{timeout:g}s; output:\n{self.output()}") from None

    def close(self) -> None:
        """End the process (SIGCONT if stopped, SIGKILL), reap it, join its readers and
        close its pipes. Idempotent; safe whatever state the process is in."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if self.stopped:
                    self.cont()
                self.popen.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):  # a kernel in trouble
                self.popen.wait(REAP_TIMEOUT)
        self.stopped = False
        for thread in self._threads:
            thread.join(REAP_TIMEOUT)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


class ProcGroup:
    """Starts processes and ends every one of them on exit. See the module docstring."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def __enter__(self) -> ProcGroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """End every process started here, last started first."""
        errors: list[BaseException] = []
        while self.procs:
            proc = self.procs.pop()
            try:
                proc.close()
            except BaseException as e:  # pragma: no cover - keep ending the others
                errors.append(e)
        if errors:
            raise errors[0]

    def describe(self) -> str:
        """The output of every process, for failure messages."""
        return "\n".join(f"{p.name} (pid {p.pid}, rc={p.popen.poll()}):\n{p.output()}"
                         for p in self.procs)

    def start(self, name: str, argv: Sequence[str]) -> Proc:
        """Start `argv`; it is ended when the group closes."""
        proc = Proc(name, argv)
        self.procs.append(proc)
        return proc

    def gateway(self, *args: str, name: str = "gw") -> GatewayProc:
        """`tether gateway --listen 127.0.0.1:0 --name NAME ARGS...`, once it listens."""
        proc = self.start(f"gateway {name}",
                          tether_argv("gateway", "--listen", "127.0.0.1:0", "--name", name,
                                      *args))
        match, _ = proc.expect(rf"^gateway {re.escape(name)} listening on port (\d+)$",
                               stream="stderr")
        return GatewayProc(proc, name, int(match.group(1)))

    def oecho_server(self, gw: GatewayProc, *, name: str = "oecho-server",
                     liveness: float | None = None, hold: bool = False) -> Proc:
        """`oecho.py server`, once it printed "ready" *and* the gateway logged its
        REGISTER (the server prints "ready" when it sent it, not when it arrived)."""
        argv = [sys.executable, str(OECHO), "server", "--gateway", gw.address,
                "--name", name]
        if liveness is not None:
            argv += ["--liveness", str(liveness)]
        if hold:
            argv.append("--hold")
        proc = self.start(name, argv)
        proc.expect(r"^ready$")
        gw.proc.expect(rf"\b{re.escape(name)} registered service oecho$", stream="stderr")
        return proc

    def oecho_client(self, gw: GatewayProc, *, name: str = "oecho-client",
                     liveness: float | None = None) -> Proc:
        """`oecho.py client` (it runs on its own; `expect` its lines)."""
        argv = [sys.executable, str(OECHO), "client", "--gateway", gw.address,
                "--name", name]
        if liveness is not None:
            argv += ["--liveness", str(liveness)]
        return self.start(name, argv)


@dataclass(frozen=True)
class GatewayProc:
    """A running `tether gateway` process and where it listens."""

    proc: Proc
    name: str
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"
