"""Handlers that the worker processes of tests/test_workers.py import by name (this
module holds no test; it imports nothing heavy, as every worker imports it).

``commands`` speaks lines; each line is a command, answered on the same connection:

* ``ID`` -> ``ID <id>`` (the connection's own id)
* ``SEND <id> <text>`` -> nothing: ``hub.send(id, text)`` (any worker's id)
* ``BATCH <id> <a,b,c>`` -> nothing: ``hub.send_batch(id, [a, b, c])``
* ``CLOSE <id>`` -> ``CLOSE True|False``: ``hub.close(id)``
* ``MANY <text> <id,id,...>`` -> ``MANY sent``: ``hub.send_many(ids, text)``
* ``IDLE <id> <seconds>`` -> ``IDLE set``: ``hub.set_idle_timeout(id, seconds)``
* ``WATCH`` -> ``WATCHING``; from then on ``DOWN <id>`` for every ``Closed(id,
  "down")`` this worker's handler receives, and ``GONE <id> <reason>`` for every other
  ``Closed``
* ``PING`` -> ``PONG <worker>``

A command that raises ``FlowClosed`` is answered ``ERR <message>``.
"""

from __future__ import annotations

from tether.errors import FlowClosed
from tether.hub import Closed, Data, Hub
from tether.ids import FlowId


async def commands(hub: Hub) -> None:
    watchers: set[FlowId] = set()
    async for event in hub:
        if isinstance(event, Closed):
            watchers.discard(event.id)
            note = f"DOWN {event.id}" if event.reason == "down" \
                else f"GONE {event.id} {event.reason}"
            for watcher in watchers:
                hub.send(watcher, note.encode())
            continue
        if not isinstance(event, Data):
            continue
        me = event.id
        cmd, _, rest = event.data.partition(b" ")
        try:
            if cmd == b"ID":
                hub.send(me, f"ID {me}".encode())
            elif cmd == b"SEND":
                target, _, text = rest.partition(b" ")
                hub.send(FlowId.parse(target.decode()), text)
            elif cmd == b"BATCH":
                target, _, texts = rest.partition(b" ")
                hub.send_batch(FlowId.parse(target.decode()), texts.split(b","))
            elif cmd == b"CLOSE":
                ok = hub.close(FlowId.parse(rest.decode()))
                hub.send(me, f"CLOSE {ok}".encode())
            elif cmd == b"MANY":
                text, _, ids = rest.partition(b" ")
                hub.send_many([FlowId.parse(i) for i in ids.decode().split(",")], text)
                hub.send(me, b"MANY sent")
            elif cmd == b"IDLE":
                target, _, seconds = rest.partition(b" ")
                hub.set_idle_timeout(FlowId.parse(target.decode()), float(seconds))
                hub.send(me, b"IDLE set")
            elif cmd == b"WATCH":
                watchers.add(me)
                hub.send(me, b"WATCHING")
            elif cmd == b"PING":
                hub.send(me, f"PONG {hub.worker}".encode())
        except FlowClosed as exc:
            if hub.is_open(me):
                hub.send(me, f"ERR {exc}".encode())


async def crash_on_start(hub: Hub) -> None:
    raise RuntimeError("this handler fails at once")
