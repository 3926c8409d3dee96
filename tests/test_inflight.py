"""InflightBound: a slow link's bytes in flight are bounded; a fast one is left alone."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tether.inflight import FAST, FLOOR, InflightBound, cap_for


def test_the_cap_is_twice_the_bandwidth_delay_product_and_at_least_the_floor() -> None:
    assert cap_for(125_000, 0.0001) == FLOOR  # 1 Mbit/s over 0.1 ms: the floor
    assert cap_for(1_000_000, 0.1) == 200_000  # 1 MB/s over 100 ms: 2 x BDP
    assert cap_for(0, 1.0, floor=1) == 1


def _has_tcp_info() -> bool:
    with socket.socket() as sock:
        try:
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 168)
        except (AttributeError, OSError):
            return False
    return True


# (asked of the kernel, not of `follow`: a `follow` that never bounds must fail, not skip)
needs_tcp_info = pytest.mark.skipif(not _has_tcp_info(), reason="no TCP_INFO here")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    yield a, b
    a.close()
    b.close()


@needs_tcp_info
def test_a_link_measured_fast_is_not_bounded(pair: tuple[socket.socket, socket.socket]) -> None:
    """Not even one measured slow before: a fast measurement drops its bound."""
    bound = InflightBound(pair[0])
    bound.follow(1000.0)
    assert bound.cap == FLOOR
    bound.follow(FAST * 2)
    assert bound.cap == 0
    assert not bound.exceeded()


@needs_tcp_info
def test_a_link_measured_slow_is_bounded_until_the_kernel_sees_it_fast(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A slow measurement (a transport that drained little in a long pause) sets the
    cap; on loopback the kernel's own delivery rate is far above `FAST`, so the first
    check drops it again: a link that is fast is never held back for long."""
    a, b = pair
    bound = InflightBound(a)
    bound.follow(1000.0)
    assert bound.cap == FLOOR  # loopback's round trip is microseconds: the floor
    a.setblocking(False)
    b.setblocking(False)
    sent = got = 0
    while got < 200_000:  # the kernel measures a delivery rate as the bytes are acked
        if sent < 200_000:
            with contextlib.suppress(BlockingIOError):
                sent += a.send(b"x" * (200_000 - sent))
        with contextlib.suppress(BlockingIOError):
            got += len(b.recv(1 << 20))
    assert not bound.exceeded()
    assert bound.cap == 0


_SMALL_SEGMENTS = r"""
import socket, struct, subprocess, time
from tether.inflight import InflightBound
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]
a = socket.create_connection(("127.0.0.1", port))
b, _ = listener.accept()
a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rules = ("table inet t {\n chain o {\n type filter hook output priority 0;\n"
         " tcp sport %d drop\n }\n}\n")
subprocess.run(["nft", "-f", "-"], input=(rules % port).encode(), check=True)  # b's ACKs
for _ in range(20):
    a.send(b"x" * 100)
    time.sleep(0.002)  # a segment each
info = a.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
unacked, mss = struct.unpack_from("I", info, 24)[0], struct.unpack_from("I", info, 16)[0]
print(InflightBound(a).held(), unacked, mss)
"""


def test_the_bytes_held_are_counted_exactly_not_as_segments_times_mss() -> None:
    """Twenty 100-byte segments that the peer never acknowledges (its ACKs dropped by nft,
    in a network namespace of the test's own): the socket holds 2,000 bytes, which is
    what the bound counts; TCP_INFO's unacknowledged segments times the MSS (what it
    counted before) is ~180 times that on loopback (MSS 32 KiB), ~14 times on Ethernet."""
    from hosts.rig import require_netns  # the same skip, for the same reason

    require_netns()
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", _SMALL_SEGMENTS],
                         capture_output=True, text=True, timeout=30, check=True)
    held, unacked, mss = (int(x) for x in out.stdout.split())
    assert held == 2000, out.stdout
    assert unacked * mss >= 10 * held, out.stdout  # the old estimate: far off
