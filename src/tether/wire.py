"""tether.wire — the frames of the tether protocol, encoded and decoded without I/O.

Every frame is a fixed 10-byte header followed by a payload::

    type:u8  flags:u8  stream:u32  length:u32  payload[length]

(network byte order). `docs/protocol.md` is the byte-by-byte spec; this module is
tested against it. Decoding is incremental: `FrameDecoder.feed` accepts any split
of the byte stream and returns the frames completed so far. A claimed length is
checked against the cap *before* anything is buffered for it, so a hostile length
never allocates. Anything malformed raises `ProtocolError` with a precise message.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final

from .errors import ErrorCode, ProtocolError, RemoteProtocolError

__all__ = [
    "CONTROL_KIND_BASE",
    "CONTROL_PAYLOAD_MAX",
    "DEFAULT_MAX_PAYLOAD",
    "HARD_MAX_PAYLOAD",
    "HEADER",
    "KIND_REGISTER",
    "KIND_SERVICES",
    "KIND_UNREGISTER",
    "MAGIC",
    "PROTOCOL_VERSION",
    "Ack",
    "Close",
    "Data",
    "Fin",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "GoAway",
    "Hello",
    "KeepAlive",
    "Msg",
    "Open",
    "OpenErr",
    "OpenOk",
    "Ping",
    "Pong",
    "Reset",
    "Window",
    "encode",
    "encode_data_header",
    "encode_empty",
    "encode_msg_header",
]

MAGIC: Final = b"TTHR"
PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({PROTOCOL_VERSION})
DEFAULT_MAX_PAYLOAD: Final = 64 * 1024
HARD_MAX_PAYLOAD: Final = 16 * 1024 * 1024
CONTROL_PAYLOAD_MAX: Final = 4096
MAX_STREAM_ID: Final = 0xFFFFFFFF

# MSG kinds at or above CONTROL_KIND_BASE are tether's own control messages between a
# node and its gateway (and between gateways); applications use kinds below it.
CONTROL_KIND_BASE: Final = 0xFF00
KIND_REGISTER: Final = 0xFF01
KIND_UNREGISTER: Final = 0xFF02
KIND_SERVICES: Final = 0xFF03

HEADER: Final[struct.Struct] = struct.Struct("!BBII")
_HELLO: Final[struct.Struct] = struct.Struct("!4sHHII")
_OPEN: Final[struct.Struct] = struct.Struct("!QIB")
_U8: Final = struct.Struct("!B")
_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_U64: Final = struct.Struct("!Q")
_CODE: Final[struct.Struct] = struct.Struct("!H")
_MSG: Final[struct.Struct] = struct.Struct("!HQ")
_MSG_HEADER: Final[struct.Struct] = struct.Struct("!BBIIHQ")
_GOAWAY: Final[struct.Struct] = struct.Struct("!IH")


class FrameType:
    """The frame type codes (the header's first byte)."""

    HELLO: Final = 0x01
    OPEN: Final = 0x02
    OPEN_OK: Final = 0x03
    OPEN_ERR: Final = 0x04
    DATA: Final = 0x05
    FIN: Final = 0x06
    CLOSE: Final = 0x07
    RESET: Final = 0x08
    WINDOW: Final = 0x09
    KEEPALIVE: Final = 0x0A
    PING: Final = 0x0B
    PONG: Final = 0x0C
    MSG: Final = 0x0D
    ACK: Final = 0x0E
    GOAWAY: Final = 0x0F


class Frame:
    """Base of all frames. `TYPE` is the wire type code; `stream` is 0 for link frames."""

    __slots__ = ()
    TYPE: ClassVar[int] = 0
    LINK_FRAME: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Hello(Frame):
    """First frame each side sends on a link: who it is and what it offers."""

    TYPE: ClassVar[int] = FrameType.HELLO
    LINK_FRAME: ClassVar[bool] = True
    name: str
    token: bytes = b""
    version: int = PROTOCOL_VERSION
    max_payload: int = DEFAULT_MAX_PAYLOAD
    heartbeat_ms: int = 0
    options: int = 0


@dataclass(frozen=True, slots=True)
class Open(Frame):
    """Open a new flow (stream) to `service`. `liveness_ms` 0 means no liveness."""

    TYPE: ClassVar[int] = FrameType.OPEN
    stream: int
    service: str
    liveness_ms: int = 0
    window: int = 0
    mode: int = 0
    origin: str = ""


@dataclass(frozen=True, slots=True)
class OpenOk(Frame):
    """The flow was accepted; `window` is the acceptor's initial receive credit."""

    TYPE: ClassVar[int] = FrameType.OPEN_OK
    stream: int
    window: int = 0


@dataclass(frozen=True, slots=True)
class OpenErr(Frame):
    """The flow was refused, with a code and a reason."""

    TYPE: ClassVar[int] = FrameType.OPEN_ERR
    stream: int
    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Data(Frame):
    """Bytes of a flow."""

    TYPE: ClassVar[int] = FrameType.DATA
    stream: int
    data: bytes | memoryview  # decoded: a read-only view of the bytes read, see FrameDecoder


@dataclass(frozen=True, slots=True)
class Fin(Frame):
    """The sender will send no more data on this flow (half-close); it still reads."""

    TYPE: ClassVar[int] = FrameType.FIN
    stream: int


@dataclass(frozen=True, slots=True)
class Close(Frame):
    """The sender deallocated the flow: no more data either way (implies FIN)."""

    TYPE: ClassVar[int] = FrameType.CLOSE
    stream: int


@dataclass(frozen=True, slots=True)
class Reset(Frame):
    """The flow is aborted, with a code and a reason; buffered data may be discarded."""

    TYPE: ClassVar[int] = FrameType.RESET
    stream: int
    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Window(Frame):
    """The receiver grants `increment` more bytes of credit on this flow."""

    TYPE: ClassVar[int] = FrameType.WINDOW
    stream: int
    increment: int


@dataclass(frozen=True, slots=True)
class KeepAlive(Frame):
    """A sign of life on a flow that has had nothing to send."""

    TYPE: ClassVar[int] = FrameType.KEEPALIVE
    stream: int


@dataclass(frozen=True, slots=True)
class Ping(Frame):
    """Link heartbeat; the peer answers with a PONG carrying the same `opaque`."""

    TYPE: ClassVar[int] = FrameType.PING
    LINK_FRAME: ClassVar[bool] = True
    opaque: int


@dataclass(frozen=True, slots=True)
class Pong(Frame):
    """Answer to a PING."""

    TYPE: ClassVar[int] = FrameType.PONG
    LINK_FRAME: ClassVar[bool] = True
    opaque: int


@dataclass(frozen=True, slots=True)
class Msg(Frame):
    """A mesh message: `kind` chosen by the application, `seq` numbered by the sender."""

    TYPE: ClassVar[int] = FrameType.MSG
    LINK_FRAME: ClassVar[bool] = True
    kind: int
    seq: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Ack(Frame):
    """Cumulative acknowledgement: every MSG with sequence <= `seq` was delivered."""

    TYPE: ClassVar[int] = FrameType.ACK
    LINK_FRAME: ClassVar[bool] = True
    seq: int


@dataclass(frozen=True, slots=True)
class GoAway(Frame):
    """The sender is closing the link: no new flows above `last_stream` will be served."""

    TYPE: ClassVar[int] = FrameType.GOAWAY
    LINK_FRAME: ClassVar[bool] = True
    last_stream: int
    code: int = ErrorCode.NO_ERROR
    reason: str = ""


def _name_bytes(text: str, what: str, limit: int) -> bytes:
    raw = text.encode()
    if len(raw) > limit:
        raise ValueError(f"{what} is {len(raw)} bytes encoded, at most {limit} allowed")
    return raw


def _reason_bytes(text: str, prefix: int) -> bytes:
    """`text` as UTF-8, cut at a character boundary to fit after a `prefix`-byte field."""
    raw = text.encode()
    limit = CONTROL_PAYLOAD_MAX - prefix
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()


encode_data_header: Final = functools.partial(HEADER.pack, int(FrameType.DATA), 0)
"""`encode_data_header(stream, length)`: the header of a DATA frame, for writing header
and payload without joining them. (The header's `pack` with the type and flags bound:
no Python frame per call, on the path of every DATA frame a link sends.)"""


def encode_empty(ftype: int, stream: int) -> bytes:
    """A frame without payload (FIN, CLOSE, KEEPALIVE): its header, built directly,
    the same bytes as `encode` of the frame object."""
    return HEADER.pack(ftype, 0, stream, 0)


def encode_msg_header(kind: int, seq: int, length: int) -> bytes:
    """The header and fixed fields of a MSG frame with a `length`-byte body, for writing
    the body after it without joining them. Raises `ValueError` for a field out of range."""
    try:
        return _MSG_HEADER.pack(FrameType.MSG, 0, 0, _MSG.size + length, kind, seq)
    except struct.error as exc:
        raise ValueError(f"cannot encode a MSG kind={kind} seq={seq}: {exc}") from exc


def _payload(frame: Frame) -> tuple[int, bytes]:
    """(stream, payload) of any frame but DATA (the frequent control frames first)."""
    if isinstance(frame, Window):
        if frame.increment == 0:
            raise ValueError("WINDOW increment must be at least 1")
        return frame.stream, _U32.pack(frame.increment)
    if isinstance(frame, (Fin, Close, KeepAlive)):
        return frame.stream, b""
    if isinstance(frame, (Ping, Pong)):
        return 0, _U64.pack(frame.opaque)
    if isinstance(frame, OpenOk):
        return frame.stream, _U32.pack(frame.window)
    if isinstance(frame, (OpenErr, Reset)):
        return frame.stream, _CODE.pack(frame.code) + _reason_bytes(frame.reason, _CODE.size)
    if isinstance(frame, Msg):
        return 0, _MSG.pack(frame.kind, frame.seq) + frame.body
    if isinstance(frame, Ack):
        return 0, _U64.pack(frame.seq)
    if isinstance(frame, GoAway):
        return 0, (_GOAWAY.pack(frame.last_stream, frame.code)
                   + _reason_bytes(frame.reason, _GOAWAY.size))
    if isinstance(frame, Hello):
        if frame.max_payload < 1024:
            raise ValueError(f"HELLO max_payload {frame.max_payload} is below the minimum 1024")
        name = _name_bytes(frame.name, "node name", 255)
        if len(frame.token) > 1024:
            raise ValueError(f"token is {len(frame.token)} bytes, at most 1024 allowed")
        head = _HELLO.pack(MAGIC, frame.version, frame.options, frame.max_payload,
                           frame.heartbeat_ms)
        body = head + _U8.pack(len(name)) + name + _U16.pack(len(frame.token)) + frame.token
        return 0, body
    if isinstance(frame, Open):
        service = _name_bytes(frame.service, "service name", 255)
        origin = _name_bytes(frame.origin, "origin name", 255)
        body = (_OPEN.pack(frame.liveness_ms, frame.window, frame.mode)
                + _U8.pack(len(service)) + service + _U8.pack(len(origin)) + origin)
        return frame.stream, body
    raise TypeError(f"not a frame: {frame!r}")


def encode(frame: Frame) -> bytes:
    """The bytes of one frame. Raises `ValueError` for a field out of range."""
    try:
        if isinstance(frame, Data):
            return HEADER.pack(FrameType.DATA, 0, frame.stream, len(frame.data)) + frame.data
        stream, payload = _payload(frame)
        return HEADER.pack(frame.TYPE, 0, stream, len(payload)) + payload
    except struct.error as exc:  # a field out of its wire range
        raise ValueError(f"cannot encode {frame!r}: {exc}") from exc


# ---------------------------------------------------------------------------------------
# Decoding

_Parser = Callable[[int, memoryview], "Frame"]


def _need(mv: memoryview, size: int, what: str) -> None:
    if len(mv) < size:
        raise RemoteProtocolError(f"truncated {what} payload: need {size} bytes, got {len(mv)}")


def _text(mv: memoryview, what: str) -> str:
    try:
        return str(mv, "utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"{what} is not valid UTF-8: {exc.reason}") from None


def _short_bytes(mv: memoryview, off: int, width: struct.Struct,
                 frame: str) -> tuple[bytes, int]:
    _need(mv, off + width.size, frame)
    (n,) = width.unpack_from(mv, off)
    off += width.size
    _need(mv, off + n, frame)
    return bytes(mv[off:off + n]), off + n


def _no_trailing(mv: memoryview, used: int, frame: str) -> None:
    if len(mv) != used:
        raise RemoteProtocolError(f"{frame} payload has {len(mv) - used} unexpected trailing bytes")


def _parse_hello(stream: int, mv: memoryview) -> Frame:
    _need(mv, _HELLO.size, "HELLO")
    magic, version, options, max_payload, heartbeat_ms = _HELLO.unpack_from(mv)
    if magic != MAGIC:
        raise RemoteProtocolError(f"bad magic {bytes(magic)!r} in HELLO (expected {MAGIC!r}): "
                            "not a tether peer")
    if version not in SUPPORTED_VERSIONS:
        raise RemoteProtocolError(
            f"protocol version {version} not supported (this side speaks "
            f"{sorted(SUPPORTED_VERSIONS)})", ErrorCode.VERSION_MISMATCH)
    raw_name, off = _short_bytes(mv, _HELLO.size, _U8, "HELLO")
    token, off = _short_bytes(mv, off, _U16, "HELLO")
    _no_trailing(mv, off, "HELLO")
    name = _text(memoryview(raw_name), "HELLO node name")
    if max_payload < 1024:
        raise RemoteProtocolError(f"HELLO max_payload {max_payload} is below the minimum 1024")
    return Hello(name=name, token=token, version=version, max_payload=max_payload,
                 heartbeat_ms=heartbeat_ms, options=options)


def _parse_open(stream: int, mv: memoryview) -> Frame:
    _need(mv, _OPEN.size, "OPEN")
    liveness_ms, window, mode = _OPEN.unpack_from(mv)
    raw_service, off = _short_bytes(mv, _OPEN.size, _U8, "OPEN")
    raw_origin, off = _short_bytes(mv, off, _U8, "OPEN")
    _no_trailing(mv, off, "OPEN")
    return Open(stream=stream, service=_text(memoryview(raw_service), "OPEN service name"),
                liveness_ms=liveness_ms, window=window, mode=mode,
                origin=_text(memoryview(raw_origin), "OPEN origin name"))


def _parse_open_ok(stream: int, mv: memoryview) -> Frame:
    _need(mv, 4, "OPEN_OK")
    _no_trailing(mv, 4, "OPEN_OK")
    return OpenOk(stream=stream, window=_U32.unpack_from(mv)[0])


def _parse_coded(stream: int, mv: memoryview, what: str) -> tuple[int, str]:
    _need(mv, 2, what)
    return _CODE.unpack_from(mv)[0], _text(mv[2:], f"{what} reason")


def _parse_open_err(stream: int, mv: memoryview) -> Frame:
    code, reason = _parse_coded(stream, mv, "OPEN_ERR")
    return OpenErr(stream=stream, code=code, reason=reason)


def _parse_reset(stream: int, mv: memoryview) -> Frame:
    code, reason = _parse_coded(stream, mv, "RESET")
    return Reset(stream=stream, code=code, reason=reason)


def _parse_empty(cls: type[Fin | Close | KeepAlive], name: str) -> _Parser:
    def parse(stream: int, mv: memoryview) -> Frame:
        _no_trailing(mv, 0, name)
        return cls(stream=stream)
    return parse


def _parse_window(stream: int, mv: memoryview) -> Frame:
    _need(mv, 4, "WINDOW")
    _no_trailing(mv, 4, "WINDOW")
    increment = _U32.unpack_from(mv)[0]
    if increment == 0:
        raise RemoteProtocolError("WINDOW increment of 0")
    return Window(stream=stream, increment=increment)


def _parse_ping(stream: int, mv: memoryview) -> Frame:
    _need(mv, 8, "PING")
    _no_trailing(mv, 8, "PING")
    return Ping(opaque=_U64.unpack_from(mv)[0])


def _parse_pong(stream: int, mv: memoryview) -> Frame:
    _need(mv, 8, "PONG")
    _no_trailing(mv, 8, "PONG")
    return Pong(opaque=_U64.unpack_from(mv)[0])


def _parse_msg(stream: int, mv: memoryview) -> Frame:
    _need(mv, _MSG.size, "MSG")
    kind, seq = _MSG.unpack_from(mv)
    return Msg(kind=kind, seq=seq, body=bytes(mv[_MSG.size:]))


def _parse_ack(stream: int, mv: memoryview) -> Frame:
    _need(mv, 8, "ACK")
    _no_trailing(mv, 8, "ACK")
    return Ack(seq=_U64.unpack_from(mv)[0])


def _parse_goaway(stream: int, mv: memoryview) -> Frame:
    _need(mv, _GOAWAY.size, "GOAWAY")
    last_stream, code = _GOAWAY.unpack_from(mv)
    return GoAway(last_stream=last_stream, code=code,
                  reason=_text(mv[_GOAWAY.size:], "GOAWAY reason"))


_NAMES: Final[dict[int, str]] = {v: k for k, v in vars(FrameType).items() if k.isupper()}
_LINK_TYPES: Final = frozenset({FrameType.HELLO, FrameType.PING, FrameType.PONG,
                                FrameType.MSG, FrameType.ACK, FrameType.GOAWAY})
_BULK_TYPES: Final = frozenset({FrameType.DATA, FrameType.MSG})
_PARSERS: Final[dict[int, _Parser]] = {
    FrameType.HELLO: _parse_hello,
    FrameType.OPEN: _parse_open,
    FrameType.OPEN_OK: _parse_open_ok,
    FrameType.OPEN_ERR: _parse_open_err,
    FrameType.FIN: _parse_empty(Fin, "FIN"),
    FrameType.CLOSE: _parse_empty(Close, "CLOSE"),
    FrameType.RESET: _parse_reset,
    FrameType.WINDOW: _parse_window,
    FrameType.KEEPALIVE: _parse_empty(KeepAlive, "KEEPALIVE"),
    FrameType.PING: _parse_ping,
    FrameType.PONG: _parse_pong,
    FrameType.MSG: _parse_msg,
    FrameType.ACK: _parse_ack,
    FrameType.GOAWAY: _parse_goaway,
}


def frame_name(type_code: int) -> str:
    """The name of a frame type code, e.g. ``"DATA"``, or ``"0x7f"`` if unknown."""
    return _NAMES.get(type_code, f"0x{type_code:02x}")


class FrameDecoder:
    """Turns a byte stream, split any way, into frames.

    `max_payload` bounds DATA and MSG payloads (it may be lowered or raised after the
    HELLO exchange, never above `hard_max`); every other frame's payload is bounded by
    `CONTROL_PAYLOAD_MAX`. Once `feed` has raised `ProtocolError`, the decoder is
    broken and every later call raises the same error: a stream is not resynchronised
    after garbage.
    """

    __slots__ = ("_data_left", "_data_stream", "_error", "_held", "_max_payload", "_parts",
                 "hard_max", "split_data")

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 hard_max: int = HARD_MAX_PAYLOAD, *, split_data: bool = False) -> None:
        if not 1024 <= max_payload <= hard_max:
            raise ValueError(f"max_payload {max_payload} must lie in [1024, {hard_max}]")
        self._parts: list[bytes | memoryview] = []  # the pending frame's pieces
        self._held = 0  # their total length
        self.split_data = split_data
        self._data_stream = 0  # split_data: the DATA frame whose payload is arriving
        self._data_left = 0  # and how much of it is still to come
        self._error: ProtocolError | None = None
        self._max_payload = max_payload
        self.hard_max = hard_max

    @property
    def max_payload(self) -> int:
        """The largest DATA or MSG payload accepted."""
        return self._max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        if not 1024 <= value <= self.hard_max:
            raise ValueError(f"max_payload {value} must lie in [1024, {self.hard_max}]")
        self._max_payload = value

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete (at most one header plus one payload)."""
        return self._held

    @property
    def data_left(self) -> int:
        """With `split_data`: bytes of a DATA frame's payload still to come, whose
        pieces the next `feed` returns first as the same frame's continuation."""
        return self._data_left

    def at_boundary(self) -> bool:
        """The next byte fed starts a frame: nothing is held, no DATA payload is still
        arriving, and the decoder is not broken. (A method, not a property: a relay asks
        on the path of every close, where a property's call costs more, see
        `Link.peek_stream_end`.)"""
        return not self._parts and not self._data_left and self._error is None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add bytes; return every frame they complete, in order.

        A DATA frame's payload is a `memoryview` slice of `data` when `data` is
        `bytes` or a read-only `memoryview` (immutable, or promised so by whoever made
        the view read-only: nothing is copied, the slice keeps the read alive), and
        never a view of a `data` that is writable (the caller may reuse it): a copy; a
        frame that straddles reads is joined once, when complete (and its payload may
        be a view of that joined, immutable copy).

        With `split_data` (cut-through, what a `Link` uses), a DATA frame's payload is
        returned as it arrives instead: a frame that straddles reads becomes several
        `Data` frames of the same stream, each a slice of one read, so no payload byte
        is ever held or copied here. A payload is only bytes of a stream, so nothing
        above the decoder can tell the difference but the frame count.
        """
        if self._error is not None:
            raise self._error
        frames: list[Frame] = []
        mv = memoryview(data).cast("B")
        keep = isinstance(data, bytes) or (isinstance(data, memoryview) and data.readonly)
        try:
            if self._parts:
                rest = self._complete(mv, keep, frames)
                if rest is None:
                    return frames
                mv = rest
            if self._data_left:
                take = min(self._data_left, len(mv))
                payload = mv[:take]
                frames.append(Data(self._data_stream, payload if keep else payload.tobytes()))
                self._data_left -= take
                mv = mv[take:]
            used = self._parse(mv, frames, keep)
        except ProtocolError as exc:
            self._error = exc
            self._parts = []
            self._held = 0
            raise
        if used < len(mv):
            rest = mv[used:]
            self._parts.append(rest if keep else rest.tobytes())
            self._held = len(rest)
        return frames

    def _complete(self, mv: memoryview, keep: bool, frames: list[Frame]) -> memoryview | None:
        """Complete the pending frame from the head of `mv`; return the rest of `mv`, or
        None if `mv` did not complete it."""
        hsize = HEADER.size
        parts = self._parts
        held = self._held
        if held < hsize:
            take = min(hsize - held, len(mv))
            parts.append(mv[:take] if keep else mv[:take].tobytes())
            held += take
            mv = mv[take:]
            if held < hsize:
                self._held = held
                return None
            head = b"".join(parts)
            parts[:] = [head]
            if self._parse(memoryview(head), frames, True) == hsize:  # checks the header
                parts.clear()  # no payload (complete already) or a split DATA's to come
                self._held = 0
                return mv
        need = hsize + HEADER.unpack_from(parts[0])[3] - held
        take = min(need, len(mv))
        parts.append(mv[:take] if keep else mv[:take].tobytes())
        mv = mv[take:]
        if take < need:
            self._held = held + take
            return None
        whole = b"".join(parts)
        parts.clear()
        self._held = 0
        self._parse(memoryview(whole), frames, True)
        return mv

    def _parse(self, mv: memoryview, out: list[Frame], keep: bool) -> int:
        off = 0
        end = len(mv)
        unpack = HEADER.unpack_from
        hsize = HEADER.size
        max_payload = self._max_payload
        while end - off >= hsize:
            ftype, _flags, stream, length = unpack(mv, off)
            if ftype == FrameType.DATA:
                if length > max_payload:
                    raise RemoteProtocolError(
                        f"DATA payload of {length} bytes exceeds the maximum {max_payload}",
                        ErrorCode.FRAME_TOO_LARGE)
                if stream == 0:
                    raise RemoteProtocolError("DATA frame on stream 0")
                start = off + hsize
                if end - start < length:
                    if not self.split_data:
                        break
                    if end > start:
                        payload = mv[start:end]
                        out.append(Data(stream, payload if keep else payload.tobytes()))
                    self._data_stream = stream
                    self._data_left = length - (end - start)
                    return end
                payload = mv[start:start + length]
                out.append(Data(stream, payload if keep else payload.tobytes()))
                off = start + length
                continue
            parse = _PARSERS.get(ftype)
            if parse is None:
                raise RemoteProtocolError(f"unknown frame type 0x{ftype:02x}")
            limit = max_payload + _MSG.size if ftype in _BULK_TYPES else CONTROL_PAYLOAD_MAX
            if length > limit:
                raise RemoteProtocolError(
                    f"{frame_name(ftype)} payload of {length} bytes exceeds the maximum {limit}",
                    ErrorCode.FRAME_TOO_LARGE)
            if ftype in _LINK_TYPES:
                if stream != 0:
                    raise RemoteProtocolError(f"{frame_name(ftype)} frame on stream {stream}, "
                                        "must be stream 0")
            elif stream == 0:
                raise RemoteProtocolError(f"{frame_name(ftype)} frame on stream 0")
            if end - off - hsize < length:
                break
            start = off + hsize
            out.append(parse(stream, mv[start:start + length]))
            off = start + length
        return off
