"""PerThread: one object per thread, made on first use.

For what the callbacks of an event loop share in the thread that runs it (a loop runs
in one thread at a time): the read buffer (`tether.readbuf`), the write coalescer
(`tether.coalesce`), the held reads (`tether.heldreads`). Each module's `current()`
returns its object for the calling thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["PerThread"]

T = TypeVar("T")


class PerThread(Generic[T]):
    """`get()` returns the calling thread's object, `factory()` made on its first call
    in that thread."""

    __slots__ = ("_factory", "_local")

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._local = threading.local()

    def get(self) -> T:
        """This thread's object."""
        try:
            value: T = self._local.value
        except AttributeError:
            value = self._local.value = self._factory()
        return value
