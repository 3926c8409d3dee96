"""LoopStalls: the longest time this process was kept off the CPU while a test waited.

A flow with the minimum liveness (10 ms) goes DOWN, as it should, when its process is
not scheduled for about that long: on a CI machine running several test processes on
two vCPUs, that happens. A test of such a flow watches for it, and tells "this process
was starved" (a DOWN is then the right answer) from "the loop was busy" (this process
ran, and a DOWN would be tether's own delay): a gap between the watcher's wake-ups in
which the process used almost no CPU time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType

__all__ = ["LoopStalls"]


class LoopStalls:
    """`async with LoopStalls() as stalls:` -- `stalls.starved` is the longest gap, in
    seconds, between two 1 ms wake-ups of a watcher task in which this process ran for
    less than a fifth of the gap."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.starved = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        wall, cpu = time.monotonic(), time.process_time()
        while True:
            await asyncio.sleep(self.period)
            now_wall, now_cpu = time.monotonic(), time.process_time()
            gap = now_wall - wall - self.period
            if gap > 0 and now_cpu - cpu < gap / 5:
                self.starved = max(self.starved, gap)
            wall, cpu = now_wall, now_cpu

    async def __aenter__(self) -> LoopStalls:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
