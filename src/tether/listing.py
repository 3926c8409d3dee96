"""The open things a daemon's status lists: the oldest first, and only so many.

A status is read by people (and scripts) while the daemon runs its flows in the same
loop: listing 400,000 open flows took about 2.5 s (most of it serialising them), in
which none of them moved.
So a status lists a bounded number, the oldest (the likeliest to be stuck), and says
how many there are in all."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Protocol, TypeVar

__all__ = ["oldest"]


class _Opened(Protocol):
    @property
    def opened_at(self) -> float: ...


T = TypeVar("T", bound=_Opened)


def oldest(items: Iterable[T], limit: int | None) -> list[T]:
    """The `limit` items opened first (`opened_at`), oldest first; all of them with
    None. O(n log limit)."""
    if limit is None:
        return sorted(items, key=_opened_at)
    return heapq.nsmallest(limit, items, key=_opened_at)


def _opened_at(item: _Opened) -> float:
    return item.opened_at
