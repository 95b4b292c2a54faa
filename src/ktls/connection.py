"""The socket-like object applications use: :class:`TLSSocket`.

Everything that is not application data after the hand-off is handled here, the
same way whichever engine carries a direction:

* alerts: close_notify ends the stream; a fatal alert raises AlertReceived;
* TLS 1.3 NewSessionTicket (client): handed to OpenSSL so that resumption works
  after offload.  OpenSSL never sees the kernel's records, so the ticket is re-sealed
  under the key and sequence number OpenSSL itself expects, then fed to it;
* TLS 1.3 KeyUpdate: new keys for the engine, and an answer at once when asked;
* TLS 1.2 renegotiation: refused with a no_renegotiation warning.

A failure is sticky (trio's rule): once a record could not be read or sent, every
later call raises BrokenError with the original failure as its cause.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from .errors import (
    AlertReceived,
    BrokenError,
    ClosedError,
    KernelUnsupported,
    KTLSError,
    ProtocolViolation,
    RekeyUnsupported,
    TruncatedStream,
)
from .kernel import rekey_error
from .protection import Sealer
from .records import (
    HandshakeBuffer,
    HandshakeMessage,
    encode_alert,
    encode_key_update,
    parse_alert,
    parse_key_update,
)
from .session import Role, Session, next_generation
from .wire import (
    AlertDescription,
    AlertLevel,
    ContentType,
    HandshakeType,
    KeyUpdateRequest,
    ProtocolVersion,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from .engine import RxEngine, TxEngine
    from .linux import CryptoInfo

__all__ = ["TLSSocket"]


class _TicketSink:
    """Feeds TLS 1.3 NewSessionTicket messages to OpenSSL after the hand-off."""

    def __init__(self, conn: SSL.Connection, session: Session) -> None:
        self._conn = conn
        keys = session.rx
        # OpenSSL has read nothing under the server's application key: its seq is 0.
        self._sealer = Sealer(session.version, session.suite.cipher, keys.key, keys.iv, 0)

    def feed(self, message: bytes) -> None:
        self._conn.bio_write(self._sealer.seal(ContentType.HANDSHAKE, message))
        try:
            self._conn.recv(1)
        except SSL.WantReadError:
            return
        except SSL.Error as exc:
            raise ProtocolViolation(
                f"OpenSSL rejected a NewSessionTicket: {exc}", AlertDescription.DECODE_ERROR
            ) from exc


class TLSSocket:
    """A TLS connection whose records are protected by the kernel or in software.

    Made by :class:`ktls.ClientContext` / :class:`ktls.ServerContext`; modelled on
    ``ssl.SSLSocket``.  ``tx_engine`` / ``rx_engine`` tell which engine carries each
    direction ("kernel" or "software").
    """

    def __init__(
        self,
        sock: socket.socket,
        conn: SSL.Connection,
        session: Session,
        tx: TxEngine,
        rx: RxEngine,
    ) -> None:
        self._sock = sock
        self._conn = conn
        self._session = session
        self._tx = tx
        self._rx = rx
        self._tx_keys = session.tx
        self._rx_keys = session.rx
        self._messages = HandshakeBuffer()
        self._unread = bytearray()  # application data read but not yet returned
        tls13_client = session.version is ProtocolVersion.TLS1_3 and session.role is Role.CLIENT
        self._tickets = _TicketSink(conn, session) if tls13_client else None
        self._peer_closed = False  # close_notify received
        self._close_sent = False
        self._closed = False
        self._failure: KTLSError | None = None
        # Reads may send (KeyUpdate answers, alerts) while another thread sends data.
        self._tx_lock = threading.RLock()

    # -- what was negotiated -----------------------------------------------------------------

    @property
    def tx_engine(self) -> str:
        """Who protects the records we send: "kernel" or "software"."""
        return self._tx.name

    @property
    def rx_engine(self) -> str:
        """Who opens the records we receive: "kernel" or "software"."""
        return self._rx.name

    @property
    def tls_session(self) -> Session:
        """The hand-off value (version, suite, keys as installed)."""
        return self._session

    def kernel_crypto_info(self, direction: str) -> CryptoInfo | None:
        """``getsockopt`` read-back of the kernel's state for "tx" or "rx" (live
        ``rec_seq``); None when that direction runs on the software engine."""
        if direction not in ("tx", "rx"):
            raise ValueError(f"direction must be 'tx' or 'rx', not {direction!r}")
        return self._tx.crypto_info() if direction == "tx" else self._rx.crypto_info()

    def version(self) -> str:
        return self._session.version.label

    def cipher(self) -> tuple[str, str, int]:
        suite = self._session.suite
        return suite.openssl_name, self.version(), suite.cipher.key_len * 8

    def selected_alpn_protocol(self) -> str | None:
        return self._session.alpn

    @property
    def server_hostname(self) -> str | None:
        return self._session.server_name

    @property
    def session(self) -> SSL.Session | None:
        """OpenSSL session to resume with (``ClientContext.connect(..., session=)``).

        For TLS 1.3 it holds a ticket once one has arrived, i.e. after some reading.
        """
        return self._conn.get_session()

    @property
    def session_reused(self) -> bool:
        return self._session.resumed

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        return self._conn.get_peer_certificate(as_cryptography=True)

    def getpeercert(self, binary_form: bool = False) -> dict[str, Any] | bytes | None:
        """The peer's certificate: DER bytes, or a dict shaped like ``ssl``'s."""
        cert = self.peer_certificate
        if cert is None:
            return None
        if binary_form:
            return cert.public_bytes(Encoding.DER)
        return _cert_dict(cert)

    # -- plain socket things -----------------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    @property
    def socket(self) -> socket.socket:
        """The underlying TCP socket (its records are TLS: don't read or write it)."""
        return self._sock

    def __enter__(self) -> TLSSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "broken" if self._failure else "open"
        return (
            f"<TLSSocket {state} {self.version()} {self._session.suite.openssl_name} "
            f"tx={self.tx_engine} rx={self.rx_engine}>"
        )

    # -- reading -----------------------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes of application data; b"" after close_notify."""
        if flags:
            raise ValueError("flags are not supported on a TLS socket")
        self._check_usable()
        if bufsize < 0:
            raise ValueError("negative buffer size")
        if self._unread:
            data = bytes(self._unread[:bufsize])
            del self._unread[:bufsize]
            return data
        while bufsize and not self._peer_closed:
            content_type, data = self._read_record(bufsize)
            if content_type is ContentType.APPLICATION_DATA and not self._messages.pending():
                if len(data) > bufsize:  # an engine may return a whole record, or more
                    self._unread += data[bufsize:]
                    return data[:bufsize]
                if data:  # zero-length records are legal (TLS 1.3) and carry nothing
                    return data
            else:
                self._handle_control(content_type, data)
        return b""

    def pending(self) -> int:
        """Bytes (or, on the software engine, a whole record) that ``recv`` can return
        without waiting: check this before waiting on the fd with select()."""
        if self._unread:
            return len(self._unread)
        return 1 if self._rx.buffered() else 0

    def recv_into(self, buffer: Buffer, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view), flags)
        view[: len(data)] = data
        return len(data)

    def _read_record(self, bufsize: int) -> tuple[ContentType, bytes]:
        try:
            record = self._rx.recv_record(bufsize)
        except ProtocolViolation as exc:
            self._fail(exc, exc.alert)
        except (TimeoutError, BlockingIOError, InterruptedError):
            raise
        except BrokenPipeError as exc:
            # The kernel's TLS receive path reports the RST that follows a peer's bare FIN
            # (once we have sent to its closed socket) before the end of the stream, where
            # plain TCP reports the end first: either way the peer stopped without
            # close_notify.
            self._fail(TruncatedStream(), None, exc)
        except OSError as exc:
            self._fail(BrokenError(f"connection failed while reading: {exc}"), None, exc)
        if record is None:
            self._fail(TruncatedStream(), None)
        return record

    def _handle_control(self, content_type: ContentType, data: bytes) -> None:
        try:
            if content_type is not ContentType.HANDSHAKE and self._messages.pending():
                # RFC 8446 5.1: no other record may come inside a handshake message.
                raise ProtocolViolation(
                    f"{content_type.name} record inside a fragmented handshake message",
                    AlertDescription.UNEXPECTED_MESSAGE,
                )
            if content_type is ContentType.ALERT:
                self._handle_alert(data)
            elif content_type is ContentType.HANDSHAKE:
                self._messages.feed(data)
                while (message := self._messages.next_message()) is not None:
                    self._handle_handshake(message)
            else:
                raise ProtocolViolation(
                    f"unexpected {content_type.name} record after the handshake",
                    AlertDescription.UNEXPECTED_MESSAGE,
                )
        except ProtocolViolation as exc:
            self._fail(exc, exc.alert)
        except KernelUnsupported as exc:  # RekeyUnsupported, mostly
            # We cannot read what follows: end politely rather than hang or misread.
            self._fail(exc, AlertDescription.CLOSE_NOTIFY)

    def _handle_alert(self, data: bytes) -> None:
        alert = parse_alert(data)
        if alert.description == AlertDescription.CLOSE_NOTIFY:
            self._peer_closed = True
            return
        tls13 = self._session.version is ProtocolVersion.TLS1_3
        # TLS 1.3 (RFC 8446 6): every alert but close_notify and user_canceled is fatal,
        # whatever its level.  TLS 1.2: warnings are informational.
        if (tls13 and alert.description == AlertDescription.USER_CANCELED) or (
            not tls13 and alert.level == AlertLevel.WARNING
        ):
            return
        self._fail(AlertReceived(alert.known or alert.description), None)

    def _handle_handshake(self, message: HandshakeMessage) -> None:
        session = self._session
        tls13 = session.version is ProtocolVersion.TLS1_3
        kind = message.msg_type
        if tls13 and kind == HandshakeType.NEW_SESSION_TICKET and self._tickets is not None:
            self._tickets.feed(message.encode())
        elif tls13 and kind == HandshakeType.KEY_UPDATE:
            request = parse_key_update(message.body)
            if self._messages.pending():  # RFC 8446 5.1: no message may span a key change
                raise ProtocolViolation(
                    "KeyUpdate not at the end of its record", AlertDescription.UNEXPECTED_MESSAGE
                )
            self._rx_keys = next_generation(session.suite, self._rx_keys)
            self._rx.rekey(self._rx_keys)
            if request is KeyUpdateRequest.UPDATE_REQUESTED:
                self._update_tx_keys(KeyUpdateRequest.UPDATE_NOT_REQUESTED)
        elif not tls13 and (
            (kind == HandshakeType.HELLO_REQUEST and session.role is Role.CLIENT)
            or (kind == HandshakeType.CLIENT_HELLO and session.role is Role.SERVER)
        ):
            # Renegotiation: refuse politely (RFC 5246 7.2.2), the connection goes on.
            self._send_control(
                ContentType.ALERT,
                encode_alert(AlertDescription.NO_RENEGOTIATION, AlertLevel.WARNING),
            )
        else:
            name = HandshakeType(kind).name if kind in HandshakeType.__members__.values() else kind
            raise ProtocolViolation(
                f"unexpected handshake message {name} after the handshake",
                AlertDescription.UNEXPECTED_MESSAGE,
            )

    # -- writing -----------------------------------------------------------------------------

    def send(self, data: Buffer, flags: int = 0) -> int:
        if flags:
            raise ValueError("flags are not supported on a TLS socket")
        self._check_usable(sending=True)
        view = memoryview(data).cast("B")
        try:
            with self._tx_lock:
                return self._tx.send(view)
        except (TimeoutError, BlockingIOError, InterruptedError):
            if self._tx.name == "software":  # a record may have gone out in part
                self._fail(BrokenError("send timed out in the middle of a record"), None)
            raise
        except OSError as exc:
            self._fail(BrokenError(f"connection failed while sending: {exc}"), None, exc)

    def sendall(self, data: Buffer, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[self.send(view, flags) :]

    def sendfile(self, file: BinaryIO, offset: int = 0, count: int | None = None) -> int:
        """Send a file; on the kernel engine with zero-copy ``sendfile(2)``.

        Like ``socket.sendfile``: returns the bytes sent and leaves the file position
        after the last byte sent.
        """
        self._check_usable(sending=True)
        try:
            with self._tx_lock:
                return self._tx.sendfile(file, offset, count)
        except (TimeoutError, BlockingIOError, InterruptedError):
            if self._tx.name == "software":
                self._fail(BrokenError("sendfile timed out in the middle of a record"), None)
            raise
        except OSError as exc:
            self._fail(BrokenError(f"connection failed in sendfile: {exc}"), None, exc)

    def key_update(self, request_peer: bool = True) -> None:
        """Start a TLS 1.3 KeyUpdate: new keys for what we send from now on.

        With ``request_peer`` the peer is asked to update its keys too (it answers
        with its own KeyUpdate, handled on a later read).  Raises RekeyUnsupported
        *before* sending anything when the kernel engine cannot change keys.
        """
        self._check_usable(sending=True)
        if self._session.version is not ProtocolVersion.TLS1_3:
            raise ValueError("KeyUpdate exists only in TLS 1.3")
        refusal = rekey_error() if "kernel" in (self.tx_engine, self.rx_engine) else None
        if refusal is not None:
            raise RekeyUnsupported(
                f"this kernel cannot change TLS keys (KeyUpdate needs Linux >= 6.14): {refusal}"
            )
        request = (
            KeyUpdateRequest.UPDATE_REQUESTED
            if request_peer
            else KeyUpdateRequest.UPDATE_NOT_REQUESTED
        )
        try:
            self._update_tx_keys(request)
        except KTLSError as exc:
            self._fail(exc, None)

    def _update_tx_keys(self, request: KeyUpdateRequest) -> None:
        # The KeyUpdate itself goes out under the old key; everything after, the new.
        with self._tx_lock:
            self._send_control(ContentType.HANDSHAKE, encode_key_update(request))
            self._tx_keys = next_generation(self._session.suite, self._tx_keys)
            self._tx.rekey(self._tx_keys)

    def _send_control(self, content_type: ContentType, payload: bytes) -> None:
        try:
            with self._tx_lock:
                self._tx.send_record(content_type, payload)
        except OSError as exc:
            self._fail(BrokenError(f"connection failed while sending: {exc}"), None, exc)

    # -- closing and failing -----------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """Like ``socket.shutdown``; SHUT_WR and SHUT_RDWR send close_notify first."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._send_close_notify()
        self._sock.shutdown(how)

    def close(self) -> None:
        """Send close_notify (when the connection is healthy) and close the socket."""
        if self._closed:
            return
        self._send_close_notify()
        self._closed = True
        self._sock.close()

    def _send_close_notify(self) -> None:
        if self._close_sent or self._failure is not None or self._closed:
            return
        self._close_sent = True
        try:
            with self._tx_lock:
                self._tx.send_record(ContentType.ALERT, encode_alert(AlertDescription.CLOSE_NOTIFY))
        except OSError:
            pass  # the peer is gone; nothing left to tell it

    def _check_usable(self, *, sending: bool = False) -> None:
        if self._closed:
            raise ClosedError("the TLS connection is closed")
        if self._failure is not None:
            raise BrokenError(f"the TLS connection failed earlier: {self._failure}") from (
                self._failure
            )
        if sending and self._close_sent:
            raise ClosedError("close_notify was sent: no more data can be sent")

    def _fail(
        self,
        error: KTLSError,
        alert: AlertDescription | None,
        cause: BaseException | None = None,
    ) -> NoReturn:
        """Mark the connection broken, tell the peer why (if we can), and raise."""
        self._failure = error
        if alert is not None and not self._close_sent:
            self._close_sent = True
            try:
                with self._tx_lock:
                    self._tx.send_record(ContentType.ALERT, encode_alert(alert))
            except OSError:
                pass
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if cause is not None:
            raise error from cause
        raise error

    # -- file objects ------------------------------------------------------------------------

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """A file object reading/writing application data, like ``socket.makefile``."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b)")
        reading, writing = "r" in mode, "w" in mode
        raw = _RawTLS(self, reading, writing)
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if "b" not in mode:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: io.BufferedIOBase
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if "b" in mode:
            return buffer
        return io.TextIOWrapper(buffer, encoding, errors, newline)


class _RawTLS(io.RawIOBase):
    def __init__(self, tls: TLSSocket, reading: bool, writing: bool) -> None:
        super().__init__()
        self._tls = tls
        self._reading = reading
        self._writing = writing

    def readable(self) -> bool:
        return self._reading

    def writable(self) -> bool:
        return self._writing

    def readinto(self, buffer: Buffer) -> int:
        return self._tls.recv_into(buffer)

    def write(self, data: Buffer) -> int:
        return self._tls.send(data)

    def fileno(self) -> int:
        return self._tls.fileno()


def _cert_dict(cert: x509.Certificate) -> dict[str, Any]:
    def name(n: x509.Name) -> tuple[tuple[tuple[str, str], ...], ...]:
        return tuple(tuple((attr.oid._name, str(attr.value)) for attr in rdn) for rdn in n.rdns)

    result: dict[str, Any] = {
        "subject": name(cert.subject),
        "issuer": name(cert.issuer),
        "version": cert.version.value + 1,
        "serialNumber": f"{cert.serial_number:X}",
        "notBefore": cert.not_valid_before_utc.strftime("%b %d %H:%M:%S %Y GMT"),
        "notAfter": cert.not_valid_after_utc.strftime("%b %d %H:%M:%S %Y GMT"),
    }
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return result
    entries: list[tuple[str, str]] = [("DNS", v) for v in san.get_values_for_type(x509.DNSName)]
    entries += [("IP Address", str(v)) for v in san.get_values_for_type(x509.IPAddress)]
    result["subjectAltName"] = tuple(entries)
    return result
