"""A mesh node as an OS process, for the multi-process tests; and a TCP proxy that cuts.

As a script::

    python tests/meshnode.py --name A --listen 127.0.0.1:7001 --peer B=127.0.0.1:7002 \\
        [--servers A,B] [--liveness 1] [--establish-timeout 5] [--retry-interval 0.2] \\
        [--send B --count 10000 --rate 2500] [--broadcast --custom B,C]

prints, on stdout, one line per fact the tests check (stdout is unbuffered under
`procs.Proc`, so a line printed before a SIGKILL is never lost):

    ready port=7001 incarnation=...
    recv FROM KIND BODY                      every message the application takes
    failure TO unconfirmed=U numbers=RANGES reason=...
    sent N                                   --send: all N numbers were accepted
    settled                                  every queue is empty (all acknowledged)

and the mesh's log lines on stderr. `--send` sends the numbers 0..count-1 (ASCII) to
one peer, `--rate` per second at most; `--broadcast` does one `broadcast` (kind 1),
one `server_broadcast` (kind 2) and one `custom_broadcast` to `--custom` (kind 3),
each with the body "<variant>:<name>". The node runs until it is killed.

As a module: `Proxy`, a threaded TCP proxy to one port that can cut every connection
it carries (`cut()`), or freeze them (`freeze()`: bytes stop flowing, sockets stay
open, as if the network went silent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import struct
import sys
import threading
import time
from pathlib import Path

try:
    import tether  # noqa: F401
except ImportError:  # run from a checkout without an editable install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from tether.aio import run
from tether.mesh import Mesh


def ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3,7"."""
    out: list[str] = []
    start = prev = None
    for n in numbers:
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
        start = prev = n
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(out) or "-"


def parse_ranges(text: str) -> list[int]:
    """The inverse of `ranges`."""
    if text == "-":
        return []
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


async def _node(args: argparse.Namespace) -> None:
    peers = dict(p.split("=", 1) for p in args.peer)
    mesh = Mesh(args.name, listen=args.listen, peers=peers,
                servers=[s for s in args.servers.split(",") if s],
                liveness=args.liveness, establish_timeout=args.establish_timeout,
                retry_interval=args.retry_interval)
    await mesh.start()
    print(f"ready port={mesh.port} incarnation={mesh.incarnation:016x}", flush=True)

    async def receive() -> None:
        async for m in mesh.messages():
            print(f"recv {m.remote} {m.kind} {m.body.decode()}", flush=True)

    async def report() -> None:
        async for f in mesh.failures():
            numbers = [int(m.body) for m in f.undelivered if m.body.isdigit()]
            print(f"failure {f.remote} unconfirmed={f.unconfirmed} n={len(f.undelivered)} "
                  f"numbers={ranges(numbers)} reason={f.reason}", flush=True)

    async def send() -> None:
        if args.broadcast:
            mesh.broadcast(f"broadcast:{args.name}".encode(), kind=1)
            mesh.server_broadcast(f"server:{args.name}".encode(), kind=2)
            mesh.custom_broadcast([c for c in args.custom.split(",") if c],
                                  f"custom:{args.name}".encode(), kind=3)
        if args.send:
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(args.count):
                if args.rate:
                    delay = start + i / args.rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await mesh.send(args.send, str(i).encode(), kind=7)
            print(f"sent {args.count}", flush=True)
        while any(p.queued for p in mesh.peers().values()):
            await asyncio.sleep(0.02)
        stats = {n: p.counters for n, p in mesh.peers().items()}
        print(f"settled {stats}", flush=True)

    tasks = [asyncio.ensure_future(c) for c in (receive(), report(), send())]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await mesh.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--peer", action="append", default=[], help="NAME=HOST:PORT")
    parser.add_argument("--servers", default="")
    parser.add_argument("--liveness", type=float, default=1.0)
    parser.add_argument("--establish-timeout", type=float, default=5.0)
    parser.add_argument("--retry-interval", type=float, default=0.2)
    parser.add_argument("--send", default="")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--broadcast", action="store_true")
    parser.add_argument("--custom", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        run(_node(args))


# the proxy ---------------------------------------------------------------------------------

class Proxy:
    """Forwards every connection made to `port` to 127.0.0.1:`target`, one thread per
    direction. `cut()` closes every connection it carries (both sockets, at once);
    `freeze()` / `thaw()` stop and resume the bytes without closing anything."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._running = True
        self._flowing = threading.Event()
        self._flowing.set()
        self.cuts = 0  # connections cut
        self.accepted = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept",
                                          daemon=True)
        self._acceptor.start()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while self._running:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if not self._running:
                    client.close()
                    upstream.close()
                    return
                self.accepted += 1
                self._pairs.append((client, upstream))
                for src, dst in ((client, upstream), (upstream, client)):
                    t = threading.Thread(target=self._pump, args=(src, dst), daemon=True,
                                         name="proxy-pump")
                    self._threads.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close_pair(src, dst)

    def _close_pair(self, a: socket.socket, b: socket.socket) -> None:
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._pairs = [p for p in self._pairs if a not in p]
        for s in (a, b):
            s.close()

    def cut(self) -> int:
        """Close every connection now; returns how many there were."""
        with self._lock:
            pairs = list(self._pairs)
            self._pairs.clear()
        for a, b in pairs:
            for s in (a, b):
                # SO_LINGER 0: a reset, as when a middlebox or a cable fails
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        self.cuts += len(pairs)
        return len(pairs)

    def freeze(self) -> None:
        """Stop forwarding (connections stay open, bytes wait)."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Forward again."""
        self._flowing.set()

    def close(self) -> None:
        """Stop accepting, cut everything, join the threads."""
        self._running = False
        self._flowing.set()
        self._acceptor.join(5)
        self._listener.close()
        self.cut()
        deadline = time.monotonic() + 5
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))


if __name__ == "__main__":
    main()
