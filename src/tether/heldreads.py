"""HeldReads: the rest of a read whose stream end a relay passed on ahead, applied once
the loop has slept.

A relay hop that reads a lone FIN or CLOSE passes the end on first (the gateway's splice
writes it to the next link, a node's socket bridge shuts its socket down: see
`Link.peek_stream_end`), and the link's own handling of that frame -- the stream's
state, the flow's events, the splice's or bridge's bookkeeping, its log line -- comes
after. On loopback the next hop is woken by that write, and where the hops share a CPU
(as the processes of a relay often do, see docs/benchmarks.md, "One close, step by
step") it runs only once the writer sleeps: everything the writer does after its
write is then on the path of the close, as much as what it did before.

So the link keeps that read's bytes here, and they are applied:

* at the start of the next callback of any link or socket bridge of this thread (its
  `data_received`, `eof_received`, `connection_lost`, `resume_writing`, timers), so
  that every event is still handled in the order its bytes arrived;
* `DELAY` after the first of them was held, if nothing applied them before (one timer
  for the thread, not one per read);
* before a node or gateway closes (`apply`).

Nothing but the timing changes: the held bytes are the frame itself, applied as if
they had arrived a little later. What could tell the difference is the state seen
between the two -- a counter read from Python -- for at most `DELAY` plus the loop's
timer resolution; the admin endpoint (`tether status`, `/metrics`) applies the held
reads before it answers.

There is one per thread (one event loop runs in a thread at a time), taken by
`current()`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from .perthread import PerThread

__all__ = ["DELAY", "HeldReads", "Holder", "current"]

DELAY = 0.01
"""How long reads may stay held when nothing else comes: 10 ms. Only bookkeeping waits
(a flow's state and counters, its log line), and the timer is armed once per `DELAY` at
most, not once per close: at 1 ms a relay armed it, and woke up for it, on nearly every
close; at 10 ms its close p50 measured 2-5 % lower, and its p99 with two gateways 20-27 %
lower (docs/benchmarks.md, "The held reads' timer")."""


class Holder(Protocol):
    """A connection whose read waits here (a `LinkConnection`)."""

    def apply_held(self, data: bytes) -> None:
        """Handle `data`, a read held by `HeldReads.hold`."""


class HeldReads:
    """The reads held in this thread, in the order they were read (see the module
    docstring)."""

    __slots__ = ("_armed", "reads")

    def __init__(self) -> None:
        self.reads: list[tuple[Holder, bytes]] = []
        self._armed: asyncio.AbstractEventLoop | None = None  # the loop with our timer

    def hold(self, holder: Holder, data: bytes, loop: asyncio.AbstractEventLoop) -> None:
        """Keep `data`, just read by `holder` in `loop` (the running one: the caller's,
        which spares a `getpid(2)` after the write), to be applied later (see the
        module)."""
        if self._armed is not loop:
            if self._armed is not None:  # a loop this thread ran before, now stopped:
                self.reads.clear()  # what it held belongs to connections it left behind
            self._armed = loop
            loop.call_later(DELAY, self._due)
        self.reads.append((holder, data))

    def apply(self) -> None:
        """Apply every held read now, in order (also the ones held meanwhile)."""
        while self.reads:
            reads, self.reads = self.reads, []
            for i, (holder, data) in enumerate(reads):
                try:
                    holder.apply_held(data)
                except BaseException:
                    self.reads[:0] = reads[i + 1:]  # still held: applied at the next call
                    raise

    def _due(self) -> None:
        self._armed = None
        self.apply()


_PER_THREAD: PerThread[HeldReads] = PerThread(HeldReads)


def current() -> HeldReads:
    """This thread's held reads."""
    return _PER_THREAD.get()
