"""`shutdown_write`: an edge socket's FIN leaves during the callback that sends it.

Real sockets on loopback, under both loops (conftest). The peer is a plain blocking
socket, read from inside the protocol callback: had the FIN been deferred to the end
of the callback (uvloop's `write_eof()`), the peer would read nothing there.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from tether.bridge import shutdown_write

HOST = "127.0.0.1"


class _Edge(asyncio.Protocol):
    """On b"go": writes b"reply", shuts its write side down, then (still in the same
    callback) looks at what the peer can read."""

    def __init__(self, peer: socket.socket, with_fd: bool) -> None:
        self.peer = peer
        self.with_fd = with_fd
        self.seen_in_callback = b""
        self.eof_in_callback = False
        self.lost: asyncio.Future[Exception | None] = \
            asyncio.get_running_loop().create_future()
        self.received = b""
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += data
        if data != b"go":
            return
        self.transport.write(b"reply")
        fd = self.transport.get_extra_info("socket").fileno() if self.with_fd else None
        shutdown_write(self.transport, fd)
        self.peer.settimeout(2.0)
        while True:
            chunk = self.peer.recv(100)
            if not chunk:
                self.eof_in_callback = True
                break
            self.seen_in_callback += chunk

    def eof_received(self) -> bool:
        self.eof = True
        return True  # half-close: the write side was ours to end

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@asynccontextmanager
async def _pair(with_fd: bool = False) -> AsyncIterator[tuple[asyncio.Transport, _Edge,
                                                              socket.socket]]:
    """An edge transport and its peer's plain socket; both closed at the end."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server((HOST, 0))
    peer = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    transport, edge = await loop.create_connection(lambda: _Edge(peer, with_fd), sock=ours)
    try:
        yield transport, edge, peer
    finally:
        transport.close()
        peer.close()
        await asyncio.sleep(0)


async def _until(condition: Callable[[], bool]) -> None:
    """Poll `condition` for up to 2 s (the caller asserts it)."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("with_fd", [False, True], ids=["found", "given"])
async def test_the_fin_reaches_the_peer_before_the_callback_returns(with_fd: bool) -> None:
    """With the descriptor found from the transport, or given (as a bridge does)."""
    async with _pair(with_fd) as (transport, edge, peer):
        peer.sendall(b"go")
        await _until(lambda: bool(edge.received))
        assert edge.seen_in_callback == b"reply"
        assert edge.eof_in_callback
        # the read side is untouched: the peer may still talk, and the transport hears it
        peer.sendall(b"more")
        await _until(lambda: edge.received == b"gomore")
        assert edge.received == b"gomore"
        # the peer closes too, then the edge: a clean end (no error from the transport
        # that never called shutdown(2) itself)
        peer.close()
        await asyncio.sleep(0.05)
        transport.close()
        assert await asyncio.wait_for(edge.lost, 5) is None


async def test_with_bytes_still_buffered_the_fin_follows_them() -> None:
    async with _pair() as (transport, _, peer):
        big = b"x" * (64 << 20)  # more than the kernel takes at once: the transport buffers
        transport.write(big)
        assert transport.get_write_buffer_size() > 0
        shutdown_write(transport)
        got = bytearray()
        peer.setblocking(False)
        loop = asyncio.get_running_loop()
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(peer, 1 << 20), 10)
            if not chunk:
                break
            got += chunk
        assert len(got) == len(big)


async def test_after_the_peers_fin_ours_is_sent_once_and_the_end_is_clean() -> None:
    """The usual order at an edge: the peer's FIN, then ours. One `shutdown(2)`, not
    `write_eof()` as well: a second one fails with ENOTCONN once the peer's ACK has
    closed the socket both sides shut down, and the transport takes that as fatal."""
    async with _pair() as (transport, edge, peer):
        peer.shutdown(socket.SHUT_WR)
        await _until(lambda: edge.eof)
        assert edge.eof
        shutdown_write(transport)
        peer.setblocking(False)
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(peer, 100), 2) == b""
        await asyncio.sleep(0.05)  # (uvloop's write_eof() would run here)
        peer.close()
        transport.close()
        assert await asyncio.wait_for(edge.lost, 5) is None
