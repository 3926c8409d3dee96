"""`Node.wait_linked`: waiting for the link to the gateway, with a real gateway whose
link is dropped (the gateway closes) and comes back (a gateway on the same port)."""

from __future__ import annotations

import asyncio

import pytest

import tether
from tether.errors import FlowClosed, LocalProtocolError

BOUND = 5.0  # a wait that ends at once when the code works


async def test_wait_linked_follows_the_link_down_and_back_up() -> None:
    gw = tether.Gateway("127.0.0.1:0", name="gw")
    await gw.start()
    address = f"127.0.0.1:{gw.port}"
    node = tether.Node("edge", gateway=address)
    try:
        await node.start()
        async with asyncio.timeout(BOUND):
            await node.wait_linked()  # up: at once
        await gw.aclose()
        async with asyncio.timeout(BOUND):
            await node.link_lost()
        waiting = asyncio.ensure_future(node.wait_linked())
        await asyncio.sleep(0.1)
        assert not waiting.done(), "wait_linked returned while the link was down"
        gw = tether.Gateway(address, name="gw")
        await gw.start()
        await node.start()
        async with asyncio.timeout(BOUND):
            await waiting
        assert node.linked
    finally:
        await node.aclose()
        await gw.aclose()


async def test_wait_linked_raises_once_the_node_is_closed() -> None:
    async with tether.Gateway("127.0.0.1:0", name="gw") as gw:
        node = tether.Node("edge", gateway=f"127.0.0.1:{gw.port}")
        await node.start()
        await gw.aclose()
        async with asyncio.timeout(BOUND):
            await node.link_lost()
        waiting = asyncio.ensure_future(node.wait_linked())
        await asyncio.sleep(0.05)
        await node.aclose()
        async with asyncio.timeout(BOUND):
            with pytest.raises(FlowClosed, match="closed"):
                await waiting
        with pytest.raises(FlowClosed, match="closed"):
            await node.wait_linked()


async def test_wait_linked_on_a_node_without_a_gateway_is_an_error() -> None:
    async with tether.Node("lonely", listen="127.0.0.1:0") as node:
        with pytest.raises(LocalProtocolError, match="no gateway"):
            await node.wait_linked()
