"""tether.flowstate — the per-flow state machine, as one table.

Everything that decides which state a flow is in lives here. A flow is born in
OPENING (the opener sent OPEN, or the acceptor received it), becomes OPEN when the
acceptor accepts, and ends in exactly one of three terminal states:

* CLOSED — ended cleanly: both sides sent FIN, either side deallocated, or the open
  was refused;
* DOWN — the peer stopped answering (liveness expired), the link was lost, or a relay
  on the way reported one of these (a RESET frame with a DOWN code);
* RESET — either side aborted it.

Half-close is two halves (as TCP and QUIC have it): LOCAL_FIN means *we* will send
no more, REMOTE_FIN means *the peer* will send no more; both together is CLOSED.

`TRANSITIONS[(state, input)] = (effect, next_state)`. A pair that is missing is an
illegal transition: if the input came from this side it raises
`LocalProtocolError`, if it came from the peer `RemoteProtocolError`. An `IGNORE`
effect means the input is legal but changes nothing and must not be acted on (a
frame still in flight after this side ended the flow).
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["LIVE_STATES", "RECEIVING_STATES", "SENDING_STATES", "TERMINAL_STATES", "TRANSITIONS",
           "Effect", "FlowInput", "FlowState", "FlowStateMachine"]


class FlowState(Enum):
    """The states of one flow."""

    # members are singletons compared by identity: C-level hashing, not
    # Enum.__hash__ (a Python function in 3.11) on every TRANSITIONS lookup
    __hash__ = object.__hash__

    OPENING = "OPENING"
    OPEN = "OPEN"
    LOCAL_FIN = "LOCAL_FIN"
    REMOTE_FIN = "REMOTE_FIN"
    CLOSED = "CLOSED"
    DOWN = "DOWN"
    RESET = "RESET"


class FlowInput(Enum):
    """What can happen to a flow. `LOCAL_*` come from this side's application,
    `REMOTE_*` from frames the peer sent, the rest from the link itself."""

    __hash__ = object.__hash__

    LOCAL_ACCEPT = "LOCAL_ACCEPT"
    REMOTE_ACCEPT = "REMOTE_ACCEPT"
    LOCAL_REJECT = "LOCAL_REJECT"
    REMOTE_REJECT = "REMOTE_REJECT"
    LOCAL_DATA = "LOCAL_DATA"
    REMOTE_DATA = "REMOTE_DATA"
    LOCAL_FIN = "LOCAL_FIN"
    REMOTE_FIN = "REMOTE_FIN"
    LOCAL_DEALLOC = "LOCAL_DEALLOC"
    REMOTE_DEALLOC = "REMOTE_DEALLOC"
    LOCAL_RESET = "LOCAL_RESET"
    REMOTE_RESET = "REMOTE_RESET"
    REMOTE_DOWN = "REMOTE_DOWN"
    LIVENESS_EXPIRED = "LIVENESS_EXPIRED"
    LINK_LOST = "LINK_LOST"

    @property
    def is_remote(self) -> bool:
        """True for inputs caused by a frame from the peer."""
        return self.name.startswith("REMOTE_")


class Effect(Enum):
    """What the caller should do with a legal input."""

    APPLY = "APPLY"
    IGNORE = "IGNORE"


S = FlowState
I = FlowInput  # noqa: E741
A, X = Effect.APPLY, Effect.IGNORE

LIVE_STATES: Final = frozenset({S.OPENING, S.OPEN, S.LOCAL_FIN, S.REMOTE_FIN})
TERMINAL_STATES: Final = frozenset({S.CLOSED, S.DOWN, S.RESET})
# (sets, not tuples built per test: a relay asks on the path of every close)
SENDING_STATES: Final = frozenset({S.OPEN, S.REMOTE_FIN})
"""The states in which this side may still send DATA."""
RECEIVING_STATES: Final = frozenset({S.OPEN, S.LOCAL_FIN})
"""The states in which the peer may still send DATA."""

TRANSITIONS: Final[dict[tuple[FlowState, FlowInput], tuple[Effect, FlowState]]] = {
    # opening
    (S.OPENING, I.LOCAL_ACCEPT): (A, S.OPEN),
    (S.OPENING, I.REMOTE_ACCEPT): (A, S.OPEN),
    (S.OPENING, I.LOCAL_REJECT): (A, S.CLOSED),
    (S.OPENING, I.REMOTE_REJECT): (A, S.CLOSED),
    # data flows while that direction is open
    (S.OPEN, I.LOCAL_DATA): (A, S.OPEN),
    (S.OPEN, I.REMOTE_DATA): (A, S.OPEN),
    (S.LOCAL_FIN, I.REMOTE_DATA): (A, S.LOCAL_FIN),
    (S.REMOTE_FIN, I.LOCAL_DATA): (A, S.REMOTE_FIN),
    # half-close: each direction ends on its own
    (S.OPEN, I.LOCAL_FIN): (A, S.LOCAL_FIN),
    (S.OPEN, I.REMOTE_FIN): (A, S.REMOTE_FIN),
    (S.REMOTE_FIN, I.LOCAL_FIN): (A, S.CLOSED),
    (S.LOCAL_FIN, I.REMOTE_FIN): (A, S.CLOSED),
    # a FIN repeated by this side is harmless (close_write() twice)
    (S.LOCAL_FIN, I.LOCAL_FIN): (X, S.LOCAL_FIN),
    # frames the peer sent before it learned that this side ended the flow
    **{(t, i): (X, t) for t in TERMINAL_STATES
       for i in (I.REMOTE_DATA, I.REMOTE_FIN, I.REMOTE_DEALLOC, I.REMOTE_RESET,
                 I.REMOTE_DOWN, I.REMOTE_ACCEPT, I.REMOTE_REJECT)},
    # ending the flow from any live state; once ended, further ends change nothing
    **{(s, i): (A, nxt) for s in LIVE_STATES for i, nxt in (
        (I.LOCAL_DEALLOC, S.CLOSED), (I.REMOTE_DEALLOC, S.CLOSED),
        (I.LOCAL_RESET, S.RESET), (I.REMOTE_RESET, S.RESET), (I.REMOTE_DOWN, S.DOWN),
        (I.LIVENESS_EXPIRED, S.DOWN), (I.LINK_LOST, S.DOWN))},
    **{(t, i): (X, t) for t in TERMINAL_STATES
       for i in (I.LOCAL_DEALLOC, I.LOCAL_RESET, I.LIVENESS_EXPIRED, I.LINK_LOST)},
}

_WHY: Final = {
    I.LOCAL_DATA: "cannot write",
    I.REMOTE_DATA: "peer sent DATA",
    I.LOCAL_FIN: "cannot half-close",
    I.REMOTE_FIN: "peer sent FIN",
    I.LOCAL_ACCEPT: "cannot accept",
    I.REMOTE_ACCEPT: "peer sent OPEN_OK",
    I.LOCAL_REJECT: "cannot reject",
    I.REMOTE_REJECT: "peer sent OPEN_ERR",
}


class FlowStateMachine:
    """The state of one flow, changed only through `process`."""

    __slots__ = ("state",)

    def __init__(self, state: FlowState = FlowState.OPENING) -> None:
        self.state = state

    def process(self, event: FlowInput) -> bool:
        """Apply `event`. Returns True if it is to be acted on, False if it is to be
        ignored. Raises `LocalProtocolError` / `RemoteProtocolError` for an illegal
        input, leaving the state unchanged."""
        try:
            effect, nxt = TRANSITIONS[(self.state, event)]
        except KeyError:
            why = _WHY.get(event, event.name.lower())
            message = f"{why} in state {self.state.name}"
            if event.is_remote:
                raise RemoteProtocolError(message) from None
            raise LocalProtocolError(message) from None
        self.state = nxt
        return effect is Effect.APPLY

    @property
    def is_terminal(self) -> bool:
        """The flow has ended (CLOSED, DOWN or RESET)."""
        return self.state in TERMINAL_STATES

    @property
    def can_send(self) -> bool:
        """This side may still send DATA."""
        return self.state in SENDING_STATES

    @property
    def can_receive(self) -> bool:
        """The peer may still send DATA."""
        return self.state in RECEIVING_STATES

    def __repr__(self) -> str:
        return f"FlowStateMachine({self.state.name})"
