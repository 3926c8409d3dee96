"""A connection of another hub is reported ``Closed(id, "down")`` once, also when the
mesh gives back messages for it in two reports: one for what was queued when the node
was found gone, one for what a worker routed before it heard (real processes, a real
mesh; the supervisor's loop is held so that uvloop makes the second report)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time

from test_workers import APP, TIMEOUT, spread
from tether.hub import Hub
from tether.ids import FlowId
from tether.mesh import Mesh
from tether.workers import pool_of


class HoldsTheLoop(asyncio.Protocol):
    """Blocks its loop for 0.7 s in each read callback."""

    def data_received(self, data: bytes) -> None:
        time.sleep(0.7)


async def test_a_connection_of_a_gone_node_is_reported_down_once() -> None:
    meshes = {n: Mesh(n, listen="127.0.0.1:0", establish_timeout=0.5, liveness=1.0,
                      retry_interval=0.2) for n in ("a", "b")}
    hubs = {n: Hub("127.0.0.1", 0, name=n, workers=1, handler=APP) for n in ("a", "b")}
    for n in hubs:
        pool_of(hubs[n]).mesh = meshes[n]
    clients = []
    late: threading.Timer | None = None
    held, stall = socket.socketpair()
    await asyncio.get_running_loop().connect_accepted_socket(HoldsTheLoop, held)
    try:
        for hub in hubs.values():
            await hub.start()
        meshes["a"].add_peer("b", f"127.0.0.1:{meshes['b'].port}")
        meshes["b"].add_peer("a", f"127.0.0.1:{meshes['a'].port}")
        clients_a, by_a = await spread(hubs["a"].port, 1, each=2, start=2)
        clients_b, by_b = await spread(hubs["b"].port, 1, start=1)
        clients = clients_a + clients_b
        sender, watcher = by_a[1][:2]
        target = by_b[1][0]
        deadline = time.monotonic() + TIMEOUT
        nobody = FlowId("b", 1 << 47, 1)  # routed, then unknown at b
        while await sender.ask(f"CLOSE {nobody}") != "CLOSE True":
            assert time.monotonic() < deadline  # until the worker of a knows node b
            await asyncio.sleep(0.05)
        sender.send(f"SEND {target.id} hello")
        assert await target.line() == "hello"
        assert await watcher.ask("WATCH") == "WATCHING"
        await hubs["b"].aclose(1.0)
        sender.send(f"SEND {target.id} lost 1")  # queued in the mesh: b cannot be
        await asyncio.sleep(0.05)  # reached, so it is given back establish_timeout later
        # this loop is held in an I/O callback past that timeout; meanwhile the worker
        # routes "lost 2": uvloop runs the due timer, then reads the route (asyncio
        # reads first, and makes one report)
        fd = sender.writer.get_extra_info("socket").fileno()
        late = threading.Timer(0.2, os.write, (fd, f"SEND {target.id} lost 2\n".encode()))
        stall.send(b"x")
        late.start()
        assert await watcher.line() == f"DOWN {target.id}"
        # a second report, if any, comes establish_timeout later
        t_end = time.monotonic() + 4 * 0.5
        while time.monotonic() < t_end:
            try:
                line = await watcher.line(0.1)
            except TimeoutError:
                continue
            assert line != f"DOWN {target.id}", "reported down twice"
        with contextlib.suppress(TimeoutError):  # the refusals of the last sends
            while (await sender.line(0.2)).startswith("ERR"):
                pass
        assert "node 'b' is gone" in await sender.ask(f"SEND {target.id} x")
        assert pool_of(hubs["a"]).status()["mesh"]["mesh_failed"] >= 1
    finally:
        stall.close()
        if late is not None:
            late.join()
        for c in clients:
            c.close()
        for hub in hubs.values():
            await hub.aclose(1.0)
        for hub in hubs.values():
            assert pool_of(hub).pids() == {}
