"""SendQueue: a link's frames waiting for the socket, taken in turns by stream.

A link's DATA, FIN and CLOSE frames, its MSG frames and its few other link frames wait
here until the socket takes them (the urgent control frames never do: the `Link`
sends them ahead of everything). One queue would send them in the order they came:
behind a bulk flow's queued data, an interactive flow's next message waits for all
of it -- on a slow link, up to the whole queue's worth of time (`Link.queue_limit`).

So each stream has its own queue, in order (a stream's bytes, then its FIN, never
reordered), and `take` serves the streams with something queued in turns (round
robin): a stream gets at most `quantum` bytes before the next one's turn (a stream
alone takes what it likes), and a DATA frame longer than what is left of a turn is
cut in two (its rest first in that stream's line). Link frames (stream 0: HELLO,
MSG, GOAWAY) are one more queue, in their order. Across streams there is no order to
keep: each stream is its own byte stream, and a frame of one never refers to
another's.

Pieces are kept as given (`bytes` or read-only views: a DATA frame's header and
payload stay two pieces), so nothing is copied, and a turn costs a few dictionary and
deque operations whatever the number of idle streams.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from . import wire

__all__ = ["MIN_SPLIT", "QUANTUM", "SendQueue"]

QUANTUM: Final = 256 * 1024  # a turn: a stream alone is not cut; beside others, its frames are
MIN_SPLIT: Final = 4096  # a DATA frame is not cut into pieces smaller than this
_HEADER: Final = wire.HEADER.size
_DATA: Final = wire.FrameType.DATA
_MSG: Final = wire.FrameType.MSG

Piece = bytes | memoryview


class SendQueue:
    """Frames by stream, taken in turns. See the module docstring."""

    __slots__ = ("_turns", "quantum", "queues")

    def __init__(self, quantum: int = QUANTUM) -> None:
        if quantum < MIN_SPLIT:
            raise ValueError(f"quantum {quantum} is below the minimum {MIN_SPLIT}")
        self.quantum = quantum
        # each stream with something queued -> its frames' pieces, in order; callers only
        # read it (`stream in q.queues` is `stream in q` without a Python-level call: a
        # relay asks on the path of every close, see `Link.end_frame`)
        self.queues: dict[int, list[Piece]] = {}
        self._turns: deque[int] = deque()  # the streams with something queued, next first

    def __bool__(self) -> bool:
        return bool(self._turns)

    def __len__(self) -> int:
        """The number of streams with something queued."""
        return len(self._turns)

    def __contains__(self, stream: int) -> bool:
        """`stream` has something queued."""
        return stream in self.queues

    def push(self, stream: int, piece: Piece) -> None:
        """Queue one piece of a frame of `stream` (0 for link frames): a whole frame,
        or a DATA or MSG frame's header followed, in the next call, by its payload."""
        queue = self.queues.get(stream)
        if queue is None:
            self.queues[stream] = [piece]
            self._turns.append(stream)
        else:
            queue.append(piece)

    def take(self, limit: int) -> tuple[list[Piece], int]:
        """Frames of about `limit` bytes, the streams served in turns; and how many DATA
        bytes (headers included, as queued) they hold. A stream gives up its turn after
        `quantum` bytes, or when the limit is reached in its turn."""
        out: list[Piece] = []
        budget = limit
        data_taken = 0
        queues, turns = self.queues, self._turns
        while budget > 0 and turns:
            stream = turns[0]
            src = queues[stream]
            turn = budget if len(turns) == 1 else min(budget, self.quantum)  # alone: no
            used, taken = _take_from(src, turn, out)  # turns to take, no frame to cut
            data_taken += taken
            budget -= used
            turns.popleft()
            if src:
                turns.append(stream)  # its turn is over: the others go first
            else:
                del queues[stream]
        return out, data_taken

    def drop(self, stream: int) -> tuple[int, int, int]:
        """Forget what `stream` has queued (it was reset: the peer would discard it);
        returns (frames, bytes, DATA bytes as queued) dropped."""
        src = self.queues.pop(stream, None)
        if src is None:
            return 0, 0, 0
        self._turns.remove(stream)
        unpack = wire.HEADER.unpack_from
        frames = size = data = i = 0
        while i < len(src):
            ftype, _, _, length = unpack(src[i])
            two = ftype == _DATA or (ftype == _MSG and len(src[i]) < _HEADER + length)
            frames += 1
            size += _HEADER + length
            if ftype == _DATA:
                data += _HEADER + length
            i += 2 if two else 1
        return frames, size, data

    def take_all(self) -> list[Piece]:
        """Everything queued, stream after stream (each in its order)."""
        out: list[Piece] = []
        for stream in self._turns:
            out += self.queues[stream]
        self.queues.clear()
        self._turns.clear()
        return out


def _take_from(src: list[Piece], budget: int, out: list[Piece]) -> tuple[int, int]:
    """Move whole frames (a DATA frame maybe cut) from the head of `src` to `out`, up to
    about `budget` bytes; returns (bytes moved, DATA bytes moved as they were queued)."""
    unpack = wire.HEADER.unpack_from
    i, n, used, taken = 0, len(src), 0, 0
    while i < n and used < budget:
        head = src[i]
        ftype, _, stream, length = unpack(head)
        if ftype == _DATA:
            room = max(budget - used - _HEADER, MIN_SPLIT)
            if length > room:  # cut: the first part now, the rest stays first in line
                payload = memoryview(src[i + 1])
                out.append(wire.encode_data_header(stream, room))
                out.append(payload[:room])
                src[i] = wire.encode_data_header(stream, length - room)
                src[i + 1] = payload[room:]
                taken += room  # (the new header is extra: not counted as queued)
                used += _HEADER + room
                break
            out.append(head)
            out.append(src[i + 1])
            i += 2
            taken += _HEADER + length
        elif ftype == _MSG and len(head) < _HEADER + length:
            out.append(head)  # a MSG's header, then its body
            out.append(src[i + 1])
            i += 2
        else:
            out.append(head)
            i += 1
        used += _HEADER + length
    del src[:i]
    return used, taken
