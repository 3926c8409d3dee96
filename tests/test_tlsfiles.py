"""`tether.ServerTLS`: a server's TLS as files, rebuilt into a context where needed."""

from __future__ import annotations

import argparse
import json
import ssl
from typing import Any

import pytest

from tether import ServerTLS
from tether.tlsfiles import add_server_tls_arguments


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_server_tls_arguments(parser, "connections")
    return parser.parse_args(argv)


def test_the_options_make_the_files_or_nothing() -> None:
    assert ServerTLS.from_args(_args()) is None
    files = ServerTLS.from_args(_args("--tls-cert", "c.pem", "--tls-key", "k.pem",
                                      "--tls-client-ca", "ca.pem"))
    assert files == ServerTLS("c.pem", "k.pem", "ca.pem")
    for orphan in (("--tls-key", "k.pem"), ("--tls-client-ca", "ca.pem")):
        with pytest.raises(ValueError, match="need --tls-cert"):
            ServerTLS.from_args(_args(*orphan))


def test_files_cross_a_json_configuration_unchanged() -> None:
    files = ServerTLS("c.pem", None, "ca.pem")
    assert ServerTLS.from_json(json.loads(json.dumps(files.to_json()))) == files


def test_the_context_serves_and_requires_client_certificates_on_request(tls: Any) -> None:
    plain = ServerTLS(str(tls.server_cert), str(tls.server_key)).context()
    assert plain.verify_mode == ssl.CERT_NONE
    mutual = ServerTLS(str(tls.server_cert), str(tls.server_key), str(tls.ca)).context()
    assert mutual.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ssl.SSLError):  # a key that is not the certificate's
        ServerTLS(str(tls.server_cert), str(tls.client_key)).context()
