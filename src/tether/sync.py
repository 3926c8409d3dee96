"""tether.sync — the hub for code written with threads (the source design's style).

:class:`Hub` runs a :class:`tether.hub.Hub` on an event loop (uvloop when installed)
in a background thread. Any number of threads may call its methods at once::

    with tether.sync.Hub("127.0.0.1", 7000, framing=tether.Lines()) as hub:
        def opens():
            while True:
                print("open", hub.recv_open().id)
        def data():                       # run ten of these
            while True:
                event = hub.recv_data()
                try:
                    hub.send(event.id, event.data)
                except tether.FlowClosed:
                    pass                  # it went away meanwhile
        ...

``recv_open``/``recv_data``/``recv_close`` block (optionally with a ``timeout``,
raising ``TimeoutError``) and raise :class:`~tether.hub.HubClosed` once the hub is shut
down and their queue is empty. The same guarantees as the asyncio hub hold: a
connection's ``Closed`` is returned only after all its data was taken by
``recv_data`` (and, the order being kept with one counter, the data of other
connections queued before it); opens are never held back by unread data; only data is
subject to backpressure (the sockets stop being read while too much waits here).

``send`` checks the id and frames the message in the calling thread (so ``FlowClosed``
and ``LocalProtocolError`` are raised there), then hands it to the loop; messages sent
by one thread to one id are written in the order of the calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from .aio import new_event_loop
from .errors import FlowClosed
from .hub import (
    _MSG_OVERHEAD,
    Closed,
    Data,
    FlowsClosed,
    HubClosed,
    HubStats,
    Messages,
    Opened,
    _check_idle_timeout,
    _data,
)
from .hub import Hub as AsyncHub
from .ids import FlowId

__all__ = ["Hub"]

_SEND: Final = 0
_MANY: Final = 1
_CLOSE: Final = 2
_IDLE: Final = 3
_LINGER_DONE: Final = 4


class Hub:
    """A :class:`tether.hub.Hub` for threads: same options, blocking ``recv_*``,
    thread-safe ``send``/``send_batch``/``send_many``/``close``/``stats``.

    ``thread_queue`` bounds the data waiting in this facade for ``recv_data`` (bytes,
    like the hub's ``queue_high``); beyond it the hub's own queue fills and its sockets
    stop being read. Use it as a context manager, or call :meth:`start` and
    :meth:`shutdown`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 thread_queue: int = 4 * 1024 * 1024, **options: Any) -> None:
        """Configure; ``options`` are those of :class:`tether.hub.Hub`."""
        self._hub = AsyncHub(host, port, **options)
        self._encode = self._hub.framing.encode
        self._encode_many = self._hub.framing.encode_many
        self._high = thread_queue
        self._low = thread_queue // 2
        self._lock = threading.Lock()
        self._c_open = threading.Condition(self._lock)
        self._c_data = threading.Condition(self._lock)
        self._c_close = threading.Condition(self._lock)
        self._opens: deque[Opened] = deque()
        self._data: deque[Messages] = deque()
        self._dpos = 0
        self._closes: deque[Closed] = deque()
        self._deferred: deque[tuple[int, Closed]] = deque()
        self._enq = 0
        self._taken = 0
        self._dbytes = 0
        self._ended = False
        self._pump_paused = False
        self._outbox: deque[tuple[int, Any, Any, int]] = deque()
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stopped = False
        self._shut = threading.Event()  # set when the first shutdown() has finished
        self._handed: set[FlowId] = set()  # Closed("peer") returned, loop not told yet

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> Hub:
        """Start the loop thread and listen; returns when the hub is listening."""
        if self._thread is not None:
            raise RuntimeError("the hub is already started")
        self._thread = threading.Thread(target=self._run, name="tether-hub", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        return self

    def __enter__(self) -> Hub:
        """``start()``."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """``shutdown()``."""
        self.shutdown()

    @property
    def port(self) -> int:
        """The port the hub listens on."""
        return self._hub.port

    @property
    def name(self) -> str:
        """The node name in every id of this hub."""
        return self._hub.name

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, end every connection (``"shutdown"``), stop the thread.
        Events already queued stay available to the ``recv_*`` methods. A call made
        while another thread's is under way returns when that one has finished."""
        loop = self._loop
        with self._lock:
            if loop is None or self._thread is None:
                return
            first = not self._stopped
            self._stopped = True
        if not first:  # another thread's shutdown() is under way: wait for its end
            self._shut.wait()
            return
        try:
            if loop.is_running():
                fut = asyncio.run_coroutine_threadsafe(self._hub.aclose(timeout), loop)
                fut.result()
                if self._resume is not None:
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(self._resume.set)
            self._thread.join()
        finally:
            self._shut.set()

    def _run(self) -> None:
        loop = new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                with self._lock:
                    self._ended = True
                    self._c_open.notify_all()
                    self._c_data.notify_all()
                    self._c_close.notify_all()

    async def _main(self) -> None:
        self._resume = asyncio.Event()
        try:
            await self._hub.start()
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        await self._pump()

    async def _pump(self) -> None:
        """Move the hub's events to the thread-side queues, in per-connection order."""
        hub = self._hub
        resume = self._resume
        assert resume is not None
        while True:
            batch = await hub._next_batch(True, handoff=False)
            if batch is None:
                return
            with self._lock:
                got_open = got_data = got_close = False
                for event in batch:
                    kind = type(event)
                    if kind is Messages:
                        self._data.append(event)
                        self._enq += 1
                        self._dbytes += sum(map(len, event.messages)) + \
                            len(event.messages) * _MSG_OVERHEAD
                        got_data = True
                    elif kind is Opened:
                        self._opens.append(event)
                        got_open = True
                    elif self._taken >= self._enq:
                        self._closes.append(event)
                        got_close = True
                    else:
                        self._deferred.append((self._enq, event))
                if got_open:
                    self._c_open.notify_all()
                if got_data:
                    self._c_data.notify_all()
                if got_close:
                    self._c_close.notify_all()
                over = self._dbytes > self._high
                if over:
                    self._pump_paused = True
                    resume.clear()
            while over and not hub.closed and not resume.is_set():
                # opens are never held back by unread data: hand them over meanwhile
                with self._lock:
                    if hub._opens:
                        self._opens.extend(hub._opens)
                        hub._opens.clear()
                        self._c_open.notify_all()
                loop = asyncio.get_running_loop()
                woken: asyncio.Future[None] = loop.create_future()
                hub._w_open.append(woken)
                resumed = loop.create_task(resume.wait())
                await asyncio.wait((woken, resumed), return_when=asyncio.FIRST_COMPLETED)
                resumed.cancel()
                if not woken.done():
                    woken.cancel()
                    with contextlib.suppress(ValueError):
                        hub._w_open.remove(woken)

    # --- receiving ---------------------------------------------------------------------

    def _wait(self, cond: threading.Condition, queue: deque[Any],
              timeout: float | None, pending: deque[Any] | None = None) -> None:
        """Wait (holding the lock) until ``queue`` has an item; raise at the end (once
        ``pending``, what may still move into ``queue``, is empty too)."""
        if not cond.wait_for(lambda: queue or (self._ended and not pending), timeout):
            raise TimeoutError("no event within the timeout")
        if not queue:
            raise HubClosed("the hub is closed")

    def recv_open(self, timeout: float | None = None) -> Opened:
        """The next ``Opened``; blocks up to ``timeout`` seconds (None: forever)."""
        with self._c_open:
            self._wait(self._c_open, self._opens, timeout)
            return self._opens.popleft()

    def recv_data(self, timeout: float | None = None) -> Data:
        """The next ``Data`` of any connection; blocks up to ``timeout`` seconds."""
        with self._c_data:
            self._wait(self._c_data, self._data, timeout)
            group = self._data[0]
            messages = group.messages
            message = messages[self._dpos]
            self._dpos += 1
            if self._dpos == len(messages):
                self._data.popleft()
                self._dpos = 0
                self._taken += 1
                deferred = self._deferred
                if deferred and deferred[0][0] <= self._taken:
                    while deferred and deferred[0][0] <= self._taken:
                        self._closes.append(deferred.popleft()[1])
                    self._c_close.notify_all()
            self._dbytes -= len(message) + _MSG_OVERHEAD
            if self._pump_paused and self._dbytes <= self._low:
                self._pump_paused = False
                resume = self._resume
                if resume is not None:
                    with contextlib.suppress(HubClosed):  # the pump is gone: no one to resume
                        self._call(resume.set)
            return _data(group.id, message)

    def recv_close(self, timeout: float | None = None) -> Closed:
        """The next ``Closed``, after all the data of its connection was taken; blocks
        up to ``timeout`` seconds. A connection whose peer closed stays writable until
        its ``Closed`` is returned here."""
        with self._c_close:
            self._wait(self._c_close, self._closes, timeout, self._deferred)
            event = self._closes.popleft()
        if event.reason == "peer":
            self._handed.add(event.id)  # send raises FlowClosed from now on
            with contextlib.suppress(HubClosed):  # a stopped hub closed it already
                self._post(_LINGER_DONE, event.id, None, 0)
        return event

    # --- sending -----------------------------------------------------------------------

    def _check(self, id: FlowId) -> None:
        try:
            conn = self._hub._conns.get(id.serial)
        except AttributeError:
            raise TypeError(f"expected a FlowId, got {type(id).__name__}") from None
        if conn is None or conn.fid != id or id in self._handed:
            raise FlowClosed(f"connection {id} is closed or unknown")

    def send(self, id: FlowId, data: bytes) -> None:
        """Frame ``data`` and send it to ``id``. Raises ``FlowClosed`` if ``id`` is
        closed or unknown now; if it closes before the loop writes the message, its
        ``Closed`` event tells."""
        self._check(id)
        self._post(_SEND, id, self._encode(data), 1)

    def send_batch(self, id: FlowId, messages: Sequence[bytes]) -> None:
        """Frame and send every message of ``messages`` to ``id``, in order."""
        self._check(id)
        self._post(_SEND, id, self._encode_many(messages), len(messages))

    def send_many(self, ids: Iterable[FlowId], data: bytes) -> None:
        """Send ``data`` to every open id of ``ids`` (framed once); then raise
        :class:`~tether.hub.FlowsClosed` if some were closed or unknown."""
        frame = self._encode(data)
        good: list[FlowId] = []
        missing: list[FlowId] = []
        for id in ids:
            try:
                self._check(id)
            except FlowClosed:
                missing.append(id)
            else:
                good.append(id)
        if good:
            self._post(_MANY, good, frame, 1)
        if missing:
            raise FlowsClosed(missing)

    def close(self, id: FlowId) -> bool:
        """End connection ``id`` (``"local"``) after what was sent to it; False if it
        was already closed or unknown."""
        try:
            self._check(id)
        except FlowClosed:
            return False
        self._post(_CLOSE, id, None, 0)
        return True

    def set_idle_timeout(self, id: FlowId, seconds: float | None) -> None:
        """Set the inactivity timeout of ``id`` (see the asyncio hub)."""
        self._check(id)
        _check_idle_timeout(seconds)
        self._post(_IDLE, id, seconds, 0)

    def is_open(self, id: FlowId) -> bool:
        """Whether ``send`` to ``id`` would be accepted now."""
        try:
            self._check(id)
        except FlowClosed:
            return False
        return True

    def stats(self, timeout: float | None = 10.0) -> HubStats:
        """The hub's counters; ``queued`` includes what waits in this facade."""
        fut: concurrent.futures.Future[HubStats] = concurrent.futures.Future()

        def get() -> None:
            fut.set_result(self._hub.stats())

        self._call(get)
        stats = fut.result(timeout)
        with self._lock:
            here = len(self._opens) + len(self._closes) + len(self._deferred) - self._dpos \
                + sum(len(group.messages) for group in self._data)
            queued_bytes = self._dbytes
        return dataclasses.replace(stats, queued=stats.queued + here,
                                   queued_bytes=stats.queued_bytes + queued_bytes)

    def _call(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            raise HubClosed("the hub is not running")
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError as exc:  # closed meanwhile
            raise HubClosed("the hub is not running") from exc

    def _post(self, op: int, target: Any, payload: Any, count: int) -> None:
        """Queue an operation for the loop thread; one wake-up for many posts."""
        self._outbox.append((op, target, payload, count))
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._call(self._drain)
            except HubClosed:
                self._wake_pending = False
                raise

    def _drain(self) -> None:
        """In the loop thread: carry out the posted operations, in order."""
        self._wake_pending = False
        hub = self._hub
        outbox = self._outbox
        while outbox:
            op, target, payload, count = outbox.popleft()
            try:
                if op == _SEND:
                    hub._send_encoded(target, payload, count)
                elif op == _MANY:
                    for id in target:
                        try:
                            hub._send_encoded(id, payload, count)
                        except FlowClosed:
                            continue
                elif op == _CLOSE:
                    hub.close(target)
                elif op == _IDLE:
                    hub.set_idle_timeout(target, payload)
                else:
                    hub._linger_done(target)
                    self._handed.discard(target)
            except FlowClosed:
                continue  # closed since the call: its Closed event reports it
