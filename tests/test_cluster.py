"""Gateway clusters: services learned across gateways, flows forwarded across hops, a
lost gateway taking its routes and its flows with it. Real sockets, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

import tether
import tether.gateway as gateway_module
from tether import backoff
from tether.aio import spawn_owned
from tether.relay import Agent, Connector


async def wait_until(check: Callable[[], bool], timeout: float = 3.0) -> float:
    """Seconds until `check()` holds; fails the test after `timeout`."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"condition not reached within {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """A TCP server that echoes until EOF, then closes."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def chain(n: int, *, ring: bool = False) -> AsyncIterator[list[tether.Gateway]]:
    """n gateways, each peering with the next (and the last with the first if `ring`)."""
    gws = [tether.Gateway("127.0.0.1:0", name=f"gw{i}", retry_interval=0.2,
                          heartbeat=0.2, link_timeout=1.0) for i in range(n)]
    for gw in gws:
        await gw.start()
    for i in range(n - 1 + ring):
        nxt = gws[(i + 1) % n]
        gws[i].peers[nxt.name] = f"127.0.0.1:{nxt.port}"

        spawn_owned(gws[i]._tasks, gws[i]._keep_peer(nxt.name, f"127.0.0.1:{nxt.port}"))
    try:
        yield gws
    finally:
        for gw in gws:
            await gw.aclose()


async def roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_two_gateways_learn_services_within_a_second_and_carry_flows() -> None:
    async with echo_server() as port, chain(2) as (gw0, gw1):
        async with Connector(f"127.0.0.1:{gw1.port}", [("echo", "127.0.0.1", port)]):
            took = await wait_until(lambda: "echo" in gw0.services())
            assert took < 1.0
            async with Agent(f"127.0.0.1:{gw0.port}", [("127.0.0.1", 0, "echo")]) as agent:
                payload = bytes(range(256)) * 4000
                assert await roundtrip(agent.ports()[0], payload) == payload
                await wait_until(lambda: gw0.stats()["flows"] == gw1.stats()["flows"] == 0)
                assert gw0.counters["flows_spliced"] == gw1.counters["flows_spliced"] == 1
        # the connector left: the service is gone from the peer's table too
        took = await wait_until(lambda: "echo" not in gw0.services())
        assert took < 1.0


async def test_a_chain_of_three_gateways_forwards_over_two_hops() -> None:
    async with echo_server() as port, chain(3) as gws:
        async with Connector(f"127.0.0.1:{gws[2].port}", [("echo", "127.0.0.1", port)]):
            await wait_until(lambda: "echo" in gws[0].services())
            assert gws[0].cluster()["gw1"]["services"] == {"echo": 1}
            async with Agent(f"127.0.0.1:{gws[0].port}", [("127.0.0.1", 0, "echo")]) as agent:
                assert await roundtrip(agent.ports()[0], b"over two hops") == b"over two hops"
            await wait_until(lambda: all(g.stats()["flows"] == 0 for g in gws))


async def test_a_ring_converges_without_counting_to_infinity() -> None:
    async with echo_server() as port, chain(3, ring=True) as gws:
        async with Connector(f"127.0.0.1:{gws[1].port}", [("echo", "127.0.0.1", port)]):
            await wait_until(lambda: all("echo" in g.services() for g in gws))
            await asyncio.sleep(0.3)
            hops = [min(r.get("echo", 99) for r in g._routes.values()) for g in (gws[0], gws[2])]
            assert hops == [0, 0], hops  # both neighbours of gw1 go straight to it
        await wait_until(lambda: all("echo" not in g.services() for g in gws))


async def test_a_gateway_that_dies_takes_its_routes_and_its_flows_down() -> None:
    async with echo_server() as port, chain(2) as (gw0, gw1):
        async with Connector(f"127.0.0.1:{gw1.port}", [("echo", "127.0.0.1", port)],
                             liveness=5.0):
            await wait_until(lambda: "echo" in gw0.services())
            async with tether.Node("client", gateway=f"127.0.0.1:{gw0.port}") as client:
                flow = await client.alloc("echo", liveness=5.0)
                await flow.write(b"hi")
                assert await flow.read() == b"hi"
                pending = asyncio.ensure_future(flow.read())
                t0 = time.monotonic()
                for conn in list(gw1._conns):  # gw1 vanishes: every socket reset at once
                    assert conn.transport is not None
                    conn.transport.abort()
                with pytest.raises(tether.FlowDown) as caught:
                    await asyncio.wait_for(pending, 2)
                assert time.monotonic() - t0 < 1.0
                assert "link lost" in caught.value.reason
                await wait_until(lambda: "echo" not in gw0.services())
                with pytest.raises(tether.NoSuchService):
                    await client.alloc("echo")


async def test_services_removed_on_one_gateway_disappear_on_the_others() -> None:
    async with chain(2) as (gw0, gw1):
        async with tether.Node("server", gateway=f"127.0.0.1:{gw1.port}") as server:
            server.register("a")
            server.register("b")
            await wait_until(lambda: {"a", "b"} <= set(gw0.services()))
            server.unregister("a")
            took = await wait_until(lambda: "a" not in gw0.services())
            assert took < 1.0 and "b" in gw0.services()


async def test_policy_is_enforced_at_the_first_gateway_only() -> None:
    async with echo_server() as port, chain(2) as (gw0, gw1):
        gw0.policy = {"agent": {"other"}}
        async with Connector(f"127.0.0.1:{gw1.port}", [("echo", "127.0.0.1", port)]):
            await wait_until(lambda: "echo" in gw0.services())
            async with Agent(f"127.0.0.1:{gw0.port}", [("127.0.0.1", 0, "echo")]) as agent:
                reader, writer = await asyncio.open_connection("127.0.0.1", agent.ports()[0])
                writer.write(b"x")
                with contextlib.suppress(ConnectionError):
                    assert await asyncio.wait_for(reader.read(), 3) == b""
                writer.close()
                await wait_until(lambda: gw0.counters["denied"] == 1)
                assert gw1.counters["flows_spliced"] == 0


async def test_a_lost_peer_gateway_is_redialled_with_the_shared_backoff(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway re-dials a peer as the edges and the mesh re-dial theirs
    (`tether.backoff.retry_delay`: from 20 ms, doubling, jittered, up to
    `retry_interval`), and starts from the first delay again once a link was up and
    dropped. Real dials: refused at once while nothing listens on the peer's port."""
    calls: list[tuple[int, float]] = []
    real = backoff.retry_delay

    def spy(attempt: int, cap: float) -> float:
        calls.append((attempt, cap))
        return real(attempt, cap)

    monkeypatch.setattr(gateway_module, "retry_delay", spy)
    with socket.socket() as probe:  # a free port, nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gw1 = tether.Gateway("127.0.0.1:0", name="gw1", peers={"gw2": f"127.0.0.1:{port}"},
                         retry_interval=0.3, heartbeat=0.2, link_timeout=1.0)
    await gw1.start()
    try:
        await wait_until(lambda: len(calls) >= 4)
        assert [a for a, _ in calls[:4]] == [0, 1, 2, 3]
        assert all(cap == 0.3 for _, cap in calls)
        gw2 = tether.Gateway(f"127.0.0.1:{port}", name="gw2", heartbeat=0.2,
                             link_timeout=1.0)
        await gw2.start()
        try:
            await wait_until(lambda: gw1.cluster()["gw2"]["up"])
            before = len(calls)
        finally:
            await gw2.aclose()
        await wait_until(lambda: len(calls) > before)
        assert calls[before][0] == 0  # the first delay again, not where it had got to
    finally:
        await gw1.aclose()


@contextlib.asynccontextmanager
async def mirrored(names: tuple[str, str]) -> AsyncIterator[list[tether.Gateway]]:
    """Two gateways naming each other with `--peer` (as the issue runs them), started
    at once: both dial."""
    ports = []
    for _ in names:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    gws = [tether.Gateway(f"127.0.0.1:{ports[i]}", name=names[i], retry_interval=0.2,
                          heartbeat=0.2, link_timeout=1.0,
                          peers={names[1 - i]: f"127.0.0.1:{ports[1 - i]}"})
           for i in range(2)]
    await asyncio.gather(*(gw.start() for gw in gws))
    try:
        yield gws
    finally:
        for gw in gws:
            await gw.aclose()


def _peer_links(gw: tether.Gateway) -> int:
    return sum(1 for c in gw._conns if c.link.is_open)


@pytest.mark.parametrize("names", [("gw1", "gw2"), ("zz", "aa")])
async def test_gateways_that_both_dial_keep_one_link(names: tuple[str, str]) -> None:
    """Both name the other with `--peer` and both dial: once up, each keeps the link
    the gateway whose name sorts first dialled (the same one) and drains the other, so
    the pair has one link, and neither dials again while it is up. Killing it, they
    re-form with one link again; flows go through before and after."""
    async with echo_server() as port, mirrored(names) as (a, b):
        await wait_until(lambda: _peer_links(a) == _peer_links(b) == 1
                         and len(a._conns) == len(b._conns) == 1)
        await asyncio.sleep(0.6)  # (three retry intervals: nobody dials a second one)
        assert len(a._conns) == len(b._conns) == 1
        assert a.cluster()[b.name]["up"] and b.cluster()[a.name]["up"]
        async with Connector(f"127.0.0.1:{b.port}", [("echo", "127.0.0.1", port)]):
            await wait_until(lambda: "echo" in a.services())
            async with Agent(f"127.0.0.1:{a.port}", [("127.0.0.1", 0, "echo")]) as agent:
                assert await roundtrip(agent.ports()[0], b"one link") == b"one link"
                (link,) = [c for c in a._conns if c.link.peer_name == b.name]
                link.close("cut")  # the pair's link goes: both dial again
                await wait_until(lambda: not a.cluster()[b.name]["up"], 3)
                await wait_until(lambda: a.cluster()[b.name]["up"] and "echo" in a.services()
                                 and sum(c.link.peer_name == b.name for c in a._conns) == 1
                                 and sum(c.link.peer_name == a.name for c in b._conns) == 1,
                                 5)
                assert await roundtrip(agent.ports()[0], b"again") == b"again"
