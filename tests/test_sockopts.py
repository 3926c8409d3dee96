"""`tether.SocketOptions`: what a link socket gets, on a real socket and on a real link.

The retransmission-timeout cap (TCP_RTO_MAX_MS) needs Linux 6.15 or later; where the
kernel does not know the option, `apply` leaves it (and the check here skips).
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from tether.aio import LinkConnection, SocketOptions, open_link, serve_links
from tether.events import Event
from tether.link import LinkConfig

TCP_RTO_MAX_MS = 44  # <linux/tcp.h>


def _rto_max_ms(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS)


def _kernel_has_rto_max() -> bool:
    with socket.socket() as sock:
        try:
            _rto_max_ms(sock)
        except OSError:
            return False
    return True


needs_rto_max = pytest.mark.skipif(not _kernel_has_rto_max(),
                                   reason="TCP_RTO_MAX_MS needs Linux 6.15 or later")


def test_rto_max_is_validated() -> None:
    assert SocketOptions().rto_max == 1.0
    for bad in (0.5, 0.0, -1.0, 121.0, float("nan")):
        with pytest.raises(ValueError, match="rto_max"):
            SocketOptions(rto_max=bad)
    SocketOptions(rto_max=None)
    SocketOptions(rto_max=120.0)


@needs_rto_max
def test_apply_caps_the_retransmission_timeout() -> None:
    for rto_max, expected in ((1.0, 1000), (2.5, 2500), (None, None)):
        with socket.socket() as sock:
            default = _rto_max_ms(sock)
            SocketOptions(rto_max=rto_max).apply(sock)
            assert _rto_max_ms(sock) == (default if expected is None else expected)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with socket.socket(socket.AF_UNIX) as sock:
        SocketOptions().apply(sock)  # not TCP: left alone


class _Conns:
    """A link handler that keeps the connections it hears from."""

    def __init__(self) -> None:
        self.conns: list[LinkConnection] = []

    def link_event(self, conn: LinkConnection, event: Event) -> None:
        if conn not in self.conns:
            self.conns.append(conn)


@needs_rto_max
async def test_both_ends_of_a_link_get_the_options() -> None:
    handler = _Conns()
    server_conns = handler.conns
    server = await serve_links("127.0.0.1", 0, lambda: LinkConfig(name="a"), handler,
                               sockopts=SocketOptions(rto_max=3.0))
    port = server.sockets[0].getsockname()[1]
    conn = await open_link("127.0.0.1", port, LinkConfig(name="b"), _Conns())
    try:
        assert conn.transport is not None
        assert _rto_max_ms(conn.transport.get_extra_info("socket")) == 1000  # the default
        for _ in range(100):
            if server_conns:
                break
            await asyncio.sleep(0.01)
        (accepted_conn,) = server_conns
        assert accepted_conn.transport is not None
        assert _rto_max_ms(accepted_conn.transport.get_extra_info("socket")) == 3000
    finally:
        conn.transport.close()  # type: ignore[union-attr]
        for c in server_conns:
            if c.transport is not None:
                c.transport.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)
