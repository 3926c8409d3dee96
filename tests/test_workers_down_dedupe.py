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

from test_workers import Client, meshed_hubs, spread, until_node_b_is_known
from tether.workers import pool_of


class HoldsTheLoop(asyncio.Protocol):
    """Blocks its loop for 0.7 s in each read callback."""

    def data_received(self, data: bytes) -> None:
        time.sleep(0.7)


async def test_a_connection_of_a_gone_node_is_reported_down_once() -> None:
    held, stall = socket.socketpair()
    await asyncio.get_running_loop().connect_accepted_socket(HoldsTheLoop, held)
    try:
        async with meshed_hubs(1, establish_timeout=0.5, liveness=1.0) as (hubs, _,
                                                                            clients):
            clients_a, by_a = await spread(hubs["a"].port, 1, each=2, start=2)
            clients_b, by_b = await spread(hubs["b"].port, 1, start=1)
            clients += clients_a + clients_b
            sender, watcher = by_a[1][:2]
            target = by_b[1][0]
            await until_node_b_is_known(sender)
            sender.send(f"SEND {target.id} hello")
            assert await target.line() == "hello"
            assert await watcher.ask("WATCH") == "WATCHING"
            await hubs["b"].aclose(1.0)
            sender.send(f"SEND {target.id} lost 1")  # queued in the mesh: b cannot be
            await asyncio.sleep(0.05)  # reached: given back establish_timeout later
            await _route_while_the_loop_is_held(sender, target, stall)
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


async def _route_while_the_loop_is_held(sender: Client, target: Client,
                                        stall: socket.socket) -> None:
    """Hold this loop in an I/O callback past the mesh's establish timeout while the
    worker routes "lost 2": uvloop runs the due timer, then reads the route (asyncio
    reads first, and makes one report)."""
    fd = sender.writer.get_extra_info("socket").fileno()
    late = threading.Timer(0.2, os.write, (fd, f"SEND {target.id} lost 2\n".encode()))
    stall.send(b"x")  # the hold begins as the loop next polls
    late.start()
    await asyncio.to_thread(late.join)  # (it writes to the client's socket: before
    # anything closes it; the loop meanwhile polls, reads the stall and is held)
