"""Test-suite plumbing: both event loops, leak checks, TLS material made at test time.

* Every async test runs twice, under asyncio's default loop and under uvloop (ids
  ``asyncio`` / ``uvloop``), through pytest-asyncio's ``pytest_asyncio_loop_factories``
  hook (the replacement for the deprecated ``event_loop_policy`` fixture override).
* Every async test fails if the loop's exception handler was called (an exception in
  a callback, a task that died unobserved, ...) or if a task other than the test's own
  is still pending at teardown, in the spirit of uvloop's ``tests/_testbase.py``.
  Unclosed transports and sockets raise ``ResourceWarning``, which
  ``filterwarnings = error`` turns into a failure.
* ``tls`` is a session fixture with a throwaway CA, server, client and gateway
  certificates (and a second, unrelated CA with a client certificate of its own),
  generated into a temporary directory: never committed.
* With ``TETHER_EXPECT_COMPILED=1`` (``make test-compiled``), the session refuses to
  start unless tether's data path was imported from the mypyc build: a test run that
  silently exercised the interpreted modules instead would prove nothing.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import uvloop

from test_hub_support import LOOPS, Run, runner_for

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

LOOP_FACTORIES: dict[str, LoopFactory] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_configure(config: pytest.Config) -> None:
    """`TETHER_EXPECT_COMPILED=1`: check that the compiled modules are the ones imported."""
    if os.environ.get("TETHER_EXPECT_COMPILED") == "1":
        import tether.link
        import tether.splice

        interpreted = [m.__file__ for m in (tether.link, tether.splice)
                       if not (m.__file__ or "").endswith(".so")]
        if interpreted:
            raise pytest.UsageError(f"TETHER_EXPECT_COMPILED=1, but {interpreted} are "
                                    "interpreted: put the build first on PYTHONPATH")


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> Mapping[str, LoopFactory]:
    """Parametrize every async test over both loops (ids "asyncio" and "uvloop")."""
    return LOOP_FACTORIES


# leak checks -----------------------------------------------------------------------------

# How long teardown waits for tasks that are already finishing (a cancelled task needs a
# few loop iterations to unwind) before calling them leaked.
_TASK_GRACE = 0.2


@pytest.fixture(params=sorted(LOOPS))
def arun(request: pytest.FixtureRequest) -> Run:
    """Runs a coroutine to completion under asyncio's loop, then under uvloop (the
    hub tests' runner, `test_hub_support.runner_for`)."""
    return runner_for(request.param)


@pytest.fixture(autouse=True)
def _async_leak_checks(request: pytest.FixtureRequest) -> None:
    """Turn on `loop_leak_check` for every async test (sync tests have no loop).

    Only for tests with a loop of their own (loop_scope "function", the default): a
    test sharing a module- or class-scoped loop may legitimately leave tasks for the
    next one, and a function-scoped fixture would watch the wrong loop."""
    if not pytest_asyncio.is_async_test(request.node):
        return
    marker = request.node.get_closest_marker("asyncio")
    scope = (marker.kwargs.get("loop_scope") if marker else None) \
        or request.config.getini("asyncio_default_test_loop_scope")
    if scope == "function":
        request.getfixturevalue("loop_leak_check")


@pytest.fixture
async def loop_leak_check() -> AsyncIterator[list[dict[str, Any]]]:
    """Fail the test if the loop's exception handler was called, or if tasks are left.

    Yields the list of exception-handler contexts recorded so far (a test that expects
    one may inspect and clear it).
    """
    loop = asyncio.get_running_loop()
    contexts: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()

    def record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        contexts.append(context)
        loop.default_exception_handler(context)  # logs it, with the traceback

    loop.set_exception_handler(record)
    try:
        yield contexts
        # The test's own task is done by now; this teardown runs in a task of its own.
        me = asyncio.current_task()
        deadline = loop.time() + _TASK_GRACE
        while True:
            leaked = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            if not leaked or loop.time() >= deadline:
                break
            await asyncio.sleep(0.005)
        for task in leaked:
            task.cancel()
        if leaked:
            await asyncio.gather(*leaked, return_exceptions=True)
    finally:
        loop.set_exception_handler(previous)
    problems = []
    if leaked:
        problems.append("tasks still pending at teardown:\n  "
                        + "\n  ".join(repr(t) for t in leaked))
    if contexts:
        problems.append("the loop's exception handler was called:\n  "
                        + "\n  ".join(_describe(c) for c in contexts))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _describe(context: dict[str, Any]) -> str:
    exc = context.get("exception")
    text = str(context.get("message", ""))
    return f"{text}: {exc!r}" if exc is not None else text


# TLS material ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TLSMaterial:
    """Paths of a throwaway PKI: `ca` signs the server and client certificates, and the
    gateway certificate (for localhost/127.0.0.1, good for both TLS server and client
    authentication: a gateway of a cluster serves links and dials its peers with one
    certificate); `other_ca` is an unrelated CA that trusts nobody here and signs
    `other_client_cert`, a client certificate no one here accepts."""

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    generator: str
    gateway_cert: Path
    gateway_key: Path
    other_client_cert: Path
    other_client_key: Path

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """A server-side context with the server certificate (mutual TLS on request)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=self.ca)
        return ctx

    def client_context(self, *, trust: str = "ca", cert: bool = False) -> ssl.SSLContext:
        """A client-side context trusting `ca` (or `other_ca` with trust="other"),
        presenting the client certificate when `cert`."""
        cafile = self.ca if trust == "ca" else self.other_ca
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        if cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    """A CA, a server certificate for localhost/127.0.0.1, a client certificate, a
    gateway certificate and an unrelated CA with a client certificate, made with
    `cryptography` if installed, else with the openssl CLI."""
    directory = tmp_path_factory.mktemp("tls")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("TLS tests need the 'cryptography' package or the openssl CLI "
                        "to make test certificates; neither is available")
        return _make_with_openssl(openssl, directory)
    return _make_with_cryptography(directory)


def _paths(directory: Path, generator: str) -> TLSMaterial:
    return TLSMaterial(ca=directory / "ca.pem", other_ca=directory / "other-ca.pem",
                       server_cert=directory / "server.pem",
                       server_key=directory / "server.key",
                       client_cert=directory / "client.pem",
                       client_key=directory / "client.key", generator=generator,
                       gateway_cert=directory / "gateway.pem",
                       gateway_key=directory / "gateway.key",
                       other_client_cert=directory / "other-client.pem",
                       other_client_key=directory / "other-client.key")


def _make_with_openssl(openssl: str, directory: Path) -> TLSMaterial:
    m = _paths(directory, "openssl")

    def run(*args: str | Path) -> None:
        subprocess.run([openssl, *map(str, args)], cwd=directory, check=True,
                       capture_output=True, timeout=60)

    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for name, cert in (("ca", m.ca), ("other-ca", m.other_ca)):
        run("req", "-x509", *key, "-keyout", directory / f"{name}.key", "-out", cert,
            "-days", "2", "-subj", f"/CN=tether test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    san = "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    leaves = (("server", m.server_cert, m.server_key, "ca", "serverAuth", san),
              ("client", m.client_cert, m.client_key, "ca", "clientAuth", ""),
              ("gateway", m.gateway_cert, m.gateway_key, "ca", "serverAuth,clientAuth", san),
              ("other-client", m.other_client_cert, m.other_client_key, "other-ca",
               "clientAuth", ""))
    for serial, (name, cert, keyfile, issuer, usage, alt) in enumerate(leaves, start=2):
        ext = directory / f"{name}.ext"
        ext.write_text("basicConstraints=critical,CA:FALSE\n"
                       "keyUsage=critical,digitalSignature\n"
                       f"extendedKeyUsage={usage}\n"
                       "subjectKeyIdentifier=hash\n"
                       "authorityKeyIdentifier=keyid\n" + alt)
        csr = directory / f"{name}.csr"
        run("req", "-new", *key, "-keyout", keyfile, "-out", csr,
            "-subj", f"/CN=tether test {name}")
        run("x509", "-req", "-in", csr, "-CA", directory / f"{issuer}.pem",
            "-CAkey", directory / f"{issuer}.key",
            "-set_serial", str(serial), "-days", "2", "-extfile", ext, "-out", cert)
    return m


def _make_with_cryptography(directory: Path) -> TLSMaterial:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    m = _paths(directory, "cryptography")
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    def make_ca(cn: str, path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(name(cn)).issuer_name(name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key, cert

    cas = {"ca": make_ca("tether test ca", m.ca),
           "other-ca": make_ca("tether test other-ca", m.other_ca)}
    server, client = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    leaves = (("server", m.server_cert, m.server_key, "ca", [server], True),
              ("client", m.client_cert, m.client_key, "ca", [client], False),
              ("gateway", m.gateway_cert, m.gateway_key, "ca", [server, client], True),
              ("other-client", m.other_client_cert, m.other_client_key, "other-ca", [client],
               False))
    for cn, cert_path, key_path, issuer, usages, with_san in leaves:
        ca_key, ca_cert = cas[issuer]
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(name(f"tether test {cn}")).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if with_san:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, key_path)
    return m
