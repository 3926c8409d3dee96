"""The messages of the local links between the processes of ``Hub(workers=N)``.

Sans-IO: bytes in, values out. Every message is a tether ``MSG`` frame
(:mod:`tether.wire`: type 0x0D, stream 0, ``seq`` 0, never acknowledged) whose
``kind`` is one of the reserved control kinds below; docs/protocol.md, section
"Hub worker links", is the byte-level spec and this module is tested against it.

``ROUTE`` carries what one process asks of connections held by another worker, as a
sequence of records, in the order of the calls (so messages to one connection keep
their order, and a close comes after the messages sent before it)::

    op:u8  serial:u64  count:u32  length:u32  payload[length]

* ``SEND``   payload: the framed bytes to write to connection ``serial``; ``count``
  messages (``send`` 1, ``send_batch`` its length).
* ``CLOSE``  no payload: ``hub.close`` connection ``serial``.
* ``IDLE``   payload: the idle timeout as a big-endian float64, negative for none.
* ``FANOUT`` serial 0, ``count`` connections: payload is the framed message
  (``length`` bytes) followed by ``count`` serials (u64 each): ``send_many``,
  one record per worker whatever the number of connections.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from typing import Any, Final

from . import wire
from .errors import RemoteProtocolError

__all__ = [
    "BATCH_MAX",
    "HUB_PROBE",
    "HUB_ROUTE",
    "KIND_CLOSED",
    "KIND_DOWN",
    "KIND_NODES",
    "KIND_NODE_DOWN",
    "KIND_OPENED",
    "KIND_READY",
    "KIND_REMOTE",
    "KIND_ROUTE",
    "KIND_SHUTDOWN",
    "KIND_STATS",
    "KIND_STATS_REQUEST",
    "KIND_UP",
    "OP_CLOSE",
    "OP_FANOUT",
    "OP_IDLE",
    "OP_SEND",
    "RECORD",
    "close_record",
    "decode_closed",
    "decode_down",
    "decode_json",
    "decode_node",
    "encode_closed",
    "encode_down",
    "encode_json",
    "encode_node",
    "fanout_record",
    "idle_record",
    "iter_records",
    "msg",
    "msg_header",
    "pack_serials",
    "send_record_header",
    "unpack_serials",
]

KIND_ROUTE: Final = 0xFF20
"""Any process to a worker: records for connections that worker holds."""
KIND_OPENED: Final = 0xFF21
"""Worker to supervisor: serials of connections just accepted (u64 each)."""
KIND_CLOSED: Final = 0xFF22
"""Worker to supervisor: ``reason_len:u8 reason`` then serials of connections ended."""
KIND_READY: Final = 0xFF23
"""Worker to supervisor, JSON ``{"worker", "pid", "floor"}``: listening."""
KIND_UP: Final = 0xFF24
"""Supervisor to worker, JSON ``{"worker", "floor", "path"}``: that worker is up."""
KIND_DOWN: Final = 0xFF25
"""Supervisor to worker: ``worker:u16`` then the serials it held: it died."""
KIND_STATS: Final = 0xFF26
"""Worker to supervisor, JSON: the worker's counters."""
KIND_STATS_REQUEST: Final = 0xFF27
"""Supervisor to worker, empty: send STATS now."""
KIND_SHUTDOWN: Final = 0xFF28
"""Supervisor to worker, JSON ``{"timeout"}``: drain and exit."""
KIND_REMOTE: Final = 0xFF29
"""Worker to supervisor: ``node_len:u8 node`` then a ROUTE body for that node, whose
serial fields are ``int(FlowId)`` (worker and serial): for the mesh."""
KIND_NODES: Final = 0xFF2A
"""Supervisor to worker, JSON ``{"nodes": {name: null | reason gone}, "max_body"}``:
the other hubs of the mesh."""
KIND_NODE_DOWN: Final = 0xFF2B
"""Supervisor to worker: ``node_len:u8 node`` then ``int(FlowId)``s (u64): ids of that
node whose messages the mesh gave back: ``Closed(id, "down")`` for each."""

HUB_ROUTE: Final = 0xFE20
"""Mesh kind between the supervisors of two hubs: a ROUTE body whose serial fields are
``int(FlowId)``. (``tether.Mesh`` takes only application kinds, below 0xFF00; the hub
owns its mesh, so these two cannot collide with an application's.)"""
HUB_PROBE: Final = 0xFE21
"""Mesh kind between supervisors, empty: sent to a node marked gone, to learn when it is
back."""

OP_SEND: Final = 1
OP_CLOSE: Final = 2
OP_IDLE: Final = 3
OP_FANOUT: Final = 4
_OPS: Final = frozenset({OP_SEND, OP_CLOSE, OP_IDLE, OP_FANOUT})

RECORD: Final = struct.Struct("!BQII")
"""The header of a ROUTE record: op, serial, count, payload length (17 bytes)."""
_MSG_HEADER: Final = struct.Struct("!BBIIHQ")  # frame header, then MSG kind and seq
_U16: Final = struct.Struct("!H")
_F64: Final = struct.Struct("!d")
_EMPTY: Final = b""

BATCH_MAX: Final = 1024 * 1024
"""A ROUTE message is cut after the record that takes it past this many bytes."""
MAX_BODY: Final = wire.HARD_MAX_PAYLOAD
"""The largest body of any of these messages (the links' decoders accept it)."""
SERIALS_MAX: Final = 1 << 20
"""Serial lists longer than this are sent as several messages."""


def msg_header(kind: int, body_len: int) -> bytes:
    """The 20 bytes before a body of ``body_len`` bytes: frame header, kind, seq 0."""
    if body_len > MAX_BODY:
        raise ValueError(f"message body of {body_len} bytes exceeds {MAX_BODY}")
    return _MSG_HEADER.pack(wire.FrameType.MSG, 0, 0, body_len + 10, kind, 0)


def msg(kind: int, body: bytes = _EMPTY) -> bytes:
    """One whole message (the same bytes as ``wire.encode(Msg(kind, 0, body))``)."""
    return msg_header(kind, len(body)) + body


def send_record_header(serial: int, count: int, length: int) -> bytes:
    """The header of a SEND record; its payload (``length`` framed bytes) follows."""
    return RECORD.pack(OP_SEND, serial, count, length)


def close_record(serial: int) -> bytes:
    """A CLOSE record."""
    return RECORD.pack(OP_CLOSE, serial, 0, 0)


def idle_record(serial: int, seconds: float | None) -> bytes:
    """An IDLE record (None: no idle timeout)."""
    return RECORD.pack(OP_IDLE, serial, 0, 8) + _F64.pack(-1.0 if seconds is None else seconds)


def fanout_record(frame: bytes, serials: Sequence[int]) -> bytes:
    """A FANOUT record: ``frame`` for each of ``serials``."""
    return RECORD.pack(OP_FANOUT, 0, len(serials), len(frame)) + frame + pack_serials(serials)


def pack_serials(serials: Sequence[int]) -> bytes:
    """Serials as big-endian u64s."""
    return struct.pack(f"!{len(serials)}Q", *serials)


def unpack_serials(data: bytes | memoryview) -> tuple[int, ...]:
    """The u64s of ``data``; ``RemoteProtocolError`` unless its length is a multiple of 8."""
    if len(data) % 8:
        raise RemoteProtocolError(f"serial list of {len(data)} bytes is not a multiple of 8")
    return struct.unpack(f"!{len(data) // 8}Q", data)


Record = tuple[int, int, int, bytes]
"""(op, serial, count, payload) of one ROUTE record; FANOUT's payload is the frame
followed by the packed serials (``count`` of them)."""


def iter_records(body: bytes) -> Iterator[Record]:
    """The records of a ROUTE body, in order; ``RemoteProtocolError`` if one is
    truncated or has an unknown op (the records before it are yielded first)."""
    mv = memoryview(body)
    end = len(body)
    off = 0
    size = RECORD.size
    unpack = RECORD.unpack_from
    while off < end:
        if end - off < size:
            raise RemoteProtocolError(f"truncated ROUTE record: {end - off} bytes left")
        op, serial, count, length = unpack(mv, off)
        start = off + size
        stop = start + length
        if op == OP_FANOUT:
            stop += 8 * count
        if stop > end:
            raise RemoteProtocolError(f"truncated ROUTE record: needs {stop - off} bytes, "
                                      f"{end - off} left")
        if op not in _OPS:
            raise RemoteProtocolError(f"unknown ROUTE op {op}")
        yield op, serial, count, bytes(mv[start:stop]) if stop > start else _EMPTY
        off = stop


def idle_seconds(payload: bytes) -> float | None:
    """The timeout of an IDLE record's payload."""
    if len(payload) != 8:
        raise RemoteProtocolError(f"IDLE payload of {len(payload)} bytes, expected 8")
    value: float = _F64.unpack(payload)[0]
    return None if value < 0 else value


def encode_closed(reason: str, serials: Sequence[int]) -> bytes:
    """The body of a CLOSED message."""
    raw = reason.encode()[:255]
    return bytes((len(raw),)) + raw + pack_serials(serials)


def decode_closed(body: bytes) -> tuple[str, tuple[int, ...]]:
    """(reason, serials) of a CLOSED body."""
    if not body or len(body) < 1 + body[0]:
        raise RemoteProtocolError("truncated CLOSED message")
    n = body[0]
    return body[1:1 + n].decode(errors="replace"), unpack_serials(body[1 + n:])


def encode_down(worker: int, serials: Sequence[int]) -> bytes:
    """The body of a DOWN message."""
    return _U16.pack(worker) + pack_serials(serials)


def decode_down(body: bytes) -> tuple[int, tuple[int, ...]]:
    """(worker, serials) of a DOWN body."""
    if len(body) < 2:
        raise RemoteProtocolError("truncated DOWN message")
    return _U16.unpack_from(body)[0], unpack_serials(body[2:])


def encode_node(node: str, body: bytes) -> bytes:
    """``node_len:u8 node`` then ``body`` (REMOTE, NODE_DOWN)."""
    raw = node.encode()
    if len(raw) > 255:
        raise ValueError(f"node name {node!r} is longer than 255 bytes")
    return bytes((len(raw),)) + raw + body


def decode_node(body: bytes) -> tuple[str, bytes]:
    """(node, rest) of a REMOTE or NODE_DOWN body."""
    if not body or len(body) < 1 + body[0]:
        raise RemoteProtocolError("truncated node name")
    n = body[0]
    return body[1:1 + n].decode(errors="replace"), body[1 + n:]


def encode_json(value: dict[str, Any]) -> bytes:
    """A JSON body."""
    return json.dumps(value, separators=(",", ":")).encode()


def decode_json(body: bytes) -> dict[str, Any]:
    """A JSON object body; ``RemoteProtocolError`` if it is not one."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise RemoteProtocolError(f"bad JSON control message: {exc}") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError("JSON control message is not an object")
    return value
