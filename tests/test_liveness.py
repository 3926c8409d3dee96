"""Tests for tether.liveness: the timing wheel and the keepalive policy."""

from __future__ import annotations

import itertools
import math
import random
import time
import tracemalloc
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tether.liveness import LivenessMonitor, TimingWheel

K = TypeVar("K")

YEAR = 365 * 24 * 3600.0

CONFIGS = [
    (0.01, 64, 8),  # the default
    (0.01, 4, 2),  # tiny: cascades and overflow all the time
    (0.01, 2, 1),  # a single level of two slots: almost everything overflows
    (0.25, 8, 3),
    (0.001, 16, 4),
]


def ceil_time(deadline: float, tick: float) -> float:
    """The deadline rounded up to a tick boundary (exact floor, float product)."""
    return -(-deadline // tick) * tick


delays = st.one_of(
    st.floats(min_value=0.01, max_value=1e8, allow_nan=False),
    st.floats(min_value=-1.0, max_value=1.0, allow_nan=False),
    st.integers(min_value=0, max_value=10_000).map(lambda k: k * 0.01),
    st.sampled_from([0.0, 0.1 + 0.2, 0.3, 0.7, 1.0, 1e8, YEAR, 3 * YEAR]),
)


class WheelMachine(RuleBasedStateMachine):
    """The wheel against a dict of deadlines, driven as an event loop would."""

    def __init__(self) -> None:
        super().__init__()
        self.wheel: TimingWheel[int] = TimingWheel()
        self.model: dict[int, float] = {}
        self.now = 0.0
        self.tick = 0.01

    @initialize(
        config=st.sampled_from(CONFIGS),
        start=st.one_of(st.just(0.0), st.floats(min_value=-1e6, max_value=1e9)),
    )
    def setup(self, config: tuple[float, int, int], start: float) -> None:
        tick, slots, levels = config
        self.tick = tick
        self.now = start
        self.wheel = TimingWheel(tick=tick, now=start, slots=slots, levels=levels)

    @rule(key=st.integers(0, 15), delay=delays, on_boundary=st.booleans())
    def schedule(self, key: int, delay: float, on_boundary: bool) -> None:
        deadline = self.now + delay
        if on_boundary:
            deadline = (deadline // self.tick) * self.tick
        self.wheel.schedule(key, deadline)
        self.model[key] = deadline
        assert self.wheel.deadline_of(key) == deadline

    @rule(key=st.integers(0, 15))
    def cancel(self, key: int) -> None:
        assert self.wheel.cancel(key) == (key in self.model)
        self.model.pop(key, None)
        assert self.wheel.deadline_of(key) is None
        assert key not in self.wheel

    def expire(self, now: float) -> None:
        fired = self.wheel.expire(now)
        assert len(fired) == len(set(fired)), "an entry fired twice"
        for key in fired:
            assert key in self.model, "a cancelled or unknown entry fired"
            assert self.model.pop(key) <= now, "an entry fired early"
        for key, deadline in self.model.items():
            assert deadline > now, f"entry {key} due at {deadline} not fired at {now}"
        self.now = now

    @rule()
    def advance(self) -> None:
        when = self.wheel.next_deadline()
        if when is None:
            assert not self.model
            return
        earliest = min(self.model.values())
        assert when <= ceil_time(earliest, self.tick)
        before = dict(self.model)
        self.expire(max(when, self.now))
        if when >= earliest:
            assert len(self.model) < len(before)
        if when >= self.now:
            for key in before.keys() - self.model.keys():
                assert self.now <= before[key] + self.tick

    @rule(delta=st.one_of(st.floats(0.0, 1.0), st.floats(0.0, 1e8), st.just(0.0)))
    def jump(self, delta: float) -> None:
        self.expire(self.now + delta)

    @precondition(lambda self: bool(self.model))
    @rule()
    def drain(self) -> None:
        """Drive by next_deadline until empty; a lone far entry costs O(levels) calls."""
        calls = 0
        budget = (self.wheel._levels + 3) * len(self.model) + 3
        while self.model:
            when = self.wheel.next_deadline()
            assert when is not None
            self.expire(max(when, self.now))
            calls += 1
            assert calls <= budget
        assert self.wheel.next_deadline() is None

    @invariant()
    def sizes(self) -> None:
        assert len(self.wheel) == len(self.model)
        for key, deadline in self.model.items():
            assert key in self.wheel
            assert self.wheel.deadline_of(key) == deadline


WheelMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestWheelMachine = WheelMachine.TestCase


@settings(deadline=None)
@given(
    config=st.sampled_from(CONFIGS),
    deadlines=st.lists(st.floats(min_value=0.0, max_value=1e8), min_size=1, max_size=40),
    slack=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=10),
)
def test_late_driver_fires_within_a_tick(
    config: tuple[float, int, int], deadlines: list[float], slack: list[float]
) -> None:
    """A driver that wakes up late still gets every entry within a tick of its deadline."""
    tick, slots, levels = config
    wheel: TimingWheel[int] = TimingWheel(tick, 0.0, slots, levels)
    for key, deadline in enumerate(deadlines):
        wheel.schedule(key, deadline)
    now = 0.0
    i = 0
    pending = dict(enumerate(deadlines))
    while pending:
        when = wheel.next_deadline()
        assert when is not None
        now = max(now, when + slack[i % len(slack)] * tick)
        i += 1
        for key in wheel.expire(now):
            assert pending[key] <= now <= pending[key] + 3 * tick
            del pending[key]
        assert all(d > now for d in pending.values())
    assert len(wheel) == 0


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("deadline", [1.0, 3600.0, YEAR, 3 * YEAR, 1e8, 1e12])
def test_far_entry_needs_few_calls(config: tuple[float, int, int], deadline: float) -> None:
    tick, slots, levels = config
    wheel: TimingWheel[str] = TimingWheel(tick, 0.0, slots, levels)
    wheel.schedule("far", deadline)
    calls = 0
    now = 0.0
    while "far" in wheel:
        when = wheel.next_deadline()
        assert when is not None
        assert when <= ceil_time(deadline, tick)
        fired = wheel.expire(when)
        now = when
        calls += 1
        assert calls <= levels + 3
    assert fired == ["far"]
    assert deadline <= now <= deadline + tick


def test_far_entry_memory_does_not_scale_with_deadline() -> None:
    def cost(deadline: float) -> int:
        wheel: TimingWheel[str] = TimingWheel()
        tracemalloc.start()
        try:
            wheel.schedule("k", deadline)
            while wheel:
                when = wheel.next_deadline()
                assert when is not None
                wheel.expire(when)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert cost(YEAR) < 20_000
    assert cost(1e12) < 20_000
    wheel: TimingWheel[str] = TimingWheel(slots=4, levels=2)
    for i in range(100):
        wheel.schedule(str(i), 10.0**i if i < 300 else 1e300)
    assert len(wheel._slots) == 8
    assert len(wheel._overflow) <= 100


def test_tick_boundaries_exact() -> None:
    tick = 0.01
    deadlines = [k * tick for k in range(300)]
    deadlines += [0.1 + 0.2, 0.3, 0.7, 0.1 * 3, 1.1, 2.675, 0.29999999999999993]
    for deadline in deadlines:
        wheel: TimingWheel[str] = TimingWheel(tick)
        wheel.schedule("k", deadline)
        assert wheel.expire(math.nextafter(deadline, -math.inf)) == [] or deadline <= 0.0
        if "k" in wheel:
            when = wheel.next_deadline()
            assert when is not None
            assert when <= ceil_time(deadline, tick)
            assert wheel.expire(deadline) == ["k"]
        assert len(wheel) == 0


def test_tick_boundaries_driven() -> None:
    tick = 0.01
    wheel: TimingWheel[float] = TimingWheel(tick)
    deadlines = {k * tick for k in range(1, 500)} | {0.1 + 0.2, 0.3, 0.7000000000000001}
    for deadline in deadlines:
        wheel.schedule(deadline, deadline)
    now = 0.0
    while wheel:
        when = wheel.next_deadline()
        assert when is not None
        now = max(now, when)
        for deadline in wheel.expire(now):
            assert deadline <= now <= deadline + tick
            deadlines.remove(deadline)
    assert not deadlines


def test_past_deadline_fires_at_next_expire() -> None:
    wheel: TimingWheel[str] = TimingWheel(now=100.0)
    wheel.schedule("old", 5.0)
    wheel.schedule("now", 100.0)
    when = wheel.next_deadline()
    assert when is not None and when <= 100.0
    assert sorted(wheel.expire(100.0)) == ["now", "old"]
    wheel.expire(200.0)
    wheel.schedule("past", 150.0)
    when = wheel.next_deadline()
    assert when is not None and when <= 150.0
    assert wheel.expire(200.0) == ["past"]


def test_reschedule_replaces() -> None:
    wheel: TimingWheel[str] = TimingWheel()
    wheel.schedule("k", 10.0)
    wheel.schedule("k", 1.0)
    assert len(wheel) == 1
    assert wheel.deadline_of("k") == 1.0
    assert wheel.expire(1.0) == ["k"]
    assert wheel.expire(20.0) == []
    wheel.schedule("k", 30.0)
    wheel.schedule("k", 40.0)
    assert wheel.expire(35.0) == []
    assert wheel.expire(40.0) == ["k"]
    assert not wheel.cancel("k")


def test_time_going_backwards_is_harmless() -> None:
    wheel: TimingWheel[str] = TimingWheel()
    wheel.expire(10.0)
    wheel.schedule("k", 9.5)
    assert wheel.expire(9.0) == []
    assert wheel.expire(9.5) == ["k"]


def test_wheel_rejects_bad_arguments() -> None:
    for bad in ({"tick": 0.0}, {"tick": -1.0}, {"tick": math.inf}, {"slots": 60}):
        with pytest.raises(ValueError):
            TimingWheel(**bad)
    with pytest.raises(ValueError):
        TimingWheel(levels=0)
    with pytest.raises(ValueError):
        TimingWheel(now=math.nan)
    wheel: TimingWheel[str] = TimingWheel()
    for deadline in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError):
            wheel.schedule("k", deadline)
    with pytest.raises(ValueError):
        wheel.expire(math.nan)
    assert len(wheel) == 0
    assert wheel.tick == 0.01


def test_hundred_thousand_entries_are_fast() -> None:
    rng = random.Random(1)
    wheel: TimingWheel[int] = TimingWheel()
    n = 100_000
    start = time.perf_counter()
    for key in range(n):
        wheel.schedule(key, rng.uniform(0.0, 120.0))
    fired = 0
    now = 0.0
    while wheel:
        when = wheel.next_deadline()
        assert when is not None
        now = max(now, when)
        fired += len(wheel.expire(now))
    elapsed = time.perf_counter() - start
    assert fired == n
    assert elapsed < 2.0


# --- LivenessMonitor -------------------------------------------------------------------


def drive(
    monitor: LivenessMonitor[K], until: float, start: float = 0.0
) -> tuple[dict[K, list[float]], dict[K, float]]:
    """Poll at each next_deadline up to ``until``; when keepalives and expiries happened."""
    keepalives: dict[K, list[float]] = {}
    expired: dict[K, float] = {}
    now = start
    while True:
        when = monitor.next_deadline()
        if when is None or when > until:
            break
        now = max(now, when)
        due, gone = monitor.poll(now)
        for key in due:
            keepalives.setdefault(key, []).append(now)
        for key in gone:
            expired[key] = now
    return keepalives, expired


def test_keepalive_after_a_quarter_of_the_timeout() -> None:
    monitor: LivenessMonitor[str] = LivenessMonitor()
    monitor.add("k", 1.0, 0.0)
    assert monitor.poll(0.2499) == ([], [])
    when = monitor.next_deadline()
    assert when is not None and when <= 0.25
    assert monitor.poll(0.25) == (["k"], [])
    assert monitor.poll(0.26) == ([], [])
    assert monitor.poll(0.5) == (["k"], [])


def test_no_keepalive_when_sent_recently() -> None:
    monitor: LivenessMonitor[str] = LivenessMonitor()
    monitor.add("k", 1.0, 0.0)
    monitor.sent("k", 0.2)
    assert monitor.poll(0.25) == ([], [])
    assert monitor.poll(0.4499) == ([], [])
    assert monitor.poll(0.45) == (["k"], [])
    monitor.sent("k", 0.6)
    keepalives, _ = drive(monitor, 0.9, 0.45)
    assert keepalives == {"k": [pytest.approx(0.85)]}


def test_expiry_exactly_at_timeout() -> None:
    monitor: LivenessMonitor[str] = LivenessMonitor()
    monitor.add("k", 1.0, 0.0)
    keepalives, expired = drive(monitor, 10.0)
    sends = [0.0, *keepalives["k"]]
    assert len(sends) == 4
    for last, sent in itertools.pairwise(sends):
        assert last + 0.25 <= sent <= last + 0.25 + monitor._wheel.tick
    assert 1.0 <= expired["k"] <= 1.0 + monitor._wheel.tick
    assert "k" not in monitor
    assert monitor.next_deadline() is None

    monitor.add("j", 1.0, 0.0)
    assert monitor.poll(math.nextafter(1.0, 0.0))[1] == []
    assert monitor.poll(1.0) == ([], ["j"])


def test_received_postpones_expiry() -> None:
    monitor: LivenessMonitor[str] = LivenessMonitor()
    monitor.add("k", 1.0, 0.0)
    monitor.received("k", 0.9)
    _, expired = drive(monitor, 1.85)
    assert expired == {}
    _, expired = drive(monitor, 10.0, 1.85)
    assert 1.9 <= expired["k"] <= 1.9 + 0.01


def test_set_timeout_shorter_and_longer() -> None:
    monitor: LivenessMonitor[str] = LivenessMonitor()
    monitor.add("short", 10.0, 0.0)
    monitor.add("long", 1.0, 0.0)
    monitor.poll(0.5)
    monitor.set_timeout("short", 1.0, 0.5)
    monitor.set_timeout("long", 10.0, 0.5)
    assert monitor.timeout_of("short") == 1.0
    assert monitor.timeout_of("long") == 10.0
    keepalives, expired = drive(monitor, 100.0, 0.5)
    assert 1.0 <= expired["short"] <= 1.01
    assert 10.0 <= expired["long"] <= 10.01
    assert keepalives["long"][-1] == pytest.approx(8.0, abs=0.05)

    monitor.add("k", 10.0, 100.0)
    monitor.set_timeout("k", 1.0, 100.0)
    assert monitor.poll(101.5) == ([], ["k"])


def test_timeout_bounds() -> None:
    monitor: LivenessMonitor[str] = LivenessMonitor(tick=0.001)
    monitor.add("tiny", 0.01, 0.0)
    keepalives, expired = drive(monitor, 1.0)
    assert len(keepalives["tiny"]) == 3
    assert 0.01 <= expired["tiny"] <= 0.011

    coarse: LivenessMonitor[str] = LivenessMonitor()
    coarse.add("tiny", 0.01, 0.0)
    _, expired = drive(coarse, 1.0)
    assert 0.01 <= expired["tiny"] <= 0.02

    huge: LivenessMonitor[str] = LivenessMonitor()
    huge.add("huge", 1e8, 0.0)
    calls = 0
    now = 0.0
    while "huge" in huge:
        when = huge.next_deadline()
        assert when is not None
        now = when
        _, gone = huge.poll(now)
        calls += 1
    assert gone == ["huge"]
    assert 1e8 <= now <= 1e8 + 0.01
    assert calls < 200

    for bad in (0.0099, 0.0, -1.0, math.nan, -math.inf):
        with pytest.raises(ValueError, match=r"at least 0\.01 s"):
            monitor.add("bad", bad, 0.0)
        with pytest.raises(ValueError, match=r"at least 0\.01 s"):
            monitor.set_timeout("tiny", bad, 0.0)
    assert "bad" not in monitor


def test_infinite_timeout_never_expires() -> None:
    monitor: LivenessMonitor[str] = LivenessMonitor()
    monitor.add("forever", math.inf, 0.0)
    assert "forever" in monitor
    assert monitor.timeout_of("forever") == math.inf
    assert monitor.next_deadline() is None
    assert len(monitor._wheel) == 0
    assert monitor.poll(1e15) == ([], [])
    assert "forever" in monitor
    monitor.received("forever", 1e15)
    monitor.set_timeout("forever", 2.0, 1e15)
    assert monitor.poll(1e15 + 0.5) == (["forever"], [])
    monitor.set_timeout("forever", math.inf, 1e15 + 1)
    assert monitor.next_deadline() is None
    assert monitor.poll(1e16) == ([], [])


def test_remove_stops_tracking() -> None:
    monitor: LivenessMonitor[str] = LivenessMonitor()
    monitor.add("k", 1.0, 0.0)
    monitor.add("j", 1.0, 0.0)
    monitor.remove("k")
    monitor.remove("k")
    monitor.remove("never")
    assert len(monitor) == 1
    assert monitor.poll(100.0) == ([], ["j"])
    assert len(monitor) == 0
    assert monitor.next_deadline() is None
    monitor.received("k", 1.0)
    monitor.sent("k", 1.0)
    with pytest.raises(KeyError):
        monitor.timeout_of("k")


def test_readd_restarts() -> None:
    monitor: LivenessMonitor[str] = LivenessMonitor()
    monitor.add("k", 1.0, 0.0)
    monitor.add("k", 5.0, 0.9)
    assert len(monitor) == 1
    assert monitor.poll(2.1) == ([], [])
    assert monitor.poll(2.15) == (["k"], [])
    assert monitor.poll(5.89) == (["k"], [])
    assert monitor.poll(5.9) == ([], ["k"])


def test_hundred_thousand_monitored_keys_are_fast() -> None:
    rng = random.Random(2)
    monitor: LivenessMonitor[int] = LivenessMonitor()
    n = 100_000
    start = time.perf_counter()
    for key in range(n):
        monitor.add(key, rng.uniform(1.0, 2.0), 0.0)
    keepalives, expired = monitor.poll(0.5)
    assert len(keepalives) == n and not expired
    keepalives, expired = monitor.poll(2.0)
    assert not keepalives and len(expired) == n
    assert len(monitor) == 0 and monitor.next_deadline() is None
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0


timeouts = st.sampled_from([0.01, 0.05, 0.3, 1.0, 7.5, 3600.0, math.inf])
events = st.lists(
    st.tuples(
        st.sampled_from(["advance", "jump", "received", "sent", "set", "add", "remove"]),
        st.integers(0, 3),
        st.floats(min_value=0.0, max_value=5.0),
        timeouts,
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(events=events, tick=st.sampled_from([0.01, 0.001, 0.1]))
def test_monitor_matches_model(events: list[tuple[str, int, float, float]], tick: float) -> None:
    """Keepalive iff now >= last_send + timeout/4, expiry iff now >= last_recv + timeout."""
    monitor: LivenessMonitor[int] = LivenessMonitor(tick=tick)
    model: dict[int, list[float]] = {}  # key -> [timeout, last_recv, last_send]
    now = 0.0

    def poll(at: float) -> None:
        nonlocal now
        now = at
        due, gone = monitor.poll(at)
        want_gone = {k for k, (to, lr, _) in model.items() if at >= lr + to}
        want_due = {
            k
            for k, (to, _, ls) in model.items()
            if k not in want_gone and at >= ls + to * LivenessMonitor.KEEPALIVE_FRACTION
        }
        assert sorted(gone) == sorted(want_gone)
        assert sorted(due) == sorted(want_due)
        for k in gone:
            del model[k]
        for k in due:
            model[k][2] = at

    for kind, key, amount, timeout in events:
        if kind == "advance":
            when = monitor.next_deadline()
            if when is None:
                assert all(to == math.inf for to, _, _ in model.values())
            else:
                poll(max(now, when))
        elif kind == "jump":
            poll(now + amount)
        elif kind == "received" and key in model:
            monitor.received(key, now)
            model[key][1] = now
        elif kind == "sent" and key in model:
            monitor.sent(key, now)
            model[key][2] = now
        elif kind == "set" and key in model:
            monitor.set_timeout(key, timeout, now)
            model[key][0] = timeout
        elif kind == "add":
            monitor.add(key, timeout, now)
            model[key] = [timeout, now, now]
        elif kind == "remove":
            monitor.remove(key)
            model.pop(key, None)
        assert len(monitor) == len(model)
        for k, (to, _, _) in model.items():
            assert k in monitor
            assert monitor.timeout_of(k) == to
        finite = [
            min(ls + to * LivenessMonitor.KEEPALIVE_FRACTION, lr + to)
            for to, lr, ls in model.values()
            if to != math.inf
        ]
        when = monitor.next_deadline()
        if finite:
            assert when is not None
            assert when <= ceil_time(min(finite), tick)
        else:
            assert when is None
