"""The mesh's delivery arithmetic (`tether.meshstate`), without I/O.

A sender's `Outbox` and a receiver's `Inbox` talk through a model of the mesh's links:
MSGs and ACKs in flight on the current link, links cut (everything in flight lost),
sessions started with the SESSION exchange (either side leading), the receiver's
application taking and consuming messages, the receiver crashing (a new incarnation;
what it had received and not consumed is gone) or shutting down gracefully (CLOSING),
and the sender giving up after its establish timeout. Hypothesis drives arbitrary
interleavings; the invariants are the mesh's contract:

* the receiving application(s) see each message at most once, in send order;
* every message is delivered or returned in a failure report;
* a reported message outside the report's `unconfirmed` prefix was never delivered.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.errors import RemoteProtocolError
from tether.meshstate import (
    MESSAGE_OVERHEAD,
    ClosingInfo,
    Inbox,
    Outbox,
    SessionInfo,
)

A_INC = 0xA


@dataclass
class Model:
    """Node A sends to node B. Only B restarts (A's incarnation is A_INC throughout)."""

    outbox: Outbox = field(default_factory=lambda: Outbox(1 << 30))
    inbox: Inbox = field(default_factory=Inbox)
    b_inc: int = 1
    up: bool = False
    msgs: list[int] = field(default_factory=list)  # seqs on the wire A -> B
    acks: list[int] = field(default_factory=list)  # ACKs on the wire B -> A
    app_queue: list[tuple[int, int]] = field(default_factory=list)  # (incarnation, seq)
    delivered: list[int] = field(default_factory=list)  # what B's application took
    failed: list[tuple[list[int], int]] = field(default_factory=list)
    sent: int = 0

    # operations ------------------------------------------------------------------------

    def send(self) -> None:
        entry = self.outbox.push(0, b"x" * (self.sent % 7))
        self.sent += 1
        if self.up:
            self.msgs.append(entry.seq)
            self.outbox.transmitted(entry)

    def deliver(self, n: int) -> None:
        for seq in self.msgs[:n]:
            if self.inbox.accept(seq):
                self.app_queue.append((self.inbox.incarnation, seq))
        del self.msgs[:n]

    def take(self, n: int) -> None:
        for incarnation, seq in self.app_queue[:n]:
            self.inbox.take(incarnation, seq)
            self.delivered.append(seq)
        del self.app_queue[:n]

    def commit(self) -> None:
        self.inbox.commit()
        seq = self.inbox.ack_due()
        if seq is not None and self.up:
            self.acks.append(seq)

    def deliver_acks(self) -> None:
        for seq in self.acks:
            self.outbox.ack(seq)
        self.acks.clear()

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
                           self.inbox.received)
        if not a_leads:
            self.inbox.session(A_INC)
        self.inbox.acked = max(self.inbox.acked, self.inbox.consumed)
        result = self.outbox.session(info.incarnation, info.known == A_INC, info.consumed,
                                     info.received)
        if result.unconfirmed:
            self.failed.append(([e.seq for e in result.unconfirmed],
                                len(result.unconfirmed)))
        self.up = True
        for entry in result.resend:
            self.msgs.append(entry.seq)
            self.outbox.transmitted(entry)

    def crash_b(self) -> None:
        self.cut()
        self.b_inc += 1
        self.inbox = Inbox()
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
        for _ in range(10):
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
        seqs = [e.seq for e in self.outbox]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert self.outbox.bytes == sum(e.cost for e in self.outbox)

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
)


def run(ops: list[tuple[str, int]]) -> Model:
    m = Model()
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
        m.check_outbox()
    return m


@settings(max_examples=600, deadline=None)
@given(st.lists(OPS, max_size=60))
def test_once_in_order_or_reported(ops: list[tuple[str, int]]) -> None:
    m = run(ops)
    m.settle()
    m.check_contract()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["send", "deliver", "take", "commit", "acks", "cut",
                                 "connect"]), max_size=80))
def test_without_restarts_nothing_fails(ops: list[str]) -> None:
    """Cuts and reconnects alone never fail a message: all are delivered exactly once."""
    m = run([(op, 2 if op in ("send", "deliver", "take") else 1) for op in ops])
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
    result = out.session(7, True, 0, 0)  # first session: nothing known
    assert [e.seq for e in result.resend] == list(range(1, 11))
    result = out.session(7, True, 4, 8)  # consumed 4, holds up to 8
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


def test_inbox_duplicates_gaps_and_new_incarnation() -> None:
    box = Inbox()
    assert box.session(5)
    assert box.accept(1) and box.accept(2) and not box.accept(2) and not box.accept(1)
    assert box.accept(7)  # a gap: the sender gave 3..6 up and reported them
    assert box.take(5, 1) and box.take(5, 2)
    assert not box.take(4, 7)  # a message of an older incarnation is not acknowledged
    assert box.commit() and box.ack_due() == 2 and box.ack_due() is None
    assert not box.session(5)
    assert box.session(6) and (box.received, box.consumed) == (0, 0)


# codecs -----------------------------------------------------------------------------------

U64 = st.integers(0, 2**64 - 1)


@given(st.integers(1, 2**64 - 1), U64, U64, U64)
def test_session_roundtrip(inc: int, known: int, a: int, b: int) -> None:
    consumed, received = min(a, b), max(a, b)
    info = SessionInfo(inc, known, consumed, received)
    assert SessionInfo.decode(info.encode()) == info


@given(U64, U64, U64)
def test_closing_roundtrip(inc: int, known: int, consumed: int) -> None:
    info = ClosingInfo(inc, known, consumed)
    assert ClosingInfo.decode(info.encode()) == info


@given(st.binary(max_size=64))
def test_control_bodies_parse_or_raise_the_protocol_error(body: bytes) -> None:
    for cls in (SessionInfo, ClosingInfo):
        with contextlib.suppress(RemoteProtocolError):
            cls.decode(body)


def test_malformed_session_bodies() -> None:
    with pytest.raises(RemoteProtocolError, match="expected 32"):
        SessionInfo.decode(b"\0" * 31)
    with pytest.raises(RemoteProtocolError, match="incarnation 0"):
        SessionInfo.decode(struct.pack("!QQQQ", 0, 0, 0, 0))
    with pytest.raises(RemoteProtocolError, match="received 1 < consumed 2"):
        SessionInfo.decode(struct.pack("!QQQQ", 1, 0, 2, 1))
    with pytest.raises(ValueError):
        SessionInfo(0, 0, 0, 0)
