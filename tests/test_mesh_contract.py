"""The mesh's contract where a review found it broken (real loopback sockets, both
loops): a peer removed and added again neither loses nor repeats messages, a graceful
restart under load leaves nothing unconfirmed, cancelled sends leave nothing behind;
memory stays bounded when the application does not read its failure reports, and
when a peer ignores the receive window (or cycles its incarnations)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import tracemalloc

import pytest

from test_mesh import FAST, Receiver, _Collect, cluster, eventually, free_port, next_failure
from tether.aio import LinkConnection, open_link
from tether.errors import ErrorCode
from tether.events import LinkTerminated, MessageReceived
from tether.link import LinkConfig
from tether.mesh import Failure, FailuresNotTaken, Mesh, PeerState
from tether.meshstate import (
    KIND_CLOSING,
    KIND_SESSION,
    MESSAGE_OVERHEAD,
    MIN_WINDOW,
    ClosingInfo,
    SessionInfo,
)


class Failures:
    """Takes a mesh's failure reports in the background."""

    def __init__(self, mesh: Mesh) -> None:
        self.got: list[Failure] = []
        self.task = asyncio.ensure_future(self._run(mesh))

    async def _run(self, mesh: Mesh) -> None:
        async for f in mesh.failures():
            self.got.append(f)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


# 1. remove_peer + add_peer restarts the sequence numbers at 1 while the other node still
#    remembers the old numbering of the same incarnation: new messages are silently
#    acknowledged away (neither delivered nor failed).

@pytest.mark.parametrize("names", [("a", "b"), ("b", "a")], ids=["sender-leads",
                                                                "sender-follows"])
async def test_readded_peer_messages_are_not_silently_lost(names: tuple[str, str]) -> None:
    s_name, r_name = names
    async with cluster(s_name, r_name) as m:
        s, r = m[s_name], m[r_name]
        rr, fs = Receiver(r), Failures(s)
        for i in range(3):
            await s.send(r_name, b"old%d" % i)
        await eventually(lambda: len(rr.got) == 3 and s.peers()[r_name].queued == 0,
                         what="first three delivered and acknowledged")
        s.remove_peer(r_name)
        s.add_peer(r_name, f"127.0.0.1:{r.port}")
        for i in range(3):
            await s.send(r_name, b"new%d" % i)
        # every new message must be delivered or failed; wait for the queue to settle
        await eventually(lambda: s.peers()[r_name].queued == 0, what="queue settles")
        await asyncio.sleep(0.2)
        delivered = [x.body for x in rr.got[3:]]
        failed = [x.body for f in fs.got for x in f.undelivered]
        await rr.stop()
        await fs.stop()
        assert sorted(delivered + failed) == [b"new0", b"new1", b"new2"], (delivered, failed)


# 2. The receiver removes and re-adds a sender while messages from it were received but not
#    yet taken: they stay in the shared inbox, and the sender re-sends them to the "new"
#    peer, so the application receives them twice.

@pytest.mark.parametrize("names", [("a", "b"), ("b", "a")], ids=["receiver-follows",
                                                                "receiver-leads"])
async def test_readded_peer_messages_are_not_delivered_twice(names: tuple[str, str]) -> None:
    s_name, r_name = names
    async with cluster(s_name, r_name) as m:
        s, r = m[s_name], m[r_name]
        await s.send(r_name, b"m1")
        await eventually(lambda: r.peers()[s_name].counters["received"] == 1,
                         what="m1 received (not taken)")
        r.remove_peer(s_name)
        r.add_peer(s_name, f"127.0.0.1:{s.port}")
        await s.send(r_name, b"m2")  # s reconnects to r
        rr = Receiver(r)
        await eventually(lambda: s.peers()[r_name].queued == 0, what="all acknowledged")
        await asyncio.sleep(0.1)
        got = [x.body for x in rr.got]
        await rr.stop()
        assert got == [b"m1", b"m2"], got


# 3. Failure reports were kept without bound while the application did not read
#    failures(): the queue bound (queue_bytes) did not bound the memory a down peer
#    costs. Now reports not taken for a peer stop new messages to it, at the call, once
#    they hold more than queue_bytes.

def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "tether.mesh" and r.levelno >= logging.WARNING]


async def test_failure_reports_are_bounded_when_nobody_reads_them(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tether.mesh")
    queue = 1024 + 64
    a = Mesh("a", peers={"ghost": f"127.0.0.1:{free_port()}"}, queue_bytes=queue,
             max_message=1024, **FAST)  # type: ignore[arg-type]
    await a.start()
    try:
        queued = refused = 0
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(2000):
            try:  # "ghost" is down: its queue is full after the first
                queued += len(a.broadcast(b"%04d" % i + b"x" * 1020))
            except FailuresNotTaken:
                refused += 1
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        # one message in the queue, two in reports (the second took them past
        # queue_bytes), the rest refused at the call: about 3.3 kB, plus what a peer
        # going down costs whatever is sent (its dial task, timer, log records: ~7 kB)
        assert held < 16 * queue, f"{held} bytes held for a peer whose queue is {queue}"
        info = a.peers()["ghost"]
        assert (queued, info.counters["failures"], refused) == (1, 2, 1997)
        assert info.counters["refused_sends"] == refused
        assert info.failed_bytes == 2 * queue and info.queued_bytes == queue
        # counted, and logged without a line per message
        lines = _warnings(caplog)
        assert len(lines) <= 4, lines
        assert any("refused a message to ghost" in line for line in lines), lines
        # send refuses too, rather than wait for room that only the application can make
        with pytest.raises(FailuresNotTaken, match="take them"):
            await asyncio.wait_for(a.send("ghost", b"late"), 1)
        reports = [await next_failure(a) for _ in range(2)]
        assert [m.body[:4] for r in reports for m in r.undelivered] == [b"0001", b"0002"]
        assert a.peers()["ghost"].failed_bytes == 0
        assert a.broadcast(b"again") == []  # accepted again (and handed back: queue full)
        assert (await next_failure(a)).undelivered[0].body == b"again"
    finally:
        await a.aclose()


async def test_a_waiting_send_is_refused_once_reports_pile_up() -> None:
    """`send` waits for room while a peer is unreachable; each establish_timeout hands
    the queue back. Nobody reads the reports: once they hold more than queue_bytes,
    the waiting send is refused instead of accepted."""
    queue = 1024 + 64
    a = Mesh("a", peers={"ghost": f"127.0.0.1:{free_port()}"}, queue_bytes=queue,
             max_message=1024, **{**FAST, "establish_timeout": 0.2})  # type: ignore[arg-type]
    await a.start()
    try:
        accepted = 0
        with pytest.raises(FailuresNotTaken):
            for i in range(10):
                await asyncio.wait_for(a.send("ghost", b"%04d" % i + b"x" * 1020), 5)
                accepted += 1
        # 0 queued; 1 waits until the first timeout hands 0 back (queue_bytes in
        # reports: not more than the bound), then is queued; 2 waits until the second
        # hands 1 back, and is refused
        assert accepted == 2
        info = a.peers()["ghost"]
        assert info.failed_bytes == 2 * queue and info.counters["refused_sends"] == 1
        reports = [await next_failure(a) for _ in range(2)]
        assert [m.body[:4] for r in reports for m in r.undelivered] == [b"0000", b"0001"]
    finally:
        await a.aclose()


# 4. A `send` cancelled while it waits for room leaves its future in the peer's
#    space_waiters until room appears: with a peer that is up but never consumes,
#    that is forever (one future per timed-out send).

async def test_cancelled_waiting_sends_do_not_accumulate() -> None:
    async with cluster("a", "b", queue_bytes=1024 + 64, max_message=1024) as m:
        a = m["a"]
        await a.send("b", b"x" * 1024)  # fills the queue; b never reads
        for _ in range(200):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(a.send("b", b"y"), 0.001)
        assert len(a._peers["b"].space_waiters) <= 1, len(a._peers["b"].space_waiters)


# 5. The receiving side had no bound of its own: it relied on the sender's queue_bytes
#    (and on the sender honouring ACKs). Now it announces a receive window (its
#    queue_bytes) in SESSION; an honest sender keeps within it, one that does not is
#    bad input; and a peer cannot pile up windows by restarting.

async def _raw_peer(a: Mesh, incarnation: int) -> LinkConnection:
    """A link to `a` from its peer "b", played by hand: HELLO, then a SESSION as
    `incarnation` (its MSGs are numbered from 1)."""
    links = a.counters["links_accepted"]
    conn = await open_link("127.0.0.1", a.port, LinkConfig(name="b"), _Collect())
    await eventually(lambda: a.counters["links_accepted"] > links, what="a knows the link")
    window = max(MIN_WINDOW, conn.link.max_payload + MESSAGE_OVERHEAD)
    info = SessionInfo(incarnation, a.incarnation, 0, 0, window)
    conn.link.send_message(KIND_SESSION, 0, info.encode(), conn.now)
    conn.flush()
    return conn


async def _raw_send(conn: LinkConnection, seq: int, body: bytes) -> None:
    conn.link.send_message(1, seq, body, conn.now)
    conn.flush()
    await conn.drain()
    await asyncio.sleep(0)


async def test_receiver_memory_is_bounded_against_a_peer_that_ignores_acks(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tether.mesh")
    async with Mesh("a", listen="127.0.0.1:0", peers={"b": "127.0.0.1:9"},
                    queue_bytes=256 * 1024, **FAST) as a:  # type: ignore[arg-type]
        conn = await _raw_peer(a, 7)
        try:
            await eventually(lambda: a.peers()["b"].state is PeerState.UP, what="session up")
            body = b"z" * 60000
            for seq in range(1, 301):  # 18 MB, never acknowledged by a's application
                if conn.link.is_closed:
                    break
                await _raw_send(conn, seq, body)
            ended = await asyncio.wait_for(conn.closed, 5)
            # the 5th would have made 300,320 bytes unread, above the 262,144 announced
            assert ended.code == ErrorCode.PROTOCOL_ERROR, ended
            assert "receive window exceeded: MSG 5" in ended.reason, ended.reason
            info = a.peers()["b"]
            assert info.counters["received"] == 4 and a.counters["protocol_errors"] == 1
            assert info.unread_bytes == 4 * (len(body) + MESSAGE_OVERHEAD) <= a.queue_bytes
            assert any("protocol error from b: receive window exceeded" in line
                       for line in _warnings(caplog)), _warnings(caplog)
            # only that link ended: what was accepted is delivered, in order
            ra = Receiver(a)
            await ra.wait(4)
            await ra.stop()
            assert [m.body for m in ra.got] == [body] * 4
        finally:
            conn.close()


async def _session_up(a: Mesh, incarnation: int) -> None:
    await eventually(lambda: a.peers()["b"].incarnation == incarnation and
                     a.peers()["b"].state is PeerState.UP, what="session up")


async def _ended_by_protocol_error(conn: LinkConnection, a: Mesh, says: str,
                                   caplog: pytest.LogCaptureFixture | None = None) -> None:
    """`a` ends the link `conn` as a protocol error saying `says`: GOAWAY
    PROTOCOL_ERROR, counted once, and (with `caplog`) a WARNING line naming b."""
    ended = await asyncio.wait_for(conn.closed, 5)
    assert ended.code == ErrorCode.PROTOCOL_ERROR, ended
    assert says in ended.reason, ended.reason
    assert a.counters["protocol_errors"] == 1
    if caplog is not None:
        assert any(f"protocol error from b: {says}" in line
                   for line in _warnings(caplog)), _warnings(caplog)


async def _window_of_one(a: Mesh, incarnation: int = 7) -> LinkConnection:
    """"b" played by hand, its SESSION up as `incarnation` with the smallest window (one
    1 KiB message): `a`'s messages after the first wait for ACKs."""
    conn = await open_link("127.0.0.1", a.port, LinkConfig(name="b", max_payload=1024),
                           _Collect())
    conn.link.send_message(KIND_SESSION, 0,
                           SessionInfo(incarnation, a.incarnation, 0, 0, MIN_WINDOW).encode(),
                           conn.now)
    conn.flush()
    try:
        await _session_up(a, incarnation)
    except BaseException:
        conn.close()
        raise
    return conn


async def _fill_a_window_and_leave(a: Mesh, incarnation: int, count: int) -> None:
    """As `incarnation` of "b", send `a` `count` messages (a window's worth), then go."""
    conn = await _raw_peer(a, incarnation)
    await _session_up(a, incarnation)
    received = a.peers()["b"].counters["received"]
    for seq in range(1, count + 1):
        await _raw_send(conn, seq, b"%d:%04d" % (incarnation, seq) + b"." * 994)
    await eventually(lambda: a.peers()["b"].counters["received"] == received + count,
                     what="a window's worth received")
    assert not conn.link.is_closed
    conn.close()
    await eventually(lambda: a.peers()["b"].state is not PeerState.UP, what="down")


async def test_a_peer_cannot_pile_up_windows_by_restarting(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tether.mesh")
    queue, cost = 16 * 1024, 1000 + MESSAGE_OVERHEAD
    per_window = queue // cost
    async with Mesh("a", listen="127.0.0.1:0", peers={"b": "127.0.0.1:9"},
                    queue_bytes=queue, max_message=1024, **FAST) as a:  # type: ignore[arg-type]
        for incarnation in (7, 8):  # each honours the window it is given, then "restarts"
            await _fill_a_window_and_leave(a, incarnation, per_window)
        # a third incarnation while more than a window of the earlier ones is unread
        conn = await _raw_peer(a, 9)
        ended = await asyncio.wait_for(conn.closed, 5)
        assert ended.code == ErrorCode.REFUSED and "not yet read" in ended.reason, ended
        info = a.peers()["b"]
        assert info.unread_bytes == 2 * per_window * cost <= 2 * queue
        assert info.counters["refused_sessions"] == 1 and info.incarnation == 8
        assert a.counters["protocol_errors"] == 0  # not bad input: a peer in a hurry
        assert any("refused a session with a new incarnation of b" in line
                   for line in _warnings(caplog)), _warnings(caplog)
        # once a's application reads, the new incarnation is welcome
        ra = Receiver(a)
        await ra.wait(2 * per_window)
        assert [m.body[:6] for m in ra.got] == [b"%d:%04d" % (i, n) for i in (7, 8)
                                                for n in range(1, per_window + 1)]
        conn = await _raw_peer(a, 9)
        try:
            await _session_up(a, 9)
        finally:
            conn.close()
            await ra.stop()


@pytest.mark.parametrize(("body", "reason"), [
    (SessionInfo(7, 0, 0, 0, MIN_WINDOW).encode(),
     "SESSION window 1088 cannot hold one message of the link's maximum payload 65536"),
    (struct.pack("!QQQQ", 7, 0, 0, 0), "SESSION body of 32 bytes, expected 40"),
], ids=["window-below-one-message", "body-without-window"])
async def test_a_session_without_a_usable_window_is_a_protocol_error(
        body: bytes, reason: str) -> None:
    async with Mesh("a", listen="127.0.0.1:0", peers={"b": "127.0.0.1:9"},
                    **FAST) as a:  # type: ignore[arg-type]
        conn = await open_link("127.0.0.1", a.port, LinkConfig(name="b"), _Collect())
        conn.link.send_message(KIND_SESSION, 0, body, conn.now)
        conn.flush()
        ended = await asyncio.wait_for(conn.closed, 5)
        assert ended.code == ErrorCode.PROTOCOL_ERROR and reason in ended.reason, ended
        assert a.counters["protocol_errors"] == 1


async def test_a_sender_with_a_larger_queue_keeps_within_the_receiver_window() -> None:
    """The honest side of the window: a sender whose queue_bytes is 16 times the
    receiver's sends no more than the receiver's window ahead of its application, and
    everything arrives, once and in order, without a protocol error."""
    cost = 1000 + MESSAGE_OVERHEAD
    options: dict[str, object] = {"listen": "127.0.0.1:0", "max_message": 1024, **FAST}
    a = Mesh("a", queue_bytes=64 * cost, **options)  # type: ignore[arg-type]
    b = Mesh("b", queue_bytes=4 * cost, **options)  # type: ignore[arg-type]
    async with a, b:
        a.add_peer("b", f"127.0.0.1:{b.port}")
        b.add_peer("a", f"127.0.0.1:{a.port}")
        n = 300

        async def pump() -> None:
            for i in range(n):
                await a.send("b", b"%04d" % i + b"." * 996)

        sender = asyncio.ensure_future(pump())
        await eventually(lambda: a.peers()["b"].queued_bytes + cost > a.queue_bytes,
                         what="a's queue full")
        await asyncio.sleep(0.1)  # what was transmitted has landed
        received = b.peers()["a"].counters["received"]
        assert received * cost <= b.queue_bytes, f"b holds {received} unread messages"
        assert a.peers()["b"].state is PeerState.UP
        rb = Receiver(b)
        await asyncio.wait_for(sender, 10)
        await rb.wait(n, timeout=10)
        await rb.stop()
        assert [int(m.body[:4]) for m in rb.got] == list(range(n))
        assert b.counters["protocol_errors"] == 0 and a.counters["protocol_errors"] == 0
        assert b.peers()["a"].counters["duplicates"] == 0


# 6. (probe) docs/mesh.md: "a graceful aclose tells each peer exactly what was consumed
#    (CLOSING) ... nothing is unconfirmed" -- while the sender keeps sending.

async def test_graceful_restart_under_load_reports_nothing_unconfirmed() -> None:
    port = free_port()
    peers = {"a": "127.0.0.1:9"}
    async with Mesh("a", peers={"b": f"127.0.0.1:{port}"}, **FAST) as a:  # type: ignore[arg-type]
        b = Mesh("b", listen=f"127.0.0.1:{port}", peers=peers, **FAST)  # type: ignore[arg-type]
        await b.start()
        fa = Failures(a)
        rb = Receiver(b)
        stop = False

        async def pump() -> None:
            i = 0
            while not stop:
                await a.send("b", b"%d" % i)
                i += 1
                await asyncio.sleep(0)

        sender = asyncio.ensure_future(pump())
        await eventually(lambda: len(rb.got) > 200, what="traffic")
        await b.aclose()
        await rb.stop()
        await eventually(lambda: a.peers()["b"].state is not PeerState.UP)
        async with Mesh("b", listen=f"127.0.0.1:{port}", peers=peers,
                        **FAST) as b2:  # type: ignore[arg-type]
            rb2 = Receiver(b2)
            await eventually(lambda: len(rb2.got) > 50, what="traffic to b2")
            stop = True
            await sender
            await rb2.stop()
        await fa.stop()
        unconfirmed = [(f.unconfirmed, f.reason) for f in fa.got if f.unconfirmed]
        assert not unconfirmed, unconfirmed


# 7. A link whose SESSION never comes: the HELLO exchange completed, but the peer sends
#    no SESSION. Bad input like a handshake that never completes: the link ends with a
#    clear reason to the peer, a log line and a counter, whichever side leads the pair
#    and whether or not this node has anything to send (then nothing dials, so no
#    dialer's timeout ends it).

@pytest.mark.parametrize("name", ["a", "z"])  # "a" leads the pair with "b", "z" follows
async def test_a_link_whose_session_never_comes_is_ended_logged_and_counted(
        name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tether.mesh")
    async with Mesh(name, listen="127.0.0.1:0", peers={"b": "127.0.0.1:9"},
                    **FAST) as m:  # type: ignore[arg-type]
        events = _Collect()
        conn = await open_link("127.0.0.1", m.port, LinkConfig(name="b"), events)
        try:
            limit = m._handshake_timeout + 1.0
            await eventually(lambda: conn.link.is_closed, timeout=limit,
                             what="the link without a SESSION is ended")
            ends = [e for e in events.events if isinstance(e, LinkTerminated)]
            assert ends and ends[0].code == ErrorCode.HANDSHAKE_FAILED, ends
            assert "SESSION" in ends[0].reason, ends[0].reason
            assert m.counters["session_timeouts"] == 1, m.counters
            assert any("no SESSION" in r.getMessage() for r in caplog.records), \
                [r.getMessage() for r in caplog.records]
            assert m.peers()["b"].state is not PeerState.UP
        finally:
            conn.close()


# 6. An ACK from the peer naming messages it was never sent (beyond what is in flight)
#    dropped the messages still waiting for the window, silently: neither delivered nor
#    reported. It is bad input: only that link ends, and the messages are sent again.

async def test_an_ack_beyond_what_was_transmitted_is_a_protocol_error(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tether.mesh")
    async with Mesh("a", listen="127.0.0.1:0", peers={"b": "127.0.0.1:9"},
                    max_message=1024, **FAST) as a:  # type: ignore[arg-type]
        # "b" announces a window of one message: a's 2nd..5th wait for ACKs
        conn = await _window_of_one(a)
        try:
            for i in range(1, 6):
                await a.send("b", b"%d" % i + b"." * 999)
            info = a.peers()["b"]
            assert info.queued == 5
            conn.link.send_ack(5, conn.now)  # only MSG 1 was transmitted
            conn.flush()
            await _ended_by_protocol_error(conn, a, "ACK of MSG 5", caplog)
            # nothing was dropped on its word: the five wait for b (or a report)
            assert a.peers()["b"].queued == 5
            assert a.peers()["b"].counters["failures"] == 0
        finally:
            conn.close()


# 7. A SESSION claiming messages this node never transmitted (received/consumed beyond
#    them) made the outbox drop them as consumed: queued messages vanished, neither
#    delivered nor reported. It is bad input too.

async def test_a_session_claiming_untransmitted_messages_is_a_protocol_error(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tether.mesh")
    async with Mesh("a", listen="127.0.0.1:0", peers={"b": f"127.0.0.1:{free_port()}"},
                    **FAST) as a:  # type: ignore[arg-type]
        fa = Failures(a)
        for i in range(3):  # b is not reachable yet: they wait, never transmitted
            await a.send("b", b"%d" % i)
        conn = await open_link("127.0.0.1", a.port, LinkConfig(name="b"), _Collect())
        window = conn.link.max_payload + MESSAGE_OVERHEAD
        conn.link.send_message(KIND_SESSION, 0,
                               SessionInfo(7, a.incarnation, 3, 3, window).encode(),
                               conn.now)
        conn.flush()
        try:
            await _ended_by_protocol_error(conn, a, "SESSION says received 3", caplog)
            info = a.peers()["b"]
            assert info.queued == 3 and info.state is not PeerState.UP, info
            assert fa.got == []
        finally:
            conn.close()
            await fa.stop()


async def test_a_closing_claiming_untransmitted_messages_is_a_protocol_error(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tether.mesh")
    async with Mesh("a", listen="127.0.0.1:0", peers={"b": "127.0.0.1:9"},
                    max_message=1024, **FAST) as a:  # type: ignore[arg-type]
        fa = Failures(a)
        conn = await _window_of_one(a)
        try:
            for i in range(3):  # a window of one message: the 2nd and 3rd wait
                await a.send("b", b"%d" % i + b"." * 999)
            conn.link.send_message(KIND_CLOSING, 0, ClosingInfo(7, a.incarnation, 3).encode(),
                                   conn.now)
            conn.flush()
            await _ended_by_protocol_error(conn, a, "CLOSING says consumed 3", caplog)
            assert a.peers()["b"].queued == 3 and fa.got == []
        finally:
            conn.close()
            await fa.stop()


# 8. An ACK and the end of the link in one read (a peer that acknowledges, then closes
#    or replaces the link: its aclose sends ACK, CLOSING and GOAWAY at once): the ACK
#    opened the window and the mesh wrote to the link the GOAWAY had already closed.
#    The exception ended the read before the link's end reached the mesh: the peer
#    stayed UP on a dead link, `send` raised LocalProtocolError, nothing was delivered
#    or reported.

async def test_an_ack_then_the_end_of_the_link_in_one_read() -> None:
    async with Mesh("a", listen="127.0.0.1:0", peers={"b": "127.0.0.1:9"},
                    max_message=1024, **FAST) as a:  # type: ignore[arg-type]
        fa = Failures(a)
        conn = await _window_of_one(a)
        for i in range(3):  # a window of one message: the 2nd and 3rd wait
            await a.send("b", b"%d" % i + b"." * 999)
        conn.link.send_ack(1, conn.now)  # consumed the 1st (the window opens) ...
        conn.close("bye", ErrorCode.SHUTDOWN)  # ... and goes, in the same segment
        await eventually(lambda: a.peers()["b"].state is not PeerState.UP, timeout=2,
                         what="b down")
        assert a.peers()["b"].queued == 2
        await a.send("b", b"3")  # accepted, queued: no error
        await a.aclose()
        await asyncio.sleep(0)
        reports = fa.got
        await fa.stop()
        assert [m.body[:1] for f in reports for m in f.undelivered] == [b"1", b"2", b"3"]


@pytest.mark.parametrize("end", ["link", "flow"])
async def test_a_flow_opened_then_ended_in_one_read(end: str) -> None:
    """The same with a flow opened on the mesh link just before the link's end (or the
    flow's reset): refusing it raised (it had ended already); after the link's end the
    peer stayed UP on a dead link, after the flow's reset a healthy link was lost."""
    async with Mesh("a", listen="127.0.0.1:0", peers={"b": "127.0.0.1:9"},
                    **FAST) as a:  # type: ignore[arg-type]
        collect = _Collect()
        conn = await open_link("127.0.0.1", a.port, LinkConfig(name="b"), collect)
        window = conn.link.max_payload + MESSAGE_OVERHEAD
        conn.link.send_message(KIND_SESSION, 0,
                               SessionInfo(7, a.incarnation, 0, 0, window).encode(),
                               conn.now)
        conn.flush()
        await _session_up(a, 7)
        stream = conn.link.open_flow("x", conn.now)
        try:
            if end == "link":
                conn.close("bye", ErrorCode.SHUTDOWN)  # in the same segment
                await eventually(lambda: a.peers()["b"].state is not PeerState.UP,
                                 timeout=2, what="b down")
                await eventually(lambda: not a._conns, timeout=2, what="link forgotten")
            else:
                conn.link.reset(stream, ErrorCode.REFUSED, "changed my mind", conn.now)
                conn.flush()
                await a.send("b", b"still up")  # the link goes on
                await eventually(lambda: any(isinstance(e, MessageReceived) and
                                             e.body == b"still up" for e in collect.events),
                                 timeout=2, what="the message on the same link")
                assert not conn.link.is_closed
                assert a.peers()["b"].counters["disconnects"] == 0
        finally:
            conn.close()


async def test_a_second_session_on_a_link_is_a_protocol_error_at_the_leader() -> None:
    """The follower's second SESSION on a live link (say, another incarnation: its MSGs
    would be taken for duplicates of the first one's) was ignored without a word by the
    leader; the follower already treats the leader's second SESSION as bad input."""
    async with Mesh("a", listen="127.0.0.1:0", peers={"b": "127.0.0.1:9"},
                    **FAST) as a:  # type: ignore[arg-type]
        conn = await _raw_peer(a, 7)  # "b" > "a": a leads
        try:
            await _session_up(a, 7)
            window = conn.link.max_payload + MESSAGE_OVERHEAD
            conn.link.send_message(KIND_SESSION, 0,
                                   SessionInfo(8, a.incarnation, 0, 0, window).encode(),
                                   conn.now)
            conn.flush()
            await _ended_by_protocol_error(conn, a, "second SESSION on a link")
            assert a.peers()["b"].incarnation == 7
        finally:
            conn.close()


# 9. `send` queued the message, then waited for the socket's write buffer to drain: a
#    send cancelled (or timed out) in that wait raised, yet its message was accepted and
#    went on to be delivered; an application that sends it again (a raising call
#    accepted nothing) has it delivered twice.

async def test_a_send_cancelled_in_its_backpressure_wait_accepted_nothing() -> None:
    liveness = {**FAST, "liveness": 5.0}  # b's raw link does not read: no PONG
    async with Mesh("a", listen="127.0.0.1:0", peers={"b": "127.0.0.1:9"},
                    queue_bytes=64 << 20, **liveness) as a:  # type: ignore[arg-type]
        conn = await open_link("127.0.0.1", a.port, LinkConfig(name="b"), _Collect())
        conn.link.send_message(KIND_SESSION, 0,
                               SessionInfo(7, a.incarnation, 0, 0, 1 << 40).encode(),
                               conn.now)
        conn.flush()
        try:
            await _session_up(a, 7)
            assert conn.transport is not None
            conn.transport.pause_reading()  # b reads nothing: a's socket fills up
            accepted: list[int] = []

            async def pump() -> None:
                for i in range(10_000):
                    await a.send("b", b"%d " % i + b"." * 60_000)
                    accepted.append(i)

            task = asyncio.ensure_future(pump())
            link = a._peers["b"].link
            assert link is not None
            await eventually(lambda: link._paused, what="a's socket full")
            await asyncio.sleep(0.05)  # the pump waits for the socket
            assert not task.done()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # every message the application was told about, and no other, is a's
            assert a.peers()["b"].queued == len(accepted), (a.peers()["b"].queued,
                                                             len(accepted))
        finally:
            conn.close()


# 10. `aclose(drain=...)` cancelled (or timed out) in its drain left the mesh half
#     closed: the next `aclose` returned at once, the queued messages were never
#     reported, `failures()` never ended, links and timers stayed.

async def test_an_aclose_cancelled_in_its_drain_still_closes() -> None:
    a = Mesh("a", listen="127.0.0.1:0", peers={"b": f"127.0.0.1:{free_port()}"},
             **FAST)  # type: ignore[arg-type]
    await a.start()
    await a.send("b", b"1")
    await a.send("b", b"2")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(a.aclose(drain=5.0), 0.1)  # b never answers
    await asyncio.wait_for(a.aclose(), 2)
    reports = await asyncio.wait_for(_all_failures(a), 2)
    assert [m.body for f in reports for m in f.undelivered] == [b"1", b"2"]
    assert reports[0].reason.startswith("shutdown"), reports[0].reason
    assert not a._conns and not a._tasks


async def _all_failures(mesh: Mesh) -> list[Failure]:
    return [f async for f in mesh.failures()]
