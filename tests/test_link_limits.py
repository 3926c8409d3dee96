"""`max_links`: a listening Node or a Gateway holds at most so many links (those in
their handshake included); one more is refused as it is accepted -- told why in a
GOAWAY (REFUSED) once its HELLO is read, or reset if it says nothing in time or too
many wait already -- logged and counted. Real sockets, real nodes dialling in."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

import tether
import tether.aio
from tether import wire
from tether.errors import ErrorCode, HandshakeError

BOUND = 5.0  # a wait that ends at once when the code works


async def test_a_listening_node_refuses_links_over_max_links(
        caplog: pytest.LogCaptureFixture) -> None:
    server = tether.Node("srv", listen="127.0.0.1:0", max_links=1)
    await server.start()
    address = f"127.0.0.1:{server.port}"
    first, second, third = (tether.Node(n, gateway=address) for n in ("a", "b", "c"))
    try:
        async with asyncio.timeout(BOUND):
            await first.start()
            with caplog.at_level(logging.WARNING, logger="tether.node"), \
                    pytest.raises(HandshakeError, match=r"^peer refused the handshake: node "
                                  r"srv is at its limit of 1 link\(s\)$") as refused:
                await second.start()
        assert refused.value.code == ErrorCode.REFUSED
        assert server.stats()["links_over_limit"] == 1
        assert "node srv: link from 127.0.0.1:" in caplog.text
        assert "1 link(s) open or in their handshake, at the limit (max_links 1)" \
            in caplog.text
        await first.aclose()
        async with asyncio.timeout(BOUND):
            while server.stats()["links"]:
                await asyncio.sleep(0.01)
            await third.start()
        assert third.linked
    finally:
        for node in (first, second, third, server):
            await node.aclose()


async def test_a_gateway_refuses_links_over_max_links() -> None:
    gw = tether.Gateway("127.0.0.1:0", name="gw", max_links=2)
    await gw.start()
    address = f"127.0.0.1:{gw.port}"
    nodes = [tether.Node(f"n{i}", gateway=address) for i in range(3)]
    try:
        async with asyncio.timeout(BOUND):
            await nodes[0].start()
            await nodes[1].start()
            with pytest.raises(HandshakeError, match=r"gateway gw is at its limit of 2 "
                               r"link\(s\) \(--max-links\)") as refused:
                await nodes[2].start()
        assert refused.value.code == ErrorCode.REFUSED
        stats = gw.stats()
        assert (stats["links"], stats["max_links"], stats["links_over_limit"],
                stats["links_refused"]) == (2, 2, 1, 1), stats
    finally:
        for node in nodes:
            await node.aclose()
        await gw.aclose()


async def _answer(sock: socket.socket, timeout: float = BOUND) -> bytes | str:
    """All `sock` reads until its end: the bytes, or "reset"."""
    loop = asyncio.get_running_loop()
    got = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await loop.sock_recv(sock, 4096):
                got += chunk
    except ConnectionResetError:
        return "reset"
    return got


async def _connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_a_refused_dialler_is_told_after_its_hello_and_a_silent_one_reset(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At the limit, raw connections: one that sends bytes (anything, or a HELLO, also in
    two pieces) reads one GOAWAY with code REFUSED and the reason, then EOF (not a
    reset, which would drop the GOAWAY unread); one that sends nothing is reset after
    REFUSAL_WAIT; with REFUSALS_TOLD (here 2) waiting already, the next is reset at
    once."""
    monkeypatch.setattr(tether.aio, "REFUSAL_WAIT", 0.3)
    monkeypatch.setattr(tether.aio, "REFUSALS_TOLD", 2)
    server = tether.Node("srv", listen="127.0.0.1:0", max_links=1)
    await server.start()
    first = tether.Node("a", gateway=f"127.0.0.1:{server.port}")
    socks: list[socket.socket] = []
    try:
        await first.start()
        loop = asyncio.get_running_loop()
        refusal = [wire.GoAway(last_stream=0, code=ErrorCode.REFUSED,
                               reason="node srv is at its limit of 1 link(s)")]
        talker = await _connect(server.port)
        socks.append(talker)
        await loop.sock_sendall(talker, b"hello, anyone?")
        answer = await _answer(talker)
        assert isinstance(answer, bytes)
        assert wire.FrameDecoder().feed(answer) == refusal
        # a HELLO in two pieces, 0.1 s apart, is read whole before the answer: a close
        # with its second piece unread is a reset, which drops what the kernel still
        # queues to send (on loopback the GOAWAY has left by then: the answer at the
        # first piece passed this too; over a slow network it need not have)
        hello = wire.encode(wire.Hello(name="late", token=b"t" * 100))
        split = await _connect(server.port)
        socks.append(split)
        await loop.sock_sendall(split, hello[:20])
        await asyncio.sleep(0.1)
        await loop.sock_sendall(split, hello[20:])
        answer = await _answer(split)
        assert isinstance(answer, bytes)
        assert wire.FrameDecoder().feed(answer) == refusal
        silent = [await _connect(server.port) for _ in range(2)]
        socks += silent
        await asyncio.sleep(0.05)  # (both accepted: they wait)
        started = loop.time()
        extra = await _connect(server.port)
        socks.append(extra)
        assert await _answer(extra) == "reset"
        assert loop.time() - started < 0.25  # at once, not after REFUSAL_WAIT
        assert [await _answer(s) for s in silent] == ["reset", "reset"]
        assert loop.time() - started >= 0.2
        assert server.stats()["links_over_limit"] == 5
        assert server.stats()["links"] == 1
    finally:
        for s in socks:
            s.close()
        await first.aclose()
        await server.aclose()


def test_max_links_is_checked() -> None:
    with pytest.raises(ValueError, match="max_links must be 1 or more"):
        tether.Node("n", listen="127.0.0.1:0", max_links=0)
    with pytest.raises(ValueError, match="max_links must be 1 or more"):
        tether.Gateway("127.0.0.1:0", max_links=0)
