"""The relay's edges leave nothing behind: a flow that ended while its socket still
holds bytes nobody reads, a connection whose flow is still being allocated, a socket
still draining when the agent closes. Each test failed before its fix.

In-process Gateway, Agent and Connector over real loopback sockets; the application and
the server are plain sockets / asyncio servers in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import tether
from test_gateway import eventually, registered
from tether.relay import Agent, Connector

HOST = "127.0.0.1"


@asynccontextmanager
async def relay(server_port: int, *, fin_timeout: float = 60.0, cascade: str = "half",
                window: int = 256 * 1024) -> AsyncIterator[tuple[tether.Gateway, Connector, Agent]]:
    async with tether.Gateway(f"{HOST}:0", name="gw") as gw:
        addr = f"{HOST}:{gw.port}"
        co = Connector(addr, [("svc", HOST, server_port)], fin_timeout=fin_timeout,
                       window=window)
        await co.start()
        try:
            await registered(gw, "svc")
            ag = Agent(addr, [(HOST, 0, "svc")], fin_timeout=fin_timeout, cascade=cascade,
                       window=window)
            await ag.start()
            try:
                yield gw, co, ag
            finally:
                await ag.aclose()
        finally:
            await co.aclose()


def _replies(reply: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                       Awaitable[None]]:
    """A server that reads its request to EOF, then sends `reply` and closes."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.write(reply)
        await writer.drain()
        writer.close()
    return serve


async def test_a_closed_flow_whose_application_never_reads_is_not_held_for_ever() -> None:
    """The application sends its request and half-closes, then never reads (and never
    closes). The server replies (less than one window) and closes: the reply and both
    FINs reach the agent, the flow is CLOSED everywhere -- but the agent's socket still
    holds the reply in its write buffer, and `transport.close()` waits for it to drain
    for ever. The fin timeout must bound that too: the application half-closed, and the
    connection is not moving. (A kernel send buffer made small at the agent stands for a
    reply larger than the kernel buffers.)"""
    reply = b"r" * (200 * 1024)

    server = await asyncio.start_server(_replies(reply), HOST, 0)
    app = socket.socket()
    try:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        async with relay(server.sockets[0].getsockname()[1], fin_timeout=0.3) as (gw, co, ag):
            app.setblocking(False)
            await asyncio.get_running_loop().sock_connect(app, (HOST, ag.ports()[0]))
            await eventually("the agent adopted the connection", lambda: bool(ag.bridges))
            for bridge in ag.bridges:  # a small kernel buffer: the reply stays in the transport
                assert bridge.transport is not None
                bridge.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            app.sendall(b"request")
            app.shutdown(socket.SHUT_WR)
            # the flow ends everywhere (both FINs went through)...
            await eventually("the gateway's splice ended", lambda: not gw._ends)
            await eventually("the connector's connection ended", lambda: not co.bridges)
            # ...and the agent lets go of the connection within a few fin timeouts
            await eventually(lambda: f"the agent still holds {ag.stats()['flows']}",
                             lambda: not ag.bridges, timeout=3.0)
    finally:
        app.close()
        server.close()
        await server.wait_closed()


async def _app_end(app: socket.socket, timeout: float = 3.0) -> str:
    """Read `app` to its end: "eof", "reset", or "open" if nothing ended it in time."""
    loop = asyncio.get_running_loop()
    try:
        while await asyncio.wait_for(loop.sock_recv(app, 65536), timeout):
            pass
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "open"
    return "eof"


async def test_agent_close_ends_a_connection_whose_allocation_is_under_way() -> None:
    """`Agent.aclose()` while a connection's flow is still being allocated (the serving
    node has not accepted it yet): the allocation task is cancelled, but the bridge was
    not adopted yet, so nothing closes the application's socket -- it stays open for
    ever (and its transport is never closed)."""
    async with tether.Gateway(f"{HOST}:0", name="gw") as gw:
        addr = f"{HOST}:{gw.port}"
        async with tether.Node("slow", gateway=addr) as slow:  # registers, never accepts
            slow.register("svc")
            await registered(gw, "svc")
            ag = Agent(addr, [(HOST, 0, "svc")])
            await ag.start()
            app = socket.socket()
            app.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(app, (HOST, ag.ports()[0]))
                await eventually("the allocation is under way", lambda: bool(ag.tasks))
                await ag.aclose()
                assert await _app_end(app) in ("eof", "reset")
            finally:
                app.close()
                await ag.aclose()


async def test_agent_close_ends_a_closed_flows_socket_still_draining() -> None:
    """`Agent.aclose()` while a connection whose flow has ended (CLOSED) still holds
    bytes for an application that does not read: its transport is closing (waiting to
    drain), so `_close_edge` skips it, and the socket outlives the agent."""
    reply = b"r" * (200 * 1024)

    server = await asyncio.start_server(_replies(reply), HOST, 0)
    app = socket.socket()
    try:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        app.setblocking(False)
        async with relay(server.sockets[0].getsockname()[1]) as (_gw, _co, ag):
            await asyncio.get_running_loop().sock_connect(app, (HOST, ag.ports()[0]))
            await eventually("the agent adopted the connection", lambda: bool(ag.bridges))
            bridge = next(iter(ag.bridges))
            assert bridge.transport is not None
            bridge.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            app.sendall(b"request")
            app.shutdown(socket.SHUT_WR)
            await eventually("the flow ended at the agent", lambda: bridge.flow.state is
                             tether.FlowState.CLOSED)
            await ag.aclose()
            await eventually("the agent's socket was closed", lambda: bridge.transport is None
                             or bridge.on_done is None, timeout=2.0)
    finally:
        app.close()
        server.close()
        await server.wait_closed()


async def test_a_closed_flow_read_slowly_but_steadily_gets_its_whole_reply() -> None:
    """The other side of the first test: an application that half-closed and reads the
    tail of a CLOSED flow slowly but steadily, for longer than the fin timeout, is not
    reset: the timeout restarts as the socket takes bytes."""
    reply = bytes(range(256)) * 800  # 200 KiB

    server = await asyncio.start_server(_replies(reply), HOST, 0)
    loop = asyncio.get_running_loop()
    app = socket.socket()
    try:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        app.setblocking(False)
        async with relay(server.sockets[0].getsockname()[1], fin_timeout=0.3) as (_gw, _co, ag):
            await loop.sock_connect(app, (HOST, ag.ports()[0]))
            await eventually("the agent adopted the connection", lambda: bool(ag.bridges))
            for bridge in ag.bridges:
                assert bridge.transport is not None
                bridge.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            app.sendall(b"request")
            app.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := await asyncio.wait_for(loop.sock_recv(app, 4096), 5):
                got += chunk
                await asyncio.sleep(0.02)  # ~200 KB/s: about a second, > the fin timeout
            assert bytes(got) == reply
            assert ag.counters["fin_timeouts"] == 0
            await eventually("the agent let go", lambda: not ag.bridges)
    finally:
        app.close()
        server.close()
        await server.wait_closed()


async def test_an_ended_connection_is_freed_without_the_cyclic_garbage_collector() -> None:
    """Every connection's bridge, flow and transport are freed by reference counting as
    soon as it ends, at the agent and at the connector. A flow and its bridge held each
    other, so each connection left a cycle for the garbage collector: its pauses (200-400
    us for a few dozen connections, in the agent and the connector of the close
    benchmark) fell on whichever close was under way."""
    from tether.bridge import SocketBridge
    from tether.flow import Flow

    def left() -> list[str]:
        return [type(o).__name__ for o in gc.get_objects()
                if type(o) in (SocketBridge, Flow)]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionResetError):  # (the last connection's end)
            await _replies(b"reply")(reader, writer)

    server = await asyncio.start_server(serve, HOST, 0)
    loop = asyncio.get_running_loop()
    try:
        async with relay(server.sockets[0].getsockname()[1]) as (_gw, co, ag):
            gc.collect()
            gc.disable()
            try:
                for ending in ("close", "half-close", "reset"):
                    app = socket.socket()
                    app.setblocking(False)
                    await loop.sock_connect(app, (HOST, ag.ports()[0]))
                    await loop.sock_sendall(app, b"request")
                    if ending == "reset":
                        await eventually("the flow is open", lambda: bool(co.bridges))
                        app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
                    else:
                        app.shutdown(socket.SHUT_WR)
                        assert await asyncio.wait_for(loop.sock_recv(app, 100), 5) == b"reply"
                        if ending == "close":
                            assert await asyncio.wait_for(loop.sock_recv(app, 100), 5) == b""
                    app.close()
                    await eventually("both edges let go",
                                     lambda: not ag.bridges and not co.bridges)
                    # (the node lets go of a flow once its end is handled: held reads are
                    # applied within 10 ms, later on a busy machine)
                    def what(e: str = ending) -> str:
                        return f"{e}: {left()} left"
                    await eventually(what, lambda: not left())
            finally:
                gc.enable()
    finally:
        server.close()
        await server.wait_closed()
