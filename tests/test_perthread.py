"""PerThread: one object per thread, made on first use; and the three modules that keep
their per-thread object with it."""

from __future__ import annotations

import threading

from tether import coalesce, heldreads, readbuf
from tether.perthread import PerThread


def test_one_object_per_thread_made_on_first_use() -> None:
    made: list[object] = []

    def factory() -> object:
        made.append(obj := object())
        return obj

    per_thread: PerThread[object] = PerThread(factory)
    assert made == []
    mine = per_thread.get()
    assert per_thread.get() is mine and made == [mine]
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.extend([per_thread.get(), per_thread.get()]))
    thread.start()
    thread.join()
    assert seen[0] is seen[1] and seen[0] is not mine and made == [mine, seen[0]]
    assert per_thread.get() is mine


def test_the_read_buffer_coalescer_and_held_reads_are_per_thread() -> None:
    getters = (readbuf.current, coalesce.current, heldreads.current)
    mine = [get() for get in getters]
    assert [get() for get in getters] == mine
    theirs: list[object] = []
    thread = threading.Thread(target=lambda: theirs.extend(get() for get in getters))
    thread.start()
    thread.join()
    assert all(a is not b for a, b in zip(mine, theirs, strict=True))
    assert [type(a) for a in mine] == [type(b) for b in theirs]
