"""Benchmarks of tether.mesh between two processes on loopback, next to a raw baseline.

    .venv/bin/python bench/mesh.py            # full run, < 60 s
    .venv/bin/python bench/mesh.py --quick    # smoke run, < 15 s

One JSON object per line on stdout, one per result::

    {"bench": "mesh", "name": "throughput", "transport": "mesh", "body": 64, ...}

* **throughput** — node A (this process) sends N messages to node B (a child process)
  as fast as `await mesh.send` takes them; B's application consumes them (so they are
  acknowledged). Measured by B, from its first message to its last. The same run
  does the same with a **raw** uvloop TCP socket pair: 4-byte length prefix + body,
  one `transport.write` per message, pausing when the transport says so, parsed by
  the receiver with `struct.unpack_from`: what a hand-written Python sender and
  receiver cost, with none of the mesh's sequencing, acknowledgement or buffering.
* **latency** — A sends a message every millisecond carrying `time.monotonic_ns()`
  (one clock for both processes on Linux); B records arrival minus departure, as its
  application sees it. p50 / p99 / max, mesh and raw.
* **reconnect** — with a session up, A aborts the link's socket (RST, as a cut cable
  or a dead middlebox would), and sends one message at once; B echoes it. Time from
  the cut to the echo (re-dial, HELLO, SESSION exchange, delivery, echo), next to the
  echo round trip on a healthy link.

Both processes use uvloop. Throughput is the best of 3 runs (1 with `--quick`): on a
small shared machine single runs vary by tens of percent. Numbers are for information
only; no test asserts on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

try:
    from tether.aio import run
    from tether.mesh import Mesh
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from tether.aio import run
    from tether.mesh import Mesh

_LEN = struct.Struct("!I")
_TS = struct.Struct("!Q")


def emit(name: str, value: float, unit: str, **context: Any) -> None:
    """Print one result as one JSON line."""
    row: dict[str, Any] = {"bench": "mesh", "name": name, "value": _round(value),
                           "unit": unit}
    row.update({k: _round(v) if isinstance(v, float) else v for k, v in context.items()})
    print(json.dumps(row), flush=True)


def _round(value: float) -> float:
    if value == 0 or not isinstance(value, float):
        return value
    return float(f"{value:.4g}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _percentiles(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": q[49], "p99": q[98], "max": samples[-1]}


# the child: node B ---------------------------------------------------------------------

async def _child_mesh(args: argparse.Namespace) -> dict[str, Any]:
    mesh = Mesh("B", listen=f"127.0.0.1:{args.port}", peers={"A": f"127.0.0.1:{args.peer}"},
                liveness=5.0, retry_interval=0.05)
    await mesh.start()
    print("ready", flush=True)
    result: dict[str, Any] = {}
    n = 0
    t_first = t_last = 0.0
    delays: list[float] = []
    async for m in mesh.messages():
        if args.mode == "echo":
            await mesh.send("A", m.body)
            if m.body == b"stop":
                break
            continue
        now = time.perf_counter()
        if n == 0:
            t_first = now
        n += 1
        if args.mode == "latency":
            delays.append((time.monotonic_ns() - _TS.unpack_from(m.body)[0]) / 1e6)
        if n == args.count:
            t_last = now
            break
    if args.mode == "throughput":
        result = {"seconds": t_last - t_first, "count": n, "cpu": time.process_time()}
    elif args.mode == "latency":
        result = _percentiles(delays)
    await mesh.aclose(drain=0.5)
    return result


class _RawReceiver(asyncio.Protocol):
    def __init__(self, count: int, mode: str, done: asyncio.Future[None]) -> None:
        self.count = count
        self.mode = mode
        self.done = done
        self.buf = bytearray()
        self.n = 0
        self.t_first = self.t_last = 0.0
        self.delays: list[float] = []

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        off = 0
        end = len(buf)
        now = time.perf_counter()
        if self.n == 0:
            self.t_first = now
        while end - off >= 4:
            (length,) = _LEN.unpack_from(buf, off)
            if end - off - 4 < length:
                break
            if self.mode == "latency":
                sent = _TS.unpack_from(buf, off + 4)[0]
                self.delays.append((time.monotonic_ns() - sent) / 1e6)
            off += 4 + length
            self.n += 1
            if self.n == self.count:
                self.t_last = now
                if not self.done.done():
                    self.done.set_result(None)
        del buf[:off]


async def _child_raw(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    proto = _RawReceiver(args.count, args.mode, done)
    server = await loop.create_server(lambda: proto, "127.0.0.1", args.port)
    print("ready", flush=True)
    await done
    server.close()
    if args.mode == "latency":
        return _percentiles(proto.delays)
    return {"seconds": proto.t_last - proto.t_first, "count": proto.n,
            "cpu": time.process_time()}


def child(args: argparse.Namespace) -> None:
    coro = _child_mesh(args) if args.child == "mesh" else _child_raw(args)
    print(json.dumps(run(coro)), flush=True)


# the parent: node A ----------------------------------------------------------------------

class Child:
    """Node B as a child process of this script."""

    def __init__(self, kind: str, mode: str, count: int, port: int, peer: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", kind, "--mode", mode,
             "--count", str(count), "--port", str(port), "--peer", str(peer)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"child did not start: {line!r}")

    async def result(self, timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        self.proc.wait(10)
        self.proc.stdout.close()
        value: dict[str, Any] = json.loads(line)
        return value

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def mesh_throughput(count: int, size: int) -> dict[str, Any]:
    port, mine = _free_port(), _free_port()
    b = Child("mesh", "throughput", count, port, mine)
    try:
        async with Mesh("A", listen=f"127.0.0.1:{mine}", peers={"B": f"127.0.0.1:{port}"},
                        liveness=5.0) as a:
            body = b"m" * size
            t0 = time.perf_counter()
            for _ in range(count):
                await a.send("B", body)
            result = await b.result()
            result["sender_seconds"] = time.perf_counter() - t0
            return result
    finally:
        b.kill()


class _RawSender(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.resumed: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.resumed is not None and not self.resumed.done():
            self.resumed.set_result(None)

    async def drain(self) -> None:
        while self.paused:
            self.resumed = asyncio.get_running_loop().create_future()
            await self.resumed


async def raw_throughput(count: int, size: int) -> dict[str, Any]:
    port = _free_port()
    b = Child("raw", "throughput", count, port, 0)
    try:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_connection(_RawSender, "127.0.0.1", port)
        body = b"m" * size
        header = _LEN.pack(size)
        t0 = time.perf_counter()
        for _ in range(count):
            transport.write(header + body)
            if proto.paused:
                await proto.drain()
        result = await b.result()
        result["sender_seconds"] = time.perf_counter() - t0
        transport.close()
        return result
    finally:
        b.kill()


async def mesh_latency(count: int) -> dict[str, Any]:
    port, mine = _free_port(), _free_port()
    b = Child("mesh", "latency", count, port, mine)
    try:
        async with Mesh("A", listen=f"127.0.0.1:{mine}", peers={"B": f"127.0.0.1:{port}"},
                        liveness=5.0) as a:
            await a.send("B", _TS.pack(time.monotonic_ns()) + b"w" * 56)  # warm up: dial
            await asyncio.sleep(0.2)
            for _ in range(count - 1):
                await a.send("B", _TS.pack(time.monotonic_ns()) + b"l" * 56)
                await asyncio.sleep(0.001)
            return await b.result()
    finally:
        b.kill()


async def raw_latency(count: int) -> dict[str, Any]:
    port = _free_port()
    b = Child("raw", "latency", count, port, 0)
    try:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(_RawSender, "127.0.0.1", port)
        for _ in range(count):
            transport.write(_LEN.pack(64) + _TS.pack(time.monotonic_ns()) + b"l" * 56)
            await asyncio.sleep(0.001)
        result = await b.result()
        transport.close()
        return result
    finally:
        b.kill()


async def reconnect(rounds: int) -> dict[str, Any]:
    port, mine = _free_port(), _free_port()
    b = Child("mesh", "echo", 0, port, mine)
    try:
        async with Mesh("A", listen=f"127.0.0.1:{mine}", peers={"B": f"127.0.0.1:{port}"},
                        liveness=5.0, retry_interval=0.05) as a:
            echoes = a.messages()
            rtts, cuts = [], []
            for i in range(rounds):
                t0 = time.perf_counter()
                await a.send("B", b"ping")
                await anext(echoes)
                if i:  # the first one dials
                    rtts.append((time.perf_counter() - t0) * 1000)
                conns = [c for c in a._conns if c.transport is not None]
                t0 = time.perf_counter()
                for conn in conns:
                    conn.transport.abort()  # type: ignore[union-attr]
                await asyncio.sleep(0)  # the loop sees the socket go
                await a.send("B", b"after cut")
                await anext(echoes)
                cuts.append((time.perf_counter() - t0) * 1000)
            await a.send("B", b"stop")
            await anext(echoes)
            return {"rtt": statistics.median(rtts), "cut": _percentiles(cuts)}
    finally:
        b.kill()


async def parent(quick: bool) -> None:
    n_small, n_large = (20_000, 4_000) if quick else (200_000, 40_000)
    runs = 1 if quick else 3
    for size, n in ((64, n_small), (4096, n_large)):
        best: dict[str, float] = {}
        for transport, fn in (("mesh", mesh_throughput), ("raw", raw_throughput)):
            rates = []
            for _ in range(runs):
                r = await fn(n, size)
                rates.append(r["count"] / r["seconds"])
            best[transport] = max(rates)
            emit("throughput", best[transport], "msg/s", transport=transport, body=size,
                 count=n, runs=runs, worst=min(rates), mb_s=best[transport] * size / 1e6)
        emit("throughput_ratio", best["mesh"] / best["raw"], "mesh/raw", body=size)
    count = 500 if quick else 3000
    for transport, measure in (("mesh", mesh_latency), ("raw", raw_latency)):
        r = await measure(count)
        for q in ("p50", "p99", "max"):
            emit(f"latency_{q}", r[q], "ms", transport=transport, count=count,
                 interval_ms=1, body=64)
    rounds = 10 if quick else 50
    r = await reconnect(rounds)
    emit("echo_rtt_p50", r["rtt"], "ms", transport="mesh", rounds=rounds)
    for q in ("p50", "p99", "max"):
        emit(f"reconnect_{q}", r["cut"][q], "ms", transport="mesh", rounds=rounds,
             what="socket aborted -> message sent after the cut echoed back")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, a few seconds")
    parser.add_argument("--child", choices=["mesh", "raw"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="throughput", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--peer", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("tether.mesh").setLevel(logging.ERROR)  # the cuts are on purpose
    if args.child:
        child(args)
    else:
        run(parent(args.quick))


if __name__ == "__main__":
    main()
