"""The sans-IO Link: two engines in memory, time driven by hand, no sleeping."""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Sequence
from typing import cast

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from linkpair import Pair, ended
from tether import wire
from tether.errors import ErrorCode, LocalProtocolError
from tether.events import (
    AckReceived,
    DataReceived,
    Event,
    FinReceived,
    FlowAccepted,
    FlowEnded,
    FlowOpenRequested,
    GoAwayReceived,
    KeepAliveReceived,
    LinkTerminated,
    MessageReceived,
    StreamProtocolError,
    WindowUpdated,
)
from tether.flowstate import FlowState
from tether.link import Link, LinkConfig, LinkState, Role


def data_of(events: Sequence[Event], stream: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream == stream)


def terminated(events: Sequence[Event]) -> LinkTerminated:
    found = [e for e in events if isinstance(e, LinkTerminated)]
    assert len(found) == 1, events
    return found[0]


# --- handshake ---------------------------------------------------------------------------


def test_handshake_exchanges_names_and_negotiates_payload() -> None:
    p = Pair(LinkConfig(name="a", max_payload=8192), LinkConfig(name="b"))
    p.handshake()
    assert p.client.peer_name == "b" and p.server.peer_name == "a"
    assert p.client.max_payload == p.server.max_payload == 8192
    assert p.client.state is LinkState.OPEN and p.server.state is LinkState.OPEN


@pytest.mark.parametrize("frame", [wire.Data(1, b"x" * 8193),
                                   wire.Msg(kind=1, seq=1, body=b"x" * 8193)])
def test_the_decoder_enforces_the_negotiated_max_payload(frame: wire.Frame) -> None:
    # docs/protocol.md 4: after the HELLOs, each side's decoder enforces the smaller
    # max_payload, not its own larger one
    p = Pair(LinkConfig(name="a", max_payload=8192), LinkConfig(name="b"))
    p.handshake()
    p.open()
    p.server.receive_data(wire.encode(frame), p.now)
    end = terminated(p.take("server"))
    assert end.code == ErrorCode.FRAME_TOO_LARGE and "exceeds the maximum 8" in end.reason


def test_bad_token_is_refused_with_a_reason_on_both_sides() -> None:
    p = Pair(LinkConfig(name="a", token=b"wrong"),
             LinkConfig(name="b", expected_token=b"secret"))
    p.transfer()
    client_end = terminated(p.take("client"))
    server_end = terminated(p.take("server"))
    assert client_end.code == server_end.code == ErrorCode.BAD_TOKEN
    assert "bad token" in client_end.reason and client_end.initiator == "peer"
    assert p.server.stats.protocol_errors == 1


def test_good_token_is_accepted() -> None:
    p = Pair(LinkConfig(name="a", token=b"secret"),
             LinkConfig(name="b", expected_token=b"secret"))
    p.handshake()


def test_version_mismatch_ends_the_link_with_version_code() -> None:
    server = Link(Role.SERVER, LinkConfig(name="b"), 0.0)
    hello = bytearray(wire.encode(wire.Hello(name="future")))
    struct.pack_into("!H", hello, wire.HEADER.size + 4, 99)
    server.receive_data(bytes(hello), 0.0)
    end = terminated(server.next_events())
    assert end.code == ErrorCode.VERSION_MISMATCH and "version 99" in end.reason
    reply = wire.FrameDecoder().feed(server.data_to_send())
    assert isinstance(reply[-1], wire.GoAway) and reply[-1].code == ErrorCode.VERSION_MISMATCH


def test_frame_before_hello_is_a_protocol_error() -> None:
    server = Link(Role.SERVER, LinkConfig(name="b"), 0.0)
    server.receive_data(wire.encode(wire.Ping(opaque=1)), 0.0)
    end = terminated(server.next_events())
    assert "expected HELLO, got PING" in end.reason


def test_garbage_ends_the_link_with_goaway() -> None:
    server = Link(Role.SERVER, LinkConfig(name="b"), 0.0)
    server.receive_data(b"GET / HTTP/1.1\r\n\r\n", 0.0)
    end = terminated(server.next_events())
    assert end.code == ErrorCode.PROTOCOL_ERROR and "unknown frame type" in end.reason
    assert server.is_closed and server.next_deadline() is None
    assert isinstance(wire.FrameDecoder().feed(server.data_to_send())[-1], wire.GoAway)


def test_handshake_timeout() -> None:
    server = Link(Role.SERVER, LinkConfig(name="b", handshake_timeout=2.0), 0.0)
    assert server.next_deadline() == 2.0
    server.handle_timer(1.999)
    assert server.next_events() == []
    server.handle_timer(2.0)
    assert "handshake not completed within 2s" in terminated(server.next_events()).reason


# --- flows -------------------------------------------------------------------------------


def test_open_accept_data_both_ways_and_half_close() -> None:
    p = Pair()
    p.handshake()
    sid = p.client.open_flow("echo", p.now, liveness=1.0)
    assert sid % 2 == 1
    p.transfer()
    (req,) = p.take("server")
    assert isinstance(req, FlowOpenRequested)
    assert (req.service, req.liveness, req.origin) == ("echo", 1.0, "client")
    p.server.accept_flow(sid, p.now)
    p.transfer()
    assert any(isinstance(e, FlowAccepted) for e in p.take("client"))
    assert p.client.send_data(sid, b"hello", p.now) == 5
    p.client.send_fin(sid, p.now)
    p.transfer()
    ev = p.take("server")
    assert data_of(ev, sid) == b"hello" and isinstance(ev[-1], FinReceived)
    assert p.server.flow_state(sid) is FlowState.REMOTE_FIN
    # the half-closed side still reads the reply
    p.server.send_data(sid, b"world", p.now)
    p.server.send_fin(sid, p.now)
    p.transfer()
    ev_c = p.take("client")
    assert data_of(ev_c, sid) == b"world"
    assert ended(ev_c)[sid].state is FlowState.CLOSED
    assert ended(p.take("server"))[sid].state is FlowState.CLOSED
    assert len(p.client) == len(p.server) == 0


def test_server_opens_even_ids_and_both_sides_open_without_collision() -> None:
    p = Pair()
    p.handshake()
    a = p.client.open_flow("x", p.now)
    b = p.server.open_flow("y", p.now)
    assert a % 2 == 1 and b % 2 == 0
    p.transfer()
    assert {type(e) for e in p.take("client")} == {FlowOpenRequested}


def test_dealloc_delivers_data_then_end_and_late_frames_are_ignored() -> None:
    p = Pair()
    p.handshake()
    sid, _ = p.open()
    p.server.send_data(sid, b"last words", p.now)
    p.server.dealloc(sid, p.now)
    p.client.send_data(sid, b"in flight", p.now)  # crosses the CLOSE on the wire
    p.transfer()
    ev = p.take("client")
    assert data_of(ev, sid) == b"last words"
    end = ended(ev)[sid]
    assert (end.state, end.reason, end.initiator) == (FlowState.CLOSED, "peer", "peer")
    assert ended(p.take("server"))[sid].initiator == "local"
    assert p.server.stats.late_frames == 1
    with pytest.raises(LocalProtocolError):
        p.client.send_data(sid, b"after", p.now)


def test_reset_reaches_the_peer_with_code_and_reason() -> None:
    p = Pair()
    p.handshake()
    sid, _ = p.open()
    p.client.reset(sid, ErrorCode.RESET, "user gave up", p.now)
    mine = ended(p.take("client"))[sid]  # (this side's event says why too, for its log)
    assert (mine.state, mine.reason, mine.initiator) == (
        FlowState.RESET, "reset: user gave up", "local")
    p.transfer()
    end = ended(p.take("server"))[sid]
    assert (end.state, end.code) == (FlowState.RESET, ErrorCode.RESET)
    assert "user gave up" in end.reason


def test_reset_with_down_code_takes_the_peer_down() -> None:
    p = Pair()
    p.handshake()
    sid, _ = p.open()
    p.client.reset(sid, ErrorCode.FLOW_PEER, "unresponsive peer", p.now)
    p.transfer()
    end = ended(p.take("server"))[sid]
    assert (end.state, end.code) == (FlowState.DOWN, ErrorCode.FLOW_PEER)


def test_reject_ends_the_opener_with_code() -> None:
    p = Pair()
    p.handshake()
    sid = p.client.open_flow("nope", p.now)
    p.transfer()
    p.server.reject_flow(sid, ErrorCode.NO_SUCH_SERVICE, "no such service: 'nope'", p.now)
    p.transfer()
    end = ended(p.take("client"))[sid]
    assert end.code == ErrorCode.NO_SUCH_SERVICE and "no such service" in end.reason


def test_frame_for_never_opened_stream_resets_only_that_stream() -> None:
    p = Pair()
    p.handshake()
    sid, _ = p.open()
    p.server.receive_data(wire.encode(wire.Data(101, b"x")), p.now)
    p.transfer()
    assert p.server.stats.protocol_errors == 1
    assert p.server.flow_state(sid) is FlowState.OPEN and p.server.state is LinkState.OPEN


def test_a_bogus_data_frame_arriving_in_pieces_is_answered_and_counted_once() -> None:
    # the link's decoder passes a DATA payload on as it arrives (cut-through): the
    # pieces of one frame for a stream never opened are one protocol error, one RESET
    p = Pair()
    p.handshake()
    raw = wire.encode(wire.Data(101, b"x" * 5000))
    for i in range(0, len(raw), 500):
        p.server.receive_data(raw[i:i + 500], p.now)
    assert p.server.stats.protocol_errors == 1
    assert len([e for e in p.take("server") if isinstance(e, StreamProtocolError)]) == 1
    p.transfer()
    assert p.client.stats.protocol_errors == 1  # the one RESET, for a stream it never had


def test_open_with_wrong_parity_ends_link() -> None:
    p = Pair()
    p.handshake()
    p.client.receive_data(wire.encode(wire.Open(stream=3, service="x")), p.now)
    assert "parity" in terminated(p.take("client")).reason


def test_an_open_with_a_window_too_large_is_refused_not_the_link() -> None:
    """A window above 2^31-1 in OPEN is a bad stream, as it is in OPEN_OK: that stream
    is refused (OPEN_ERR, PROTOCOL_ERROR) and counted; the link and its other flows go
    on. It ended the whole link."""
    p, (a,) = _wide_open(1)
    p.server.receive_data(wire.encode(wire.Open(stream=3, service="x", window=1 << 31)),
                          p.now)
    events = p.take("server")
    assert [e.reason for e in events if isinstance(e, StreamProtocolError)] == [
        "OPEN window 2147483648 too large"]
    assert not p.server.is_closed and p.server.stats.protocol_errors == 1
    answer = wire.FrameDecoder(1 << 20, 1 << 20).feed(p.server.data_to_send())
    assert [(type(f), f.stream, f.code) for f in answer if isinstance(f, wire.OpenErr)] == [
        (wire.OpenErr, 3, ErrorCode.PROTOCOL_ERROR)]
    p.client.send_data(a, b"still", p.now)
    p.server.receive_data(p.client.data_to_send(), p.now)
    assert data_of(p.take("server"), a) == b"still"


@pytest.mark.parametrize("answer", [wire.OpenOk(stream=1, window=10),
                                    wire.OpenErr(stream=1, code=ErrorCode.REFUSED)])
def test_an_answer_to_the_peers_own_open_ends_the_link(answer: wire.Frame) -> None:
    # docs/protocol.md 6.2: OPEN_OK or OPEN_ERR for a stream the peer itself opened is a
    # protocol error (6.7): GOAWAY, every flow DOWN; not a reset of that one stream
    p = Pair()
    p.handshake()
    sid = p.client.open_flow("svc", p.now)
    p.transfer()
    p.server.receive_data(wire.encode(answer), p.now)  # the client answers its own
    p.transfer()
    end = terminated(p.take("server"))
    assert end.code == ErrorCode.PROTOCOL_ERROR and "that the peer opened" in end.reason
    assert ended(p.take("client"))[sid].state is FlowState.DOWN


# --- flow control --------------------------------------------------------------------------


def test_credit_limits_the_writer_and_consumption_restores_it() -> None:
    cfg = LinkConfig(name="s", initial_window=4096, max_window=4096)  # no auto-tuning
    p = Pair(server=cfg)
    p.handshake()
    sid, _ = p.open()
    assert p.client.send_credit(sid) == 4096
    assert p.client.send_data(sid, b"x" * 10_000, p.now) == 4096
    assert p.client.send_data(sid, b"x", p.now) == 0
    p.transfer()
    assert len(data_of(p.take("server"), sid)) == 4096
    p.server.consumed(sid, 1000, p.now)  # below half a window: batched, no WINDOW yet
    p.transfer()
    assert p.client.send_credit(sid) == 0
    p.server.consumed(sid, 1048, p.now)
    p.transfer()
    assert any(isinstance(e, WindowUpdated) for e in p.take("client"))
    assert p.client.send_credit(sid) == 2048


def test_data_beyond_credit_resets_the_stream_not_the_link() -> None:
    p = Pair(server=LinkConfig(name="s", initial_window=1024))
    p.handshake()
    sid, _ = p.open()
    other, _ = p.open()
    p.server.receive_data(wire.encode(wire.Data(sid, b"x" * 2000)), p.now)
    p.transfer()
    end = ended(p.take("server"))[sid]
    assert end.code == ErrorCode.FLOW_CONTROL and end.reason.startswith("error:")
    assert ended(p.take("client"))[sid].state is FlowState.RESET
    assert p.server.flow_state(other) is FlowState.OPEN


def test_slow_reader_on_one_stream_does_not_block_another() -> None:
    p = Pair(server=LinkConfig(name="s", initial_window=8192))
    p.handshake()
    slow, _ = p.open()
    fast, _ = p.open()
    p.client.send_data(slow, b"s" * 8192, p.now)
    assert p.client.send_credit(slow) == 0
    received = 0
    for _ in range(50):
        n = p.client.send_data(fast, b"f" * 8192, p.now)
        p.transfer()
        got = len(data_of(p.take("server"), fast))
        p.server.consumed(fast, got, p.now)
        p.transfer()
        received += got
        assert n > 0
    assert received == 50 * 8192
    assert p.client.send_credit(slow) == 0


# --- liveness --------------------------------------------------------------------------------


def test_keepalive_after_a_quarter_of_the_timeout_keeps_a_flow_alive() -> None:
    p = Pair()
    p.handshake()
    sid, _ = p.open(liveness=1.0)
    p.advance(10.0)  # ten timeouts with no application traffic at all
    assert p.client.flow_state(sid) is FlowState.OPEN
    assert p.server.flow_state(sid) is FlowState.OPEN
    assert 30 <= p.client.stats.keepalives_sent <= 45


def test_silent_peer_takes_flow_down_after_its_timeout_not_before() -> None:
    p = Pair(LinkConfig(name="c", heartbeat_interval=50, link_timeout=100))
    p.handshake()
    sid, _ = p.open(liveness=1.0)
    last_heard = p.now
    p.cut = True  # the peer goes silent: nothing crosses any more
    p.advance(last_heard + 0.999)
    assert p.client.flow_state(sid) is FlowState.OPEN
    p.advance(last_heard + 1.0 + p.client.config.tick)
    end = ended(p.take("client"))[sid]
    assert (end.state, end.code) == (FlowState.DOWN, ErrorCode.FLOW_PEER)
    assert end.reason == "down: unresponsive peer"


def test_changing_the_liveness_does_not_restart_the_silence_clock() -> None:
    """An application that keeps adjusting the timeout of a flow whose peer is gone
    still sees it go DOWN: the silence so far counts against the new timeout."""
    p = Pair(LinkConfig(name="c", heartbeat_interval=50, link_timeout=100))
    p.handshake()
    sid, _ = p.open(liveness=1.0)
    last_heard = p.now
    p.cut = True
    for step in range(1, 4):  # 0.4, 0.8, 1.2 s into the silence
        p.advance(last_heard + 0.4 * step)
        if p.client.flow_state(sid) is not FlowState.OPEN:
            break
        p.client.set_liveness(sid, 1.0, p.now)
    end = ended(p.take("client"))[sid]
    assert end.state is FlowState.DOWN
    p2 = Pair(LinkConfig(name="c", heartbeat_interval=50, link_timeout=100))
    p2.handshake()
    sid2, _ = p2.open(liveness=10.0)
    last_heard = p2.now
    p2.cut = True
    p2.advance(last_heard + 2.0)
    p2.client.set_liveness(sid2, 1.0, p2.now)  # already silent for longer than that
    p2.advance(p2.now + 2 * p2.client.config.tick)
    assert ended(p2.take("client"))[sid2].reason == "down: unresponsive peer"


def test_an_open_the_peer_never_answers_goes_down_within_the_liveness() -> None:
    """The acceptor is alive (its link heartbeats) but never accepts: it sends no
    keepalive for the unanswered stream, so the opener's wait ends at its liveness, with
    a reason that says what did not happen; the acceptor hears why from the RESET."""
    p = Pair()
    p.handshake()
    sid = p.client.open_flow("svc", p.now, liveness=1.0)
    p.transfer()
    p.take("server")  # FlowOpenRequested, never answered
    opened_at = p.now
    p.advance(opened_at + 0.999)
    assert p.client.flow_state(sid) is FlowState.OPENING
    assert p.server.stats.keepalives_sent == 0
    p.advance(opened_at + 1.0 + p.client.config.tick)
    end = ended(p.take("client"))[sid]
    assert (end.state, end.code) == (FlowState.DOWN, ErrorCode.FLOW_PEER)
    assert end.reason == "down: open not answered within 1s"
    peer_end = ended(p.take("server"))[sid]
    assert peer_end.reason.endswith("open not answered within 1s"), peer_end.reason
    assert p.client.is_open and p.server.is_open  # only that flow ended


def test_an_accepted_stream_is_kept_alive_by_its_acceptor() -> None:
    """Keepalives start with the answer: after accept_flow, the acceptor keeps an idle
    flow alive like the opener does."""
    p = Pair()
    p.handshake()
    sid, _ = p.open(liveness=1.0)
    p.advance(p.now + 5.0)
    assert p.server.flow_state(sid) is FlowState.OPEN
    assert p.server.stats.keepalives_sent >= 15


def test_application_not_reading_is_not_a_dead_peer() -> None:
    p = Pair(server=LinkConfig(name="s", initial_window=1024))
    p.handshake()
    sid, _ = p.open(liveness=0.2)
    p.client.send_data(sid, b"x" * 1024, p.now)  # server app never consumes: credit is 0
    p.advance(5.0)
    assert p.client.flow_state(sid) is FlowState.OPEN
    assert p.server.flow_state(sid) is FlowState.OPEN


def test_dead_link_takes_every_flow_down_at_once() -> None:
    p = Pair(LinkConfig(name="c", heartbeat_interval=1.0, link_timeout=3.0),
             LinkConfig(name="s", heartbeat_interval=1.0, link_timeout=3.0))
    p.handshake()
    ids = [p.open()[0] for _ in range(5)]
    p.advance(20.0)
    assert p.client.state is LinkState.OPEN  # heartbeats keep an idle link up
    p.cut = True
    p.advance(20.0 + 3.0 + 0.02)
    ev = p.take("client")
    ends = ended(ev)
    assert set(ends) == set(ids)
    assert all(e.state is FlowState.DOWN and e.reason == "down: link lost" for e in ends.values())
    assert "link lost" in terminated(ev).reason


def test_connection_lost_ends_every_flow_exactly_once() -> None:
    p = Pair()
    p.handshake()
    ids = [p.open()[0] for _ in range(3)]
    p.client.connection_lost("connection reset", p.now)
    p.client.connection_lost("again", p.now)
    ev = p.take("client")
    assert set(ended(ev)) == set(ids)
    terminated(ev)


def test_relay_streams_surface_keepalives_and_track_no_liveness() -> None:
    p = Pair(server=LinkConfig(name="gw", relay_streams=True))
    p.handshake()
    p.open(liveness=0.1)
    p.advance(1.0)
    kinds = [e for e in p.take("server") if isinstance(e, KeepAliveReceived)]
    assert len(kinds) >= 3
    assert p.server.stats.keepalives_sent == 0


# --- link frames -------------------------------------------------------------------------------


def test_messages_and_acks_pass_through() -> None:
    p = Pair()
    p.handshake()
    p.client.send_message(7, 1, b"m1", p.now)
    p.server.send_ack(1, p.now)
    p.transfer()
    (m,) = p.take("server")
    assert isinstance(m, MessageReceived) and (m.kind, m.seq, m.body) == (7, 1, b"m1")
    assert any(isinstance(e, AckReceived) and e.seq == 1 for e in p.take("client"))


def test_goaway_drains_then_terminates() -> None:
    p = Pair()
    p.handshake()
    sid, _ = p.open()
    p.server.goaway(p.now)
    p.transfer()
    assert any(isinstance(e, GoAwayReceived) for e in p.take("client"))
    with pytest.raises(LocalProtocolError):
        p.client.open_flow("more", p.now)
    p.client.send_data(sid, b"still flows", p.now)
    p.transfer()
    assert data_of(p.take("server"), sid) == b"still flows"
    p.client.dealloc(sid, p.now)
    p.transfer()
    assert terminated(p.take("server")).reason == "drained"


@pytest.mark.parametrize("how", ["dealloc", "reset", "fin", "reject", "liveness"])
def test_goaway_terminates_when_the_last_flow_ends_on_the_draining_side(how: str) -> None:
    # the last flow of a draining link may end by this side's own call or its timer,
    # not only by a frame from the peer: the link is drained then too, not at the deadline
    p = Pair()
    p.handshake()
    if how == "reject":
        sid = p.client.open_flow("svc", p.now)
        p.transfer()
    else:
        sid, _ = p.open(liveness=1.0 if how == "liveness" else None)
    p.server.goaway(p.now)
    p.transfer()
    p.take("server")
    if how == "dealloc":
        p.server.dealloc(sid, p.now)
    elif how == "reset":
        p.server.reset(sid, ErrorCode.RESET, "abort", p.now)
    elif how == "fin":
        p.client.send_fin(sid, p.now)
        p.transfer()
        p.server.send_fin(sid, p.now)
    elif how == "reject":
        p.server.reject_flow(sid, ErrorCode.REFUSED, "no", p.now)
    else:
        p.cut = True  # the client falls silent; its flow goes DOWN well before the link
        p.advance(1.5)
    events = p.take("server")
    assert sid in ended(events)
    assert terminated(events).reason == "drained"
    assert p.server.is_closed and p.server.next_deadline() is None


def test_close_resets_every_flow_and_tells_the_peer() -> None:
    p = Pair()
    p.handshake()
    ids = [p.open()[0] for _ in range(3)]
    p.server.close(ErrorCode.SHUTDOWN, "shutdown", p.now)
    p.transfer()
    ends = ended(p.take("client"))
    assert set(ends) == set(ids)
    assert all(e.state is FlowState.DOWN and e.code == ErrorCode.FLOW_DOWN
               and e.reason == "down: shutdown" for e in ends.values())
    assert all(e.reason == "down: shutdown" for e in ended(p.take("server")).values())


# --- garbage from the peer, at the link level --------------------------------------------

_SID = st.sampled_from([1, 2, 3, 4, 5, 7, 0xFFFFFFFF])
_WIN = st.sampled_from([0, 1, 4096, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
_CODE = st.sampled_from([0, 4, 5, 6, 13, 999, 0xFFFF])
PEER_FRAMES: st.SearchStrategy[wire.Frame] = st.one_of(
    st.builds(wire.Data, _SID, st.binary(max_size=3000)),
    st.builds(wire.Fin, stream=_SID), st.builds(wire.Close, stream=_SID),
    st.builds(wire.KeepAlive, stream=_SID),
    st.builds(wire.Reset, stream=_SID, code=_CODE, reason=st.just("r")),
    st.builds(wire.Window, stream=_SID, increment=_WIN.map(lambda w: max(w, 1))),
    st.builds(wire.OpenOk, stream=_SID, window=_WIN),
    st.builds(wire.OpenErr, stream=_SID, code=_CODE, reason=st.just("e")),
    st.builds(wire.Open, stream=_SID, service=st.just("s"), window=_WIN,
              liveness_ms=st.sampled_from([0, 1, 10, 1000, 2**64 - 1]), mode=st.integers(0, 255)),
    st.builds(wire.Ping, opaque=st.just(1)), st.builds(wire.Pong, opaque=st.just(1)),
    st.builds(wire.Msg, kind=st.just(1), seq=st.just(1), body=st.binary(max_size=100)),
    st.builds(wire.Ack, seq=st.just(1)),
    st.builds(wire.GoAway, last_stream=st.integers(0, 8), code=_CODE, reason=st.just("g")),
    st.builds(wire.Hello, name=st.just("again")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(PEER_FRAMES, min_size=1, max_size=10),
       st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
       st.lists(st.integers(1, 5000), min_size=1, max_size=6),
       st.sampled_from(["client", "server"]))
def test_any_bytes_from_the_peer_end_a_stream_or_the_link_never_raise(
        frames: list[wire.Frame], flips: list[tuple[int, int]], cuts: list[int],
        target: str) -> None:
    """Frames a peer may send in any state, some corrupted, fed in any chunks to a link
    with live flows: `receive_data` never raises, every stream ends at most once (and
    exactly once when the link is gone), and the link survives or ends with a code."""
    p = Pair(LinkConfig(name="c", initial_window=4096), LinkConfig(name="s", initial_window=4096))
    p.handshake()
    p.open(liveness=0.5)
    p.open()
    p.client.open_flow("svc", p.now)  # one left unanswered
    p.transfer()
    link = p.side(target)
    known = set(link.streams())
    data = bytearray(b"".join(wire.encode(f) for f in frames))
    for pos, value in flips:
        data[pos % len(data)] = value
    pos = i = 0
    while pos < len(data):
        n = cuts[i % len(cuts)]
        link.receive_data(bytes(data[pos:pos + n]), p.now)
        pos, i = pos + n, i + 1
        p.transfer()
    p.advance(p.now + 2.0)
    link.connection_lost("test over", p.now)
    events = p.take(target)
    known |= {e.stream for e in events if isinstance(e, FlowOpenRequested)}
    assert set(ended(events)) == known and not link.streams()
    end = terminated(events)
    assert end.code == int(end.code) and end.reason


# --- many flows, any chunking ------------------------------------------------------------------


def random_chunker(seed: int) -> object:
    rng = random.Random(seed)

    def chunk(data: bytes) -> list[bytes]:
        out, i = [], 0
        while i < len(data):
            n = rng.choice((1, 2, 7, 10, 64, 1000, 70_000))
            out.append(data[i:i + n])
            i += n
        return out
    return chunk


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_many_flows_through_arbitrary_chunking(seed: int) -> None:
    exchange_many(seed, n_flows=60, sizes=(0, 1, 100, 5000, 40_000))


def test_thousands_of_flows_and_megabytes_in_one_link() -> None:
    exchange_many(1, n_flows=2000, sizes=(0, 1, 100, 3000))


def exchange_many(seed: int, n_flows: int, sizes: tuple[int, ...]) -> None:
    """Every flow sends a random payload and FIN; the server closes its half on EOF.
    Every byte must arrive in order, every flow end exactly once, CLOSED."""
    rng = random.Random(seed)
    p = Pair(server=LinkConfig(name="s", initial_window=16_384),
             chunker=random_chunker(seed))  # type: ignore[arg-type]
    p.handshake()
    payload = {}
    for _ in range(n_flows):
        sid = p.client.open_flow("bulk", p.now)
        payload[sid] = rng.randbytes(rng.choice(sizes))
    p.transfer()
    for e in p.take("server"):
        assert isinstance(e, FlowOpenRequested)
        p.server.accept_flow(e.stream, p.now)
    p.transfer()
    p.take("client")
    offset = dict.fromkeys(payload, 0)
    got: dict[int, bytearray] = {sid: bytearray() for sid in payload}
    finished: dict[int, FlowEnded] = {}
    sending = set(payload)
    for _ in range(1000):
        for sid in list(sending):
            data = payload[sid]
            offset[sid] += p.client.send_data(sid, data[offset[sid]:], p.now)
            if offset[sid] == len(data):
                p.client.send_fin(sid, p.now)
                sending.discard(sid)
        p.transfer()
        for e in p.take("server"):
            if isinstance(e, DataReceived):
                got[e.stream] += e.data
                p.server.consumed(e.stream, len(e.data), p.now)
            elif isinstance(e, FinReceived):
                p.server.send_fin(e.stream, p.now)  # reply half: close our direction too
            elif isinstance(e, FlowEnded):
                assert e.stream not in finished
                finished[e.stream] = e
        p.transfer()
        if len(finished) == n_flows:
            break
    assert {sid: bytes(b) for sid, b in got.items()} == payload
    assert all(e.state is FlowState.CLOSED for e in finished.values())
    assert len(p.client) == len(p.server) == 0


# --- receive-window auto-tuning -----------------------------------------------------------


def _bulk_round(p: Pair, sid: int, n: int = 1 << 30) -> int:
    """The client sends all the credit it has; the server's application takes it all.
    Returns the credit the client has afterwards (the window the server now grants)."""
    sent = p.client.send_data(sid, b"x" * p.client.send_credit(sid), p.now)
    p.transfer()
    got = len(data_of(p.take("server"), sid))
    assert got == sent
    p.server.consumed(sid, got, p.now)
    p.transfer()
    p.take("client")
    return p.client.send_credit(sid)


def test_a_sender_that_runs_out_of_credit_gets_a_doubled_window_up_to_max_window() -> None:
    p = Pair(server=LinkConfig(name="s", initial_window=4096, max_window=32768))
    p.handshake()
    sid, _ = p.open()
    credits = [_bulk_round(p, sid) for _ in range(6)]
    assert credits == [8192, 16384, 32768, 32768, 32768, 32768]
    assert p.server.stats.windows_grown == 3


def test_a_sender_that_never_runs_short_keeps_the_initial_window() -> None:
    p = Pair(server=LinkConfig(name="s", initial_window=4096, max_window=32768))
    p.handshake()
    sid, _ = p.open()
    for _ in range(20):  # interactive: a little at a time, consumed at once
        p.client.send_data(sid, b"y" * 1000, p.now)
        p.transfer()
        p.server.consumed(sid, len(data_of(p.take("server"), sid)), p.now)
        p.transfer()
        p.take("client")
    assert p.client.send_credit(sid) <= 4096
    assert p.server.stats.windows_grown == 0


def test_window_growth_stays_within_the_link_budget_and_is_returned_when_flows_end() -> None:
    p = Pair(server=LinkConfig(name="s", initial_window=4096, max_window=65536,
                               window_budget=16384))
    p.handshake()
    a, _ = p.open()
    b, _ = p.open()
    for _ in range(4):
        _bulk_round(p, a)
    assert p.client.send_credit(a) == 4096 + 16384  # the whole budget went to `a`
    assert _bulk_round(p, b) == 4096  # none left for `b`
    p.client.reset(a, ErrorCode.RESET, "done", p.now)
    p.transfer()
    p.take("server")
    assert _bulk_round(p, b) == 8192  # `a` ended: its growth is back in the budget


def test_max_window_below_initial_window_is_refused() -> None:
    with pytest.raises(ValueError, match="max_window"):
        LinkConfig(name="x", initial_window=8192, max_window=4096)


# --- urgent control frames ahead of queued data (take_output) -------------------------------


def _frames(pieces: list[bytes | memoryview]) -> list[wire.Frame]:
    return wire.FrameDecoder(max_payload=1 << 20).feed(b"".join(bytes(p) for p in pieces))


def test_take_output_lets_control_frames_overtake_queued_data_and_cuts_data_to_fit() -> None:
    p = Pair(LinkConfig(name="c", initial_window=1 << 20),
             LinkConfig(name="s", initial_window=1 << 20))
    p.handshake()
    bulk, _ = p.open()
    idle, _ = p.open()
    p.client.send_data(bulk, b"a" * 100_000, p.now)  # a whole window of another flow
    p.client.send_fin(bulk, p.now)
    p.client.send_keepalive(idle, p.now)  # (a relay's forwarded keepalive)
    p.client.reset(idle, ErrorCode.RESET, "bye", p.now)
    first = _frames(p.client.take_output(20_000))
    assert [type(f) for f in first[:2]] == [wire.KeepAlive, wire.Reset]  # ahead of the data
    assert all(isinstance(f, wire.Data) and f.stream == bulk for f in first[2:])
    sent = sum(len(cast(wire.Data, f).data) for f in first[2:])  # all Data, asserted above
    assert 16_000 <= sent <= 20_000  # the limit, give or take a header
    assert _frames(p.client.take_output(0)) == []  # nothing urgent left, nothing else taken
    rest = _frames(p.client.take_output(1 << 30))
    assert isinstance(rest[-1], wire.Fin) and rest[-1].stream == bulk  # FIN stays last
    assert sent + sum(len(cast(wire.Data, f).data) for f in rest[:-1]) == 100_000


def test_take_output_keeps_a_message_body_with_its_header() -> None:
    p = Pair()
    p.handshake()
    for seq in range(1, 4):
        p.client.send_message(0x10, seq, bytes([seq]) * 5000, p.now)
    got: list[wire.Frame] = []
    while p.client.has_output:
        got += _frames(p.client.take_output(1))  # one frame per call at least
    msgs = cast(list[wire.Msg], got)  # only MSG frames were sent
    assert [(f.seq, bytes(f.body)) for f in msgs] == \
        [(s, bytes([s]) * 5000) for s in range(1, 4)]


def test_window_updates_are_not_signs_of_life_end_to_end() -> None:
    """A relay answers credit itself, so WINDOW tells nothing of the far end: a receiver
    that only gives credit back still sends keepalives, and a flow that only gets
    credit still goes DOWN."""
    p = Pair(LinkConfig(name="c", initial_window=4096),
             LinkConfig(name="s", initial_window=4096))
    p.handshake()
    sid, _ = p.open(liveness=1.0)
    for _ in range(9):  # 0.9 s: the client sends a window's worth every 0.1 s
        p.now += 0.1
        p.client.send_data(sid, b"z" * p.client.send_credit(sid), p.now)
        p.transfer()
        p.server.consumed(sid, len(data_of(p.take("server"), sid)), p.now)  # WINDOWs only
        p.server.handle_timer(p.now)
        p.client.handle_timer(p.now)
    assert p.server.stats.keepalives_sent >= 2  # WINDOWs did not stand in for them
    p.client.reset(sid, ErrorCode.RESET, "x", p.now)  # (ends the test's flow)


def _wide_open(flows: int) -> tuple[Pair, list[int]]:
    """A pair whose flows have 8 x QUEUE_LIMIT of credit: the queue, not the credit, is
    what holds a sender back. Returns the pair and the client's stream ids."""
    from tether.link import QUEUE_LIMIT
    big = 8 * QUEUE_LIMIT
    p = Pair(LinkConfig(name="c", initial_window=big, max_window=big),
             LinkConfig(name="s", initial_window=big, max_window=big))
    p.handshake()
    sids = [p.open()[0] for _ in range(flows)]
    p.take("client")
    return p, sids


def test_a_full_link_queue_holds_senders_back_and_wakes_them_when_half_drained() -> None:
    """Credit says how much the far end can take; the link's queue says how much this
    side can send now. DATA beyond QUEUE_LIMIT waits with its sender (no credit used),
    which is woken by a WindowUpdated once `take_output` drained the queue to half --
    a sender cut short as well as one refused outright."""
    from tether.link import QUEUE_LIMIT
    big = 8 * QUEUE_LIMIT
    p, (a, b, c) = _wide_open(3)
    assert p.client.send_data(c, b"c" * 1000, p.now) == 1000  # room enough: all of it
    assert p.client.send_credit(a) == QUEUE_LIMIT - p.client.queued
    sent = p.client.send_data(a, b"a" * big, p.now)
    assert sent == QUEUE_LIMIT - (1000 + wire.HEADER.size)  # what fits, not its credit
    assert p.client.queued <= QUEUE_LIMIT + wire.HEADER.size  # (its frame's header)
    assert p.client.send_credit(b) == 0 and p.client.send_data(b, b"b" * 10, p.now) == 0
    p.client.take_output(QUEUE_LIMIT // 4)  # not yet half empty: nobody woken
    assert not [e for e in p.take("client") if isinstance(e, WindowUpdated)]
    while p.client.queued > QUEUE_LIMIT // 2:
        p.client.take_output(QUEUE_LIMIT // 4)
    woken = [e for e in p.take("client") if isinstance(e, WindowUpdated)]
    assert sorted(e.stream for e in woken) == [a, b]  # cut short, refused; c got it all
    assert p.client.send_data(b, b"b" * 10, p.now) == 10


def test_a_nearly_full_queue_still_takes_a_frame_worth_sending() -> None:
    """With a few bytes of room left, a sender still gets `_MIN_SPLIT` bytes through
    (no dribble of tiny frames); the queue's overshoot is bounded by that, never by the
    sender's credit."""
    from tether.link import QUEUE_LIMIT
    from tether.sendqueue import MIN_SPLIT as _MIN_SPLIT
    big = 8 * QUEUE_LIMIT
    p, (a, b) = _wide_open(2)
    p.client.send_data(a, b"a" * (QUEUE_LIMIT - 100), p.now)
    assert 0 < QUEUE_LIMIT - p.client.queued < _MIN_SPLIT
    assert p.client.send_data(b, b"b" * big, p.now) == _MIN_SPLIT
    assert p.client.queued <= QUEUE_LIMIT + _MIN_SPLIT + wire.HEADER.size


def test_a_stream_held_back_by_a_full_queue_leaves_nothing_behind_when_it_ends() -> None:
    """While a link's queue stays full (a peer that answers PINGs but reads nothing),
    streams that tried to send and then ended must not stay on the wake-up list: one
    entry per ended stream, for as long as the stall lasts, is a leak."""
    from tether.link import QUEUE_LIMIT
    p, (a,) = _wide_open(1)
    p.client.send_data(a, b"a" * (2 * QUEUE_LIMIT), p.now)  # the queue is full from now on
    for _ in range(200):
        sid = p.client.open_flow("svc", p.now)
        p.server.receive_data(b"".join(p.client.take_output(0)), p.now)  # urgent only
        p.server.accept_flow(sid, p.now)
        p.client.receive_data(p.server.data_to_send(), p.now)
        assert p.client.send_data(sid, b"x" * 10, p.now) == 0  # held back by the queue
        p.client.dealloc(sid, p.now)
    assert p.client._starved <= set(p.client.streams())


@pytest.mark.parametrize("end", ["local reset", "peer reset"])
def test_a_reset_streams_queued_data_leaves_the_queue_and_wakes_the_others(end: str) -> None:
    """What a reset stream (or a down one) still had queued would be discarded by the peer
    (its RESET overtakes it): it leaves the link's queue at once instead of taking the
    link's bandwidth and holding back the streams waiting for room. A stream's data
    queued before a clean close still goes out."""
    from tether.link import QUEUE_LIMIT
    p, (a, b, c) = _wide_open(3)
    p.client.send_data(c, b"c" * 1000, p.now)
    p.client.dealloc(c, p.now)  # closed cleanly: its data and CLOSE stay queued
    p.client.send_data(a, b"a" * (2 * QUEUE_LIMIT), p.now)  # fills the queue
    assert p.client.send_data(b, b"b" * 10, p.now) == 0  # held back
    frames_before = p.client.stats.frames_out
    if end == "local reset":
        p.client.reset(a, ErrorCode.RESET, "enough", p.now)
    else:
        p.server.reset(a, ErrorCode.RESET, "enough", p.now)
        p.client.receive_data(p.server.data_to_send(), p.now)
    events = p.take("client")
    assert p.client.queued == 1000 + wire.HEADER.size  # c's DATA only
    assert [e.stream for e in events if isinstance(e, WindowUpdated)] == [b]
    assert p.client.stats.frames_out < frames_before + 1  # a's DATA frames uncounted
    _check_only_these_left(p, a)


def _check_only_these_left(p: Pair, gone: int) -> None:
    """The client's output holds no DATA of stream `gone`; what it sends is decoded
    by the server without a late frame for `gone`."""
    decoder = wire.FrameDecoder(1 << 20, 1 << 20)
    frames = decoder.feed(p.client.data_to_send())
    assert not [f for f in frames if isinstance(f, wire.Data) and f.stream == gone]
    assert p.client.queued == 0


def test_a_data_frame_is_passed_on_and_counts_as_life_as_it_arrives() -> None:
    """A DATA frame still crossing the network (a large frame over a slow path) is
    handed on piece by piece, and each piece keeps the flow alive: the receiver does
    not wait for the whole frame, nor declare the sender down meanwhile."""
    p = Pair()
    p.handshake()
    sid, _ = p.open(liveness=1.0)
    p.client.send_data(sid, b"q" * 200_000, p.now)
    raw = p.client.data_to_send()
    got = b""
    for i in range(0, len(raw), 20_000):  # 20 kB every 0.3 s: 3 s for the frame
        p.now += 0.3
        p.server.receive_data(raw[i:i + 20_000], p.now)
        p.server.handle_timer(p.now)
        pieces = data_of(p.take("server"), sid)
        assert pieces, "a piece of the frame arrived and must be passed on at once"
        got += pieces
    assert got == b"q" * 200_000
    assert p.server.flow_state(sid) is FlowState.OPEN  # never DOWN while bytes arrive


def test_send_data_keeps_read_only_views_and_copies_writable_data() -> None:
    """A relay passes read-only views of its reads on without a copy; bytes a caller may
    change afterwards (a bytearray, a writable view) are copied when queued."""
    p = Pair()
    p.handshake()
    sid, _ = p.open()
    p.collect()
    big = bytearray(b"r" * 200_000)  # within the credit; a bytes-like view: slicing
    assert p.client.send_data(sid, memoryview(big).toreadonly(), p.now) == len(big)
    kept = [b for b in p.client.buffers_to_send() if len(b) > 100]
    assert kept and all(isinstance(b, memoryview) and b.obj is big for b in kept)
    mutable = bytearray(b"w" * 1000)
    assert p.client.send_data(sid, mutable, p.now) == 1000
    (queued,) = [b for b in p.client.buffers_to_send() if len(b) > 100]
    mutable[:] = b"x" * 1000
    assert bytes(queued) == b"w" * 1000


# --- peek_stream_end: a lone FIN or CLOSE seen before it is handled ------------------------


_PEEK_OPS = st.lists(st.tuples(st.sampled_from(["open", "accept", "client_fin", "server_fin",
                                                "client_close", "server_close",
                                                "server_reset"]), st.integers(0, 7)),
                     max_size=12)


@settings(max_examples=300, deadline=None)
@given(ops=_PEEK_OPS, ftype=st.sampled_from([wire.FrameType.FIN, wire.FrameType.CLOSE,
                                             wire.FrameType.KEEPALIVE, wire.FrameType.WINDOW]),
       pick=st.integers(0, 20), partial=st.booleans(), extra=st.booleans())
def test_peek_stream_end_names_exactly_what_receive_data_then_applies(
        ops: list[tuple[str, int]], ftype: int, pick: int, partial: bool, extra: bool) -> None:
    """For streams in every state the operations reach, `peek_stream_end` says (FIN or
    CLOSE, stream) exactly when feeding those bytes applies that end to a live stream,
    and it changes nothing itself."""
    p = Pair()
    p.handshake()
    opened: list[int] = [p.client.open_flow("svc", p.now)]
    p.transfer()
    p.server.accept_flow(opened[0], p.now)
    p.transfer()
    for op, i in ops:
        sid = opened[i % len(opened)]
        link = p.client if op.startswith("client") else p.server
        with contextlib.suppress(LocalProtocolError):
            if op == "open":
                opened.append(p.client.open_flow("svc", p.now))
            elif op == "accept":
                p.server.accept_flow(sid, p.now)
            elif op.endswith("_fin"):
                link.send_fin(sid, p.now)
            elif op.endswith("_close"):
                link.dealloc(sid, p.now)
            else:
                link.reset(sid, ErrorCode.RESET, "test", p.now)
        p.transfer()
    p.take("server")
    stream = opened[pick % len(opened)] if pick < 16 else 1001 + 2 * pick  # or unknown
    frame = wire.encode_empty(ftype, stream) if ftype != wire.FrameType.WINDOW else \
        wire.encode(wire.Window(stream=stream, increment=1))
    data = frame + (b"\0" if extra else b"")
    if partial:  # half a header already held: the read does not start a frame
        p.server.receive_data(wire.encode_empty(wire.FrameType.KEEPALIVE, stream)[:3], p.now)
    state = p.server.flow_state(stream)
    before = (p.server.stats.as_dict(), len(p.server), state)
    seen = p.server.peek_stream_end(data)
    assert (p.server.stats.as_dict(), len(p.server), p.server.flow_state(stream)) == before
    lone = not partial and not extra and ftype in (wire.FrameType.FIN, wire.FrameType.CLOSE)
    applies = lone and state is not None and (
        ftype == wire.FrameType.CLOSE or state in (FlowState.OPEN, FlowState.LOCAL_FIN))
    assert seen == ((ftype, stream) if applies else None)
    event(f"seen {'none' if seen is None else wire.frame_name(ftype)}")
    p.server.receive_data(data, p.now)
    events = p.take("server")
    if seen is not None and ftype == wire.FrameType.FIN:
        assert FinReceived(stream=stream) in events
    elif seen is not None:
        (end,) = [e for e in events if isinstance(e, FlowEnded)]
        assert (end.stream, end.state, end.initiator) == (stream, FlowState.CLOSED, "peer")


def test_a_flows_data_waits_for_a_turn_of_a_bulk_flow_not_for_its_whole_queue() -> None:
    """On a slow link (the adapter takes 16 KiB at a time), an interactive flow's message
    queued behind 200 KiB of a bulk flow's data leaves with the next take, not after
    the bulk flow's whole queue; each flow's bytes still arrive in order."""
    p = Pair()
    p.handshake()
    bulk, _ = p.open()
    chat, _ = p.open()
    p.collect()
    sent = p.client.send_data(bulk, b"b" * 200_000, p.now)
    assert sent == 200_000
    p.client.send_data(chat, b"hello", p.now)
    p.client.send_fin(chat, p.now)
    takes = [p.client.take_output(16 * 1024) for _ in range(2)]
    decoded = wire.FrameDecoder(split_data=True).feed(b"".join(b"".join(t) for t in takes))
    assert wire.Data(chat, b"hello") in decoded and wire.Fin(chat) in decoded
    # the whole byte stream, as the socket carries it, to the peer: every byte in order
    for piece in [*(x for t in takes for x in t), *p.client.take_output(1 << 30)]:
        p.server.receive_data(piece, p.now)
    got = {bulk: b"", chat: b""}
    for e in p.take("server"):
        if isinstance(e, DataReceived):
            got[e.stream] += bytes(e.data)
    assert got == {bulk: b"b" * 200_000, chat: b"hello"}


def test_consuming_more_than_was_received_is_refused() -> None:
    """`consumed(n)` gives credit back; more than the stream holds would grant the peer
    credit beyond its window (memory this side never agreed to hold): a local error."""
    p, (a,) = _wide_open(1)
    p.client.send_data(a, b"x" * 1000, p.now)
    p.server.receive_data(p.client.data_to_send(), p.now)
    p.server.consumed(a, 600, p.now)
    with pytest.raises(LocalProtocolError, match="only 400 were received"):
        p.server.consumed(a, 401, p.now)
    p.server.consumed(a, 400, p.now)  # exactly what is left
    with pytest.raises(LocalProtocolError):
        p.server.consumed(a, 1, p.now)


# --- a stream's end written ahead (a relay's close path) -----------------------------------


def test_an_end_with_nothing_of_its_stream_queued_goes_with_the_urgent_frames() -> None:
    """A FIN or CLOSE whose stream has nothing queued is written even while the link
    writes only urgent frames (`take_output(0)`); behind its own stream's data it waits."""
    p = Pair()
    p.handshake()
    quiet, _ = p.open()
    busy, _ = p.open()
    p.client.send_data(busy, b"x" * 1000, p.now)
    p.client.send_fin(busy, p.now)  # behind its own data
    p.client.send_fin(quiet, p.now)
    urgent = b"".join(p.client.take_output(0))
    assert urgent == wire.encode_empty(wire.FrameType.FIN, quiet)
    rest = b"".join(p.client.take_output(1 << 20))
    assert rest.endswith(wire.encode_empty(wire.FrameType.FIN, busy)) and b"x" * 1000 in rest


def test_end_frame_is_offered_only_when_nothing_must_go_before_it() -> None:
    p = Pair()
    p.handshake()
    sid, _ = p.open()
    assert p.client.end_frame(sid, True) == wire.encode_empty(wire.FrameType.FIN, sid)
    assert p.client.end_frame(sid, False) == wire.encode_empty(wire.FrameType.CLOSE, sid)
    assert p.client.end_frame(sid + 2, True) is None  # no such stream
    p.client.send_data(sid, b"queued", p.now)
    assert p.client.end_frame(sid, True) is None  # its data first
    p.transfer()
    p.server.consumed(sid, 6, p.now)  # credit back: a WINDOW frame, urgent, waits
    p.server.send_keepalive(sid, p.now)
    assert p.server.end_frame(sid, True) is None
    p.transfer()
    p.client.send_fin(sid, p.now)
    p.transfer()
    assert p.client.end_frame(sid, True) is None  # sent its FIN already
    assert p.client.end_frame(sid, False) is not None  # may still CLOSE


@pytest.mark.parametrize("how", ["fin", "dealloc"])
def test_an_end_written_ahead_is_counted_and_not_sent_twice(how: str) -> None:
    """The caller writes `end_frame` itself, then tells the link with `written=True`:
    the stream's state and the link's counters follow, and the link sends nothing more
    for it; the peer, given the written bytes, sees the end once."""
    p = Pair()
    p.handshake()
    sid, _ = p.open()
    p.take("client")
    p.take("server")
    frame = p.client.end_frame(sid, how == "fin")
    assert frame is not None
    before = (p.client.stats.frames_out, p.client.stats.bytes_out)
    if how == "fin":
        p.client.send_fin(sid, p.now, written=True)
        assert p.client.flow_state(sid) is FlowState.LOCAL_FIN
    else:
        p.client.dealloc(sid, p.now, written=True)
        assert p.client.flow_state(sid) is None
    assert not p.client.has_output
    assert (p.client.stats.frames_out, p.client.stats.bytes_out) == (before[0] + 1,
                                                                     before[1] + len(frame))
    p.server.receive_data(frame, p.now)
    p.transfer()
    events = p.take("server")
    if how == "fin":
        assert [e for e in events if isinstance(e, FinReceived)] == [FinReceived(stream=sid)]
        assert p.server.flow_state(sid) is FlowState.REMOTE_FIN
    else:
        assert ended(events)[sid].state is FlowState.CLOSED
