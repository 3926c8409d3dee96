"""Hub benchmarks: tether.Hub against servers written here, in the same run.

    python bench/hub.py            # full run (a few minutes)
    python bench/hub.py --quick    # one short round of everything (about two minutes)

Servers (each a child process pinned to core 0; the load generator, bench/loadgen.c
compiled here with gcc, runs pinned to core 1):

* ``naive``     uvloop Protocol, splits lines, one ``transport.write`` per message
* ``coalesced`` the same, all complete messages of one read in one write
* ``ceiling``   uvloop Protocol echoing raw bytes
* ``hub``       tether.Hub, plain event API: ``async for event in hub`` + ``hub.send``
* ``hub-batch`` tether.Hub, public batch API: ``hub.batches(grouped=True)`` +
  ``hub.send_batch``

Measures: echo throughput (64-byte lines; 100 and 1,000 connections; 1 and 16 in
flight), RSS per idle connection (15,000 held), accept rate, CPU of idle timeouts
(15,000 idle connections), fan-out with ``send_many`` to 10,000 connections. Prints
one JSON object per result line; ratios are of medians over rounds. The machine is
shared: each figure is also given per CPU-second of the server process, which is less
sensitive to neighbours than the wall-clock rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVER_CPU = 0
LOAD_CPU = 1
MSG = 64


# --- servers (run in a child process with --serve) ----------------------------------------


def serve(kind: str, port: int, idle: float | None, fanout: int) -> None:
    import uvloop

    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {SERVER_CPU})
    uvloop.run(_serve(kind, port, idle, fanout))


async def _serve(kind: str, port: int, idle: float | None, fanout: int) -> None:
    loop = asyncio.get_running_loop()

    class Naive(asyncio.Protocol):
        __slots__ = ("buf", "t")

        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.buf = b""
            conns.append(transport)

        def data_received(self, data: bytes) -> None:
            if self.buf:
                data = self.buf + data
            lines = data.split(b"\n")
            self.buf = lines.pop()
            write = self.t.write
            for line in lines:
                write(line + b"\n")

    class Coalesced(Naive):
        def data_received(self, data: bytes) -> None:
            if self.buf:
                data = self.buf + data
            lines = data.split(b"\n")
            self.buf = lines.pop()
            if lines:
                self.t.write(b"\n".join(lines) + b"\n")

    class Ceiling(Naive):
        def data_received(self, data: bytes) -> None:
            self.t.write(data)

    conns: list[Any] = []
    if kind in ("naive", "coalesced", "ceiling"):
        cls = {"naive": Naive, "coalesced": Coalesced, "ceiling": Ceiling}[kind]
        await loop.create_server(cls, "127.0.0.1", port, backlog=4096)
        print("ready", flush=True)
        if fanout:
            while len(conns) < fanout:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            msg = b"m" * (MSG - 1) + b"\n"
            for _ in range(10):
                for t in conns:
                    t.write(msg)
                await asyncio.sleep(0)
        await asyncio.Future()

    from tether.errors import FlowClosed
    from tether.hub import Data, Hub, Messages, Opened

    async with Hub("127.0.0.1", port, idle_timeout=idle) as hub:
        print("ready", flush=True)
        if fanout:
            ids = []
            async for event in hub:
                if isinstance(event, Opened):
                    ids.append(event.id)
                    if len(ids) == fanout:
                        break
            await asyncio.sleep(0.3)
            msg = b"m" * (MSG - 1)
            for _ in range(10):
                hub.send_many(ids, msg)
                await asyncio.sleep(0)
            await asyncio.Future()
        send = hub.send
        if kind == "hub":
            async for event in hub:
                if type(event) is Data:
                    try:  # noqa: SIM105 - try costs nothing, suppress() does
                        send(event.id, event.data)
                    except FlowClosed:
                        pass
        else:
            send_batch = hub.send_batch
            async for events in hub.batches(grouped=True):
                for grouped in events:
                    if type(grouped) is Messages:
                        try:  # noqa: SIM105
                            send_batch(grouped.id, grouped.messages)
                        except FlowClosed:
                            pass


# --- driver --------------------------------------------------------------------------------


def build_loadgen(tmp: Path) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        sys.exit("bench/hub.py needs gcc to build the load generator")
    exe = tmp / "loadgen"
    subprocess.run([gcc, "-O2", "-o", str(exe), str(HERE / "loadgen.c")], check=True)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Server:
    def __init__(self, kind: str, idle: float | None = None, fanout: int = 0) -> None:
        self.port = free_port()
        args = [sys.executable, str(Path(__file__).resolve()), "--serve", kind,
                "--port", str(self.port), "--fanout", str(fanout)]
        if idle is not None:
            args += ["--idle", str(idle)]
        env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"server {kind} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def pinned() -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {LOAD_CPU})


def echo(loadgen: Path, kind: str, conns: int, inflight: int, seconds: float) -> dict[str, Any]:
    server = Server(kind)
    try:
        warm = min(1.0, seconds / 2)
        proc = subprocess.Popen([str(loadgen), "echo", "127.0.0.1", str(server.port),
                                 str(conns), str(inflight), str(MSG), str(warm), str(seconds)],
                                stdout=subprocess.PIPE, text=True, preexec_fn=pinned)
        time.sleep(warm + 0.3)
        c0 = cpu_seconds(server.proc.pid)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=seconds + 60)
        c1 = cpu_seconds(server.proc.pid)
        t1 = time.monotonic()
        result = json.loads(out.strip().splitlines()[-1])
        cpu = (c1 - c0) / (t1 - t0)
        return {"bench": "echo", "server": kind, "connections": conns, "inflight": inflight,
                "rate": result["rate"], "server_cpu": round(cpu, 3),
                "rate_per_cpu_s": round(result["rate"] / cpu, 1) if cpu else None,
                "errors": result["errors"]}
    finally:
        server.stop()


def hold(loadgen: Path, kind: str, conns: int, idle: float | None,
         measure: float) -> dict[str, Any]:
    server = Server(kind, idle=idle)
    try:
        time.sleep(0.3)
        rss0 = rss_bytes(server.proc.pid)
        proc = subprocess.Popen([str(loadgen), "hold", "127.0.0.1", str(server.port), str(conns)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                preexec_fn=pinned)
        assert proc.stdout is not None and proc.stdin is not None
        ready = proc.stdout.readline()
        assert ready.startswith("ready"), ready
        time.sleep(1.0)  # let the server accept and settle
        rss1 = rss_bytes(server.proc.pid)
        c0 = cpu_seconds(server.proc.pid)
        time.sleep(measure)
        c1 = cpu_seconds(server.proc.pid)
        proc.stdin.close()
        out = proc.stdout.read()
        proc.wait(30)
        held = json.loads(out.strip().splitlines()[-1])
        return {"bench": "idle", "server": kind, "connections": conns, "idle_timeout": idle,
                "rss_per_connection": round((rss1 - rss0) / conns, 1),
                "idle_cpu_fraction": round((c1 - c0) / measure, 4),
                "closed_by_server": held["closed_by_server"]}
    finally:
        server.stop()


def churn(loadgen: Path, kind: str, seconds: float) -> dict[str, Any]:
    server = Server(kind)
    try:
        out = subprocess.run([str(loadgen), "churn", "127.0.0.1", str(server.port), "64",
                              str(seconds)], capture_output=True, text=True, check=True,
                             preexec_fn=pinned, timeout=seconds + 60).stdout
        result = json.loads(out.strip().splitlines()[-1])
        return {"bench": "accept", "server": kind, "rate": result["rate"],
                "errors": result["errors"]}
    finally:
        server.stop()


def fanout(loadgen: Path, kind: str, conns: int) -> dict[str, Any]:
    server = Server(kind, fanout=conns)
    try:
        out = subprocess.run([str(loadgen), "sink", "127.0.0.1", str(server.port), str(conns),
                              str(conns * 10), "60"], capture_output=True, text=True,
                             preexec_fn=pinned, timeout=120).stdout
        result = json.loads(out.strip().splitlines()[-1])
        return {"bench": "fanout", "server": kind, "connections": conns,
                "messages": result["messages"], "rate": result["rate"]}
    finally:
        server.stop()


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", default="echo,memory,accept,idle,fanout")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--idle", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fanout", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.idle, args.fanout)
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = 2.0 if args.quick else 4.0
    only = set(args.only.split(","))
    held = 15_000
    with tempfile.TemporaryDirectory() as tmp:
        loadgen = build_loadgen(Path(tmp))
        if "echo" in only:
            kinds = ["naive", "coalesced", "ceiling", "hub", "hub-batch"]
            for conns, inflight in [(100, 1), (100, 16), (1000, 1), (1000, 16)]:
                results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
                for _ in range(rounds):  # interleaved: neighbours hit everyone alike
                    for kind in kinds:
                        result = echo(loadgen, kind, conns, inflight, seconds)
                        results[kind].append(result)
                        emit(result)
                med = {k: statistics.median(r["rate"] for r in v) for k, v in results.items()}
                per_cpu = {k: statistics.median(r["rate_per_cpu_s"] or 0 for r in v)
                           for k, v in results.items()}
                for kind in ("hub", "hub-batch"):
                    emit({"bench": "echo-ratio", "server": kind, "connections": conns,
                          "inflight": inflight, "rate": med[kind],
                          "vs_naive": round(med[kind] / med["naive"], 2),
                          "vs_coalesced": round(med[kind] / med["coalesced"], 2),
                          "vs_ceiling": round(med[kind] / med["ceiling"], 2),
                          "per_cpu_vs_naive": round(per_cpu[kind] / per_cpu["naive"], 2),
                          "per_cpu_vs_coalesced":
                              round(per_cpu[kind] / per_cpu["coalesced"], 2),
                          "per_cpu_vs_ceiling": round(per_cpu[kind] / per_cpu["ceiling"], 2)})
        if "memory" in only or "idle" in only:
            naive = hold(loadgen, "naive", held, None, 2.0 if args.quick else 5.0)
            emit(naive)
            hub = hold(loadgen, "hub", held, None, 2.0 if args.quick else 5.0)
            emit(hub)
            hub_idle = hold(loadgen, "hub", held, 3600.0, 3.0 if args.quick else 10.0)
            emit(hub_idle)
            emit({"bench": "memory-ratio", "server": "hub",
                  "rss_per_connection": hub["rss_per_connection"],
                  "naive_rss_per_connection": naive["rss_per_connection"],
                  "vs_naive": round(hub["rss_per_connection"] / naive["rss_per_connection"], 2),
                  "with_idle_timeout_vs_naive":
                      round(hub_idle["rss_per_connection"] / naive["rss_per_connection"], 2)})
        if "accept" in only:
            for kind in ("naive", "hub"):
                emit(churn(loadgen, kind, 2.0 if args.quick else 5.0))
        if "fanout" in only:
            for kind in ("naive", "hub"):
                emit(fanout(loadgen, kind, 10_000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
