"""The `tether` command: run a gateway (and, as they arrive, the other daemons).

Each subcommand is a daemon in the usual style: it logs one line per event to stderr,
stops cleanly on SIGINT/SIGTERM (every flow gets its end), and exits non-zero with a
one-line error when it cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from collections.abc import Sequence

from .aio import run
from .errors import TetherError
from .gateway import Gateway

__all__ = ["main"]

log = logging.getLogger("tether.cli")


def _tls_server_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_client_ca:
        ctx.load_verify_locations(args.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def _until_signalled(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _gateway(args: argparse.Namespace) -> int:
    gw = Gateway(args.listen, name=args.name, token=args.token,
                 tls=_tls_server_context(args), heartbeat=args.heartbeat,
                 link_timeout=args.link_timeout)
    await gw.start()
    print(f"gateway {args.name} listening on port {gw.port}", file=sys.stderr, flush=True)
    try:
        await _until_signalled(asyncio.Event())
    finally:
        log.info("gateway %s shutting down: %s", args.name, gw.stats())
        await gw.aclose(drain=args.drain)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Long-lived network flows that never hang. Run one of the daemons below; "
                    "`tether SUBCOMMAND --help` tells more.")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log verbosity (default INFO); logs go to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    gw = sub.add_parser(
        "gateway", help="accept links from nodes and relay flows between them",
        description="Accept links from tether nodes, keep the registry of services, and "
                    "splice each allocated flow to a node serving it.")
    gw.add_argument("--listen", default="127.0.0.1:7443", metavar="HOST:PORT",
                    help="address to listen on (default 127.0.0.1:7443; port 0 picks one)")
    gw.add_argument("--name", default="gw", help="this gateway's node name (default gw)")
    gw.add_argument("--token", default=None,
                    help="shared secret every node must present in its HELLO")
    gw.add_argument("--tls-cert", metavar="PEM", help="serve links over TLS with this cert")
    gw.add_argument("--tls-key", metavar="PEM", help="private key for --tls-cert")
    gw.add_argument("--tls-client-ca", metavar="PEM",
                    help="require client certificates signed by this CA (mutual TLS)")
    gw.add_argument("--heartbeat", type=float, default=5.0, metavar="SECONDS",
                    help="PING a link after this long with nothing sent (default 5)")
    gw.add_argument("--link-timeout", type=float, default=15.0, metavar="SECONDS",
                    help="a link silent this long is lost (default 15)")
    gw.add_argument("--drain", type=float, default=2.0, metavar="SECONDS",
                    help="on SIGTERM, let flows finish this long before closing (default 2)")
    gw.set_defaults(func=_gateway)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tether` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
