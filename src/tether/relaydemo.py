"""The relay demo (`make run`): a gateway, a connector, an agent and an HTTP server,
each a real process on loopback, and a page fetched through the tunnel.

    client --TCP--> agent ==flow==> gateway ==flow==> connector --TCP--> HTTP server

It fetches a page (the server ends the response: the cascade runs server -> client),
then opens a connection and closes it from the client before any reply (the cascade
runs client -> server), prints each daemon's flow log lines as they happen, shows
`tether status` of the gateway, and stops everything it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["main"]

_INTERESTING = re.compile(r"flow |listening|forwarding|serving|registered|connected from")
_OUTPUT = threading.Lock()


def _say(text: str) -> None:
    """Print one whole line: the daemons' log pumps print from their threads too, and
    `print` writes the text and its newline apart."""
    with _OUTPUT:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


class _Daemon:
    """A child process whose stderr lines are echoed with a prefix as they arrive."""

    def __init__(self, label: str, argv: list[str]) -> None:
        self.label = label
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip()
            with self._ready:
                self.lines.append(line)
                self._ready.notify_all()
            text = line.split(": ", 1)[-1] if " INFO " in line or " WARNING " in line else line
            if _INTERESTING.search(text):
                _say(f"  [{self.label:9}] {text}")

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first line matching `pattern`; raises if it does not come in time."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._ready:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.label} did not print {pattern!r}: "
                                       f"{self.lines[-5:]}")
                self._ready.wait(left)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go within 5 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(2)


@contextlib.contextmanager
def _daemons() -> Iterator[list[_Daemon]]:
    started: list[_Daemon] = []
    try:
        yield started
    finally:
        for daemon in reversed(started):
            daemon.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> int:
    """Run the demo; 0 if the page came through and every flow ended."""
    tether = [sys.executable, "-m", "tether.cli", "--log-level", "INFO"]
    env_note = "uvloop" if _has_uvloop() else "asyncio"
    _say(f"tether relay demo ({env_note}): client -> agent -> gateway -> connector -> "
         "HTTP server\n")
    with tempfile.TemporaryDirectory() as root, _daemons() as running:
        Path(root, "index.html").write_text("<h1>hello through tether</h1>\n" + "x" * 50_000)
        web_port = _free_port()
        web = _Daemon("http", [sys.executable, "-m", "http.server", str(web_port),
                               "--bind", "127.0.0.1", "--directory", root])
        running.append(web)
        gw = _Daemon("gateway", [*tether, "gateway", "--listen", "127.0.0.1:0",
                                 "--name", "gw1"])
        running.append(gw)
        gw_port = int(gw.wait_for(r"listening on port (\d+)")[1])
        admin_port = int(gw.wait_for(r"admin endpoint on port (\d+)")[1])
        gateway = f"127.0.0.1:{gw_port}"
        connector = _Daemon("connector", [*tether, "connector", "--gateway", gateway,
                                          "--service", f"web=127.0.0.1:{web_port}"])
        running.append(connector)
        gw.wait_for(r"registered service web")
        agent = _Daemon("agent", [*tether, "agent", "--gateway", gateway,
                                  "--forward", "127.0.0.1:0=web"])
        running.append(agent)
        app_port = int(agent.wait_for(r"forwarding 127\.0\.0\.1:(\d+) to web")[1])

        _say("\n1. GET / through the tunnel; the server ends the response "
             "(cascade server -> client):")
        with urllib.request.urlopen(f"http://127.0.0.1:{app_port}/", timeout=10) as reply:
            body = reply.read()
        _say(f"   got HTTP {reply.status}, {len(body)} bytes: {body[:30]!r}...")
        agent.wait_for(r"flow 1@agent ended")
        connector.wait_for(r"flow 1@connector ended")

        _say("\n2. a client sends 'GET /' and closes its socket at once (cascade client -> "
             "server: the server reads EOF, answers, and everything closes):")
        with socket.create_connection(("127.0.0.1", app_port), timeout=5) as sock:
            sock.sendall(b"GET /")
        agent.wait_for(r"flow 2@agent ended")
        connector.wait_for(r"flow 2@connector ended")

        _say("\n3. tether status of the gateway (every flow ended):")
        status = subprocess.run([*tether, "status", f"127.0.0.1:{admin_port}"],
                                capture_output=True, text=True, timeout=10, check=True)
        for line in status.stdout.splitlines():
            if any(k in line for k in ('"links"', '"flows"', "opened", "spliced", "ended")):
                _say("  " + line.strip())
        ok = '"flows": 0' in status.stdout and reply.status == 200
        _say("\nstopping everything")
    _say("done" if ok else "FAILED")
    return 0 if ok else 1


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover
        return False
    return True


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
