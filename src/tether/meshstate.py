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
  *unconfirmed*, never re-sent blindly.
* `Inbox` — the receiver's side, one per peer: the highest sequence number received
  from the peer's current incarnation (anything at or below it is a duplicate), the
  highest the application *took*, and the highest it *consumed* (asked for the next
  message after it), which is what is acknowledged.
* `SessionInfo` / `ClosingInfo` — the bodies of the SESSION and CLOSING control
  messages (`KIND_SESSION`, `KIND_CLOSING`), exchanged on every new link and on a
  graceful shutdown (`docs/protocol.md` §6.8).
"""

from __future__ import annotations

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

_SESSION: Final = struct.Struct("!QQQQ")
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
    new link, in order. `retransmits`: how many of those had been transmitted before.
    `restarted`: the peer is a different incarnation than the one last known.
    """

    unconfirmed: list[Entry]
    resend: list[Entry]
    retransmits: int
    restarted: bool


class Outbox:
    """The sending side towards one peer. See the module docstring.

    Invariants: entries are in increasing `seq` order; `bytes` is the sum of their
    costs; every entry with `seq <= sent_high` may have reached the peer's current
    incarnation (`peer_incarnation`), every other one certainly did not.
    """

    __slots__ = ("_entries", "bytes", "limit", "next_seq", "peer_incarnation", "sent_high")

    def __init__(self, limit: int) -> None:
        if limit < MESSAGE_OVERHEAD:
            raise ValueError(f"outbox limit {limit} is below one message's overhead")
        self._entries: deque[Entry] = deque()
        self.bytes = 0
        self.limit = limit
        self.next_seq = 1
        self.peer_incarnation = 0  # 0: no session with the peer yet
        self.sent_high = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries)

    def fits(self, cost: int) -> bool:
        """Whether a message costing `cost` (body + `MESSAGE_OVERHEAD`) fits now."""
        return self.bytes + cost <= self.limit

    def push(self, kind: int, body: bytes) -> Entry:
        """Queue a message; returns its entry (with its sequence number). The caller
        checks `fits` first: the bound is the caller's policy (wait, or refuse)."""
        entry = Entry(self.next_seq, kind, body)
        self.next_seq += 1
        self._entries.append(entry)
        self.bytes += entry.cost
        return entry

    def transmitted(self, entry: Entry) -> None:
        """`entry` was written to a link of the peer's current incarnation."""
        if entry.seq > self.sent_high:
            self.sent_high = entry.seq

    def ack(self, seq: int) -> int:
        """The peer consumed every message up to `seq`: drop them. Returns how many."""
        entries = self._entries
        n = 0
        while entries and entries[0].seq <= seq:
            self.bytes -= entries.popleft().cost
            n += 1
        return n

    def session(self, peer_incarnation: int, knows_me: bool, consumed: int,
                received: int) -> SessionResult:
        """A session starts on a new link: the peer is `peer_incarnation`; if it
        `knows_me` (its SESSION names this node's incarnation), it consumed every
        message up to `consumed` and holds every one up to `received`."""
        if peer_incarnation == 0:
            raise ValueError("incarnation 0 is reserved for 'unknown'")
        unconfirmed: list[Entry] = []
        restarted = self.peer_incarnation not in (0, peer_incarnation)
        if restarted:
            # Whatever the previous incarnation may have received is in doubt: it may
            # have reached its application, or died in a socket buffer. Hand it back.
            entries = self._entries
            while entries and entries[0].seq <= self.sent_high:
                entry = entries.popleft()
                self.bytes -= entry.cost
                unconfirmed.append(entry)
            self.sent_high = 0
        self.peer_incarnation = peer_incarnation
        start = 1
        if knows_me:
            received = max(received, consumed)
            self.ack(consumed)
            # c+1..received are in the peer's inbox already: do not send them again.
            self.sent_high = max(self.sent_high, min(received, self.next_seq - 1))
            start = received + 1
        resend = [e for e in self._entries if e.seq >= start]
        retransmits = sum(1 for e in resend if e.seq <= self.sent_high)
        if resend:
            self.sent_high = max(self.sent_high, resend[-1].seq)
        return SessionResult(unconfirmed, resend, retransmits, restarted)

    def peer_closing(self, peer_incarnation: int, knows_me: bool, consumed: int) -> int:
        """The peer's incarnation is shutting down gracefully and consumed exactly the
        messages up to `consumed`: drop those; the others were certainly not delivered
        (they are no longer in doubt). Returns how many were dropped."""
        if peer_incarnation != self.peer_incarnation:
            return 0
        n = self.ack(consumed) if knows_me else 0
        self.sent_high = consumed if knows_me else 0
        return n

    def take_all(self) -> tuple[list[Entry], int]:
        """Empty the outbox (to report its messages as failed): (entries, how many of the
        first ones may have reached the peer's current incarnation)."""
        entries = list(self._entries)
        self._entries.clear()
        self.bytes = 0
        unconfirmed = sum(1 for e in entries if e.seq <= self.sent_high)
        return entries, unconfirmed

    def remove(self, entry: Entry) -> None:
        """Take one entry out (it cannot be sent at all, e.g. too large for the link)."""
        self._entries.remove(entry)
        self.bytes -= entry.cost


class Inbox:
    """The receiving side from one peer: duplicate suppression and what to acknowledge.

    `received` >= `taken` >= `consumed` >= 0, all relative to `incarnation` (the
    peer's, 0 before the first SESSION). `acked` is what was last told to the peer
    (by ACK, SESSION or CLOSING)."""

    __slots__ = ("acked", "consumed", "incarnation", "received", "taken")

    def __init__(self) -> None:
        self.incarnation = 0
        self.received = 0
        self.taken = 0
        self.consumed = 0
        self.acked = 0

    def session(self, peer_incarnation: int) -> bool:
        """The peer's SESSION named `peer_incarnation`; a new one restarts the numbering.
        Returns True if it is new."""
        if peer_incarnation == self.incarnation:
            return False
        self.incarnation = peer_incarnation
        self.received = self.taken = self.consumed = self.acked = 0
        return True

    def accept(self, seq: int) -> bool:
        """A MSG numbered `seq` arrived: True to deliver it, False for a duplicate. A
        gap is legal (the sender gave those messages up and reported them)."""
        if seq <= self.received:
            return False
        self.received = seq
        return True

    def take(self, incarnation: int, seq: int) -> bool:
        """The application took message `seq` of the peer's `incarnation` (ignored if the
        peer has restarted since). Returns whether it counted."""
        if incarnation != self.incarnation or seq <= self.taken:
            return False
        self.taken = seq
        return True

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
    sender `known`s it (0: none); and, of that incarnation's messages, the highest the
    sender `consumed` (acknowledged) and the highest it `received`."""

    incarnation: int
    known: int
    consumed: int
    received: int

    def __post_init__(self) -> None:
        for field in (self.incarnation, self.known, self.consumed, self.received):
            if not 0 <= field <= _U64_MAX:
                raise ValueError(f"SESSION field {field} out of the u64 range")
        if self.incarnation == 0:
            raise ValueError("SESSION incarnation must not be 0")

    def encode(self) -> bytes:
        """The 32-byte body."""
        return _SESSION.pack(self.incarnation, self.known, self.consumed, self.received)

    @classmethod
    def decode(cls, body: bytes) -> SessionInfo:
        """Parse a body; raises `RemoteProtocolError` if it is malformed."""
        if len(body) != _SESSION.size:
            raise RemoteProtocolError(f"SESSION body of {len(body)} bytes, expected "
                                      f"{_SESSION.size}")
        incarnation, known, consumed, received = _SESSION.unpack(body)
        if incarnation == 0:
            raise RemoteProtocolError("SESSION with incarnation 0")
        if received < consumed:
            raise RemoteProtocolError(f"SESSION says received {received} < consumed "
                                      f"{consumed}")
        return cls(incarnation, known, consumed, received)


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
