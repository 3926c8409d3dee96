"""The `tether` command: the gateway, agent and connector daemons, and `status`.

Each subcommand is a daemon in the usual style: it logs one line per event to stderr,
stops cleanly on SIGINT/SIGTERM (every flow gets its end), and exits non-zero with a
one-line error when it cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

from . import daemonlog
from .admin import AdminServer, fetch_status
from .aio import format_address, parse_address, run
from .errors import TetherError
from .fdlimit import take_hard_limit
from .gateway import Gateway
from .heap import keep_heap_pages
from .ids import check_node_name
from .relay import Agent, Connector, parse_forward, parse_service
from .tlsfiles import ServerTLS, add_server_tls_arguments
from .workers import add_hub_subcommand

__all__ = ["main"]

log = logging.getLogger("tether.cli")


def _float(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:  # (argparse would name this function, not what was expected)
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None


def _seconds(text: str, *, zero: bool = True) -> float:
    """An option's value in seconds, finite, 0 or more (more than 0 unless `zero`)."""
    expected = "seconds, 0 or more" if zero else "seconds, more than 0"
    value = _float(text, expected)
    if not (value >= 0 if zero else value > 0) or value == math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    return value


def _positive_seconds(text: str) -> float:
    """An option's value in seconds, more than 0 (and finite)."""
    return _seconds(text, zero=False)


@contextlib.contextmanager
def _tls_files(**files: str | None) -> Iterator[None]:
    """OpenSSL's errors name no file ("[Errno 2] No such file or directory"): these do."""
    try:
        yield
    except OSError as exc:  # (ssl.SSLError too)
        given = ", ".join(f"--{opt.replace('_', '-')} {path}"
                          for opt, path in files.items() if path)
        raise ValueError(f"cannot load {given}: {exc.strerror or exc}") from exc


def _node_name(text: str) -> str:
    """A node's name (`tether.ids.check_node_name`)."""
    try:
        return check_node_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_count(text: str) -> int:
    """A count, 1 or more."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count, 1 or more")
    return int(text)


def _count_or_all(text: str) -> str:
    """A count (0 or more) or `all`."""
    if text != "all" and not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count or 'all'")
    return text


def _tls_server_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    tls = ServerTLS.from_args(args)
    if tls is None:
        return None
    with _tls_files(tls_cert=tls.cert, tls_key=tls.key, tls_client_ca=tls.client_ca):
        return tls.context()


async def _until_signalled(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _shut_down(what: str, close: Callable[[float], Coroutine[Any, Any, None]],
                     drain: float) -> None:
    """`close(drain)`; a second SIGINT or SIGTERM meanwhile (an operator's second
    Ctrl-C) ends the drain at once: what is still open is reset."""
    loop = asyncio.get_running_loop()
    closing = asyncio.create_task(close(drain))

    def hurry() -> None:
        if not closing.done() and not closing.cancelling():
            log.warning("%s: signalled again: not draining any longer", what)
            closing.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, hurry)
    try:
        await closing
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # (we are cancelled, not the drain)
            raise
        await close(0.0)


def _tls_client_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.tls_ca:
        return None
    with _tls_files(tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key):
        ctx = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert:
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
    return ctx


def _load_json(path: str | None, what: str) -> Any:
    if path is None:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc}") from exc


def _names_to(value: Any, what: str, item: Callable[[Any], bool], expected: str) -> None:
    """Refuse a --tokens or --policy file of the wrong shape (a traceback before, or a
    policy {"agent": "web"} read as the services "w", "e" and "b")."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and item(v)
                                              for k, v in value.items()):
        raise ValueError(f"the {what} file must be a JSON object {expected}")


def _parse_peer(text: str) -> tuple[str, str]:
    name, sep, address = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--peer {text!r}: expected NAME=HOST:PORT")
    parse_address(address)
    return name, address


def _admin_address(args: argparse.Namespace) -> tuple[str, int] | None:
    """Where --admin listens (None: nowhere); checked before anything starts."""
    if args.admin in ("", "none", "off"):
        return None
    try:
        return parse_address(args.admin)
    except ValueError as exc:
        raise ValueError(f"--admin {args.admin}: {exc}") from None


async def _with_admin(args: argparse.Namespace, role: str, name: str,
                      stats: Callable[[], dict[str, Any]]) -> AdminServer | None:
    address = _admin_address(args)
    if address is None:
        return None
    admin = AdminServer(address, role, name, stats)
    try:
        await admin.start()
    except OSError as exc:
        raise ValueError(f"--admin {args.admin}: {exc.strerror or exc}") from exc
    print(f"{role} {name} admin endpoint on port {admin.port}", file=sys.stderr, flush=True)
    return admin


def _summary(stats: dict[str, Any]) -> str:
    """A gateway's stats in one short line: what is open, then its counters (no list of
    flows: at 20,000 of them, that was a line of megabytes)."""
    counters = ", ".join(f"{k}={v}" for k, v in stats.items()
                         if type(v) is int and k not in ("flows", "links"))
    return f"{stats['flows']} flows open, {stats['links']} links; {counters}"


async def _gateway(args: argparse.Namespace) -> int:
    _admin_address(args)
    tokens = _load_json(args.tokens, "tokens")
    if tokens is not None:
        _names_to(tokens, "tokens", lambda v: isinstance(v, str) and v != "",
                  '{"node name": "token", ...} (tokens not empty)')
    policy = _load_json(args.policy, "policy")
    if policy is not None:
        _names_to(policy, "policy",
                  lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
                  '{"node name" or "*": ["service", ...], ...}')
    peers: dict[str, str] = {}
    for text in args.peer:
        peer, address = _parse_peer(text)
        if peer in peers or peer == args.name:
            raise ValueError(f"--peer {text!r}: {peer} is "
                             + ("this gateway's own name" if peer == args.name
                                else "named twice"))
        peers[peer] = address
    peer_tls = None
    if args.peer_tls_ca:
        with _tls_files(peer_tls_ca=args.peer_tls_ca, tls_cert=args.tls_cert,
                        tls_key=args.tls_key):
            peer_tls = ssl.create_default_context(cafile=args.peer_tls_ca)
            if args.tls_cert:
                peer_tls.load_cert_chain(args.tls_cert, args.tls_key)
    gw = Gateway(args.listen, name=args.name, token=args.token, peers=peers,
                 retry_interval=args.retry_interval, peer_tls=peer_tls,
                 tls=_tls_server_context(args), heartbeat=args.heartbeat,
                 link_timeout=args.link_timeout, window=args.window,
                 max_links="default" if args.max_links is None else args.max_links,
                 # an empty file is a gateway nobody may join, not one without tokens
                 tokens={k: v.encode() for k, v in tokens.items()}
                 if tokens is not None else None,
                 policy={k: set(v) for k, v in policy.items()} if policy is not None else None)
    await gw.start()
    print(f"gateway {args.name} listening on port {gw.port}", file=sys.stderr, flush=True)
    admin = await _with_admin(args, "gateway", args.name, gw.stats)
    try:
        await _until_signalled(asyncio.Event())
    finally:
        log.info("gateway %s shutting down: %s", args.name, _summary(gw.stats()))
        try:  # (the admin endpoint last: it shows what the drain waits for)
            await _shut_down(f"gateway {args.name}", gw.aclose, args.drain)
        finally:
            if admin is not None:
                await admin.aclose()
    return 0


async def _agent(args: argparse.Namespace) -> int:
    _admin_address(args)
    forwards = [parse_forward(f) for f in args.forward]
    seen: set[tuple[str, int]] = set()
    for text, (host, port, _) in zip(args.forward, forwards, strict=True):
        if port and (host, port) in seen:
            raise ValueError(f"--forward {text!r}: {host}:{port} is given twice")
        seen.add((host, port))
    agent = Agent(args.gateway, forwards, name=args.name, token=args.token or b"",
                  tls=_tls_client_context(args), liveness=args.liveness,
                  fin_timeout=args.fin_timeout, cascade=args.cascade, window=args.window,
                  keepalive=args.keepalive, retry_interval=args.retry_interval,
                  start_wait=args.start_wait,
                  max_connections="default" if args.max_connections is None
                  else args.max_connections)
    await agent.start()
    for (host, _, service), port in zip(forwards, agent.ports(), strict=True):
        print(f"agent {args.name} forwarding {format_address((host, port))} to {service}",
              file=sys.stderr, flush=True)
    admin = await _with_admin(args, "agent", args.name, agent.stats)
    try:
        await _until_signalled(asyncio.Event())
    finally:
        try:  # (the admin endpoint last: it shows what the drain waits for)
            await _shut_down(f"agent {args.name}", agent.aclose, args.drain)
        finally:
            if admin is not None:
                await admin.aclose()
    return 0


async def _connector(args: argparse.Namespace) -> int:
    _admin_address(args)
    services = [parse_service(s) for s in args.service]
    connector = Connector(args.gateway, services, name=args.name, token=args.token or b"",
                          tls=_tls_client_context(args), liveness=args.liveness,
                          fin_timeout=args.fin_timeout, window=args.window,
                          keepalive=args.keepalive, connect_timeout=args.connect_timeout,
                          retry_interval=args.retry_interval, start_wait=args.start_wait,
                          max_connections="default" if args.max_connections is None
                          else args.max_connections)
    await connector.start()
    print(f"connector {args.name} serving {', '.join(s for s, _, _ in services)}",
          file=sys.stderr, flush=True)
    admin = await _with_admin(args, "connector", args.name, connector.stats)
    try:
        await _until_signalled(asyncio.Event())
    finally:
        try:  # (the admin endpoint last: it shows what the drain waits for)
            await _shut_down(f"connector {args.name}", connector.aclose, args.drain)
        finally:
            if admin is not None:
                await admin.aclose()
    return 0


async def _status(args: argparse.Namespace) -> int:
    host, port = parse_address(args.address)
    path = "/metrics" if args.metrics else \
        "/status" if args.flows is None else f"/status?flows={args.flows}"
    body = await fetch_status(host, port, path)
    sys.stdout.write(body.decode())
    return 0


def _edge_options(p: argparse.ArgumentParser, default_name: str) -> None:
    p.add_argument("--gateway", required=True, metavar="HOST:PORT",
                   help="the gateway to connect to")
    p.add_argument("--name", default=default_name, type=_node_name,
                   help=f"this node's name (default {default_name})")
    p.add_argument("--token", default=None, help="this node's token for the gateway")
    p.add_argument("--tls-ca", metavar="PEM",
                   help="connect over TLS, trusting gateway certificates from this CA")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", metavar="PEM", help="private key for --tls-cert")
    p.add_argument("--liveness", type=float, default=30.0, metavar="SECONDS",
                   help="liveness timeout of each flow (default 30)")
    p.add_argument("--fin-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="reset a connection whose peer was sent the flow's FIN (or "
                        "its end, with bytes it does not read) and that is not moving for "
                        "longer than this: a peer that never closes its side (default 60; "
                        "0: never)")
    p.add_argument("--keepalive", type=float, default=60.0, metavar="SECONDS",
                   help="reset an idle connection whose application or server stopped "
                        "answering for about this long (TCP keepalive; default 60, 0 to "
                        "disable)")
    p.add_argument("--window", type=int, default=256 * 1024, metavar="BYTES",
                   help="receive window per flow: more is faster in bulk, costs memory "
                        "per flow (default 262144)")
    p.add_argument("--drain", type=_seconds, default=2.0, metavar="SECONDS",
                   help="on SIGTERM, take no new connection and let the open ones finish "
                        "this long before resetting them (default 2)")
    p.add_argument("--retry-interval", type=float, default=2.0, metavar="SECONDS",
                   help="once the link to the gateway is lost, dial it again, waiting at "
                        "most this long between attempts (default 2)")
    p.add_argument("--max-connections", type=_positive_count, default=None, metavar="N",
                   help="connections open at once (an agent's from applications, a "
                        "connector's to servers); one more is reset, logged and counted "
                        "(over_limit) (default: the open-file limit less 128, so that the "
                        "limit met is the daemon's, not the kernel's)")
    p.add_argument("--start-wait", type=_seconds, default=0.0, metavar="SECONDS",
                   help="at start, dial a gateway that is not there yet (refused, "
                        "unreachable) again for up to this long before exiting, so that "
                        "daemons started together need no order (default 0: exit at once)")
    p.add_argument("--admin", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="admin endpoint for `tether status` and /metrics "
                        "(default 127.0.0.1:0, 'none' to disable)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Long-lived network flows that never hang. Run one of the daemons below; "
                    "`tether SUBCOMMAND --help` tells more.")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log verbosity (default INFO); logs go to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    add_hub_subcommand(sub)

    gw = sub.add_parser(
        "gateway", help="accept links from nodes and relay flows between them",
        description="Accept links from tether nodes, keep the registry of services, and "
                    "splice each allocated flow to a node serving it.")
    gw.add_argument("--listen", default="127.0.0.1:7443", metavar="HOST:PORT",
                    help="address to listen on (default 127.0.0.1:7443; port 0 picks one)")
    gw.add_argument("--name", default="gw", type=_node_name,
                    help="this gateway's node name (default gw)")
    gw.add_argument("--token", default=None,
                    help="shared secret every node must present in its HELLO")
    add_server_tls_arguments(gw, "links")
    gw.add_argument("--heartbeat", type=_positive_seconds, default=5.0, metavar="SECONDS",
                    help="PING a link after this long with nothing sent (default 5)")
    gw.add_argument("--link-timeout", type=_positive_seconds, default=15.0, metavar="SECONDS",
                    help="a link silent this long is lost (default 15)")
    gw.add_argument("--drain", type=_seconds, default=2.0, metavar="SECONDS",
                    help="on SIGTERM, let flows finish this long before closing (default 2)")
    gw.add_argument("--peer", action="append", default=[], metavar="NAME=HOST:PORT",
                    help="a peer gateway of the cluster (repeatable): services are learned "
                         "from it and flows forwarded to it")
    gw.add_argument("--retry-interval", type=float, default=2.0, metavar="SECONDS",
                    help="longest wait between attempts to reach a peer gateway (default 2)")
    gw.add_argument("--peer-tls-ca", metavar="PEM",
                    help="dial peer gateways over TLS, trusting this CA (presenting "
                         "--tls-cert as client certificate: where peers require one, "
                         "that certificate must allow TLS client authentication too, "
                         "extendedKeyUsage serverAuth,clientAuth)")
    gw.add_argument("--max-links", type=_positive_count, default=None, metavar="N",
                    help="links open at once, those in their handshake included; one more "
                         "is reset, logged and counted (links_over_limit) (default: the "
                         "open-file limit less 128)")
    gw.add_argument("--window", type=int, default=256 * 1024, metavar="BYTES",
                    help="receive window per relayed flow and side (default 262144)")
    gw.add_argument("--tokens", metavar="JSON",
                    help='file {"node name": "token", ...}: a token per node')
    gw.add_argument("--policy", metavar="JSON",
                    help='file {"node name" or "*": ["service", ...]}: who may reach what; '
                         "anything not listed is denied")
    gw.add_argument("--admin", default="127.0.0.1:0", metavar="HOST:PORT",
                    help="admin endpoint for `tether status` and /metrics "
                         "(default 127.0.0.1:0, 'none' to disable)")
    gw.set_defaults(func=_gateway)

    ag = sub.add_parser(
        "agent", help="carry local TCP connections to services through the gateway",
        description="Listen on local ports; carry each TCP connection as a flow to a service "
                    "through the gateway. Ends travel end to end (half-close by default).")
    _edge_options(ag, "agent")
    ag.add_argument("--forward", action="append", required=True,
                    metavar="LISTEN_HOST:PORT=SERVICE",
                    help="listen here and forward to SERVICE (repeatable)")
    ag.add_argument("--cascade", choices=["half", "full"], default="half",
                    help="half: TCP half-close (default); full: one side's EOF closes both")
    ag.set_defaults(func=_agent)

    co = sub.add_parser(
        "connector", help="serve local TCP services to the gateway",
        description="Register services with the gateway; each flow allocated to one becomes "
                    "a TCP connection to its address.")
    _edge_options(co, "connector")
    co.add_argument("--service", action="append", required=True, metavar="NAME=HOST:PORT",
                    help="serve NAME by connecting to HOST:PORT (repeatable)")
    co.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS",
                    help="reset a flow whose server does not accept its connection within "
                         "this long (default 5)")
    co.set_defaults(func=_connector)

    st = sub.add_parser("status", help="print a daemon's links, flows and counters",
                        description="Read a daemon's admin endpoint (see --admin).")
    st.add_argument("address", metavar="HOST:PORT", help="the daemon's admin endpoint")
    st.add_argument("--metrics", action="store_true",
                    help="print the Prometheus metrics instead of the JSON status")
    st.add_argument("--flows", type=_count_or_all, default=None, metavar="N|all",
                    help="list this many open flows, the oldest first (default 100)")
    st.set_defaults(func=_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tether` command."""
    args = _parser().parse_args(argv)
    keep_heap_pages()
    take_hard_limit()
    daemonlog.configure(args.log_level)
    # What is here now (modules, classes, functions: ~27,000 objects) lives as long as
    # the process: out of the garbage collector's sight, its collections of older
    # generations no longer walk all of it (one took 1.3 ms in a gateway, on a close).
    gc.freeze()
    try:
        code: int = run(args.func(args))
    except (TetherError, OSError, ValueError) as exc:
        print(f"tether {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
