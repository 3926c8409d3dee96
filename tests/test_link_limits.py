"""`max_links`: a listening Node or a Gateway holds at most so many links (those in
their handshake included); one more is reset as it is accepted, logged and counted.
Real sockets, real nodes dialling in."""

from __future__ import annotations

import asyncio
import logging

import pytest

import tether
from tether.errors import HandshakeError

BOUND = 5.0  # a wait that ends at once when the code works


async def test_a_listening_node_resets_links_over_max_links(
        caplog: pytest.LogCaptureFixture) -> None:
    server = tether.Node("srv", listen="127.0.0.1:0", max_links=1)
    await server.start()
    address = f"127.0.0.1:{server.port}"
    first, second, third = (tether.Node(n, gateway=address) for n in ("a", "b", "c"))
    try:
        async with asyncio.timeout(BOUND):
            await first.start()
            with caplog.at_level(logging.WARNING, logger="tether.node"), \
                    pytest.raises(HandshakeError, match="reset by peer"):
                await second.start()
        assert server.stats()["links_over_limit"] == 1
        assert "node srv: link from 127.0.0.1:" in caplog.text
        assert "1 link(s) open or in their handshake, at the limit (max_links 1)" \
            in caplog.text
        await first.aclose()
        async with asyncio.timeout(BOUND):
            while server.stats()["links"]:
                await asyncio.sleep(0.01)
            await third.start()
        assert third.linked
    finally:
        for node in (first, second, third, server):
            await node.aclose()


async def test_a_gateway_resets_links_over_max_links() -> None:
    gw = tether.Gateway("127.0.0.1:0", name="gw", max_links=2)
    await gw.start()
    address = f"127.0.0.1:{gw.port}"
    nodes = [tether.Node(f"n{i}", gateway=address) for i in range(3)]
    try:
        async with asyncio.timeout(BOUND):
            await nodes[0].start()
            await nodes[1].start()
            with pytest.raises(HandshakeError):
                await nodes[2].start()
        stats = gw.stats()
        assert (stats["links"], stats["max_links"], stats["links_over_limit"],
                stats["links_refused"]) == (2, 2, 1, 1), stats
    finally:
        for node in nodes:
            await node.aclose()
        await gw.aclose()


def test_max_links_is_checked() -> None:
    with pytest.raises(ValueError, match="max_links must be 1 or more"):
        tether.Node("n", listen="127.0.0.1:0", max_links=0)
    with pytest.raises(ValueError, match="max_links must be 1 or more"):
        tether.Gateway("127.0.0.1:0", max_links=0)
