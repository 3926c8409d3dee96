"""A TLS hub's connection rate and throughput (bench/hub.py's load generator has no TLS).

    python bench/hub_tls.py                      # this checkout's src/
    python bench/hub_tls.py --src OTHER/src      # another version, for a before/after

The server, a child process pinned to core 0, is ``tether.Hub(tls=...)`` echoing with
the plain event API (``async for event in hub`` + ``hub.send``), under asyncio's loop
and under uvloop, imported from ``--src``; the clients are this process (uvloop, Python's
ssl), pinned to core 1. A throwaway certificate is made with the openssl CLI. Measures:

* ``connect``: TLS connections one at a time (connect, handshake, one line echoed,
  close): wall time per connection;
* ``connect50``: the same, 50 at a time: connections per second;
* ``refused50``: plain-TCP clients sending an HTTP request to the TLS port, 50 at a
  time: failed handshakes per second (the server logs at INFO, to /dev/null);
* ``echo``: 20 TLS connections each echoing 16 KiB of 64-byte lines at a time:
  MB/s.

Each figure is also given per CPU-second of the server (``per_cpu_s``), which is less
sensitive to neighbours on a shared machine than the wall-clock rate. One JSON line
per result; the median of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from benchlib import HOST, at_a_time, cpu_pressure, emit, source_rev

HERE = Path(__file__).resolve().parent
SERVER_CPU = 0
CLIENT_CPU = 1
LINE = b"x" * 63 + b"\n"


# --- the server (a child process: --serve) ------------------------------------------------


def serve(loop_kind: str, cert: str, key: str) -> None:
    """Run an echoing TLS hub; print its port; run until killed."""
    import logging

    import uvloop

    from tether.errors import FlowClosed
    from tether.hub import Data, Hub
    from tether.tlsfiles import ServerTLS

    logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"))  # noqa: SIM115
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {SERVER_CPU})

    async def main() -> None:
        async with Hub(HOST, 0, tls=ServerTLS(cert, key)) as hub:
            print(hub.port, flush=True)
            send = hub.send
            async for event in hub:
                if type(event) is Data:
                    with contextlib.suppress(FlowClosed):
                        send(event.id, event.data)

    factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


# --- the clients ------------------------------------------------------------------------


def cpu_of(pid: int) -> float:
    """CPU seconds used so far by the main thread of ``pid`` (the server has no other
    busy thread), in ns from schedstat: benchlib.cpu_of counts 10 ms ticks, too coarse
    for a few thousand failed handshakes."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9



async def tls_connect(port: int, ctx: ssl.SSLContext) -> None:
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx,
                                                   server_hostname="localhost")
    writer.write(LINE)
    assert await reader.readline() == LINE
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def refused(port: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    with contextlib.suppress(ConnectionError):
        await reader.read()
    writer.close()



async def echo(port: int, ctx: ssl.SSLContext, seconds: float, conns: int = 20) -> int:
    """Bytes echoed by ``conns`` connections in ``seconds``, 16 KiB of lines at a time."""
    chunk = LINE * 256
    total = 0

    async def one() -> None:
        nonlocal total
        reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx,
                                                       server_hostname="localhost")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            writer.write(chunk)
            await reader.readexactly(len(chunk))
            total += len(chunk)
        writer.close()

    await asyncio.gather(*(one() for _ in range(conns)))
    return total


async def measure(pid: int, port: int, ctx: ssl.SSLContext, quick: bool
                  ) -> dict[str, tuple[float, float]]:
    """name -> (rate, rate per server CPU-second)."""
    n = 100 if quick else 500
    results: dict[str, tuple[float, float]] = {}

    async def timed(name: str, count: float, run: Awaitable[Any]) -> None:
        cpu, start = cpu_of(pid), time.perf_counter()
        got = await run
        wall, used = time.perf_counter() - start, cpu_of(pid) - cpu
        count = got if name == "echo" else count
        results[name] = (count / wall, count / max(used, 1e-3))

    await timed("connect", n, at_a_time(n, 1, lambda: tls_connect(port, ctx)))
    await timed("connect50", 5 * n, at_a_time(5 * n, 50, lambda: tls_connect(port, ctx)))
    await timed("refused50", 10 * n, at_a_time(10 * n, 50, lambda: refused(port)))
    await timed("echo", 0, echo(port, ctx, 1.0 if quick else 3.0))
    return results


def make_cert(directory: str) -> tuple[str, str]:
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    return cert, key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(HERE.parent / "src"),
                        help="the src/ directory whose tether the server imports")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--serve", nargs=3, metavar=("LOOP", "CERT", "KEY"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {CLIENT_CPU})
    rounds = 1 if args.quick else args.rounds
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.src))
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_cert(tmp)
        ctx = ssl.create_default_context(cafile=cert)
        for loop_kind in ("asyncio", "uvloop"):
            rows: dict[str, list[tuple[float, float]]] = {}
            for _ in range(rounds):
                server = subprocess.Popen(
                    [sys.executable, __file__, "--serve", loop_kind, cert, key],
                    stdout=subprocess.PIPE, env=env, text=True)
                try:
                    assert server.stdout is not None
                    port = int(server.stdout.readline())
                    import uvloop

                    got = uvloop.run(measure(server.pid, port, ctx, args.quick))
                finally:
                    server.kill()
                    server.wait()
                for name, pair in got.items():
                    rows.setdefault(name, []).append(pair)
            for name, values in rows.items():
                unit = "MB/s" if name == "echo" else ("conn/s" if name != "connect" else "µs")
                rate = statistics.median(v[0] for v in values)
                per_cpu = statistics.median(v[1] for v in values)
                if name == "echo":
                    rate, per_cpu = rate / 1e6, per_cpu / 1e6
                shown = 1e6 / rate if name == "connect" else rate
                emit("hub_tls", name, shown, unit, loop=loop_kind, per_cpu_s=per_cpu,
                     rounds=rounds, src=args.src, rev=source_rev(),
                     cpu_pressure=cpu_pressure())


if __name__ == "__main__":
    main()
