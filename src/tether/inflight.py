"""InflightBound: how much a slow link's TCP may hold in flight.

TCP delivers in order, so a frame written to a link's socket reaches the peer only
after every byte written before it -- including bytes already sent and not yet
acknowledged. `TCP_NOTSENT_LOWAT` bounds the bytes not yet sent; nothing bounds those
in flight but the congestion controller. On a link whose bandwidth fell (a path that
was fast when the link was made, then capped), BBR keeps its old estimate for ten of
its rounds -- seconds, once the rounds are slow -- and fills the bottleneck's queue
until it drops bursts of segments: with 250-310 KB in flight at 125 kB/s, a
keepalive waited 2.5 s behind their retransmissions, long enough for a live flow with a
3 s liveness to be declared DOWN (docs/faults.md, scenario 5).

So on a link measured slow (below `fast`) whose round trip shows a standing queue
(the smoothed RTT over twice the smallest, plus 10 ms), the adapter hands the socket no
more data while the bytes in flight and unsent exceed `cap`: twice what the measured
rate carries in the path's smallest round trip, and never less than `floor` (32 KiB:
0.26 s at 1 Mbit/s). Urgent control frames still go. A path slow for another reason
-- loss over a long round trip, with no queue to keep short -- is left to its TCP:
held back there, a transfer took 19-23 s instead of 13-16 s at 20% loss. On a path
with a short round trip the floor dominates, and it bounds only the standing queue,
not the throughput: with an empty queue, `floor / min_rtt` is far above the link's
rate. The kernel's own delivery rate is read at each check, so a link that became
fast again is left to its TCP.
The bytes held are the socket's send queue, sent and unacknowledged or not yet sent
(SIOCOUTQ), counted exactly: TCP_INFO only gives the unacknowledged *segments*, and
segments times the MSS overestimates a queue of small frames many times over.
Linux only (TCP_INFO, SIOCOUTQ); elsewhere nothing is bounded.
"""

from __future__ import annotations

import socket
import struct
from typing import Final

try:
    import fcntl
    import termios
except ImportError:  # pragma: no cover - not POSIX: nothing is bounded
    fcntl = termios = None  # type: ignore[assignment]

__all__ = ["InflightBound", "cap_for"]

FAST: Final = 10 * 1024 * 1024  # bytes/s: a link faster than this is left to its TCP
FLOOR: Final = 32 * 1024
_TCP_INFO: Final = getattr(socket, "TCP_INFO", None)
# struct tcp_info (linux/tcp.h): the fields read here and their offsets
_INFO_SIZE: Final = 168
_U32: Final = struct.Struct("I")
_U64: Final = struct.Struct("Q")
_INT: Final = struct.Struct("i")
_RTT, _MIN_RTT, _DELIVERY_RATE = 68, 148, 160
# SIOCOUTQ: the same request as TIOCOUTQ on sockets (linux/sockios.h)
_SIOCOUTQ: Final = getattr(termios, "TIOCOUTQ", None)
_QUEUE_SLACK_US: Final = 10_000  # a smoothed RTT this far above twice the smallest: a queue


def cap_for(rate: float, min_rtt: float, floor: int = FLOOR) -> int:
    """The bytes a link sending `rate` bytes/s over a path whose smallest round trip is
    `min_rtt` seconds may have in flight: twice that product, at least `floor`."""
    return max(floor, int(2 * rate * min_rtt))


class InflightBound:
    """The bound of one link's socket (see the module docstring). `cap` 0: none."""

    __slots__ = ("_sock", "cap")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.cap = 0

    def _info(self) -> bytes | None:
        if _TCP_INFO is None:  # pragma: no cover - not Linux
            return None
        try:
            info: bytes = self._sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _INFO_SIZE)
        except OSError:  # the socket is going away
            return None
        return info if len(info) >= _DELIVERY_RATE + 8 else None

    def held(self) -> int | None:
        """The bytes the socket holds: sent and not yet acknowledged, or not yet sent
        (SIOCOUTQ); None if the kernel does not say."""
        if _SIOCOUTQ is None:  # pragma: no cover - not POSIX
            return None
        try:
            out = fcntl.ioctl(self._sock.fileno(), _SIOCOUTQ, bytes(_INT.size))
        except OSError:  # the socket is going away, or not Linux
            return None
        held: int = _INT.unpack(out)[0]
        return held

    def follow(self, rate: float) -> None:
        """The link was measured draining `rate` bytes/s: bound it if that is slow."""
        info = self._info() if rate < FAST else None
        self.cap = 0 if info is None else cap_for(rate, _U32.unpack_from(info, _MIN_RTT)[0] / 1e6)

    def exceeded(self) -> bool:
        """The socket holds more than `cap` bytes in flight and unsent while a queue
        stands on the path (and the kernel does not see the link as fast again: then
        the bound is dropped)."""
        if not self.cap:
            return False
        info = self._info()
        if info is None:
            return False
        if _U64.unpack_from(info, _DELIVERY_RATE)[0] >= FAST:
            self.cap = 0
            return False
        if _U32.unpack_from(info, _RTT)[0] < 2 * _U32.unpack_from(info, _MIN_RTT)[0] \
                + _QUEUE_SLACK_US:
            return False  # no standing queue to keep short: loss, or a long path
        held = self.held()
        return held is not None and held > self.cap
