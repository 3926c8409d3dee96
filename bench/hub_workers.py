"""Benchmarks of Hub(workers=N) (tether.workers): scaling over cores, memory per
connection over processes, and the cost of routing an id to another worker.

    python bench/hub_workers.py             # everything, 3 rounds (about 4 minutes)
    python bench/hub_workers.py --quick     # one short round
    python bench/hub_workers.py --record    # ... and write the results into
                                            # docs/workers.md (read by plot_hub_workers.py)

This process is the supervisor (``Hub(workers=N, handler=...)``); the load comes from
bench/loadgen.c (compiled here with gcc) and, for holding connections, from small
Python client processes (each below the per-process file limit, each from its own
source address 127.0.0.x so that 60,000 connections do not run out of ports).

* ``echo``   64-byte lines, 1,000 connections x 16 in flight, workers=1 and workers=2,
  interleaved rounds; the load generator's own CPU is measured (it shares the 2 cores).
* ``memory`` workers=4; connections held (each echoed once) at 10k, 30k, 60k (or as far
  as the file limit allows); RSS summed over the workers, the supervisor apart, and the
  kernel's slab growth; the least-squares slope is the cost of a connection.
* ``route``  workers=2; 64-byte messages sent by a handler with ``hub.send`` to
  connections of its own worker, then of the other worker; received by loadgen ``sink``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
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
DOC = HERE.parent / "docs" / "workers.md"
MSG = 64
BEGIN = "<!-- hub_workers results: begin (written by bench/hub_workers.py --record) -->"
END = "<!-- hub_workers results: end -->"


# --- the handler of the route benchmark (imported by the workers) ---------------------------


async def blaster(hub: Any) -> None:
    """``HELLO`` -> ``HELLO <worker>``; ``IDS`` -> this worker's silent connections (the
    sinks); ``BLAST count size id,id,...`` -> sends ``count`` messages round-robin to the
    ids, then ``DONE <seconds>``."""
    from tether.hub import Closed, Data, Opened
    from tether.ids import FlowId

    sinks: set[Any] = set()
    tasks: set[asyncio.Task[None]] = set()
    async for event in hub:
        if type(event) is Opened:
            sinks.add(event.id)
        elif type(event) is Closed:
            sinks.discard(event.id)
        elif type(event) is Data:
            me = event.id
            sinks.discard(me)
            cmd, _, rest = event.data.partition(b" ")
            if cmd == b"HELLO":
                hub.send(me, b"HELLO %d" % hub.worker)
            elif cmd == b"IDS":
                hub.send(me, ",".join(str(i) for i in sinks).encode())
            elif cmd == b"BLAST":
                count, size, ids = rest.split(b" ", 2)
                targets = [FlowId.parse(x) for x in ids.decode().split(",")]
                task = asyncio.ensure_future(_blast(hub, me, int(count), int(size), targets))
                tasks.add(task)
                task.add_done_callback(tasks.discard)


async def _blast(hub: Any, me: Any, count: int, size: int, targets: list[Any]) -> None:
    from tether.workers import drain

    message = b"m" * (size - 1)
    send = hub.send
    n = len(targets)
    t0 = time.perf_counter()
    i = 0
    while i < count:
        end = min(count, i + 2048)
        for k in range(i, end):
            send(targets[k % n], message)
        i = end
        await drain(hub)
        await asyncio.sleep(0)
    hub.send(me, b"DONE %.4f" % (time.perf_counter() - t0))


# --- helpers -----------------------------------------------------------------------------


def build_loadgen(tmp: Path) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        sys.exit("bench/hub_workers.py needs gcc to build the load generator")
    exe = tmp / "loadgen"
    subprocess.run([gcc, "-O2", "-o", str(exe), str(HERE / "loadgen.c")], check=True)
    return exe


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def slab() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1]) * 1024
    return 0


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


async def start_pool(workers: int, handler: Any, **options: Any) -> Any:
    from tether.hub import Hub
    from tether.workers import pool_of

    hub = Hub("127.0.0.1", 0, workers=workers, handler=handler, backlog=4096, **options)
    pool_of(hub).log_level = 30
    await hub.start()
    return hub


# --- echo ----------------------------------------------------------------------------------


async def echo_run(loadgen: Path, workers: int, conns: int, inflight: int,
                   seconds: float) -> dict[str, Any]:
    from tether.workers import pool_of

    hub = await start_pool(workers, "tether.workers:echo")
    try:
        pids = list(pool_of(hub).pids().values())
        warm = 1.0
        before = children_cpu()
        proc = await asyncio.create_subprocess_exec(
            str(loadgen), "echo", "127.0.0.1", str(hub.port), str(conns), str(inflight),
            str(MSG), str(warm), str(seconds), stdout=subprocess.PIPE)
        await asyncio.sleep(warm + 0.2)
        c0 = sum(cpu_seconds(p) for p in pids)
        t0 = time.monotonic()
        out, _ = await proc.communicate()
        t1 = time.monotonic()
        c1 = sum(cpu_seconds(p) for p in pids)
        load_cpu = children_cpu() - before
        result = json.loads(out.decode().strip().splitlines()[-1])
        server_cpu = (c1 - c0) / (t1 - t0)
        return {"bench": "echo", "workers": workers, "connections": conns,
                "inflight": inflight, "rate": result["rate"], "errors": result["errors"],
                "workers_cpu": round(server_cpu, 3),
                "rate_per_cpu_s": round(result["rate"] / server_cpu, 1),
                "loadgen_cpu": round(load_cpu / (warm + seconds), 3)}
    finally:
        await hub.aclose(2.0)


# --- memory ------------------------------------------------------------------------------

HOLDER = r"""
import selectors, socket, sys
port, n, src = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
sel = selectors.DefaultSelector()
socks, pending, i = [], {}, 0
while i < n or pending:
    while i < n and len(pending) < 512:
        s = socket.socket()
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_IP, NO_PORT, 1)
        s.bind((src, 0))
        s.connect_ex(("127.0.0.1", port))
        pending[s.fileno()] = s
        sel.register(s, selectors.EVENT_WRITE)
        i += 1
    for key, _ in sel.select(10):
        s = pending.pop(key.fd)
        sel.unregister(s)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        socks.append(s)
for s in socks:
    s.send(b"x\n")
    sel.register(s, selectors.EVENT_READ)
got = 0
while got < len(socks):
    for key, _ in sel.select(30):
        assert key.fileobj.recv(16) == b"x\n"
        sel.unregister(key.fileobj)
        got += 1
print("held", got, flush=True)
sys.stdin.readline()
"""


async def memory(levels: list[int]) -> list[dict[str, Any]]:
    from tether.workers import pool_of
    from tether.workers_proc import rss_bytes

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_holder = min(15_000, soft - 1000)
    hub = await start_pool(4, "tether.workers:echo")
    pool = pool_of(hub)
    holders: list[asyncio.subprocess.Process] = []
    results = []
    try:
        await asyncio.sleep(1.0)
        pids = list(pool.pids().values())
        points = [(0, sum(rss(p) for p in pids), rss_bytes(), slab())]
        held = 0
        for level in levels:
            while held < level:
                n = min(per_holder, level - held)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", HOLDER, str(hub.port), str(n),
                    f"127.0.0.{20 + len(holders)}", stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE)
                holders.append(proc)
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 300)
                assert line == b"held %d\n" % n, line
                held += n
            stats = await pool.refresh_stats()
            assert stats.open == held, stats
            await asyncio.sleep(1.0)
            points.append((held, sum(rss(p) for p in pids), rss_bytes(), slab()))
            per = [w["open"] for w in pool.status()["per_worker"]]
            emit({"bench": "memory-point", "connections": held, "per_worker": per,
                  "workers_rss": points[-1][1], "supervisor_rss": points[-1][2],
                  "slab": points[-1][3]})
        xs = [float(p[0]) for p in points]
        slope, intercept = fit(xs, [float(p[1]) for p in points])
        sup_slope, _ = fit(xs, [float(p[2]) for p in points])
        slab_slope, _ = fit(xs, [float(p[3]) for p in points])
        results.append({"bench": "memory", "workers": 4,
                        "points": [{"connections": c, "workers_rss": r, "supervisor_rss": s,
                                    "slab": k} for c, r, s, k in points],
                        "bytes_per_connection": round(slope, 1),
                        "workers_rss_at_zero": round(intercept),
                        "supervisor_bytes_per_connection": round(sup_slope, 1),
                        "slab_bytes_per_connection_both_ends": round(slab_slope, 1),
                        "file_limit": soft})
        emit(results[-1])
    finally:
        for proc in holders:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # by PID
            await proc.wait()
        await hub.aclose(5.0)
    return results


# --- route ---------------------------------------------------------------------------------


class Control:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 worker: int) -> None:
        self.reader, self.writer, self.worker = reader, writer, worker

    async def ask(self, line: str, timeout: float = 120) -> str:
        self.writer.write(line.encode() + b"\n")
        return (await asyncio.wait_for(self.reader.readline(), timeout)).decode().strip()


async def controls(port: int) -> dict[int, Control]:
    found: dict[int, Control] = {}
    spare = []
    while len(found) < 2:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HELLO\n")
        worker = int((await reader.readline()).split()[1])
        if worker in found:
            spare.append(writer)
        else:
            found[worker] = Control(reader, writer, worker)
    for writer in spare:
        writer.close()
    return found


async def route_run(hub: Any, ctl: dict[int, Control], loadgen: Path, cross: bool,
                    count: int) -> dict[str, Any]:
    from tether.workers import pool_of

    pids = pool_of(hub).pids()
    sink = await asyncio.create_subprocess_exec(
        str(loadgen), "sink", "127.0.0.1", str(hub.port), "200", str(count), "120",
        stdout=subprocess.PIPE)
    assert sink.stdout is not None
    assert (await sink.stdout.readline()).startswith(b"ready")
    await asyncio.sleep(0.3)
    target = 2 if cross else 1
    ids = await ctl[target].ask("IDS")
    c0 = {w: cpu_seconds(p) for w, p in pids.items()}
    done = await ctl[1].ask(f"BLAST {count} {MSG} {ids}")
    out, _ = await sink.communicate()
    c1 = {w: cpu_seconds(p) for w, p in pids.items()}
    result = json.loads(out.decode().strip().splitlines()[-1])
    cpu = sum(c1[w] - c0[w] for w in pids)
    await asyncio.sleep(0.3)  # the sink's connections end
    return {"bench": "route", "kind": "cross-worker" if cross else "same-worker",
            "messages": result["messages"], "targets": ids.count(",") + 1,
            "rate": result["rate"], "sender_seconds": float(done.split()[1]),
            "workers_cpu_s_per_million": round(cpu / count * 1e6, 2)}


async def route(loadgen: Path, rounds: int, count: int) -> list[dict[str, Any]]:
    hub = await start_pool(2, blaster)
    results: dict[str, list[dict[str, Any]]] = {"same-worker": [], "cross-worker": []}
    try:
        ctl = await controls(hub.port)
        for _ in range(rounds):
            for cross in (False, True):
                r = await route_run(hub, ctl, loadgen, cross, count)
                results[r["kind"]].append(r)
                emit(r)
        for c in ctl.values():
            c.writer.close()
    finally:
        await hub.aclose(2.0)
    same = statistics.median(r["rate"] for r in results["same-worker"])
    cross = statistics.median(r["rate"] for r in results["cross-worker"])
    cpu_same = statistics.median(r["workers_cpu_s_per_million"] for r in results["same-worker"])
    cpu_cross = statistics.median(r["workers_cpu_s_per_million"]
                                  for r in results["cross-worker"])
    summary = {"bench": "route-ratio", "same_worker_rate": same, "cross_worker_rate": cross,
               "cross_vs_same": round(cross / same, 2),
               "cpu_s_per_million_same": cpu_same, "cpu_s_per_million_cross": cpu_cross}
    emit(summary)
    return [*results["same-worker"], *results["cross-worker"], summary]


# --- driver --------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, loadgen: Path) -> list[dict[str, Any]]:
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = 2.0 if args.quick else 4.0
    only = set(args.only.split(","))
    out: list[dict[str, Any]] = []
    if "echo" in only:
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for _ in range(rounds):  # interleaved: neighbours hit both alike
            for workers in (1, 2):
                r = await echo_run(loadgen, workers, 1000, 16, seconds)
                runs[workers].append(r)
                emit(r)
                out.append(r)
        med = {w: statistics.median(r["rate"] for r in v) for w, v in runs.items()}
        per_cpu = {w: statistics.median(r["rate_per_cpu_s"] for r in v) for w, v in runs.items()}
        load = {w: statistics.median(r["loadgen_cpu"] for r in v) for w, v in runs.items()}
        cpu = {w: statistics.median(r["workers_cpu"] for r in v) for w, v in runs.items()}
        summary = {"bench": "echo-scaling", "rate_1": med[1], "rate_2": med[2],
                   "scaling": round(med[2] / med[1], 2), "workers_cpu_1": cpu[1],
                   "workers_cpu_2": cpu[2], "loadgen_cpu_1": load[1], "loadgen_cpu_2": load[2],
                   "rate_per_cpu_s_1": per_cpu[1], "rate_per_cpu_s_2": per_cpu[2],
                   "cores": os.cpu_count()}
        emit(summary)
        out.append(summary)
    if "memory" in only:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        top = 4 * (soft * 3 // 4)
        levels = [n for n in (10_000, 30_000, 60_000) if n <= top] or [top]
        if args.quick:
            levels = levels[:2]
        out += await memory(levels)
    if "route" in only:
        out += await route(loadgen, rounds, 300_000 if args.quick else 1_000_000)
    return out


def record(results: list[dict[str, Any]]) -> None:
    """Replace the results block of docs/workers.md."""
    text = DOC.read_text()
    rows = ",\n".join(json.dumps(r) for r in results)
    block = f"{BEGIN}\n```json\n[\n{rows}\n]\n```\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)
    print(f"recorded in {DOC}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", default="echo,memory,route")
    parser.add_argument("--record", action="store_true",
                        help="write the results into docs/workers.md")
    parser.add_argument("--record-from", metavar="FILE",
                        help="record the JSON lines an earlier run printed, run nothing")
    args = parser.parse_args()
    if args.record_from:
        lines = Path(args.record_from).read_text().splitlines()
        record([json.loads(line) for line in lines if line.startswith("{")])
        return 0
    sys.path.insert(0, str(HERE.parent / "src"))
    from tether.aio import run

    with tempfile.TemporaryDirectory() as tmp:
        loadgen = build_loadgen(Path(tmp))
        results = run(run_all(args, loadgen))
    if args.record:
        record(results)
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main())
