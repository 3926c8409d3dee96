"""Framings three ways: whole, split at every byte (every two-way and every one-byte
split), with trailing data; bounds exactly at max_size; and hypothesis."""

from __future__ import annotations

from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from tether.framing import LengthPrefixed, Lines, MessageTooLarge, Raw


def feed_all(framing: Lines | LengthPrefixed | Raw, chunks: list[bytes]) -> list[bytes]:
    decoder = framing.decoder()
    out: list[bytes] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out


def splits(data: bytes) -> list[list[bytes]]:
    """The whole buffer, every cut in two, every byte alone."""
    ways = [[data]]
    ways += [[data[:i], data[i:]] for i in range(1, len(data))]
    ways.append([data[i:i + 1] for i in range(len(data))])
    return ways


MESSAGES = [b"hello", b"", b"x" * 10, b"\r", b"a\rb", b"world"]
FRAMINGS = [Lines(), Lines(b"\r\n"), Lines(b"aa"), Lines(b"abab", max_size=100),
            LengthPrefixed(1), LengthPrefixed(2), LengthPrefixed(4), LengthPrefixed(8)]


def safe(framing: Lines | LengthPrefixed, messages: list[bytes]) -> list[bytes]:
    """The messages the framing can carry."""
    out = []
    for m in messages:
        try:
            framing.encode(m)
        except LocalProtocolError:
            continue
        out.append(m)
    return out


@pytest.mark.parametrize("framing", FRAMINGS, ids=repr)
def test_every_split_at_every_byte(framing: Lines | LengthPrefixed) -> None:
    messages = safe(framing, MESSAGES)
    stream = b"".join(framing.encode(m) for m in messages)
    assert framing.encode_many(messages) == stream
    for chunks in splits(stream):
        assert feed_all(framing, chunks) == messages, chunks


@pytest.mark.parametrize("framing", FRAMINGS, ids=repr)
def test_trailing_partial_message_is_kept_for_later(framing: Lines | LengthPrefixed) -> None:
    stream = framing.encode(b"one") + framing.encode(b"two")
    decoder = framing.decoder()
    assert list(decoder.feed(stream[:-1])) == [b"one"]
    assert decoder.buffered > 0
    assert list(decoder.feed(stream[-1:])) == [b"two"]
    assert decoder.buffered == 0


def test_raw_hands_chunks_over_as_they_are() -> None:
    raw = Raw()
    assert feed_all(raw, [b"ab", b"", b"c\n"]) == [b"ab", b"c\n"]
    # a bytearray where bytes are declared: any bytes-like is taken
    assert raw.encode(cast(bytes, bytearray(b"xy"))) == b"xy"
    assert raw.encode_many([b"a", b"b"]) == b"ab"
    assert raw.decoder().buffered == 0
    assert raw.with_max_size(3) is raw and raw.max_size is None


@pytest.mark.parametrize("delimiter", [b"\n", b"\r\n", b"aa", b"abab"])
def test_lines_max_size_is_exact_at_every_split(delimiter: bytes) -> None:
    framing = Lines(delimiter, max_size=6)
    ok = b"zzzzzz" + delimiter
    for chunks in splits(ok + ok):
        assert feed_all(framing, chunks) == [b"zzzzzz"] * 2
    bad = b"first" + delimiter + b"zzzzzzz" + delimiter
    for chunks in splits(bad):
        decoder = framing.decoder()
        got: list[bytes] = []
        with pytest.raises(MessageTooLarge) as info:
            for chunk in chunks:
                got += decoder.feed(chunk)
        got += info.value.messages
        assert got == [b"first"], chunks
        assert decoder.buffered <= 6 + len(delimiter) - 1


def test_lines_never_buffers_more_than_max_size_plus_delimiter() -> None:
    framing = Lines(b"\r\n", max_size=100)
    decoder = framing.decoder()
    with pytest.raises(MessageTooLarge, match="message too large: more than 100 bytes"):
        for _ in range(1000):
            decoder.feed(b"x" * 7)
            assert decoder.buffered <= 101
    decoder = framing.decoder()
    with pytest.raises(MessageTooLarge) as info:
        decoder.feed(b"ok\r\n" + b"y" * 10_000)
    assert info.value.messages == [b"ok"]
    assert isinstance(info.value, RemoteProtocolError) and isinstance(info.value, ProtocolError)
    assert "max_size" in str(info.value)


def test_lines_refuses_a_message_that_contains_the_delimiter() -> None:
    with pytest.raises(LocalProtocolError, match="contains the delimiter"):
        Lines().encode(b"two\nlines")
    with pytest.raises(LocalProtocolError, match="contains the delimiter"):
        Lines().encode_many([b"fine", b"not\nfine"])
    with pytest.raises(LocalProtocolError):
        Lines(b"\r\n").encode_many([b"a\r\nb"])
    # a message ending with part of a self-overlapping delimiter would end early
    with pytest.raises(LocalProtocolError):
        Lines(b"aa").encode(b"xa")
    with pytest.raises(LocalProtocolError):
        Lines(b"aa").encode_many([b"ok", b"xa"])
    assert Lines(b"\r\n").encode(b"x\r") == b"x\r\r\n"
    # a memoryview where bytes are declared: any bytes-like is taken
    assert Lines().encode(cast(bytes, memoryview(b"mv"))) == b"mv\n"
    assert Lines().encode_many([]) == b""


def test_lines_trusts_only_its_own_decoded_tuples() -> None:
    framing = Lines()
    decoded = framing.decoded_type(framing.decoder().feed(b"a\nb\n"))
    assert framing.encode_many(decoded) == b"a\nb\n"
    assert Lines(b"\r\n").decoded_type is not framing.decoded_type
    assert Lines().decoded_type is framing.decoded_type  # cached per delimiter
    with pytest.raises(LocalProtocolError):
        framing.encode_many((b"a\nb",))  # a plain tuple is checked


def test_length_prefixed_bounds() -> None:
    framing = LengthPrefixed(2, max_size=5)
    assert framing.encode(b"abc") == b"\x00\x03abc"
    for chunks in splits(framing.encode(b"12345")):
        assert feed_all(framing, chunks) == [b"12345"]
    with pytest.raises(MessageTooLarge, match="6 bytes"):
        framing.decoder().feed(b"\x00\x06")  # refused as soon as the header arrives
    with pytest.raises(LocalProtocolError, match="does not fit"):
        LengthPrefixed(1).encode(b"x" * 256)
    with pytest.raises(LocalProtocolError, match="does not fit"):
        LengthPrefixed(1).encode_many([b"x" * 256])
    assert LengthPrefixed(1).max_size == 255  # clamped to what the header can say
    assert LengthPrefixed(4).with_max_size(9).max_size == 9
    decoder = framing.decoder()
    # a bytearray where bytes are declared: any bytes-like is taken
    assert decoder.feed(cast(bytes, bytearray(b"\x00\x01z\x00"))) == [b"z"]
    assert decoder.buffered == 1


@pytest.mark.parametrize("bad", [
    lambda: Lines(b""), lambda: Lines(max_size=0), lambda: LengthPrefixed(3),
    lambda: LengthPrefixed(4, max_size=-1)])
def test_bad_configurations_are_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        bad()  # type: ignore[operator]


messages_st = st.lists(st.binary(max_size=40), max_size=12)


@settings(max_examples=150, deadline=None)
@given(messages=messages_st, cuts=st.lists(st.integers(0, 600), max_size=8),
       delimiter=st.sampled_from([b"\n", b"\r\n", b"aa", b"aba", b"\x00"]))
def test_lines_round_trip_any_chunking(messages: list[bytes], cuts: list[int],
                                       delimiter: bytes) -> None:
    framing = Lines(delimiter, max_size=64)
    messages = safe(framing, messages)
    stream = framing.encode_many(messages)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert feed_all(framing, chunks) == messages


@settings(max_examples=150, deadline=None)
@given(messages=messages_st, cuts=st.lists(st.integers(0, 600), max_size=8),
       width=st.sampled_from([1, 2, 4, 8]))
def test_length_prefixed_round_trip_any_chunking(messages: list[bytes], cuts: list[int],
                                                 width: int) -> None:
    framing = LengthPrefixed(width)
    stream = framing.encode_many(messages)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert feed_all(framing, chunks) == messages


@settings(max_examples=300, deadline=None)
@given(garbage=st.lists(st.binary(max_size=64), max_size=10),
       framing=st.sampled_from([Lines(max_size=16), Lines(b"\r\n", max_size=16),
                                LengthPrefixed(1, max_size=16), LengthPrefixed(2, max_size=16)]))
def test_garbage_decodes_or_raises_the_protocol_error(garbage: list[bytes],
                                                      framing: Lines | LengthPrefixed) -> None:
    decoder = framing.decoder()
    try:
        for chunk in garbage:
            for message in decoder.feed(chunk):
                assert len(message) <= 16
            assert decoder.buffered <= 16 + 8
    except MessageTooLarge:
        pass
