"""Every error tether raises, under one base, split by who is at fault.

`LocalProtocolError` means *you* (this process) misused the API; `RemoteProtocolError`
means the *peer* broke the protocol. Flow errors say what happened to a flow:
`FlowClosed` (it was closed, by you or cleanly by the peer), `FlowDown` (its peer
or its link stopped answering), `FlowReset` (the peer aborted it). Every error
carries a numeric `code` that also travels on the wire (RESET, OPEN_ERR, GOAWAY).
"""

from __future__ import annotations

from enum import IntEnum
from typing import TypeVar

__all__ = [
    "ErrorCode",
    "FlowClosed",
    "FlowDown",
    "FlowError",
    "FlowReset",
    "HandshakeError",
    "LocalProtocolError",
    "NoSuchService",
    "PeerDown",
    "PeerUnreachable",
    "ProtocolError",
    "RemoteProtocolError",
    "TetherError",
    "caused_by",
]

_E = TypeVar("_E", bound=BaseException)


class ErrorCode(IntEnum):
    """Numeric codes carried by RESET, OPEN_ERR and GOAWAY frames and by every error."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CLOSED = 3
    FLOW_DOWN = 4  # EFLOWDOWN: taken down locally or by its link
    FLOW_PEER = 5  # EFLOWPEER: the peer stopped answering within the liveness timeout
    RESET = 6  # the application aborted the flow
    NO_SUCH_SERVICE = 7
    HANDSHAKE_FAILED = 8
    BAD_TOKEN = 9
    VERSION_MISMATCH = 10
    FLOW_CONTROL = 11  # the peer sent more than its credit
    FRAME_TOO_LARGE = 12
    REFUSED = 13  # GOAWAY in progress, limits reached
    SHUTDOWN = 14
    SLOW_CONSUMER = 15
    UNREACHABLE = 16
    DENIED = 17  # a policy does not allow this node to reach this service


class TetherError(Exception):
    """Base of every error raised by tether. `code` is an `ErrorCode`."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str = "", code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def reason(self) -> str:
        """The human-readable reason, as given when the error was raised."""
        return str(self)


class ProtocolError(TetherError):
    """The tether protocol was broken. See the two subclasses for who broke it."""

    code = ErrorCode.PROTOCOL_ERROR


class LocalProtocolError(ProtocolError):
    """This side misused the API: an illegal call for the flow's state, a bad argument."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow: a malformed frame, a frame
    that is illegal in the flow's state, more data than its credit."""


class HandshakeError(TetherError):
    """The link's HELLO exchange failed: wrong token, version mismatch, TLS failure, timeout."""

    code = ErrorCode.HANDSHAKE_FAILED


class FlowError(TetherError):
    """Base of errors about one flow."""


class FlowClosed(FlowError):
    """The flow is closed (by this side, or cleanly deallocated by the peer), or the id
    is unknown. Writes after the peer's dealloc raise this."""

    code = ErrorCode.FLOW_CLOSED


class FlowDown(FlowError):
    """The flow is DOWN: its link was lost or it was taken down locally (code FLOW_DOWN).

    A read pending on a DOWN flow raises this instead of hanging; `reason` says why
    (`"link lost"`, `"shutdown"`, ...).
    """

    code = ErrorCode.FLOW_DOWN


class PeerDown(FlowDown):
    """The peer was silent for the whole liveness timeout (code FLOW_PEER,
    reason `"unresponsive peer"`)."""

    code = ErrorCode.FLOW_PEER


class FlowReset(FlowError):
    """The peer (or a relay on the way) aborted the flow."""

    code = ErrorCode.RESET


class NoSuchService(TetherError):
    """No node has registered the service name that was asked for."""

    code = ErrorCode.NO_SUCH_SERVICE


class PeerUnreachable(TetherError):
    """A named node is not a known peer, or cannot be reached."""

    code = ErrorCode.UNREACHABLE


def caused_by(error: _E, cause: BaseException) -> _E:
    """`error` with `cause` as its ``__cause__``, to raise: ``raise caused_by(e, exc)``
    is ``raise e from exc``, which coroutines compiled with mypyc do not honour."""
    error.__cause__ = cause
    return error
