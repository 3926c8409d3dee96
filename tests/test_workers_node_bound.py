"""What a worker routes to another hub of the mesh goes to the supervisor over the
worker's control link; while the supervisor lags, that is bounded by
``max_route_buffer`` as routing to another worker is: beyond it messages are dropped,
counted (``route_dropped``) and logged, instead of piling up in the worker's memory."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from test_workers import APP, TIMEOUT, connect
from tether.hub import Hub
from tether.ids import FlowId
from tether.mesh import Mesh
from tether.workers import pool_of


async def test_routing_to_another_hub_is_bounded_while_the_supervisor_lags() -> None:
    mesh = Mesh("hub", listen="127.0.0.1:0", peers={"b": "127.0.0.1:1"},
                establish_timeout=60.0, retry_interval=0.2)
    hub = Hub("127.0.0.1", 0, workers=1, handler=APP)
    pool = pool_of(hub)
    pool.mesh = mesh
    pool.max_route_buffer = 1 << 20
    pool.stats_interval = 0.2
    await hub.start()
    try:
        client = await connect(hub.port)
        target = FlowId("b", 5, 1)
        deadline = time.monotonic() + TIMEOUT
        while await client.ask(f"CLOSE {target}") != "CLOSE True":
            assert time.monotonic() < deadline  # until the worker knows node b
            await asyncio.sleep(0.05)
        line = b"SEND %s " % str(target).encode() + b"x" * 60_000 + b"\n"
        total = 500  # 30 MB for node b, 30 times max_route_buffer
        sock = socket.create_connection(("127.0.0.1", hub.port), timeout=30)

        def push() -> None:  # a line at a time: little for node b in each loop iteration
            for _ in range(total):
                sock.sendall(line)
                time.sleep(0.002)

        pusher = threading.Thread(target=push)
        pusher.start()
        pusher.join(30)  # the supervisor (this loop) lags: it reads nothing meanwhile
        assert not pusher.is_alive()
        deadline = time.monotonic() + TIMEOUT
        while True:  # the worker's reports come after what waited in its link
            await pool.refresh_stats()
            routing = pool.routing_stats()
            if routing["to_nodes"] + routing["route_dropped"] == total:
                break
            assert time.monotonic() < deadline, routing
            await asyncio.sleep(0.1)
        assert routing["route_dropped"] > 0, routing
        sock.close()
        client.close()
    finally:
        await hub.aclose(2.0)
    assert pool.pids() == {}
