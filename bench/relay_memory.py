"""Memory per relayed connection: what the agent, the gateway and the connector hold
for each open connection, and how many one process can carry.

    python bench/relay_memory.py                  # 0, 2000, 4000, 6000 connections
    python bench/relay_memory.py --steps 0,1000   # a quicker run

Starts a gateway, a connector and an agent (the CLI, one process each, `--log-level
WARNING`) and an echo server in this process. At each step it opens connections
through the agent, up to the step's count, each echoing one 100-byte request, then
leaves them open and idle, settles, and reads every daemon's RSS (`/proc/PID/status`,
VmRSS) and open descriptors (`/proc/PID/fd`). One JSON line per daemon and step, then
the slope (bytes per connection, least squares over the steps) per daemon and the
connections one process could hold within the 20,000 descriptors it may open (the
agent and the connector each hold one socket per connection; the gateway none).
Every process started is ended by PID (SIGTERM, then SIGKILL: `benchlib.Proc`); every
socket opened is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import sys

from benchlib import HOST, Proc, cpu_pressure, emit, processes, source_rev


def daemon(role: str, argv: list[str]) -> Proc:
    """One tether daemon (the CLI), named by its role."""
    return Proc(role, [sys.executable, "-m", "tether.cli", "--log-level", "WARNING", *argv])


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def open_connections(port: int, n: int, into: list[asyncio.StreamWriter]) -> None:
    """Open `n` more connections through the agent, 100 at a time, each echoing once."""
    async def one() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"x" * 100)
        got = await asyncio.wait_for(reader.readexactly(100), 30)
        assert got == b"x" * 100
        into.append(writer)

    for start in range(0, n, 100):
        await asyncio.gather(*(one() for _ in range(min(100, n - start))))


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of (x, y)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


async def main(args: argparse.Namespace) -> None:
    steps = sorted({int(s) for s in args.steps.split(",")})
    need = max(steps) + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    emit("relay_memory", "meta", None, "", rev=source_rev(), steps=steps,
         cpu_pressure_avg10=cpu_pressure())
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(Echo, HOST, 0, backlog=4096)
    echo_port = echo.sockets[0].getsockname()[1]
    writers: list[asyncio.StreamWriter] = []
    with processes() as daemons:  # (stopped last: after the connections are closed)
        try:
            gw = daemon("gateway", ["gateway", "--listen", f"{HOST}:0", "--name", "gw1",
                                    "--admin", "none"])
            daemons.append(gw)
            gw_port = gw.wait_for(r"gateway gw1 listening on port (\d+)")[1]
            co = daemon("connector", ["connector", "--gateway", f"{HOST}:{gw_port}",
                                      "--service", f"echo={HOST}:{echo_port}",
                                      "--admin", "none"])
            daemons.append(co)
            co.wait_for(r"serving echo")
            ag = daemon("agent", ["agent", "--gateway", f"{HOST}:{gw_port}", "--forward",
                                  f"{HOST}:0=echo", "--admin", "none"])
            daemons.append(ag)
            port = int(ag.wait_for(r"forwarding 127\.0\.0\.1:(\d+) to echo")[1])
            await asyncio.sleep(0.5)
            points: dict[str, list[tuple[int, int]]] = {d.name: [] for d in daemons}
            for step in steps:
                await open_connections(port, step - len(writers), writers)
                await asyncio.sleep(args.settle)
                for d in daemons:
                    rss, fds = d.rss(), d.fds()
                    points[d.name].append((step, rss))
                    emit("relay_memory", d.name, rss / 1e6, "MB RSS", connections=step,
                         fds=fds)
            for d in daemons:
                per = slope(points[d.name])
                fds_per = 0 if d.name == "gateway" else 1
                emit("relay_memory", f"{d.name} per connection", per, "B", steps=steps,
                     max_connections_by_fds=(19_900 // fds_per) if fds_per else None,
                     rss_at_19900_MB=round((points[d.name][0][1] + per * 19_900) / 1e6, 1))
        finally:
            for w in writers:
                w.close()
            echo.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="0,2000,4000,6000",
                        help="connection counts to measure at (default 0,2000,4000,6000)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to wait before each reading (default 1)")
    with contextlib.suppress(ImportError):
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main(parser.parse_args()))
