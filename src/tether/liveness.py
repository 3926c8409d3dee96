"""Liveness timers: a hashed hierarchical timing wheel and the keepalive policy.

Sans-IO: nothing here reads a clock, sleeps or touches a socket. Every method that
depends on time takes ``now`` (float seconds, any epoch, never decreasing) and the
caller drives the timers by calling :meth:`TimingWheel.expire` or
:meth:`LivenessMonitor.poll` at (or after) the time given by ``next_deadline()``.

The wheel has ``levels`` levels of ``slots`` slots; a slot of level ``i`` spans
``tick * slots**i`` seconds. An entry lives in the lowest level whose current block
contains its deadline, cascades one or more levels down when its slot comes due,
and fires from level 0. Deadlines beyond the top level's span wait in a sparse
overflow table keyed by top-level block, so memory is ``O(slots * levels + entries)``
whatever the deadlines, and an entry is touched at most ``levels + 1`` times.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Hashable, Iterable
from typing import ClassVar, Final, Generic, TypeVar

__all__ = ["LivenessMonitor", "TimingWheel"]

K = TypeVar("K", bound=Hashable)

_INF = math.inf
_SCAN_LIMIT = 64


def _check_time(value: float, what: str) -> None:
    if not -_INF < value < _INF:
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")


_STALE: Final = object()


class TimingWheel(Generic[K]):
    """A hashed hierarchical timing wheel mapping keys to deadlines.

    ``schedule``, ``cancel`` and ``deadline_of`` are O(1). ``expire(now)`` costs
    O(entries fired or cascaded + slots * levels) at worst, and O(1 + entries fired)
    when called once per tick.

    Guarantees:

    * an entry is never returned before its deadline: ``expire(now)`` returns a key
      only if its deadline ``<= now``;
    * an entry is returned by the first ``expire(now)`` call with ``now >= deadline``
      (so at most one tick late when the driver wakes up at ``next_deadline()``,
      which is at most the deadline rounded up to the next tick boundary).
    """

    __slots__ = (
        "_bits",
        "_cached_next",
        "_cur",
        "_early",
        "_index",
        "_levels",
        "_mask",
        "_max_deadline",
        "_maxbits",
        "_nslots",
        "_offsets",
        "_overflow",
        "_shifts",
        "_slots",
        "_tick",
    )

    def __init__(
        self, tick: float = 0.01, now: float = 0.0, slots: int = 64, levels: int = 8
    ) -> None:
        """Create an empty wheel whose clock starts at ``now``.

        ``tick`` is the width in seconds of a level-0 slot; ``slots`` (a power of two
        >= 2) is the number of slots per level; ``levels`` >= 1 is the number of levels.
        """
        if not 0.0 < tick < _INF:
            raise ValueError(f"tick must be a positive finite number of seconds, got {tick!r}")
        if slots < 2 or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two >= 2, got {slots!r}")
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels!r}")
        _check_time(now, "now")
        bits = slots.bit_length() - 1
        maxbits = bits * levels
        self._tick = float(tick)
        self._bits = bits
        self._mask = slots - 1
        self._nslots = slots
        self._levels = levels
        self._maxbits = maxbits
        # Slot of tick t relative to the current tick c: level = (hb - 1) // bits where
        # hb = (t ^ c).bit_length(); these tables turn hb into the level's list offset
        # and the shift that extracts the slot digit.
        self._offsets = [0] + [(hb - 1) // bits * slots for hb in range(1, maxbits + 1)]
        self._shifts = [0] + [(hb - 1) // bits * bits for hb in range(1, maxbits + 1)]
        self._slots: list[dict[K, float]] = [{} for _ in range(slots * levels)]
        self._overflow: dict[int, dict[K, float]] = {}
        self._index: dict[K, dict[K, float]] = {}
        self._cur = int(now // self._tick)
        # True when the current slot may hold an entry due at or before the current
        # tick's start (scheduled in the past), so next_deadline() must look inside it.
        self._early = False
        self._max_deadline = sys.float_info.max * min(self._tick, 1.0) / 4
        # next_deadline() is asked after every I/O event but changes only when the wheel
        # does; _STALE marks the cache invalid.
        self._cached_next: float | object | None = _STALE

    @property
    def tick(self) -> float:
        """Width in seconds of a level-0 slot: the wheel's timing resolution."""
        return self._tick

    def __len__(self) -> int:
        """Number of scheduled keys."""
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is scheduled."""
        return key in self._index

    def deadline_of(self, key: K) -> float | None:
        """The deadline of ``key``, or None if it is not scheduled."""
        slot = self._index.get(key)
        return None if slot is None else slot[key]

    def schedule(self, key: K, deadline: float) -> None:
        """Schedule ``key`` at ``deadline``, replacing its previous deadline if any.

        A deadline in the past fires at the next ``expire`` call.
        """
        if not -self._max_deadline <= deadline <= self._max_deadline:
            raise ValueError(f"deadline must be a finite number of seconds, got {deadline!r}")
        slot = self._index.get(key)
        if slot is not None:
            del slot[key]
        self._cached_next = _STALE
        self._put(key, deadline)

    def cancel(self, key: K) -> bool:
        """Unschedule ``key``; return True if it was scheduled."""
        slot = self._index.pop(key, None)
        if slot is None:
            return False
        del slot[key]
        self._cached_next = _STALE
        return True

    def _put(self, key: K, deadline: float) -> None:
        """Insert ``key`` (absent from the wheel) at a validated ``deadline``."""
        tick = self._tick
        t = int(deadline // tick)
        c = self._cur
        if t <= c:
            if t < c or -(-deadline // tick) <= c:
                self._early = True
            slot = self._slots[c & self._mask]
        else:
            x = t ^ c
            if x >> self._maxbits:
                top = t >> self._maxbits
                found = self._overflow.get(top)
                if found is None:
                    found = self._overflow[top] = {}
                slot = found
            else:
                hb = x.bit_length()
                slot = self._slots[self._offsets[hb] + ((t >> self._shifts[hb]) & self._mask)]
        slot[key] = deadline
        self._index[key] = slot

    def _put_all(self, items: Iterable[tuple[K, float]]) -> None:
        """Insert many ``(key, deadline)`` pairs as ``_put`` would, faster."""
        self._cached_next = _STALE
        tick = self._tick
        c = self._cur
        mask = self._mask
        maxbits = self._maxbits
        slots = self._slots
        offsets = self._offsets
        shifts = self._shifts
        index = self._index
        for key, deadline in items:
            t = int(deadline // tick)
            x = t ^ c
            if t <= c or x >> maxbits:
                self._put(key, deadline)
            else:
                hb = x.bit_length()
                slot = slots[offsets[hb] + ((t >> shifts[hb]) & mask)]
                slot[key] = deadline
                index[key] = slot

    def expire(self, now: float) -> list[K]:
        """Advance the wheel to ``now``; remove and return the keys due (deadline <= now).

        The keys are returned in no particular order.
        """
        _check_time(now, "now")
        self._cached_next = _STALE
        n = int(now // self._tick)
        c = self._cur
        slots = self._slots
        mask = self._mask
        fired: list[K] = []
        if n <= c:
            current = slots[c & mask]
            if current:
                self._scan(current, now, fired)
            self._early = self._early and n < c and bool(current)
            return fired
        bits = self._bits
        popped: list[dict[K, float]] = []
        if (c ^ n) >> bits:
            hi = mask + 1
            scan_current = False
        else:
            hi = n & mask
            scan_current = True
        for i in range(c & mask, hi):
            if slots[i]:
                popped.append(slots[i])
                slots[i] = {}
        shift = bits
        base = self._nslots
        for _ in range(1, self._levels):
            cl = c >> shift
            nl = n >> shift
            if cl == nl:
                break
            hi = base + (mask + 1 if (cl ^ nl) >> bits else (nl & mask) + 1)
            for i in range(base + (cl & mask) + 1, hi):
                if slots[i]:
                    popped.append(slots[i])
                    slots[i] = {}
            shift += bits
            base += self._nslots
        else:
            top = n >> self._maxbits
            if self._overflow and c >> self._maxbits != top:
                for block in [b for b in self._overflow if b <= top]:
                    popped.append(self._overflow.pop(block))
        self._cur = n
        self._early = False
        if scan_current:
            current = slots[n & mask]
            if current:
                self._scan(current, now, fired)
        if popped:
            self._cascade(popped, now, fired)
        return fired

    def _cascade(self, popped: list[dict[K, float]], now: float, fired: list[K]) -> None:
        """Fire the entries of ``popped`` due at ``now``; re-insert the others lower."""
        tick = self._tick
        c = self._cur
        mask = self._mask
        maxbits = self._maxbits
        slots = self._slots
        offsets = self._offsets
        shifts = self._shifts
        index = self._index
        for old in popped:
            for key, deadline in old.items():
                if deadline <= now:
                    fired.append(key)
                    del index[key]
                    continue
                t = int(deadline // tick)
                x = t ^ c
                if t <= c or x >> maxbits:
                    self._put(key, deadline)
                else:
                    hb = x.bit_length()
                    slot = slots[offsets[hb] + ((t >> shifts[hb]) & mask)]
                    slot[key] = deadline
                    index[key] = slot

    def _scan(self, slot: dict[K, float], now: float, fired: list[K]) -> None:
        """Move the entries of ``slot`` due at ``now`` out of the wheel into ``fired``."""
        due = [key for key, deadline in slot.items() if deadline <= now]
        if not due:
            return
        if len(due) == len(slot):
            slot.clear()
        else:
            for key in due:
                del slot[key]
        index = self._index
        for key in due:
            del index[key]
        fired += due

    def next_deadline(self) -> float | None:
        """When to call ``expire`` next: None if the wheel is empty.

        The result is never later than the earliest deadline rounded up to a tick
        boundary, and ``expire(next_deadline())`` always makes progress: it either
        fires entries or cascades them down a level, so a lone entry needs at most
        ``levels + 2`` calls however far away it is.
        """
        cached = self._cached_next
        if cached is _STALE:
            cached = self._cached_next = self._compute_next_deadline()
        return cached  # type: ignore[return-value]

    def _compute_next_deadline(self) -> float | None:
        if not self._index:
            return None
        c = self._cur
        mask = self._mask
        nslots = self._nslots
        slots = self._slots
        digit = c & mask
        current = slots[digit]
        if current:
            if self._early:
                return self._wake(current, c, exact=True)
            return self._boundary(c + 1)
        for i in range(digit + 1, nslots):
            if slots[i]:
                return self._wake(slots[i], c - digit + i)
        shift = self._bits
        base = nslots
        for _ in range(1, self._levels):
            cl = c >> shift
            digit = cl & mask
            for i in range(digit + 1, nslots):
                if slots[base + i]:
                    return self._wake(slots[base + i], (cl - digit + i) << shift)
            shift += self._bits
            base += nslots
        for block in [b for b, slot in self._overflow.items() if not slot]:
            del self._overflow[block]
        block = min(self._overflow)
        return self._wake(self._overflow[block], block << self._maxbits)

    def _wake(self, slot: dict[K, float], start: int, exact: bool = False) -> float:
        """When to expire the earliest slot, ``slot``, whose first tick is ``start``.

        A small slot is searched for its earliest deadline, so that one call fires
        it; a large one is woken at its start and drained as time goes by.
        """
        if exact or len(slot) <= _SCAN_LIMIT:
            earliest = min(slot.values())
            return self._boundary(int(-(-earliest // self._tick)))
        return self._time_of(start)

    def _boundary(self, t: int) -> float:
        """The latest time not after the start of tick ``t`` (exactly ``t * tick``)."""
        tick = self._tick
        when = t * tick
        while when // tick >= t and when % tick:
            when = math.nextafter(when, -_INF)
        return when

    def _time_of(self, t: int) -> float:
        """The earliest time ``now`` with ``now // tick >= t``: inside tick ``t``."""
        tick = self._tick
        when = t * tick
        while when // tick < t:
            when = math.nextafter(when, _INF)
        return when


class _Peer:
    """Liveness state of one key: its timeout and when it last heard and spoke."""

    __slots__ = ("interval", "last_recv", "last_send", "timeout")

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        self.interval = timeout * LivenessMonitor.KEEPALIVE_FRACTION
        self.last_recv = now
        self.last_send = now


class LivenessMonitor(Generic[K]):
    """The keepalive policy: who must send a keepalive, whose peer is gone.

    Any frame received on a key counts as a sign of life (:meth:`received`); a key
    that sent nothing for ``KEEPALIVE_FRACTION`` of its timeout is due a keepalive;
    a key whose peer is silent for its whole timeout expires. ``received`` and
    ``sent`` only store a timestamp: each key has one wheel entry, re-armed lazily
    at its true next deadline when it fires, so idle keys cost only what fires.
    """

    KEEPALIVE_FRACTION: ClassVar[float] = 0.25
    """A key that sent nothing for this fraction of its timeout is due a keepalive."""
    MIN_TIMEOUT: ClassVar[float] = 0.01
    """The shortest timeout accepted, in seconds."""

    __slots__ = ("_horizon", "_peers", "_wheel")

    def __init__(self, tick: float = 0.01, now: float = 0.0) -> None:
        """Create an empty monitor with a timing wheel of resolution ``tick`` seconds."""
        self._wheel: TimingWheel[K] = TimingWheel(tick, now, slots=256, levels=6)
        self._peers: dict[K, _Peer] = {}
        self._horizon = self._wheel._max_deadline

    def __len__(self) -> int:
        """Number of tracked keys."""
        return len(self._peers)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is tracked."""
        return key in self._peers

    @classmethod
    def check_timeout(cls, timeout: float) -> None:
        """``ValueError`` unless ``timeout`` is at least ``MIN_TIMEOUT`` (NaN is not);
        ``math.inf`` passes (no liveness)."""
        if not timeout >= cls.MIN_TIMEOUT:
            raise ValueError(
                f"liveness {timeout!r} s is below the minimum: it must be at least "
                f"{cls.MIN_TIMEOUT} s (10 ms), or math.inf"
            )

    def _arm(self, key: K, peer: _Peer) -> None:
        due = min(peer.last_send + peer.interval, peer.last_recv + peer.timeout)
        if due <= self._horizon:
            self._wheel.schedule(key, due)
        else:
            self._wheel.cancel(key)

    def add(self, key: K, timeout: float, now: float) -> None:
        """Start tracking ``key`` (or restart it) as if it just sent and received.

        ``timeout`` is in seconds, at least ``MIN_TIMEOUT``; ``math.inf`` tracks the
        key without liveness: it never expires and never needs a keepalive.
        """
        self.check_timeout(timeout)
        _check_time(now, "now")
        peer = _Peer(timeout, now)
        self._peers[key] = peer
        self._arm(key, peer)

    def remove(self, key: K) -> None:
        """Stop tracking ``key``; nothing happens if it is not tracked."""
        if self._peers.pop(key, None) is not None:
            self._wheel.cancel(key)

    def set_timeout(self, key: K, timeout: float, now: float) -> None:
        """Change the timeout of tracked ``key`` (KeyError if untracked).

        Deadlines stay measured from the last frame received and sent: a timeout
        shorter than the peer's current silence expires the key at the next poll.
        """
        self.check_timeout(timeout)
        _check_time(now, "now")
        peer = self._peers[key]
        peer.timeout = timeout
        peer.interval = timeout * self.KEEPALIVE_FRACTION
        self._arm(key, peer)

    def timeout_of(self, key: K) -> float:
        """The timeout of tracked ``key`` in seconds (KeyError if untracked)."""
        return self._peers[key].timeout

    def received(self, key: K, now: float) -> None:
        """Record a frame received on ``key`` at ``now``; unknown keys are ignored."""
        peer = self._peers.get(key)
        if peer is not None:
            peer.last_recv = now

    def sent(self, key: K, now: float) -> None:
        """Record a frame sent on ``key`` at ``now``; unknown keys are ignored."""
        peer = self._peers.get(key)
        if peer is not None:
            peer.last_send = now

    def poll(self, now: float) -> tuple[list[K], list[K]]:
        """Advance to ``now``; return ``(keepalives_due, expired)``.

        Expired keys (silent peer for the whole timeout) are no longer tracked. For
        each key due a keepalive the monitor records a send at ``now``: the caller
        must send the keepalive frame.
        """
        wheel = self._wheel
        fired = wheel.expire(now)
        keepalives: list[K] = []
        expired: list[K] = []
        if not fired:
            return keepalives, expired
        peers = self._peers
        horizon = self._horizon
        rearm: list[tuple[K, float]] = []
        for key in fired:
            peer = peers[key]
            expires_at = peer.last_recv + peer.timeout
            if now >= expires_at:
                expired.append(key)
                del peers[key]
                continue
            keepalive_at = peer.last_send + peer.interval
            if now >= keepalive_at:
                keepalives.append(key)
                peer.last_send = now
                keepalive_at = now + peer.interval
            due = keepalive_at if keepalive_at < expires_at else expires_at
            if due <= horizon:
                rearm.append((key, due))
        wheel._put_all(rearm)
        return keepalives, expired

    def next_deadline(self) -> float | None:
        """When to call ``poll`` next, or None if no key has a finite timeout."""
        return self._wheel.next_deadline()
