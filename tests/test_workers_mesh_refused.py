"""A message for another hub's connection that the mesh refuses (here: that hub was
just removed from the mesh, before the workers heard of it) is not lost silently: the
workers' handlers get ``Closed(id, "down")`` for its connection, as for messages the
mesh gives back, and the refusal is logged and counted (real processes, real mesh)."""

from __future__ import annotations

import logging
import time

import pytest

from test_workers import APP, TIMEOUT, spread
from tether.hub import Hub
from tether.ids import FlowId
from tether.mesh import Mesh
from tether.workers import pool_of


async def test_a_route_the_mesh_refuses_closes_its_connection_down(
        caplog: pytest.LogCaptureFixture) -> None:
    meshes = {n: Mesh(n, listen="127.0.0.1:0", establish_timeout=5.0, liveness=5.0,
                      retry_interval=0.2) for n in ("a", "b")}
    hubs = {n: Hub("127.0.0.1", 0, name=n, workers=1, handler=APP) for n in ("a", "b")}
    for n in hubs:
        pool_of(hubs[n]).mesh = meshes[n]
    clients = []
    try:
        for hub in hubs.values():
            await hub.start()
        meshes["a"].add_peer("b", f"127.0.0.1:{meshes['b'].port}")
        meshes["b"].add_peer("a", f"127.0.0.1:{meshes['a'].port}")
        clients_a, by_a = await spread(hubs["a"].port, 1, start=1)
        clients_b, by_b = await spread(hubs["b"].port, 1, start=1)
        clients = clients_a + clients_b
        watcher, target = by_a[1][0], by_b[1][0]
        deadline = time.monotonic() + TIMEOUT
        nobody = FlowId("b", 1 << 47, 1)
        while await watcher.ask(f"CLOSE {nobody}") != "CLOSE True":
            assert time.monotonic() < deadline  # until the worker of a knows node b
        hubs["a"].send(target.id, b"reached")
        assert await target.line() == "reached"
        assert await watcher.ask("WATCH") == "WATCHING"
        with caplog.at_level(logging.WARNING, logger="tether.workers"):
            meshes["a"].remove_peer("b")
            hubs["a"].send(target.id, b"refused")  # routed: b is still a node here
            assert await watcher.line() == f"DOWN {target.id}"
        assert "refused" in caplog.text
        assert pool_of(hubs["a"]).status()["mesh"]["mesh_refused"] == 1
        assert "not in the mesh" in await watcher.ask(f"SEND {target.id} x")
    finally:
        for c in clients:
            c.close()
        for hub in hubs.values():
            await hub.aclose(1.0)
        for hub in hubs.values():
            assert pool_of(hub).pids() == {}
