"""TLS and the shared token: who may connect, and how clearly a refusal is reported.

Certificates come from the session `tls` fixture (conftest.py): a throwaway CA, a
server certificate for localhost/127.0.0.1, a client certificate, and an unrelated
CA, all generated at test time into a temporary directory.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest

import tether
from tether import ErrorCode, Flow, HandshakeError, PeerUnreachable

if TYPE_CHECKING:
    from conftest import TLSMaterial

SERVICE = "echo"


@asynccontextmanager
async def echo_server(address: str, **node_kwargs: object) -> AsyncIterator[tether.Node]:
    """A node serving SERVICE: echoes each flow's bytes until EOF, then half-closes."""
    async with tether.Node("echo-server", gateway=address, **node_kwargs) as node:  # type: ignore[arg-type]
        node.register(SERVICE)

        async def serve() -> None:
            while True:
                try:
                    flow = await node.accept()
                except tether.FlowClosed:
                    return  # the node is closing
                async for chunk in flow:
                    await flow.write(chunk)
                await flow.close_write()

        task = asyncio.create_task(serve())
        try:
            yield node
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def wait_for_service(gw: tether.Gateway, service: str = SERVICE) -> None:
    async with asyncio.timeout(2.0):
        while service not in gw.services():
            await asyncio.sleep(0.001)


async def round_trip(node: tether.Node, payload: bytes = b"ping over tls") -> Flow:
    flow = await node.alloc(SERVICE, liveness=5.0)
    await flow.write(payload)
    await flow.close_write()
    got = b"".join([chunk async for chunk in flow])
    assert got == payload
    return flow


def _counters(stats: dict[str, object]) -> int:
    return sum(v for k, v in stats.items() if isinstance(v, int) and k not in ("links", "flows"))


# a TLS gateway ---------------------------------------------------------------------------

@pytest.mark.parametrize("server_hostname", [None, "localhost"],
                         ids=["ip-san", "dns-san"])
async def test_node_trusting_the_ca_works_through_a_tls_gateway(
        tls: TLSMaterial, server_hostname: str | None) -> None:
    async with tether.Gateway("127.0.0.1:0", tls=tls.server_context()) as gw:
        address = f"127.0.0.1:{gw.port}"
        async with echo_server(address, tls=tls.client_context(),
                               server_hostname=server_hostname):
            await wait_for_service(gw)
            async with tether.Node("client", gateway=address, tls=tls.client_context(),
                                   server_hostname=server_hostname) as node:
                flow = await round_trip(node)
                # The link really is TLS, and the gateway showed our CA's certificate.
                transport = flow._conn.transport
                assert transport is not None
                ssl_object = transport.get_extra_info("ssl_object")
                assert ssl_object is not None
                assert ssl_object.version() in ("TLSv1.2", "TLSv1.3")
                peercert = ssl_object.getpeercert()
                subject = dict(item for rdn in peercert["subject"] for item in rdn)
                assert subject["commonName"] == "tether test server"
        assert gw.stats()["protocol_errors"] == 0


async def test_node_with_a_wrong_ca_gets_handshake_error(tls: TLSMaterial) -> None:
    async with tether.Gateway("127.0.0.1:0", tls=tls.server_context()) as gw:
        with pytest.raises(HandshakeError) as caught:
            async with tether.Node("client", gateway=f"127.0.0.1:{gw.port}",
                                   tls=tls.client_context(trust="other")):
                pytest.fail("connected to a gateway whose certificate it must not trust")
        assert caught.value.code is ErrorCode.HANDSHAKE_FAILED
        assert "certificate verify failed" in caught.value.reason
        assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
        assert gw.stats()["links"] == 0


async def test_node_expecting_another_hostname_gets_handshake_error(tls: TLSMaterial) -> None:
    async with tether.Gateway("127.0.0.1:0", tls=tls.server_context()) as gw:
        with pytest.raises(HandshakeError) as caught:
            async with tether.Node("client", gateway=f"127.0.0.1:{gw.port}",
                                   tls=tls.client_context(), server_hostname="example.com"):
                pytest.fail("accepted a certificate for another host name")
        assert "example.com" in caught.value.reason


async def test_tls_node_against_a_plain_gateway(tls: TLSMaterial,
                                                caplog: pytest.LogCaptureFixture) -> None:
    async with tether.Gateway("127.0.0.1:0") as gw:
        with pytest.raises(HandshakeError) as caught:
            async with tether.Node("client", gateway=f"127.0.0.1:{gw.port}",
                                   tls=tls.client_context()):
                pytest.fail("a TLS handshake succeeded against a plain gateway")
        assert "TLS handshake" in caught.value.reason
        # The gateway read a TLS ClientHello where a HELLO frame belongs.
        assert gw.stats()["protocol_errors"] == 1
        assert any(r.levelno == logging.WARNING and r.name == "tether.gateway"
                   for r in caplog.records)


async def test_plain_node_against_a_tls_gateway_fails_at_once(tls: TLSMaterial) -> None:
    async with tether.Gateway("127.0.0.1:0", tls=tls.server_context()) as gw:
        with pytest.raises(HandshakeError):
            async with asyncio.timeout(2.0):  # not the 10 s handshake timeout
                async with tether.Node("client", gateway=f"127.0.0.1:{gw.port}"):
                    pytest.fail("a plain node connected to a TLS gateway")


# mutual TLS ------------------------------------------------------------------------------

async def test_mutual_tls_node_with_a_client_certificate_works(tls: TLSMaterial) -> None:
    async with tether.Gateway("127.0.0.1:0",
                              tls=tls.server_context(require_client_cert=True)) as gw:
        address = f"127.0.0.1:{gw.port}"
        async with echo_server(address, tls=tls.client_context(cert=True)):
            await wait_for_service(gw)
            async with tether.Node("client", gateway=address,
                                   tls=tls.client_context(cert=True)) as node:
                await round_trip(node)
        assert gw.stats()["protocol_errors"] == 0


async def test_mutual_tls_node_without_a_client_certificate_is_refused(
        tls: TLSMaterial) -> None:
    # With TLS 1.3 the client finishes its side of the handshake before the server has
    # checked the client's (missing) certificate, so the refusal reaches the node as the
    # connection closing during tether's HELLO exchange: still a HandshakeError, fast.
    async with tether.Gateway("127.0.0.1:0",
                              tls=tls.server_context(require_client_cert=True)) as gw:
        with pytest.raises(HandshakeError):
            async with asyncio.timeout(2.0):
                async with tether.Node("client", gateway=f"127.0.0.1:{gw.port}",
                                       tls=tls.client_context()):
                    pytest.fail("connected without the client certificate mTLS requires")
        assert gw.stats()["links"] == 0


async def test_mutual_tls_refusal_is_a_clear_error(tls: TLSMaterial) -> None:
    async with tether.Gateway("127.0.0.1:0",
                              tls=tls.server_context(require_client_cert=True)) as gw:
        with pytest.raises(HandshakeError) as caught:
            async with tether.Node("client", gateway=f"127.0.0.1:{gw.port}",
                                   tls=tls.client_context()):
                pytest.fail("connected without the client certificate mTLS requires")
    assert caught.value.code is ErrorCode.HANDSHAKE_FAILED, caught.value.code
    reason = caught.value.reason.lower()
    assert "tls" in reason or "certificate" in reason, caught.value.reason


async def test_gateway_counts_and_logs_a_failed_tls_handshake(
        tls: TLSMaterial, caplog: pytest.LogCaptureFixture) -> None:
    async with tether.Gateway("127.0.0.1:0",
                              tls=tls.server_context(require_client_cert=True)) as gw:
        before = _counters(gw.stats())
        with pytest.raises(HandshakeError):
            async with tether.Node("client", gateway=f"127.0.0.1:{gw.port}",
                                   tls=tls.client_context()):
                pass
        await asyncio.sleep(0.05)  # let the gateway's side of the failure play out
        assert _counters(gw.stats()) > before, gw.stats()
        assert any(r.levelno >= logging.WARNING and r.name.startswith("tether")
                   and "127.0.0.1" in r.getMessage() for r in caplog.records)


# the shared token ------------------------------------------------------------------------

@pytest.mark.parametrize("use_tls", [False, True], ids=["tcp", "tls"])
async def test_wrong_token_is_refused_counted_and_logged(
        tls: TLSMaterial, use_tls: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tether")
    server_ctx = tls.server_context() if use_tls else None
    async with tether.Gateway("127.0.0.1:0", token="a", tls=server_ctx) as gw:
        address = f"127.0.0.1:{gw.port}"

        def client_ctx() -> ssl.SSLContext | None:
            return tls.client_context() if use_tls else None

        with pytest.raises(HandshakeError) as caught:
            async with tether.Node("intruder", gateway=address, token="b", tls=client_ctx()):
                pytest.fail("a node with the wrong token got a link")
        assert caught.value.code is ErrorCode.BAD_TOKEN
        assert "bad token" in caught.value.reason
        stats = gw.stats()
        assert stats["protocol_errors"] == 1
        assert stats["links"] == 0
        warnings = [r for r in caplog.records
                    if r.name == "tether.gateway" and r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "bad token" in warnings[0].getMessage()
        assert "127.0.0.1" in warnings[0].getMessage()
        # The right token still works, and nothing more was counted.
        async with tether.Node("friend", gateway=address, token="a", tls=client_ctx()):
            await asyncio.sleep(0)
            assert gw.stats()["links"] == 1
        assert gw.stats()["protocol_errors"] == 1


async def test_wrong_token_to_a_listening_node(caplog: pytest.LogCaptureFixture) -> None:
    async with tether.Node("server", listen="127.0.0.1:0", token="a") as server:
        with pytest.raises(HandshakeError) as caught:
            async with tether.Node("intruder", gateway=f"127.0.0.1:{server.port}",
                                   token="b"):
                pytest.fail("a node with the wrong token got a direct link")
        assert caught.value.code is ErrorCode.BAD_TOKEN
        assert any(r.name == "tether.node" and r.levelno == logging.WARNING
                   and "bad token" in r.getMessage() for r in caplog.records)


async def test_a_tls_gateway_at_its_link_limit_resets_not_a_plaintext_goaway(
        tls: TLSMaterial) -> None:
    """`max_links` on a TLS gateway: the dialler beyond it could not read a plaintext
    GOAWAY inside TLS, so the connection is reset as accepted. The dialler's TLS
    handshake meets the reset: `PeerUnreachable` ("connection reset"), which an edge's
    `--start-wait` dials again -- not a garbled frame, not a hang; the gateway counts it."""
    async with tether.Gateway("127.0.0.1:0", tls=tls.server_context(), max_links=1) as gw:
        address = f"127.0.0.1:{gw.port}"
        async with tether.Node("first", gateway=address, tls=tls.client_context()):
            with pytest.raises(PeerUnreachable, match="reset by peer"):
                async with asyncio.timeout(5):
                    await tether.Node("second", gateway=address,
                                      tls=tls.client_context()).start()
        stats = gw.stats()
        assert (stats["links_over_limit"], stats["protocol_errors"]) == (1, 0), stats
