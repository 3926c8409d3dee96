"""Two Links in memory driven by hypothesis: random opens, writes, FINs, deallocs,
resets, accepts, rejects, GOAWAYs, closes, silences, forged frames and time.

After every step, on both sides: every stream the link was told of (opened here, or
`FlowOpenRequested`) is either live in the link or got exactly one `FlowEnded`, and
nothing else; no per-stream state (liveness entry, auto-tuned window) outlives its
stream; the peer never made this side hold more than a stream's window; a link that
is not closed always has a next deadline, and one that is closed has none and no
stream. Without forged frames, every byte arrives in order on the other side, all of
it before the FIN or CLOSE that follows it; a sender that used up its credit gets it
back once the peer consumes.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from linkpair import Pair
from tether import wire
from tether.errors import ErrorCode, LocalProtocolError
from tether.events import DataReceived, FinReceived, FlowEnded, FlowOpenRequested, LinkTerminated
from tether.flowstate import FlowState
from tether.link import Link, LinkConfig, LinkState

SIDES = ("client", "server")
sides = st.sampled_from(SIDES)
picks = st.integers(0, 1 << 16)
livenesses = st.sampled_from([None, None, 0.05, 0.5, 3.0])
sizes = st.sampled_from([0, 1, 100, 1500, 5000, 20_000])
codes = st.sampled_from([ErrorCode.RESET, ErrorCode.FLOW_DOWN, ErrorCode.FLOW_PEER,
                         ErrorCode.PROTOCOL_ERROR, 999])
steps = st.sampled_from([0.001, 0.01, 0.1, 0.6, 2.0, 20.0])


def _config(name: str, relay: bool = False) -> LinkConfig:
    # small windows and payloads: credit runs out, windows grow and hit the budget
    return LinkConfig(name=name, initial_window=4096, max_window=16_384,
                      window_budget=20_000, max_payload=2048, max_flows=6,
                      heartbeat_interval=1.0, link_timeout=3.0, handshake_timeout=2.0,
                      relay_streams=relay)


class _Side:
    """What the test knows of one side."""

    def __init__(self) -> None:
        self.told: set[int] = set()  # streams the link told of (open_flow, FlowOpenRequested)
        self.ends: dict[int, int] = {}  # FlowEnded count by stream
        self.held: dict[int, int] = {}  # bytes received and not yet consumed, by stream
        self.got: dict[int, bytearray] = {}  # everything received, by stream
        self.sent: dict[int, bytearray] = {}  # everything sent, by stream
        self.terminated = 0


class LinkPairMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.p = Pair()  # replaced by `configure`
        self.s = {name: _Side() for name in SIDES}
        self.forged = False

    @initialize(relay=st.sampled_from([None, "client", "server"]),
                queue_limit=st.sampled_from([None, 3000, 10_000]))
    def configure(self, relay: str | None, queue_limit: int | None) -> None:
        """Maybe one side is a gateway's (relay streams: no liveness of their own);
        maybe the link queues are small, so that senders are held back and woken."""
        self.p = Pair(client=_config("client", relay == "client"),
                      server=_config("server", relay == "server"))
        if queue_limit is not None:
            self.p.client.queue_limit = self.p.server.queue_limit = queue_limit
        self.p.transfer()
        self._collect()

    # ------------------------------------------------------------------ helpers

    def _collect(self) -> None:
        self.p.collect()
        for name in SIDES:
            side = self.s[name]
            for e in self.p.take(name):
                if isinstance(e, FlowOpenRequested):
                    assert e.stream not in side.told, f"{name}: stream {e.stream} opened twice"
                    side.told.add(e.stream)
                elif isinstance(e, DataReceived):
                    assert e.stream in side.told and e.stream not in side.ends, \
                        f"{name}: data for stream {e.stream} not live"
                    side.held[e.stream] = side.held.get(e.stream, 0) + len(e.data)
                    side.got.setdefault(e.stream, bytearray()).extend(e.data)
                elif isinstance(e, FlowEnded):
                    assert e.stream in side.told, f"{name}: FlowEnded for unknown {e.stream}"
                    assert e.state in (FlowState.CLOSED, FlowState.DOWN, FlowState.RESET)
                    assert e.reason
                    side.ends[e.stream] = side.ends.get(e.stream, 0) + 1
                    side.held.pop(e.stream, None)
                elif isinstance(e, LinkTerminated):
                    side.terminated += 1
                if not self.forged and (isinstance(e, FinReceived) or (
                        isinstance(e, FlowEnded) and e.initiator == "peer"
                        and e.reason == "peer")):  # a FIN or a CLOSE follows all the data
                    other = self.s["server" if name == "client" else "client"]
                    assert side.got.get(e.stream, b"") == other.sent.get(e.stream, b""), \
                        f"{name} stream {e.stream}: EOF before all the data arrived"

    def _link(self, name: str) -> Link:
        return self.p.side(name)

    def _live(self, name: str, pick: int) -> int | None:
        """A live stream of `name` (-1: the newest)."""
        ids = sorted(self._link(name).streams())
        return ids[pick % len(ids)] if ids else None

    def _settle(self) -> None:
        self.p.transfer(rounds=500)
        self._collect()

    # ------------------------------------------------------------------ local calls

    @rule(name=sides, liveness=livenesses)
    def open(self, name: str, liveness: float | None) -> None:
        link = self._link(name)
        try:
            sid = link.open_flow("svc", self.p.now, liveness=liveness)
        except LocalProtocolError:
            assert not link.is_open or len(link) >= link.config.max_flows
            return
        assert sid not in self.s[name].told, f"{name} reused stream id {sid}"
        self.s[name].told.add(sid)

    @rule(name=sides, pick=picks, accept=st.booleans())
    def answer(self, name: str, pick: int, accept: bool) -> None:
        """Accept or refuse a stream the peer opened (pick -1: the newest)."""
        link = self._link(name)
        waiting = sorted(sid for sid in link.streams()
                         if link.flow_state(sid) is FlowState.OPENING and sid % 2 ==
                         (0 if name == "client" else 1))
        if not waiting:
            return
        sid = waiting[pick % len(waiting)]
        if accept:
            link.accept_flow(sid, self.p.now)
        else:
            link.reject_flow(sid, ErrorCode.NO_SUCH_SERVICE, "no", self.p.now)

    @rule(name=sides, pick=picks, size=sizes)
    def write(self, name: str, pick: int, size: int) -> None:
        link = self._link(name)
        sid = self._live(name, pick)
        if sid is None:
            return
        sent = self.s[name].sent.setdefault(sid, bytearray())
        data = bytes((len(sent) + i) % 251 for i in range(size))
        can = link.flow_state(sid) in (FlowState.OPEN, FlowState.REMOTE_FIN)
        credit = link.send_credit(sid)
        try:
            n = link.send_data(sid, data, self.p.now)
        except LocalProtocolError:
            assert not can
            return
        assert can and 0 <= n <= min(size, credit)
        sent.extend(data[:n])

    @rule(name=sides, pick=picks)
    def fin(self, name: str, pick: int) -> None:
        sid = self._live(name, pick)
        if sid is not None:
            try:
                self._link(name).send_fin(sid, self.p.now)
            except LocalProtocolError:
                assert self._link(name).flow_state(sid) is FlowState.OPENING

    @rule(name=sides, pick=picks)
    def dealloc(self, name: str, pick: int) -> None:
        sid = self._live(name, pick)
        if sid is not None:
            self._link(name).dealloc(sid, self.p.now)
            assert sid not in self._link(name).streams()

    @rule(name=sides, pick=picks, code=codes)
    def reset(self, name: str, pick: int, code: int) -> None:
        sid = self._live(name, pick)
        if sid is not None:
            self._link(name).reset(sid, code, "abort", self.p.now)
            assert sid not in self._link(name).streams()

    @rule(name=sides, pick=picks, fraction=st.sampled_from([0.1, 0.5, 1.0]))
    def consume(self, name: str, pick: int, fraction: float) -> None:
        held = self.s[name].held
        ids = sorted(sid for sid, n in held.items() if n)
        if not ids:
            return
        sid = ids[pick % len(ids)]
        n = max(1, int(held[sid] * fraction))
        held[sid] -= n
        self._link(name).consumed(sid, n, self.p.now)

    @rule(name=sides, pick=picks)
    def forward_keepalive(self, name: str, pick: int) -> None:
        sid = self._live(name, pick)
        if sid is not None:
            self._link(name).send_keepalive(sid, self.p.now)

    @rule(name=sides, liveness=st.sampled_from([None, 0.05, 1.0, 10.0]), pick=picks)
    def set_liveness(self, name: str, liveness: float | None, pick: int) -> None:
        sid = self._live(name, pick)
        if sid is not None:
            self._link(name).set_liveness(sid, liveness, self.p.now)

    # ------------------------------------------------------------------ the wire and time

    @rule()
    def transfer(self) -> None:
        self._settle()

    @rule(name=sides, limit=st.sampled_from([0, 1, 100, 3000, 20_000]))
    def trickle(self, name: str, limit: int) -> None:
        """A slow link: `name` writes only its urgent frames and about `limit` bytes of
        the rest (`take_output`), which the peer reads in that order."""
        src = self._link(name)
        dst = self._link("server" if name == "client" else "client")
        out = b"".join(src.take_output(limit))
        if out and not self.p.cut:
            dst.receive_data(out, self.p.now)
        self._collect()

    @rule(name=sides, how=st.sampled_from(["goaway", "goaway", "close", "lost", "silence"]))
    def end_link(self, name: str, how: str) -> None:
        """One rule for every way a link ends, so that links live long enough."""
        link = self._link(name)
        if how == "goaway":
            link.goaway(self.p.now, "bye")
        elif how == "close":
            link.close(ErrorCode.SHUTDOWN, "stop", self.p.now)
            assert not link.streams()
        elif how == "lost":
            link.connection_lost("gone", self.p.now)
            assert not link.streams()
        else:  # from now on nothing gets through (a cut cable): the links must notice
            self.p.cut = True
            self.forged = True  # frames are lost: the peers no longer agree

    @rule(name=sides, liveness=livenesses, size=sizes)
    def open_accepted(self, name: str, liveness: float | None, size: int) -> None:
        """Open, accept at the other side, write: a live flow with data."""
        self.open(name, liveness)
        self._settle()
        other = "server" if name == "client" else "client"
        self.answer(other, -1, True)
        self._settle()
        self.write(name, -1, size)
        self._settle()

    @rule(name=sides, pick=picks, size=sizes)
    def fin_both(self, name: str, pick: int, size: int) -> None:
        """Write and FIN (the data still queued) one way, then FIN the other: the stream
        ends CLOSED on both sides (the clean close, otherwise only reached by two
        `fin`s on one stream)."""
        sid = self._live(name, pick)
        if sid is None:
            return
        self.write(name, pick, size)
        self.fin(name, pick)
        self._settle()
        other = "server" if name == "client" else "client"
        if sid in self._link(other).streams():
            self.fin(other, sorted(self._link(other).streams()).index(sid))
            self._settle()

    @rule(name=sides, pick=picks, resume=st.booleans())
    def fill(self, name: str, pick: int, resume: bool) -> None:
        """Write a live stream's whole send credit, then one byte more (none of it
        taken): the sender is out of credit. With `resume`, the peer then consumes all
        it holds of the stream, and the sender has credit again."""
        sid = self._live(name, pick)
        if sid is None:
            return
        link = self._link(name)
        credit = link.send_credit(sid)
        if credit:
            self.write(name, pick, credit)
        self.write(name, pick, 1)
        if not resume:
            return
        self._settle()
        other = "server" if name == "client" else "client"
        held = self.s[other].held.get(sid, 0)
        if held:
            self.s[other].held[sid] = 0
            self._link(other).consumed(sid, held, self.p.now)
            self._settle()
        if not self.forged and sid in link.streams() and \
                link.flow_state(sid) in (FlowState.OPEN, FlowState.REMOTE_FIN) and \
                sid in self._link(other).streams():
            assert link.send_credit(sid) > 0, f"{name} stream {sid}: no credit back"

    @rule(name=sides, liveness=st.sampled_from([None, 3.0]), size=sizes)
    def drain(self, name: str, liveness: float | None, size: int) -> None:
        """GOAWAY with a live flow of each side's opening: the link drains (DRAINING)
        until those flows end, then terminates by itself."""
        other = "server" if name == "client" else "client"
        self.open_accepted(name, liveness, size)
        self.open_accepted(other, liveness, size)
        self._link(name).goaway(self.p.now, "drain")
        self._settle()

    @rule(dt=steps)
    def advance(self, dt: float) -> None:
        until = self.p.now + dt
        for _ in range(10_000):
            due = [(d, link) for link in (self.p.client, self.p.server)
                   if (d := link.next_deadline()) is not None and d <= until]
            if not due:
                break
            d, link = min(due, key=lambda x: x[0])
            self.p.now = max(self.p.now, d)
            link.handle_timer(self.p.now)
            after = link.next_deadline()
            # a deadline that handle_timer leaves in the past would spin an adapter
            assert after is None or after > self.p.now, \
                f"deadline {after} stuck at now={self.p.now}"
            self._settle()
        else:
            raise AssertionError("timers did not settle")
        self.p.now = until
        self._settle()

    @rule(name=sides, pick=picks, kind=st.sampled_from(
        ["data", "fin", "close", "reset", "window", "big_window", "open_ok", "open_err",
         "keepalive", "open", "goaway0", "goaway_err"]),
        offset=st.sampled_from([0, 0, 0, 1, 2, 4]), size=st.sampled_from([0, 1, 5000]))
    def forge(self, name: str, pick: int, kind: str, offset: int, size: int) -> None:
        """The peer of `name` sends a frame of its choosing, well formed or not."""
        self._settle()  # the forged frame follows what was already sent
        link = self._link(name)
        ids = sorted(link.streams()) or [1]
        sid = ids[pick % len(ids)] + offset
        frame: wire.Frame
        if kind == "data":
            frame = wire.Data(sid, b"f" * size)
        elif kind == "fin":
            frame = wire.Fin(stream=sid)
        elif kind == "close":
            frame = wire.Close(stream=sid)
        elif kind == "reset":
            frame = wire.Reset(stream=sid, code=ErrorCode.RESET, reason="forged")
        elif kind == "window":
            frame = wire.Window(stream=sid, increment=1 + size)
        elif kind == "big_window":
            frame = wire.Window(stream=sid, increment=0x7FFFFFFF)
        elif kind == "open_ok":
            frame = wire.OpenOk(stream=sid, window=size)
        elif kind == "open_err":
            frame = wire.OpenErr(stream=sid, code=ErrorCode.REFUSED, reason="forged")
        elif kind == "keepalive":
            frame = wire.KeepAlive(stream=sid)
        elif kind == "open":
            frame = wire.Open(stream=sid, service="x", window=size)
        elif kind == "goaway0":
            frame = wire.GoAway(last_stream=pick % 8, code=ErrorCode.NO_ERROR, reason="f")
        else:
            frame = wire.GoAway(last_stream=0, code=ErrorCode.INTERNAL_ERROR, reason="f")
        self.forged = True
        link.receive_data(wire.encode(frame), self.p.now)
        self._settle()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def every_stream_is_live_or_ended_once(self) -> None:
        self._collect()
        for name in SIDES:
            link, side = self._link(name), self.s[name]
            assert all(n == 1 for n in side.ends.values()), f"{name}: {side.ends}"
            live = set(link.streams())
            assert live == side.told - set(side.ends), \
                f"{name}: live {live}, told {side.told}, ended {set(side.ends)}"
            assert side.terminated <= 1

    @invariant()
    def no_state_outlives_its_stream(self) -> None:
        for name in SIDES:
            link = self._link(name)
            live = set(link.streams())
            assert set(link._liveness._peers) <= live
            assert set(link._liveness._wheel._index) <= live
            assert link._starved <= live
            growth = sum(s.local_window - link.config.initial_window
                         for s in link._streams.values())
            assert link._window_growth == growth, (link._window_growth, growth)
            assert 0 <= growth <= link.config.window_budget
            for s in link._streams.values():
                assert 0 <= s.send_credit <= 0x7FFFFFFF
                assert 0 <= s.recv_allowed <= s.local_window <= link.config.max_window

    @invariant()
    def the_peer_never_overfills_a_window(self) -> None:
        for name in SIDES:
            link = self._link(name)
            for sid, held in self.s[name].held.items():
                s = link._streams.get(sid)
                if s is not None:
                    # received - consumed, plus what it may still send, plus what was
                    # consumed and not yet credited back: exactly its window
                    assert held + s.recv_allowed + s.unacked == s.local_window, \
                        (name, sid, held, s.recv_allowed, s.local_window, s.unacked)

    @invariant()
    def deadlines(self) -> None:
        for name in SIDES:
            link = self._link(name)
            if link.is_closed:
                assert link.next_deadline() is None and not link.streams()
            elif link.state is LinkState.DRAINING:  # drained: it terminates by itself
                assert link.streams(), f"{name} drained and still DRAINING"
            else:
                assert link.next_deadline() is not None

    @invariant()
    def bytes_arrive_in_order(self) -> None:
        if self.forged:
            return
        for name, other in (("client", "server"), ("server", "client")):
            for sid, got in self.s[name].got.items():
                sent = self.s[other].sent.get(sid, bytearray())
                assert sent[:len(got)] == got, f"{name} stream {sid}: bytes differ"

    def teardown(self) -> None:
        # whatever happened, once both links are gone every stream has ended, once
        for name in SIDES:
            self._link(name).connection_lost("teardown", self.p.now)
        self._collect()
        for name in SIDES:
            side = self.s[name]
            assert set(side.ends) == side.told, (name, side.told, side.ends)
            assert all(n == 1 for n in side.ends.values())
            assert side.terminated == 1


LinkPairMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=60,
                                             deadline=None)
test_link_pair = LinkPairMachine.TestCase
