"""tether: long-lived network flows that never hang.

The public API lives here; submodules `wire`, `link`, `flowstate`, `liveness` are the
sans-IO core and `aio` the asyncio adapter. See docs/ and README.md.
"""

from . import sync
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
from .framing import LengthPrefixed, Lines, MessageTooLarge, Raw
from .gateway import Gateway
from .hub import Closed, Data, FlowsClosed, Hub, HubClosed, HubStats, Messages, Opened
from .ids import FlowId
from .mesh import Failure, FailuresNotTaken, Mesh, Message, PeerInfo, PeerState, QueueFull
from .node import Node
from .tlsfiles import ServerTLS
from .workers import WorkerPool, WorkersFailed, serve

__version__ = "0.1.0"

__all__ = [
    "Closed",
    "Data",
    "ErrorCode",
    "Failure",
    "FailuresNotTaken",
    "Flow",
    "FlowClosed",
    "FlowDown",
    "FlowId",
    "FlowReset",
    "FlowState",
    "FlowsClosed",
    "Gateway",
    "HandshakeError",
    "Hub",
    "HubClosed",
    "HubStats",
    "LengthPrefixed",
    "Lines",
    "LocalProtocolError",
    "Mesh",
    "Message",
    "MessageTooLarge",
    "Messages",
    "NoSuchService",
    "Node",
    "Opened",
    "PeerDown",
    "PeerInfo",
    "PeerState",
    "PeerUnreachable",
    "ProtocolError",
    "QueueFull",
    "Raw",
    "RemoteProtocolError",
    "ServerTLS",
    "SocketOptions",
    "TetherError",
    "WorkerPool",
    "WorkersFailed",
    "run",
    "serve",
    "sync",
]
