"""A packet delay line: per-packet delay and jitter on a host's link, the `netem` the
kernel here lacks.

    ip netns exec SWITCH python tests/hosts/delayline.py --a HOSTPORT --b BRIDGEPORT \
        --delay 0.1 --jitter 0.025 --seed 1

It forwards every Ethernet frame between two interfaces of one namespace, `--a` (the
host's end: the switch side of the host's veth) and `--b` (a new port of the bridge),
in both directions, each frame `delay ± jitter` after it arrived (uniform jitter, from
`--seed`) but never before the frame before it in the same direction:
`due = max(arrival + delay + uniform(-jitter, jitter), previous due)`, so the link
keeps its order and only the spacing varies. Unlike the TCP relay (delayer.py) it
terminates nothing: the hosts' own TCP connections cross it, see the delay in their
round-trip time (and so in their retransmission timeout), and are the ones that lose
packets when the rig drops some.

Frames are read and written with AF_PACKET raw sockets with a virtio-net header
(PACKET_VNET_HDR): a veth hands over TCP segments of up to 64 KiB (segmentation
offload) with their checksum left to be done; the header carries that through, and
the kernel segments and checksums on the way out. A direction holding more than
`--max-queued` bytes drops what arrives (a full router queue).

It also watches, in the frames leaving the host (`--a`), the cumulative
acknowledgement of every TCP connection: when it advances, the host's TCP has just
delivered new bytes in order to its application (give or take a delayed ACK, at most
a few tens of milliseconds while data flows). The longest time between two advances
is how long that connection delivered nothing to the host: behind a lossy hop, how
long TCP held everything back. Every `--report` seconds it prints one JSON line on
stdout (`t`: time.monotonic()) with, per connection "HOST:PORT<PEER:PORT" (bytes
delivered to HOST from PEER), the longest gap that ended since the last line (`gap`)
and since the start (`max_gap`).

It prints "delayline ready" on stderr once both sockets are bound. Standard library
only (it runs inside a network namespace with the venv's Python).
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import selectors
import signal
import socket
import struct
import sys
import time
from collections import deque

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
VNET_HDR_LEN = 10
ETH_HDR_LEN = 14
RECV_SIZE = VNET_HDR_LEN + 65536 + 256


def _open(iface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.bind((iface, ETH_P_ALL))
    sock.setblocking(False)
    return sock


class Acks:
    """Cumulative-ACK advances of the TCP connections leaving the host: delivery gaps."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[int, float]] = {}  # conn -> (ack, when it advanced)
        self.gap: dict[str, float] = {}
        self.max_gap: dict[str, float] = {}

    def see(self, frame: memoryview, now: float) -> None:
        if len(frame) < VNET_HDR_LEN + ETH_HDR_LEN + 40:
            return
        eth = VNET_HDR_LEN
        if frame[eth + 12] != 0x08 or frame[eth + 13] != 0x00:  # IPv4 only
            return
        ip = eth + ETH_HDR_LEN
        if frame[ip + 9] != 6:  # TCP
            return
        tcp = ip + (frame[ip] & 0x0F) * 4
        if len(frame) < tcp + 20 or not frame[tcp + 13] & 0x10:  # ACK flag
            return
        src = socket.inet_ntoa(frame[ip + 12:ip + 16])
        dst = socket.inet_ntoa(frame[ip + 16:ip + 20])
        sport, dport, _, ack = struct.unpack_from("!HHII", frame, tcp)
        conn = f"{src}:{sport}<{dst}:{dport}"
        last = self.last.get(conn)
        if last is None:
            self.last[conn] = (ack, now)
            self.gap.setdefault(conn, 0.0)
            self.max_gap.setdefault(conn, 0.0)
            return
        if 0 < (ack - last[0]) & 0xFFFFFFFF < 0x80000000:
            gap = now - last[1]
            self.gap[conn] = max(self.gap[conn], gap)
            self.max_gap[conn] = max(self.max_gap[conn], gap)
            self.last[conn] = (ack, now)

    def report(self) -> dict[str, dict[str, float]]:
        out = {conn: {"gap": round(self.gap[conn], 4), "max_gap": round(self.max_gap[conn], 4)}
               for conn in sorted(self.last)}
        for conn in self.gap:
            self.gap[conn] = 0.0
        return out


class Direction:
    """Frames from one socket to the other, each held until its due time."""

    def __init__(self, name: str, src: socket.socket, dst: socket.socket,
                 args: argparse.Namespace, rng: random.Random) -> None:
        self.name = name
        self.src = src
        self.dst = dst
        self.delay: float = args.delay
        self.jitter: float = args.jitter
        self.max_queued: int = args.max_queued
        self.rng = rng
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.last_due = 0.0
        self.frames = 0
        self.dropped = 0

    def read(self, now: float, acks: Acks | None) -> None:
        while True:
            try:
                frame = self.src.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            if acks is not None:
                acks.see(memoryview(frame), now)
            if self.queued + len(frame) > self.max_queued:
                self.dropped += 1
                continue
            due = now + max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))
            due = max(due, self.last_due)
            self.last_due = due
            self.queue.append((due, frame))
            self.queued += len(frame)
            self.frames += 1

    def flush(self, now: float) -> None:
        queue = self.queue
        while queue and queue[0][0] <= now:
            _, frame = queue.popleft()
            self.queued -= len(frame)
            try:
                self.dst.send(frame)
            except OSError as exc:  # a full or downed interface: the frame is lost
                if exc.errno not in (errno.ENOBUFS, errno.EAGAIN, errno.ENETDOWN,
                                     errno.ENXIO, errno.EMSGSIZE):
                    raise
                self.dropped += 1

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.queue else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="the host's end (its frames go up)")
    parser.add_argument("--b", required=True, help="the switch's end")
    parser.add_argument("--delay", type=float, default=0.1, metavar="SECONDS")
    parser.add_argument("--jitter", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-queued", type=int, default=4 << 20, metavar="BYTES")
    parser.add_argument("--report", type=float, default=1.0, metavar="SECONDS")
    args = parser.parse_args(argv)
    if args.delay < 0 or args.jitter < 0:
        parser.error("--delay and --jitter must be >= 0")
    a, b = _open(args.a), _open(args.b)
    rng = random.Random(args.seed)
    up = Direction("up", a, b, args, rng)
    down = Direction("down", b, a, args, rng)
    acks = Acks()
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ, up)
    sel.register(b, selectors.EVENT_READ, down)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    print("delayline ready", file=sys.stderr, flush=True)
    next_report = time.monotonic() + args.report
    while not stop:
        now = time.monotonic()
        dues = [d for d in (up.next_due(), down.next_due(), next_report) if d is not None]
        for key, _ in sel.select(max(0.0, min(dues) - now)):
            direction: Direction = key.data
            direction.read(time.monotonic(), acks if direction is up else None)
        now = time.monotonic()
        up.flush(now)
        down.flush(now)
        if now >= next_report:
            next_report = now + args.report
            print(json.dumps({"t": round(now, 3), "acks": acks.report(),
                              "frames": {"up": up.frames, "down": down.frames},
                              "dropped": {"up": up.dropped, "down": down.dropped}}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
