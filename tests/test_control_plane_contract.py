"""The relay's control plane against its contract: nonsense on the command line is refused
with a one-line error and a non-zero exit (never accepted, never a traceback), the token
and policy files mean what they say, `tether status` says what went wrong, `/metrics` is
a scrape Prometheus takes, the admin endpoint does not hold a silent client, and a
gateway stops when told. Real processes and sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tether
from procs import tether_argv
from relayrig import HOST, Rig, free_port
from test_mesh import eventually
from tether import gateway as gateway_module
from tether import heldreads, wire
from tether.admin import AdminServer, fetch_status
from tether.aio import LinkConnection, format_address, open_link, parse_address
from tether.events import Event
from tether.link import LinkConfig

CLI_TIMEOUT = 20.0


def tether_fails(*args: str) -> str:
    """Run `tether ARGS...`, which must exit 1 at once with one line on stderr naming the
    problem (no traceback, never "listening"); that line."""
    try:
        out = subprocess.run(tether_argv(*args), capture_output=True, timeout=CLI_TIMEOUT,
                             check=False, text=True)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"tether {' '.join(args)}: still running after "
                             f"{CLI_TIMEOUT:g}s; stderr:\n{exc.stderr!r}") from None
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith(f"tether {args[0]}: ")]
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, (
        out.returncode, out.stderr)
    return lines[0]


# command-line nonsense ------------------------------------------------------------------

@pytest.mark.parametrize("address", ["127.0.0.1:70000", "127.0.0.1:65536", "[::1]:99999"])
def test_a_port_above_65535_is_not_an_address(address: str) -> None:
    with pytest.raises(ValueError, match="out of"):
        parse_address(address)


@pytest.mark.parametrize(("peer", "shown"), [
    (("127.0.0.1", 80), "127.0.0.1:80"), (("::1", 80, 0, 0), "[::1]:80"),
    (("fe80::1%eth0", 7), "[fe80::1%eth0]:7"), (None, "?"), ("", "?"),
    ("/run/x.sock", "/run/x.sock")])
def test_addresses_are_shown_as_parse_address_reads_them(peer: object, shown: str) -> None:
    """IPv6 in brackets (`::1:80` is ambiguous), and what `parse_address` reads back."""
    assert format_address(peer) == shown
    if isinstance(peer, tuple):
        assert parse_address(shown) == (peer[0], peer[1])


@pytest.mark.parametrize("args", [
    ("gateway", "--listen", "127.0.0.1:70000"),  # listened on 4464 (70000 - 65536)
    ("gateway", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:99999"),
    ("agent", "--gateway", "127.0.0.1:7443", "--forward", "127.0.0.1:65537=web"),
], ids=["listen", "admin", "forward"])
def test_a_port_above_65535_is_refused_not_wrapped(args: tuple[str, ...]) -> None:
    assert "out of [0, 65535]" in tether_fails(*args)


@pytest.mark.parametrize(("args", "says"), [
    (("--window", "0"), "initial_window 0"),
    (("--heartbeat", "20"), "must exceed heartbeat_interval"),
    (("--retry-interval", "0"), "retry_interval"),  # re-dialled its peers at 100 % CPU
    (("--retry-interval", "-1"), "retry_interval"),
], ids=["window-0", "heartbeat-above-link-timeout", "retry-0", "retry-negative"])
def test_gateway_refuses_link_settings_at_start(args: tuple[str, ...], says: str) -> None:
    """Before, the gateway printed "listening", then failed every link in its protocol
    factory (a traceback in its log; under uvloop the node waited for its handshake
    timeout)."""
    line = tether_fails("gateway", "--listen", "127.0.0.1:0",
                        "--peer", f"gw2={HOST}:{free_port()}", *args)
    assert says in line


@pytest.mark.parametrize(("peers", "says"), [
    (["gw2=127.0.0.1:7001", "gw2=127.0.0.1:7002"], "named twice"),
    (["gw=127.0.0.1:7001"], "own name"),
])
def test_gateway_refuses_a_peer_named_twice_or_itself(peers: list[str], says: str) -> None:
    args = [arg for p in peers for arg in ("--peer", p)]
    assert says in tether_fails("gateway", "--listen", "127.0.0.1:0", "--name", "gw", *args)


@pytest.mark.parametrize(("option", "content"), [
    ("--policy", ["web"]),                # AttributeError traceback
    ("--policy", {"agent": None}),        # TypeError traceback
    ("--policy", {"agent": "web"}),       # read as the services "w", "e", "b"
    ("--tokens", "secret"),               # AttributeError traceback
    ("--tokens", {"agent": ""}),          # an empty token: no secret at all
    ("--tokens", {"agent": ["a"]}),       # the token "['a']"
])
def test_gateway_refuses_a_tokens_or_policy_file_of_the_wrong_shape(
        tmp_path: Path, option: str, content: object) -> None:
    path = tmp_path / "file.json"
    path.write_text(json.dumps(content))
    line = tether_fails("gateway", "--listen", "127.0.0.1:0", option, str(path))
    assert "file must be a JSON object" in line


async def test_an_empty_tokens_file_lets_no_node_in(tmp_path: Path) -> None:
    """`--tokens` gives each node its own token, "a name not listed is refused": with no
    name listed, none gets in (before, `{}` switched tokens off: anyone got in)."""
    path = tmp_path / "tokens.json"
    path.write_text("{}")
    with Rig() as rig:
        gw = rig.gateway("--tokens", str(path))
        with pytest.raises(tether.HandshakeError):
            async with tether.Node("agent", gateway=gw.address):
                pass
        gw.wait_log(r"link from agent .* closed")
        assert gw.status()["links_refused"] == 1


@pytest.mark.parametrize(("args", "says"), [
    (("agent", "--forward", "127.0.0.1:0=web", "--liveness", "0"), "below the minimum"),
    (("agent", "--forward", "127.0.0.1:0=web", "--liveness", "-1"), "below the minimum"),
    (("agent", "--forward", "127.0.0.1:0=web", "--liveness", "nan"), "below the minimum"),
    (("agent", "--forward", "127.0.0.1:0=web", "--fin-timeout", "-1"), "fin_timeout"),
    (("connector", "--service", "web=127.0.0.1:1", "--service", "web=127.0.0.1:2"),
     "web given more than once"),  # (the last one silently won)
    (("agent", "--forward", "127.0.0.1:0=web", "--retry-interval", "0"), "retry_interval"),
    (("connector", "--service", "web=127.0.0.1:1", "--retry-interval", "nan"),
     "retry_interval"),
], ids=["liveness-0", "liveness-negative", "liveness-nan", "fin-timeout-negative",
        "service-twice", "retry-0", "retry-nan"])
def test_edges_refuse_nonsense_at_start(args: tuple[str, ...], says: str) -> None:
    """Before, an agent with `--liveness 0` started and then failed every connection's
    allocation; a negative `--fin-timeout` quietly turned the fin timeout off."""
    line = tether_fails(args[0], "--gateway", f"{HOST}:{free_port()}", *args[1:])
    assert says in line, line


class _Quiet:
    def link_event(self, conn: LinkConnection, event: Event) -> None:
        pass


async def test_service_names_a_node_sends_do_not_grow_the_gateway_without_bound() -> None:
    """UNREGISTER of names never registered, and the services of nodes that left, leave
    nothing behind in the gateway's table; a node registering more than
    MAX_SERVICES_PER_NODE is refused (its link closed, a counter, a log line). (The
    real limit, not a patched one: the compiled build does not see a module constant
    patched from outside.)"""
    limit = gateway_module.MAX_SERVICES_PER_NODE
    async with tether.Gateway("127.0.0.1:0", name="gw1") as gw:
        conn = await open_link(HOST, gw.port, LinkConfig(name="co"), _Quiet())
        for i in range(200):
            conn.link.send_message(wire.KIND_UNREGISTER, 0, b"never-%d" % i, conn.now)
        for i in range(5):
            conn.link.send_message(wire.KIND_REGISTER, 0, b"svc-%d" % i, conn.now)
        conn.flush()
        await eventually(lambda: len(gw.services()) == 5, what="five services")
        assert len(gw._services) == 5, sorted(gw._services)  # (no empty entries)
        conn.close()
        await eventually(lambda: not gw._services, what="the services of a node that left")
        flood = await open_link(HOST, gw.port, LinkConfig(name="flood"), _Quiet())
        for i in range(limit + 12):
            flood.link.send_message(wire.KIND_REGISTER, 0, b"f-%d" % i, flood.now)
            if i % 256 == 255:
                flood.flush()
                await asyncio.sleep(0)
        flood.flush()
        await eventually(lambda: flood.link.is_closed, what="the flooding node's link closed")
        assert gw.counters["protocol_errors"] == 1, gw.counters
        assert len(gw._services) <= limit, len(gw._services)
        await eventually(lambda: not gw._services, what="its services forgotten")


# tether status ----------------------------------------------------------------------------

@contextlib.contextmanager
def server_that(answer: bytes | None) -> Iterator[int]:
    """A TCP server that reads a request, then sends `answer` and closes (None: keeps
    the connection open and says nothing)."""
    srv = socket.create_server((HOST, 0))
    held: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                conn.recv(65536)
                if answer is None:
                    held.append(conn)
                    continue
                conn.sendall(answer)
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        thread.join(5)
        for conn in held:
            conn.close()


@pytest.mark.parametrize(("answer", "says"), [
    (b"", "answered: nothing"),                       # IndexError traceback
    (b"HTTP/1.0 404 Not Found\r\n\r\nno\n", "answered: HTTP/1.0 404 Not Found"),
])
def test_status_of_an_endpoint_that_answers_no_status_says_what_it_got(
        answer: bytes, says: str) -> None:
    with server_that(answer) as port:
        assert says in tether_fails("status", f"{HOST}:{port}")


async def test_status_of_a_silent_endpoint_says_it_did_not_answer() -> None:
    """The error of a timeout had no text: `tether status` printed "tether status: "."""
    with server_that(None) as port:
        with pytest.raises(TimeoutError, match=rf"no answer from {HOST}:{port} within 0.3s"):
            await fetch_status(HOST, port, timeout=0.3)


# the admin endpoint -----------------------------------------------------------------------

async def test_admin_endpoint_closes_a_client_that_sends_no_request() -> None:
    """A client that connects and says nothing (or half a request) was held for ever:
    one fd each, without bound."""
    admin = AdminServer((HOST, 0), "gateway", "gw1", lambda: {"flows": 0})
    admin.request_timeout = 0.3
    await admin.start()
    try:
        for request in (b"", b"GET /status HTTP/1.0\r\n"):
            reader, writer = await asyncio.open_connection(HOST, admin.port)
            writer.write(request)
            try:
                reply = await asyncio.wait_for(reader.read(), 3)
            except TimeoutError:
                pytest.fail(f"admin endpoint still holds a client that sent {request!r}")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            assert reply.startswith(b"HTTP/1.0 408 ")
        status = json.loads(await fetch_status(HOST, admin.port))  # still serving
        assert status == {"role": "gateway", "flows": 0,
                          "admin": {"responses": {"408": 2}}}
    finally:
        await admin.aclose()


async def test_the_status_counts_the_reads_a_hop_still_holds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A relay hop passes a lone FIN on and handles the rest of that read once its loop
    has slept (`tether.heldreads`); a status asked for in between counted the stream as
    still open. The admin endpoint applies the held reads before it answers."""
    monkeypatch.setattr(heldreads, "DELAY", 60.0)  # (the timer must not come first)
    handled: list[bytes] = []

    class Hop:
        def apply_held(self, data: bytes) -> None:
            handled.append(data)

    admin = AdminServer((HOST, 0), "gateway", "gw1", lambda: {"handled": len(handled)})
    await admin.start()
    try:
        heldreads.current().hold(Hop(), b"fin", asyncio.get_running_loop())
        status = json.loads(await fetch_status(HOST, admin.port))
    finally:
        heldreads.current().apply()
        await admin.aclose()
    assert status["handled"] == 1 and handled == [b"fin"]


async def test_admin_endpoint_counts_and_logs_what_it_refuses(
        caplog: pytest.LogCaptureFixture) -> None:
    """Bad requests got their answer and nothing else: no line, no counter. Each
    answer is counted by status (in /status and /metrics) and each refusal logged with
    the client and why."""
    caplog.set_level(logging.INFO, "tether.admin")

    def stats(flows: int | None = None) -> dict[str, Any]:
        return {"flows": 0}

    admin = AdminServer((HOST, 0), "gateway", "gw1", stats)
    await admin.start()
    try:
        async def ask(request: bytes) -> bytes:
            reader, writer = await asyncio.open_connection(HOST, admin.port)
            try:
                writer.write(request)
                return await asyncio.wait_for(reader.read(), 3)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        assert (await ask(b"GET /nothing HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404 ")
        assert (await ask(b"POST /status HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 405 ")
        assert (await ask(b"GET /status?flows=many HTTP/1.0\r\n\r\n")).startswith(
            b"HTTP/1.0 400 ")
        assert (await ask(b"x" * 9000)).startswith(b"HTTP/1.0 431 ")
        status = json.loads(await fetch_status(HOST, admin.port))
        assert status["admin"] == {"responses": {"400": 1, "404": 1, "405": 1, "431": 1}}
        text = (await fetch_status(HOST, admin.port, "/metrics")).decode()
    finally:
        await admin.aclose()
    answered = {s.labels["code"]: s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "tether_admin_responses_total"}
    assert answered == {"200": 1.0, "400": 1.0, "404": 1.0, "405": 1.0, "431": 1.0}, text
    lines = [r.getMessage() for r in caplog.records if "admin endpoint answered" in
             r.getMessage()]
    assert len(lines) == 4, lines
    assert "404 Not Found to 127.0.0.1:" in lines[0] and "'GET /nothing HTTP/1.0'" in lines[0]
    assert "405 Method Not Allowed" in lines[1] and "'POST /status HTTP/1.0'" in lines[1]
    assert "400 Bad Request" in lines[2] and "expected a count or 'all'" in lines[2]
    assert "431" in lines[3] and "no request in the first" in lines[3]


async def test_metrics_of_a_cluster_are_a_valid_scrape_naming_each_peer_once() -> None:
    """Peer names were parts of metric names: "gw-2" and "gw_2" both became
    tether_peers_gw_2_up (the same TYPE twice, two identical series: Prometheus
    rejects the scrape). Each peer is a label now, and agrees with /status."""
    async with tether.Gateway("127.0.0.1:0", name="gw1", retry_interval=0.2,
                              peers={"gw-2": f"{HOST}:{free_port()}",
                                     "gw_2": f"{HOST}:{free_port()}"}) as gw:
        admin = AdminServer((HOST, 0), "gateway", gw.name, gw.stats)
        await admin.start()
        try:
            text = (await fetch_status(HOST, admin.port, "/metrics")).decode()
            status = json.loads(await fetch_status(HOST, admin.port))
        finally:
            await admin.aclose()
    types = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")]
    assert len(types) == len(set(types)), text
    series = [(s.name, tuple(sorted(s.labels.items())))
              for family in text_string_to_metric_families(text) for s in family.samples]
    assert len(series) == len(set(series)), text
    up = {s.labels["peer"]: s.value for family in text_string_to_metric_families(text)
          for s in family.samples if s.name == "tether_peer_up"}
    assert up == {peer: float(v["up"]) for peer, v in status["peers"].items()}
    assert set(up) == {"gw-2", "gw_2"}


# the cluster --------------------------------------------------------------------------

async def test_gateway_stops_while_re_dialling_a_peer_that_refuses() -> None:
    """`aclose()` cancels the task that keeps the peer's link; cancelled in the iteration
    its connection attempt failed, Python 3.11's `wait_for` raised the connect error
    instead, the task went on re-dialling, and `aclose()` (SIGTERM) never returned."""
    for turns in range(8):
        gw = tether.Gateway("127.0.0.1:0", name="gw1",
                            peers={"gw2": f"{HOST}:{free_port()}"})
        await gw.start()
        for _ in range(turns):
            await asyncio.sleep(0)
        try:
            await asyncio.wait_for(gw.aclose(), 3)
        except TimeoutError:
            while gw._tasks:  # the re-dialling task lost its cancellation: end it here
                for task in list(gw._tasks):
                    task.cancel()
                await asyncio.sleep(0.01)
            await gw.aclose()
            pytest.fail(f"aclose() {turns} loop turns after start() did not return")


async def test_a_node_posing_as_a_peer_gateway_does_not_get_past_the_policy() -> None:
    """The policy is enforced at the first gateway only; any node that sent a SERVICES
    message counted as a peer gateway there, and its flows skipped the policy. Here
    "agent" (its own token; the policy lets it reach "other" only) runs a gateway that
    peers with gw1: its flow to "echo" must be denied like the agent's own."""
    async with tether.Gateway("127.0.0.1:0", name="gw1",
                              tokens={"agent": b"a-secret", "server": b"s-secret"},
                              policy={"agent": {"other"}}) as gw1:
        async with tether.Node("server", gateway=f"{HOST}:{gw1.port}",
                               token="s-secret") as server:
            server.register("echo")
            serving = asyncio.ensure_future(server.accept())  # the bypass got a flow
            async with tether.Gateway("127.0.0.1:0", name="agent", token="a-secret",
                                      peers={"gw1": f"{HOST}:{gw1.port}"},
                                      retry_interval=0.2) as rogue:
                for _ in range(300):
                    if "echo" in rogue.services():
                        break
                    await asyncio.sleep(0.01)
                assert "echo" in rogue.services()
                async with tether.Node("x", gateway=f"{HOST}:{rogue.port}",
                                       token="a-secret") as x:
                    with pytest.raises(tether.TetherError, match="denied"):
                        flow = await x.alloc("echo", liveness=2.0)
                        await flow.dealloc()
                assert gw1.counters["denied"] == 1 and gw1.counters["flows_spliced"] == 0
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
