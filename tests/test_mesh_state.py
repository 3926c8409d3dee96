"""The mesh's delivery arithmetic (`tether.meshstate`), without I/O.

A sender's `Outbox` and a receiver's `Inbox` talk through a model of the mesh's links:
MSGs and ACKs in flight on the current link, links cut (everything in flight lost),
sessions started with the SESSION exchange (either side leading), the receiver's
application taking and consuming messages, the receiver crashing (a new incarnation;
what it had received and not consumed is gone) or shutting down gracefully (CLOSING),
and the sender giving up after its establish timeout. Hypothesis drives arbitrary
interleavings, with receive windows from the smallest to unbounded; the invariants are
the mesh's contract:

* the receiving application(s) see each message at most once, in send order;
* every message is delivered or returned in a failure report;
* a reported message outside the report's `unconfirmed` prefix was never delivered;
* the sender never has more in flight than B's window (but one message), so B never
  holds more than its window of messages not taken (B's `Inbox` would raise).
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.errors import RemoteProtocolError
from tether.meshstate import (
    MESSAGE_OVERHEAD,
    MIN_WINDOW,
    ClosingInfo,
    Inbox,
    Outbox,
    SessionInfo,
)

A_INC = 0xA
UNBOUNDED = 1 << 40


@dataclass
class Model:
    """Node A sends to node B. Only B restarts (A's incarnation is A_INC throughout).
    B's receive window is `window`; bodies are 0 to 299 bytes."""

    window: int = UNBOUNDED
    outbox: Outbox = field(default_factory=lambda: Outbox(1 << 30))
    inbox: Inbox = field(init=False)
    b_inc: int = 1
    up: bool = False
    msgs: list[tuple[int, int]] = field(default_factory=list)  # (seq, cost) on the wire
    acks: list[int] = field(default_factory=list)  # ACKs on the wire B -> A
    # (incarnation, seq, cost) received by B, not yet taken by its application
    app_queue: list[tuple[int, int, int]] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)  # what B's application took
    failed: list[tuple[list[int], int]] = field(default_factory=list)
    sent: int = 0

    def __post_init__(self) -> None:
        self.inbox = Inbox(self.window)

    # operations ------------------------------------------------------------------------

    def send(self) -> None:
        """As the mesh does: transmitted at once if the window has room, else queued."""
        body = b"x" * (self.sent * 37 % 300)
        self.sent += 1
        if self.up:
            entry = self.outbox.push_transmitted(0, body)
            if entry is not None:
                self.msgs.append((entry.seq, entry.cost))
        else:
            self.outbox.push(0, body)

    def pump(self) -> None:
        """A transmits what B's window has room for."""
        if self.up:
            while (entry := self.outbox.sendable()) is not None:
                self.outbox.transmitted(entry)
                self.msgs.append((entry.seq, entry.cost))

    def deliver(self, n: int) -> None:
        for seq, cost in self.msgs[:n]:
            if self.inbox.accept(seq, cost):  # (raises if A broke B's window)
                self.app_queue.append((self.inbox.incarnation, seq, cost))
        del self.msgs[:n]

    def take(self, n: int) -> None:
        for incarnation, seq, cost in self.app_queue[:n]:
            self.inbox.take(incarnation, seq, cost)
            self.delivered.append(seq)
        del self.app_queue[:n]

    def commit(self) -> None:
        self.inbox.commit()
        seq = self.inbox.ack_due()
        if seq is not None and self.up:
            self.acks.append(seq)

    def deliver_acks(self) -> None:
        for seq in self.acks:
            self.outbox.ack_transmitted(seq)  # (raises if an honest ACK looked bogus)
        self.acks.clear()
        self.pump()

    def cut(self) -> None:
        self.up = False
        self.msgs.clear()
        self.acks.clear()

    def connect(self, a_leads: bool) -> None:
        if self.up:
            return
        # The leader sends its SESSION first; the follower answers after reading it, so
        # only a follower B already knows A's incarnation when it describes its inbox.
        if a_leads:
            self.inbox.session(A_INC)
        info = SessionInfo(self.b_inc, self.inbox.incarnation, self.inbox.consumed,
                           self.inbox.received, self.inbox.window)
        if not a_leads:
            self.inbox.session(A_INC)
        self.inbox.acked = max(self.inbox.acked, self.inbox.consumed)
        # (raises if an honest SESSION looked bogus)
        self.outbox.check_session(info.incarnation, info.known == A_INC, info.received)
        result = self.outbox.session(info.incarnation, info.known == A_INC, info.consumed,
                                     info.received, info.window)
        if result.unconfirmed:
            self.failed.append(([e.seq for e in result.unconfirmed],
                                len(result.unconfirmed)))
        self.up = True
        self.msgs.extend((e.seq, e.cost) for e in result.resend)  # transmitted already

    def crash_b(self) -> None:
        self.cut()
        self.b_inc += 1
        self.inbox = Inbox(self.window)
        self.app_queue.clear()

    def close_b(self) -> None:
        self.inbox.commit()
        if self.up:  # CLOSING goes out on the link before it closes
            closing = ClosingInfo(self.b_inc, self.inbox.incarnation, self.inbox.consumed)
            self.outbox.peer_closing(closing.incarnation, closing.known == A_INC,
                                     closing.consumed)
        self.crash_b()

    def give_up(self) -> None:
        if not self.up:
            entries, unconfirmed = self.outbox.take_all()
            if entries:
                self.failed.append(([e.seq for e in entries], unconfirmed))

    def settle(self) -> None:
        """Connect and run until the outbox is empty."""
        for _ in range(10 + self.sent):  # (a small window: a few messages per round)
            self.connect(a_leads=True)
            self.deliver(len(self.msgs))
            self.take(len(self.app_queue))
            self.commit()
            self.deliver_acks()
            if not self.outbox:
                return
        raise AssertionError(f"outbox not empty: {list(self.outbox)}")

    # invariants ------------------------------------------------------------------------

    def check_outbox(self) -> None:
        out = self.outbox
        entries = list(out)
        seqs = [e.seq for e in entries]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert out.bytes == sum(e.cost for e in entries)
        in_flight = entries[:len(entries) - out.waiting]
        assert out.inflight == sum(e.cost for e in in_flight)
        if self.up:
            assert out.inflight <= self.window or len(in_flight) == 1, \
                (out.inflight, self.window)
        # B holds (received, not taken) exactly the messages of its app_queue of the
        # current incarnation, within its window
        assert self.inbox.held == sum(c for i, _, c in self.app_queue
                                      if i == self.inbox.incarnation) <= self.window

    def check_contract(self) -> None:
        delivered = self.delivered
        assert all(a < b for a, b in itertools.pairwise(delivered)), \
            f"not once and in order: {delivered}"
        failed = [seq for seqs, _ in self.failed for seq in seqs]
        assert len(failed) == len(set(failed)), "a message reported twice"
        everything = set(range(1, self.sent + 1))
        assert set(delivered) | set(failed) == everything, \
            f"lost: {sorted(everything - set(delivered) - set(failed))}"
        for seqs, unconfirmed in self.failed:
            assert 0 <= unconfirmed <= len(seqs)
            assert not set(seqs[unconfirmed:]) & set(delivered), \
                f"reported as certainly undelivered but delivered: {seqs[unconfirmed:]}"


OPS = st.one_of(
    st.tuples(st.just("send"), st.integers(1, 5)),
    st.tuples(st.just("deliver"), st.integers(0, 6)),
    st.tuples(st.just("take"), st.integers(0, 6)),
    st.tuples(st.just("commit"), st.just(0)),
    st.tuples(st.just("acks"), st.just(0)),
    st.tuples(st.just("cut"), st.just(0)),
    st.tuples(st.just("connect"), st.integers(0, 1)),
    st.tuples(st.just("crash_b"), st.just(0)),
    st.tuples(st.just("close_b"), st.just(0)),
    st.tuples(st.just("give_up"), st.just(0)),
    st.tuples(st.just("exchange"), st.integers(1, 5)),
)


def run(ops: list[tuple[str, int]], window: int = UNBOUNDED) -> Model:
    m = Model(window)
    for op, n in ops:
        if op == "send":
            for _ in range(n):
                m.send()
        elif op == "deliver":
            m.deliver(n)
        elif op == "take":
            m.take(n)
        elif op == "commit":
            m.commit()
        elif op == "acks":
            m.deliver_acks()
        elif op == "cut":
            m.cut()
        elif op == "connect":
            m.connect(a_leads=bool(n))
        elif op == "crash_b":
            m.crash_b()
        elif op == "close_b":
            m.close_b()
        elif op == "give_up":
            m.give_up()
        elif op == "exchange":  # sent, received and taken by B's application, not acked
            for _ in range(n):
                m.send()
            m.deliver(len(m.msgs))
            m.take(len(m.app_queue))
        m.check_outbox()
    return m


WINDOWS = st.one_of(st.integers(MIN_WINDOW, 3 * MIN_WINDOW), st.just(UNBOUNDED))


@settings(max_examples=600, deadline=None)
@given(st.lists(OPS, min_size=20, max_size=60), WINDOWS)
def test_once_in_order_or_reported(ops: list[tuple[str, int]], window: int) -> None:
    m = run(ops, window)
    m.settle()
    m.check_contract()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["send", "deliver", "take", "commit", "acks", "cut",
                                 "connect"]), max_size=80), WINDOWS)
def test_without_restarts_nothing_fails(ops: list[str], window: int) -> None:
    """Cuts and reconnects alone never fail a message: all are delivered exactly once."""
    m = run([(op, 2 if op in ("send", "deliver", "take") else 1) for op in ops], window)
    m.settle()
    m.check_contract()
    assert m.failed == []
    assert m.delivered == list(range(1, m.sent + 1))


def test_graceful_restart_resends_instead_of_failing() -> None:
    """A receiver that shuts down gracefully says what it consumed: the rest goes to its
    next incarnation, nothing is in doubt."""
    m = Model()
    m.connect(a_leads=True)
    for _ in range(5):
        m.send()
    m.deliver(5)
    m.take(2)
    m.close_b()  # consumed 1..2; 3..5 were received but never given to the app
    m.settle()
    m.check_contract()
    assert m.failed == []
    assert m.delivered == [1, 2, 3, 4, 5]


def test_crash_reports_exactly_the_unacknowledged_as_unconfirmed() -> None:
    m = Model()
    m.connect(a_leads=True)
    for _ in range(6):
        m.send()
    m.deliver(6)
    m.take(2)
    m.commit()
    m.deliver_acks()  # 1..2 acknowledged
    m.take(2)  # 3..4 reach the application, unacknowledged, then B dies
    m.crash_b()
    m.send()  # 7: never sent to the dead incarnation
    m.settle()
    m.check_contract()
    assert m.failed == [([3, 4, 5, 6], 4)]
    assert m.delivered == [1, 2, 3, 4, 7]


def test_first_contact_timeout_reports_all_as_certainly_undelivered() -> None:
    m = Model()
    for _ in range(3):
        m.send()
    m.give_up()
    assert m.failed == [([1, 2, 3], 0)]


def test_reconnect_skips_what_the_receiver_already_holds() -> None:
    out = Outbox(1 << 20)
    for _ in range(10):
        out.transmitted(out.push(1, b"m"))
    result = out.session(7, True, 0, 0, UNBOUNDED)  # first session: nothing known
    assert [e.seq for e in result.resend] == list(range(1, 11))
    result = out.session(7, True, 4, 8, UNBOUNDED)  # consumed 4, holds up to 8
    assert [e.seq for e in result.resend] == [9, 10]
    assert result.retransmits == 2 and not result.unconfirmed
    assert [e.seq for e in out] == [5, 6, 7, 8, 9, 10]


def test_outbox_bound_and_costs() -> None:
    out = Outbox(3 * (10 + MESSAGE_OVERHEAD))
    for _ in range(3):
        assert out.fits(10 + MESSAGE_OVERHEAD)
        out.push(0, b"0123456789")
    assert not out.fits(1)
    assert out.ack(2) == 2
    assert out.bytes == 10 + MESSAGE_OVERHEAD and len(out) == 1
    with pytest.raises(ValueError):
        Outbox(1)


def test_outbox_keeps_what_is_in_flight_within_the_peer_window() -> None:
    cost = 100 + MESSAGE_OVERHEAD
    out = Outbox(1 << 20)
    for _ in range(10):
        out.push(0, b"x" * 100)
    result = out.session(7, True, 0, 0, 3 * cost)  # the peer holds 3 messages at most
    assert [e.seq for e in result.resend] == [1, 2, 3] and result.retransmits == 0
    assert out.inflight == 3 * cost and out.waiting == 7 and out.sendable() is None
    assert out.ack(2) == 2
    entry = out.sendable()
    assert entry is not None and entry.seq == 4
    out.transmitted(entry)
    assert out.sendable() is not None and out.inflight == 2 * cost
    with pytest.raises(ValueError, match="not the next entry"):
        out.transmitted(entry)
    # a cut, then the peer says it holds 3..4: those stay in flight, 5.. follow
    result = out.session(7, True, 2, 4, 3 * cost)
    assert [e.seq for e in result.resend] == [5] and result.retransmits == 0
    # more is in flight than a smaller window now allows: nothing until ACKs
    result = out.session(7, True, 2, 5, cost)
    assert result.resend == [] and out.sendable() is None
    out.ack(5)
    assert [out.sendable() is not None, out.inflight] == [True, 0]
    # new messages go out at once only while nothing waits and the window has room
    out.ack(100)
    first = out.push_transmitted(0, b"x" * 100)
    assert first is not None and len(out) == 1  # (the window holds one)
    assert out.push_transmitted(0, b"x" * 10) is None and out.waiting == 1
    out.ack(first.seq)
    assert out.push_transmitted(0, b"") is None  # behind the one waiting
    assert out.sendable() is not None
    # a message larger than the window goes alone (the mesh never lets that happen:
    # a window holds one message of the link's largest payload)
    big = Outbox(1 << 20)
    big.push(0, b"y" * 500)
    assert [e.seq for e in big.session(8, False, 0, 0, cost).resend] == [1]


def test_outbox_give_back_after_peer_closing_and_crash() -> None:
    cost = MESSAGE_OVERHEAD
    out = Outbox(1 << 20)
    for _ in range(6):
        out.push(0, b"")
    out.session(7, True, 0, 0, 4 * cost)  # 1..4 in flight
    assert out.peer_closing(7, True, 1) == 1  # consumed 1; 2..4 certainly not delivered
    assert out.inflight == 0 and out.waiting == 5
    entries, unconfirmed = out.take_all()
    assert [e.seq for e in entries] == [2, 3, 4, 5, 6] and unconfirmed == 0
    for _ in range(4):
        out.push(0, b"")
    out.session(7, True, 1, 1, 2 * cost)  # 7, 8 in flight, 9, 10 waiting
    result = out.session(9, True, 0, 0, 4 * cost)  # the peer restarted
    assert [e.seq for e in result.unconfirmed] == [7, 8] and result.restarted
    assert [e.seq for e in result.resend] == [9, 10] and out.bytes == 2 * cost


def test_inbox_duplicates_gaps_and_new_incarnation() -> None:
    box = Inbox(UNBOUNDED)
    assert box.session(5)
    assert box.accept(1, 64) and box.accept(2, 64)
    assert not box.accept(2, 64) and not box.accept(1, 64)
    assert box.accept(7, 64)  # a gap: the sender gave 3..6 up and reported them
    assert box.take(5, 1, 64) and box.take(5, 2, 64)
    assert not box.take(4, 7, 64)  # a message of an older incarnation is not acknowledged
    assert box.commit() and box.ack_due() == 2 and box.ack_due() is None
    assert not box.session(5)
    assert box.session(6) and (box.received, box.consumed, box.held) == (0, 0, 0)


def test_inbox_refuses_a_sender_beyond_its_window() -> None:
    box = Inbox(3 * 100)
    box.session(5)
    assert box.accept(1, 100) and box.accept(2, 100) and box.accept(3, 100)
    assert not box.accept(3, 100)  # a duplicate costs nothing: it is dropped
    with pytest.raises(RemoteProtocolError, match=r"receive window exceeded: MSG 4 .* 400 "
                       r"bytes .* window of 300"):
        box.accept(4, 100)
    assert (box.received, box.held) == (3, 300)  # the refused MSG counted for nothing
    assert box.take(5, 1, 100) and box.held == 200
    assert box.accept(4, 100)  # taking is enough (acknowledging comes later)
    box.drop_unread()
    assert (box.received, box.taken, box.held) == (0, 0, 0)
    with pytest.raises(ValueError):
        Inbox(0)


# codecs -----------------------------------------------------------------------------------

U64 = st.integers(0, 2**64 - 1)
_SESSION = struct.Struct("!QQQQQ")


@given(st.integers(1, 2**64 - 1), U64, U64, U64, st.integers(MIN_WINDOW, 2**64 - 1))
def test_session_roundtrip(inc: int, known: int, a: int, b: int, window: int) -> None:
    consumed, received = min(a, b), max(a, b)
    info = SessionInfo(inc, known, consumed, received, window)
    assert SessionInfo.decode(info.encode()) == info
    assert len(info.encode()) == 40


@given(U64, U64, U64)
def test_closing_roundtrip(inc: int, known: int, consumed: int) -> None:
    info = ClosingInfo(inc, known, consumed)
    assert ClosingInfo.decode(info.encode()) == info


def _parses_or_raises_the_protocol_error(cls: type[SessionInfo | ClosingInfo],
                                         body: bytes) -> None:
    try:
        info = cls.decode(body)
    except RemoteProtocolError as exc:
        assert str(exc)
    else:
        assert info.encode() == body  # what parses is exactly what it says


# every length up to well past both bodies, and 40-byte bodies whose fields sit on the
# edges each check cares about (0, 1, the minimum window, u64 max)
EDGES = st.sampled_from([0, 1, 2, MIN_WINDOW - 1, MIN_WINDOW, 2**63, 2**64 - 1])
SESSION_BODIES = st.tuples(EDGES, EDGES, EDGES, EDGES, st.one_of(EDGES, U64)).map(
    lambda f: _SESSION.pack(*f))


@given(st.one_of(st.binary(max_size=96), SESSION_BODIES))
def test_control_bodies_parse_or_raise_the_protocol_error(body: bytes) -> None:
    for cls in (SessionInfo, ClosingInfo):
        _parses_or_raises_the_protocol_error(cls, body)


def test_malformed_session_bodies() -> None:
    with pytest.raises(RemoteProtocolError, match="expected 40"):
        SessionInfo.decode(b"\0" * 39)
    with pytest.raises(RemoteProtocolError, match="32 bytes, expected 40"):
        SessionInfo.decode(struct.pack("!QQQQ", 1, 0, 0, 0))  # (before the window)
    with pytest.raises(RemoteProtocolError, match="incarnation 0"):
        SessionInfo.decode(_SESSION.pack(0, 0, 0, 0, MIN_WINDOW))
    with pytest.raises(RemoteProtocolError, match="received 1 < consumed 2"):
        SessionInfo.decode(_SESSION.pack(1, 0, 2, 1, MIN_WINDOW))
    with pytest.raises(RemoteProtocolError, match=f"window {MIN_WINDOW - 1} below the "
                       f"minimum {MIN_WINDOW}"):
        SessionInfo.decode(_SESSION.pack(1, 0, 0, 0, MIN_WINDOW - 1))
    with pytest.raises(ValueError):
        SessionInfo(0, 0, 0, 0, MIN_WINDOW)
    with pytest.raises(ValueError, match="window"):
        SessionInfo(1, 0, 0, 0, 0)
