"""tether: long-lived network flows that never hang.

The public API lives here; submodules `wire`, `link`, `flowstate`, `liveness` are the
sans-IO core and `aio` the asyncio adapter. See docs/ and README.md.
"""

from .aio import SocketOptions, run
from .errors import (
    ErrorCode,
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
from .flow import Flow
from .flowstate import FlowState
from .gateway import Gateway
from .ids import FlowId
from .node import Node

__version__ = "0.1.0"

__all__ = [
    "ErrorCode",
    "Flow",
    "FlowClosed",
    "FlowDown",
    "FlowId",
    "FlowReset",
    "FlowState",
    "Gateway",
    "HandshakeError",
    "LocalProtocolError",
    "NoSuchService",
    "Node",
    "PeerDown",
    "PeerUnreachable",
    "ProtocolError",
    "RemoteProtocolError",
    "SocketOptions",
    "TetherError",
    "run",
]
