"""Message framing for the hub: how a byte stream is cut into messages, and back.

Sans-IO: nothing here touches a socket, a clock or an event loop. A *framing* is a
small frozen configuration object shared by every connection of a hub; its
``decoder()`` makes the per-connection state, whose ``feed(data)`` takes the bytes
as they arrive (in any chunking) and returns the complete messages they finish, in
order; ``encode(message)`` returns the bytes to send for one message.

Three framings:

* :class:`Raw` — no framing: every chunk read from the socket is one message, and a
  message is sent as is. Nothing is buffered.
* :class:`Lines` — messages end with a delimiter (``b"\\n"`` by default), which is
  stripped on input and appended on output. A message may not contain the delimiter:
  ``encode`` refuses it (the peer would see two messages, or a different one), so a
  peer's data can never smuggle a second message into what you send.
* :class:`LengthPrefixed` — every message is preceded by its length, an unsigned
  big-endian integer of ``width`` bytes (1, 2, 4 or 8).

Every decoder has a bound: a message longer than ``max_size`` bytes raises
:class:`MessageTooLarge` (the hub closes that connection with reason
``"error: message too large"``), and a decoder never keeps more than ``max_size``
plus one delimiter (or header) between calls, whatever the peer sends.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, cast

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_SIZE",
    "Decoder",
    "Framing",
    "LengthPrefixed",
    "Lines",
    "MessageTooLarge",
    "Raw",
]

DEFAULT_MAX_SIZE: Final = 64 * 1024
"""The default ``max_size`` of :class:`Lines` (64 KiB)."""

_LP_DEFAULT_MAX: Final = 1024 * 1024
_WIDTH_FORMATS: Final = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}


class MessageTooLarge(RemoteProtocolError):
    """The peer sent a message longer than the framing's ``max_size``.

    ``size`` is the message's length, or a lower bound of it when its end was not
    seen yet; ``messages`` are the complete messages the same ``feed`` call decoded
    before the oversized one, in order (deliver them, then close the connection).
    The decoder must not be fed again.
    """

    code = ErrorCode.FRAME_TOO_LARGE

    def __init__(self, size: int, max_size: int, messages: list[bytes] | None = None,
                 *, at_least: bool = False) -> None:
        """Describe a message of ``size`` (or more) bytes over ``max_size``."""
        more = "more than " if at_least else ""
        super().__init__(
            f"message too large: {more}{size} bytes, the limit is {max_size} "
            "(raise the framing's max_size, or the hub's max_message, to accept it)")
        self.size = size
        self.max_size = max_size
        self.messages: list[bytes] = messages if messages is not None else []


class Decoder(Protocol):
    """The per-connection decoding state made by :meth:`Framing.decoder`."""

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next bytes of the stream; return the messages they complete.

        Raises :class:`MessageTooLarge` when a message exceeds the bound.
        """
        ...

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete message."""
        ...


class Framing(Protocol):
    """A way of cutting a byte stream into messages (:class:`Raw`, :class:`Lines`,
    :class:`LengthPrefixed`)."""

    @property
    def max_size(self) -> int | None:
        """The largest message accepted from a peer, or None for no limit (Raw)."""
        ...

    def decoder(self) -> Decoder:
        """A fresh decoder for one connection."""
        ...

    def encode(self, message: bytes) -> bytes:
        """The bytes to send for ``message``; ``LocalProtocolError`` if it cannot be
        framed."""
        ...

    def encode_many(self, messages: Sequence[bytes]) -> bytes:
        """The bytes to send for ``messages``, in order: the concatenation of their
        encodings, built at once; ``LocalProtocolError`` if one cannot be framed."""
        ...

    def with_max_size(self, max_size: int) -> Framing:
        """The same framing with another ``max_size`` (Raw returns itself)."""
        ...

    @property
    def per_message(self) -> int:
        """The bytes a message takes on the wire besides its own (its delimiter or its
        length prefix)."""
        ...

    @property
    def decoded_type(self) -> type[tuple[bytes, ...]]:
        """The tuple type in which decoded messages are handed over; ``encode_many``
        may trust its contents (``tuple`` when there is nothing to trust)."""
        ...


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    return data if type(data) is bytes else bytes(data)


# --- Raw ---------------------------------------------------------------------------------


class _RawDecoder:
    """Every chunk is a message. Stateless: one instance serves every connection."""

    __slots__ = ()

    def feed(self, data: bytes) -> list[bytes]:
        """``[data]`` (as bytes), or ``[]`` for an empty chunk."""
        if not data:
            return []
        return [data if type(data) is bytes else bytes(data)]

    @property
    def buffered(self) -> int:
        """Always 0: nothing is buffered."""
        return 0


_RAW_DECODER: Final = _RawDecoder()


@dataclass(frozen=True, slots=True)
class Raw:
    """No framing: messages are the chunks as they arrive, sent as they are given.

    Chunk boundaries carry no meaning on a TCP stream; use :class:`Raw` for byte
    streams (proxies, terminals) and a real framing for messages.
    """

    @property
    def max_size(self) -> None:
        """Raw has no message size limit (a chunk is at most one socket read)."""
        return None

    def decoder(self) -> _RawDecoder:
        """The shared stateless decoder."""
        return _RAW_DECODER

    def encode(self, message: bytes) -> bytes:
        """``message`` itself (copied if it is a mutable buffer)."""
        return message if type(message) is bytes else bytes(message)

    def encode_many(self, messages: Sequence[bytes]) -> bytes:
        """The messages, concatenated."""
        return b"".join(messages)

    def with_max_size(self, max_size: int) -> Raw:
        """``self``: Raw has no size limit."""
        return self

    @property
    def per_message(self) -> int:
        """0: Raw adds nothing."""
        return 0

    @property
    def decoded_type(self) -> type[tuple[bytes, ...]]:
        """``tuple``: Raw checks nothing."""
        return tuple


# --- Lines -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _decoded_type(delimiter: bytes) -> type[tuple[bytes, ...]]:
    """A tuple type for messages decoded with ``delimiter`` (``Lines.decoded_type``).

    A decoded message can always be framed again (it ends before the first delimiter),
    and a tuple cannot change: ``encode_many`` skips its checks for this type.
    """
    doc = f"Messages decoded with the delimiter {delimiter!r} (immutable, checked)."
    return cast("type[tuple[bytes, ...]]",
                type("DecodedLines", (tuple,), {"__slots__": (), "__doc__": doc}))


class _LinesDecoder:
    """Splits on a delimiter; keeps at most ``max_size + len(delimiter) - 1`` bytes."""

    __slots__ = ("_buf", "_delim", "_max")

    def __init__(self, delimiter: bytes, max_size: int) -> None:
        self._delim = delimiter
        self._max = max_size
        self._buf: bytearray | None = None

    @property
    def buffered(self) -> int:
        """Bytes of the incomplete message held."""
        return 0 if self._buf is None else len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """The messages completed by ``data``, delimiters stripped."""
        if type(data) is not bytes:
            data = bytes(data)
        delim = self._delim
        buf = self._buf
        if buf is None:
            parts = data.split(delim)
            tail = parts.pop()
            if len(data) > self._max:
                self._check(parts, tail, [])
            if tail:
                self._buf = bytearray(tail)
            return parts
        # Finish the incomplete message; the delimiter may straddle the boundary.
        mx = self._max
        d = len(delim)
        k = len(buf)
        room = mx + d - k
        buf += memoryview(data)[:room] if len(data) > room else data
        i = buf.find(delim, k - d + 1 if k >= d else 0)
        if i < 0:
            if len(buf) > mx + d - 1:
                self._buf = None
                raise MessageTooLarge(mx, mx, at_least=True)
            return []
        if i > mx:
            self._buf = None
            raise MessageTooLarge(i, mx)
        out = [bytes(buf[:i])]
        self._buf = None
        consumed = i + d - k
        if consumed < len(data):
            data = data[consumed:]
            parts = data.split(delim)
            tail = parts.pop()
            if len(data) > mx:
                self._check(parts, tail, out)
            if tail:
                self._buf = bytearray(tail)
            out += parts
        return out

    def _check(self, parts: list[bytes], tail: bytes, before: list[bytes]) -> None:
        mx = self._max
        for n, part in enumerate(parts):
            if len(part) > mx:
                raise MessageTooLarge(len(part), mx, before + parts[:n])
        if len(tail) > mx + len(self._delim) - 1:
            raise MessageTooLarge(mx, mx, before + parts, at_least=True)


@dataclass(frozen=True, slots=True)
class Lines:
    """Messages separated by ``delimiter`` (stripped on input, appended on output).

    ``max_size`` bounds a message, delimiter excluded: a longer one is an error
    (:class:`MessageTooLarge`). ``encode`` refuses a message that contains the
    delimiter (``LocalProtocolError``): it would not arrive as the same message.
    """

    delimiter: bytes = b"\n"
    max_size: int = DEFAULT_MAX_SIZE
    _decoded: type[tuple[bytes, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.delimiter, bytes) or not self.delimiter:
            raise ValueError(f"delimiter must be non-empty bytes, got {self.delimiter!r}")
        if not isinstance(self.max_size, int) or self.max_size < 1:
            raise ValueError(f"max_size must be a positive int, got {self.max_size!r}")
        object.__setattr__(self, "_decoded", _decoded_type(self.delimiter))

    def decoder(self) -> _LinesDecoder:
        """A decoder for one connection."""
        return _LinesDecoder(self.delimiter, self.max_size)

    @property
    def per_message(self) -> int:
        """The delimiter's length."""
        return len(self.delimiter)

    @property
    def decoded_type(self) -> type[tuple[bytes, ...]]:
        """The tuple type for messages this framing decoded: ``encode_many`` trusts it
        (a decoded message can always be framed again) and skips its checks."""
        return self._decoded

    def encode(self, message: bytes) -> bytes:
        """``message + delimiter``; ``LocalProtocolError`` if ``message`` contains the
        delimiter (or ends with a part of it that would complete one early)."""
        delim = self.delimiter
        if type(message) is not bytes:
            message = bytes(message)
        if len(delim) == 1:
            if delim[0] in message:  # int membership: a memchr
                raise _contains_delimiter(delim)
            return message + delim
        framed = message + delim
        if framed.find(delim) != len(message):
            raise _contains_delimiter(delim)
        return framed

    def encode_many(self, messages: Sequence[bytes]) -> bytes:
        """Every message followed by the delimiter, joined at once; the same checks as
        :meth:`encode`."""
        if not messages:
            return b""
        delim = self.delimiter
        framed = delim.join(messages) + delim
        if type(messages) is self._decoded:  # decoded by this delimiter: nothing to check
            return framed
        if len(delim) == 1 or not _has_border(delim):
            # Without a border (a proper prefix that is also a suffix), occurrences of
            # the delimiter cannot straddle a message edge: counting them is exact.
            if framed.count(delim) != len(messages):
                raise _contains_delimiter(delim)
            return framed
        for message in messages:
            self.encode(message)
        return framed

    def with_max_size(self, max_size: int) -> Lines:
        """The same delimiter with another ``max_size``."""
        return Lines(self.delimiter, max_size)


def _contains_delimiter(delim: bytes) -> LocalProtocolError:
    return LocalProtocolError(
        f"message contains the delimiter {delim!r}: the peer would not receive it as one "
        "message (escape it, or use LengthPrefixed)")


@functools.lru_cache(maxsize=64)
def _has_border(delim: bytes) -> bool:
    """Whether a proper prefix of ``delim`` is also a suffix (``b"aa"``, ``b"abab"``)."""
    return any(delim[:k] == delim[-k:] for k in range(1, len(delim)))


# --- LengthPrefixed ----------------------------------------------------------------------


class _LengthPrefixedDecoder:
    """Reads a ``width``-byte big-endian length, then that many bytes."""

    __slots__ = ("_buf", "_fmt", "_max", "_width")

    def __init__(self, width: int, max_size: int) -> None:
        self._width = width
        self._fmt = struct.Struct(_WIDTH_FORMATS[width])
        self._max = max_size
        self._buf: bytearray | None = None

    @property
    def buffered(self) -> int:
        """Bytes of the incomplete message (header included) held."""
        return 0 if self._buf is None else len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """The messages completed by ``data``, headers stripped."""
        if type(data) is not bytes:
            data = bytes(data)
        w = self._width
        unpack_from = self._fmt.unpack_from
        mx = self._max
        n = len(data)
        pos = 0
        out: list[bytes] = []
        buf = self._buf
        if buf is not None:
            have = len(buf)
            if have < w:
                pos = w - have
                buf += data[:pos]
                if len(buf) < w:
                    return out
            (length,) = unpack_from(buf)
            if length > mx:
                self._buf = None
                raise MessageTooLarge(length, mx)
            need = w + length - len(buf)
            if n - pos < need:
                buf += memoryview(data)[pos:]
                return out
            buf += memoryview(data)[pos:pos + need]
            out.append(bytes(memoryview(buf)[w:]))
            pos += need
            self._buf = None
        while n - pos >= w:
            (length,) = unpack_from(data, pos)
            if length > mx:
                raise MessageTooLarge(length, mx, out)
            end = pos + w + length
            if end > n:
                break
            out.append(data[pos + w:end])
            pos = end
        if pos < n:
            self._buf = bytearray(memoryview(data)[pos:])
        return out


@dataclass(frozen=True, slots=True)
class LengthPrefixed:
    """Messages preceded by their length: an unsigned big-endian integer of ``width``
    bytes (1, 2, 4 or 8).

    ``max_size`` bounds a message, header excluded (default 1 MiB, or the largest
    length ``width`` can express if smaller); a longer announced length is an error
    (:class:`MessageTooLarge`) raised as soon as the header arrives.
    """

    width: int = 4
    max_size: int = _LP_DEFAULT_MAX

    def __post_init__(self) -> None:
        if self.width not in _WIDTH_FORMATS:
            raise ValueError(f"width must be 1, 2, 4 or 8 bytes, got {self.width!r}")
        limit = (1 << (8 * self.width)) - 1
        if not isinstance(self.max_size, int) or self.max_size < 0:
            raise ValueError(f"max_size must be a non-negative int, got {self.max_size!r}")
        if self.max_size > limit:
            # A larger bound means nothing: the header cannot announce it.
            object.__setattr__(self, "max_size", limit)

    def decoder(self) -> _LengthPrefixedDecoder:
        """A decoder for one connection."""
        return _LengthPrefixedDecoder(self.width, self.max_size)

    def encode(self, message: bytes) -> bytes:
        """The length header followed by ``message``; ``LocalProtocolError`` if the
        length does not fit in ``width`` bytes."""
        n = len(message)
        if n >> (8 * self.width):
            raise LocalProtocolError(
                f"message of {n} bytes does not fit a {self.width}-byte length prefix")
        return n.to_bytes(self.width, "big") + message

    def encode_many(self, messages: Sequence[bytes]) -> bytes:
        """Each message with its length header, joined at once."""
        width = self.width
        parts: list[bytes] = []
        for message in messages:
            n = len(message)
            if n >> (8 * width):
                raise LocalProtocolError(
                    f"message of {n} bytes does not fit a {width}-byte length prefix")
            parts.append(n.to_bytes(width, "big"))
            parts.append(message)
        return b"".join(parts)

    def with_max_size(self, max_size: int) -> LengthPrefixed:
        """The same width with another ``max_size``."""
        return LengthPrefixed(self.width, max_size)

    @property
    def per_message(self) -> int:
        """The length prefix's width."""
        return self.width

    @property
    def decoded_type(self) -> type[tuple[bytes, ...]]:
        """``tuple``: length prefixes need no trust."""
        return tuple
