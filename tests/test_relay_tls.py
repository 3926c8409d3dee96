"""The relay over mutual TLS, with real processes: every link -- agent to gateway,
connector to gateway, and gateway to gateway in a cluster -- is TLS, and each side
proves who it is with a certificate from the test CA (the session `tls` fixture of
conftest.py: throwaway certificates made at test time).

    curl --TCP--> tether agent ==TLS==> gw1 [==TLS==> gw2] ==TLS==> tether connector --TCP--> server

    gateway:          --tls-cert gateway.pem --tls-key ... --tls-client-ca ca.pem
                      --peer-tls-ca ca.pem (in a cluster; it dials with gateway.pem)
    agent, connector: --tls-ca ca.pem --tls-cert client.pem --tls-key ...

A gateway of a cluster both serves links and dials its peers with its one certificate,
so where peers require client certificates that certificate must be good for TLS
client authentication too (gateway.pem: extendedKeyUsage serverAuth, clientAuth); a
server-only certificate is refused by the peer ("unsuitable certificate purpose"), as
a test below shows.

The refusals: an agent without a client certificate, with one from another CA, without
TLS at all, or not trusting the gateway's certificate, exits 1 with a one-line error
naming the cause, and the gateway logs (and counts) the refusal; a gateway dialing a
peer with an unacceptable certificate (or without TLS) never gets its link up, the
peer logs the refusal and the dialing gateway says it was refused.
"""

from __future__ import annotations

import hashlib
import random
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from relayrig import HOST, Relay, Rig, Server, need, wait_until

if TYPE_CHECKING:
    from conftest import TLSMaterial

CLIENT_TIMEOUT = 20.0
# A FIN crosses the relay in milliseconds; this is a bound for a loaded 2-CPU machine.
QUICK = 0.5


def gateway_tls(tls: TLSMaterial, cert: Path | None = None, key: Path | None = None
                ) -> list[str]:
    """A gateway serving TLS with `cert` (the gateway certificate by default), requiring
    client certificates from the test CA, and dialing its peers over TLS (presenting
    `cert`, trusting the test CA)."""
    return ["--tls-cert", str(cert or tls.gateway_cert), "--tls-key", str(key or tls.gateway_key),
            "--tls-client-ca", str(tls.ca), "--peer-tls-ca", str(tls.ca)]


def edge_tls(tls: TLSMaterial) -> list[str]:
    """An agent or connector trusting the test CA, with the client certificate."""
    return ["--tls-ca", str(tls.ca), "--tls-cert", str(tls.client_cert),
            "--tls-key", str(tls.client_key)]


@dataclass
class Relays:
    """The servers, and a mutual-TLS relay to them per number of gateways, started on
    first use and shared by the tests of this module: "web" (python -m http.server)
    and "svc" (a listening socket of this process, so a test holds the server's end)."""

    rig: Rig
    tls: TLSMaterial
    site: Path
    web: Server
    srv: socket.socket
    made: dict[int, Relay] = field(default_factory=dict)

    def get(self, gateways: int) -> Relay:
        if gateways not in self.made:
            self.made[gateways] = self.rig.tunnel(
                {"web": self.web.port, "svc": self.srv.getsockname()[1]}, gateways=gateways,
                gateway_args=gateway_tls(self.tls), connector_args=edge_tls(self.tls),
                agent_args=edge_tls(self.tls))
        return self.made[gateways]


@pytest.fixture(scope="module")
def relays(tls: TLSMaterial, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relays]:
    site = tmp_path_factory.mktemp("site")
    (site / "big.bin").write_bytes(random.Random(6).randbytes(1024 * 1024 + 7))
    (site / "index.html").write_text("<h1>through tether, over TLS</h1>\n")
    with Rig() as rig, socket.create_server((HOST, 0)) as srv:
        srv.settimeout(10)
        yield Relays(rig, tls, site, rig.http_server(site), srv)


@pytest.fixture(params=[1, 2], ids=["1gw", "2gw"])
def relay(request: pytest.FixtureRequest, relays: Relays) -> Iterator[Relay]:
    """The shared relay through one gateway or a two-gateway cluster; after the test,
    every flow must have ended everywhere."""
    relay = relays.get(request.param)
    yield relay
    relays.rig.wait_idle(*relay.daemons)


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig() as r:
        yield r


def _curl(port: int, name: str) -> bytes:
    need("curl")
    out = subprocess.run(["curl", "-sS", "--fail", "--max-time", "15",
                          f"http://{HOST}:{port}/{name}"],
                         capture_output=True, timeout=CLIENT_TIMEOUT, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


# through the tunnel ----------------------------------------------------------------------

def test_curl_gets_the_exact_page_over_mutual_tls(relay: Relay, relays: Relays) -> None:
    """curl through agent -> gateway(s) -> connector -> http.server, every link mutual
    TLS: the exact bytes of a 1 MB file and of a small page, each a flow spliced at
    every gateway of the path."""
    spliced = [g.status()["flows_spliced"] for g in relay.gateways]
    for name in ("big.bin", "index.html"):
        got = _curl(relay.agent.ports["web"], name)
        expected = (relays.site / name).read_bytes()
        assert len(got) == len(expected)
        assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
    assert [g.status()["flows_spliced"] - n for g, n in zip(relay.gateways, spliced,
                                                            strict=True)] \
        == [2] * len(relay.gateways)


def _recv_all(sock: socket.socket) -> bytes:
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def test_close_cascade_over_mutual_tls(relay: Relay, relays: Relays) -> None:
    """The application half-closes: the server reads the request, then EOF within
    QUICK, and still answers; then the server closes: the application reads the whole
    answer, then EOF. Both FINs crossed every TLS link."""
    with socket.create_connection((HOST, relay.agent.ports["svc"]), timeout=10) as app:
        app.sendall(b"request over tls")
        conn, _ = relays.srv.accept()
        with conn:
            conn.settimeout(10)
            got = b""
            while len(got) < 16:
                chunk = conn.recv(100)
                assert chunk, f"EOF after {got!r}"
                got += chunk
            assert got == b"request over tls"
            app.shutdown(socket.SHUT_WR)
            t0 = time.monotonic()
            assert conn.recv(100) == b""
            took = time.monotonic() - t0
            assert took < QUICK, f"the application's FIN took {took:.3f}s to reach the server"
            conn.sendall(b"answer after the FIN")
        assert _recv_all(app) == b"answer after the FIN"


# refusals ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """A daemon started with `options(tls)` that must be refused: the error it reports,
    and the line the refusing gateway logs (after "gateway NAME: ")."""

    id: str
    options: Callable[[TLSMaterial], list[str]]
    error: str
    gateway_log: str
    refused: int = 1  # how many links the gateway counts as refused per attempt


REFUSED_CERT = (r"right after the TLS handshake: the peer probably refused this node's TLS "
                r"client certificate \(or its absence\)")
TLS_REFUSAL = rf"link from \? \({HOST}:\d+\) closed: TLS failed: "

BAD_AGENTS = [
    Refusal("no-client-certificate", lambda tls: ["--tls-ca", str(tls.ca)],
            rf"handshake with {HOST}:\d+ failed: .*certificate required.* {REFUSED_CERT}",
            TLS_REFUSAL + ".*peer did not return a certificate"),
    Refusal("client-certificate-from-another-ca",
            lambda tls: ["--tls-ca", str(tls.ca), "--tls-cert", str(tls.other_client_cert),
                         "--tls-key", str(tls.other_client_key)],
            rf"handshake with {HOST}:\d+ failed: .*unknown ca.* {REFUSED_CERT}",
            TLS_REFUSAL + ".*certificate verify failed: unable to get local issuer certificate"),
    Refusal("no-tls", lambda tls: [],
            rf"handshake with {HOST}:\d+ failed: peer closed the connection",
            TLS_REFUSAL + ".*wrong version number"),
    # The agent refuses the gateway: the gateway sees a connection end in its handshake.
    Refusal("gateway-certificate-not-trusted",
            lambda tls: ["--tls-ca", str(tls.other_ca), "--tls-cert", str(tls.client_cert),
                         "--tls-key", str(tls.client_key)],
            rf"TLS handshake with {HOST}:\d+ failed: .*certificate verify failed",
            rf"link from {HOST}:\d+ ended before its handshake: ", refused=0),
]


@pytest.mark.parametrize("bad", BAD_AGENTS, ids=[b.id for b in BAD_AGENTS])
def test_agent_without_an_acceptable_tls_identity_is_refused(relays: Relays, rig: Rig,
                                                             bad: Refusal) -> None:
    """The agent exits 1 with a one-line error naming the cause; the gateway logs the
    refusal with the TLS reason (where it can know it) and counts it in `links_refused`;
    no node joins the gateway; the relay keeps serving."""
    relay = relays.get(1)
    gw = relay.gateways[0]
    before, mark = gw.status(), gw.mark()
    agent = rig.agent(gw, ["web"], *bad.options(relays.tls), name="intruder",
                      expect_ready=False)
    assert agent.proc.wait(CLIENT_TIMEOUT) == 1, agent.log()
    agent.wait_log(rf"^tether agent: {bad.error}", timeout=1.0)
    gw.wait_log(rf"gateway gw1: {bad.gateway_log}", after=mark)
    wait_until(lambda: gw.status()["links_refused"] - before["links_refused"] != bad.refused,
               5.0, "links_refused not counted", rig.describe)
    status = gw.status()
    assert (status["links"], status["links_accepted"]) \
        == (before["links"], before["links_accepted"]), status
    assert not gw.log_has("node intruder connected")
    assert b"<h1>" in _curl(relay.agent.ports["web"], "index.html")
    relays.rig.wait_idle(*relay.daemons)


BAD_PEERS = [
    Refusal("no-tls", lambda tls: [], "peer closed the connection",
            TLS_REFUSAL + ".*wrong version number"),
    Refusal("certificate-from-another-ca",
            lambda tls: gateway_tls(tls, tls.other_client_cert, tls.other_client_key),
            f"unknown ca.* {REFUSED_CERT}",
            TLS_REFUSAL + ".*certificate verify failed: unable to get local issuer certificate"),
    Refusal("server-only-certificate",
            lambda tls: gateway_tls(tls, tls.server_cert, tls.server_key),
            f"unsupported certificate.* {REFUSED_CERT}",
            TLS_REFUSAL + ".*certificate verify failed: unsuitable certificate purpose"),
]


@pytest.mark.parametrize("bad", BAD_PEERS, ids=[b.id for b in BAD_PEERS])
def test_peer_gateway_without_an_acceptable_tls_identity_is_refused(
        relays: Relays, rig: Rig, bad: Refusal) -> None:
    """A third gateway, gw3, names gw2 of the mutual-TLS cluster as its peer but has no
    certificate gw2 accepts from a client (no TLS at all; one from another CA; the
    server certificate, good for serverAuth only): gw2 logs and counts the refusal, gw3
    logs that gw2 refused its link (once, not at each retry), and the link never comes
    up: gw3 learns nothing and gw2 does not know gw3."""
    gw2 = relays.get(2).gateways[1]
    before, mark = gw2.status(), gw2.mark()
    gw3 = rig.gateway("--peer", f"gw2={gw2.address}", "--retry-interval", "0.2",
                      *bad.options(relays.tls), name="gw3")
    gw2.wait_log(rf"gateway gw2: {bad.gateway_log}", after=mark)
    gw3.wait_log(rf"gateway gw3: peer gw2 at {re.escape(gw2.address)} refused the link: "
                 rf"handshake with {re.escape(gw2.address)} failed: .*{bad.error}")
    wait_until(lambda: gw2.status()["links_refused"] - before["links_refused"] < 3, 5.0,
               "gw2 did not refuse gw3's retries", rig.describe)
    assert len(gw3.proc.find("refused the link", stream="stderr")) == 1, gw3.log()
    status = gw3.status()
    assert status["peers"]["gw2"]["up"] is False, status["peers"]
    assert status["services"] == {}, status["services"]
    assert "gw3" not in gw2.status()["peers"]
    assert not gw2.log_has("node gw3 connected")
