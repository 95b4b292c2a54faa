"""The handshake driver: OpenSSL on memory BIOs, fed whatever the peer sent.

Sans-IO in the h11 sense: the caller passes what the peer sent to
:meth:`HandshakeDriver.receive`, and sends whatever :meth:`~HandshakeDriver.data_to_send`
returns, until ``done``.  Taking no more than the last handshake record out of the
transport matters: whatever the peer sends after it must stay in the socket for the
kernel to decrypt.  So ``receive`` says how many bytes it used (all of them, up to the
end of the record that completes the handshake): a caller that can peek passes all it
sees and then takes out only those; one that can't reads exactly
:meth:`~HandshakeDriver.bytes_wanted` bytes at a time.

While the records pass through, the driver keeps the books the kernel needs and
OpenSSL does not tell: how many records each side protected under the final keys
(the sequence numbers), and in TLS 1.2 the last explicit nonce OpenSSL used.  The
secrets come from OpenSSL's key-log callback (TLS 1.3) or its master key (TLS 1.2).
When the handshake completes the result is one frozen :class:`~ktls.session.Session`.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

from OpenSSL import SSL

from .errors import HandshakeError, ProtocolViolation
from .keyschedule import (
    split_tls12_key_block,
    tls12_key_block,
    tls12_key_block_length,
    tls13_traffic_key_iv,
)
from .protection import Sealer
from .records import (
    ANY_RECORD_VERSION,
    HEADER_LEN,
    RecordBuffer,
    RecordHeader,
    parse_alert,
    parse_header,
)
from .session import Role, Session, TrafficKeys
from .suites import Suite, suite_by_name
from .wire import AlertDescription, ContentType, ProtocolVersion

__all__ = ["HandshakeDriver", "TicketSink", "keylog_callback", "verify_callback"]

_VERSIONS = {"TLSv1.2": ProtocolVersion.TLS1_2, "TLSv1.3": ProtocolVersion.TLS1_3}
_ALERT_PREFIXES = ("sslv3 alert ", "tlsv1 alert ", "tlsv13 alert ")
# OpenSSL's verification errors (openssl/x509_vfy.h) that get their own wording, and
# the alert OpenSSL sends for each (ssl_x509err2alert); others say certificate_unknown.
_HOSTNAME_MISMATCH = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_VERIFY_ALERTS = {
    2: AlertDescription.UNKNOWN_CA,  # unable to get issuer certificate
    10: AlertDescription.CERTIFICATE_EXPIRED,
    18: AlertDescription.UNKNOWN_CA,  # self-signed
    19: AlertDescription.UNKNOWN_CA,  # self-signed in the chain
    20: AlertDescription.UNKNOWN_CA,  # unable to get local issuer certificate
    21: AlertDescription.UNKNOWN_CA,  # unable to verify the first certificate
    62: AlertDescription.BAD_CERTIFICATE,
    64: AlertDescription.BAD_CERTIFICATE,
}


def keylog_callback(conn: SSL.Connection, line: bytes) -> None:
    """Context key-log callback: route each line to the connection's driver."""
    driver = conn.get_app_data()
    if isinstance(driver, HandshakeDriver):
        driver.on_keylog(line)


def verify_callback(conn: SSL.Connection, cert: Any, errnum: int, depth: int, ok: int) -> bool:
    """Context verify callback: OpenSSL's verdict stands; the connection's driver notes
    why it refused a certificate.  Set once on the context, not per connection: each
    per-connection callback costs pyOpenSSL a helper object and a cffi trampoline."""
    driver = conn.get_app_data()
    if isinstance(driver, HandshakeDriver):
        driver.on_verify(cert, errnum, depth, ok)
    return bool(ok)


def _alert_in_openssl_error(reasons: list[str]) -> AlertDescription | None:
    for reason in reasons:
        for prefix in _ALERT_PREFIXES:
            if reason.startswith(prefix):
                name = reason[len(prefix) :].upper().replace(" ", "_")
                return AlertDescription.__members__.get(name)
    return None


def _openssl_reasons(exc: SSL.Error) -> list[str]:
    reasons: list[str] = []
    for arg in exc.args:
        if isinstance(arg, list):
            reasons.extend(str(item[-1]) for item in arg if isinstance(item, tuple))
        else:
            reasons.append(str(arg))
    return [r for r in reasons if r] or [repr(exc)]


class _Boundaries:
    """Where the peer's records end in its byte stream, headers checked on the way, so
    that OpenSSL can be given any amount and the driver still knows which records
    it took.

    During the handshake the record version is anything 3.x: RFC 8446 5.1 and RFC 5246
    E.1 say to ignore it (a first ClientHello may say 0x0300), and OpenSSL judges what
    it must.
    """

    def __init__(self) -> None:
        self._header = b""  # the start of a header not yet whole
        self._record: RecordHeader | None = None  # whose body is still coming
        self._left = 0  # bytes of that body still to come

    def at_boundary(self) -> bool:
        return not self._header and not self._left

    def wanted(self) -> int:
        return self._left or HEADER_LEN - len(self._header)

    def scan(
        self, data: bytes
    ) -> tuple[list[tuple[int, RecordHeader, bytes]], int, ProtocolViolation | None]:
        """Walk ``data``: (end offset, header, body) of each record that ends in it (the
        body cut short if it began earlier), how far the data is good, and why not
        further."""
        records: list[tuple[int, RecordHeader, bytes]] = []
        pos, size = 0, len(data)
        while pos < size:
            if self._left:
                record = self._record
                assert record is not None
                body_start = pos - (record.length - self._left)  # < 0: in earlier data
                taken = min(self._left, size - pos)
                pos += taken
                self._left -= taken
                if not self._left:
                    records.append((pos, record, data[max(body_start, 0) : pos]))
                continue
            header_start = pos - len(self._header)
            taken = min(HEADER_LEN - len(self._header), size - pos)
            self._header += data[pos : pos + taken]
            pos += taken
            if len(self._header) < HEADER_LEN:
                break
            try:
                header = parse_header(self._header, versions=ANY_RECORD_VERSION)
            except ProtocolViolation as exc:
                return records, max(header_start, 0), exc
            self._header = b""
            self._record, self._left = header, header.length
            if not header.length:
                records.append((pos, header, b""))
        return records, size, None


def _take_back_input(conn: SSL.Connection) -> int:
    """Empty the connection's input BIO of what OpenSSL did not read; return how much.

    pyOpenSSL has no call for this; its cffi binding has BIO_get_mem_data (which
    returns the count) and BIO_read, on the memory BIO it feeds (``_into_ssl``).
    """
    from OpenSSL._util import ffi, lib  # noqa: PLC0415 -- private, so kept to these places

    bio = conn._into_ssl
    left = int(lib.BIO_get_mem_data(bio, ffi.NULL))
    if left:
        lib.BIO_read(bio, ffi.new("char[]", left), left)
    return left


class HandshakeDriver:
    """Drives one OpenSSL connection through its handshake.  See the module docstring."""

    def __init__(
        self,
        conn: SSL.Connection,
        role: Role,
        *,
        server_hostname: str | None = None,
        check_hostname: bool = False,
    ) -> None:
        self._conn = conn
        self.role = role
        self._server_hostname = server_hostname
        if check_hostname and server_hostname is not None:
            _verify_name_in_handshake(conn, server_hostname)
        conn.set_app_data(self)
        self._boundaries = _Boundaries()
        self._out = bytearray()
        self._out_records = RecordBuffer(versions=ANY_RECORD_VERSION)
        self._secrets: dict[str, bytes] = {}
        # Record bookkeeping for the sequence numbers and the TLS 1.2 explicit nonce.
        self._peer_ccs = False
        self._rx_after_ccs = 0
        self._own_ccs = False
        self._tx_after_ccs = 0
        self._last_tx_body = b""
        self._step_protected_records = 0
        self._peer_alert: AlertDescription | None = None
        self._verify_error: str | None = None
        self._verify_alert: AlertDescription | None = None
        self.done = False
        self._session: Session | None = None
        if role is Role.CLIENT:
            conn.set_connect_state()
            try:
                self._step()  # the ClientHello
            except SSL.Error as exc:
                raise self._failure(exc) from exc
        else:
            conn.set_accept_state()

    # -- the pump ---------------------------------------------------------------------------

    def bytes_wanted(self) -> int:
        """How many bytes to read next: never past the end of the current record."""
        return self._boundaries.wanted()

    def receive(self, data: bytes) -> int:
        """Take bytes from the peer; return how many were used: all, except what
        follows the record that completes the handshake (the record engine's, see the
        module docstring).

        Raises HandshakeError (after queueing any alert to send) when the handshake
        fails.
        """
        if self.done:
            raise RuntimeError("handshake already complete")
        at_boundary = self._boundaries.at_boundary()
        records, limit, garbage = self._boundaries.scan(data)
        # One do_handshake() for all of it: OpenSSL reads record by record (no read
        # ahead) and stops at the end of the handshake; what it left in its input BIO
        # is taken back, and stays with the caller.
        if limit:
            self._conn.bio_write(data[:limit])
        failure: SSL.Error | None = None
        try:
            complete = self._step()
        except SSL.Error as exc:
            failure, complete = exc, False
        used = limit - _take_back_input(self._conn)
        for end, header, body in records:
            if end > used:
                break
            self._account_incoming(header, body)
        if failure is not None:
            raise self._failure(failure) from failure
        if complete:
            if not (used == 0 and at_boundary) and used not in {r[0] for r in records}:
                # Never seen; were it to happen, the kernel would miss those bytes.
                raise HandshakeError("OpenSSL read past the end of the handshake")
            self._session = self._build_session()
            self.done = True
        elif used != limit:
            raise HandshakeError("OpenSSL stopped reading in the middle of the handshake")
        elif garbage is not None:
            raise HandshakeError(f"peer sent garbage during the handshake: {garbage}") from (
                garbage
            )
        return used

    def _account_incoming(self, header: RecordHeader, body: bytes) -> None:
        if header.content_type == ContentType.CHANGE_CIPHER_SPEC:
            self._peer_ccs = True
        elif self._peer_ccs:
            self._rx_after_ccs += 1
        if header.content_type == ContentType.ALERT and len(body) == 2 and not self._peer_ccs:
            with contextlib.suppress(ProtocolViolation):  # OpenSSL will judge it too
                self._peer_alert = parse_alert(body).known  # a plaintext alert we can read

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError("handshake not complete")
        return self._session

    @property
    def connection(self) -> SSL.Connection:
        return self._conn

    def on_keylog(self, line: bytes) -> None:
        label, _random, secret = line.decode("ascii").split()
        if label.endswith("TRAFFIC_SECRET_0"):
            self._secrets[label] = bytes.fromhex(secret)

    # -- internals --------------------------------------------------------------------------

    def _step(self) -> bool:
        """One do_handshake(): True when the handshake is complete, False when OpenSSL
        wants more; SSL.Error when it failed (what it wrote, an alert, is taken)."""
        self._step_protected_records = 0
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return False
        finally:
            self._drain()
        return True

    def _drain(self) -> None:
        """Take what OpenSSL wrote, and keep the books on each whole record in it."""
        while True:
            try:
                chunk = self._conn.bio_read(1 << 16)
            except SSL.WantReadError:
                break
            self._out += chunk
            # A record may span two reads of the BIO (a big certificate chain): count
            # records only once they are whole.
            self._out_records.feed(chunk)
        while (record := self._out_records.next_record()) is not None:
            self._account_outgoing(*record)

    def _account_outgoing(self, header: RecordHeader, body: bytes) -> None:
        if header.content_type == ContentType.CHANGE_CIPHER_SPEC:
            self._own_ccs = True
        elif self._own_ccs:
            self._tx_after_ccs += 1
            self._last_tx_body = body
        if header.content_type == ContentType.APPLICATION_DATA:
            self._step_protected_records += 1

    def _failure(self, exc: SSL.Error) -> HandshakeError:
        reasons = _openssl_reasons(exc)
        if self._verify_error is not None:
            # We refused the peer's certificate; OpenSSL sent the alert for it.
            return HandshakeError(
                f"certificate verify failed: {self._verify_error}", alert=self._verify_alert
            )
        # OpenSSL's "... alert <name>" reasons are only raised for alerts it received.
        alert = _alert_in_openssl_error(reasons) or self._peer_alert
        if alert is not None:
            return HandshakeError(
                f"handshake failed: the peer sent alert {alert.name.lower()}",
                alert=alert,
                received=True,
            )
        return HandshakeError(f"handshake failed: {'; '.join(reasons)}")

    def on_verify(self, cert: Any, errnum: int, depth: int, ok: int) -> None:
        """Record why OpenSSL rejected a certificate so the error can say it plainly."""
        if not ok and self._verify_error is None:
            # Never raise here: OpenSSL would only see a failed callback.
            try:
                subject = cert.to_cryptography().subject.rfc4514_string() or "(empty)"
            except Exception:
                subject = "(unreadable)"
            if errnum in _HOSTNAME_MISMATCH:
                what = f"certificate does not match {self._server_hostname!r}"
            else:
                what = _x509_error_string(errnum)
                if _VERIFY_ALERTS.get(errnum) is AlertDescription.UNKNOWN_CA:
                    what += " (unknown CA)"
            self._verify_error = f"{what} (depth {depth}, subject {subject})"
            self._verify_alert = _VERIFY_ALERTS.get(errnum, AlertDescription.CERTIFICATE_UNKNOWN)

    def _build_session(self) -> Session:
        conn = self._conn
        version = _VERSIONS.get(conn.get_protocol_version_name())
        suite = suite_by_name(conn.get_cipher_name() or "")
        if version is None or suite is None or suite.version is not version:
            raise HandshakeError(
                f"negotiated {conn.get_protocol_version_name()} {conn.get_cipher_name()}, "
                "which ktls cannot offload"
            )
        if version is ProtocolVersion.TLS1_3:
            client, server = self._tls13_keys(suite)
        else:
            client, server = self._tls12_keys(suite)
        tx, rx = (client, server) if self.role is Role.CLIENT else (server, client)
        alpn = conn.get_alpn_proto_negotiated()
        if self.role is Role.CLIENT:
            server_name = self._server_hostname
        else:
            sni = conn.get_servername()
            server_name = sni.decode("idna") if sni else None
        return Session(
            role=self.role,
            version=version,
            suite=suite,
            tx=tx,
            rx=rx,
            alpn=alpn.decode("ascii", "replace") if alpn else None,
            server_name=server_name,
            resumed=session_reused(conn),
        )

    def _tls13_keys(self, suite: Suite) -> tuple[TrafficKeys, TrafficKeys]:
        cipher = suite.cipher
        keys = []
        for label in ("CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"):
            secret = self._secrets.get(label)
            if secret is None:
                raise HandshakeError(f"OpenSSL did not report {label} through the key log")
            key, iv = tls13_traffic_key_iv(
                suite.hash_name, secret, cipher.key_len, cipher.nonce_len
            )
            # Only the server has written under its application key by now: the
            # NewSessionTickets of its final step (2 full, 1 resumed with OpenSSL 4.0).
            # The client's final flight was all under handshake keys.
            seq = 0
            if self.role is Role.SERVER and label.startswith("SERVER"):
                seq = self._step_protected_records
            keys.append(TrafficKeys(key=key, iv=iv, seq=seq, secret=secret))
        return keys[0], keys[1]

    def _tls12_keys(self, suite: Suite) -> tuple[TrafficKeys, TrafficKeys]:
        cipher = suite.cipher
        conn = self._conn
        iv_len = cipher.tls12_fixed_iv_len
        master, server_random, client_random = (
            conn.master_key(),
            conn.server_random(),
            conn.client_random(),
        )
        if master is None or server_random is None or client_random is None:
            raise HandshakeError("OpenSSL did not expose the TLS 1.2 master secret")
        block = split_tls12_key_block(
            tls12_key_block(
                suite.hash_name,
                master,
                server_random,
                client_random,
                tls12_key_block_length(cipher.key_len, iv_len),
            ),
            cipher.key_len,
            iv_len,
        )
        # Sequence numbers restart at our/their ChangeCipherSpec: count records since.
        explicit = None
        if cipher.tls12_explicit_nonce_len and self._last_tx_body:
            # Continue OpenSSL's explicit-nonce counter so no nonce repeats under this key.
            explicit = int.from_bytes(self._last_tx_body[: cipher.tls12_explicit_nonce_len], "big")
            explicit = (explicit + 1) % (1 << 64)
        tx_seq, rx_seq = self._tx_after_ccs, self._rx_after_ccs
        client_is_tx = self.role is Role.CLIENT
        client = TrafficKeys(
            key=block.client_write_key,
            iv=block.client_write_iv,
            seq=tx_seq if client_is_tx else rx_seq,
            explicit_nonce=explicit if client_is_tx else None,
        )
        server = TrafficKeys(
            key=block.server_write_key,
            iv=block.server_write_iv,
            seq=rx_seq if client_is_tx else tx_seq,
            explicit_nonce=None if client_is_tx else explicit,
        )
        return client, server


class TicketSink:
    """Keeps TLS 1.3 NewSessionTicket messages that arrive after the hand-off and gives
    them to OpenSSL when a session is asked for, so that
    ``SSL.Connection.get_session()`` can resume.

    Deferred because OpenSSL's processing of a ticket costs more than a whole short
    connection's reads (most clients never resume); the core checks the structure on
    arrival, so a malformed ticket still fails the connection at once.  OpenSSL never
    sees the records the engine reads, so each ticket is sealed again, under the
    server's first application key at the sequence number OpenSSL itself expects (it
    has read nothing under that key), and fed to its memory BIO.
    """

    def __init__(self, conn: SSL.Connection, session: Session) -> None:
        self._conn = conn
        self._session = session
        self._sealer: Sealer | None = None
        self._waiting: list[bytes] = []

    def __call__(self, message: bytes) -> None:
        self._waiting.append(message)

    def deliver(self) -> None:
        """Give OpenSSL the tickets received so far."""
        waiting, self._waiting = self._waiting, []
        if waiting and self._sealer is None:
            keys = self._session.rx
            self._sealer = Sealer(
                self._session.version, self._session.suite.cipher, keys.key, keys.iv, 0
            )
        for message in waiting:
            assert self._sealer is not None
            self._conn.bio_write(self._sealer.seal(ContentType.HANDSHAKE, message))
            try:
                self._conn.recv(1)
            except SSL.WantReadError:
                continue
            except SSL.Error as exc:
                raise ProtocolViolation(
                    f"OpenSSL rejected a NewSessionTicket: {exc}", AlertDescription.DECODE_ERROR
                ) from exc


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _verify_name_in_handshake(conn: SSL.Connection, name: str) -> None:
    """Make OpenSSL check the peer's name while it verifies the chain, so a wrong name
    fails the handshake before we send our Finished (or our certificate).

    pyOpenSSL has no call for X509_VERIFY_PARAM_set1_host/_ip; its cffi binding has
    (the same calls CPython's ssl makes for check_hostname).
    """
    from OpenSSL._util import lib  # noqa: PLC0415 -- private, so kept to these places

    param = lib.SSL_get0_param(conn._ssl)
    if is_ip_address(name):
        packed = ipaddress.ip_address(name).packed
        ok = lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    else:
        lib.X509_VERIFY_PARAM_set_hostflags(param, lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
        encoded = name.encode("idna")
        ok = lib.X509_VERIFY_PARAM_set1_host(param, encoded, len(encoded))
    if ok != 1:
        raise HandshakeError(f"OpenSSL refused {name!r} as a name to verify")


def _x509_error_string(errnum: int) -> str:
    from OpenSSL._util import ffi, lib  # noqa: PLC0415

    text: bytes = ffi.string(lib.X509_verify_cert_error_string(errnum))
    return text.decode("ascii", "replace")


def session_reused(conn: SSL.Connection) -> bool:
    """Whether the handshake resumed a session.

    pyOpenSSL has no public call for SSL_session_reused(); its cffi binding has.
    """
    from OpenSSL._util import lib  # noqa: PLC0415 -- private, so kept to this one place

    return bool(lib.SSL_session_reused(conn._ssl))
