"""The decoders of the local links of ``Hub(workers=N)`` (tether.workers_wire), fed
arbitrary bytes, raise only ``RemoteProtocolError`` (what ``LocalLink`` turns into a
GOAWAY to the sender, a log line and the end of that link alone), never another
exception; a deeply nested JSON control body is such bad input too."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether import wire
from tether.errors import ErrorCode, RemoteProtocolError
from tether.workers_link import LocalLink
from tether.workers_wire import (
    RECORD,
    decode_closed,
    decode_down,
    decode_json,
    decode_node,
    idle_seconds,
    iter_records,
    msg,
    unpack_serials,
)

DECODERS: list[Callable[[bytes], Any]] = [
    lambda b: list(iter_records(b)), decode_closed, decode_down, decode_node, decode_json,
    unpack_serials, idle_seconds,
]
NESTED = b"[" * 100_000


def _only_protocol_errors(body: bytes) -> None:
    for decode in DECODERS:
        with contextlib.suppress(RemoteProtocolError):
            decode(body)


@given(st.binary(max_size=300))
def test_decoders_raise_only_the_protocol_error_on_any_bytes(body: bytes) -> None:
    _only_protocol_errors(body)


@given(st.integers(0, 255), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.binary(max_size=100))
def test_route_records_with_any_header_raise_only_the_protocol_error(
        op: int, serial: int, count: int, length: int, rest: bytes) -> None:
    _only_protocol_errors(RECORD.pack(op, serial, count, length) + rest)


@given(st.sampled_from([b"[", b"{\"a\":"]), st.integers(1, 200_000))
def test_nested_json_is_a_protocol_error(opener: bytes, depth: int) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_json(opener * depth)


class _JsonOwner:
    """Decodes every MSG body as a JSON control message (as the supervisor does with
    a worker's STATS and READY)."""

    def link_up(self, link: LocalLink) -> None:
        pass

    def link_message(self, link: LocalLink, kind: int, body: bytes) -> None:
        decode_json(body)

    def link_lost(self, link: LocalLink, exc: Exception | None) -> None:
        pass


async def test_nested_json_on_a_link_gets_goaway_and_ends_only_that_link(
        tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    path = str(tmp_path / "s.sock")
    server = await loop.create_unix_server(
        lambda: LocalLink("sup", _JsonOwner(), initiator=False), path)
    try:
        def peer() -> list[wire.Frame]:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(wire.encode(wire.Hello(name="w1", max_payload=1 << 20)) +
                         msg(0xFF26, NESTED))
            decoder = wire.FrameDecoder(max_payload=wire.HARD_MAX_PAYLOAD)
            frames: list[wire.Frame] = []
            while chunk := sock.recv(65536):
                frames += decoder.feed(chunk)
            sock.close()
            return frames

        frames = await asyncio.wait_for(asyncio.to_thread(peer), 10)
        goaways = [f for f in frames if isinstance(f, wire.GoAway)]
        assert goaways and goaways[0].code == ErrorCode.PROTOCOL_ERROR, frames
    finally:
        server.close()

