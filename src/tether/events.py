"""Events a `tether.link.Link` hands to its adapter: small, frozen, past tense.

Every stream a link knows ends with exactly one `FlowEnded`, whatever ended it
(both FINs, a dealloc on either side, a reset, a refused open, liveness expiry,
a lost link, a local shutdown). That single event is what makes the semantics
contract "every Opened gets exactly one Closed" hold further up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .flowstate import FlowState

__all__ = [
    "AckReceived",
    "DataReceived",
    "Event",
    "FinReceived",
    "FlowAccepted",
    "FlowEnded",
    "FlowOpenRequested",
    "GoAwayReceived",
    "HandshakeCompleted",
    "KeepAliveReceived",
    "LinkTerminated",
    "MessageReceived",
    "StreamProtocolError",
    "WindowUpdated",
]

Initiator = Literal["local", "peer", "link"]


class Event:
    """Base of all link events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HandshakeCompleted(Event):
    """Both HELLOs were exchanged; the link carries flows from now on."""

    peer_name: str
    max_payload: int
    peer_heartbeat: float


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowOpenRequested(Event):
    """The peer opened a stream; answer with `accept_flow` or `reject_flow`.
    `liveness` is in seconds, None for no liveness."""

    stream: int
    service: str
    liveness: float | None
    mode: int
    origin: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowAccepted(Event):
    """The peer accepted a stream this side opened."""

    stream: int


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Bytes arrived on a stream. Call `Link.consumed` once the application took them.

    `data` is usually a read-only `memoryview` of the bytes the link read (no copy);
    take `bytes(data)` to keep it beyond the handling of the event cheaply."""

    stream: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True, kw_only=True)
class FinReceived(Event):
    """The peer will send no more data on this stream (its reader sees EOF)."""

    stream: int


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowUpdated(Event):
    """The peer granted credit; `credit` is what this side may now send."""

    stream: int
    credit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepAliveReceived(Event):
    """A KEEPALIVE arrived on a relay stream (relays forward it; endpoints never see it)."""

    stream: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowEnded(Event):
    """A stream ended; the link has forgotten it. Exactly one per stream.

    `state` is CLOSED, DOWN or RESET; `initiator` says who ended it; `reason` is the
    short contract word for logs and `Closed` events ("peer", "local", "down", ...)
    with details after a colon where there are any.
    """

    stream: int
    state: FlowState
    code: int
    reason: str
    initiator: Initiator


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageReceived(Event):
    """A mesh MSG arrived."""

    kind: int
    seq: int
    body: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class AckReceived(Event):
    """The peer acknowledged every MSG up to `seq`."""

    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GoAwayReceived(Event):
    """The peer is shutting down gracefully: streams above `last_stream` were refused."""

    last_stream: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkTerminated(Event):
    """The link is finished. Send what `data_to_send` still holds, then close the socket."""

    code: int
    reason: str
    initiator: Initiator


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamProtocolError(Event):
    """The peer broke the protocol on one stream (more data than its credit, a frame for
    a stream never opened, ...). The stream was reset (it also gets its `FlowEnded` if
    it was live); the link goes on. For the receiver's log line and counter."""

    stream: int
    code: int
    reason: str
