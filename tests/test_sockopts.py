"""`tether.SocketOptions`: what a link socket gets, on a real socket and on a real link,
and what a relay's edge socket gets (`SocketOptions.for_edge`, on a real bridge).

The retransmission-timeout cap (TCP_RTO_MAX_MS) needs Linux 6.15 or later; where the
kernel does not know the option, `apply` leaves it (and the check here skips).
"""

from __future__ import annotations

import asyncio
import functools
import socket

import pytest

from tether.aio import LinkConnection, SocketOptions, open_link, serve_links
from tether.bridge import SocketBridge
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


def test_edge_keepalive_is_split_in_whole_seconds() -> None:
    """`for_edge(s)`: idle + 3 probes adds up to about `s`, at least 1 s each; None or
    0 turn keepalive off; none of the link-only options, and never a user timeout."""
    for seconds, idle, interval in ((60, 30, 10), (6, 3, 1), (4, 1, 1), (1, 1, 1),
                                    (600, 300, 100), (61.4, 31, 10)):
        opts = SocketOptions.for_edge(seconds)
        assert (opts.keepalive, opts.keepidle, opts.keepintvl, opts.keepcnt) == \
            (True, idle, interval, 3), seconds
        assert opts.user_timeout is None and opts.notsent_lowat is None \
            and opts.rto_max is None
    for off in (None, 0, 0.0):
        assert not SocketOptions.for_edge(off).keepalive
    longest = SocketOptions.for_edge(65533)  # what the kernel takes, and no more
    with socket.socket() as sock:
        longest.apply(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 32767
    for bad in (-1, 65534, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="keepalive"):
            SocketOptions.for_edge(bad)


async def test_both_edges_of_a_bridge_get_keepalive_and_no_user_timeout() -> None:
    """A `SocketBridge` given edge options sets them on its socket, accepted or connected:
    keepalive as configured, TCP_NODELAY, and no TCP_USER_TIMEOUT (it would abort a live
    server that keeps its window closed: see `SocketOptions.for_edge`). Without options,
    TCP_NODELAY only. The server's options are its own: both sockets it accepts get them,
    the one from a client without options included."""
    loop = asyncio.get_running_loop()
    accepted: list[SocketBridge] = []
    edge = SocketOptions.for_edge(6)
    server = await loop.create_server(
        lambda: SocketBridge(None, on_connect=accepted.append, sockopts=edge),
        "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bridges = []
    try:
        for opts in (edge, None):
            _, bridge = await loop.create_connection(
                functools.partial(SocketBridge, None, sockopts=opts), "127.0.0.1", port)
            bridges.append(bridge)
        for _ in range(100):
            if len(accepted) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(accepted) == 2, accepted
        for bridge, keepalive in ((accepted[0], True), (accepted[1], True),
                                  (bridges[0], True), (bridges[1], False)):
            assert bridge.transport is not None
            sock = bridge.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)) is keepalive
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
            if keepalive:
                assert (sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)) == (3, 1, 3)
    finally:
        for bridge in (*bridges, *accepted):
            if bridge.transport is not None:
                bridge.transport.close()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)
