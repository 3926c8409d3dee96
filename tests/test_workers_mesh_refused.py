"""A message for another hub's connection that the mesh refuses (here: that hub was
just removed from the mesh, before the workers heard of it) is not lost silently: the
workers' handlers get ``Closed(id, "down")`` for its connection, as for messages the
mesh gives back, and the refusal is logged and counted (real processes, real mesh)."""

from __future__ import annotations

import logging

import pytest

from test_workers import meshed_hubs, spread, until_node_b_is_known
from tether.workers import pool_of


async def test_a_route_the_mesh_refuses_closes_its_connection_down(
        caplog: pytest.LogCaptureFixture) -> None:
    async with meshed_hubs(1, establish_timeout=5.0, liveness=5.0) as (hubs, meshes,
                                                                        clients):
        clients_a, by_a = await spread(hubs["a"].port, 1, start=1)
        clients_b, by_b = await spread(hubs["b"].port, 1, start=1)
        clients += clients_a + clients_b
        watcher, target = by_a[1][0], by_b[1][0]
        await until_node_b_is_known(watcher)
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
