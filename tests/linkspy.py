"""Seeing a link's events from a test: `spy_on_links` routes them through a function.

Tests used to replace `link_event` on a `Gateway` or `Node`. The compiled build's
classes (`TETHER_COMPILE=1`) refuse that, and a subclass of them in a test ("interpreted
classes cannot inherit from compiled"): the spy sits on the link instead, as its
handler, and hands every event on to the real one."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from tether.aio import LinkConnection, LinkHandler
from tether.events import Event

Handle = Callable[[LinkConnection, Event], None]
"""A handler's `link_event`, which a spy calls to pass the event on."""
Spy = Callable[[LinkConnection, Event, Handle], None]


class _SpyHandler:
    """A link's handler that shows each event to `spy`, with the real handler's
    `link_event` to call; anything else is the real handler's."""

    def __init__(self, handler: LinkHandler, spy: Spy) -> None:
        self.handler = handler
        self.spy = spy

    def link_event(self, conn: LinkConnection, event: Event) -> None:
        self.spy(conn, event, self.handler.link_event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handler, name)


def spy_on_links(conns: Iterable[LinkConnection], spy: Spy) -> None:
    """From now on, every event of `conns` goes through `spy(conn, event, handle)`,
    which must call `handle(conn, event)` for the handler to see it."""
    for conn in list(conns):
        conn.handler = _SpyHandler(conn.handler, spy)
