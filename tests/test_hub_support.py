"""Helpers shared by the hub tests (this module holds no test): both event loops,
clients over real sockets, and the per-connection order checker."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from tether.errors import FlowClosed
from tether.hub import Closed, Data, Hub, HubEvent, Opened
from tether.ids import FlowId

T = TypeVar("T")

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
Run = Callable[..., Any]  # what the `arun` fixture (conftest) gives


def runner_for(kind: str) -> Callable[..., Any]:
    """Run a coroutine to completion on a fresh loop of ``kind``, within a timeout;
    fail on any exception the loop's handler saw."""
    factory = LOOPS[kind]

    def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        errors: list[dict[str, Any]] = []

        async def main() -> T:
            asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
            return await asyncio.wait_for(coro, timeout)

        with asyncio.Runner(loop_factory=factory) as runner:
            result = runner.run(main())
        assert not errors, errors
        return result

    return run


async def until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Wait (polling the loop) until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.005)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a RST (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Recorder:
    """Consumes a hub into per-id event lists and checks the contract as it goes."""

    def __init__(self, hub: Hub, echo: bool = False) -> None:
        self.hub = hub
        self.echo = echo
        self.by_id: dict[FlowId, list[HubEvent]] = {}
        self.opened: list[FlowId] = []
        self.closed: dict[FlowId, str] = {}
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Recorder:
        self.task = asyncio.ensure_future(self.run())
        return self

    async def run(self) -> None:
        async for event in self.hub:
            self.record(event)

    def record(self, event: HubEvent) -> None:
        events = self.by_id.setdefault(event.id, [])
        if isinstance(event, Opened):
            assert not events, f"Opened after other events: {events}"
            self.opened.append(event.id)
        else:
            assert events and isinstance(events[0], Opened), f"{event} before Opened"
            assert not isinstance(events[-1], Closed), f"{event} after Closed"
        if isinstance(event, Closed):
            self.closed[event.id] = event.reason
        events.append(event)
        if self.echo and isinstance(event, Data):
            with contextlib.suppress(FlowClosed):  # gone meanwhile
                self.hub.send(event.id, event.data)

    def data(self, fid: FlowId) -> list[bytes]:
        return [e.data for e in self.by_id.get(fid, []) if isinstance(e, Data)]

    def check_exactly_once(self, still_open: int = 0) -> None:
        """Every connection has exactly one Closed, last (but ``still_open`` of them,
        which have none yet)."""
        open_now = 0
        for fid, events in self.by_id.items():
            closes = [e for e in events if isinstance(e, Closed)]
            if not closes:
                open_now += 1
                continue
            assert len(closes) == 1, (fid, events)
            assert events[-1] is closes[0]
        assert open_now == still_open

    async def stop(self) -> None:
        """Stop consuming; re-raise what ended the consumer early (a broken contract
        that `record` asserted, e.g. an event after the Closed of its id)."""
        if self.task is not None:
            self.task.cancel()
            (ended,) = await asyncio.gather(self.task, return_exceptions=True)
            if isinstance(ended, BaseException) \
                    and not isinstance(ended, asyncio.CancelledError):
                raise ended


async def gather_all(*aws: Awaitable[Any]) -> list[Any]:
    return list(await asyncio.gather(*aws))
