"""The server side of TLS over memory BIOs, so that a refused client hears why.

When a server-side handshake fails -- a client without the certificate a mutual-TLS
server requires, one signed by an unknown CA, no protocol version in common -- OpenSSL
puts the alert that says so in its outgoing buffer. asyncio's and uvloop's SSL layers
(``create_server(ssl=...)``, ``connect_accepted_socket(ssl=...)``) then abort the
connection without writing it: the client reads an EOF or a reset, where it should
read "certificate required" or "unknown ca". Here the TLS session is ours, on memory
BIOs: whatever the handshake produced, the alert included, is written before the
connection ends, and the failure goes to whoever waits for the handshake (a log line
and a counter there).

* `ServerTLSSession`: the `ssl.SSLObject` and its two BIOs; feed it ciphertext, get
  plaintext and the ciphertext to write. A gateway's `LinkConnection` runs one inside
  its own protocol.
* `TLSServerStream`: an `asyncio.Protocol` for one accepted socket that runs the
  handshake, then makes the application's protocol and hands it a `TLSTransport`, on
  which it reads and writes plaintext as on any transport. The hub's `TLSServer` uses
  it.

The cost against the loop's own layer (uvloop's is in C): a few Python calls per read
and per write, next to the encryption itself (docs/hub.md, "TLS handshakes").
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ServerTLSSession", "TLSServerStream", "TLSTransport"]

_READ_SIZE = 256 * 1024


class ServerTLSSession:
    """The server side of one TLS session over memory BIOs (no socket of its own)."""

    __slots__ = ("established", "incoming", "obj", "out", "peer_closed")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.out, server_side=True)
        self.established = False
        self.peer_closed = False  # the peer's close_notify came: it sends nothing more

    def receive(self, data: bytes | memoryview) -> bytes:
        """Feed ciphertext; return the plaintext it completes (raises `ssl.SSLError`,
        after which `outgoing` holds the alert, if OpenSSL made one)."""
        self.incoming.write(data)
        if not self.established:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.established = True
        chunks = []
        while True:
            try:
                chunk = self.obj.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:  # (how `SSLObject.read` reports a close_notify)
                self.peer_closed = True
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def send(self, data: bytes | bytearray | memoryview) -> bytes:
        """Encrypt plaintext; return the ciphertext to write."""
        view = memoryview(data)
        while view:
            n = self.obj.write(view)
            view = view[n:]
        return self.out.read()

    def outgoing(self) -> bytes:
        """Ciphertext waiting to be written (handshake messages, session tickets, an
        alert)."""
        return self.out.read()

    def close_notify(self) -> bytes:
        """End the session: the close_notify alert to write."""
        with contextlib.suppress(ssl.SSLError):  # (want-read: the peer's is not awaited)
            self.obj.unwrap()
        return self.out.read()


class TLSServerStream(asyncio.Protocol):
    """One accepted socket: the TLS handshake, then the application's protocol on a
    `TLSTransport`.

    `handshake` is done when the handshake is: with None when it completed (the
    application's protocol, ``factory()``, then gets its `connection_made` at once, and
    may refuse the connection there without that counting as a failed handshake),
    with the exception if it failed. A failed handshake writes what OpenSSL produced
    (the alert) and closes the socket; an EOF or reset before the end fails it with
    `ConnectionResetError` (without arguments for an EOF, as the loop's SSL layer).
    Once the handshake is done, a TLS error (a corrupt record) writes the alert and
    aborts the socket: the application's `connection_lost` gets the `ssl.SSLError`.
    """

    __slots__ = ("_error", "_factory", "_reading", "app", "closing", "handshake", "session",
                 "transport")

    def __init__(self, context: ssl.SSLContext, factory: Callable[[], asyncio.BaseProtocol],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.session = ServerTLSSession(context)
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.app: Any = None  # the application's protocol, once the handshake is done
        self.transport: asyncio.Transport | None = None
        self.closing = False  # closed or aborted by us (the application, a failure)
        self._factory = factory
        self._error: Exception | None = None
        self._reading = True

    # the socket's side --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        session = self.session
        try:
            plain = session.receive(data)
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        self._write(session.outgoing())
        if self.app is None:
            if not session.established:
                return
            self._established()
        if plain and not self.closing:
            self.app.data_received(plain)
        if session.peer_closed and not self.closing:
            self._peer_ended()

    def eof_received(self) -> bool:
        if self.app is None:
            self._fail(ConnectionResetError())  # (the loop's layer says the same)
        elif not self.closing:
            self._peer_ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.app is None:
            self._settle(exc or self._error or ConnectionResetError())
            return
        app, self.app = self.app, None
        app.connection_lost(exc or self._error)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # the application's side (through `TLSTransport`) -----------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and write `data` (nothing once closing, as a closed transport)."""
        if not self.closing and data:
            self._write(self.session.send(data))

    def close(self) -> None:
        """Write the close_notify after what is buffered, then close the socket."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        if self.session.established:
            self._write(self.session.close_notify())
        self.transport.close()

    def abort(self) -> None:
        """Close the socket now, dropping what is buffered."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
        self._settle(ConnectionAbortedError("aborted during the TLS handshake"))

    def pause_reading(self) -> None:
        """Stop reading the socket (what one read decrypted has been handed over)."""
        if self._reading and self.transport is not None and not self.closing:
            self._reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the socket again."""
        if not self._reading and self.transport is not None and not self.closing:
            self._reading = True
            self.transport.resume_reading()

    def extra_info(self, name: str, default: Any = None) -> Any:
        """`get_extra_info`: the TLS session's ("ssl_object", "peercert", "cipher",
        "compression"), else the socket transport's."""
        obj = self.session.obj
        if name == "ssl_object":
            return obj
        if name == "peercert":
            return obj.getpeercert()
        if name == "cipher":
            return obj.cipher()
        if name == "compression":
            return obj.compression()
        if self.transport is None:
            return default
        return self.transport.get_extra_info(name, default)

    # internals -------------------------------------------------------------------------

    def _write(self, ciphertext: bytes) -> None:
        if ciphertext and self.transport is not None and not self.transport.is_closing():
            self.transport.write(ciphertext)

    def _established(self) -> None:
        self._settle(None)  # (first: the application may abort in connection_made)
        self.app = self._factory()
        self.app.connection_made(TLSTransport(self))

    def _fail(self, exc: Exception) -> None:
        """A TLS error: write the alert OpenSSL made, then end the socket (closed in the
        handshake, so that the alert goes out first; aborted afterwards, as the loop's
        layer does)."""
        self._error = exc
        self._write(self.session.outgoing())
        self.closing = True
        if self.transport is not None:
            if self.app is None:
                self.transport.close()
            else:
                self.transport.abort()
        self._settle(exc)

    def _peer_ended(self) -> None:
        """The peer's close_notify or EOF: the application's `eof_received`, then our
        close (TLS has no half-close)."""
        self.app.eof_received()
        self.close()

    def _settle(self, exc: BaseException | None) -> None:
        if not self.handshake.done():
            if exc is None:
                self.handshake.set_result(None)
            else:
                self.handshake.set_exception(exc)


class TLSTransport(asyncio.Transport):
    """The transport an application's protocol gets from `TLSServerStream`: plaintext
    in and out, flow control and extra info as on the loop's TLS transports. TLS has no
    half-close: `can_write_eof()` is False."""

    __slots__ = ("_protocol", "_stream")

    def __init__(self, stream: TLSServerStream) -> None:
        super().__init__()
        self._stream = stream
        self._protocol: asyncio.BaseProtocol = stream.app

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send `data`."""
        self._stream.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Encrypt and send the pieces, as one write."""
        self._stream.write(b"".join(list_of_data))

    def close(self) -> None:
        """Send what is buffered and a close_notify, then close."""
        self._stream.close()

    def abort(self) -> None:
        """Close at once; what is buffered is lost."""
        self._stream.abort()

    def is_closing(self) -> bool:
        """Whether `close` or `abort` was called, or the connection is gone."""
        return self._stream.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The TLS session's details, or the socket's (see `TLSServerStream.extra_info`)."""
        return self._stream.extra_info(name, default)

    def pause_reading(self) -> None:
        """Stop reading until `resume_reading`."""
        self._stream.pause_reading()

    def resume_reading(self) -> None:
        """Read again."""
        self._stream.resume_reading()

    def is_reading(self) -> bool:
        """Whether reading is on."""
        return self._stream._reading and not self._stream.closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """The socket transport's limits (on ciphertext: a few bytes per 16 KiB more)."""
        if self._stream.transport is not None:
            self._stream.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        """Bytes buffered, not yet sent."""
        transport = self._stream.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """The socket transport's (low, high) limits."""
        transport = self._stream.transport
        return transport.get_write_buffer_limits() if transport is not None else (0, 0)

    def can_write_eof(self) -> bool:
        """False: TLS has no half-close."""
        return False

    def write_eof(self) -> None:
        """Not possible over TLS (see `can_write_eof`)."""
        raise NotImplementedError("TLS has no half-close: close() ends both directions")

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the plaintext to `protocol` from now on."""
        self._protocol = protocol
        self._stream.app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The protocol the plaintext goes to."""
        return self._protocol
