"""A pool shut down while a worker is being (re)started ends every worker process (real
processes; the first test failed before its fix, the second guards the first start)."""

from __future__ import annotations

import asyncio
import os
import signal

from test_workers import APP, _zombie_or_other
from tether.hub import Hub
from tether.workers import pool_of


def _ours(pid: int) -> bool:
    """A live child of this process (not gone, a zombie, or a reused PID)."""
    return not _zombie_or_other(pid)


async def test_aclose_while_a_worker_is_being_respawned_stops_it() -> None:
    """aclose() called while the supervisor is starting the replacement of a killed
    worker (the spawn in progress) must end that process too, in bounded time."""
    hub = Hub("127.0.0.1", 0, workers=1, handler=APP)
    pool = pool_of(hub)
    await hub.start()
    seen = set(pool.pids().values())
    slot = pool._slots[0]
    try:
        os.kill(pool.pids()[1], signal.SIGKILL)
        # wait for the restart to be under way: the slot is "starting", no process yet
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not (slot.state == "starting" and slot.proc is None):
            assert loop.time() < deadline
            await asyncio.sleep(0)
        await asyncio.wait_for(hub.aclose(1.0), 10.0)
        seen |= set(pool.pids().values())
        if slot.pid:
            seen.add(slot.pid)
        assert pool.pids() == {}
        assert not [pid for pid in seen if _ours(pid)]
    finally:
        for s in pool._slots:  # whatever is left, by PID
            if s.pid and _ours(s.pid):
                os.kill(s.pid, signal.SIGKILL)
        for pid in seen:
            if _ours(pid):
                os.kill(pid, signal.SIGKILL)


async def test_aclose_while_the_pool_is_starting_ends_every_worker() -> None:
    """aclose() during start(): start fails or finishes, aclose returns in bounded
    time, and no worker process is left."""
    hub = Hub("127.0.0.1", 0, workers=3, handler=APP)
    pool = pool_of(hub)
    starting = asyncio.ensure_future(hub.start())
    seen: set[int] = set()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not pool._slots[0].pid:
            assert loop.time() < deadline
            await asyncio.sleep(0)
        seen |= {s.pid for s in pool._slots if s.pid}
        await asyncio.wait_for(hub.aclose(1.0), 10.0)
        await asyncio.wait_for(asyncio.gather(starting, return_exceptions=True), 10.0)
        seen |= {s.pid for s in pool._slots if s.pid}
        assert pool.pids() == {}
        assert not [pid for pid in seen if _ours(pid)]
    finally:
        starting.cancel()
        seen |= {s.pid for s in pool._slots if s.pid}
        for pid in seen:
            if _ours(pid):
                os.kill(pid, signal.SIGKILL)
