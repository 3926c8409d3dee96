"""A worker that cannot reach another, up, worker's socket for a while (here: its
socket file moved away for 2 s while the first worker restarts, real SIGKILL) keeps
trying: once the socket is back, what it routed meanwhile and after is delivered."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from test_workers import TIMEOUT, running, spread
from tether.workers import pool_of


async def test_a_worker_reaches_a_peer_it_could_not_reach_for_two_seconds() -> None:
    async with running(2) as hub:
        pool = pool_of(hub)
        assert pool.run_dir is not None
        clients, by = await spread(hub.port, 2, each=1)
        target = by[2][0]
        sock = pool.run_dir / "w2.sock"
        hidden = pool.run_dir / "w2.sock.hidden"
        old = pool.pids()[1]
        os.kill(old, signal.SIGKILL)
        os.rename(sock, hidden)  # the restarted worker 1 cannot connect to worker 2
        try:
            deadline = time.monotonic() + TIMEOUT
            while pool.worker_states()[1] != "up" or pool.pids().get(1, old) == old:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            more, by1 = await spread(hub.port, 2, each=1, start=0)
            sender = by1[1][-1]
            await asyncio.sleep(2.0)  # longer than the former 50 attempts (about 1 s)
            assert await sender.ask("PING") == "PONG 1"
            sender.send(f"SEND {target.id} while-unreachable")
        finally:
            os.rename(hidden, sock)
        sender.send(f"SEND {target.id} after")
        assert await target.line() == "while-unreachable"
        assert await target.line() == "after"
        for c in clients + more:
            c.close()
