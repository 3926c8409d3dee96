"""tether.link — one tether connection carrying many flows, without I/O.

A `Link` is the engine of one TCP (or TLS) connection between two tether nodes,
in the style of h2 and aioquic: feed it bytes with `receive_data(data, now)`, take
its events with `next_events()`, send what `data_to_send()` returns, and call
`handle_timer(now)` at `next_deadline()`. It never reads the clock and never
touches a socket, so every protocol rule is tested in memory, with time driven by
hand.

What it does: the HELLO handshake (token and version checked), streams numbered by
side (the connecting side opens odd ids, the accepting side even ids), credit-based
flow control per stream, per-flow liveness (KEEPALIVE after a quarter of the
timeout with nothing sent; DOWN after the whole timeout with nothing received), the
link heartbeat (PING/PONG; a silent link takes every flow DOWN "link lost"), mesh
MSG/ACK, and GOAWAY. Garbage from the peer never escapes as an exception: it
becomes a RESET of the one stream or, for a broken frame stream, a GOAWAY and a
`LinkTerminated` event.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final

from . import wire
from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    AckReceived,
    DataReceived,
    Event,
    FinReceived,
    FlowAccepted,
    FlowEnded,
    FlowOpenRequested,
    GoAwayReceived,
    HandshakeCompleted,
    Initiator,
    KeepAliveReceived,
    LinkTerminated,
    MessageReceived,
    StreamProtocolError,
    WindowUpdated,
)
from .flowstate import RECEIVING_STATES, SENDING_STATES, FlowInput, FlowState, FlowStateMachine
from .liveness import LivenessMonitor
from .sendqueue import MIN_SPLIT as _MIN_SPLIT
from .sendqueue import SendQueue

__all__ = ["Link", "LinkConfig", "LinkState", "LinkStats", "Role", "check_liveness"]

MODE_HALF_CLOSE: Final = 0
MODE_CASCADE: Final = 1
_MAX_WINDOW: Final = 0x7FFFFFFF
_DOWN_CODES: Final = frozenset({ErrorCode.FLOW_DOWN, ErrorCode.FLOW_PEER})
# Frames that may overtake DATA already queued (see `take_output`): none of them is
# ordered with respect to another stream's bytes, nor to its own stream's DATA.
_URGENT: Final = frozenset({wire.Open, wire.OpenOk, wire.OpenErr, wire.Window, wire.KeepAlive,
                            wire.Ping, wire.Pong, wire.Ack, wire.Reset})
# DATA queued in a link and not yet taken by `take_output` (a slow link): `send_data`
# takes no more than fits below this (or `_MIN_SPLIT`, so that frames are not tiny),
# whatever the credit; a stream held back is woken once the queue drained to half.
# The default of `Link.queue_limit`, which an adapter sizes to the link's speed.
QUEUE_LIMIT: Final = 256 * 1024


class Role(Enum):
    """Which end of the TCP connection this link is: the client opens odd stream ids."""

    CLIENT = "client"
    SERVER = "server"


class LinkState(Enum):
    """The states of a link."""

    HANDSHAKE = "HANDSHAKE"
    OPEN = "OPEN"
    DRAINING = "DRAINING"
    CLOSED = "CLOSED"


DEFAULT_MAX_WINDOW: Final = 4 * 1024 * 1024
"""`LinkConfig.max_window` by default: where a stream's window auto-tuning stops."""


@dataclass(slots=True)
class LinkConfig:
    """Settings of one link. Times in seconds.

    `token` is sent in HELLO; `expected_token`, when set, is what the peer's HELLO
    must carry (a server refuses anything else). `initial_window` is the credit given
    to the peer on every stream; a stream whose sender keeps running out of credit
    (bulk) has its window doubled at each WINDOW update, up to `max_window`, as long as
    the link's windows together stay within `window_budget` extra bytes (receive-window
    auto-tuning, as TCP's: a fast flow gets a window that covers its round trip, idle
    and interactive flows keep the initial one; memory held for the peer stays below
    `initial_window` x flows + `window_budget`). The link is lost when nothing at all arrived for
    `link_timeout`; it sends a PING after `heartbeat_interval` with nothing sent.
    `relay_streams` is for gateways: streams carry no liveness of their own and
    KEEPALIVEs surface as `KeepAliveReceived`, to be forwarded end to end.
    `authorize(name, token)`, when set, must accept the peer's HELLO as well (a token
    per node name).
    """

    name: str
    token: bytes = b""
    expected_token: bytes | None = None
    # 1 MiB: a busy socket's read (a `ReadBuffer` read: up to 1 MiB) holds one frame or
    # two, not four or more -- every frame is one more pass through each hop's Python. A
    # frame does not hold up the others: a link's writes cut it to the link's pace
    # (`take_output`), and to a turn while other streams have frames queued (`SendQueue`).
    # It was 256 KiB: a two-gateway bulk transfer made 35-40 % more Python calls per GB
    # in the gateways (docs/benchmarks.md, "Bulk through two gateways")
    max_payload: int = 1024 * 1024
    hard_max_payload: int = wire.HARD_MAX_PAYLOAD
    initial_window: int = 256 * 1024
    max_window: int = DEFAULT_MAX_WINDOW
    window_budget: int = 32 * 1024 * 1024
    heartbeat_interval: float = 5.0
    link_timeout: float = 15.0
    handshake_timeout: float = 10.0
    # the liveness wheel's resolution: a keepalive goes out up to a tick late, so it
    # must be well below the shortest timeout's remaining 3/4 (10 ms: 7.5 ms)
    tick: float = 0.0025
    max_flows: int = 100_000
    relay_streams: bool = False
    authorize: Callable[[str, bytes], bool] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.initial_window <= _MAX_WINDOW:
            raise ValueError(f"initial_window {self.initial_window} out of [1, {_MAX_WINDOW}]")
        if not self.initial_window <= self.max_window <= _MAX_WINDOW:
            raise ValueError(f"max_window {self.max_window} out of [initial_window "
                             f"{self.initial_window}, {_MAX_WINDOW}]")
        if self.link_timeout <= self.heartbeat_interval:
            raise ValueError(f"link_timeout {self.link_timeout} must exceed "
                             f"heartbeat_interval {self.heartbeat_interval}")


_LINK_STATS: Final = ("bytes_in", "bytes_out", "flows_ended", "flows_opened", "frames_in",
                      "frames_out", "keepalives_sent", "late_frames", "protocol_errors",
                      "streams_reset_by_error", "windows_grown")


class LinkStats:
    """Counters of one link, all monotonically increasing."""

    __slots__ = _LINK_STATS

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_in = 0
        self.frames_out = 0
        self.flows_opened = 0
        self.flows_ended = 0
        self.keepalives_sent = 0
        self.late_frames = 0
        self.protocol_errors = 0
        self.streams_reset_by_error = 0
        self.windows_grown = 0

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {name: getattr(self, name) for name in _LINK_STATS}  # (compiled: no __slots__)


class _Stream:
    """What a link knows of one live stream."""

    __slots__ = ("fsm", "id", "liveness", "local_window", "mode", "origin", "recv_allowed",
                 "relay", "send_credit", "service", "unacked")

    def __init__(self, sid: int, service: str, liveness: float | None, mode: int,
                 origin: str, local_window: int, relay: bool) -> None:
        self.id = sid
        self.fsm = FlowStateMachine()
        self.service = service
        self.liveness = liveness
        self.mode = mode
        self.origin = origin
        self.local_window = local_window
        self.recv_allowed = local_window
        self.unacked = 0
        self.send_credit = 0
        self.relay = relay


def check_liveness(liveness: float | None) -> None:
    """Refuse a flow liveness timeout below `LivenessMonitor.MIN_TIMEOUT` (or NaN);
    None (no liveness) and `math.inf` pass."""
    if liveness is not None:
        LivenessMonitor.check_timeout(liveness)


def _liveness_ms(liveness: float | None) -> int:
    if liveness is None or math.isinf(liveness):
        return 0
    return max(1, round(liveness * 1000))


class Link:
    """The sans-IO engine of one tether connection. See the module docstring."""

    def __init__(self, role: Role, config: LinkConfig, now: float) -> None:
        self.role = role
        self.config = config
        self.state = LinkState.HANDSHAKE
        self.peer_name: str | None = None
        self.stats = LinkStats()
        self._decoder = wire.FrameDecoder(config.max_payload, config.hard_max_payload,
                                          split_data=True)  # payloads passed on as they arrive
        self._send = SendQueue()  # DATA, FIN, CLOSE by stream; MSG, GOAWAY...: in turns
        self._urgent: list[bytes | memoryview] = []  # control frames that go ahead of `_send`
        self._queued = 0  # DATA bytes (headers included) in `_send`
        self._starved: set[int] = set()  # streams refused by queue_limit, not by credit
        self.queue_limit = QUEUE_LIMIT
        self._events: list[Event] = []
        self._streams: dict[int, _Stream] = {}
        self._liveness: LivenessMonitor[int] = LivenessMonitor(config.tick, now)
        self._next_local_id = 1 if role is Role.CLIENT else 2
        self._highest_peer_id = 0
        self._peer_goaway_last: int | None = None
        self._max_payload = config.max_payload
        self._link_timeout = config.link_timeout
        self._last_recv = now
        self._last_send = now
        self._handshake_deadline: float | None = now + config.handshake_timeout
        self._ping_seq = 0
        self._window_growth = 0  # bytes of auto-tuned window beyond initial_window, all streams
        if role is Role.CLIENT:
            self._send_hello()

    # ------------------------------------------------------------------ queries

    @property
    def is_open(self) -> bool:
        """The handshake is done and the link still accepts new flows."""
        return self.state is _OPEN and self._peer_goaway_last is None

    @property
    def is_closed(self) -> bool:
        """The link has terminated (`LinkTerminated` was emitted)."""
        return self.state is _CLOSED

    @property
    def max_payload(self) -> int:
        """The largest DATA payload either side sends (the smaller of the two HELLOs)."""
        return self._max_payload

    @property
    def has_output(self) -> bool:
        """There are bytes for `data_to_send` / `buffers_to_send`."""
        return bool(self._urgent or self._send.queues)  # (a dict: no Python-level call)

    @property
    def has_events(self) -> bool:
        """There are events for `next_events`."""
        return bool(self._events)

    @property
    def has_urgent(self) -> bool:
        """There are urgent control frames to write (see `take_output`)."""
        return bool(self._urgent)

    @property
    def queued(self) -> int:
        """DATA bytes waiting in this link, not yet handed to the socket."""
        return self._queued

    def flow_state(self, stream: int) -> FlowState | None:
        """The state of a live stream, or None if the link does not know it."""
        s = self._streams.get(stream)
        return s.fsm.state if s is not None else None

    def send_credit(self, stream: int) -> int:
        """How many bytes `send_data` would accept on `stream` now: its credit, within
        what the link's queue has room for (`queue_limit`). 0 while the queue is full:
        the stream is then woken by a `WindowUpdated` once the queue drained to half, as
        it would be by credit."""
        s = self._streams.get(stream)
        if s is None or s.fsm.state not in SENDING_STATES:
            return 0
        return self._room(stream, s.send_credit)

    def _room(self, stream: int, wanted: int) -> int:
        """What of `wanted` bytes the queue takes now; a stream given less than it
        wanted is woken when the queue drained to half (`_dequeued`)."""
        room = self.queue_limit - self._queued
        if wanted <= room:
            return wanted
        self._starved.add(stream)
        return 0 if room <= 0 else min(wanted, max(room, _MIN_SPLIT))

    def liveness_of(self, stream: int) -> float | None:
        """The liveness timeout of a stream in seconds, None if it has none."""
        s = self._streams.get(stream)
        return s.liveness if s is not None else None

    def streams(self) -> list[int]:
        """The ids of the streams this link still knows."""
        return list(self._streams)

    def __len__(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ I/O surface

    def data_to_send(self) -> bytes:
        """The bytes to write to the socket now (empty if none)."""
        pieces = self.buffers_to_send()
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    def buffers_to_send(self) -> list[bytes | memoryview]:
        """Like `data_to_send`, as the list of pieces, for `transport.writelines`
        (a writev, no copy): header and payload of a DATA frame stay apart."""
        out = self._send.take_all()
        if self._urgent:
            out[:0] = self._urgent
            self._urgent = []
        self._dequeued(self._queued)
        return out

    def take_output(self, limit: int) -> list[bytes | memoryview]:
        """What to write now when the socket should take at most about `limit` more
        bytes (a slow link): every urgent control frame -- WINDOW, KEEPALIVE, PING,
        PONG, OPEN, OPEN_OK, OPEN_ERR, RESET, ACK, and the FIN or CLOSE of a stream
        that had nothing else queued --, then the other frames up to
        `limit` bytes, the streams with data queued served in turns (`SendQueue`), a
        DATA frame cut in two where it straddles the limit. The rest waits for the next
        call. So a flow's keepalive or credit waits behind at most `limit` bytes of
        another flow's data, and its data behind at most a turn of each other flow's."""
        out: list[bytes | memoryview] = self._urgent
        self._urgent = []
        if limit <= 0 or not self._send.queues:
            return out
        pieces, taken = self._send.take(limit)
        out += pieces
        self._dequeued(taken)
        return out

    def _dequeued(self, n: int) -> None:
        """`n` DATA bytes left the queue: wake the streams it refused once it is half
        empty (a `WindowUpdated` each, as credit would)."""
        self._queued = max(0, self._queued - n)
        if self._starved and self._queued <= self.queue_limit // 2:
            starved, self._starved = self._starved, set()
            for sid in sorted(starved):
                s = self._streams.get(sid)
                if s is not None and s.fsm.can_send and s.send_credit:
                    self._events.append(WindowUpdated(stream=sid, credit=s.send_credit))

    def next_events(self) -> list[Event]:
        """The events that happened since the last call, in order."""
        events = self._events
        self._events = []
        return events

    def next_deadline(self) -> float | None:
        """When `handle_timer` must be called next (None: no timer needed)."""
        if self.state is _CLOSED:
            return None
        if self._handshake_deadline is not None:
            return self._handshake_deadline
        deadline = min(self._last_send + self.config.heartbeat_interval,
                       self._last_recv + self._link_timeout)
        flows = self._liveness.next_deadline()
        return deadline if flows is None else min(deadline, flows)

    def handle_timer(self, now: float) -> None:
        """Fire whatever is due at `now`: handshake timeout, heartbeat, flow liveness."""
        if self.state is _CLOSED:
            return
        if self._handshake_deadline is not None:
            if now >= self._handshake_deadline:
                self._fail(ErrorCode.HANDSHAKE_FAILED,
                           f"handshake not completed within {self.config.handshake_timeout:g}s",
                           "link", now)
            return
        if now >= self._last_recv + self._link_timeout:
            self._terminate(ErrorCode.FLOW_DOWN,
                            f"link lost: nothing received for {now - self._last_recv:.3f}s",
                            "link", now, flow_reason="link lost")
            return
        if now >= self._last_send + self.config.heartbeat_interval:
            self._ping_seq += 1
            self._emit(wire.Ping(opaque=self._ping_seq), now)
        keepalives, expired = self._liveness.poll(now)
        for sid in keepalives:
            s = self._streams.get(sid)
            # A stream the peer opened and this side has not answered yet gets none: its
            # OPEN_OK (or OPEN_ERR) is the answer the opener waits for, within its
            # liveness, and a keepalive would let an application that never accepts
            # hold the opener's alloc for ever.
            if s is not None and not (s.fsm.state is FlowState.OPENING
                                      and self._is_peer_id(sid)):
                self.stats.keepalives_sent += 1
                self._emit_raw(wire.encode_empty(wire.FrameType.KEEPALIVE, sid), now,
                               urgent=True)
        for sid in expired:
            s = self._streams.get(sid)
            if s is None:
                continue
            unanswered = s.fsm.state is FlowState.OPENING and not self._is_peer_id(sid)
            if s.fsm.process(FlowInput.LIVENESS_EXPIRED):
                why = f"open not answered within {s.liveness:g}s" if unanswered \
                    else "unresponsive peer"
                self._emit(wire.Reset(stream=sid, code=ErrorCode.FLOW_PEER, reason=why), now)
                self._ended(s, ErrorCode.FLOW_PEER, f"down: {why}", "link")
        self._maybe_drained(now)

    def peek_stream_end(self, data: bytes | memoryview) -> tuple[int, int] | None:
        """`(frame type, stream)` if `data` is exactly one FIN or CLOSE frame that
        `receive_data(data)` will apply to a live stream, else None. Changes nothing.

        A relay uses it to pass a stream's end on *before* the bookkeeping of
        `receive_data`: on loopback the next hop wakes as soon as it is written, so
        everything a hop does before that write is on the path of the close (and, where
        the hops share one CPU, much of what it does after: docs/benchmarks.md, "Where
        close latency goes")."""
        state = self.state  # (module constants below: every look-up here is latency)
        if (state is not _OPEN and state is not _DRAINING) or len(data) != _HEADER_SIZE \
                or not self._decoder.at_boundary():
            return None
        ftype, _, stream, length = _unpack_header(data)
        if length or (ftype != _FIN and ftype != _CLOSE):
            return None
        s = self._streams.get(stream)
        if s is None or (ftype == _FIN and s.fsm.state not in RECEIVING_STATES):
            return None
        return ftype, stream

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed bytes read from the socket."""
        if self.state is _CLOSED or not data:
            return
        self.stats.bytes_in += len(data)
        self._last_recv = now
        # a DATA frame's payload still arriving: the first frame fed is its next piece
        continued = self._decoder.data_left > 0
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            self._fail(exc.code, f"protocol error: {exc}", "peer", now)
            return
        for frame in frames:
            try:
                if continued and isinstance(frame, wire.Data):
                    self._on_data_piece(frame, now)
                else:
                    self.stats.frames_in += 1
                    self._handle(frame, now)
            except ProtocolError as exc:
                self.stats.protocol_errors += 1
                self._fail(exc.code, f"protocol error: {exc}", "peer", now)
                return
            continued = False
            if self.state is _CLOSED:
                return

    def abort(self, code: int, reason: str, now: float) -> None:
        """The adapter gave up on the connection (a failed TLS handshake, say): end the
        link with `code` without sending anything; every live flow goes DOWN."""
        if self.state is not _CLOSED:
            self._terminate(code, reason, "link", now, flow_reason="link lost")

    def connection_lost(self, reason: str, now: float) -> None:
        """The socket is gone (EOF, reset, error): every live flow goes DOWN."""
        if self.state is not _CLOSED:
            self._terminate(ErrorCode.FLOW_DOWN, reason, "link", now, flow_reason="link lost")

    # ------------------------------------------------------------------ flows

    def open_flow(self, service: str, now: float, *, liveness: float | None = None,
                  mode: int = MODE_HALF_CLOSE, origin: str | None = None) -> int:
        """Open a stream to `service`; returns its id. `liveness` is in seconds (None:
        none); `origin` defaults to this node's name."""
        if not self.is_open:
            raise LocalProtocolError(f"cannot open a flow on a link in state {self.state.name}"
                                     + (" (peer sent GOAWAY)" if self._peer_goaway_last
                                        is not None else ""))
        if len(self._streams) >= self.config.max_flows:
            raise LocalProtocolError(f"link already carries {len(self._streams)} flows "
                                     f"(max_flows={self.config.max_flows})")
        check_liveness(liveness)
        sid = self._next_local_id
        if sid > wire.MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted on this link; open a new link")
        self._next_local_id += 2
        origin = self.config.name if origin is None else origin
        s = _Stream(sid, service, liveness, mode, origin, self.config.initial_window,
                    self.config.relay_streams)
        self._streams[sid] = s
        self.stats.flows_opened += 1
        self._track(s, now)
        self._emit(wire.Open(stream=sid, service=service, liveness_ms=_liveness_ms(liveness),
                             window=s.local_window, mode=mode, origin=origin), now)
        return sid

    def accept_flow(self, stream: int, now: float) -> None:
        """Accept a stream the peer opened (after `FlowOpenRequested`)."""
        s = self._stream(stream)
        if not self._is_peer_id(stream):
            raise LocalProtocolError(f"cannot accept stream {stream}: this side opened it")
        s.fsm.process(FlowInput.LOCAL_ACCEPT)
        self._emit(wire.OpenOk(stream=stream, window=s.local_window), now)

    def reject_flow(self, stream: int, code: int, reason: str, now: float) -> None:
        """Refuse a stream the peer opened; it ends (CLOSED) with `code` and `reason`."""
        s = self._stream(stream)
        if not self._is_peer_id(stream):
            raise LocalProtocolError(f"cannot reject stream {stream}: this side opened it")
        s.fsm.process(FlowInput.LOCAL_REJECT)
        self._emit(wire.OpenErr(stream=stream, code=code, reason=reason), now)
        self._ended(s, code, f"refused: {reason}", "local")
        self._maybe_drained(now)

    def send_data(self, stream: int, data: bytes | bytearray | memoryview, now: float) -> int:
        """Send as much of `data` as the stream's credit allows; returns the count sent.
        Raises `LocalProtocolError` if the stream cannot send (unknown, FIN sent, ended)."""
        s = self._streams.get(stream)
        if s is None or s.fsm.state not in SENDING_STATES:  # (in those DATA changes no
            s = self._stream(stream)  # state: no need to ask the FSM) -- raises here
            s.fsm.process(FlowInput.LOCAL_DATA)
        n = min(len(data), s.send_credit)
        if n:
            n = self._room(stream, n)  # the rest waits for the queue (a WindowUpdated)
        if n == 0:
            return 0
        s.send_credit -= n
        step = self._max_payload
        header = wire.encode_data_header
        push = self._send.push
        if n == len(data) <= step and (type(data) is bytes or (
                type(data) is memoryview and data.readonly)):  # (kept: see below)
            push(stream, header(stream, n))  # the common relay case: one frame, no copy
            push(stream, data)
            self.stats.frames_out += 1
        else:
            mv = memoryview(data)
            # read-only data is kept as it is: bytes, or a view promised not to change
            # (a `ReadBuffer` read); anything writable (the caller may reuse it) is copied
            keep = mv.readonly
            for off in range(0, n, step):
                chunk = mv[off:min(off + step, n)]
                push(stream, header(stream, len(chunk)))
                push(stream, chunk if keep else bytes(chunk))
                self.stats.frames_out += 1
        sent = n + _HEADER_SIZE * ((n + step - 1) // step)
        self.stats.bytes_out += sent
        self._queued += sent
        self._last_send = now
        if not s.relay:  # (a relay stream has no liveness: never tracked, `_track`)
            self._liveness.sent(s.id, now)
        return n

    def end_frame(self, stream: int, fin: bool) -> bytes | None:
        """The FIN (`fin`) or CLOSE frame `send_fin` or `dealloc` would send on
        `stream`, if it may be written at once, ahead of whatever this link has queued:
        the stream is live and may end that way, and nothing of its own or urgent waits
        to go before it. Else None. Changes nothing: whoever writes the frame then calls
        `send_fin` or `dealloc` with `written=True` (before the link hears anything
        more: until then the link does not know the stream ended).

        A relay writes a stream's end as soon as it reads the other side's (see
        `peek_stream_end`), and tells the link afterwards."""
        state = self.state  # (module constants below, as in `peek_stream_end`)
        if state is not _OPEN and state is not _DRAINING:
            return None
        s = self._streams.get(stream)
        if s is None or self._urgent or stream in self._send.queues or (
                fin and s.fsm.state not in SENDING_STATES):
            return None
        return _pack_header(_FIN if fin else _CLOSE, 0, stream, 0)  # `wire.encode_empty`

    def send_fin(self, stream: int, now: float, *, written: bool = False) -> None:
        """Half-close: this side sends no more data; the peer reads EOF and may reply.
        `written`: the FIN was written already (see `end_frame`)."""
        s = self._stream(stream)
        if not s.fsm.process(FlowInput.LOCAL_FIN):
            return
        self._emit_end(wire.FrameType.FIN, stream, now, written)
        self._liveness.sent(s.id, now)
        if s.fsm.is_terminal:
            self._ended(s, ErrorCode.NO_ERROR, "closed", "local")
            self._maybe_drained(now)

    def dealloc(self, stream: int, now: float, *, written: bool = False) -> None:
        """End the flow cleanly from this side: the peer reads what was sent, then EOF,
        and its writes fail. Idempotent for a stream already ended. `written`: the CLOSE
        was written already (see `end_frame`)."""
        s = self._streams.get(stream)
        if s is None:
            return
        s.fsm.process(FlowInput.LOCAL_DEALLOC)
        self._emit_end(wire.FrameType.CLOSE, stream, now, written)
        self._ended(s, ErrorCode.NO_ERROR, "local", "local")
        self._maybe_drained(now)

    def reset(self, stream: int, code: int, reason: str, now: float) -> None:
        """Abort the flow; the peer's reads and writes fail with `FlowReset`. A `code` of
        FLOW_DOWN or FLOW_PEER tells the peer the flow is DOWN (a relay passing on what
        happened further away)."""
        s = self._streams.get(stream)
        if s is None:
            return
        down = code in _DOWN_CODES
        s.fsm.process(FlowInput.LINK_LOST if down else FlowInput.LOCAL_RESET)
        self._emit(wire.Reset(stream=stream, code=code, reason=reason), now)
        self._ended(s, code, f"down: {reason}" if down else f"reset: {reason}", "local")
        self._maybe_drained(now)

    def consumed(self, stream: int, n: int, now: float) -> None:
        """The application took `n` bytes of this stream: give the credit back (in
        batches of half a window, so one WINDOW frame covers many DATA frames)."""
        s = self._streams.get(stream)
        if s is None or n <= 0:
            return
        if n > s.local_window - s.recv_allowed - s.unacked:  # more than it holds
            raise LocalProtocolError(
                f"stream {stream}: consumed {n} bytes, but only "
                f"{s.local_window - s.recv_allowed - s.unacked} were received and not "
                "consumed yet: the peer would be granted credit beyond its window")
        s.unacked += n
        if s.unacked >= s.local_window // 2 and s.fsm.can_receive:
            increment = s.unacked
            if s.recv_allowed <= s.local_window // 4:  # the sender waits for credit: grow
                increment += self._grow_window(s)
            self._emit(wire.Window(stream=stream, increment=increment), now)
            s.recv_allowed += increment
            s.unacked = 0
            # no `_liveness.sent`: a relay answers a WINDOW itself, so it tells the far end nothing
            # of this side's life; a keepalive still goes when nothing else does

    def _grow_window(self, s: _Stream) -> int:
        """Double `s`'s window within `max_window` and the link's budget; the growth."""
        cfg = self.config
        grow = min(s.local_window, cfg.max_window - s.local_window,
                   cfg.window_budget - self._window_growth)
        if grow <= 0:
            return 0
        s.local_window += grow
        self._window_growth += grow
        self.stats.windows_grown += 1
        return grow

    def send_keepalive(self, stream: int, now: float) -> None:
        """Forward a KEEPALIVE on a relay stream."""
        s = self._streams.get(stream)
        if s is not None:
            self._emit_raw(wire.encode_empty(wire.FrameType.KEEPALIVE, stream), now,
                           urgent=True)

    def set_liveness(self, stream: int, liveness: float | None, now: float) -> None:
        """Change this side's liveness timeout of a stream (None: no liveness). The
        peer's silence so far still counts: a timeout shorter than it ends the stream at
        the next timer, and changing the timeout does not restart the clock (a stream
        that had no liveness starts it now)."""
        s = self._stream(stream)
        check_liveness(liveness)  # before anything changes: a refusal leaves it as it was
        s.liveness = liveness
        if stream in self._liveness and liveness is not None and not math.isinf(liveness):
            self._liveness.set_timeout(stream, liveness, now)
        else:
            self._liveness.remove(stream)
            self._track(s, now)

    # ------------------------------------------------------------------ mesh and link

    def send_message(self, kind: int, seq: int, body: bytes, now: float) -> None:
        """Send a mesh MSG (the mesh numbers and retransmits; the link only carries)."""
        if self.state is not _OPEN and self.state is not _DRAINING:
            raise LocalProtocolError(f"cannot send a message on a link in state "
                                     f"{self.state.name}")
        n = len(body)
        if n > self._max_payload:
            raise LocalProtocolError(f"message body of {n} bytes exceeds the link's "
                                     f"maximum payload {self._max_payload}")
        # header and body appended apart (as send_data does): no Msg object, no copies
        self._send.push(0, wire.encode_msg_header(kind, seq, n))
        if n:
            self._send.push(0, body)
        self.stats.frames_out += 1
        self.stats.bytes_out += wire.HEADER.size + 10 + n
        self._last_send = now

    def send_ack(self, seq: int, now: float) -> None:
        """Acknowledge every mesh MSG up to `seq`."""
        if self.state is _OPEN or self.state is _DRAINING:
            self._emit(wire.Ack(seq=seq), now)

    def goaway(self, now: float, reason: str = "shutdown") -> None:
        """Graceful shutdown: refuse new flows, let live ones finish. The link terminates
        by itself once none is left (or call `close` at the drain deadline)."""
        if self.state is not _OPEN:
            if self.state is _HANDSHAKE:
                self.close(ErrorCode.SHUTDOWN, reason, now)
            return
        self.state = LinkState.DRAINING
        self._emit(wire.GoAway(last_stream=self._highest_peer_id, code=ErrorCode.NO_ERROR,
                               reason=reason), now)
        self._maybe_drained(now)

    def close(self, code: int, reason: str, now: float) -> None:
        """Terminate now: every live flow is taken DOWN with `reason` on both sides (the
        peer gets a RESET with code FLOW_DOWN for each), then GOAWAY with `code`."""
        if self.state is _CLOSED:
            return
        for s in list(self._streams.values()):
            s.fsm.process(FlowInput.LINK_LOST)
            self._emit(wire.Reset(stream=s.id, code=ErrorCode.FLOW_DOWN, reason=reason), now)
            self._ended(s, ErrorCode.FLOW_DOWN, f"down: {reason}", "local")
        if self.state is not _HANDSHAKE:
            self._emit(wire.GoAway(last_stream=self._highest_peer_id, code=code,
                                   reason=reason), now)
        self._terminate(code, reason, "local", now, flow_reason=reason)

    # ------------------------------------------------------------------ internals

    def _stream(self, stream: int) -> _Stream:
        s = self._streams.get(stream)
        if s is None:
            raise LocalProtocolError(f"no live stream {stream} on this link")
        return s

    def _track(self, s: _Stream, now: float) -> None:
        if not s.relay and s.liveness is not None and not math.isinf(s.liveness):
            self._liveness.add(s.id, s.liveness, now)

    def _emit(self, frame: wire.Frame, now: float) -> None:
        self._emit_raw(wire.encode(frame), now, urgent=type(frame) in _URGENT)

    def _emit_raw(self, raw: bytes, now: float, *, urgent: bool = False,
                  stream: int = 0) -> None:
        """Queue one encoded frame: ahead of the rest if `urgent` (once the handshake is
        done: until then, everything follows the HELLO), else in `stream`'s turn (a
        stream's FIN or CLOSE after its DATA; 0 for link frames)."""
        if urgent and self.state is not _HANDSHAKE:
            self._urgent.append(raw)
        else:
            self._send.push(stream, raw)
        self.stats.frames_out += 1
        self.stats.bytes_out += len(raw)
        self._last_send = now

    def _emit_end(self, ftype: int, stream: int, now: float, written: bool) -> None:
        """Queue a stream's FIN or CLOSE: behind the stream's queued frames, if it has
        any, else with the urgent frames. Nothing of its own is then left for it to
        overtake, and the end of a flow does not wait its turn behind other flows'
        data: on a relay, it is written as soon as it is passed on (a stream's end is
        on the path of every close the application sees, see `peek_stream_end`).
        `written`: the frame was written already (`end_frame`): only counted."""
        if written:
            self.stats.frames_out += 1
            self.stats.bytes_out += wire.HEADER.size
            self._last_send = now
            return
        self._emit_raw(wire.encode_empty(ftype, stream), now,
                       urgent=stream not in self._send, stream=stream)

    def _send_hello(self) -> None:
        cfg = self.config
        self._send.push(0, wire.encode(wire.Hello(
            name=cfg.name, token=cfg.token, max_payload=cfg.max_payload,
            heartbeat_ms=round(cfg.heartbeat_interval * 1000))))
        self.stats.frames_out += 1

    def _ended(self, s: _Stream, code: int, reason: str, initiator: Initiator) -> None:
        del self._streams[s.id]
        if s.fsm.state is not FlowState.CLOSED and s.id in self._send \
                and self.state is not _CLOSED:
            # reset, down or refused: the peer discards what the stream still has queued
            # (its RESET overtakes it, §6.3), so it leaves the queue now (when the whole
            # link ends, its last frames are written as they are, behind the GOAWAY)
            frames, size, data = self._send.drop(s.id)
            self.stats.frames_out -= frames
            self.stats.bytes_out -= size
            self._dequeued(data)
        self._window_growth -= s.local_window - self.config.initial_window
        self._liveness.remove(s.id)
        self._starved.discard(s.id)
        self.stats.flows_ended += 1
        self._events.append(FlowEnded(stream=s.id, state=s.fsm.state, code=code,
                                      reason=reason, initiator=initiator))

    def _fail(self, code: int, reason: str, initiator: Initiator, now: float) -> None:
        """The link cannot go on: tell the peer why (GOAWAY), then terminate."""
        self._send.push(0, wire.encode(wire.GoAway(last_stream=self._highest_peer_id,
                                                   code=code, reason=reason)))
        self._terminate(code, reason, initiator, now, flow_reason="link lost")

    def _terminate(self, code: int, reason: str, initiator: Initiator, now: float, *,
                   flow_reason: str) -> None:
        self.state = LinkState.CLOSED  # (first: `_ended` then leaves the queue as it is)
        for s in list(self._streams.values()):
            s.fsm.process(FlowInput.LINK_LOST)
            self._ended(s, ErrorCode.FLOW_DOWN, f"down: {flow_reason}", "link")
        self._handshake_deadline = None
        self._events.append(LinkTerminated(code=code, reason=reason, initiator=initiator))

    def _maybe_drained(self, now: float) -> None:
        """A draining link whose last stream ended -- by a frame, a local call or a
        timer -- terminates by itself."""
        if self.state is _DRAINING and not self._streams:
            self._terminate(ErrorCode.NO_ERROR, "drained", "local", now, flow_reason="drained")

    def _handle(self, frame: wire.Frame, now: float) -> None:
        if self.state is _HANDSHAKE:
            self._handle_hello(frame, now)
            return
        if isinstance(frame, wire.Data):
            self._on_data(frame, now)
        elif isinstance(frame, wire.Hello):
            raise RemoteProtocolError("second HELLO on an established link")
        elif frame.LINK_FRAME:
            self._on_link_frame(frame, now)
        else:
            self._on_flow_frame(frame, now)
        if self.state is _DRAINING:
            self._maybe_drained(now)

    def _handle_hello(self, frame: wire.Frame, now: float) -> None:
        if isinstance(frame, wire.GoAway):
            code = ErrorCode.HANDSHAKE_FAILED if frame.code == 0 else frame.code
            self._terminate(code, f"peer refused the handshake: {frame.reason}", "peer", now,
                            flow_reason="link lost")
            return
        if not isinstance(frame, wire.Hello):
            raise RemoteProtocolError(f"expected HELLO, got {wire.frame_name(frame.TYPE)}")
        cfg = self.config
        self.peer_name = frame.name  # for log lines, even if the token is refused below
        # compare_digest: a refusal takes as long whatever part of a guessed token was right
        if cfg.expected_token is not None and \
                not hmac.compare_digest(frame.token, cfg.expected_token):
            raise RemoteProtocolError(f"bad token from {frame.name!r}", ErrorCode.BAD_TOKEN)
        if cfg.authorize is not None and not cfg.authorize(frame.name, frame.token):
            raise RemoteProtocolError(f"bad token from {frame.name!r}", ErrorCode.BAD_TOKEN)
        if self.role is Role.SERVER:
            self._send_hello()
        self.peer_name = frame.name
        self._max_payload = min(cfg.max_payload, frame.max_payload)
        self._decoder.max_payload = self._max_payload  # what the peer may send us too (§4)
        peer_heartbeat = frame.heartbeat_ms / 1000
        self._link_timeout = max(cfg.link_timeout, 2.5 * peer_heartbeat)
        self._handshake_deadline = None
        self._last_send = now
        self.state = LinkState.OPEN
        self._events.append(HandshakeCompleted(peer_name=frame.name,
                                               max_payload=self._max_payload,
                                               peer_heartbeat=peer_heartbeat))

    def _on_link_frame(self, frame: wire.Frame, now: float) -> None:
        if isinstance(frame, wire.Ping):
            self._emit(wire.Pong(opaque=frame.opaque), now)
        elif isinstance(frame, wire.Pong):
            pass
        elif isinstance(frame, wire.Msg):
            self._events.append(MessageReceived(kind=frame.kind, seq=frame.seq, body=frame.body))
        elif isinstance(frame, wire.Ack):
            self._events.append(AckReceived(seq=frame.seq))
        elif isinstance(frame, wire.GoAway):
            self._on_goaway(frame, now)

    def _on_goaway(self, frame: wire.GoAway, now: float) -> None:
        if frame.code != ErrorCode.NO_ERROR:
            self._terminate(frame.code, f"peer went away: {frame.reason}", "peer", now,
                            flow_reason=f"link lost: peer went away: {frame.reason}")
            return
        self._peer_goaway_last = frame.last_stream
        self._events.append(GoAwayReceived(last_stream=frame.last_stream, code=frame.code,
                                           reason=frame.reason))
        for s in list(self._streams.values()):
            if (s.id % 2 == self._next_local_id % 2 and s.id > frame.last_stream
                    and s.fsm.process(FlowInput.REMOTE_REJECT)):
                self._ended(s, ErrorCode.REFUSED, f"refused: peer going away: {frame.reason}",
                            "peer")

    def _is_peer_id(self, sid: int) -> bool:
        return sid % 2 != self._next_local_id % 2

    def _late(self, sid: int) -> bool:
        """A frame for a stream this link no longer knows: late (the stream ended here
        while the frame was in flight) or bogus (never opened)."""
        if self._is_peer_id(sid):
            return sid <= self._highest_peer_id
        return sid < self._next_local_id

    def _on_data_piece(self, frame: wire.Data, now: float) -> None:
        """The next piece of a DATA frame whose start came in an earlier read: for a
        stream that is not live, the frame was already answered (or found late) then."""
        if frame.stream in self._streams:
            self._on_data(frame, now)
        if self.state is _DRAINING:
            self._maybe_drained(now)

    def _on_data(self, frame: wire.Data, now: float) -> None:
        s = self._streams.get(frame.stream)
        if s is None:
            self._unknown_stream(frame.stream, "DATA", now)
            return
        if not s.relay:  # (a relay stream has no liveness: never tracked, `_track`)
            self._liveness.received(s.id, now)
        n = len(frame.data)
        if n > s.recv_allowed:
            self._reset_by_error(s, ErrorCode.FLOW_CONTROL,
                                 f"peer sent {n} bytes with only {s.recv_allowed} of credit", now)
            return
        try:  # (in the receiving states, DATA changes no state)
            act = s.fsm.state in RECEIVING_STATES or s.fsm.process(FlowInput.REMOTE_DATA)
        except RemoteProtocolError as exc:
            self._reset_by_error(s, ErrorCode.PROTOCOL_ERROR, str(exc), now)
            return
        if act:
            s.recv_allowed -= n
            self._events.append(DataReceived(s.id, frame.data))

    def _on_flow_frame(self, frame: wire.Frame, now: float) -> None:
        sid: int = frame.stream  # type: ignore[attr-defined]
        if isinstance(frame, wire.Open):
            self._on_open(frame, now)
            return
        s = self._streams.get(sid)
        if s is None:
            self._unknown_stream(sid, wire.frame_name(frame.TYPE), now)
            return
        if isinstance(frame, (wire.OpenOk, wire.OpenErr)) and self._is_peer_id(sid):
            # a peer answering its own open has the stream ids wrong: a link error (§6.2)
            raise RemoteProtocolError(f"{wire.frame_name(frame.TYPE)} for stream {sid} "
                                      "that the peer opened")
        if not isinstance(frame, wire.Window):  # a relay's own, not the far end's (above)
            self._liveness.received(sid, now)
        try:
            self._on_stream_frame(s, frame, now)
        except RemoteProtocolError as exc:
            self._reset_by_error(s, ErrorCode.PROTOCOL_ERROR, str(exc), now)

    def _on_stream_frame(self, s: _Stream, frame: wire.Frame, now: float) -> None:
        fsm = s.fsm
        if isinstance(frame, wire.KeepAlive):
            if s.relay:
                self._events.append(KeepAliveReceived(stream=s.id))
        elif isinstance(frame, wire.Window):
            if s.send_credit + frame.increment > _MAX_WINDOW:
                raise RemoteProtocolError(f"WINDOW overflows the credit ({s.send_credit} + "
                                          f"{frame.increment})")
            s.send_credit += frame.increment
            if fsm.can_send:
                self._events.append(WindowUpdated(stream=s.id, credit=s.send_credit))
        elif isinstance(frame, wire.Fin):
            if fsm.process(FlowInput.REMOTE_FIN):
                self._events.append(FinReceived(stream=s.id))
                if fsm.is_terminal:
                    self._ended(s, ErrorCode.NO_ERROR, "closed", "peer")
        elif isinstance(frame, wire.Close):
            if fsm.process(FlowInput.REMOTE_DEALLOC):
                self._ended(s, ErrorCode.NO_ERROR, "peer", "peer")
        elif isinstance(frame, wire.Reset):
            down = frame.code in _DOWN_CODES
            if fsm.process(FlowInput.REMOTE_DOWN if down else FlowInput.REMOTE_RESET):
                reason = f"down: {frame.reason}" if down else f"reset: {frame.reason}"
                self._ended(s, frame.code, reason, "peer")
        elif isinstance(frame, wire.OpenOk):
            if frame.window > _MAX_WINDOW:
                raise RemoteProtocolError(f"OPEN_OK window {frame.window} too large")
            fsm.process(FlowInput.REMOTE_ACCEPT)
            s.send_credit = frame.window
            self._events.append(FlowAccepted(stream=s.id))
            if frame.window:
                self._events.append(WindowUpdated(stream=s.id, credit=s.send_credit))
        elif isinstance(frame, wire.OpenErr):
            fsm.process(FlowInput.REMOTE_REJECT)
            self._ended(s, frame.code, f"refused: {frame.reason}", "peer")

    def _on_open(self, frame: wire.Open, now: float) -> None:
        sid = frame.stream
        if not self._is_peer_id(sid):
            raise RemoteProtocolError(f"OPEN with stream id {sid} of this side's parity")
        if sid <= self._highest_peer_id:
            raise RemoteProtocolError(f"OPEN reuses stream id {sid} (highest so far "
                                      f"{self._highest_peer_id})")
        self._highest_peer_id = sid
        if frame.window > _MAX_WINDOW:  # a bad stream, as on OPEN_OK: only it ends
            reason = f"OPEN window {frame.window} too large"
            self.stats.protocol_errors += 1
            self._events.append(StreamProtocolError(stream=sid, code=ErrorCode.PROTOCOL_ERROR,
                                                    reason=reason))
            self._emit(wire.OpenErr(stream=sid, code=ErrorCode.PROTOCOL_ERROR, reason=reason),
                       now)
            return
        refusal = None
        if self.state is not _OPEN:
            refusal = "going away"
        elif len(self._streams) >= self.config.max_flows:
            refusal = f"too many flows on this link (max_flows={self.config.max_flows})"
        liveness = frame.liveness_ms / 1000 if frame.liveness_ms else None
        if refusal is None and liveness is not None and liveness < LivenessMonitor.MIN_TIMEOUT:
            refusal = f"liveness {liveness}s below the minimum {LivenessMonitor.MIN_TIMEOUT}s"
        if refusal is not None:
            self._emit(wire.OpenErr(stream=sid, code=ErrorCode.REFUSED, reason=refusal), now)
            return
        s = _Stream(sid, frame.service, liveness, frame.mode, frame.origin,
                    self.config.initial_window, self.config.relay_streams)
        s.send_credit = frame.window
        self._streams[sid] = s
        self.stats.flows_opened += 1
        self._track(s, now)
        self._events.append(FlowOpenRequested(stream=sid, service=frame.service,
                                              liveness=liveness, mode=frame.mode,
                                              origin=frame.origin))

    def _unknown_stream(self, sid: int, what: str, now: float) -> None:
        if self._late(sid):
            self.stats.late_frames += 1
            return
        self.stats.protocol_errors += 1
        reason = f"{what} for stream {sid} that was never opened"
        self._events.append(StreamProtocolError(stream=sid, code=ErrorCode.PROTOCOL_ERROR,
                                                reason=reason))
        if what == "RESET":  # never answer a RESET with a RESET: that could ping-pong
            return
        self._emit(wire.Reset(stream=sid, code=ErrorCode.PROTOCOL_ERROR, reason=reason), now)

    def _reset_by_error(self, s: _Stream, code: int, reason: str, now: float) -> None:
        self.stats.protocol_errors += 1
        self.stats.streams_reset_by_error += 1
        self._events.append(StreamProtocolError(stream=s.id, code=code, reason=reason))
        s.fsm.process(FlowInput.LOCAL_RESET)
        self._emit(wire.Reset(stream=s.id, code=code, reason=reason), now)
        self._ended(s, code, f"error: {reason}", "peer")


# The hot paths' constants: a module global, not an Enum member looked up on its class
# (under Python 3.11 that goes through `EnumType.__getattr__`'s hook, 75 ns against 16)
# or a `wire` attribute, per call
_HANDSHAKE = LinkState.HANDSHAKE
_OPEN = LinkState.OPEN
_DRAINING = LinkState.DRAINING
_CLOSED = LinkState.CLOSED
_FIN = int(wire.FrameType.FIN)
_CLOSE = int(wire.FrameType.CLOSE)
_HEADER_SIZE = wire.HEADER.size
_unpack_header = wire.HEADER.unpack_from
_pack_header = wire.HEADER.pack
