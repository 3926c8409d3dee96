"""SendQueue: every frame once, each stream's in order, streams served in turns."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether import wire
from tether.sendqueue import MIN_SPLIT, SendQueue


def _push_data(q: SendQueue, stream: int, payload: bytes) -> int:
    q.push(stream, wire.encode_data_header(stream, len(payload)))
    q.push(stream, payload)
    return wire.HEADER.size + len(payload)


def _frames(pieces: list[bytes | memoryview]) -> list[wire.Frame]:
    return wire.FrameDecoder(max_payload=wire.HARD_MAX_PAYLOAD).feed(
        b"".join(bytes(p) for p in pieces))


def _data(pieces: list[bytes | memoryview]) -> list[tuple[int, bytes]]:
    """(stream, payload) of each frame, all of them DATA."""
    frames = _frames(pieces)
    assert all(isinstance(f, wire.Data) for f in frames)
    return [(f.stream, bytes(f.data)) for f in frames if isinstance(f, wire.Data)]


# one queued item: (stream, kind, size); stream 0 carries MSG frames, the others DATA/FIN
_ITEMS = st.lists(st.one_of(
    st.tuples(st.integers(1, 4), st.just("data"), st.integers(1, 300_000)),
    st.tuples(st.integers(1, 4), st.just("fin"), st.just(0)),
    st.tuples(st.just(0), st.just("msg"), st.integers(0, 3000)),
), max_size=25)


@settings(max_examples=150, deadline=None)
@given(items=_ITEMS, limits=st.lists(st.integers(-1, 400_000), min_size=1, max_size=8),
       quantum=st.integers(MIN_SPLIT, 200_000))
def test_every_frame_arrives_once_in_its_streams_order(
        items: list[tuple[int, str, int]], limits: list[int], quantum: int) -> None:
    q = SendQueue(quantum)
    sent: dict[int, list[tuple[str, bytes]]] = {}
    queued_data = 0
    for n, (stream, kind, size) in enumerate(items):
        body = bytes([n % 251]) * size
        if kind == "data":
            queued_data += _push_data(q, stream, body)
        elif kind == "fin":
            q.push(stream, wire.encode_empty(wire.FrameType.FIN, stream))
        else:
            q.push(0, wire.encode_msg_header(7, n, size))
            if size:
                q.push(0, body)
        sent.setdefault(stream, []).append((kind, body))
    out: list[bytes | memoryview] = []
    taken = 0
    for i in range(10_000):
        if not q:
            break
        pieces, data = q.take(limits[i % len(limits)] if i < 50 else 1 << 20)
        out += pieces
        taken += data
    assert not q and len(q) == 0
    assert taken == queued_data  # the DATA bytes as queued, however they were cut
    got: dict[int, list[tuple[str, bytes]]] = {}
    for f in _frames(out):
        if isinstance(f, wire.Data):
            line = got.setdefault(f.stream, [])
            if line and line[-1][0] == "data":  # a frame cut in two: join its pieces
                line[-1] = ("data", line[-1][1] + bytes(f.data))
            else:
                line.append(("data", bytes(f.data)))
        elif isinstance(f, wire.Fin):
            got.setdefault(f.stream, []).append(("fin", b""))
        else:
            assert isinstance(f, wire.Msg)
            got.setdefault(0, []).append(("msg", f.body))
    # consecutive DATA frames of a stream are one byte stream: compare them joined
    assert {s: _joined(v) for s, v in got.items()} == {s: _joined(v) for s, v in sent.items()}


def _joined(line: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for kind, body in line:
        if kind == "data" and out and out[-1][0] == "data":
            out[-1] = ("data", out[-1][1] + body)
        else:
            out.append((kind, body))
    return out


def test_a_small_frame_waits_for_one_turn_of_a_bulk_stream_not_for_its_queue() -> None:
    q = SendQueue()
    for _ in range(4):
        _push_data(q, 1, b"b" * 256 * 1024)  # 1 MiB of bulk data queued first
    _push_data(q, 3, b"ping")
    first, _ = q.take(16 * 1024)
    assert {stream for stream, _ in _data(first)} == {1}  # the bulk stream's turn
    second, _ = q.take(16 * 1024)
    assert _data(second)[0] == (3, b"ping")


def test_a_turn_ends_after_the_quantum() -> None:
    q = SendQueue(quantum=8192)  # two streams: turns of 8 KiB
    _push_data(q, 1, b"a" * 20_000)
    _push_data(q, 3, b"c" * 20_000)
    pieces, _ = q.take(1 << 20)
    order = [(stream, len(data)) for stream, data in _data(pieces)]
    assert order[:4] == [(1, 8192 - wire.HEADER.size), (3, 8192 - wire.HEADER.size),
                         (1, 8192 - wire.HEADER.size), (3, 8192 - wire.HEADER.size)]
    assert sum(n for s, n in order if s == 1) == sum(n for s, n in order if s == 3) == 20_000


def test_take_all_empties_the_queue_stream_by_stream() -> None:
    q = SendQueue()
    _push_data(q, 1, b"one")
    _push_data(q, 3, b"three")
    q.push(1, wire.encode_empty(wire.FrameType.FIN, 1))
    frames = _frames(q.take_all())
    assert frames == [wire.Data(1, b"one"), wire.Fin(1), wire.Data(3, b"three")]
    assert not q


def test_a_quantum_below_the_smallest_cut_is_refused() -> None:
    with pytest.raises(ValueError, match="quantum"):
        SendQueue(quantum=MIN_SPLIT - 1)


@settings(max_examples=150, deadline=None)
@given(items=_ITEMS, first=st.integers(-1, 400_000), victim=st.integers(0, 4))
def test_drop_forgets_one_stream_and_counts_exactly_what_it_held(
        items: list[tuple[int, str, int]], first: int, victim: int) -> None:
    """After any pushes and one take (which may cut a frame), `drop(stream)` returns
    the frames, bytes and DATA bytes that stream still held -- what `take_all` would
    have written for it -- and the other streams' frames are untouched."""
    q, twin = SendQueue(MIN_SPLIT), SendQueue(MIN_SPLIT)
    for n, (stream, kind, size) in enumerate(items):
        for queue in (q, twin):
            if kind == "data":
                _push_data(queue, stream, bytes([n % 251]) * size)
            elif kind == "fin":
                queue.push(stream, wire.encode_empty(wire.FrameType.FIN, stream))
            else:
                queue.push(0, wire.encode_msg_header(7, n, size))
                if size:
                    queue.push(0, bytes(size))
    q.take(first)
    twin.take(first)
    held = _frames(twin.take_all())
    mine = [f for f in held if getattr(f, "stream", 0) == victim]  # (MSG: stream 0)
    assert (victim in q) == bool(mine)
    frames, size, data = q.drop(victim)
    raw = [wire.encode(f) for f in mine]
    assert (frames, size) == (len(mine), sum(len(r) for r in raw))
    assert data == sum(len(r) for r, f in zip(raw, mine, strict=True)
                       if isinstance(f, wire.Data))
    assert victim not in q and q.drop(victim) == (0, 0, 0)
    assert _frames(q.take_all()) == [f for f in held if f not in mine]
