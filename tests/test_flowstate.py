"""The flow state machine, exhaustively (h2 `test_state_machines.py` style).

Two kinds of tests. The first checks `FlowStateMachine.process` against the table, cell by
cell, for every (state, input) pair. The second states what the table *means* without
reading it (terminal states absorb, every live state can end, half-close works in both
orders, data flows exactly where a direction is open), so a wrong entry in the table is
caught even though the first kind would happily agree with it.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from collections import deque
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from tether.flowstate import (
    LIVE_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    Effect,
    FlowInput,
    FlowState,
    FlowStateMachine,
)

S, I = FlowState, FlowInput  # noqa: E741

# Spelled out here, not taken from the module, so that the tests say what is intended.
LIVE = (S.OPENING, S.OPEN, S.LOCAL_FIN, S.REMOTE_FIN)
TERMINAL = (S.CLOSED, S.DOWN, S.RESET)
LOCAL = tuple(i for i in FlowInput if i.name.startswith("LOCAL_"))
REMOTE = tuple(i for i in FlowInput if i.name.startswith("REMOTE_"))
FROM_LINK = (I.LIVENESS_EXPIRED, I.LINK_LOST)
# How a live flow ends, from any live state.
ENDINGS = {
    I.LINK_LOST: S.DOWN,
    I.LIVENESS_EXPIRED: S.DOWN,
    I.REMOTE_DOWN: S.DOWN,
    I.LOCAL_RESET: S.RESET,
    I.REMOTE_RESET: S.RESET,
    I.LOCAL_DEALLOC: S.CLOSED,
    I.REMOTE_DEALLOC: S.CLOSED,
}
CAN_SEND = {S.OPEN, S.REMOTE_FIN}  # this side has not sent FIN
CAN_RECEIVE = {S.OPEN, S.LOCAL_FIN}  # the peer has not sent FIN

ALL_PAIRS = list(itertools.product(FlowState, FlowInput))


def pair_id(pair: tuple[FlowState, FlowInput]) -> str:
    return f"{pair[0].name}-{pair[1].name}"


TABLE_KEYS = sorted(TRANSITIONS, key=pair_id)


def expected_error(event: FlowInput) -> type[ProtocolError]:
    return RemoteProtocolError if event in REMOTE else LocalProtocolError


def state_of(fsm: FlowStateMachine) -> FlowState:
    """`fsm.state`, read afresh (keeps mypy from assuming `process` changed nothing)."""
    return fsm.state


def check_illegal(fsm: FlowStateMachine, event: FlowInput) -> None:
    """`event` must raise the error of whoever is at fault, naming the state, and change
    nothing."""
    state = fsm.state
    with pytest.raises(ProtocolError) as info:
        fsm.process(event)
    assert type(info.value) is expected_error(event)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert re.search(rf"\b{state.name}\b", str(info.value)), str(info.value)
    assert fsm.state is state


# ---------------------------------------------------------------------------- the inputs


def test_states_and_inputs_partition() -> None:
    assert set(LIVE) | set(TERMINAL) == set(FlowState)
    assert not set(LIVE) & set(TERMINAL)
    assert set(LIVE_STATES) == set(LIVE)
    assert set(TERMINAL_STATES) == set(TERMINAL)
    assert set(LOCAL) | set(REMOTE) | set(FROM_LINK) == set(FlowInput)
    assert len(LOCAL) + len(REMOTE) + len(FROM_LINK) == len(FlowInput)


@pytest.mark.parametrize("event", list(FlowInput), ids=lambda e: e.name)
def test_is_remote(event: FlowInput) -> None:
    assert event.is_remote is (event in REMOTE)


def test_table_has_only_known_keys_and_effects() -> None:
    for (state, event), (effect, nxt) in TRANSITIONS.items():
        assert isinstance(state, FlowState)
        assert isinstance(event, FlowInput)
        assert isinstance(effect, Effect)
        assert isinstance(nxt, FlowState)


@pytest.mark.parametrize("pair", TABLE_KEYS, ids=pair_id)
def test_ignore_changes_nothing(pair: tuple[FlowState, FlowInput]) -> None:
    effect, nxt = TRANSITIONS[pair]
    if effect is Effect.IGNORE:
        assert nxt is pair[0]


# ---------------------------------------------------------------------------- every pair


@pytest.mark.parametrize("pair", ALL_PAIRS, ids=pair_id)
def test_every_pair(pair: tuple[FlowState, FlowInput]) -> None:
    state, event = pair
    fsm = FlowStateMachine(state)
    entry = TRANSITIONS.get(pair)
    if entry is None:
        assert event not in FROM_LINK, f"{event.name} must be legal in every state"
        check_illegal(fsm, event)
    else:
        effect, nxt = entry
        assert fsm.process(event) is (effect is Effect.APPLY)
        assert fsm.state is nxt
    assert fsm.is_terminal is (fsm.state in TERMINAL)


@pytest.mark.parametrize("pair", list(itertools.product(FlowState, [*FROM_LINK, *ENDINGS])),
                         ids=pair_id)
def test_ending_is_always_legal(pair: tuple[FlowState, FlowInput]) -> None:
    """LIVENESS_EXPIRED and LINK_LOST can happen at any time, and so can a dealloc, a reset
    or a DOWN, from either side: none of them is ever an error."""
    assert pair in TRANSITIONS
    FlowStateMachine(pair[0]).process(pair[1])


def test_error_messages_say_what_was_refused() -> None:
    with pytest.raises(LocalProtocolError, match=r"^cannot write in state LOCAL_FIN$"):
        FlowStateMachine(S.LOCAL_FIN).process(I.LOCAL_DATA)
    with pytest.raises(RemoteProtocolError, match=r"^peer sent DATA in state REMOTE_FIN$"):
        FlowStateMachine(S.REMOTE_FIN).process(I.REMOTE_DATA)
    with pytest.raises(RemoteProtocolError, match=r"^peer sent OPEN_OK in state OPEN$"):
        FlowStateMachine(S.OPEN).process(I.REMOTE_ACCEPT)


@given(st.sampled_from(FlowState), st.lists(st.sampled_from(FlowInput), max_size=40))
def test_random_sequences_follow_the_table(start: FlowState, events: list[FlowInput]) -> None:
    fsm = FlowStateMachine(start)
    for event in events:
        entry = TRANSITIONS.get((fsm.state, event))
        if entry is None:
            check_illegal(fsm, event)
        else:
            assert fsm.process(event) is (entry[0] is Effect.APPLY)
            assert fsm.state is entry[1]


# ---------------------------------------------------------------------------- semantics


def test_starts_opening() -> None:
    fsm = FlowStateMachine()
    assert fsm.state is S.OPENING
    assert not fsm.is_terminal
    assert repr(fsm) == "FlowStateMachine(OPENING)"


@pytest.mark.parametrize("pair", list(itertools.product(TERMINAL, FlowInput)), ids=pair_id)
def test_terminal_states_absorb(pair: tuple[FlowState, FlowInput]) -> None:
    """No input leaves CLOSED, DOWN or RESET, and none is to be acted on there."""
    state, event = pair
    fsm = FlowStateMachine(state)
    try:
        applied = fsm.process(event)
    except ProtocolError:
        applied = False
    assert applied is False
    assert fsm.state is state
    assert fsm.is_terminal
    assert not fsm.can_send
    assert not fsm.can_receive


@pytest.mark.parametrize("pair", list(itertools.product(LIVE, ENDINGS)), ids=pair_id)
def test_every_live_state_can_end(pair: tuple[FlowState, FlowInput]) -> None:
    state, event = pair
    fsm = FlowStateMachine(state)
    assert fsm.process(event) is True
    assert fsm.state is ENDINGS[event]
    assert fsm.is_terminal


@pytest.mark.parametrize("accept", [I.LOCAL_ACCEPT, I.REMOTE_ACCEPT], ids=lambda e: e.name)
@pytest.mark.parametrize("first,second,middle", [
    (I.LOCAL_FIN, I.REMOTE_FIN, S.LOCAL_FIN),
    (I.REMOTE_FIN, I.LOCAL_FIN, S.REMOTE_FIN),
], ids=["local-first", "remote-first"])
def test_half_close_both_orders(accept: FlowInput, first: FlowInput, second: FlowInput,
                                middle: FlowState) -> None:
    fsm = FlowStateMachine()
    assert fsm.process(accept) is True
    assert state_of(fsm) is S.OPEN
    assert fsm.process(I.LOCAL_DATA) is True
    assert fsm.process(I.REMOTE_DATA) is True
    assert fsm.process(first) is True
    assert state_of(fsm) is middle
    assert not fsm.is_terminal
    # the direction still open carries data; the finished one does not
    still_open, finished = ((I.REMOTE_DATA, I.LOCAL_DATA) if middle is S.LOCAL_FIN
                            else (I.LOCAL_DATA, I.REMOTE_DATA))
    assert fsm.process(still_open) is True
    check_illegal(fsm, finished)
    assert fsm.process(second) is True
    assert state_of(fsm) is S.CLOSED
    assert fsm.is_terminal


def test_repeated_local_fin_is_harmless() -> None:
    fsm = FlowStateMachine(S.LOCAL_FIN)
    assert fsm.process(I.LOCAL_FIN) is False
    assert fsm.state is S.LOCAL_FIN


def test_repeated_remote_fin_is_the_peers_fault() -> None:
    check_illegal(FlowStateMachine(S.REMOTE_FIN), I.REMOTE_FIN)


@pytest.mark.parametrize("event", [I.LOCAL_ACCEPT, I.REMOTE_ACCEPT, I.LOCAL_REJECT,
                                   I.REMOTE_REJECT], ids=lambda e: e.name)
@pytest.mark.parametrize("state", [s for s in LIVE if s is not S.OPENING], ids=lambda s: s.name)
def test_accept_and_reject_only_while_opening(state: FlowState, event: FlowInput) -> None:
    check_illegal(FlowStateMachine(state), event)


@pytest.mark.parametrize("event", [I.LOCAL_REJECT, I.REMOTE_REJECT], ids=lambda e: e.name)
def test_refused_open_is_closed(event: FlowInput) -> None:
    fsm = FlowStateMachine()
    assert fsm.process(event) is True
    assert fsm.state is S.CLOSED


@pytest.mark.parametrize("state", list(FlowState), ids=lambda s: s.name)
def test_data_exactly_in_open_directions(state: FlowState) -> None:
    fsm = FlowStateMachine(state)
    assert fsm.can_send is (state in CAN_SEND)
    assert fsm.can_receive is (state in CAN_RECEIVE)
    # sending: legal (and applied, without changing the state) exactly while can_send
    sender = FlowStateMachine(state)
    if fsm.can_send:
        assert sender.process(I.LOCAL_DATA) is True
        assert sender.state is state
    else:
        check_illegal(sender, I.LOCAL_DATA)
    # receiving: applied exactly while can_receive; after the end it is a late frame
    receiver = FlowStateMachine(state)
    if fsm.can_receive:
        assert receiver.process(I.REMOTE_DATA) is True
        assert receiver.state is state
    elif state in TERMINAL:
        assert receiver.process(I.REMOTE_DATA) is False
    else:
        check_illegal(receiver, I.REMOTE_DATA)


def test_every_state_is_reachable_from_opening() -> None:
    seen = {S.OPENING}
    todo = deque(seen)
    while todo:
        state = todo.popleft()
        for event in FlowInput:
            fsm = FlowStateMachine(state)
            try:
                fsm.process(event)
            except ProtocolError:
                continue
            if fsm.state not in seen:
                seen.add(fsm.state)
                todo.append(fsm.state)
    assert seen == set(FlowState)


@given(st.lists(st.sampled_from(FlowInput), max_size=60))
def test_random_sequences_end_once(events: list[FlowInput]) -> None:
    """From OPENING, whatever happens, the flow is either still live or has ended in one
    terminal state, entered once (one `FlowEnded`) and never left."""
    fsm = FlowStateMachine()
    ended_in: FlowState | None = None
    endings = 0
    for event in events:
        before = fsm.state
        try:
            applied = fsm.process(event)
        except ProtocolError as exc:
            assert isinstance(exc, expected_error(event))
            assert fsm.state is before
            continue
        if ended_in is not None:
            assert fsm.state is ended_in
            assert applied is False
        elif fsm.state in TERMINAL:
            assert applied is True
            ended_in = fsm.state
            endings += 1
        else:
            assert fsm.state in LIVE
    if ended_in is None:
        assert fsm.state in LIVE and not fsm.is_terminal
        assert endings == 0
    else:
        assert fsm.state is ended_in and fsm.is_terminal
        assert endings == 1


# ---------------------------------------------------------------------------- the docs

DOCS = Path(__file__).resolve().parent.parent / "docs"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_state_diagram",
                                                  DOCS / "make_state_diagram.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagram_in_docs_is_current() -> None:
    """docs/flowstate.md holds exactly what the generator draws from the table today. If
    this fails, run `python docs/make_state_diagram.py --write`."""
    generator = load_generator()
    doc = (DOCS / "flowstate.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```mermaid\n(.*?)^```$", doc, flags=re.S | re.M)
    assert blocks == [generator.mermaid()]
    assert generator.table() in doc
    assert doc == generator.markdown()


def test_diagram_is_drawn_from_the_table() -> None:
    diagram = load_generator().mermaid()
    lines = diagram.splitlines()
    assert lines[0] == "stateDiagram-v2"
    assert "    [*] --> OPENING" in lines
    assert {f"    {s.name} --> [*]" for s in TERMINAL} <= set(lines)
    arrows = set()
    for line in lines[1:]:
        m = re.fullmatch(r" {4}(\w+) --> (\w+): (.*)", line)
        if m:
            for name in m[3].split(", "):
                arrows.add((S[m[1]], I[name], S[m[2]]))
    expected = {(s, i, nxt) for (s, i), (effect, nxt) in TRANSITIONS.items()
                if effect is Effect.APPLY and nxt is not s}
    assert arrows == expected
