"""The flow conformance suite (flowcheck.py) over every transport, under both loops.

Transports: a direct link (a listening Node and a Node pointed at it), a gateway hop
(a Gateway and two Nodes), a TLS link (a direct link over TLS with a CA made at test
time) and a TLS gateway hop. The loops (asyncio, uvloop) come from conftest.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import pytest

import tether
from flowcheck import CHECKS, FlowEnv, MakePair, check_flow

if TYPE_CHECKING:
    from conftest import TLSMaterial

SERVICE = "conformance"
WINDOW = 64 * 1024  # small windows: more credit round trips per byte, quicker checks


@asynccontextmanager
async def direct_link(tls: TLSMaterial | None = None) -> AsyncIterator[FlowEnv]:
    async with tether.Node("server", listen="127.0.0.1:0", window=WINDOW,
                           server_tls=tls.server_context() if tls else None) as server:
        server.register(SERVICE)
        async with tether.Node("client", gateway=f"127.0.0.1:{server.port}", window=WINDOW,
                               tls=tls.client_context() if tls else None) as client:
            yield FlowEnv(client, server, SERVICE, WINDOW)


@asynccontextmanager
async def gateway_hop(tls: TLSMaterial | None = None) -> AsyncIterator[FlowEnv]:
    async with tether.Gateway("127.0.0.1:0", name="gw", window=WINDOW,
                              tls=tls.server_context() if tls else None) as gw:
        address = f"127.0.0.1:{gw.port}"
        async with tether.Node("server", gateway=address, window=WINDOW,
                               tls=tls.client_context() if tls else None) as server:
            server.register(SERVICE)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 2.0
            while SERVICE not in gw.services():
                assert loop.time() < deadline, "the gateway never learned the service"
                await asyncio.sleep(0.001)
            async with tether.Node("client", gateway=address, window=WINDOW,
                                   tls=tls.client_context() if tls else None) as client:
                yield FlowEnv(client, server, SERVICE, WINDOW, relays=(gw,))


TRANSPORTS: dict[str, Callable[[TLSMaterial | None], AbstractAsyncContextManager[FlowEnv]]]
TRANSPORTS = {"direct": direct_link, "gateway": gateway_hop,
              "tls": direct_link, "tls-gateway": gateway_hop}


@pytest.fixture(params=list(TRANSPORTS))
def make_pair(request: pytest.FixtureRequest) -> MakePair:
    name: str = request.param
    material: TLSMaterial | None = None
    if name.startswith("tls"):
        material = request.getfixturevalue("tls")
    factory = TRANSPORTS[name]
    return lambda: factory(material)


@pytest.mark.parametrize("check", list(CHECKS))
async def test_flow_conformance(make_pair: MakePair, check: str) -> None:
    await check_flow(make_pair, [check])
