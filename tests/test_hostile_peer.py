"""One behaviour suite for both engines: what a hostile or broken peer can send.

No real TLS library sends malformed records, so the peer here is ktls's own server on
the software engine, which after an honest handshake writes forged records straight to
the TCP socket, protected with its real keys.  The engine under test must refuse each
with the alert the RFCs name, never return a byte of it, and tell the peer why: the
server reads our alert back through its own engine.  The second half sends legal but
unusual sequences (KeyUpdates split over records or right behind data, requests after
our close_notify, tickets where select() can't see them) that must simply work.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import ktls
from ktls import AlertDescription as A
from ktls import TrafficKeys
from ktls.records import encode_handshake, encode_key_update
from ktls.session import next_generation
from ktls.wire import ContentType, HandshakeType, KeyUpdateRequest

from .conftest import assert_engine, rekey_expected
from .peers import Certs, TamperingRelay, ThreadPeer, python_ssl_context, run_in_thread


def _nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))


def seal13(keys: TrafficKeys, inner: bytes, *, version: int = 0x0303) -> bytes:
    """One TLS 1.3 AES-128-GCM record (RFC 8446 5.2), with no limits enforced."""
    header = bytes((23,)) + version.to_bytes(2, "big") + (len(inner) + 16).to_bytes(2, "big")
    return header + AESGCM(keys.key).encrypt(_nonce(keys.iv, keys.seq), inner, header)


@dataclass(frozen=True)
class Case:
    forge: Callable[[TrafficKeys], bytes]
    software: A
    kernel: A  # where the kernel reports the violation differently, said below


# lifetime, age_add, an empty nonce, a 16-byte ticket, no extensions
_TICKET_BODY = (300).to_bytes(4, "big") + bytes(4) + b"\x00" + b"\x00\x10" + bytes(16) + b"\x00\x00"
MAC, OVERFLOW, UNEXPECTED = A.BAD_RECORD_MAC, A.RECORD_OVERFLOW, A.UNEXPECTED_MESSAGE
VERSION, DECODE, ILLEGAL = A.PROTOCOL_VERSION, A.DECODE_ERROR, A.ILLEGAL_PARAMETER

CASES = {
    # inner plaintext of 2^14 + 2 bytes: one over the limit (RFC 8446 5.4)
    "oversized-record": Case(
        lambda k: seal13(k, b"x" * (1 << 14) + b"x\x17"), OVERFLOW, OVERFLOW
    ),
    # a header announcing more than any valid record holds
    "oversized-header": Case(
        lambda k: b"\x17\x03\x03\x50\x00" + bytes(64), OVERFLOW, OVERFLOW
    ),
    # shorter than the AEAD tag: cannot be authentic
    "too-short": Case(lambda k: b"\x17\x03\x03\x00\x05" + bytes(5), MAC, MAC),
    # legacy_record_version other than 0x0303 after the handshake
    "bad-version": Case(lambda k: seal13(k, b"hi\x17", version=0x0304), VERSION, VERSION),
    # all padding, no content type (RFC 8446 5.4: unexpected_message).  The kernel
    # reports this as EBADMSG, the same errno as a failed tag: bad_record_mac.
    "all-padding": Case(lambda k: seal13(k, bytes(10)), UNEXPECTED, MAC),
    "unknown-content-type": Case(lambda k: seal13(k, b"hi\x63"), UNEXPECTED, UNEXPECTED),
    "change-cipher-spec": Case(lambda k: seal13(k, b"\x01\x14"), UNEXPECTED, UNEXPECTED),
    "empty-handshake-record": Case(lambda k: seal13(k, b"\x16"), UNEXPECTED, UNEXPECTED),
    "alert-of-three-bytes": Case(lambda k: seal13(k, b"\x02\x28\x00\x15"), DECODE, DECODE),
    "bad-key-update": Case(
        lambda k: seal13(k, encode_handshake(24, b"\x05") + b"\x16"),
        ILLEGAL,
        ILLEGAL,
    ),
    # NewSessionTicket checks (RFC 8446 4.6.1) that must fail the connection on arrival,
    # although OpenSSL is given tickets only when a session is asked for.
    "new-session-ticket-cut-short": Case(
        lambda k: seal13(k, encode_handshake(4, _TICKET_BODY[:-1]) + b"\x16"), DECODE, DECODE
    ),
    "new-session-ticket-with-bytes-after-it": Case(
        lambda k: seal13(k, encode_handshake(4, _TICKET_BODY + b"\x00") + b"\x16"),
        DECODE,
        DECODE,
    ),
    "post-handshake-certificate-request": Case(
        lambda k: seal13(k, encode_handshake(13, bytes(8)) + b"\x16"),
        UNEXPECTED,
        UNEXPECTED,
    ),
    "data-inside-a-fragmented-handshake-message": Case(
        lambda k: seal13(k, encode_handshake(4, bytes(40))[:10] + b"\x16")
        + seal13(TrafficKeys(key=k.key, iv=k.iv, seq=k.seq + 1), b"data\x17"),
        UNEXPECTED,
        UNEXPECTED,
    ),
    "key-update-not-at-record-end": Case(
        lambda k: seal13(k, encode_handshake(24, b"\x00") + b"\x04\x00" + b"\x16"),
        UNEXPECTED,
        UNEXPECTED,
    ),
    # RFC 8446 5.1: a zero-length alert record is unexpected_message, not decode_error
    "empty-alert-record": Case(lambda k: seal13(k, b"\x15"), UNEXPECTED, UNEXPECTED),
    # A plaintext ChangeCipherSpec after the TLS 1.3 handshake (RFC 8446 5: only before
    # the peer's Finished).  The kernel tries to decrypt it: bad_record_mac.
    "plaintext-change-cipher-spec": Case(
        lambda k: b"\x14\x03\x03\x00\x01\x01", UNEXPECTED, MAC
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_malformed_record_is_refused(certs: Certs, engine: str, case: str) -> None:
    spec = CASES[case]
    server = ktls.ServerContext(
        certs.server_rsa, ciphers=["TLS_AES_128_GCM_SHA256"], offload="software"
    )
    with server.listen(("127.0.0.1", 0)) as listener:

        def hostile() -> ktls.KTLSError | None:
            tls, _ = listener.accept()
            with tls:
                tls.sendall(b"honest")
                keys = tls.tls_session.tx
                forged = spec.forge(
                    TrafficKeys(key=keys.key, iv=keys.iv, seq=keys.seq + 1, secret=keys.secret)
                )
                tls.socket.sendall(forged)
                try:
                    tls.recv(100)
                except ktls.KTLSError as exc:
                    return exc
                return None

        peer = run_in_thread(hostile)
        client = ktls.ClientContext(cafile=certs.ca, offload=engine)  # type: ignore[arg-type]
        tls = client.connect(listener.getsockname(), server_hostname="localhost")
        assert_engine(tls, engine)
        assert tls.recv(100) == b"honest"
        with pytest.raises(ktls.ProtocolViolation) as info:
            tls.recv(100)
        expected = spec.kernel if engine == "kernel" else spec.software
        assert info.value.alert is expected, str(info.value)
        with pytest.raises(ktls.BrokenError):
            tls.recv(100)
        tls.close()
        told = peer.join()
        assert isinstance(told, ktls.AlertReceived), told
        assert told.alert is expected


def test_garbage_instead_of_handshake(certs: Certs, engine: str) -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def garbage() -> None:
        raw, _ = listener.accept()
        with raw:
            raw.recv(4096)
            raw.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    peer = run_in_thread(garbage)
    client = ktls.ClientContext(cafile=certs.ca, offload=engine)  # type: ignore[arg-type]
    with pytest.raises(ktls.HandshakeError, match="garbage"):
        client.connect(listener.getsockname(), server_hostname="localhost")
    peer.join()
    listener.close()


def test_peer_closes_during_handshake(certs: Certs, engine: str) -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def hang_up() -> None:
        raw, _ = listener.accept()
        raw.recv(4096)
        raw.close()

    peer = run_in_thread(hang_up)
    client = ktls.ClientContext(cafile=certs.ca, offload=engine)  # type: ignore[arg-type]
    with pytest.raises(ktls.HandshakeError, match="closed the connection during the handshake"):
        client.connect(listener.getsockname(), server_hostname="localhost")
    peer.join()
    listener.close()


LEGAL_ODDITIES = {
    # RFC 8446 5.4: zero-length application data is legal and carries nothing
    "zero-length-data": lambda k: seal13(k, b"\x17"),
    # RFC 8446 5.4: any amount of zero padding after the content type
    "padded-record": lambda k: seal13(k, b"pad\x17" + bytes(200)),
    # RFC 8446 6.1: user_canceled is not fatal (close_notify should follow)
    "user-canceled": lambda k: seal13(k, b"\x01\x5a\x15"),
}


@pytest.mark.parametrize("case", list(LEGAL_ODDITIES), ids=list(LEGAL_ODDITIES))
def test_odd_but_legal_records_are_accepted(certs: Certs, engine: str, case: str) -> None:
    server = ktls.ServerContext(
        certs.server_rsa, ciphers=["TLS_AES_128_GCM_SHA256"], offload="software"
    )
    with server.listen(("127.0.0.1", 0)) as listener:

        def odd_then_data() -> bytes:
            tls, _ = listener.accept()
            with tls:
                keys = tls.tls_session.tx
                tls.socket.sendall(LEGAL_ODDITIES[case](keys))
                follow = TrafficKeys(key=keys.key, iv=keys.iv, seq=keys.seq + 1)
                tls.socket.sendall(seal13(follow, b"after\x17"))
                return tls.recv(100)

        peer = run_in_thread(odd_then_data)
        client = ktls.ClientContext(cafile=certs.ca, offload=engine)  # type: ignore[arg-type]
        tls = client.connect(listener.getsockname(), server_hostname="localhost")
        assert_engine(tls, engine)
        expected = b"padafter" if case == "padded-record" else b"after"
        received = b""
        while len(received) < len(expected):
            received += tls.recv(100)
        assert received == expected
        tls.sendall(b"fine")
        tls.close()
        assert peer.join() == b"fine"


# -- legal but unusual sequences --------------------------------------------------------------

KU_REQUESTED = encode_key_update(KeyUpdateRequest.UPDATE_REQUESTED)
KU_NOT_REQUESTED = encode_key_update(KeyUpdateRequest.UPDATE_NOT_REQUESTED)
DATA, HANDSHAKE = ContentType.APPLICATION_DATA, ContentType.HANDSHAKE
# A NewSessionTicket that OpenSSL accepts: lifetime 300 s, age_add, nonce, ticket, no
# extensions.  age_add starts with 0x18, the KeyUpdate type byte, on purpose.
TICKET = encode_handshake(
    HandshakeType.NEW_SESSION_TICKET,
    (300).to_bytes(4, "big") + b"\x18\x01\x02\x03" + b"\x01\x00" + b"\x00\x20" + bytes(32)
    + b"\x00\x00",
)  # fmt: skip

Record = tuple[ContentType, bytes]
SUITE_FOR = {"TLSv1.3": "TLS_AES_128_GCM_SHA256", "TLSv1.2": "ECDHE-RSA-AES128-GCM-SHA256"}


def send_records(tls: ktls.TLSSocket, items: Sequence[Record | str]) -> None:
    """Write records through ``tls``'s own (software) engine, in ONE socket write:
    ``"rekey"`` switches to the next generation of send keys without a KeyUpdate of our
    own, so a forged KeyUpdate can be followed by records under the new key."""
    tx = tls._tx
    assert tx is not None
    keys = tls.tls_session.tx
    for item in items:
        if item == "rekey":
            keys = next_generation(tls.tls_session.suite, keys)
            tx.queue_keys(keys)
        else:
            assert isinstance(item, tuple)
            tx.queue_record(*item)
    tx.flush()


@contextlib.contextmanager
def forging_server(
    certs: Certs, script: Callable[[ktls.TLSSocket], object], version: str = "TLSv1.3"
) -> Iterator[tuple[tuple[str, int], ThreadPeer]]:
    """A ktls software-engine server that runs ``script`` on its connection."""
    server = ktls.ServerContext(
        certs.server_rsa,
        minimum_version=version,
        maximum_version=version,
        ciphers=[
            "TLS_AES_128_GCM_SHA256" if version == "TLSv1.3" else "ECDHE-RSA-AES128-GCM-SHA256"
        ],
        offload="software",
    )
    with server.listen(("127.0.0.1", 0)) as listener:

        def serve() -> object:
            tls, _ = listener.accept()
            with tls:
                return script(tls)

        yield listener.getsockname(), run_in_thread(serve)


def _client(certs: Certs, engine: str, version: str = "TLSv1.3") -> ktls.ClientContext:
    return ktls.ClientContext(
        cafile=certs.ca,
        minimum_version=version,
        maximum_version=version,
        offload=engine,  # type: ignore[arg-type]
    )


def _recv_exactly(tls: ktls.TLSSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = tls.recv(n - len(data))
        assert chunk, f"stream ended after {data!r}"
        data += chunk
    return data


@pytest.mark.parametrize("requested", [True, False], ids=["requested", "not-requested"])
def test_key_update_right_behind_data_with_a_timeout(
    certs: Certs, engine: str, requested: bool
) -> None:
    """Data, KeyUpdate and data under the new key in one write, read by a socket with a
    timeout.  On Linux 7.x poll() does not show the records the kernel already holds:
    a read that waited first would wait out the whole timeout."""

    def script(tls: ktls.TLSSocket) -> bytes:
        assert tls.recv(5) == b"ready"
        update = KU_REQUESTED if requested else KU_NOT_REQUESTED
        send_records(tls, [(DATA, b"GET"), (HANDSHAKE, update), "rekey", (DATA, b"POST")])
        return tls.recv(5)  # our answer, under our next key if asked

    with forging_server(certs, script) as (address, peer):
        tls = _client(certs, engine).connect(address, server_hostname="localhost")
        assert_engine(tls, engine)
        tls.settimeout(3)
        tls.sendall(b"ready")
        assert tls.recv(100) == b"GET"
        if not rekey_expected(engine):
            with pytest.raises(ktls.RekeyUnsupported):
                tls.recv(100)
            tls.close()
            assert peer.join() == b""  # we ended with close_notify
            return
        assert tls.recv(100) == b"POST"  # no TimeoutError: read first, wait after
        tls.sendall(b"reply")
        assert tls.tls_session.tx.generation == 0
        assert peer.join() == b"reply"
        tls.close()


@pytest.mark.parametrize(
    "fragments",
    [(2,), (1,), (1, 3)],
    ids=["18 00 | 00 01 01", "18 | 00 00 01 01", "18 | 00 00 | 01 01"],
)
def test_key_update_split_over_records(
    certs: Certs, engine: str, fragments: tuple[int, ...]
) -> None:
    """A handshake message may span records (RFC 8446 5.1), a KeyUpdate too.  The 7.x
    kernel stops reading at the first fragment (EKEYEXPIRED) as if the key changed."""
    cuts = [0, *fragments, len(KU_NOT_REQUESTED)]
    pieces: list[Record | str] = [
        (HANDSHAKE, KU_NOT_REQUESTED[a:b]) for a, b in itertools.pairwise(cuts)
    ]

    def script(tls: ktls.TLSSocket) -> bytes:
        send_records(tls, [(DATA, b"before"), *pieces, "rekey", (DATA, b"after")])
        return tls.recv(10)

    with forging_server(certs, script) as (address, peer):
        tls = _client(certs, engine).connect(address, server_hostname="localhost")
        assert_engine(tls, engine)
        assert _recv_exactly(tls, 6) == b"before"
        if not rekey_expected(engine):
            with pytest.raises(ktls.RekeyUnsupported):
                tls.recv(100)
            tls.close()
            return
        assert _recv_exactly(tls, 5) == b"after"
        assert tls.tls_session.rx.generation == 0
        if engine == "kernel":  # the kernel opens "after" with the new key, at seq 1
            info = tls.kernel_crypto_info("rx")
            assert info is not None
            assert info.rec_seq == 1
            assert info.key == next_generation(tls.tls_session.suite, tls.tls_session.rx).key
        tls.sendall(b"ok")
        assert peer.join() == b"ok"
        tls.close()


def test_ticket_fragment_that_looks_like_a_key_update(certs: Certs, engine: str) -> None:
    """The second fragment of a ticket starts with 24, the KeyUpdate type: the 7.x
    kernel flags a key change that is not one; the key must stay."""
    cut = 8  # the fragment begins with age_add, 0x18...
    assert TICKET[cut] == HandshakeType.KEY_UPDATE

    def script(tls: ktls.TLSSocket) -> bytes:
        send_records(
            tls,
            [(DATA, b"one"), (HANDSHAKE, TICKET[:cut]), (HANDSHAKE, TICKET[cut:]), (DATA, b"two")],
        )
        return tls.recv(10)

    with forging_server(certs, script) as (address, peer):
        tls = _client(certs, engine).connect(address, server_hostname="localhost")
        assert _recv_exactly(tls, 6) == b"onetwo"
        tls.sendall(b"ok")
        assert peer.join() == b"ok"
        assert tls.session is not None  # OpenSSL took the ticket
        tls.close()


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_requests_after_our_close_notify_are_not_answered(
    certs: Certs, engine: str, version: str
) -> None:
    """After shutdown(SHUT_WR) (what `ktls connect` does at end of stdin) the peer asks
    for a KeyUpdate (TLS 1.3) or renegotiation (TLS 1.2), then sends the rest: we must
    send nothing more -- our socket is closed for writing -- and read everything."""
    request = KU_REQUESTED if version == "TLSv1.3" else encode_handshake(0, b"")
    rest = os.urandom(100_000)

    def script(tls: ktls.TLSSocket) -> bytes:
        assert tls.recv(10) == b""  # our close_notify
        items: list[Record | str] = [(HANDSHAKE, request)]
        if version == "TLSv1.3":
            items.append("rekey")
        send_records(tls, items)
        tls.sendall(rest)
        return tls.socket.recv(100)  # what came after our close_notify: nothing

    with forging_server(certs, script, version) as (address, peer):
        tls = _client(certs, engine, version).connect(address, server_hostname="localhost")
        assert_engine(tls, engine)
        tls.shutdown(socket.SHUT_WR)
        if version == "TLSv1.3" and not rekey_expected(engine):
            with pytest.raises(ktls.RekeyUnsupported):
                tls.recv(100)
            tls.close()
            peer.join()
            return
        assert _recv_exactly(tls, len(rest)) == rest
        tls.close()
        assert peer.join() == b""


def test_pending_counts_only_application_data(certs: Certs, engine: str) -> None:
    """A ticket already read into user space (software engine) or hidden from poll
    (kernel) must not look like data: a select() loop would hang on it."""

    def script(tls: ktls.TLSSocket) -> bytes:
        send_records(tls, [(DATA, b"x"), (HANDSHAKE, TICKET)])
        assert tls.recv(4) == b"more"
        send_records(tls, [(DATA, b"a"), (HANDSHAKE, TICKET), (DATA, b"bc")])
        return tls.recv(10)

    with forging_server(certs, script) as (address, peer):
        tls = _client(certs, engine).connect(address, server_hostname="localhost")
        assert tls.recv(100) == b"x"
        time.sleep(0.2)  # the ticket has arrived
        assert tls.pending() == 0
        assert select.select([tls], [], [], 0.2)[0] == []
        tls.sendall(b"more")
        assert tls.recv(100) == b"a"
        deadline = time.monotonic() + 10
        while tls.pending() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tls.pending() == 2
        tls.setblocking(False)
        assert tls.recv(100) == b"bc"  # without waiting
        tls.setblocking(True)
        tls.sendall(b"done")
        assert peer.join() == b"done"
        tls.close()


def test_pending_sees_data_behind_a_key_update(certs: Certs, engine: str) -> None:
    def script(tls: ktls.TLSSocket) -> bytes:
        send_records(tls, [(DATA, b"a"), (HANDSHAKE, KU_NOT_REQUESTED), "rekey", (DATA, b"bc")])
        return tls.recv(10)

    with forging_server(certs, script) as (address, peer):
        tls = _client(certs, engine).connect(address, server_hostname="localhost")
        assert tls.recv(100) == b"a"
        time.sleep(0.2)  # everything has arrived
        if not rekey_expected(engine):
            assert tls.pending() == 0  # pending() never raises; the next recv does
            with pytest.raises(ktls.BrokenError) as info:
                tls.recv(100)
            assert isinstance(info.value.__cause__, ktls.RekeyUnsupported)
            tls.close()
            assert peer.join() == b""  # we ended with close_notify
            return
        assert tls.pending() == 2
        assert tls.recv(100) == b"bc"
        tls.sendall(b"done")
        assert peer.join() == b"done"
        tls.close()


# -- the first record and the first moments --------------------------------------------------


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_client_hello_record_version_0x0300(certs: Certs, engine: str, version: str) -> None:
    """RFC 5246 E.1 / RFC 8446 5.1: a server accepts any {03,xx} in the record that
    carries the first ClientHello (a third-party test client sends 0x0300)."""
    server = ktls.ServerContext(
        certs.server_rsa,
        minimum_version=version,
        maximum_version=version,
        offload=engine,  # type: ignore[arg-type]
    )
    with server.listen(("127.0.0.1", 0)) as listener:
        # The first record (the ClientHello) says 0x0300, as some clients send it.
        relay = TamperingRelay(listener.getsockname(), first_client_record_version=0x0300)

        def client() -> bytes:
            ctx = python_ssl_context(certs, server=False, version=version)
            raw = socket.create_connection(relay.address, timeout=30)
            with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(b"hello")
                return conn.recv(5)

        peer = run_in_thread(client)
        tls, _ = listener.accept()
        assert_engine(tls, engine)
        assert tls.recv(5) == b"hello"
        tls.sendall(b"world")
        assert peer.join() == b"world"
        tls.close()
        relay.close()


def _wait_readable(sock: socket.socket) -> None:
    assert select.select([sock], [], [], 10)[0], "the peer's FIN never came"


def test_peer_hangs_up_before_the_handshake_client(certs: Certs, engine: str) -> None:
    """The same HandshakeError on every engine; never a kernel-capability error."""
    listener = socket.create_server(("127.0.0.1", 0))
    sock = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    accepted.close()
    _wait_readable(sock)  # its FIN is here: the socket is no longer ESTABLISHED
    context = _client(certs, engine)
    with pytest.raises(ktls.HandshakeError) as info:
        context.wrap_socket(sock, "localhost")
    assert not isinstance(info.value, ktls.KernelUnsupported)
    listener.close()


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_peer_hangs_up_before_the_handshake_server(certs: Certs, engine: str, how: str) -> None:
    server = ktls.ServerContext(certs.server_rsa, offload=engine)  # type: ignore[arg-type]
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    if how == "reset":
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()
    sock, _ = listener.accept()
    _wait_readable(sock)
    expected = "closed the connection" if how == "fin" else "connection failed"
    with pytest.raises(ktls.HandshakeError, match=expected):
        server.wrap_socket(sock)
    listener.close()
