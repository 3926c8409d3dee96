"""ReadBuffer: large reads with no copy, for a `BufferedProtocol`; `LargeReads`: a
protocol that reads small through the loop and large through the buffer.

uvloop and asyncio read at most 256 KiB per call into a buffer of their own, then copy
it into a new `bytes` for `data_received`. A relay's cost per read is mostly Python
(decoding frames, state machines, framing again), so a bulk flow pays it every 256 KiB.
A `BufferedProtocol` names the buffer itself. With this one, a read takes up to `size`
bytes (1 MiB) into a scratch `bytearray` that every connection of the thread shares --
reads never nest: the loop handles one at a time, start to end -- and then:

* a large read is handed on as a read-only view of the scratch, nothing copied. If
  anything still holds part of it when the next read starts (bytes queued behind a
  slow link), the scratch is *pinned*: it stays theirs, and the read goes into another
  scratch -- one whose views are all gone, or a new one. A view never sees its bytes
  change;
* a smaller read (under `copy_below`, 256 KiB: the most the loops read at once) is
  copied out, as the loops do, so the scratch is free again at once and a quiet
  connection pins nothing.

A pinned scratch may be held by a few bytes only (a flow's last piece, waiting for
credit), so their number is capped (`max_pinned`). At the cap a large read is *lent*:
a writable view of the scratch, valid while the callback runs, and whoever keeps a
part of it copies that part -- the frame decoder copies each DATA payload (it copies
from any writable buffer), a bridge the bytes it parks for credit. Copying the whole
read instead, as this module once did, made one `bytes` that every frame cut from it
kept alive: with many slow flows on a link, a flow holding a few KiB held a whole
1 MiB read (a gateway held 1.4 MB per stalled flow, its windows 256 KiB). Should a
lent view be kept all the same, the scratch is pinned by it like any other and never
written again while the view lives: a holder never sees its bytes change. Memory is
thus at most `(max_pinned + 1) * size` per thread (9 MiB) beyond the bytes actually
queued, and no buffer is kept per connection.

Small reads are better left to the loop, though: a `BufferedProtocol`'s read costs
three Python calls (`get_buffer`, `buffer_updated`, the buffer's bookkeeping), even
the read that finds the peer's EOF, where a plain `Protocol` gets one
(`data_received`, the `bytes` made by the loop's C code). On a relay's close path,
where every hop's wake-up is latency, that was 4-7 % of it (docs/benchmarks.md, "Small
reads from the loop"). So tether's connections are plain Protocols that call
`read_large` on a large read (`LARGE_READ`): the transport then reads into this
buffer through a `LargeReads` face until `SMALL_READS` small reads in a row give the
reads back to the loop.

Parked reads. A relay's edge reads its socket before it knows how much of the read its
flow's credit will take; the rest waits (reading paused) until credit comes. For one
flow that is at most one read, and reading large is what makes a bulk flow cheap. But
a read is up to 1 MiB where a window is 256 KiB, so with many slow consumers each
stalled flow held about 1 MB at the edge (400 of them, 412 MB). The readers count what
they hold in `ReadBuffer.parked`; while the thread's total is over `park_budget`
(16 MiB), a reader that parks hands its reads to `LargeReads`, which sizes each read
by the reader's `read_room` (its flow's credit, at least `LARGE_READ`). A few bulk
flows never reach the budget and read as before; past it, each stalled flow holds at
most about `LARGE_READ` more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .perthread import PerThread

__all__ = ["LARGE_READ", "PARK_BUDGET", "SMALL_READ", "SMALL_READS", "LargeReads", "ReadBuffer",
           "current", "read_large"]

LARGE_READ = 64 * 1024
"""A read of this many bytes or more hands a connection's reads to `LargeReads`."""
PARK_BUDGET = 16 << 20
"""Bytes a thread's readers may hold for credit before their reads are sized by it."""
SMALL_READ = 4096
SMALL_READS = 4
"""This many reads in a row under `SMALL_READ` give them back to the loop."""


def _is_free(buffer: bytearray) -> bool:
    """No view of `buffer` exists (a bytearray cannot be resized while one does)."""
    try:
        buffer.append(0)
    except BufferError:
        return False
    del buffer[-1]
    return True


class ReadBuffer:
    """A thread's scratch for reads (see the module docstring). Use `get` in
    `get_buffer` and `take` in `buffer_updated`."""

    __slots__ = ("_free", "_pinned", "_scratch", "copy_below", "max_pinned", "park_budget",
                 "parked", "size")

    def __init__(self, size: int = 1 << 20, copy_below: int = 256 * 1024,
                 max_pinned: int = 8, park_budget: int = PARK_BUDGET) -> None:
        if not 0 < copy_below <= size:
            raise ValueError(f"copy_below {copy_below} must lie in [1, size {size}]")
        if max_pinned < 0:
            raise ValueError(f"max_pinned {max_pinned} must not be negative")
        self.size = size
        self.copy_below = copy_below
        self.max_pinned = max_pinned
        self.park_budget = park_budget
        self.parked = 0  # bytes read that their readers hold for credit (`LargeReads`)
        self._scratch: bytearray | None = None
        self._pinned: list[bytearray] = []  # scratches views may still hold
        # scratches whose views are all gone, for the next time the scratch is pinned: a
        # new one is `size` bytes zeroed by `memset`, freed again soon (5 % of a
        # gateway's CPU in a bulk transfer, when they were dropped: perf); with the
        # pinned ones, never more than `max_pinned`
        self._free: list[bytearray] = []

    @property
    def pinned(self) -> int:
        """Scratches held by views now (as of the last `get`)."""
        return len(self._pinned)

    def get(self) -> memoryview:
        """The buffer for the next read: the scratch, unless views of it are held; then
        a pinned one whose views are all gone, or a new one.

        A view, not the bytearray: a TLS transport fills it in pieces through slices
        (`buf[offset:]`), and a bytearray's slice is a copy."""
        scratch = self._scratch
        if scratch is not None:
            if _is_free(scratch):
                if self._pinned:
                    self._let_go()
                return memoryview(scratch)
            self._pinned.append(scratch)
            self._scratch = None
        self._let_go()
        if self._scratch is None:
            if self._free:
                self._scratch = self._free.pop()
            else:
                self._scratch = bytearray(self.size + 1)
                del self._scratch[-1]  # (room for `_is_free`'s probe: never reallocates)
        return memoryview(self._scratch)

    def _let_go(self) -> None:
        """The pinned scratches whose views are all gone: one becomes the scratch if
        there is none in use, the others are kept free (within `max_pinned`, pinned
        and free together) or forgotten."""
        still: list[bytearray] = []
        for old in self._pinned:
            if not _is_free(old):
                still.append(old)
            elif self._scratch is None:
                self._scratch = old
            else:
                self._free.append(old)
        self._pinned = still
        del self._free[max(0, self.max_pinned - len(still)):]

    def take(self, nbytes: int) -> bytes | memoryview:
        """The `nbytes` just read into the buffer `get` gave: a copy (a small read), a
        read-only view to keep (a large read, while fewer than `max_pinned` scratches
        are pinned), or else a writable view lent for the callback: copy what is kept
        of it."""
        scratch = self._scratch
        if scratch is None:
            raise RuntimeError("take() without get()")
        view = memoryview(scratch)[:nbytes]
        if nbytes < self.copy_below:
            data = view.tobytes()
            view.release()
            return data
        if len(self._pinned) >= self.max_pinned:
            return view
        return view.toreadonly()


_PER_THREAD: PerThread[ReadBuffer] = PerThread(ReadBuffer)


def current() -> ReadBuffer:
    """This thread's read buffer."""
    return _PER_THREAD.get()


class LargeReads(asyncio.BufferedProtocol):
    """A connection's face while its reads are large (see the module docstring): the
    transport reads into the thread's `ReadBuffer`; each read goes to the connection's
    `data_received`, and every other callback to the connection too."""

    __slots__ = ("buffer", "owner", "room", "small")

    def __init__(self, owner: Any, buffer: ReadBuffer) -> None:
        self.owner = owner  # an asyncio.Protocol with a `transport`
        self.buffer = buffer
        self.small = 0  # small reads in a row
        # a reader that holds what its flow cannot take yet (a bridge) says how much it
        # can take (see "Parked reads" above)
        self.room: Callable[[], int] | None = getattr(owner, "read_room", None)

    def get_buffer(self, sizehint: int) -> memoryview:
        buffer = self.buffer
        view = buffer.get()
        if buffer.parked > buffer.park_budget and self.room is not None:
            room = self.room()
            if room < len(view):
                return view[:room]
        return view

    def buffer_updated(self, nbytes: int) -> None:
        if nbytes < SMALL_READ:
            self.small += 1
            if self.small >= SMALL_READS:
                self.owner.transport.set_protocol(self.owner)
        else:
            self.small = 0
        self.owner.data_received(self.buffer.take(nbytes))

    def eof_received(self) -> bool | None:
        result: bool | None = self.owner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()


def read_large(owner: asyncio.Protocol, transport: Any) -> None:
    """`owner` just got a large read from `transport`: read into this thread's buffer
    from the next read on (unless that is so already)."""
    if transport is not None and transport.get_protocol() is owner \
            and not transport.is_closing():
        transport.set_protocol(LargeReads(owner, current()))
