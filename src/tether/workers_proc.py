"""One worker process of ``Hub(workers=N)``: ``python -m tether.workers --worker ...``.

The supervisor (:class:`tether.workers.WorkerPool`) writes the pool's configuration to
a JSON file and starts each worker with that file, its index and its serial floor. A
worker builds its own :class:`~tether.hub.Hub` on the shared port (SO_REUSEPORT), with
ids ``FlowId(name, serial, worker=index)`` and serials above the floor; listens on its
own Unix socket for links from the other workers; connects to the supervisor's; runs
the application's handler on its hub; and, until told to stop (SHUTDOWN, SIGTERM, or
the supervisor's link gone), routes what it is asked for ids of other workers and
reports its connections and counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from . import daemonlog
from .aio import SocketOptions, run
from .framing import Framing, LengthPrefixed, Lines, Raw
from .hub import Hub
from .tlsfiles import ServerTLS
from .workers_link import LocalLink, Router
from .workers_wire import (
    KIND_DOWN,
    KIND_NODE_DOWN,
    KIND_NODES,
    KIND_READY,
    KIND_REMOTE,
    KIND_ROUTE,
    KIND_SHUTDOWN,
    KIND_STATS,
    KIND_STATS_REQUEST,
    KIND_UP,
    decode_down,
    decode_json,
    decode_node,
    encode_json,
    encode_node,
    msg,
    unpack_serials,
)

__all__ = ["framing_from_spec", "framing_spec", "resolve_handler", "rss_bytes", "worker_main"]

log = logging.getLogger("tether.workers")

ENV_WORKER: Final = "TETHER_WORKER"
"""Set in every worker process (to its index): a pool is never started from a worker."""
EXIT_BAD_HANDLER: Final = 3
_PAGE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of process ``pid`` (this one by default), in bytes; 0 if unknown."""
    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


# --- configuration that crosses the process boundary -----------------------------------


def framing_spec(framing: Framing) -> dict[str, Any]:
    """A JSON description of ``framing`` (Lines, Raw or LengthPrefixed)."""
    if isinstance(framing, Lines):
        return {"type": "lines", "delimiter": framing.delimiter.hex(),
                "max_size": framing.max_size}
    if isinstance(framing, Raw):
        return {"type": "raw"}
    if isinstance(framing, LengthPrefixed):
        return {"type": "length", "width": framing.width, "max_size": framing.max_size}
    raise ValueError(f"workers support the framings Lines, Raw and LengthPrefixed, "
                     f"not {type(framing).__name__}")


def framing_from_spec(spec: dict[str, Any]) -> Framing:
    """The framing ``framing_spec`` described."""
    kind = spec["type"]
    if kind == "lines":
        return Lines(bytes.fromhex(spec["delimiter"]), spec["max_size"])
    if kind == "raw":
        return Raw()
    if kind == "length":
        return LengthPrefixed(spec["width"], spec["max_size"])
    raise ValueError(f"unknown framing {kind!r}")


def resolve_handler(ref: dict[str, str]) -> Callable[[Hub], Awaitable[None]]:
    """Import the handler ``ref`` names: ``{"module", "qualname"}`` or, for a function
    of a script run as ``__main__``, ``{"path", "qualname"}`` (the script is loaded as
    module ``__tether_main__``: its ``if __name__ == "__main__":`` block does not run)."""
    if "path" in ref:
        spec = importlib.util.spec_from_file_location("__tether_main__", ref["path"])
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {ref['path']}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["__tether_main__"] = module
        spec.loader.exec_module(module)
        obj: Any = module
    else:
        obj = importlib.import_module(ref["module"])
    for part in ref["qualname"].split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"handler {ref['qualname']} is not callable")
    return obj  # type: ignore[no-any-return]


def hub_from_config(cfg: dict[str, Any], index: int, floor: int) -> Hub:
    """The worker's hub (not started): the pool's options, ``worker=index``, serials
    above ``floor``, bound with SO_REUSEPORT."""
    opts = dict(cfg["hub"])
    opts["framing"] = framing_from_spec(opts["framing"])
    if opts.get("sockopts") is not None:
        opts["sockopts"] = SocketOptions(**opts["sockopts"])
    if opts.get("tls") is not None:
        opts["tls"] = ServerTLS.from_json(opts["tls"])
    hub = Hub(cfg["host"], cfg["port"], reuse_port=True, name=cfg["name"], worker=index,
              **opts)
    hub._next_serial = floor + 1
    return hub


# --- the worker --------------------------------------------------------------------------


class _Worker:
    """The links and the life of one worker process."""

    def __init__(self, cfg: dict[str, Any], index: int, floor: int,
                 handler: Callable[[Hub], Awaitable[None]]) -> None:
        self.cfg = cfg
        self.index = index
        self.floor = floor
        self.handler = handler
        self.me = f"{cfg['name']}/w{index}"
        self.run_dir = Path(cfg["run_dir"])
        self.loop = asyncio.get_running_loop()
        self.hub = hub_from_config(cfg, index, floor)
        self.router = Router(self.hub, me=index, workers=cfg["workers"],
                             max_buffer=cfg["max_route_buffer"])
        self.hub._router = self.router
        self.router.foreign_writer = self.to_node
        self.control: LocalLink | None = None
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.control_lost: asyncio.Future[None] = self.loop.create_future()
        self.stop_timeout = float(self.hub._close_timeout)
        self.code = 0
        self.task: asyncio.Task[None] | None = None
        self.peer_server: asyncio.AbstractServer | None = None
        self.connecting: dict[int, asyncio.Task[None]] = {}  # by worker index
        self.stats_timer: asyncio.TimerHandle | None = None

    # LinkOwner ---------------------------------------------------------------------------

    def link_up(self, link: LocalLink) -> None:
        pass

    def link_message(self, link: LocalLink, kind: int, body: bytes) -> None:
        if kind == KIND_ROUTE:
            self.router.apply(body)
        elif link is not self.control:
            log.warning("%s: ignoring message kind 0x%04x from %r", self.me, kind, link.peer)
        elif kind == KIND_UP:
            info = decode_json(body)
            self.peer_up(int(info["worker"]), int(info["floor"]), str(info["path"]))
        elif kind == KIND_DOWN:
            worker, serials = decode_down(body)
            self._stop_connecting(worker)
            self.router.worker_down(worker, serials)
        elif kind == KIND_NODES:
            info = decode_json(body)
            self.router.set_nodes(info["nodes"], int(info["max_body"]))
        elif kind == KIND_NODE_DOWN:
            node, rest = decode_node(body)
            self.router.node_down(node, unpack_serials(rest))
        elif kind == KIND_STATS_REQUEST:
            self.send_stats()
        elif kind == KIND_SHUTDOWN:
            self.stop(float(decode_json(body).get("timeout", self.stop_timeout)))
        else:
            log.warning("%s: ignoring control message kind 0x%04x", self.me, kind)

    def link_lost(self, link: LocalLink, exc: Exception | None) -> None:
        if link is self.control:
            self.router.control = None
            if not self.control_lost.done():
                self.control_lost.set_result(None)
            if not self.done.done():
                log.warning("%s: the supervisor is gone; stopping", self.me)
                self.stop(min(self.stop_timeout, 2.0))
        else:
            self.router.link_lost(link)

    def to_node(self, node: str, bodies: list[bytes]) -> None:
        """ROUTE bodies for another hub: the supervisor sends them over the mesh."""
        if self.control is not None:
            self.control.write(b"".join(msg(KIND_REMOTE, encode_node(node, body))
                                        for body in bodies))

    # peers -------------------------------------------------------------------------------

    def peer_up(self, worker: int, floor: int, path: str) -> None:
        """Worker ``worker`` is up: connect to it (what is routed meanwhile waits)."""
        self._stop_connecting(worker)
        old = self.router.link_of(worker)
        if old is not None:
            old.close()
        self.router.dest_up(worker, floor, None)
        task = asyncio.ensure_future(self._connect(worker, path))
        self.connecting[worker] = task
        task.add_done_callback(lambda t: self._connected(worker, t))

    def _connected(self, worker: int, task: asyncio.Task[None]) -> None:
        if self.connecting.get(worker) is task:
            del self.connecting[worker]

    def _stop_connecting(self, worker: int) -> None:
        task = self.connecting.pop(worker, None)
        if task is not None:
            task.cancel()

    async def _connect(self, worker: int, path: str) -> None:
        """Connect to worker ``worker`` until it works: the supervisor said it is up,
        so a failure is passing (until it says the worker is down, or says it is up
        again, or this worker stops: the task is then cancelled). Routed records wait
        in the outbox meanwhile (bounded by ``max_route_buffer``)."""
        delay = 0.02
        attempt = 0
        while True:
            try:
                _, link = await self.loop.create_unix_connection(
                    lambda: LocalLink(self.me, self, initiator=True), path)
            except OSError as exc:
                attempt += 1
                if attempt % 100 == 50:
                    log.error("%s: cannot reach worker %d at %s after %d attempts: %s; "
                              "still trying", self.me, worker, path, attempt, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 1.25, 0.5) if attempt >= 50 else delay
                continue
            if attempt >= 50:
                log.warning("%s: reached worker %d after %d attempts", self.me, worker,
                            attempt + 1)
            link.tag = worker
            self.router.attach(worker, link)
            return

    # life --------------------------------------------------------------------------------

    def send_stats(self) -> None:
        if self.control is None:
            return
        s = self.hub.stats()
        self.control.write(msg(KIND_STATS, encode_json({
            "worker": self.index, "pid": os.getpid(), "floor": self.floor,
            "hub": asdict(s),  # (every HubStats field, the supervisor sums them)
            "routing": self.router.counters(), "rss": rss_bytes(),
            "cpu": time.process_time(), "time": time.time()})))

    def _tick(self) -> None:
        self.send_stats()
        self.stats_timer = self.loop.call_later(self.cfg["stats_interval"], self._tick)

    def stop(self, timeout: float) -> None:
        """Drain and exit (at most ``timeout`` seconds for the connections)."""
        if not self.done.done():
            self.stop_timeout = timeout
            self.done.set_result(None)

    async def _run_handler(self) -> None:
        try:
            await self.handler(self.hub)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: the handler failed; the worker stops", self.me)
            self.code = 1
        else:
            if not self.hub.closed:
                log.warning("%s: the handler returned; the worker stops", self.me)
        self.stop(self.stop_timeout)

    async def run(self) -> int:
        loop = self.loop
        path = self.run_dir / f"w{self.index}.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.peer_server = await loop.create_unix_server(
            lambda: LocalLink(self.me, self, initiator=False), str(path))
        _, self.control = await loop.create_unix_connection(
            lambda: LocalLink(self.me, self, initiator=True),
            str(self.run_dir / "supervisor.sock"))
        self.router.control = self.control
        await self.hub.start()
        loop.add_signal_handler(signal.SIGTERM, self.stop, self.stop_timeout)
        self.control.write(msg(KIND_READY, encode_json(
            {"worker": self.index, "pid": os.getpid(), "floor": self.floor})))
        log.debug("%s: listening on port %d (pid %d)", self.me, self.hub.port, os.getpid())
        self.task = asyncio.ensure_future(self._run_handler())
        self._tick()
        await self.done
        await self.shutdown()
        return self.code

    async def shutdown(self) -> None:
        """Stop accepting, end every connection (``"shutdown"``) after writing what was
        sent to it, let the handler finish, report, close the links."""
        if self.stats_timer is not None:
            self.stats_timer.cancel()
        await self.hub.aclose(self.stop_timeout)
        assert self.task is not None
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 2.0)
        except TimeoutError:
            log.warning("%s: the handler did not finish after the hub closed; cancelling",
                        self.me)
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        tasks = list(self.connecting.values())
        self.connecting.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.router.flush()
        self.send_stats()
        if self.peer_server is not None:
            self.peer_server.close()
        for index in range(1, self.router.workers + 1):
            link = self.router.link_of(index)
            if link is not None:
                link.close()
        if self.control is not None:
            self.control.close()  # after writing what is buffered
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.control_lost), 2.0)
        await asyncio.sleep(0)


async def _worker_async(cfg: dict[str, Any], index: int, floor: int,
                        handler: Callable[[Hub], Awaitable[None]]) -> int:
    return await _Worker(cfg, index, floor, handler).run()


def worker_main(argv: list[str]) -> int:
    """``python -m tether.workers --worker CONFIG INDEX FLOOR``: run one worker."""
    config, index_text, floor_text = argv
    index = int(index_text)
    floor = int(floor_text)
    with open(config) as f:
        cfg: dict[str, Any] = json.load(f)
    sys.path[:0] = [p for p in cfg["sys_path"] if p not in sys.path]
    os.environ[ENV_WORKER] = str(index)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
    daemonlog.configure(
        cfg["log_level"], f"%(asctime)s %(levelname)s %(name)s[{cfg['name']}/w{index}]: "
                          "%(message)s")
    try:
        handler = resolve_handler(cfg["handler"])
    except Exception as exc:
        log.error("worker %d: cannot load the handler %s: %s: %s", index,
                  cfg["handler_text"], type(exc).__name__, exc)
        return EXIT_BAD_HANDLER
    return run(_worker_async(cfg, index, floor, handler))
