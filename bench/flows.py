"""End-to-end benchmarks of tether flows over real sockets (127.0.0.1 only).

    .venv/bin/python bench/flows.py            # full run, < 60 s
    .venv/bin/python bench/flows.py --quick    # smoke run, < 10 s

Topology. The relays run in a **subprocess** (one Python process on its own core):
a `tether.Gateway` and, for comparison, a plain asyncio `Protocol` TCP relay (a
minimal splice: bytes in -> bytes out, pause/resume for backpressure, EOF ->
write_eof, close -> close). Both endpoints of every connection -- a client and a
server `tether.Node`, or the asyncio-streams TCP client and server -- live in the
main process, on one uvloop loop, so one clock times both ends::

    tether:      client Node --link--> Gateway (subprocess) --link--> server Node
    plain relay: client TCP  ---------> Relay   (subprocess) ---------> server TCP
    direct:      client TCP  ----------------------------------------> server TCP

Three measurements, each reported for all the paths in the same run, with ratios:

* ``bulk``  -- one flow, ``--mb`` MB written in 256 KiB chunks, the reader drains;
* ``rate``  -- open + one 16-byte echo + close, one at a time and 32 at a time;
* ``close`` -- from the server's ``dealloc()`` (``transport.close()`` for TCP) to
  the client's pending ``read()`` returning ``b""``: median and p99.

One JSON object per line on stdout. ``--profile-gateway FILE`` writes a cProfile of
the gateway process (``--only bulk`` recommended). Every process started here is
ended by PID. Numbers are for information only; no test asserts on them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

try:
    import tether
    from tether.aio import run as tether_run
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    import tether
    from tether.aio import run as tether_run

from benchlib import HOST, at_a_time, cpu_of, cpu_pressure, emit, source_rev, start_relay

CHUNK = 256 * 1024
ECHO_SIZE = 16


# ---------------------------------------------------------------------------------------
# The relay host: the subprocess (or, with --inproc, a task) running gateway + relays


async def host_relays(forwards: list[int], ready: Callable[[dict[str, Any]], None],
                      stop: asyncio.Event, window: int) -> None:
    gateway = tether.Gateway(f"{HOST}:0", name="bench-gw", window=window)
    await gateway.start()
    relays = [await start_relay((HOST, port)) for port in forwards]
    ready({"gateway": gateway.port,
           "relays": [r.sockets[0].getsockname()[1] for r in relays]})
    try:
        await stop.wait()
    finally:
        for r in relays:
            r.close()
        await gateway.aclose()


def host_main(args: argparse.Namespace) -> int:
    """Subprocess entry: serve until stdin reaches EOF (or SIGTERM)."""
    profiler = None
    if args.profile_gateway:
        import cProfile
        profiler = cProfile.Profile()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def wait_stdin() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_stdin, daemon=True).start()
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        def ready(info: dict[str, Any]) -> None:
            print(json.dumps(info), flush=True)
            if profiler is not None:
                profiler.enable()

        await host_relays(args.forward, ready, stop, args.window)

    try:
        tether_run(main())
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile_gateway)
    return 0


class RelayHost:
    """The subprocess, started and ended by PID."""

    def __init__(self, forwards: list[int], profile: str | None, window: int) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--host-relays",
               "--window", str(window)]
        for port in forwards:
            cmd += ["--forward", str(port)]
        if profile:
            cmd += ["--profile-gateway", profile]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks before the loop starts: fine
        if not line:
            self.stop()
            raise RuntimeError("the relay host process did not start")
        self.info: dict[str, Any] = json.loads(line)

    def cpu(self) -> float:
        return cpu_of(self.pid)

    def stop(self) -> None:
        proc = self.proc
        if proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()  # asks for a clean exit (and the profile dump)
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            pass
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------
# Servers in the main process: TCP (asyncio streams) and a tether server Node


class TcpServers:
    """Sink, echo and close servers on sockets bound before the relay host starts."""

    def __init__(self) -> None:
        self.socks = {name: socket.create_server((HOST, 0), backlog=1024)
                      for name in ("sink", "echo", "close")}
        self.ports = {name: s.getsockname()[1] for name, s in self.socks.items()}
        self.sink_done: asyncio.Future[tuple[float, int]] | None = None
        self.sink_expected = 0
        self.closing: asyncio.Queue[asyncio.StreamWriter] | None = None
        self.servers: list[asyncio.Server] = []

    async def start(self) -> None:
        self.closing = asyncio.Queue()
        self.servers = [
            await asyncio.start_server(self._sink, sock=self.socks["sink"]),
            await asyncio.start_server(self._echo, sock=self.socks["echo"]),
            await asyncio.start_server(self._close, sock=self.socks["close"]),
        ]

    async def stop(self) -> None:
        for s in self.servers:
            s.close()
        for s in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 2)

    async def _sink(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        expected = self.sink_expected
        done = self.sink_done
        while chunk := await reader.read(1 << 20):
            total += len(chunk)
            if total >= expected and done is not None and not done.done():
                done.set_result((time.perf_counter(), total))
        writer.close()

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    async def _close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        assert self.closing is not None
        self.closing.put_nowait(writer)  # the bench closes it, timing the close


class FlowServer:
    """A server Node offering "sink", "echo" and "close"."""

    def __init__(self, gateway: str, window: int) -> None:
        self.node = tether.Node("bench-server", gateway=gateway, window=window)
        self.sink_done: asyncio.Future[tuple[float, int]] | None = None
        self.sink_expected = 0
        self.closing: asyncio.Queue[tether.Flow] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepter: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.node.start()
        for service in ("sink", "echo", "close"):
            self.node.register(service)
        self._accepter = asyncio.ensure_future(self._accept())

    async def stop(self) -> None:
        if self._accepter is not None:
            self._accepter.cancel()
        if self._tasks:  # handlers end once their client deallocated: let them
            await asyncio.wait(list(self._tasks), timeout=2)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.node.aclose()

    async def _accept(self) -> None:
        handlers = {"sink": self._sink, "echo": self._echo, "close": self._close}
        while True:
            flow = await self.node.accept()
            task = asyncio.ensure_future(handlers[flow.service](flow))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _sink(self, flow: tether.Flow) -> None:
        total = 0
        expected = self.sink_expected
        done = self.sink_done
        while chunk := await flow.read():
            total += len(chunk)
            if total >= expected and done is not None and not done.done():
                done.set_result((time.perf_counter(), total))
        await flow.dealloc()

    async def _echo(self, flow: tether.Flow) -> None:
        while data := await flow.read():
            await flow.write(data)
        await flow.dealloc()

    async def _close(self, flow: tether.Flow) -> None:
        await flow.read()
        self.closing.put_nowait(flow)  # the bench deallocates it, timing the dealloc


# ---------------------------------------------------------------------------------------
# The measurements


class Bench:
    def __init__(self, args: argparse.Namespace, host: RelayHost | None,
                 host_info: dict[str, Any], tcp: TcpServers, fsrv: FlowServer,
                 client: tether.Node) -> None:
        self.args = args
        self.host = host
        self.tcp = tcp
        self.fsrv = fsrv
        self.client = client
        relays = host_info["relays"]
        self.relay_port = dict(zip(("sink", "echo", "close"), relays, strict=True))
        self.where = "subprocess" if host is not None else "in-process"

    def _selected(self, paths: dict[str, Any]) -> list[tuple[str, Any]]:
        wanted = self.args.paths.split(",")
        return [(k, v) for k, v in paths.items() if k in wanted]

    def _host_cpu(self) -> float:
        return self.host.cpu() if self.host is not None else 0.0

    # bulk ------------------------------------------------------------------------------

    async def _bulk_tether(self, total: int) -> float:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[float, int]] = loop.create_future()
        self.fsrv.sink_done = done
        self.fsrv.sink_expected = total
        flow = await self.client.alloc("sink")
        chunk = b"\x5a" * CHUNK
        t0 = time.perf_counter()
        for _ in range(total // CHUNK):
            await flow.write(chunk)
        t1, got = await done
        assert got == total, (got, total)
        await flow.dealloc()
        return t1 - t0

    async def _bulk_tcp(self, port: int, total: int) -> float:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[float, int]] = loop.create_future()
        self.tcp.sink_done = done
        self.tcp.sink_expected = total
        _, writer = await asyncio.open_connection(HOST, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        chunk = b"\x5a" * CHUNK
        t0 = time.perf_counter()
        for _ in range(total // CHUNK):
            writer.write(chunk)
            await writer.drain()
        t1, got = await done
        assert got == total, (got, total)
        writer.close()
        await writer.wait_closed()
        return t1 - t0

    async def bulk(self) -> None:
        total = self.args.mb * 1_000_000 // CHUNK * CHUNK
        runs = self.args.runs
        paths: dict[str, Callable[[int], Awaitable[float]]] = dict(self._selected({
            "tether": self._bulk_tether,
            "relay": lambda n: self._bulk_tcp(self.relay_port["sink"], n),
            "direct": lambda n: self._bulk_tcp(self.tcp.ports["sink"], n),
        }))
        speeds: dict[str, list[float]] = {path: [] for path in paths}
        host_cpu = dict.fromkeys(paths, 0.0)
        main_cpu = dict.fromkeys(paths, 0.0)
        for fn in paths.values():
            await fn(min(total, 32 * CHUNK))  # warm up
        # the paths take turns, run by run: load that comes and goes on a shared
        # machine then falls on all of them alike
        for _ in range(runs):
            for path, fn in paths.items():
                h0, m0 = self._host_cpu(), time.process_time()
                dt = await asyncio.wait_for(fn(total), 40)
                host_cpu[path] += self._host_cpu() - h0
                main_cpu[path] += time.process_time() - m0
                speeds[path].append(total / dt / 1e6)
        results: dict[str, float] = {}
        moved = total * runs / 1e6
        for path in paths:
            best = results[path] = max(speeds[path])
            seconds = moved / statistics.mean(speeds[path])
            relayed = path != "direct"
            ctx: dict[str, Any] = {
                "path": path, "bytes": total, "chunk": CHUNK, "runs": speeds[path],
                "window": self.args.window if path == "tether" else None,
                "relay_proc": self.where if relayed else None,
                "relay_cpu_frac": host_cpu[path] / seconds if relayed else None,
                "endpoints_cpu_frac": main_cpu[path] / seconds,
                # CPU per MB moved: much less changed than MB/s by other load on the box
                "relay_cpu_ms_per_MB": host_cpu[path] * 1e3 / moved if relayed else None,
                "endpoints_cpu_ms_per_MB": main_cpu[path] * 1e3 / moved,
            }
            if path != "tether" and "tether" in results:
                ctx["baseline"] = path
                ctx["ratio"] = results["tether"] / best
            emit("bulk", f"{path}_MBps", best, "MB/s", **ctx)
        for base in ("relay", "direct"):
            if "tether" in results and base in results:
                emit("bulk", f"tether_vs_{base}", results["tether"] / results[base], "ratio",
                     baseline=base, ratio=results["tether"] / results[base])

    # open + close rate -------------------------------------------------------------------

    async def _one_flow(self) -> None:
        flow = await self.client.alloc("echo")
        msg = b"e" * ECHO_SIZE
        await flow.write(msg)
        got = b""
        while len(got) < ECHO_SIZE:
            part = await flow.read()
            assert part, "echo flow ended early"
            got += part
        await flow.dealloc()

    async def _one_tcp(self, port: int) -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"e" * ECHO_SIZE)
        await reader.readexactly(ECHO_SIZE)
        writer.close()
        await writer.wait_closed()

    async def rate(self) -> None:
        n = self.args.flows
        rounds = 4
        paths: dict[str, Callable[[], Awaitable[None]]] = dict(self._selected({
            "tether": self._one_flow,
            "relay": lambda: self._one_tcp(self.relay_port["echo"]),
            "direct": lambda: self._one_tcp(self.tcp.ports["echo"]),
        }))
        for one in paths.values():
            for _ in range(min(n // 10, 50)):  # warm up
                await one()
        for concurrency in (1, 32):
            wall = dict.fromkeys(paths, 0.0)
            host_cpu = dict.fromkeys(paths, 0.0)
            main_cpu = dict.fromkeys(paths, 0.0)
            for _ in range(rounds):  # the paths take turns, n / rounds at a time
                for path, one in paths.items():
                    h0, m0 = self._host_cpu(), time.process_time()
                    wall[path] += await self._run_many(one, n // rounds, concurrency)
                    host_cpu[path] += self._host_cpu() - h0
                    main_cpu[path] += time.process_time() - m0
            ops = n // rounds * rounds
            results = {path: ops / wall[path] for path in paths}
            for path in paths:
                relayed = path != "direct"
                ctx: dict[str, Any] = {
                    "path": path, "n": ops, "concurrency": concurrency, "payload": ECHO_SIZE,
                    "relay_proc": self.where if relayed else None,
                    "relay_cpu_frac": host_cpu[path] / wall[path] if relayed else None,
                    "endpoints_cpu_frac": main_cpu[path] / wall[path],
                    "relay_cpu_us_per_op": host_cpu[path] * 1e6 / ops if relayed else None,
                    "endpoints_cpu_us_per_op": main_cpu[path] * 1e6 / ops,
                }
                if path != "tether" and "tether" in results:
                    ctx["baseline"] = path
                    ctx["ratio"] = results["tether"] / results[path]
                what = "flows" if path == "tether" else "connections"
                emit("rate", f"{path}_open_close_per_s_c{concurrency}", results[path],
                     f"{what}/s", **ctx)

    async def _run_many(self, one: Callable[[], Awaitable[None]], n: int,
                        concurrency: int) -> float:
        """Wall time to run `one` `n` times, `concurrency` at a time."""
        t0 = time.perf_counter()
        await asyncio.wait_for(at_a_time(n, concurrency, one), 40)
        return time.perf_counter() - t0

    # close propagation ---------------------------------------------------------------------

    async def _close_tether(self) -> float:
        flow = await self.client.alloc("close")
        await flow.write(b"x")
        sflow = await self.fsrv.closing.get()

        async def reader() -> float:
            data = await flow.read()
            t = time.perf_counter()
            assert data == b"", data
            return t

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(0)  # the read is now pending
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        await sflow.dealloc()
        t1 = await task
        await flow.dealloc()
        return t1 - t0

    async def _close_tcp(self, port: int) -> float:
        assert self.tcp.closing is not None
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"x")
        swriter = await self.tcp.closing.get()

        async def read_eof() -> float:
            data = await reader.read(65536)
            t = time.perf_counter()
            assert data == b"", data
            return t

        task = asyncio.ensure_future(read_eof())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        swriter.close()
        t1 = await task
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        await swriter.wait_closed()
        return t1 - t0

    async def close(self) -> None:
        n = self.args.closes
        paths: dict[str, Callable[[], Awaitable[float]]] = dict(self._selected({
            "tether": self._close_tether,
            "relay": lambda: self._close_tcp(self.relay_port["close"]),
            "direct": lambda: self._close_tcp(self.tcp.ports["close"]),
        }))
        for one in paths.values():
            for _ in range(min(n // 10, 20)):  # warm up
                await one()
        samples: dict[str, list[float]] = {path: [] for path in paths}
        deadline = time.perf_counter() + 20
        for _ in range(n):  # one sample of each path in turn
            for path, one in paths.items():
                samples[path].append(await asyncio.wait_for(one(), 10))
            if time.perf_counter() > deadline:
                break
        medians: dict[str, float] = {}
        for path, got in samples.items():
            got.sort()
            med = medians[path] = statistics.median(got) * 1e6
            p99 = got[min(len(got) - 1, int(len(got) * 0.99))] * 1e6
            ctx: dict[str, Any] = {"path": path, "n": len(got),
                                   "relay_proc": self.where if path != "direct" else None}
            if path != "tether" and "tether" in medians:
                ctx["baseline"] = path
                ctx["ratio"] = medians["tether"] / med
            emit("close", f"{path}_close_latency_median", med, "us", **ctx)
            emit("close", f"{path}_close_latency_p99", p99, "us", **ctx)
            emit("close", f"{path}_close_latency_max", got[-1] * 1e6, "us", **ctx)


async def bench_main(args: argparse.Namespace) -> None:
    tcp = TcpServers()
    host: RelayHost | None = None
    stop_inproc = asyncio.Event()
    inproc_task: asyncio.Task[None] | None = None
    fsrv: FlowServer | None = None
    client: tether.Node | None = None
    try:
        forwards = [tcp.ports["sink"], tcp.ports["echo"], tcp.ports["close"]]
        if args.inproc:
            got: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            inproc_task = asyncio.ensure_future(
                host_relays(forwards, got.set_result, stop_inproc, args.window))
            info = await got
        else:
            host = RelayHost(forwards, args.profile_gateway, args.window)
            info = host.info
        await tcp.start()
        gateway = f"{HOST}:{info['gateway']}"
        fsrv = FlowServer(gateway, args.window)
        await fsrv.start()
        client = tether.Node("bench-client", gateway=gateway, window=args.window)
        await client.start()
        await asyncio.sleep(0.05)  # the REGISTER messages reach the gateway
        bench = Bench(args, host, info, tcp, fsrv, client)
        groups = args.only.split(",") if args.only else ["bulk", "rate", "close"]
        for group in groups:
            await getattr(bench, group)()
    finally:
        if fsrv is not None:
            await fsrv.stop()
        if client is not None:
            await client.aclose()
        await tcp.stop()
        if host is not None:
            host.stop()
        if inproc_task is not None:
            stop_inproc.set()
            await inproc_task


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a < 10 s smoke run")
    parser.add_argument("--only", help="comma-separated groups: bulk,rate,close")
    parser.add_argument("--mb", type=int, default=None, help="MB per bulk run (200; quick 16)")
    parser.add_argument("--runs", type=int, default=None, help="bulk runs per path (3; quick 1)")
    parser.add_argument("--flows", type=int, default=None,
                        help="flows per open/close rate run (2000; quick 200)")
    parser.add_argument("--closes", type=int, default=None,
                        help="flows per close-latency run (500; quick 100)")
    parser.add_argument("--paths", default="tether,relay,direct",
                        help="comma-separated paths to measure: tether,relay,direct")
    parser.add_argument("--window", type=int, default=256 * 1024,
                        help="per-flow receive window of the nodes and the gateway "
                             "(tether's default, 262144)")
    parser.add_argument("--inproc", action="store_true",
                        help="run the gateway and relay in this process (default: subprocess)")
    parser.add_argument("--profile-gateway", metavar="FILE",
                        help="cProfile the gateway process into FILE")
    parser.add_argument("--host-relays", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--forward", type=int, action="append", default=[],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.host_relays:
        return host_main(args)
    q = args.quick
    args.mb = args.mb or (16 if q else 200)
    args.runs = args.runs or (1 if q else 3)
    args.flows = args.flows or (200 if q else 2000)
    args.closes = args.closes or (100 if q else 500)
    t0 = time.perf_counter()
    tether_run(bench_main(args))
    emit("meta", "elapsed", time.perf_counter() - t0, "s", quick=q,
         relay_proc="in-process" if args.inproc else "subprocess",
         python=sys.version.split()[0], cpus=os.cpu_count(),
         loadavg=" ".join(f"{x:.2f}" for x in os.getloadavg()),
         cpu_pressure_avg10=cpu_pressure(), rev=source_rev())
    return 0


if __name__ == "__main__":
    sys.exit(main())
