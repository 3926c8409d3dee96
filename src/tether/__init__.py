"""tether: long-lived network flows that never hang."""

from .errors import (
    FlowClosed,
    FlowDown,
    FlowReset,
    HandshakeError,
    LocalProtocolError,
    NoSuchService,
    PeerDown,
    PeerUnreachable,
    ProtocolError,
    RemoteProtocolError,
    TetherError,
)

__version__ = "0.1.0"

__all__ = [
    "FlowClosed",
    "FlowDown",
    "FlowReset",
    "HandshakeError",
    "LocalProtocolError",
    "NoSuchService",
    "PeerDown",
    "PeerUnreachable",
    "ProtocolError",
    "RemoteProtocolError",
    "TetherError",
]
