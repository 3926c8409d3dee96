"""A delaying TCP relay: delay and jitter for the rig, on a kernel without `netem`.

    python tests/hosts/delayer.py --listen 0.0.0.0:0 --connect 10.231.0.2:7443 \
        --delay 0.2 --jitter 0.05

Every connection accepted on `--listen` is relayed to `--connect`. Each chunk read on
one side is written to the other `delay ± jitter` seconds after it arrived (the jitter
uniform, from `--seed`), but never before the chunk read before it: per direction,
`due = max(arrival + delay + uniform(-jitter, jitter), previous due)`, so the byte
stream keeps its order (TCP would anyway) and only the spacing of chunks varies. With
`--only up|down` one direction is delayed and the other relayed at once (two relays,
one at each end of a link, each delaying what arrives over the link, see the gaps of
both directions). The ends are delayed the same way: an EOF is passed on (`write_eof`,
a half-close) after the data before it, and a reset (RST) as a reset (SO_LINGER 0),
`delay` later.

Memory is bounded: a direction holding more than `--max-queued` bytes stops reading
its source until the queue drains (and a destination whose write buffer is full
stops it too), so a fast sender is slowed, not buffered without limit.

It prints "delayer listening on port N" on stderr when ready, and every `--report`
seconds one JSON line per connection on stdout (`t`: time.monotonic()) with, per
direction ("up": client to server, "down": server to client), the chunks and bytes
relayed, the longest gap between two chunks *arriving* so far (`max_gap`, seconds) and
the longest gap that ended since the previous line (`gap`): behind a lossy hop that is
how long TCP held everything back (retransmission timeouts) before the delay was added.

Standard library only (it runs inside a network namespace with the venv's Python).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import struct
import sys
import time
from collections import deque

_LINGER_ZERO = struct.pack("ii", 1, 0)
_EOF = b""  # queued marker: pass the EOF on
_RESET = None  # queued marker: reset the destination


def _parse(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def _reset(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    transport.abort()  # type: ignore[attr-defined]


class Direction:
    """One direction of one relayed connection: a queue of (due, chunk) and its timer."""

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.queued = 0
        self.last_due = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.src_paused = False
        self.dst_full = False
        self.done = False
        self.chunks = 0
        self.bytes = 0
        self.last_arrival: float | None = None
        self.max_gap = 0.0
        self.window_gap = 0.0  # the longest gap ending since the last report

    def push(self, item: bytes | None) -> None:
        """A chunk (or `_EOF`, or `_RESET`) arrived from the source."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if item:
            if self.last_arrival is not None:
                self.max_gap = max(self.max_gap, now - self.last_arrival)
                self.window_gap = max(self.window_gap, now - self.last_arrival)
            self.last_arrival = now
            self.chunks += 1
            self.bytes += len(item)
            self.queued += len(item)
        cfg = self.relay.config
        if cfg.only in (None, self.name):
            due = now + max(0.0, cfg.delay + cfg.rng.uniform(-cfg.jitter, cfg.jitter))
        else:
            due = now
        due = max(due, self.last_due)
        self.last_due = due
        self.queue.append((due, item))
        self._throttle()
        self._arm()

    def _throttle(self) -> None:
        should_pause = self.queued > self.relay.config.max_queued or self.dst_full
        if self.src is None or self.src.is_closing():
            return
        if should_pause and not self.src_paused:
            self.src_paused = True
            self.src.pause_reading()
        elif not should_pause and self.src_paused:
            self.src_paused = False
            self.src.resume_reading()

    def _arm(self) -> None:
        if self.timer is None and self.queue and self.dst is not None:
            self.timer = asyncio.get_running_loop().call_at(self.queue[0][0], self._fire)

    def _fire(self) -> None:
        self.timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        dst = self.dst
        while self.queue and self.queue[0][0] <= now:
            _, item = self.queue.popleft()
            if dst is None or dst.is_closing():
                continue
            if item is _RESET:
                _reset(dst)
                self.done = True
            elif item == _EOF:
                if dst.can_write_eof():
                    dst.write_eof()
                self.done = True
            else:
                self.queued -= len(item)
                dst.write(item)
        self._throttle()
        self._arm()
        self.relay.maybe_close()

    def set_dst_full(self, full: bool) -> None:
        self.dst_full = full
        self._throttle()

    def stats(self) -> dict[str, float | int]:
        """Counts so far; `gap` is the longest gap that ended since the previous call."""
        gap, self.window_gap = self.window_gap, 0.0
        return {"chunks": self.chunks, "bytes": self.bytes, "max_gap": round(self.max_gap, 4),
                "gap": round(gap, 4)}


class Side(asyncio.Protocol):
    """One socket of a relayed connection: what it reads goes into `out`, what is
    queued in `inbound` is written to it."""

    def __init__(self, relay: Relay, out: Direction, inbound: Direction) -> None:
        self.relay = relay
        self.out = out
        self.inbound = inbound
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.out.src = self.transport
        self.inbound.dst = self.transport
        self.inbound._arm()

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self) -> bool:
        self.out.push(_EOF)
        return True  # keep the write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None and not self.out.done:
            self.out.push(_RESET)
        elif not self.out.done and not any(i == _EOF for _, i in self.out.queue):
            self.out.push(_EOF)
        self.relay.maybe_close()

    def pause_writing(self) -> None:
        self.inbound.set_dst_full(True)

    def resume_writing(self) -> None:
        self.inbound.set_dst_full(False)


class Config:
    def __init__(self, args: argparse.Namespace) -> None:
        self.delay: float = args.delay
        self.jitter: float = args.jitter
        self.max_queued: int = args.max_queued
        self.only: str | None = args.only
        self.rng = random.Random(args.seed)
        self.target = _parse(args.connect)


class Relay:
    """One client connection and its upstream connection."""

    serial = 0

    def __init__(self, config: Config, relays: set[Relay]) -> None:
        Relay.serial += 1
        self.id = Relay.serial
        self.config = config
        self.relays = relays
        self.up = Direction(self, "up")
        self.down = Direction(self, "down")
        self.client = Side(self, self.up, self.down)
        self.server: Side | None = None
        self.reported: str | None = None
        relays.add(self)

    async def connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        server = self.server = Side(self, self.down, self.up)
        try:
            await loop.create_connection(lambda: server, *self.config.target)
        except OSError as exc:
            print(f"delayer: cannot connect to {self.config.target}: {exc}", file=sys.stderr,
                  flush=True)
            if self.client.transport is not None:
                _reset(self.client.transport)

    def maybe_close(self) -> None:
        """Close both sockets once both directions have delivered their end."""
        if self.up.done and self.down.done:
            for side in (self.client, self.server):
                if side is not None and side.transport is not None \
                        and not side.transport.is_closing():
                    side.transport.close()
        if self.client.closed and (self.server is None or self.server.closed) \
                and self in self.relays:
            self.relays.discard(self)
            print(json.dumps({"t": round(time.monotonic(), 3), **self.stats(),
                              "closed": True}), flush=True)

    def stats(self) -> dict[str, object]:
        return {"conn": self.id, "up": self.up.stats(), "down": self.down.stats()}


async def main(args: argparse.Namespace) -> None:
    config = Config(args)
    relays: set[Relay] = set()
    loop = asyncio.get_running_loop()

    def accepted() -> Side:
        relay = Relay(config, relays)
        task = loop.create_task(relay.connect_upstream())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return relay.client

    tasks: set[asyncio.Task[None]] = set()
    host, port = _parse(args.listen)
    server = await loop.create_server(accepted, host, port)
    print(f"delayer listening on port {server.sockets[0].getsockname()[1]}", file=sys.stderr,
          flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def report() -> None:
        for relay in sorted(relays, key=lambda r: r.id):
            print(json.dumps({"t": round(time.monotonic(), 3), **relay.stats()}), flush=True)

    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.report)
        report()
    server.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="0.0.0.0:0", metavar="HOST:PORT")
    parser.add_argument("--connect", required=True, metavar="HOST:PORT")
    parser.add_argument("--delay", type=float, default=0.2, metavar="SECONDS")
    parser.add_argument("--jitter", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--only", choices=["up", "down"], default=None,
                        help="delay only this direction (up: client to server); the other "
                             "is relayed at once")
    parser.add_argument("--max-queued", type=int, default=4 << 20, metavar="BYTES")
    parser.add_argument("--report", type=float, default=1.0, metavar="SECONDS",
                        help="print per-connection stats this often")
    args = parser.parse_args(argv)
    if args.jitter < 0 or args.delay < 0:
        parser.error("--delay and --jitter must be >= 0")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
