"""InflightBound: a slow link's bytes in flight are bounded; a fast one is left alone."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest

from tether.inflight import FAST, FLOOR, InflightBound, cap_for


def test_the_cap_is_twice_the_bandwidth_delay_product_and_at_least_the_floor() -> None:
    assert cap_for(125_000, 0.0001) == FLOOR  # 1 Mbit/s over 0.1 ms: the floor
    assert cap_for(1_000_000, 0.1) == 200_000  # 1 MB/s over 100 ms: 2 x BDP
    assert cap_for(0, 1.0, floor=1) == 1


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    yield a, b
    a.close()
    b.close()


def test_a_link_measured_fast_is_not_bounded(pair: tuple[socket.socket, socket.socket]) -> None:
    bound = InflightBound(pair[0])
    bound.follow(FAST * 2)
    assert bound.cap == 0
    assert not bound.exceeded()


def test_a_link_measured_slow_is_bounded_until_the_kernel_sees_it_fast(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """A slow measurement (a transport that drained little in a long pause) sets the
    cap; on loopback the kernel's own delivery rate is far above `FAST`, so the first
    check drops it again: a link that is fast is never held back for long."""
    a, b = pair
    bound = InflightBound(a)
    bound.follow(1000.0)
    if bound.cap == 0:
        pytest.skip("no TCP_INFO here")
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
