"""ServerTLS: a server's TLS given as files, so that another process can rebuild it.

An `ssl.SSLContext` keeps its certificates and keys in OpenSSL's memory: it cannot be
pickled nor written into a worker's configuration, so `Hub(workers=N)` could not take
one. The files it is made from can cross a process boundary. A `ServerTLS` names them;
`context()` makes the context, in whichever process needs it. The `tether` command's
servers (the gateway, the hub and its workers) take the same three options and build
their contexts here.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ServerTLS", "add_server_tls_arguments"]


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """A server's certificate chain (`cert`, PEM) and private key (`key`, PEM; None
    when `cert` holds it too); with `client_ca`, clients must present a certificate
    signed by that CA (mutual TLS)."""

    cert: str
    key: str | None = None
    client_ca: str | None = None

    def context(self) -> ssl.SSLContext:
        """A new server-side context (raises `OSError`/`ssl.SSLError` on a bad file)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            ctx.load_verify_locations(self.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def to_json(self) -> dict[str, str | None]:
        """The fields, for a configuration file (`from_json` reads them back)."""
        return asdict(self)

    @classmethod
    def from_json(cls, fields: dict[str, Any]) -> ServerTLS:
        """The `ServerTLS` that `to_json` described."""
        return cls(cert=str(fields["cert"]), key=fields.get("key"),
                   client_ca=fields.get("client_ca"))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerTLS | None:
        """From the options `add_server_tls_arguments` added (None without --tls-cert)."""
        if not args.tls_cert:
            if args.tls_key or args.tls_client_ca:
                raise ValueError("--tls-key and --tls-client-ca need --tls-cert")
            return None
        return cls(args.tls_cert, args.tls_key, args.tls_client_ca)


def add_server_tls_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """Add --tls-cert, --tls-key and --tls-client-ca to a server's command; `what` says
    what is served ("links", "connections")."""
    parser.add_argument("--tls-cert", metavar="PEM", help=f"serve {what} over TLS with this "
                        "certificate chain")
    parser.add_argument("--tls-key", metavar="PEM", help="private key for --tls-cert")
    parser.add_argument("--tls-client-ca", metavar="PEM",
                        help="require client certificates signed by this CA (mutual TLS)")
