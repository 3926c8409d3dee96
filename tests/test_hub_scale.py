"""10,000 concurrent connections held and echoed. The clients run in a subprocess: the
process file limit here is 20,000 and each side needs one descriptor per connection."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import textwrap

import pytest
import uvloop

from test_hub_support import Recorder, until
from tether.hub import Hub

N = 10_000

CLIENTS = textwrap.dedent("""
    import asyncio, sys, uvloop

    async def main(port, n):
        sem = asyncio.Semaphore(500)
        conns = []

        async def one(i):
            async with sem:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"hello %d\\n" % i)
                line = await reader.readline()
                assert line == b"hello %d\\n" % i, line
                conns.append((reader, writer))

        await asyncio.gather(*(one(i) for i in range(n)))
        print("held", len(conns), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for reader, writer in conns:  # echo once more while all are held, then leave
            writer.write(b"bye\\n")
        for reader, writer in conns:
            assert await reader.readline() == b"bye\\n"
            writer.close()
        print("done", flush=True)

    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
""")


@pytest.mark.slow
def test_ten_thousand_connections_held_and_echoed() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < N + 500:
        pytest.skip(f"needs {N + 500} file descriptors per process, the limit is {soft}")

    async def main() -> None:
        async with Hub(backlog=4096) as hub:
            rec = Recorder(hub, echo=True).start()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLIENTS, str(hub.port), str(N),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert proc.stdin is not None and proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 40)
            assert line == b"held %d\n" % N
            assert len(hub) == N and hub.stats().open == N
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"done\n"
            assert await proc.wait() == 0
            await until(lambda: len(rec.closed) == N, timeout=20)
            rec.check_exactly_once()
            stats = hub.stats()
            assert stats.messages_in == stats.messages_out == 2 * N
            assert stats.closed_total == N and stats.open == 0
            await rec.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 90))
