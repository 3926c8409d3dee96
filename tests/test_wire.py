"""The frame codec (tether.wire) against docs/protocol.md.

Round trips are checked three ways and more (whole buffer, one byte at a time, arbitrary
splits, a partial next frame kept buffered, many frames in one chunk), layouts byte for
byte against hand-written bytes, and every decoder error rule with its message.
"""

from __future__ import annotations

import itertools
import struct
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether import wire
from tether.errors import ErrorCode, ProtocolError
from tether.wire import (
    CONTROL_PAYLOAD_MAX,
    DEFAULT_MAX_PAYLOAD,
    HARD_MAX_PAYLOAD,
    Ack,
    Close,
    Data,
    Fin,
    Frame,
    FrameDecoder,
    FrameType,
    GoAway,
    Hello,
    KeepAlive,
    Msg,
    Open,
    OpenErr,
    OpenOk,
    Ping,
    Pong,
    Reset,
    Window,
    encode,
)

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
STREAM = st.integers(1, 0xFFFFFFFF)
# at most 4 bytes a character: 63 characters always fit in the 255-byte limit
NAME = st.text(st.characters(codec="utf-8"), max_size=63)
REASON = st.text(st.characters(codec="utf-8"), max_size=200)

FRAMES: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Hello, name=NAME, token=st.binary(max_size=1024), version=st.just(1),
              max_payload=st.integers(1024, 0xFFFFFFFF), heartbeat_ms=U32, options=U16),
    st.builds(Open, stream=STREAM, service=NAME, liveness_ms=U64, window=U32, mode=U8,
              origin=NAME),
    st.builds(OpenOk, stream=STREAM, window=U32),
    st.builds(OpenErr, stream=STREAM, code=U16, reason=REASON),
    st.builds(Data, stream=STREAM, data=st.binary(max_size=600)),
    st.builds(Fin, stream=STREAM),
    st.builds(Close, stream=STREAM),
    st.builds(Reset, stream=STREAM, code=U16, reason=REASON),
    st.builds(Window, stream=STREAM, increment=st.integers(1, 0xFFFFFFFF)),
    st.builds(KeepAlive, stream=STREAM),
    st.builds(Ping, opaque=U64),
    st.builds(Pong, opaque=U64),
    st.builds(Msg, kind=U16, seq=U64, body=st.binary(max_size=600)),
    st.builds(Ack, seq=U64),
    st.builds(GoAway, last_stream=U32, code=U16, reason=REASON),
)

LINK_TYPES = {"HELLO": 0x01, "PING": 0x0B, "PONG": 0x0C, "MSG": 0x0D, "ACK": 0x0E,
              "GOAWAY": 0x0F}
FLOW_TYPES = {"OPEN": 0x02, "OPEN_OK": 0x03, "OPEN_ERR": 0x04, "DATA": 0x05, "FIN": 0x06,
              "CLOSE": 0x07, "RESET": 0x08, "WINDOW": 0x09, "KEEPALIVE": 0x0A}
CONTROL_TYPES = {k: v for k, v in {**LINK_TYPES, **FLOW_TYPES}.items()
                 if k not in ("DATA", "MSG")}


def hdr(ftype: int, stream: int, length: int, flags: int = 0) -> bytes:
    """A frame header, written from the spec (not from wire.HEADER)."""
    return struct.pack(">BBII", ftype, flags, stream, length)


def frame(ftype: int, stream: int, payload: bytes) -> bytes:
    return hdr(ftype, stream, len(payload)) + payload


def max_buffered(dec: FrameDecoder) -> int:
    """One header plus the largest payload the decoder accepts (docs/protocol.md §4)."""
    return 10 + max(dec.max_payload + 10, CONTROL_PAYLOAD_MAX)


def feed_chunks(dec: FrameDecoder, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out += dec.feed(chunk)
        assert dec.buffered < max_buffered(dec)
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def expect_error(data: bytes, fragment: str, *, dec: FrameDecoder | None = None,
                 code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> ProtocolError:
    dec = dec or FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        dec.feed(data)
    assert fragment in str(info.value)
    assert info.value.code == code
    return info.value


# ---------------------------------------------------------------------------------------
# Round trips


@FAST
@given(FRAMES)
def test_round_trip_whole_buffer(f: Frame) -> None:
    dec = FrameDecoder()
    assert dec.feed(encode(f)) == [f]
    assert dec.buffered == 0


@FAST
@given(FRAMES)
def test_round_trip_one_byte_at_a_time(f: Frame) -> None:
    data = encode(f)
    dec = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(data)):
        got = dec.feed(data[i:i + 1])
        if i < len(data) - 1:
            assert got == []
            assert dec.buffered == i + 1
        out += got
    assert out == [f]
    assert dec.buffered == 0


@FAST
@given(st.lists(FRAMES, min_size=1, max_size=8), st.lists(st.integers(0, 20000), max_size=30))
def test_round_trip_random_splits(frames: list[Frame], cuts: list[int]) -> None:
    data = b"".join(encode(f) for f in frames)
    dec = FrameDecoder()
    assert feed_chunks(dec, split_at(data, cuts)) == frames
    assert dec.buffered == 0


@FAST
@given(FRAMES, FRAMES, st.data())
def test_round_trip_keeps_partial_next_frame(f1: Frame, f2: Frame, data: st.DataObject) -> None:
    second = encode(f2)
    k = data.draw(st.integers(1, len(second) - 1), label="partial")
    dec = FrameDecoder()
    assert dec.feed(encode(f1) + second[:k]) == [f1]
    assert dec.buffered == k
    assert dec.feed(second[k:]) == [f2]
    assert dec.buffered == 0


@FAST
@given(st.lists(FRAMES, min_size=2, max_size=40))
def test_round_trip_many_frames_in_one_chunk(frames: list[Frame]) -> None:
    dec = FrameDecoder()
    assert dec.feed(b"".join(encode(f) for f in frames)) == frames
    assert dec.buffered == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_feed_accepts_any_buffer(kind: type) -> None:
    data = encode(Ping(opaque=7)) + encode(Data(stream=3, data=b"xyz"))
    dec = FrameDecoder()
    assert dec.feed(kind(data[:5])) == []
    assert dec.feed(kind(data[5:])) == [Ping(opaque=7), Data(stream=3, data=b"xyz")]
    assert dec.feed(kind(b"")) == []


def test_decoded_frames_are_independent_of_fed_buffer() -> None:
    buf = bytearray(encode(Data(stream=1, data=b"abc")))
    (got,) = FrameDecoder().feed(buf)
    buf[-3:] = b"zzz"
    assert got == Data(stream=1, data=b"abc")


def test_encode_data_header_matches_encode() -> None:
    assert wire.encode_data_header(9, 3) + b"abc" == encode(Data(stream=9, data=b"abc"))


@pytest.mark.parametrize("cls", [Fin, Close, KeepAlive])
def test_encode_empty_matches_encode(cls: type[Fin | Close | KeepAlive]) -> None:
    assert wire.encode_empty(cls.TYPE, 77) == encode(cls(stream=77))


def test_at_boundary_is_false_while_a_frame_is_incomplete() -> None:
    d = FrameDecoder(split_data=True)
    assert d.at_boundary()
    d.feed(encode(Fin(stream=3))[:4])
    assert not d.at_boundary()  # half a header held
    d.feed(encode(Fin(stream=3))[4:])
    assert d.at_boundary()
    d.feed(encode(Data(stream=3, data=b"x" * 100))[:50])
    assert not d.at_boundary()  # a DATA payload still arriving (cut-through)
    d.feed(b"x" * 60)
    assert d.at_boundary()
    with pytest.raises(ProtocolError):
        d.feed(b"\xff" * 10)
    assert not d.at_boundary()  # broken for good


def test_flags_are_ignored_on_receipt() -> None:
    data = bytearray(encode(Window(stream=5, increment=100)))
    data[1] = 0xFF
    assert FrameDecoder().feed(bytes(data)) == [Window(stream=5, increment=100)]


# ---------------------------------------------------------------------------------------
# Byte-exact layouts (docs/protocol.md §3 and §7)

LAYOUTS: list[tuple[Frame, str]] = [
    (Hello(name="gw1", token=b"s3cret", heartbeat_ms=5000),
     "01 00 00000000 0000001c  54544852 0001 0000 00010000 00001388 03 677731"
     " 0006 733363726574"),
    (Hello(name="", max_payload=1024, options=0x0102),
     "01 00 00000000 00000013  54544852 0001 0102 00000400 00000000 00 0000"),
    (Open(stream=1, service="web", liveness_ms=1500, window=65536, mode=1, origin="cli"),
     "02 00 00000001 00000015  00000000000005dc 00010000 01 03 776562 03 636c69"),
    (OpenOk(stream=2, window=0x1234), "03 00 00000002 00000004  00001234"),
    (OpenErr(stream=3, code=ErrorCode.NO_SUCH_SERVICE, reason="no"),
     "04 00 00000003 00000004  0007 6e6f"),
    (Data(stream=0xFFFFFFFF, data=b"hi"), "05 00 ffffffff 00000002  6869"),
    (Data(stream=1, data=b""), "05 00 00000001 00000000"),
    (Fin(stream=4), "06 00 00000004 00000000"),
    (Close(stream=5), "07 00 00000005 00000000"),
    (Reset(stream=6, code=ErrorCode.FLOW_CONTROL, reason=""), "08 00 00000006 00000002  000b"),
    (Window(stream=7, increment=1), "09 00 00000007 00000004  00000001"),
    (KeepAlive(stream=8), "0a 00 00000008 00000000"),
    (Ping(opaque=0x0102030405060708), "0b 00 00000000 00000008  0102030405060708"),
    (Pong(opaque=0xFFFFFFFFFFFFFFFF), "0c 00 00000000 00000008  ffffffffffffffff"),
    (Msg(kind=2, seq=3, body=b"ab"), "0d 00 00000000 0000000c  0002 0000000000000003 6162"),
    (Ack(seq=258), "0e 00 00000000 00000008  0000000000000102"),
    (GoAway(last_stream=9, code=ErrorCode.SHUTDOWN, reason="bye"),
     "0f 00 00000000 00000009  00000009 000e 627965"),
]


@pytest.mark.parametrize(("f", "expected"), LAYOUTS, ids=lambda v: type(v).__name__)
def test_byte_exact_layout(f: Frame, expected: str) -> None:
    raw = bytes.fromhex(expected)
    assert encode(f) == raw
    assert FrameDecoder().feed(raw) == [f]


def test_type_codes_match_spec() -> None:
    for name, code in {**LINK_TYPES, **FLOW_TYPES}.items():
        assert getattr(FrameType, name) == code
        assert wire.frame_name(code) == name
    assert wire.frame_name(0x7F) == "0x7f"
    classes: list[type[Frame]] = [Hello, Open, OpenOk, OpenErr, Data, Fin, Close, Reset,
                                  Window, KeepAlive, Ping, Pong, Msg, Ack, GoAway]
    assert [c.TYPE for c in classes] == list(range(1, 16))
    assert {c.TYPE for c in classes if c.LINK_FRAME} == set(LINK_TYPES.values())


def test_limits_match_spec() -> None:
    assert wire.MAGIC == b"TTHR"
    assert wire.PROTOCOL_VERSION == 1
    assert DEFAULT_MAX_PAYLOAD == 64 * 1024
    assert HARD_MAX_PAYLOAD == 16 * 1024 * 1024
    assert CONTROL_PAYLOAD_MAX == 4096
    assert wire.HEADER.size == 10


def test_error_codes_match_spec() -> None:
    names = ["NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CLOSED", "FLOW_DOWN",
             "FLOW_PEER", "RESET", "NO_SUCH_SERVICE", "HANDSHAKE_FAILED", "BAD_TOKEN",
             "VERSION_MISMATCH", "FLOW_CONTROL", "FRAME_TOO_LARGE", "REFUSED", "SHUTDOWN",
             "SLOW_CONSUMER", "UNREACHABLE", "DENIED"]
    assert [(c.name, c.value) for c in ErrorCode] == [(n, i) for i, n in enumerate(names)]


# ---------------------------------------------------------------------------------------
# Decoder errors (docs/protocol.md §5.1)


@pytest.mark.parametrize("ftype", [0x00, 0x10, 0x7F, 0xFF])
def test_unknown_type(ftype: int) -> None:
    expect_error(hdr(ftype, 0, 0), f"unknown frame type 0x{ftype:02x}")


def test_data_on_stream_0() -> None:
    dec = FrameDecoder()
    expect_error(hdr(0x05, 0, 3), "DATA frame on stream 0", dec=dec)  # header alone
    expect_error(frame(0x05, 0, b"abc"), "DATA frame on stream 0")


@pytest.mark.parametrize(("name", "ftype"), LINK_TYPES.items())
def test_link_frame_on_nonzero_stream(name: str, ftype: int) -> None:
    expect_error(hdr(ftype, 7, 0), f"{name} frame on stream 7, must be stream 0")


@pytest.mark.parametrize(("name", "ftype"), FLOW_TYPES.items())
def test_flow_frame_on_stream_0(name: str, ftype: int) -> None:
    expect_error(hdr(ftype, 0, 0), f"{name} frame on stream 0")


@pytest.mark.parametrize("max_payload", [1024, DEFAULT_MAX_PAYLOAD, HARD_MAX_PAYLOAD])
def test_data_length_limit(max_payload: int) -> None:
    dec = FrameDecoder(max_payload=max_payload)
    assert dec.feed(hdr(0x05, 1, max_payload)) == []  # exactly the limit: waits for payload
    expect_error(hdr(0x05, 1, max_payload + 1),
                 f"DATA payload of {max_payload + 1} bytes exceeds the maximum {max_payload}",
                 dec=FrameDecoder(max_payload=max_payload), code=ErrorCode.FRAME_TOO_LARGE)


def test_data_at_limit_decodes() -> None:
    dec = FrameDecoder(max_payload=1024)
    assert dec.feed(frame(0x05, 1, bytes(1024))) == [Data(stream=1, data=bytes(1024))]


def test_msg_length_limit() -> None:
    dec = FrameDecoder(max_payload=1024)
    body = bytes(1024)
    assert dec.feed(encode(Msg(kind=1, seq=1, body=body))) == [Msg(kind=1, seq=1, body=body)]
    expect_error(hdr(0x0D, 0, 1035), "MSG payload of 1035 bytes exceeds the maximum 1034",
                 dec=FrameDecoder(max_payload=1024), code=ErrorCode.FRAME_TOO_LARGE)


@pytest.mark.parametrize(("name", "ftype"), CONTROL_TYPES.items())
def test_control_length_limit(name: str, ftype: int) -> None:
    stream = 0 if name in LINK_TYPES else 1
    dec = FrameDecoder(max_payload=HARD_MAX_PAYLOAD)  # the control cap does not follow it
    assert dec.feed(hdr(ftype, stream, 4096)) == []
    expect_error(hdr(ftype, stream, 4097), f"{name} payload of 4097 bytes exceeds the maximum 4096",
                 dec=FrameDecoder(max_payload=HARD_MAX_PAYLOAD),
                 code=ErrorCode.FRAME_TOO_LARGE)


def test_max_payload_can_change_between_frames() -> None:
    dec = FrameDecoder()
    dec.max_payload = 2048
    assert dec.max_payload == 2048
    assert dec.feed(frame(0x05, 1, bytes(2048))) == [Data(stream=1, data=bytes(2048))]
    dec.max_payload = 1024
    expect_error(hdr(0x05, 1, 2048), "exceeds the maximum 1024", dec=dec,
                 code=ErrorCode.FRAME_TOO_LARGE)


@pytest.mark.parametrize("ftype", sorted({**LINK_TYPES, **FLOW_TYPES}.values()))
@pytest.mark.parametrize("length", [0xFFFFFFFF, HARD_MAX_PAYLOAD + 1])
def test_huge_length_raises_from_header_alone(ftype: int, length: int) -> None:
    stream = 0 if ftype in LINK_TYPES.values() else 1
    head = hdr(ftype, stream, length)
    dec = FrameDecoder()
    for i in range(9):
        assert dec.feed(head[i:i + 1]) == []
        assert dec.buffered == i + 1
    with pytest.raises(ProtocolError, match="exceeds the maximum") as info:
        dec.feed(head[9:] + b"\0" * 100)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert dec.buffered == 0


# Valid payloads, to truncate or extend: (name, type, stream, payload, fixed part size).
VALID_PAYLOADS = [
    ("HELLO", 0x01, 0, encode(Hello(name="n", token=b"t"))[10:]),
    ("OPEN", 0x02, 1, encode(Open(stream=1, service="s", origin="o"))[10:]),
    ("OPEN_OK", 0x03, 1, bytes(4)),
    ("OPEN_ERR", 0x04, 1, b"\x00\x01"),
    ("RESET", 0x08, 1, b"\x00\x01"),
    ("WINDOW", 0x09, 1, b"\x00\x00\x00\x01"),
    ("PING", 0x0B, 0, bytes(8)),
    ("PONG", 0x0C, 0, bytes(8)),
    ("MSG", 0x0D, 0, bytes(10)),
    ("ACK", 0x0E, 0, bytes(8)),
    ("GOAWAY", 0x0F, 0, bytes(6)),
]


@pytest.mark.parametrize(("name", "ftype", "stream", "payload"), VALID_PAYLOADS,
                         ids=[v[0] for v in VALID_PAYLOADS])
def test_truncated_control_payloads(name: str, ftype: int, stream: int, payload: bytes) -> None:
    assert FrameDecoder().feed(frame(ftype, stream, payload)) != []
    for cut in range(len(payload)):
        expect_error(frame(ftype, stream, payload[:cut]), f"truncated {name} payload: need ")


def test_truncated_length_prefixed_fields() -> None:
    fixed = bytes.fromhex("54544852 0001 0000 00010000 00000000")
    expect_error(frame(0x01, 0, fixed + b"\x05ab"),
                 "truncated HELLO payload: need 22 bytes, got 19")
    expect_error(frame(0x01, 0, fixed + b"\x00\x00"), "truncated HELLO payload: need 19 bytes")
    expect_error(frame(0x01, 0, fixed + b"\x00\x00\x09x"), "truncated HELLO payload: need 28")
    open_fixed = bytes(13)
    expect_error(frame(0x02, 1, open_fixed + b"\x03ab"), "truncated OPEN payload: need 17")
    expect_error(frame(0x02, 1, open_fixed + b"\x00"), "truncated OPEN payload: need 15")
    expect_error(frame(0x02, 1, open_fixed + b"\x00\x02a"), "truncated OPEN payload: need 17")


TRAILING = [
    ("HELLO", 0x01, 0, encode(Hello(name="n"))[10:]),
    ("OPEN", 0x02, 1, encode(Open(stream=1, service="s"))[10:]),
    ("OPEN_OK", 0x03, 1, bytes(4)),
    ("FIN", 0x06, 1, b""),
    ("CLOSE", 0x07, 1, b""),
    ("WINDOW", 0x09, 1, b"\x00\x00\x00\x01"),
    ("KEEPALIVE", 0x0A, 1, b""),
    ("PING", 0x0B, 0, bytes(8)),
    ("PONG", 0x0C, 0, bytes(8)),
    ("ACK", 0x0E, 0, bytes(8)),
]


@pytest.mark.parametrize(("name", "ftype", "stream", "payload"), TRAILING,
                         ids=[v[0] for v in TRAILING])
def test_trailing_bytes_in_fixed_size_frames(name: str, ftype: int, stream: int,
                                             payload: bytes) -> None:
    expect_error(frame(ftype, stream, payload + b"x"),
                 f"{name} payload has 1 unexpected trailing bytes")
    expect_error(frame(ftype, stream, payload + b"xyz"),
                 f"{name} payload has 3 unexpected trailing bytes")


def test_bad_magic() -> None:
    raw = bytearray(encode(Hello(name="a")))
    raw[10:14] = b"HTTP"
    expect_error(bytes(raw), "bad magic b'HTTP' in HELLO (expected b'TTHR'): not a tether peer")


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_bad_version(version: int) -> None:
    err = expect_error(encode(Hello(name="a", version=version)),
                       f"protocol version {version} not supported (this side speaks [1])",
                       code=ErrorCode.VERSION_MISMATCH)
    assert err.reason == str(err)


def test_bad_version_is_reported_before_the_rest_of_hello_is_parsed() -> None:
    # a future version may lay out the rest of HELLO differently
    payload = bytes.fromhex("54544852 0002 0000 00010000 00000000") + b"\xff anything"
    expect_error(frame(0x01, 0, payload), "protocol version 2", code=ErrorCode.VERSION_MISMATCH)


def test_hello_max_payload_minimum() -> None:
    assert FrameDecoder().feed(encode(Hello(name="a", max_payload=1024)))
    raw = frame(0x01, 0, bytes.fromhex("54544852 0001 0000 000003ff 00000000 01 61 0000"))
    expect_error(raw, "HELLO max_payload 1023 is below the minimum 1024")
    with pytest.raises(ValueError, match="below the minimum"):
        encode(Hello(name="a", max_payload=1023))


BAD_UTF8 = b"\xff\xfe"
INVALID_TEXT = [
    ("HELLO node name", frame(0x01, 0, bytes.fromhex("54544852 0001 0000 00010000 00000000")
                              + b"\x02" + BAD_UTF8 + b"\x00\x00")),
    ("OPEN service name", frame(0x02, 1, bytes(13) + b"\x02" + BAD_UTF8 + b"\x00")),
    ("OPEN origin name", frame(0x02, 1, bytes(13) + b"\x00\x02" + BAD_UTF8)),
    ("OPEN_ERR reason", frame(0x04, 1, b"\x00\x07" + BAD_UTF8)),
    ("RESET reason", frame(0x08, 1, b"\x00\x06" + b"ok\xc3")),
    ("GOAWAY reason", frame(0x0F, 0, bytes(6) + b"\xed\xa0\x80")),  # a UTF-8 surrogate
]


@pytest.mark.parametrize(("what", "raw"), INVALID_TEXT, ids=[v[0] for v in INVALID_TEXT])
def test_invalid_utf8(what: str, raw: bytes) -> None:
    expect_error(raw, f"{what} is not valid UTF-8: ")


def test_window_increment_zero() -> None:
    expect_error(frame(0x09, 1, bytes(4)), "WINDOW increment of 0")


def test_error_is_sticky() -> None:
    dec = FrameDecoder()
    first = expect_error(hdr(0x05, 0, 1), "DATA frame on stream 0", dec=dec)
    assert dec.buffered == 0
    for later in [b"", encode(Ping(opaque=1)), b"\x00"]:
        with pytest.raises(ProtocolError) as info:
            dec.feed(later)
        assert info.value is first


def test_frames_before_the_error_in_the_same_chunk_are_lost_with_it() -> None:
    # documented behaviour: feed raises, the link is ended, nothing is returned
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(encode(Ping(opaque=1)) + hdr(0xEE, 0, 0))


def test_decoder_bound_covers_control_frames_with_small_max_payload() -> None:
    # with max_payload 1024, a control frame may still carry 4096 bytes
    dec = FrameDecoder(max_payload=1024)
    assert dec.feed(hdr(0x08, 1, 4096) + b"\x00\x01" + bytes(4000)) == []
    assert dec.buffered == 10 + 4002
    assert dec.buffered > 10 + 1024 + 10
    assert dec.buffered < max_buffered(dec)
    assert dec.feed(b"a" * 94) == [Reset(stream=1, code=1, reason="\0" * 4000 + "a" * 94)]


# ---------------------------------------------------------------------------------------
# Encoder and constructor errors


@pytest.mark.parametrize("f", [
    Hello(name="x" * 256),
    Hello(name="é" * 128),  # 256 bytes encoded
    Hello(name="a", token=bytes(1025)),
    Open(stream=1, service="s" * 256),
    Open(stream=1, service="s", origin="o" * 256),
], ids=["name", "name-utf8", "token", "service", "origin"])
def test_encode_rejects_too_long_fields(f: Frame) -> None:
    with pytest.raises(ValueError, match="at most"):
        encode(f)


def test_encode_accepts_fields_at_their_limit() -> None:
    for f in [Hello(name="x" * 255, token=bytes(1024)),
              Open(stream=1, service="é" * 127 + "x", origin="o" * 255)]:
        assert FrameDecoder().feed(encode(f)) == [f]


def test_encode_rejects_non_frames() -> None:
    with pytest.raises(TypeError, match="not a frame"):
        encode(Frame())


def test_encode_truncates_long_reasons_to_fit_a_control_frame() -> None:
    raw = encode(GoAway(last_stream=1, reason="x" * 10000))
    assert len(raw) - 10 <= CONTROL_PAYLOAD_MAX
    (got,) = FrameDecoder().feed(raw)
    assert isinstance(got, GoAway)
    assert got.reason == "x" * (len(raw) - 16)
    assert len(got.reason) >= CONTROL_PAYLOAD_MAX - 8


def test_truncated_reason_is_still_valid_utf8() -> None:
    raw = encode(Reset(stream=1, code=1, reason="€" * 2000))  # 3-byte chars, cut at a boundary
    (got,) = FrameDecoder().feed(raw)
    assert isinstance(got, Reset)
    assert len(got.reason) >= 1362
    assert got.reason == "€" * len(got.reason)


@pytest.mark.parametrize("f", [Ping(opaque=-1), Open(stream=1, service="s", mode=256),
                               Window(stream=1, increment=2**32), Data(stream=-1, data=b"")],
                         ids=["ping", "open-mode", "window", "data-stream"])
def test_encode_out_of_range_field_raises_value_error(f: Frame) -> None:
    with pytest.raises(ValueError):
        encode(f)


@pytest.mark.parametrize(("max_payload", "hard_max"), [(1023, HARD_MAX_PAYLOAD), (2048, 1024),
                                                       (HARD_MAX_PAYLOAD + 1, HARD_MAX_PAYLOAD)])
def test_decoder_rejects_bad_max_payload(max_payload: int, hard_max: int) -> None:
    with pytest.raises(ValueError, match="must lie in"):
        FrameDecoder(max_payload=max_payload, hard_max=hard_max)


def test_max_payload_setter_bounds() -> None:
    dec = FrameDecoder(max_payload=2048, hard_max=4096)
    for bad in (1023, 4097):
        with pytest.raises(ValueError, match="must lie in"):
            dec.max_payload = bad
    assert dec.max_payload == 2048


# ---------------------------------------------------------------------------------------
# Fuzz: anything either decodes or raises ProtocolError, with bounded buffering

def check_reencodes(f: Frame) -> None:
    assert FrameDecoder(max_payload=HARD_MAX_PAYLOAD).feed(encode(f)) == [f]


def fuzz_feed(dec: FrameDecoder, data: bytes, cuts: list[int]) -> None:
    try:
        for chunk in split_at(data, cuts):
            for f in dec.feed(chunk):
                check_reencodes(f)
            assert dec.buffered < max_buffered(dec)
    except ProtocolError as exc:
        assert str(exc)
        assert isinstance(exc.code, ErrorCode)
        with pytest.raises(ProtocolError):
            dec.feed(b"")


CUTS = st.lists(st.integers(0, 3000), max_size=20)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), CUTS, st.sampled_from([1024, DEFAULT_MAX_PAYLOAD]),
       st.booleans())
def test_fuzz_arbitrary_bytes(data: bytes, cuts: list[int], max_payload: int,
                              split: bool) -> None:
    fuzz_feed(FrameDecoder(max_payload=max_payload, split_data=split), data, cuts)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), CUTS, st.booleans())
def test_fuzz_after_valid_hello(data: bytes, cuts: list[int], split: bool) -> None:
    hello = encode(Hello(name="peer", token=b"tok"))
    fuzz_feed(FrameDecoder(split_data=split), hello + data,
              [c + len(hello) for c in cuts] + [len(hello) // 2])


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(FRAMES, min_size=1, max_size=6),
       st.lists(st.tuples(st.integers(0, 10**6), U8), min_size=1, max_size=4), CUTS,
       st.booleans())
def test_fuzz_mutated_valid_frames(frames: list[Frame], flips: list[tuple[int, int]],
                                   cuts: list[int], split: bool) -> None:
    data = bytearray(b"".join(encode(f) for f in frames))
    for pos, value in flips:
        data[pos % len(data)] = value
    fuzz_feed(FrameDecoder(split_data=split), bytes(data), cuts)


# ---------------------------------------------------------------------------------------
# Cut-through DATA (split_data=True, what a Link uses)


def _merged(frames: list[Frame]) -> list[Frame]:
    """Adjacent Data frames of one stream joined: what a stream's reader sees."""
    out: list[Frame] = []
    for f in frames:
        if isinstance(f, Data) and out and isinstance(out[-1], Data) \
                and out[-1].stream == f.stream:
            out[-1] = Data(f.stream, bytes(out[-1].data) + bytes(f.data))
        else:
            out.append(Data(f.stream, bytes(f.data)) if isinstance(f, Data) else f)
    return out


@FAST
@given(st.lists(FRAMES, max_size=8), st.lists(st.integers(0, 6000), max_size=12),
       st.booleans())
def test_split_data_gives_the_same_streams_whatever_the_cuts(
        frames: list[Frame], cuts: list[int], as_bytes: bool) -> None:
    """However the bytes are cut, the frames are those encoded, except that a DATA
    payload may come in pieces (each a piece of one chunk, none empty unless the frame
    is), and nothing but a header or a control frame is ever held."""
    data = b"".join(encode(f) for f in frames)
    dec = FrameDecoder(split_data=True)
    got: list[Frame] = []
    for chunk in split_at(data, cuts):
        piece = chunk if as_bytes else bytearray(chunk)  # views of bytes; copies otherwise
        new = dec.feed(piece)
        for f in new:
            if isinstance(f, Data) and isinstance(f.data, memoryview):
                # a view of the caller's immutable bytes or of the decoder's own copy,
                # never of a buffer the caller may reuse
                assert as_bytes or f.data.obj is not piece
                assert f.data.readonly
        got += new
        assert dec.buffered <= 10 + CONTROL_PAYLOAD_MAX + 10 + 600 + 10
    assert _merged(got) == _merged(frames)
    assert dec.buffered == 0


def test_split_data_passes_a_payload_on_as_it_arrives() -> None:
    dec = FrameDecoder(split_data=True)
    raw = frame(0x05, 7, b"abcdef") + frame(0x05, 9, b"xyz")
    assert dec.feed(raw[:3]) == []  # not even a header: held
    assert dec.buffered == 3
    assert dec.feed(raw[3:12]) == [Data(7, b"ab")]  # the header, then what there is
    assert dec.buffered == 0  # a payload is never held
    assert dec.feed(raw[12:15]) == [Data(7, b"cde")]
    assert dec.feed(raw[15:]) == [Data(7, b"f"), Data(9, b"xyz")]


def test_split_data_checks_a_header_before_passing_anything_on() -> None:
    dec = FrameDecoder(split_data=True, max_payload=1024)
    expect_error(hdr(0x05, 1, 1025) + b"x", "exceeds the maximum", dec=dec,
                 code=ErrorCode.FRAME_TOO_LARGE)
    dec = FrameDecoder(split_data=True, max_payload=1024)  # a header cut in two
    assert dec.feed(hdr(0x05, 1, 1025)[:4]) == []
    expect_error(hdr(0x05, 1, 1025)[4:] + b"x", "exceeds the maximum", dec=dec,
                 code=ErrorCode.FRAME_TOO_LARGE)
    dec = FrameDecoder(split_data=True)  # garbage after a payload's last piece
    assert dec.feed(hdr(0x05, 1, 4) + b"ab") == [Data(1, b"ab")]
    with pytest.raises(ProtocolError, match="unknown frame type"):
        dec.feed(b"cd" + hdr(0x7F, 0, 0))


def test_a_read_only_view_is_kept_and_a_writable_one_copied() -> None:
    """A read-only memoryview is a promise that its bytes do not change (a
    `ReadBuffer` read): its DATA payloads are views of it. A writable one may be reused
    by its owner: copied."""
    raw = bytearray(encode(Data(stream=1, data=b"abcdef")))
    for split in (False, True):
        (kept,) = FrameDecoder(split_data=split).feed(memoryview(raw).toreadonly())
        assert isinstance(kept, Data) and isinstance(kept.data, memoryview)
        # memoryview == bytes compares contents; mypy's strict equality does not know
        assert kept.data.obj is raw and cast(object, kept.data) == b"abcdef"
        (copied,) = FrameDecoder(split_data=split).feed(memoryview(raw))
        assert isinstance(copied, Data)
        assert not (isinstance(copied.data, memoryview) and copied.data.obj is raw)
        raw[-6:] = b"zzzzzz"
        assert copied.data == b"abcdef"
        raw[-6:] = b"abcdef"
