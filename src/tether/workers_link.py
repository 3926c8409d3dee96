"""The local links of ``Hub(workers=N)`` and the router that uses them.

A :class:`LocalLink` is one Unix-domain socket between two processes of a worker pool
carrying tether frames: a HELLO each way, then ``MSG`` frames with the control kinds
of :mod:`tether.workers_wire`. There is no heartbeat: both ends are processes of one
machine, and a process that dies closes its sockets (the peer reads EOF at once).

The :class:`Router` is what a worker's (or the supervisor's) :class:`~tether.hub.Hub`
calls for an id it does not hold (``hub._router``): it checks the id can be routed
(its node is this hub, its worker is up, it is not from a worker's earlier life) and
appends a record to that worker's outbox; the outboxes are written once per loop
iteration, one ``ROUTE`` message per worker. In a worker it also reports the
connections opened and ended to the supervisor, and applies the records that other
processes route to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol

from . import wire
from .errors import ErrorCode, FlowClosed, LocalProtocolError, ProtocolError
from .hub import Closed
from .ids import FlowId
from .workers_wire import (
    BATCH_MAX,
    KIND_CLOSED,
    KIND_OPENED,
    KIND_ROUTE,
    MAX_BODY,
    OP_CLOSE,
    OP_FANOUT,
    OP_IDLE,
    OP_SEND,
    RECORD,
    SERIALS_MAX,
    close_record,
    encode_closed,
    fanout_record,
    idle_record,
    idle_seconds,
    iter_records,
    msg,
    msg_header,
    pack_serials,
    unpack_serials,
)

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["LinkOwner", "LocalLink", "Router"]

log = logging.getLogger("tether.workers")

_MAX_RECORD: Final = MAX_BODY - RECORD.size
_LINK_HIGH: Final = 4 * 1024 * 1024
_LINK_SOCKBUF: Final = 1024 * 1024
_PACK: Final = RECORD.pack
_UNPACK: Final = RECORD.unpack_from
_WARN_EVERY: Final = 1.0


class LinkOwner(Protocol):
    """Who receives what a :class:`LocalLink` reads."""

    def link_up(self, link: LocalLink) -> None:
        """The peer's HELLO arrived (``link.peer`` is its name)."""

    def link_message(self, link: LocalLink, kind: int, body: bytes) -> None:
        """A MSG frame; may raise ``ProtocolError`` (the link is then ended)."""

    def link_lost(self, link: LocalLink, exc: Exception | None) -> None:
        """The link ended (EOF, error, or closed by either side)."""


class LocalLink(asyncio.Protocol):
    """One Unix-socket link of a worker pool. The side that connects (``initiator``)
    sends HELLO first; the other answers with its own when the peer's arrives."""

    def __init__(self, name: str, owner: LinkOwner, *, initiator: bool) -> None:
        self.name = name
        self.owner = owner
        self.initiator = initiator
        self.peer: str | None = None
        self.tag: Any = None  # the owner's note (which worker this link reaches)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self._decoder = wire.FrameDecoder(max_payload=wire.HARD_MAX_PAYLOAD)
        self._drainers: list[asyncio.Future[None]] = []

    def __repr__(self) -> str:
        return f"<LocalLink {self.name}<->{self.peer or '?'}>"

    def _hello(self) -> bytes:
        return wire.encode(wire.Hello(name=self.name, max_payload=wire.HARD_MAX_PAYLOAD))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Routed messages come in bursts of up to BATCH_MAX: let a few be in flight
        # before the sender has to wait (drain) for the receiver.
        transport.set_write_buffer_limits(  # type: ignore[attr-defined]
            high=_LINK_HIGH, low=_LINK_HIGH // 4)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _LINK_SOCKBUF)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _LINK_SOCKBUF)
        if self.initiator:
            transport.write(self._hello())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            frames = self._decoder.feed(data)
            for frame in frames:
                if type(frame) is wire.Msg:
                    if self.peer is None:
                        raise LocalLinkError("MSG before HELLO")
                    self.owner.link_message(self, frame.kind, frame.body)
                elif isinstance(frame, wire.Hello):
                    if self.peer is not None:
                        raise LocalLinkError("second HELLO")
                    self.peer = frame.name
                    if not self.initiator:
                        self.write(self._hello())
                    self.owner.link_up(self)
                elif isinstance(frame, wire.GoAway):
                    log.debug("%r: the peer went away: %s", self, frame.reason)
                    self.close()
                else:
                    raise LocalLinkError(f"unexpected {type(frame).__name__} frame")
                if self.closed:
                    return
        except ProtocolError as exc:
            log.error("%r: protocol error, closing the link: %s", self, exc)
            self.write(wire.encode(wire.GoAway(0, ErrorCode.PROTOCOL_ERROR, str(exc))))
            self.close()

    def write(self, data: bytes) -> None:
        """Write ``data`` (whole messages) unless the link is closed."""
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def buffered(self) -> int:
        """Bytes written but not yet taken by the kernel."""
        if self.transport is None or self.closed:
            return 0
        return self.transport.get_write_buffer_size()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark."""
        while self.paused and not self.closed:
            fut = asyncio.get_running_loop().create_future()
            self._drainers.append(fut)
            await fut

    def close(self) -> None:
        """Close after writing what is buffered."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        self.owner.link_lost(self, exc)


class LocalLinkError(ProtocolError):
    """A peer on a local link broke the rules of docs/protocol.md "Hub worker links"."""


class _Dest:
    """Where a router sends: another worker of this hub (``node`` None), or another
    hub of the mesh (``node`` its name; records carry ``int(FlowId)``)."""

    __slots__ = ("batch", "batch_size", "dirty", "floor", "index", "limit", "link", "node",
                 "out", "out_size", "up", "wbuf")

    def __init__(self, index: int, node: str | None = None, limit: int = BATCH_MAX) -> None:
        self.index = index
        self.node = node
        self.limit = limit  # a message is cut after the record that reaches it
        self.up = node is not None
        self.floor = 0  # ids with a serial at or below it are from an earlier life
        self.link: LocalLink | None = None
        self.batch: list[bytes] = []  # records of the ROUTE message being built
        self.batch_size = 0
        self.out: list[bytes] = []  # local: whole messages; foreign: ROUTE bodies
        self.out_size = 0
        self.wbuf = 0  # the link's write buffer when last looked at (after a write)
        self.dirty = False

    def seal(self) -> int:
        """Close the ROUTE message being built; 1 if there was one."""
        if not self.batch:
            return 0
        if self.node is None:
            self.out.append(msg_header(KIND_ROUTE, self.batch_size))
            self.out.extend(self.batch)
            self.out_size += self.batch_size + 20
        else:
            self.out.append(b"".join(self.batch))
            self.out_size += self.batch_size
        self.batch = []
        self.batch_size = 0
        return 1

    def clear(self) -> None:
        self.batch = []
        self.batch_size = 0
        self.out = []
        self.out_size = 0


ForeignWriter = Callable[[str, list[bytes]], None]
"""Takes ROUTE bodies for another hub of the mesh (``int(FlowId)`` serial fields)."""


class Router:
    """Routes by ``FlowId.worker`` (and, with a mesh, ``FlowId.node``) for one hub of a
    worker pool (``me`` is its worker index, 0 in the supervisor). ``max_buffer``
    bounds what may wait for one destination; beyond it messages are dropped, counted
    (``route_dropped``) and logged."""

    def __init__(self, hub: Hub, *, me: int, workers: int, max_buffer: int) -> None:
        self.hub = hub
        self.name = hub.name
        self.me = me
        self.workers = workers
        self.max_buffer = max_buffer
        self.control: LocalLink | None = None  # a worker's link to the supervisor
        self._dests: list[_Dest | None] = [None]
        self._dests += [None if i == me else _Dest(i) for i in range(1, workers + 1)]
        self._dirty: list[_Dest] = []
        self._flushing = False
        self._opened: list[int] = []
        self._ended: dict[str, list[int]] = {}
        self._loop = asyncio.get_running_loop()
        self._warned = 0.0
        # the mesh: None without one; else node -> None (reachable) or why it is gone
        self.nodes: dict[str, str | None] | None = None
        self.foreign_writer: ForeignWriter | None = None
        self._foreign: dict[str, _Dest] = {}
        self._foreign_limit = BATCH_MAX
        # counters
        self.routed_out = 0  # messages handed to other workers
        self.routed_in = 0  # messages other processes routed here
        self.route_messages = 0  # ROUTE messages written
        self.fanouts = 0  # FANOUT records written (one per worker per send_many)
        self.closes_out = 0
        self.unroutable = 0  # routed here for a connection closed meanwhile
        self.route_dropped = 0  # over max_buffer
        self.route_lost = 0  # waiting for a worker that died
        self.downs = 0  # Closed("down") events queued here for another worker's ids
        self.to_nodes = 0  # messages handed to other hubs (through the mesh)

    def counters(self) -> dict[str, int]:
        """The routing counters by name."""
        return {"routed_out": self.routed_out, "routed_in": self.routed_in,
                "route_messages": self.route_messages, "fanouts": self.fanouts,
                "closes_out": self.closes_out, "unroutable": self.unroutable,
                "route_dropped": self.route_dropped, "route_lost": self.route_lost,
                "downs": self.downs, "to_nodes": self.to_nodes}

    # --- the other workers -------------------------------------------------------------

    def dest_up(self, index: int, floor: int, link: LocalLink | None) -> None:
        """Worker ``index`` is up, its serials above ``floor``; ``link`` reaches it (or
        None while connecting: records wait in its outbox)."""
        d = self._dests[index] if 0 < index < len(self._dests) else None
        if d is None:
            return
        d.up = True
        d.floor = floor
        self.attach(index, link)

    def attach(self, index: int, link: LocalLink | None) -> None:
        """``link`` now reaches worker ``index``: write what waited for it."""
        d = self._dests[index]
        assert d is not None
        d.link = link
        if link is not None and (d.batch or d.out):
            self._mark(d)

    def link_of(self, index: int) -> LocalLink | None:
        """The link reaching worker ``index``."""
        d = self._dests[index] if 0 < index < len(self._dests) else None
        return d.link if d is not None else None

    def dest_down(self, index: int) -> None:
        """Worker ``index`` died: ids of it raise FlowClosed until it is up again, and
        what waited for it is dropped (counted in ``route_lost``)."""
        d = self._dests[index] if 0 < index < len(self._dests) else None
        if d is None:
            return
        d.up = False
        if d.batch or d.out:
            self.route_lost += 1
        d.clear()
        link = d.link
        d.link = None
        if link is not None and link is not self.control:
            link.close()

    def link_lost(self, link: LocalLink) -> None:
        """A link to another worker ended: that worker is gone (or going)."""
        for d in self._dests:
            if d is not None and d.link is link:
                self.dest_down(d.index)

    def worker_down(self, index: int, serials: Iterable[int]) -> None:
        """Worker ``index`` died holding ``serials``: queue ``Closed(id, "down")`` for
        each in this hub's events, for the application."""
        self.dest_down(index)
        name = self.name
        self._push_down(FlowId(name, serial, index) for serial in serials)

    def _push_down(self, ids: Iterable[FlowId]) -> None:
        hub = self.hub
        if hub._state != "open" or hub._pool is not None:
            return
        n = 0
        for fid in ids:
            hub._push_close(Closed(fid, "down"))
            n += 1
        self.downs += n

    # --- the other hubs ------------------------------------------------------------------

    def set_nodes(self, nodes: dict[str, str | None], max_body: int) -> None:
        """The other hubs of the mesh, and why each gone one is gone (None: reachable);
        ``max_body`` is the largest ROUTE body the mesh carries."""
        self.nodes = dict(nodes)
        self._foreign_limit = max(1024, min(BATCH_MAX, max_body))
        for node, reason in nodes.items():
            if reason is not None:
                d = self._foreign.pop(node, None)
                if d is not None and (d.batch or d.out):
                    self.route_lost += 1

    def node_down(self, node: str, values: Iterable[int]) -> None:
        """The mesh gave back messages for these ids of ``node``: ``Closed(id, "down")``
        for each, in this hub's events."""
        self._push_down(FlowId.from_int(v, node) for v in values)

    # --- choosing a destination ------------------------------------------------------------

    def _dest(self, id: FlowId) -> _Dest:
        """The destination of ``id``, or FlowClosed saying why there is none."""
        if id.node != self.name:
            return self._foreign_dest(id)
        w = id.worker
        d = self._dests[w] if 0 < w < len(self._dests) else None
        if d is None:
            if w == self.me:
                raise FlowClosed(f"connection {id} is closed or unknown")
            raise FlowClosed(f"connection {id} is unknown: hub {self.name!r} has workers "
                             f"1..{self.workers}")
        if not d.up:
            raise FlowClosed(f"connection {id} is closed: worker {w} of hub {self.name!r} "
                             "is down")
        if id.serial <= d.floor:
            raise FlowClosed(f"connection {id} is closed: worker {w} of hub {self.name!r} "
                             "restarted since")
        return d

    def _foreign_dest(self, id: FlowId) -> _Dest:
        nodes = self.nodes
        node = id.node
        if nodes is None:
            raise FlowClosed(f"connection {id} is held by node {node!r}, not by this hub "
                             f"({self.name!r}), which has no mesh to reach other nodes")
        if node not in nodes:
            raise FlowClosed(f"connection {id} is held by node {node!r}, which is not in the "
                             f"mesh of hub {self.name!r}")
        gone = nodes[node]
        if gone is not None:
            raise FlowClosed(f"connection {id} is closed: node {node!r} is gone ({gone})")
        d = self._foreign.get(node)
        if d is None:
            d = self._foreign[node] = _Dest(0, node, self._foreign_limit)
        return d

    def _room(self, d: _Dest, count: int) -> bool:
        # another hub's records leave a worker through its link to the supervisor
        link = d.link if d.node is None else self.control
        d.wbuf = link.buffered() if link is not None else 0
        if d.batch_size + d.out_size + d.wbuf <= self.max_buffer:
            return True
        self.route_dropped += count
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            to = f"node {d.node}" if d.node is not None else f"worker {d.index}"
            log.warning("hub %s worker %d: more than %d bytes wait for %s: dropping "
                        "(%d dropped so far); see tether.workers.drain()", self.name, self.me,
                        self.max_buffer, to, self.route_dropped)
        return False

    def _mark(self, d: _Dest) -> None:
        if not d.dirty:
            d.dirty = True
            self._dirty.append(d)
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self.flush)

    def _add(self, d: _Dest, record: bytes) -> None:
        if d.batch and d.batch_size + len(record) > d.limit:
            self.route_messages += d.seal()
        d.batch.append(record)
        d.batch_size += len(record)
        if d.batch_size >= d.limit:
            self.route_messages += d.seal()
        self._mark(d)

    def _too_large(self, d: _Dest, n: int) -> LocalProtocolError:
        to = f"node {d.node!r} (the mesh carries" if d.node is not None \
            else "another worker (at most"
        return LocalProtocolError(f"a message of {n} bytes cannot be routed to {to} "
                                  f"{d.limit - RECORD.size if d.node else _MAX_RECORD} "
                                  "bytes)")

    # --- the hub's _Router protocol ---------------------------------------------------

    def send(self, id: FlowId, frame: bytes, count: int) -> None:
        """Route ``frame`` (``count`` framed messages) to the holder of ``id``."""
        w = id.worker
        d = self._dests[w] if w < len(self._dests) else None
        if d is None or not d.up or id.serial <= d.floor or id.node != self.name:
            d = self._dest(id)  # another hub's id, or FlowClosed with the reason
        n = len(frame)
        if d.node is not None:
            if n + RECORD.size > d.limit:
                raise self._too_large(d, n)
            if self._room(d, count):
                self.to_nodes += count
                self._add(d, _PACK(OP_SEND, int(id), count, n) + frame)
            return
        if n > _MAX_RECORD:
            raise self._too_large(d, n)
        size = d.batch_size + n + 17
        if size + d.out_size + d.wbuf > self.max_buffer and not self._room(d, count):
            return
        batch = d.batch
        batch.append(_PACK(OP_SEND, id.serial, count, n))
        batch.append(frame)
        d.batch_size = size
        self.routed_out += count
        if size >= BATCH_MAX:
            self.route_messages += d.seal()
        if not d.dirty:
            d.dirty = True
            self._dirty.append(d)
            if not self._flushing:
                self._flushing = True
                self._loop.call_soon(self.flush)

    def send_many(self, ids: list[FlowId], frame: bytes) -> list[FlowId]:
        """Route ``frame`` to every id of ``ids``: one FANOUT record per destination
        (worker, or other hub). Returns the ids that cannot be routed."""
        missing: list[FlowId] = []
        groups: dict[_Dest, list[int]] = {}
        for id in ids:
            try:
                d = self._dest(id)
            except FlowClosed:
                missing.append(id)
                continue
            group = groups.get(d)
            if group is None:
                groups[d] = [id.serial if d.node is None else int(id)]
            else:
                group.append(id.serial if d.node is None else int(id))
        for d, serials in groups.items():
            room = (d.limit if d.node is not None else _MAX_RECORD) - RECORD.size - len(frame)
            per = min(SERIALS_MAX, room // 8)
            if per < 1:
                raise self._too_large(d, len(frame))
            if not self._room(d, len(serials)):
                continue
            if d.node is None:
                self.routed_out += len(serials)
            else:
                self.to_nodes += len(serials)
            for i in range(0, len(serials), per):
                self.fanouts += 1
                self._add(d, fanout_record(frame, serials[i:i + per]))
        return missing

    def close(self, id: FlowId) -> bool:
        """Route ``hub.close(id)``; False if ``id`` cannot be routed."""
        try:
            d = self._dest(id)
        except FlowClosed:
            return False
        self.closes_out += 1
        self._add(d, close_record(id.serial if d.node is None else int(id)))
        return True

    def set_idle_timeout(self, id: FlowId, seconds: float | None) -> None:
        """Route ``hub.set_idle_timeout(id, seconds)``."""
        d = self._dest(id)
        self._add(d, idle_record(id.serial if d.node is None else int(id), seconds))

    def opened(self, serial: int) -> None:
        """This worker accepted connection ``serial`` (reported to the supervisor)."""
        if self.control is not None:
            self._opened.append(serial)
            if not self._flushing:
                self._flushing = True
                self._loop.call_soon(self.flush)

    def ended(self, serial: int, reason: str) -> None:
        """Connection ``serial`` of this worker ended (reported to the supervisor)."""
        if self.control is not None:
            serials = self._ended.get(reason)
            if serials is None:
                self._ended[reason] = [serial]
            else:
                serials.append(serial)
            if not self._flushing:
                self._flushing = True
                self._loop.call_soon(self.flush)

    # --- writing -----------------------------------------------------------------------

    def flush(self) -> None:
        """Write every outbox whose link is connected, and the reports."""
        self._flushing = False
        control = self.control
        if control is not None and (self._opened or self._ended):
            # opens first: a connection opened and ended in one iteration is in both
            parts: list[bytes] = []
            opened = self._opened
            self._opened = []
            for i in range(0, len(opened), SERIALS_MAX):
                parts.append(msg(KIND_OPENED, pack_serials(opened[i:i + SERIALS_MAX])))
            ended = self._ended
            self._ended = {}
            for reason, serials in ended.items():
                for i in range(0, len(serials), SERIALS_MAX):
                    parts.append(msg(KIND_CLOSED,
                                     encode_closed(reason, serials[i:i + SERIALS_MAX])))
            control.write(b"".join(parts))
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for d in dirty:
            d.dirty = False
            if d.node is not None:
                self.route_messages += d.seal()
                out = d.out
                d.clear()
                if self.foreign_writer is not None:
                    self.foreign_writer(d.node, out)
                continue
            link = d.link
            if link is None:
                continue  # still connecting: attach() marks it again
            self.route_messages += d.seal()
            out = d.out
            d.out = []
            d.out_size = 0
            link.write(b"".join(out))
            d.wbuf = link.buffered()

    async def drain(self) -> None:
        """Write the outboxes now and wait until no link to another worker is above
        its high-water mark."""
        self.flush()
        for dest in self._dests:
            if dest is not None and dest.link is not None:
                await dest.link.drain()

    # --- receiving ---------------------------------------------------------------------

    def apply(self, body: bytes) -> None:
        """Carry out the records of a ROUTE message on this worker's hub."""
        hub = self.hub
        conns = hub._conns
        queue = hub._queue
        # the common case inline: a run of SEND records
        end = len(body)
        off = 0
        routed = unroutable = 0
        try:
            while end - off >= 17:
                op, serial, count, length = _UNPACK(body, off)
                if op != OP_SEND:
                    break
                start = off + 17
                stop = start + length
                if stop > end:
                    break
                routed += count
                conn = conns.get(serial)
                if conn is None:
                    unroutable += count
                else:
                    queue(conn, body[start:stop], count)
                off = stop
        finally:
            self.routed_in += routed
            self.unroutable += unroutable
        if off < end:
            self._apply_rest(body[off:] if off else body)

    def _apply_rest(self, body: bytes) -> None:
        hub = self.hub
        deliver = hub._deliver
        conns = hub._conns
        for op, serial, count, payload in iter_records(body):
            if op == OP_SEND:
                self.routed_in += count
                if not deliver(serial, payload, count):
                    self.unroutable += count
            elif op == OP_FANOUT:
                cut = len(payload) - 8 * count
                frame = payload[:cut]
                self.routed_in += count
                for s in unpack_serials(payload[cut:]):
                    if not deliver(s, frame, 1):
                        self.unroutable += 1
            elif op == OP_CLOSE:
                conn = conns.get(serial)
                if conn is None:
                    self.unroutable += 1
                else:
                    hub.close(conn.fid)
            elif op == OP_IDLE:
                seconds = idle_seconds(payload)
                conn = conns.get(serial)
                if conn is None:
                    self.unroutable += 1
                else:
                    with contextlib.suppress(FlowClosed, ValueError):
                        hub.set_idle_timeout(conn.fid, seconds)

    def apply_from_node(self, body: bytes) -> None:
        """Carry out, from the supervisor, the records another hub sent over the mesh
        (``int(FlowId)`` serial fields): route each to the worker holding its id."""
        name = self.name
        from_int = FlowId.from_int
        for op, value, count, payload in iter_records(body):
            try:
                if op == OP_SEND:
                    self.routed_in += count
                    self.send(from_int(value, name), payload, count)
                elif op == OP_FANOUT:
                    cut = len(payload) - 8 * count
                    self.routed_in += count
                    ids = [from_int(v, name) for v in unpack_serials(payload[cut:])]
                    self.unroutable += len(self.send_many(ids, payload[:cut]))
                elif op == OP_CLOSE:
                    if not self.close(from_int(value, name)):
                        self.unroutable += 1
                elif op == OP_IDLE:
                    self.set_idle_timeout(from_int(value, name), idle_seconds(payload))
            except (FlowClosed, ValueError):
                self.unroutable += max(count, 1)
