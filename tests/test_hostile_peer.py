"""One behaviour suite for both engines: what a hostile or broken peer can send.

No real TLS library sends malformed records, so the peer here is ktls's own server on
the software engine, which after an honest handshake writes forged records straight to
the TCP socket, protected with its real keys.  The engine under test must refuse each
with the alert the RFCs name, never return a byte of it, and tell the peer why: the
server reads our alert back through its own engine.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import ktls
from ktls import AlertDescription as A
from ktls import TrafficKeys
from ktls.records import encode_handshake

from .conftest import assert_engine
from .peers import Certs, run_in_thread


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
