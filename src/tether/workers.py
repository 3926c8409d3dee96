"""tether.workers — one hub over several processes: every core, more connections than
one process may hold, the same API.

``Hub(host, port, workers=N, handler=h)`` (or :func:`serve`, or ``tether hub
--workers N --handler module:function``) starts N worker processes. Each has its own
loop (uvloop), its own :class:`~tether.hub.Hub` bound to the same port with
SO_REUSEPORT (the kernel spreads new connections over them), its own idle-timeout
wheel, and runs ``await h(hub)`` on it, as gunicorn or uvicorn workers run the
application. Ids name their worker (``FlowId.worker`` = 1..N) and the hub
(``FlowId.node`` = ``name``), so ``hub.send(id, data)``, ``send_batch``,
``send_many``, ``close`` and ``set_idle_timeout`` called in any worker (or in the
supervisor) reach the worker that holds ``id``, over local links between the
processes (Unix-domain sockets carrying tether MSG frames; docs/protocol.md "Hub
worker links"), in order per connection. ``send_many`` sends one message per worker
whatever the number of connections.

The process that called ``start`` is the *supervisor*: it reserves the port, starts
the workers, tracks which connections each holds, restarts a worker that dies and
delivers ``Closed(id, "down")`` for each of its connections to the handlers of the
surviving workers (the documented callback: those events, in each survivor's event
stream; and ``WorkerPool.on_worker_down(worker, ids)`` in the supervisor), sums the
workers' counters (``hub.stats()``, ``tether status``), and drains every worker on
``aclose``. See docs/workers.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final, TypeAlias

from .admin import AdminServer
from .aio import parse_address, run
from .errors import FlowClosed, LocalProtocolError, PeerUnreachable, ProtocolError, TetherError
from .framing import Framing, LengthPrefixed, Lines, Raw
from .hub import Hub, HubStats, Messages
from .ids import FlowId
from .mesh import Mesh, PeerState, QueueFull
from .tlsfiles import ServerTLS, add_server_tls_arguments
from .workers_link import LocalLink, LocalLinkError, Router
from .workers_proc import ENV_WORKER, EXIT_BAD_HANDLER, framing_spec, rss_bytes, worker_main
from .workers_wire import (
    HUB_PROBE,
    HUB_ROUTE,
    KIND_CLOSED,
    KIND_DOWN,
    KIND_NODE_DOWN,
    KIND_NODES,
    KIND_OPENED,
    KIND_READY,
    KIND_REMOTE,
    KIND_SHUTDOWN,
    KIND_STATS,
    KIND_STATS_REQUEST,
    KIND_UP,
    OP_FANOUT,
    SERIALS_MAX,
    decode_closed,
    decode_json,
    decode_node,
    encode_down,
    encode_json,
    encode_node,
    iter_records,
    msg,
    pack_serials,
    unpack_serials,
)

__all__ = [
    "Handler",
    "WorkerPool",
    "WorkersFailed",
    "add_hub_subcommand",
    "drain",
    "echo",
    "main",
    "pool_of",
    "serve",
]

log = logging.getLogger("tether.workers")

Handler: TypeAlias = "str | Callable[[Hub], Awaitable[None]]"
"""What runs in every worker: ``"module:function"``, or a module-level async function
(the workers import it by name), called with the worker's hub."""

_SUMMED: Final = ("bytes_in", "bytes_out", "messages_in", "messages_out", "dropped",
                  "incomplete", "handshakes_failed", "refused", "over_limit")
_GAUGES: Final = ("queued", "queued_bytes", "paused")
_FLOOR_STEP: Final = 1 << 24  # a restarted worker's serials start above a multiple of it
_MESH_TICK: Final = 0.25  # seconds between looks at the mesh's peers


class WorkersFailed(TetherError):
    """The worker processes could not be started (a worker exited before it was ready,
    or did not become ready in time); its log, on stderr, says why."""


def handler_ref(handler: Handler) -> dict[str, str]:
    """How a worker finds ``handler``: ``{"module", "qualname"}``, or ``{"path",
    "qualname"}`` for a function of the script run as ``__main__``."""
    if isinstance(handler, str):
        module, sep, qualname = handler.partition(":")
        if not sep or not module or not qualname:
            raise ValueError(f"handler {handler!r}: expected 'module:function'")
        return {"module": module, "qualname": qualname}
    if not callable(handler):
        raise TypeError(f"handler must be 'module:function' or a function, got {handler!r}")
    mod: str | None = getattr(handler, "__module__", None)
    qual: str | None = getattr(handler, "__qualname__", None)
    if not mod or not qual or "<" in qual:
        raise ValueError(f"handler {handler!r} must be a module-level function: every worker "
                         "imports it by name (or pass 'module:function')")
    if mod == "__main__":
        path = getattr(sys.modules["__main__"], "__file__", None)
        if not path:
            raise ValueError(f"handler {qual} is defined in an interactive __main__: "
                             "put it in a module and pass 'module:function'")
        return {"path": os.path.abspath(path), "qualname": qual}
    return {"module": mod, "qualname": qual}


def _describe_exit(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-rc).name}"
        return f"killed by signal {-rc}"
    if rc == EXIT_BAD_HANDLER:
        return "exit code 3: the handler could not be loaded"
    return f"exit code {rc}"


def _kill(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with SO_REUSEPORT: it holds the
    port for the workers (port 0 picks one) and never receives a connection."""
    family, type_, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


class _Slot:
    """One worker index of the pool and its current process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0
        self.link: LocalLink | None = None
        self.state = "new"  # starting, up, down, stopped
        self.floor = 0
        self.max_serial = 0
        self.open: set[int] = set()
        self.stats: dict[str, Any] | None = None
        self.stats_seen = 0
        self.started = 0.0
        self.backoff = 0.0
        self.restarts = 0
        self.ready: asyncio.Future[None] | None = None
        self.exit: int | None = None  # the last process's exit code
        self.watcher: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None


class WorkerPool:
    """The supervisor of ``Hub(workers=N, handler=...)``: made by the hub, reached with
    :func:`pool_of`. Settable before ``start``: ``on_worker_down(worker, ids)`` (called
    in the supervisor when a worker dies, with the ids it held), ``stats_interval``
    (seconds between the workers' counter reports), ``start_timeout``,
    ``max_route_buffer`` (bytes that may wait for one worker in each process),
    ``log_level`` (of the workers; default: this process's) and ``mesh``: a
    :class:`~tether.Mesh` named like the hub, not started, whose peers are other hubs:
    ids of those nodes are then routed to them (the pool starts, owns and closes it)."""

    def __init__(self, hub: Hub, workers: int, handler: Handler | None) -> None:
        """Check the configuration; nothing starts until ``hub.start()``."""
        if handler is None:
            raise ValueError("Hub(workers=N) needs a handler ('module:function' or a "
                             "module-level async function) to run in every worker")
        if isinstance(workers, bool) or not isinstance(workers, int) \
                or not 1 <= workers <= 0xFFFF:
            raise ValueError(f"workers must be an int in [1, 65535], got {workers!r}")
        if hub._tls is not None and hub._tls_files is None:
            raise ValueError("Hub(workers=N) takes TLS as files, tls=tether.ServerTLS(cert, "
                             "key, client_ca): an ssl.SSLContext cannot be handed to the "
                             "worker processes")
        framing_spec(hub._framing)  # the framing must cross the process boundary
        self.hub = hub
        self.workers = workers
        self.handler = handler_ref(handler)
        self.handler_text = handler if isinstance(handler, str) else \
            f"{self.handler.get('module') or self.handler['path']}:{self.handler['qualname']}"
        self.on_worker_down: Callable[[int, list[FlowId]], None] | None = None
        self.stats_interval = 1.0
        self.start_timeout = 30.0
        self.max_route_buffer = 64 * 1024 * 1024
        self.log_level: int | None = None
        self.mesh: Mesh | None = None
        self.restarts = 0
        self.port = 0
        self.run_dir: Path | None = None
        self._slots = [_Slot(i) for i in range(1, workers + 1)]
        self._stopping = False
        self._starting = False
        self._closed: asyncio.Future[None] | None = None
        self._reserve: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._router: Router | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stats_event: asyncio.Event | None = None
        self._opened = 0
        self._closed_by: dict[str, int] = {}
        self._retired: dict[str, int] = dict.fromkeys(_SUMMED, 0)
        self._retired_routing: dict[str, int] = {}
        self._nodes: dict[str, str | None] = {}  # the other hubs: None, or why gone
        self._mesh_tasks: set[asyncio.Task[None]] = set()
        self._mesh_watcher: asyncio.Task[None] | None = None
        self._mesh_counters = {"from_nodes": 0, "mesh_failed": 0, "mesh_refused": 0}
        # ids of each gone (or removed) node already closed "down", until it is back: the
        # mesh may give back messages for one id in two reports (one for what was queued
        # when the node was found gone, one for what a worker routed before it heard)
        self._down_reported: dict[str, set[int]] = {}

    def __repr__(self) -> str:
        return f"<WorkerPool {self.hub.name} port={self.port} workers={self.workers}>"

    # --- life ----------------------------------------------------------------------------

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def _config(self) -> dict[str, Any]:
        hub = self.hub
        sockopts = hub._sockopts
        assert self.run_dir is not None
        return {
            "name": hub.name, "host": hub._host, "port": self.port, "workers": self.workers,
            "run_dir": str(self.run_dir), "handler": self.handler,
            "handler_text": self.handler_text, "sys_path": list(sys.path),
            "log_level": self.log_level if self.log_level is not None
            else logging.getLogger().getEffectiveLevel(),
            "stats_interval": self.stats_interval, "max_route_buffer": self.max_route_buffer,
            "hub": {
                "framing": framing_spec(hub._framing), "idle_timeout": hub._idle_timeout,
                "backlog": hub._backlog,
                "sockopts": asdict(sockopts) if sockopts is not None else None,
                "handshake_timeout": hub._handshake_timeout, "queue_high": hub._high,
                "queue_low": hub._low, "max_write_buffer": hub._wlimit,
                "slow_consumer": "drop" if hub._slow_drop else "disconnect",
                "linger": hub._linger, "close_timeout": hub._close_timeout,
                "max_unseen_opens": hub._max_unseen,
                "max_connections": hub._max_conns_given,
                "tls": hub._tls_files.to_json() if hub._tls_files is not None else None,
            },
        }

    async def start(self) -> None:
        """Reserve the port, start every worker, return when all listen."""
        hub = self.hub
        if hub._state != "new":
            raise RuntimeError(f"the hub is {hub._state}: a hub starts only once")
        if os.environ.get(ENV_WORKER):
            raise RuntimeError("a worker process cannot start workers of its own: guard the "
                               "script's entry point with `if __name__ == '__main__':`")
        loop = asyncio.get_running_loop()
        hub._loop = loop
        hub._time = loop.time
        hub._call_soon = loop.call_soon
        mesh = self.mesh
        if mesh is not None and mesh.name != hub.name:
            raise ValueError(f"the mesh of hub {hub.name!r} must be named {hub.name!r}, "
                             f"not {mesh.name!r}: ids name their hub by it")
        hub._state = "starting"
        self._starting = True
        self._stats_event = asyncio.Event()
        try:
            if mesh is not None:
                await mesh.start()
                self._nodes = dict.fromkeys(mesh.peers())
                for slot in self._slots:  # ids of one run of this hub never name another
                    slot.floor = secrets.randbelow(1 << 20) * _FLOOR_STEP
            self._reserve = _reserve_port(hub._host, hub._port)
            self.port = self._reserve.getsockname()[1]
            self.run_dir = Path(tempfile.mkdtemp(prefix="tether-hub-"))
            (self.run_dir / "config.json").write_text(json.dumps(self._config()))
            self._server = await loop.create_unix_server(
                lambda: LocalLink(f"{hub.name}/supervisor", self, initiator=False),
                str(self.run_dir / "supervisor.sock"))
            self._router = Router(hub, me=0, workers=self.workers,
                                  max_buffer=self.max_route_buffer)
            hub._router = self._router
            if mesh is not None:
                self._router.set_nodes(self._nodes, mesh.max_message)
                self._router.foreign_writer = self._to_node
            for slot in self._slots:
                slot.ready = loop.create_future()
                await self._spawn(slot)
            ready = [slot.ready for slot in self._slots if slot.ready is not None]
            done, pending = await asyncio.wait(ready, timeout=self.start_timeout,
                                               return_when=asyncio.FIRST_EXCEPTION)
            failed = [f.exception() for f in done if f.exception() is not None]
            if failed:
                raise failed[0]  # type: ignore[misc]
            if pending:
                late = [s.index for s in self._slots if s.ready in pending]
                raise WorkersFailed(f"worker(s) {late} not ready within "
                                    f"{self.start_timeout} s")
        except BaseException:
            self._stopping = True
            await self._stop_processes(0.0)
            await self._close_mesh()
            await self._teardown()
            hub._state = "closed"
            hub._ended = True
            raise
        finally:
            self._starting = False
            for slot in self._slots:
                if slot.ready is not None and not slot.ready.done():
                    slot.ready.cancel()
                slot.ready = None
        hub._port = self.port
        hub._state = "open"
        if mesh is not None:
            for coro in (self._mesh_messages(mesh), self._mesh_failures(mesh),
                         self._mesh_watch(mesh)):
                task = asyncio.ensure_future(coro)
                self._mesh_tasks.add(task)
                task.add_done_callback(self._mesh_tasks.discard)
            self._mesh_watcher = task
            mesh.broadcast(b"", kind=HUB_PROBE)  # sessions up before the first id is used
        log.info("hub %s: %d worker(s) listening on port %d (handler %s)", hub.name,
                 self.workers, self.port, self.handler_text)

    async def _spawn(self, slot: _Slot) -> None:
        assert self.run_dir is not None
        loop = asyncio.get_running_loop()
        slot.state = "starting"
        slot.started = loop.time()
        slot.stats = None
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tether.workers", "--worker",
            str(self.run_dir / "config.json"), str(slot.index), str(slot.floor),
            stdin=asyncio.subprocess.DEVNULL)
        slot.proc = proc
        slot.pid = proc.pid
        slot.watcher = self._spawn_task(self._watch(slot, proc))
        slot.timer = loop.call_later(self.start_timeout, self._not_ready, slot, proc)
        if self._stopping:  # aclose() came while this process was being started
            _kill(proc.pid, signal.SIGTERM)
        log.debug("hub %s: worker %d started (pid %d)", self.hub.name, slot.index, proc.pid)

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _watch(self, slot: _Slot, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        self._exited(slot, proc, rc)

    def _not_ready(self, slot: _Slot, proc: asyncio.subprocess.Process) -> None:
        slot.timer = None
        if slot.proc is proc and slot.state == "starting" and not self._starting:
            log.error("hub %s: worker %d (pid %d) not ready after %.0f s: killing it",
                      self.hub.name, slot.index, proc.pid, self.start_timeout)
            _kill(proc.pid, signal.SIGKILL)

    def _exited(self, slot: _Slot, proc: asyncio.subprocess.Process, rc: int) -> None:
        if slot.proc is not proc:
            return
        slot.proc = None
        slot.exit = rc
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        how = _describe_exit(rc)
        if self._starting and slot.ready is not None and not slot.ready.done():
            slot.state = "down"
            slot.ready.set_exception(WorkersFailed(
                f"worker {slot.index} of hub {self.hub.name} ({self.handler_text}) exited "
                f"before it was ready: {how}"))
            if self._stopping:  # stopped while starting: start() may not look (handled)
                slot.ready.exception()
            return
        self._down(slot, f"exited ({how})")
        if self._stopping:
            slot.state = "stopped"
            if rc != 0:
                log.warning("hub %s: worker %d (pid %d) stopped: %s", self.hub.name,
                            slot.index, proc.pid, how)
            return
        loop = asyncio.get_running_loop()
        slot.backoff = 0.0 if loop.time() - slot.started > 5.0 \
            else min(max(0.1, slot.backoff * 2), 5.0)
        slot.floor = (max(slot.floor, slot.max_serial) // _FLOOR_STEP + 1) * _FLOOR_STEP
        self.restarts += 1
        slot.restarts += 1
        log.warning("hub %s: worker %d (pid %d) %s; restarting it in %.1f s", self.hub.name,
                    slot.index, proc.pid, how, slot.backoff)
        slot.timer = loop.call_later(slot.backoff, self._restart, slot)

    def _restart(self, slot: _Slot) -> None:
        slot.timer = None
        if not self._stopping:
            self._spawn_task(self._respawn(slot))

    async def _respawn(self, slot: _Slot) -> None:
        try:
            await self._spawn(slot)
        except Exception:
            log.exception("hub %s: cannot restart worker %d; trying again in 5 s",
                          self.hub.name, slot.index)
            slot.timer = asyncio.get_running_loop().call_later(5.0, self._restart, slot)

    def _down(self, slot: _Slot, why: str) -> None:
        """Worker ``slot`` is gone: its connections are closed ``"down"``, told to the
        survivors, counted."""
        if slot.state in ("down", "stopped"):
            return
        slot.state = "down"
        link = slot.link
        slot.link = None
        if link is not None:
            link.tag = None
            link.close()
        serials = sorted(slot.open)
        slot.open = set()
        self._retire(slot)
        if serials:
            self._closed_by["down"] = self._closed_by.get("down", 0) + len(serials)
        if self._router is not None:
            self._router.dest_down(slot.index)
        if self._stopping:
            if serials:
                log.warning("hub %s: worker %d (pid %d) %s during shutdown: %d connection(s) "
                            "down", self.hub.name, slot.index, slot.pid, why, len(serials))
            return
        parts = [msg(KIND_DOWN, encode_down(slot.index, serials[i:i + SERIALS_MAX]))
                 for i in range(0, max(len(serials), 1), SERIALS_MAX)]
        for other in self._slots:
            if other is not slot and other.state == "up" and other.link is not None:
                other.link.write(b"".join(parts))
        log.warning("hub %s: worker %d (pid %d) %s: its %d connection(s) are closed "
                    "(\"down\")", self.hub.name, slot.index, slot.pid, why, len(serials))
        if self.on_worker_down is not None:
            try:
                self.on_worker_down(slot.index,
                                    [FlowId(self.hub.name, s, slot.index) for s in serials])
            except Exception:
                log.exception("hub %s: on_worker_down failed", self.hub.name)
        if slot.proc is not None:  # the link went first: make sure the process goes too
            asyncio.get_running_loop().call_later(2.0, self._reap, slot, slot.proc)

    def _reap(self, slot: _Slot, proc: asyncio.subprocess.Process) -> None:
        if slot.proc is proc:
            log.warning("hub %s: worker %d (pid %d) closed its link but did not exit: "
                        "killing it", self.hub.name, slot.index, proc.pid)
            _kill(proc.pid, signal.SIGKILL)

    def _retire(self, slot: _Slot) -> None:
        stats = slot.stats
        slot.stats = None
        if stats is None:
            return
        for key in _SUMMED:
            self._retired[key] += int(stats["hub"][key])
        for key, value in stats["routing"].items():
            self._retired_routing[key] = self._retired_routing.get(key, 0) + int(value)

    async def aclose(self, timeout: float | None = None) -> None:
        """Drain every worker (each ends its connections ``"shutdown"`` after writing
        what was sent to them, within ``timeout``, default the hub's ``close_timeout``),
        then stop them; a worker still running 5 s later is killed."""
        hub = self.hub
        if hub._state == "new":
            hub._state = "closed"
            hub._ended = True
            return
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = asyncio.get_running_loop().create_future()
        hub._state = "closing"
        self._stopping = True
        try:
            await self._stop_processes(hub._close_timeout if timeout is None else timeout)
        finally:
            await self._close_mesh()
            await self._teardown()
            hub._state = "closed"
            hub._ended = True
            hub._wake_all()
            self._closed.set_result(None)

    async def _stop_processes(self, timeout: float) -> None:
        if self._router is not None:
            self._router.flush()  # what was sent before aclose goes before SHUTDOWN
        for slot in self._slots:
            if slot.timer is not None:
                slot.timer.cancel()
                slot.timer = None
            if slot.proc is None:
                continue
            if slot.state == "up" and slot.link is not None:
                slot.link.write(msg(KIND_SHUTDOWN, encode_json({"timeout": timeout})))
            else:
                _kill(slot.proc.pid, signal.SIGTERM)
        watchers = [s.watcher for s in self._slots if s.proc is not None and s.watcher]
        if watchers:
            await asyncio.wait(watchers, timeout=timeout + 5.0)
        for slot in self._slots:
            if slot.proc is not None:
                log.warning("hub %s: worker %d (pid %d) did not stop: killing it",
                            self.hub.name, slot.index, slot.proc.pid)
                _kill(slot.proc.pid, signal.SIGKILL)
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _teardown(self) -> None:
        for slot in self._slots:
            if slot.timer is not None:
                slot.timer.cancel()
                slot.timer = None
            if slot.link is not None:
                slot.link.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        for _ in range(3):  # let connection_lost callbacks run
            await asyncio.sleep(0)
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._reserve is not None:
            self._reserve.close()
            self._reserve = None

    # --- the links from the workers (LinkOwner) ---------------------------------------

    def link_up(self, link: LocalLink) -> None:
        prefix = f"{self.hub.name}/w"
        peer = link.peer or ""
        index = peer[len(prefix):]
        if not peer.startswith(prefix) or not index.isdigit() \
                or not 1 <= int(index) <= self.workers:
            raise LocalLinkError(f"unexpected peer {peer!r} on the supervisor's socket")
        slot = self._slots[int(index) - 1]
        if slot.state != "starting" or slot.link is not None:
            raise LocalLinkError(f"worker {index} is {slot.state}: not expecting its link")
        link.tag = slot
        slot.link = link

    def link_message(self, link: LocalLink, kind: int, body: bytes) -> None:
        slot: _Slot | None = link.tag
        if slot is None:
            return  # a link of a worker declared down
        if kind == KIND_OPENED:
            serials = unpack_serials(body)
            slot.open.update(serials)
            self._opened += len(serials)
            if serials and serials[-1] > slot.max_serial:
                slot.max_serial = max(serials)
        elif kind == KIND_CLOSED:
            reason, serials = decode_closed(body)
            discard = slot.open.discard
            for serial in serials:
                discard(serial)
            self._closed_by[reason] = self._closed_by.get(reason, 0) + len(serials)
        elif kind == KIND_REMOTE:
            node, rest = decode_node(body)
            self._to_node(node, [rest])
        elif kind == KIND_STATS:
            slot.stats = decode_json(body)
            slot.stats_seen += 1
            if self._stats_event is not None:
                self._stats_event.set()
        elif kind == KIND_READY:
            info = decode_json(body)
            if info.get("worker") != slot.index:
                raise LocalLinkError(f"READY from worker {info.get('worker')} on the link "
                                     f"of worker {slot.index}")
            self._up(slot, link)
        else:
            log.warning("hub %s: ignoring message kind 0x%04x from worker %d", self.hub.name,
                        kind, slot.index)

    def link_lost(self, link: LocalLink, exc: Exception | None) -> None:
        slot: _Slot | None = link.tag
        if slot is None or slot.link is not link:
            return
        slot.link = None
        link.tag = None
        if self._stopping:
            return
        self._down(slot, "lost its link" if exc is None else f"lost its link ({exc})")

    def _up(self, slot: _Slot, link: LocalLink) -> None:
        assert self.run_dir is not None and self._router is not None
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        slot.state = "up"
        self._router.dest_up(slot.index, slot.floor, link)

        run_dir = self.run_dir

        def up(s: _Slot) -> bytes:
            return msg(KIND_UP, encode_json({"worker": s.index, "floor": s.floor,
                                             "path": str(run_dir / f"w{s.index}.sock")}))

        for other in self._slots:
            if other is not slot and other.state == "up" and other.link is not None:
                other.link.write(up(slot))
                link.write(up(other))
        if self.mesh is not None:
            link.write(self._nodes_message())
        if slot.ready is not None and not slot.ready.done():
            slot.ready.set_result(None)
        log.info("hub %s: worker %d up (pid %d, serials above %x)", self.hub.name, slot.index,
                 slot.pid, slot.floor)

    # --- the mesh: other hubs ----------------------------------------------------------

    def _nodes_message(self) -> bytes:
        assert self.mesh is not None
        return msg(KIND_NODES, encode_json({"nodes": self._nodes,
                                            "max_body": self.mesh.max_message}))

    def _tell_workers(self, data: bytes) -> None:
        for slot in self._slots:
            if slot.state == "up" and slot.link is not None:
                slot.link.write(data)

    def _nodes_changed(self) -> None:
        assert self._router is not None and self.mesh is not None
        self._router.set_nodes(self._nodes, self.mesh.max_message)
        self._tell_workers(self._nodes_message())

    def _to_node(self, node: str, bodies: list[bytes]) -> None:
        """ROUTE bodies (from a worker, or this process) for another hub."""
        mesh = self.mesh
        if mesh is None:
            return
        gone: list[bytes] = []
        for body in bodies:
            try:
                mesh.custom_broadcast([node], body, kind=HUB_ROUTE)
            except PeerUnreachable as exc:  # removed from the mesh: its ids are gone
                self._mesh_counters["mesh_refused"] += 1
                gone.append(body)
                why = str(exc)
            except (LocalProtocolError, ValueError, QueueFull) as exc:
                # (QueueFull: FailuresNotTaken, reports piling up faster than read)
                self._mesh_counters["mesh_refused"] += 1
                log.warning("hub %s: the mesh refused a message to node %s: %s",
                            self.hub.name, node, exc)
        if gone:
            values = _route_ids(gone)
            if node in self._nodes:
                del self._nodes[node]
                self._nodes_changed()
            log.warning("hub %s: the mesh refused %d message(s) to node %s (%s): %d of its "
                        "connection(s) we sent to are closed (\"down\")", self.hub.name,
                        len(gone), node, why, self._node_down(node, values))

    async def _mesh_messages(self, mesh: Mesh) -> None:
        assert self._router is not None
        async for message in mesh.messages():
            if self._nodes.get(message.remote) is not None:
                self._nodes[message.remote] = None  # it is back
                self._down_reported.pop(message.remote, None)
                self._nodes_changed()
            if message.kind == HUB_ROUTE:
                self._mesh_counters["from_nodes"] += 1
                try:
                    self._router.apply_from_node(message.body)
                except ProtocolError as exc:
                    log.warning("hub %s: bad ROUTE from node %s: %s", self.hub.name,
                                message.remote, exc)
            elif message.kind != HUB_PROBE:
                log.warning("hub %s: ignoring mesh message kind %#x from %s", self.hub.name,
                            message.kind, message.remote)

    async def _mesh_failures(self, mesh: Mesh) -> None:
        async for failure in mesh.failures():
            node = failure.remote
            bodies = [m.body for m in failure.undelivered if m.kind == HUB_ROUTE]
            routed = len(bodies)
            values = _route_ids(bodies)
            if not routed:
                continue  # probes
            self._mesh_counters["mesh_failed"] += routed
            if "queue full" in failure.reason:
                log.warning("hub %s: %d message(s) to node %s dropped: %s", self.hub.name,
                            routed, node, failure.reason)
                continue
            if self._stopping:
                continue
            first = node in self._nodes and self._nodes[node] is None
            if first:
                self._nodes[node] = failure.reason
                self._nodes_changed()
            closed = self._node_down(node, values)
            if first or closed:
                log.warning("hub %s: node %s is gone (%s): %d of its connection(s) we sent "
                            "to are closed (\"down\")", self.hub.name, node, failure.reason,
                            closed)

    def _node_down(self, node: str, values: set[int]) -> int:
        """Tell the workers: ``Closed(id, "down")`` for those of these ids of ``node``
        not closed so already (since it was last seen up); how many that is."""
        reported = self._down_reported.setdefault(node, set())
        ordered = sorted(values - reported)
        reported.update(ordered)
        self._tell_workers(b"".join(
            msg(KIND_NODE_DOWN, encode_node(node, pack_serials(ordered[i:i + SERIALS_MAX])))
            for i in range(0, len(ordered), SERIALS_MAX)))
        return len(ordered)

    async def _mesh_watch(self, mesh: Mesh) -> None:
        """Follow the mesh's peers: new or removed ones, gone ones that are back; probe
        the gone ones (the mesh dials only when it has something to send)."""
        while not self._stopping:
            await asyncio.sleep(_MESH_TICK)
            peers = mesh.peers()
            changed = set(peers) != set(self._nodes)
            nodes = {name: self._nodes.get(name) for name in peers}
            for name, info in peers.items():
                if name not in self._nodes:  # (re)added: its ids are new ones
                    self._down_reported.pop(name, None)
                if nodes[name] is not None:
                    if info.state is PeerState.UP:
                        nodes[name] = None
                        self._down_reported.pop(name, None)
                        changed = True
                        log.info("hub %s: node %s is back", self.hub.name, name)
                    elif not info.queued:
                        with contextlib.suppress(TetherError, ValueError):
                            mesh.custom_broadcast([name], b"", kind=HUB_PROBE)
            if changed:
                self._nodes = nodes
                self._nodes_changed()

    async def _close_mesh(self) -> None:
        if self._mesh_watcher is not None:
            self._mesh_watcher.cancel()
        if self.mesh is not None:
            with contextlib.suppress(Exception):
                await self.mesh.aclose(drain=0.5)
        if self._mesh_tasks:
            await asyncio.gather(*self._mesh_tasks, return_exceptions=True)

    # --- what the application sees ------------------------------------------------------

    def pids(self) -> dict[int, int]:
        """The process id of every running worker, by worker index."""
        return {s.index: s.pid for s in self._slots if s.proc is not None}

    def exit_codes(self) -> dict[int, int | None]:
        """The exit code of each worker's last process (negative: killed by that
        signal; None: none exited yet), by worker index."""
        return {s.index: s.exit for s in self._slots}

    def worker_states(self) -> dict[int, str]:
        """``"starting"``, ``"up"``, ``"down"`` (restart pending) or ``"stopped"``, by
        worker index."""
        return {s.index: s.state for s in self._slots}

    def hub_stats(self) -> HubStats:
        """The workers' counters summed (see :meth:`tether.hub.Hub.stats`)."""
        live = [s.stats["hub"] for s in self._slots if s.stats is not None]

        def total(key: str) -> int:
            return self._retired[key] + sum(int(st[key]) for st in live)

        return HubStats(
            open=sum(len(s.open) for s in self._slots), opened=self._opened,
            closed=dict(self._closed_by), bytes_in=total("bytes_in"),
            bytes_out=total("bytes_out"), messages_in=total("messages_in"),
            messages_out=total("messages_out"),
            queued=sum(int(st["queued"]) for st in live),
            queued_bytes=sum(int(st["queued_bytes"]) for st in live),
            paused=sum(int(st["paused"]) for st in live), dropped=total("dropped"),
            incomplete=total("incomplete"), handshakes_failed=total("handshakes_failed"),
            refused=total("refused"), over_limit=total("over_limit"))

    def routing_stats(self) -> dict[str, int]:
        """The routing counters (docs/workers.md) summed over every process."""
        totals = dict(self._retired_routing)
        counters = [s.stats["routing"] for s in self._slots if s.stats is not None]
        if self._router is not None:
            counters.append(self._router.counters())
        for routing in counters:
            for key, value in routing.items():
                totals[key] = totals.get(key, 0) + int(value)
        return totals

    async def refresh_stats(self, timeout: float = 5.0) -> HubStats:
        """Ask every worker for its counters now and wait for them (up to ``timeout``);
        the connection counts are then exact as of the request."""
        event = self._stats_event
        assert event is not None, "the pool is not started"
        seen = {s.index: s.stats_seen for s in self._slots}
        for s in self._slots:
            if s.state == "up" and s.link is not None:
                s.link.write(msg(KIND_STATS_REQUEST))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(s.state == "up" and s.stats_seen == seen[s.index] for s in self._slots):
            event.clear()
            left = deadline - loop.time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)
        return self.hub_stats()

    def status(self) -> dict[str, Any]:
        """Everything ``tether status`` shows: the summed counters, routing, and each
        worker (pid, state, connections, restarts, memory, CPU)."""
        stats = self.hub_stats()
        workers = []
        for s in self._slots:
            st = s.stats or {}
            hub = st.get("hub", {})
            workers.append({"worker": s.index, "pid": s.pid if s.proc is not None else None,
                            "state": s.state, "exit": s.exit, "open": len(s.open),
                            "restarts": s.restarts, "serials_above": s.floor, "rss": st.get("rss"),
                            "cpu_s": st.get("cpu"), "messages_in": hub.get("messages_in"),
                            "messages_out": hub.get("messages_out")})
        supervisor_rss = rss_bytes()
        return {
            "name": self.hub.name, "listen": f"{self.hub._host}:{self.port}",
            "workers": self.workers, "handler": self.handler_text, "restarts": self.restarts,
            "hub": {**asdict(stats), "closed_total": stats.closed_total},
            "routing": self.routing_stats(),
            "mesh": None if self.mesh is None else {
                **self._mesh_counters, "nodes": self._nodes, "links": self.mesh.stats()},
            "supervisor": {"pid": os.getpid(), "rss": supervisor_rss},
            "per_worker": workers,
            "rss_total": supervisor_rss + sum(w["rss"] or 0 for w in workers
                                              if w["pid"] is not None),
        }


def _route_ids(bodies: list[bytes]) -> set[int]:
    """The ids (``int(FlowId)``) the records of these ROUTE bodies are for."""
    values: set[int] = set()
    for body in bodies:
        with contextlib.suppress(ProtocolError):
            for op, value, count, payload in iter_records(body):
                if op == OP_FANOUT:
                    values.update(unpack_serials(payload[len(payload) - 8 * count:]))
                else:
                    values.add(value)
    return values


# --- helpers for applications --------------------------------------------------------------


def pool_of(hub: Hub) -> WorkerPool:
    """The supervisor of a ``Hub(workers=N, handler=...)``."""
    if hub._pool is None:
        raise ValueError(f"{hub!r} has no workers")
    return hub._pool


async def drain(hub: Hub) -> None:
    """In a worker (or the supervisor): write what waits for the other workers and wait
    until none of the links to them is above its high-water mark. A handler that sends
    much to other workers' connections awaits this now and then, as it would
    ``writer.drain()``; without it, beyond ``max_route_buffer`` messages are dropped
    (counted in ``route_dropped``, logged)."""
    router = hub._router
    if isinstance(router, Router):
        await router.drain()


async def echo(hub: Hub) -> None:
    """A handler that sends every message back (``tether hub``'s default)."""
    send_batch = hub.send_batch
    async for events in hub.batches(grouped=True):
        for event in events:
            if type(event) is Messages:
                try:  # noqa: SIM105 - try costs nothing, suppress() does
                    send_batch(event.id, event.messages)
                except FlowClosed:
                    pass


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _serve(hub: Hub, admin: str | None, drain_s: float, what: str) -> int:
    pool = pool_of(hub)
    try:
        await hub.start()
    except WorkersFailed as exc:
        print(f"tether hub: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"{what} {hub.name} listening on port {hub.port} with {pool.workers} worker(s)",
          file=sys.stderr, flush=True)
    if pool.mesh is not None and pool.mesh.listen is not None:
        print(f"{what} {hub.name} mesh on port {pool.mesh.port}", file=sys.stderr, flush=True)
    server: AdminServer | None = None
    try:
        if admin not in (None, "", "none", "off"):
            assert admin is not None
            server = AdminServer(parse_address(admin), "hub", hub.name, pool.status)
            await server.start()
            print(f"{what} {hub.name} admin endpoint on port {server.port}", file=sys.stderr,
                  flush=True)
        await _until_signalled()
    finally:
        log.info("hub %s shutting down: %s", hub.name, hub.stats())
        if server is not None:
            await server.aclose()
        await hub.aclose(drain_s)
    return 0


def serve(handler: Handler, host: str = "127.0.0.1", port: int = 0, *, workers: int = 1,
          admin: str | None = None, drain: float = 5.0,
          on_worker_down: Callable[[int, list[FlowId]], None] | None = None,
          mesh: Mesh | None = None, **options: Any) -> None:
    """Run a hub of ``workers`` processes, each running ``handler`` on its own hub, until
    SIGINT or SIGTERM; then drain for at most ``drain`` seconds. ``options`` are the
    :class:`~tether.hub.Hub` options; ``admin`` (``"HOST:PORT"``) serves ``tether
    status``; ``mesh`` (a :class:`~tether.Mesh` named like the hub) joins the hubs of
    other machines. Blocks; call it under ``if __name__ == "__main__":``."""
    hub = Hub(host, port, workers=workers, handler=handler, **options)
    pool = pool_of(hub)
    pool.on_worker_down = on_worker_down
    pool.mesh = mesh
    code = run(_serve(hub, admin, drain, "hub"))
    if code:
        raise WorkersFailed("the workers could not be started (see the log)")


# --- the command line ------------------------------------------------------------------


def _framing_arg(text: str) -> Framing:
    kind, _, width = text.partition(":")
    if kind == "lines" and not width:
        return Lines()
    if kind == "raw" and not width:
        return Raw()
    if kind == "length" and width in ("", "1", "2", "4", "8"):
        return LengthPrefixed(int(width or 4))
    raise argparse.ArgumentTypeError(f"{text!r}: expected lines, raw or length[:1|2|4|8]")


async def hub_command(args: argparse.Namespace) -> int:
    """``tether hub``: run the hub until SIGINT/SIGTERM."""
    host, port = parse_address(args.listen)
    hub = Hub(host, port, framing=args.framing, workers=args.workers, handler=args.handler,
              name=args.name, idle_timeout=args.idle_timeout, max_message=args.max_message,
              max_connections="default" if args.max_connections is None
              else args.max_connections,
              tls=ServerTLS.from_args(args))
    if args.mesh_listen or args.mesh_peer:
        peers = {}
        for text in args.mesh_peer:
            name, sep, address = text.partition("=")
            if not sep or not name:
                raise ValueError(f"--mesh-peer {text!r}: expected NAME=HOST:PORT")
            parse_address(address)
            peers[name] = address
        pool_of(hub).mesh = Mesh(args.name, listen=args.mesh_listen, peers=peers,
                                 token=args.mesh_token or b"")
    return await _serve(hub, args.admin, args.drain, "hub")


def add_hub_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``tether hub`` to the ``tether`` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "hub", help="hold very many connections by id, over N worker processes",
        description="Accept connections on one port with N worker processes (SO_REUSEPORT); "
                    "every worker runs the handler on its own hub; ids route across "
                    "workers; a worker that dies is restarted and its connections are "
                    "reported closed (\"down\") to the others.")
    p.add_argument("--listen", default="127.0.0.1:7000", metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:7000; port 0 picks one)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes (default 1)")
    p.add_argument("--framing", type=_framing_arg, default=Lines(),
                   metavar="lines|raw|length[:W]",
                   help="how messages are cut: lines (default), raw, or length-prefixed "
                        "with a W-byte big-endian length (default 4)")
    p.add_argument("--handler", default="tether.workers:echo", metavar="MODULE:FUNCTION",
                   help="async function(hub) run in every worker (default "
                        "tether.workers:echo)")
    p.add_argument("--name", default="hub", help="the node name in every id (default hub)")
    p.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                   help="close connections silent this long (default: never)")
    p.add_argument("--max-message", type=int, default=None, metavar="BYTES",
                   help="largest message accepted (default: the framing's)")
    p.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="connections open at once per worker; one more is reset, logged "
                        "and counted (default: the open-file limit less 128)")
    p.add_argument("--drain", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM, let connections flush this long (default 5)")
    add_server_tls_arguments(p, "connections")
    p.add_argument("--admin", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="admin endpoint for `tether status` and /metrics "
                        "(default 127.0.0.1:0, 'none' to disable)")
    p.add_argument("--mesh-listen", default=None, metavar="HOST:PORT",
                   help="join a mesh of hubs (on other machines), accepting its links here; "
                        "the hub's --name is its node name")
    p.add_argument("--mesh-peer", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="another hub of the mesh (repeatable): ids naming it are routed there")
    p.add_argument("--mesh-token", default=None, help="shared secret of the mesh")
    p.set_defaults(func=hub_command)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tether.workers hub ...``: the same as the ``tether`` command."""
    from .cli import main as cli_main  # here: cli imports this module

    return cli_main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(main())
