"""WriteCoalescer: one write per socket per read, however many frames the read moved.

A relay handles one read at a time: a gateway's read from one link may complete
several DATA frames for several flows, each spliced into another link; a connector's
read may complete several frames for one application socket. Writing each frame as it
is produced costs one `writev` (and one wake-up of the reader on the other side) per
frame. Instead, while a read is being handled, the sockets it writes to register here,
keep their bytes, and are written once each when the read is done -- still inside the
same callback, so nothing waits for another turn of the loop and the order of bytes on
each socket is unchanged.

There is one coalescer per thread (one event loop runs in a thread at a time, and a
read's handling never spans an `await`), taken once per connection by `current()`.
"""

from __future__ import annotations

from typing import Protocol

from .perthread import PerThread

__all__ = ["Deferred", "WriteCoalescer", "current"]


class Deferred(Protocol):
    """Something holding bytes for its socket until the read in progress is done."""

    def write_deferred(self) -> None:
        """Write what was held (called once per registration)."""


class WriteCoalescer:
    """Counts the reads in progress (they nest: a read's handling may cause another
    protocol's callback to run synchronously) and writes the held bytes when the
    outermost one ends."""

    __slots__ = ("depth", "queued")

    def __init__(self) -> None:
        self.depth = 0
        self.queued: list[Deferred] = []

    def begin(self) -> None:
        """A read's handling starts."""
        self.depth += 1

    def end(self) -> None:
        """A read's handling ends; the outermost end writes everything held."""
        try:
            if self.depth == 1 and self.queued:
                self._write_all()
        finally:
            self.depth -= 1

    def defer(self, holder: Deferred) -> None:
        """`holder` has bytes to write at the end of the read (register once)."""
        self.queued.append(holder)

    def _write_all(self) -> None:
        # A write may produce more (credit given back once bytes are written): loop
        # until nothing is held. Still at depth 1, so such writes are coalesced too.
        while self.queued:
            queued, self.queued = self.queued, []
            for i, holder in enumerate(queued):
                try:
                    holder.write_deferred()
                except BaseException:
                    self.queued[:0] = queued[i + 1:]  # still held: written at the next end
                    raise


_PER_THREAD: PerThread[WriteCoalescer] = PerThread(WriteCoalescer)


def current() -> WriteCoalescer:
    """This thread's coalescer."""
    return _PER_THREAD.get()
