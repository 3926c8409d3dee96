"""tether.meshstate — the mesh's delivery bookkeeping for one pair of nodes, without I/O.

The mesh (`tether.mesh`) guarantees that the messages one node sends another are
delivered to the receiving application in order and once, across any number of lost
links, or returned in a failure report. This module is that guarantee's arithmetic,
kept apart from sockets and clocks so that it can be tested exhaustively:

* `Outbox` — the sender's side, one per peer: every message accepted and not yet
  acknowledged, numbered 1, 2, 3, ... within this node's *incarnation* (one run of
  the process). A cumulative ACK drops a prefix. When a session starts on a new
  link, the peer's SESSION says what it already has, and the outbox answers what to
  send again; when the peer turns out to be a *new* incarnation (it restarted), the
  messages its previous incarnation may or may not have delivered are handed back as
  *unconfirmed*, never re-sent blindly. What is in flight (transmitted, not yet
  acknowledged) stays within the peer's receive *window*, announced in its SESSION.
* `Inbox` — the receiver's side, one per peer: the highest sequence number received
  from the peer's current incarnation (anything at or below it is a duplicate), the
  highest the application *took*, and the highest it *consumed* (asked for the next
  message after it), which is what is acknowledged; and the bytes received and not yet
  taken, which a peer that ignores the window it was given makes exceed it (a
  `RemoteProtocolError`).
* `SessionInfo` / `ClosingInfo` — the bodies of the SESSION and CLOSING control
  messages (`KIND_SESSION`, `KIND_CLOSING`), exchanged on every new link and on a
  graceful shutdown (`docs/protocol.md` §6.8).
"""

from __future__ import annotations

import itertools
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from .errors import RemoteProtocolError

__all__ = [
    "KIND_CLOSING",
    "KIND_SESSION",
    "MESSAGE_OVERHEAD",
    "MIN_WINDOW",
    "ClosingInfo",
    "Entry",
    "Inbox",
    "Outbox",
    "SessionInfo",
    "SessionResult",
]

# MSG kinds of the mesh's own control messages (sent with seq 0, never acknowledged).
KIND_SESSION: Final = 0xFF10
KIND_CLOSING: Final = 0xFF11

# What one queued message costs in an outbox beyond its body: a bound by bytes must
# also bound a flood of empty messages.
MESSAGE_OVERHEAD: Final = 64

# The smallest receive window a SESSION may announce: one message of the smallest
# `max_message` a mesh allows (1 KiB), with its overhead.
MIN_WINDOW: Final = 1024 + MESSAGE_OVERHEAD

_SESSION: Final = struct.Struct("!QQQQQ")
_CLOSING: Final = struct.Struct("!QQQ")
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF


class Entry:
    """One message in an outbox: its sequence number, kind, body and queue cost."""

    __slots__ = ("body", "cost", "kind", "seq")

    def __init__(self, seq: int, kind: int, body: bytes) -> None:
        self.seq = seq
        self.kind = kind
        self.body = body
        self.cost = len(body) + MESSAGE_OVERHEAD

    def __repr__(self) -> str:
        return f"Entry(seq={self.seq}, kind={self.kind}, body={self.body[:16]!r})"


@dataclass(frozen=True, slots=True)
class SessionResult:
    """What an outbox makes of the peer's SESSION.

    `unconfirmed`: messages that were sent to an earlier incarnation of the peer and
    never acknowledged (it may have delivered some of them before it ended); they are
    out of the outbox and must be reported. `resend`: the messages to transmit on the
    new link now, in order, as far as the peer's window allows (already counted as
    transmitted; the rest follow as ACKs make room, see `sendable`). `retransmits`:
    how many of those had been transmitted before. `restarted`: the peer is a
    different incarnation than the one last known.
    """

    unconfirmed: list[Entry]
    resend: list[Entry]
    retransmits: int
    restarted: bool


class Outbox:
    """The sending side towards one peer. See the module docstring.

    Invariants: every entry is in one of two runs, each in increasing `seq` order, the
    first wholly below the second: *sent* entries were transmitted to the peer's
    current incarnation (`peer_incarnation`) and may have reached it; *waiting*
    entries certainly did not. `inflight` is the sum of the sent entries' costs,
    `bytes` that of all entries. While a session is up the caller transmits what
    `sendable` offers, which keeps `inflight` within the peer's receive `window` (one
    entry may always be in flight). `sent_high` is the highest `seq` ever transmitted
    to the peer's current incarnation (it tells a retransmission from a first one);
    `retransmits` counts retransmissions.
    """

    __slots__ = ("_sent", "_waiting", "bytes", "inflight", "limit", "next_seq",
                 "peer_incarnation", "retransmits", "sent_high", "window")

    def __init__(self, limit: int) -> None:
        if limit < MESSAGE_OVERHEAD:
            raise ValueError(f"outbox limit {limit} is below one message's overhead")
        self._sent: deque[Entry] = deque()
        self._waiting: deque[Entry] = deque()
        self.bytes = 0
        self.inflight = 0
        self.limit = limit
        self.next_seq = 1
        self.peer_incarnation = 0  # 0: no session with the peer yet
        self.sent_high = 0
        self.retransmits = 0
        self.window = 0  # the peer's receive window, from its last SESSION

    def __len__(self) -> int:
        return len(self._sent) + len(self._waiting)

    def __bool__(self) -> bool:
        return bool(self._sent or self._waiting)

    def __iter__(self) -> Iterator[Entry]:
        return itertools.chain(self._sent, self._waiting)

    @property
    def waiting(self) -> int:
        """How many entries wait to be transmitted (to the peer's current incarnation)."""
        return len(self._waiting)

    def fits(self, cost: int) -> bool:
        """Whether a message costing `cost` (body + `MESSAGE_OVERHEAD`) fits now."""
        return self.bytes + cost <= self.limit

    def push(self, kind: int, body: bytes) -> Entry:
        """Queue a message; returns its entry (with its sequence number). The caller
        checks `fits` first: the bound is the caller's policy (wait, or refuse)."""
        entry = Entry(self.next_seq, kind, body)
        self.next_seq += 1
        self._waiting.append(entry)
        self.bytes += entry.cost
        return entry

    def push_transmitted(self, kind: int, body: bytes) -> Entry | None:
        """While a session is up: queue a message and, if nothing waits before it and
        the peer's window has room, count it as transmitted at once and return it (the
        caller writes it now). Otherwise it waits, and None is returned: while a
        session is up, entries wait only for ACKs to open the window (`sendable`)."""
        seq = self.next_seq
        entry = Entry(seq, kind, body)
        self.next_seq = seq + 1
        cost = entry.cost
        self.bytes += cost
        inflight = self.inflight + cost
        if (inflight <= self.window or not self._sent) and not self._waiting:
            self._sent.append(entry)
            self.inflight = inflight
            self.sent_high = seq  # (a new entry: above everything transmitted)
            return entry
        self._waiting.append(entry)
        return None

    def sendable(self) -> Entry | None:
        """The next entry to transmit if the peer's window has room for it (there is
        always room for one when nothing is in flight), else None. Meaningful while a
        session is up; call `transmitted` once it is written."""
        waiting = self._waiting
        if waiting:
            entry = waiting[0]
            if not self._sent or self.inflight + entry.cost <= self.window:
                return entry
        return None

    def transmitted(self, entry: Entry) -> None:
        """`entry`, the next waiting one (see `sendable`), was written to a link of the
        peer's current incarnation."""
        waiting = self._waiting
        if not waiting or waiting[0] is not entry:
            raise ValueError(f"{entry!r} is not the next entry to transmit")
        waiting.popleft()
        self._sent.append(entry)
        self.inflight += entry.cost
        if entry.seq <= self.sent_high:
            self.retransmits += 1
        else:
            self.sent_high = entry.seq

    def ack_transmitted(self, seq: int) -> int:
        """An ACK frame: the peer consumed every message up to `seq`, which it can only
        have been sent on this session: drop them, or raise `RemoteProtocolError` if
        `seq` names a message that is not in flight (one waiting for the window, or one
        never queued): the peer acknowledges what it never received. Returns how many
        were dropped."""
        limit = self.ack_limit
        if seq > limit:
            raise RemoteProtocolError(f"ACK of MSG {seq}, beyond the last one transmitted "
                                      f"to it ({limit})")
        return self.ack(seq)

    @property
    def ack_limit(self) -> int:
        """The highest sequence number the peer's current incarnation may acknowledge
        on this session: the last one in flight (none of those waiting)."""
        if self._sent:
            return self._sent[-1].seq
        if self._waiting:
            return self._waiting[0].seq - 1
        return self.next_seq - 1

    def ack(self, seq: int) -> int:
        """The peer consumed every message up to `seq`: drop them. Returns how many."""
        sent = self._sent
        n = 0
        while sent and sent[0].seq <= seq:
            cost = sent.popleft().cost
            self.inflight -= cost
            self.bytes -= cost
            n += 1
        if not sent:  # (only a SESSION's `consumed` can name untransmitted entries)
            waiting = self._waiting
            while waiting and waiting[0].seq <= seq:
                self.bytes -= waiting.popleft().cost
                n += 1
        return n

    def check_session(self, peer_incarnation: int, knows_me: bool, received: int) -> None:
        """Raise `RemoteProtocolError` if the peer's SESSION claims to hold messages of
        this node that were never transmitted to it: `session` would drop them as
        consumed (or count them as in flight), neither delivered nor reported. An
        incarnation of the peer this outbox has not had a session with yet holds
        nothing (it is new, or `sent_high` is of another one)."""
        if not knows_me:
            return
        known = peer_incarnation == self.peer_incarnation
        limit = self.sent_high if known or self.peer_incarnation == 0 else 0
        if received > limit:
            raise RemoteProtocolError(
                f"SESSION says received {received} of this node's messages, but the last "
                f"one transmitted to it is {limit}")

    def session(self, peer_incarnation: int, knows_me: bool, consumed: int,
                received: int, window: int) -> SessionResult:
        """A session starts on a new link: the peer is `peer_incarnation`, and holds at
        most `window` bytes of messages not yet taken by its application; if it
        `knows_me` (its SESSION names this node's incarnation), it consumed every
        message up to `consumed` and holds every one up to `received`."""
        if peer_incarnation == 0:
            raise ValueError("incarnation 0 is reserved for 'unknown'")
        if window < 1:
            raise ValueError(f"receive window {window} must be positive")
        unconfirmed: list[Entry] = []
        sent, waiting = self._sent, self._waiting
        restarted = self.peer_incarnation not in (0, peer_incarnation)
        if restarted:
            # Whatever the previous incarnation may have received is in doubt: it may
            # have reached its application, or died in a socket buffer. Hand it back.
            unconfirmed = list(sent)
            sent.clear()
            self.bytes -= self.inflight
            self.inflight = 0
            self.sent_high = 0
        self.peer_incarnation = peer_incarnation
        self.window = window
        held = 0
        if knows_me:
            held = max(received, consumed)
            self.ack(consumed)
            self.sent_high = max(self.sent_high, min(held, self.next_seq - 1))
        # consumed+1..held are in the peer's inbox already: in flight, not sent again;
        # anything above certainly did not reach it (the old link is gone): waiting.
        while sent and sent[-1].seq > held:
            entry = sent.pop()
            self.inflight -= entry.cost
            waiting.appendleft(entry)
        while waiting and waiting[0].seq <= held:
            entry = waiting.popleft()
            self.inflight += entry.cost
            sent.append(entry)
        before = self.retransmits
        resend = []
        while (next_entry := self.sendable()) is not None:
            self.transmitted(next_entry)
            resend.append(next_entry)
        return SessionResult(unconfirmed, resend, self.retransmits - before, restarted)

    def peer_closing(self, peer_incarnation: int, knows_me: bool, consumed: int) -> int:
        """The peer's incarnation is shutting down gracefully and consumed exactly the
        messages up to `consumed`: drop those; the others were certainly not delivered
        (they are no longer in doubt). Returns how many were dropped. Raises
        `RemoteProtocolError` if `consumed` names a message not in flight to it."""
        if peer_incarnation != self.peer_incarnation:
            return 0
        if knows_me and consumed > self.ack_limit:
            raise RemoteProtocolError(f"CLOSING says consumed {consumed}, beyond the last "
                                      f"message transmitted to it ({self.ack_limit})")
        n = self.ack(consumed) if knows_me else 0
        sent = self._sent
        while sent:
            entry = sent.pop()
            self.inflight -= entry.cost
            self._waiting.appendleft(entry)
        self.sent_high = consumed if knows_me else 0
        return n

    def take_all(self) -> tuple[list[Entry], int]:
        """Empty the outbox (to report its messages as failed): (entries, how many of the
        first ones may have reached the peer's current incarnation)."""
        unconfirmed = len(self._sent)
        entries = [*self._sent, *self._waiting]
        self._sent.clear()
        self._waiting.clear()
        self.bytes = self.inflight = 0
        return entries, unconfirmed

    def remove(self, entry: Entry) -> None:
        """Take one entry out (it cannot be sent at all, e.g. too large for the link)."""
        if entry in self._sent:
            self._sent.remove(entry)
            self.inflight -= entry.cost
        else:
            self._waiting.remove(entry)
        self.bytes -= entry.cost


class Inbox:
    """The receiving side from one peer: duplicate suppression, what to acknowledge,
    and the receive window.

    `received` >= `taken` >= `consumed` >= 0, all relative to `incarnation` (the
    peer's, 0 before the first SESSION). `acked` is what was last told to the peer
    (by ACK, SESSION or CLOSING). `held` is the cost (body + `MESSAGE_OVERHEAD`) of
    the messages of that incarnation received and not yet taken; `window` bounds it.
    An honest sender keeps what it has in flight within the window this node
    announced (`SessionInfo.window`), and what is in flight always covers `held`."""

    __slots__ = ("acked", "consumed", "held", "incarnation", "received", "taken", "window")

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"receive window {window} must be positive")
        self.window = window
        self.incarnation = 0
        self.received = 0
        self.taken = 0
        self.consumed = 0
        self.acked = 0
        self.held = 0

    def session(self, peer_incarnation: int) -> bool:
        """The peer's SESSION named `peer_incarnation`; a new one restarts the numbering
        (and the window: messages of the previous one still held are the caller's to
        bound). Returns True if it is new."""
        if peer_incarnation == self.incarnation:
            return False
        self.incarnation = peer_incarnation
        self.received = self.taken = self.consumed = self.acked = self.held = 0
        return True

    def accept(self, seq: int, cost: int) -> bool:
        """A MSG numbered `seq` costing `cost` arrived: True to deliver it, False for a
        duplicate. A gap is legal (the sender gave those messages up and reported
        them). Raises `RemoteProtocolError` if holding it would exceed the window: the
        sender ignored the window it was given (or the ACKs)."""
        if seq <= self.received:
            return False
        held = self.held + cost
        if held > self.window:
            raise RemoteProtocolError(
                f"receive window exceeded: MSG {seq} would make {held} bytes of messages "
                f"not yet taken, above the window of {self.window} bytes announced in "
                "SESSION")
        self.held = held
        self.received = seq
        return True

    def take(self, incarnation: int, seq: int, cost: int) -> bool:
        """The application took message `seq` (costing `cost`) of the peer's
        `incarnation` (ignored if the peer has restarted since). Returns whether it
        counted."""
        if incarnation != self.incarnation or seq <= self.taken:
            return False
        self.taken = seq
        self.held -= cost
        return True

    def drop_unread(self) -> None:
        """Everything received and not taken was discarded (the sender still holds it,
        unacknowledged, and sends it again)."""
        self.received = self.taken = self.consumed
        self.held = 0

    def commit(self) -> bool:
        """The application is done with everything it took: consume it. Returns whether
        an acknowledgement is now due."""
        if self.taken > self.consumed:
            self.consumed = self.taken
        return self.consumed > self.acked

    def ack_due(self) -> int | None:
        """The sequence number to acknowledge now, or None; marks it as told."""
        if self.consumed > self.acked:
            self.acked = self.consumed
            return self.consumed
        return None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """Body of SESSION: the sender's `incarnation`; the receiver's incarnation as the
    sender `known`s it (0: none); of that incarnation's messages, the highest the
    sender `consumed` (acknowledged) and the highest it `received`; and the sender's
    receive `window`: the bytes (bodies + `MESSAGE_OVERHEAD` each) of messages it
    holds, at most, received and not yet taken by its application. A peer that has
    more than `window` in flight to it breaks the protocol."""

    incarnation: int
    known: int
    consumed: int
    received: int
    window: int

    def __post_init__(self) -> None:
        for field in (self.incarnation, self.known, self.consumed, self.received,
                      self.window):
            if not 0 <= field <= _U64_MAX:
                raise ValueError(f"SESSION field {field} out of the u64 range")
        if self.incarnation == 0:
            raise ValueError("SESSION incarnation must not be 0")
        if self.window < MIN_WINDOW:
            raise ValueError(f"SESSION window {self.window} below the minimum {MIN_WINDOW}")

    def encode(self) -> bytes:
        """The 40-byte body."""
        return _SESSION.pack(self.incarnation, self.known, self.consumed, self.received,
                             self.window)

    @classmethod
    def decode(cls, body: bytes) -> SessionInfo:
        """Parse a body; raises `RemoteProtocolError` if it is malformed."""
        if len(body) != _SESSION.size:
            raise RemoteProtocolError(f"SESSION body of {len(body)} bytes, expected "
                                      f"{_SESSION.size}")
        incarnation, known, consumed, received, window = _SESSION.unpack(body)
        if incarnation == 0:
            raise RemoteProtocolError("SESSION with incarnation 0")
        if received < consumed:
            raise RemoteProtocolError(f"SESSION says received {received} < consumed "
                                      f"{consumed}")
        if window < MIN_WINDOW:
            raise RemoteProtocolError(f"SESSION window {window} below the minimum "
                                      f"{MIN_WINDOW}")
        return cls(incarnation, known, consumed, received, window)


@dataclass(frozen=True, slots=True)
class ClosingInfo:
    """Body of CLOSING: the sender's `incarnation` ends now; of the receiver's
    incarnation `known` it consumed exactly the messages up to `consumed` and will
    deliver no other."""

    incarnation: int
    known: int
    consumed: int

    def __post_init__(self) -> None:
        for field in (self.incarnation, self.known, self.consumed):
            if not 0 <= field <= _U64_MAX:
                raise ValueError(f"CLOSING field {field} out of the u64 range")

    def encode(self) -> bytes:
        """The 24-byte body."""
        return _CLOSING.pack(self.incarnation, self.known, self.consumed)

    @classmethod
    def decode(cls, body: bytes) -> ClosingInfo:
        """Parse a body; raises `RemoteProtocolError` if it is malformed."""
        if len(body) != _CLOSING.size:
            raise RemoteProtocolError(f"CLOSING body of {len(body)} bytes, expected "
                                      f"{_CLOSING.size}")
        return cls(*_CLOSING.unpack(body))
