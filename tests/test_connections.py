"""Connections against real peers: Python's ssl and openssl s_server/s_client.

Each test runs on the kernel engine (marked ``kernel``: inside a UML kernel when the
host lacks kTLS) and on the software engine, and asserts which engine carried it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import time
from pathlib import Path

import pytest

import ktls
from ktls import AlertDescription

from .aio import IOStyle
from .conftest import assert_engine, rekey_expected
from .peers import (
    Certs,
    GnuTLSServer,
    PeerProcess,
    TamperingRelay,
    echo_until_close,
    hash_until_close,
    openssl_client,
    openssl_server,
    python_ssl_context,
    python_ssl_server,
    run_in_thread,
    server_cert,
    suite_name,
)

VERSIONS = ["TLSv1.2", "TLSv1.3"]
CIPHERS = ["AES-128-GCM", "AES-256-GCM", "CHACHA20-POLY1305", "AES-128-CCM"]
CHUNK = 16 * 1024 + 100  # a little over one record
TOTAL = 6 * CHUNK


def _payload(n: int = TOTAL) -> bytes:
    return os.urandom(n)


def _lines(n_lines: int = 200) -> bytes:
    return b"".join(os.urandom(40).hex().encode() + b"\n" for _ in range(n_lines))


def _recv_exactly(tls: ktls.TLSSocket | ssl.SSLSocket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = tls.recv(n - len(data))
        assert chunk, f"stream ended after {len(data)} of {n} bytes"
        data += chunk
    return bytes(data)


def _client(
    certs: Certs, engine: str, version: str | None = None, cipher: str | None = None
) -> ktls.ClientContext:
    return ktls.ClientContext(
        cafile=certs.ca,
        ciphers=[suite_name(version, cipher)] if version and cipher else None,
        minimum_version=version or "TLSv1.2",
        maximum_version=version or "TLSv1.3",
        offload=engine,  # type: ignore[arg-type]
    )


def _server(
    certs: Certs, engine: str, version: str | None = None, cipher: str | None = None, **kw: object
) -> ktls.ServerContext:
    return ktls.ServerContext(
        server_cert(certs, version or "TLSv1.3", cipher),
        ciphers=[suite_name(version, cipher)] if version and cipher else None,
        minimum_version=version or "TLSv1.2",
        maximum_version=version or "TLSv1.3",
        offload=engine,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def _python_peer_negotiates(version: str, cipher: str) -> bool:
    # Python's ssl cannot choose TLS 1.3 suites, and OpenSSL leaves CCM out by default.
    return not (version == "TLSv1.3" and cipher == "AES-128-CCM")


MATRIX = [
    pytest.param(version, cipher, peer, id=f"{version}-{cipher}-{peer}")
    for version in VERSIONS
    for cipher in CIPHERS
    for peer in ("python", "openssl")
    if peer == "openssl" or _python_peer_negotiates(version, cipher)
]


# -- the matrix: role x version x cipher x peer x engine -----------------------------------


@pytest.mark.parametrize(("version", "cipher", "peer"), MATRIX)
def test_client_exchanges_data(
    certs: Certs, io: IOStyle, engine: str, version: str, cipher: str, peer: str
) -> None:
    context = _client(certs, engine, version, cipher)
    if peer == "python":
        server_ctx = python_ssl_context(certs, server=True, version=version, cipher=cipher)
        with python_ssl_server(server_ctx, echo_until_close) as (address, thread):
            tls = io.connect(context, address, server_hostname="localhost")
            assert_engine(tls, engine)
            assert tls.version() == version
            assert tls.tls_session.suite.openssl_name == suite_name(version, cipher)
            payload = _payload()
            for i in range(0, len(payload), CHUNK):
                tls.sendall(payload[i : i + CHUNK])
                assert _recv_exactly(tls, len(payload[i : i + CHUNK])) == payload[i : i + CHUNK]
            tls.shutdown(socket.SHUT_WR)  # our close_notify ends the peer's loop ...
            assert tls.recv(100) == b""  # ... and its close_notify ends ours
            tls.close()
            assert thread.join() == len(payload)
    else:
        with openssl_server(certs, version, cipher, "-rev") as (address, proc):
            tls = io.connect(context, address, server_hostname="localhost")
            assert_engine(tls, engine)
            lines = _lines()
            tls.sendall(lines)
            reply = _recv_exactly(tls, len(lines))
            expected = b"".join(line[::-1] + b"\n" for line in lines.splitlines())
            assert reply == expected
            tls.sendall(b"CLOSE\n")  # s_server -rev answers with close_notify
            assert tls.recv(100) == b""
            tls.close()
            proc.finish()


@pytest.mark.parametrize(("version", "cipher", "peer"), MATRIX)
def test_server_exchanges_data(
    certs: Certs, io: IOStyle, engine: str, version: str, cipher: str, peer: str
) -> None:
    context = _server(certs, engine, version, cipher)
    with io.listen(context, ("127.0.0.1", 0)) as listener:
        if peer == "python":
            payload = _payload()

            def python_client() -> bytes:
                ctx = python_ssl_context(certs, server=False, version=version, cipher=cipher)
                raw = socket.create_connection(listener.getsockname(), timeout=60)
                with ctx.wrap_socket(
                    raw, server_hostname="localhost", suppress_ragged_eofs=False
                ) as conn:
                    echoed = bytearray()
                    for i in range(0, len(payload), CHUNK):
                        conn.sendall(payload[i : i + CHUNK])
                        echoed += _recv_exactly(conn, len(payload[i : i + CHUNK]))
                    conn.unwrap()  # sends close_notify, waits for ours
                    return bytes(echoed)

            thread = run_in_thread(python_client)
            tls, _ = listener.accept()
            assert_engine(tls, engine)
            assert tls.tls_session.suite.openssl_name == suite_name(version, cipher)
            while data := tls.recv(65536):
                tls.sendall(data)
            tls.close()
            assert thread.join() == payload
        else:
            lines = _lines()
            proc = openssl_client(certs, listener.getsockname(), version, cipher, "-quiet")
            try:
                tls, _ = listener.accept()
                assert_engine(tls, engine)
                proc.write(lines)
                received = _recv_exactly(tls, len(lines))
                assert received == lines
                tls.sendall(received.upper())
                tls.close()
                proc.close_stdin()
                assert proc.finish() == 0
                assert proc.output == lines.upper()
            finally:
                proc.stop()


def test_small_reads_never_return_more_than_asked(certs: Certs, io: IOStyle, engine: str) -> None:
    server_ctx = python_ssl_context(certs, server=True)
    with python_ssl_server(server_ctx, echo_until_close) as (address, peer):
        tls = io.connect(_client(certs, engine), address, server_hostname="localhost")
        payload = _payload(3 * 16384 + 7)
        tls.sendall(payload)
        received = bytearray()
        for size in (1, 10, 16385, 3):
            data = tls.recv(size)
            assert 0 < len(data) <= size
            received += data
            if size == 1:  # the rest of that record is kept: select() would not see it
                assert tls.pending() > 0
        while len(received) < len(payload):
            data = tls.recv(1000)
            assert 0 < len(data) <= 1000
            received += data
        assert received == payload
        tls.shutdown(socket.SHUT_WR)
        assert tls.recv(10) == b""
        tls.close()
        assert peer.join() == len(payload)


def test_server_with_ecdsa_and_rsa_certificates(certs: Certs, io: IOStyle, engine: str) -> None:
    for cert in (certs.server_rsa, certs.server_ecdsa):
        context = ktls.ServerContext(cert, offload=engine)  # type: ignore[arg-type]
        with io.listen(context, ("127.0.0.1", 0)) as listener:

            def client() -> str | None:
                ctx = python_ssl_context(certs, server=False)
                raw = socket.create_connection(listener.getsockname(), timeout=60)
                with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                    conn.sendall(b"x")
                    conn.recv(1)
                    return conn.version()

            thread = run_in_thread(client)
            tls, _ = listener.accept()
            assert_engine(tls, engine)
            tls.sendall(tls.recv(1))
            tls.close()
            assert thread.join() == "TLSv1.3"


@pytest.mark.kernel
@pytest.mark.parametrize("version", VERSIONS)
def test_kernel_state_reads_back(certs: Certs, io: IOStyle, version: str) -> None:
    """getsockopt shows the keys we installed and the kernel counting records."""
    server_ctx = python_ssl_context(certs, server=True, version=version)
    with python_ssl_server(server_ctx, echo_until_close) as (address, peer):
        tls = io.connect(_client(certs, "kernel", version), address, server_hostname="localhost")
        session = tls.tls_session
        tx, rx = tls.kernel_crypto_info("tx"), tls.kernel_crypto_info("rx")
        assert tx is not None
        assert rx is not None
        assert tx.cipher is session.suite.cipher
        assert tx.version == session.version
        assert tx.rec_seq == session.tx.seq
        if io.name == "blocking":
            assert rx.rec_seq == session.rx.seq
        else:  # a transport reads at once: TLS 1.3 tickets may be in already
            assert rx.rec_seq >= session.rx.seq
        for _ in range(3):
            tls.sendall(b"ping")
            assert _recv_exactly(tls, 4) == b"ping"
        tx, rx = tls.kernel_crypto_info("tx"), tls.kernel_crypto_info("rx")
        assert tx is not None
        assert rx is not None
        assert tx.rec_seq == session.tx.seq + 3
        assert rx.rec_seq >= session.rx.seq + 3  # TLS 1.3: plus the tickets
        tls.shutdown(socket.SHUT_WR)
        tls.recv(1)
        tls.close()
        peer.join()


# -- sendfile ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_sendfile_large_file(
    certs: Certs, io: IOStyle, engine: str, version: str, tmp_path: Path
) -> None:
    size = 8 * 1024 * 1024 + 12345
    path = tmp_path / "big"
    path.write_bytes(os.urandom(size))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()

    server_ctx = python_ssl_context(certs, server=True, version=version)
    with python_ssl_server(server_ctx, hash_until_close) as (address, thread):
        tls = io.connect(_client(certs, engine, version), address, server_hostname="localhost")
        assert_engine(tls, engine)
        with path.open("rb") as f:
            assert tls.sendfile(f) == size
            assert f.tell() == size
        tls.shutdown(socket.SHUT_WR)
        assert tls.recv(10) == b""
        tls.close()
        assert thread.join() == (expected, size)


def test_sendfile_offset_and_count(certs: Certs, io: IOStyle, engine: str, tmp_path: Path) -> None:
    path = tmp_path / "part"
    content = os.urandom(300_000)
    path.write_bytes(content)

    def read_all(conn: ssl.SSLSocket) -> bytes:
        data = bytearray()
        while chunk := conn.recv(1 << 16):
            data += chunk
        conn.unwrap()
        return bytes(data)

    with python_ssl_server(python_ssl_context(certs, server=True), read_all) as (address, peer):
        tls = io.connect(_client(certs, engine), address, server_hostname="localhost")
        with path.open("rb") as f:
            assert tls.sendfile(f, 1000, 200_000) == 200_000
        tls.shutdown(socket.SHUT_WR)
        tls.recv(1)
        tls.close()
        assert peer.join() == content[1000:201_000]


# -- resumption ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_client_resumes_session(certs: Certs, io: IOStyle, engine: str, version: str) -> None:
    server_ctx = python_ssl_context(certs, server=True, version=version)

    def serve_twice(listener: socket.socket) -> list[bool]:
        reused: list[bool] = []
        for _ in range(2):
            raw, _ = listener.accept()
            with server_ctx.wrap_socket(raw, server_side=True) as conn:
                conn.sendall(b"hello")  # after the tickets: the client reads past them
                assert conn.recv(5) == b"thank"
                reused.append(bool(conn.session_reused))
        return reused

    listener = socket.create_server(("127.0.0.1", 0))
    thread = run_in_thread(lambda: serve_twice(listener))
    context = _client(certs, engine, version)
    first = io.connect(context, listener.getsockname(), server_hostname="localhost")
    assert _recv_exactly(first, 5) == b"hello"
    first.sendall(b"thank")
    session = first.session
    assert not first.session_reused
    first.close()
    second = io.connect(
        context, listener.getsockname(), server_hostname="localhost", session=session
    )
    assert_engine(second, engine)
    assert second.session_reused
    assert _recv_exactly(second, 5) == b"hello"
    second.sendall(b"thank")
    second.close()
    assert thread.join() == [False, True]
    listener.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_server_resumes_session(certs: Certs, io: IOStyle, engine: str, version: str) -> None:
    context = _server(certs, engine, version)
    with io.listen(context, ("127.0.0.1", 0)) as listener:

        def client_twice() -> list[bool]:
            ctx = python_ssl_context(certs, server=False, version=version)
            reused: list[bool] = []
            session = None
            for _ in range(2):
                raw = socket.create_connection(listener.getsockname(), timeout=60)
                with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as conn:
                    conn.sendall(b"ping")
                    assert _recv_exactly(conn, 4) == b"pong"
                    session = conn.session
                    reused.append(bool(conn.session_reused))
                    conn.unwrap()
            return reused

        thread = run_in_thread(client_twice)
        for expect_reused in (False, True):
            tls, _ = listener.accept()
            assert_engine(tls, engine)
            assert tls.session_reused is expect_reused
            assert _recv_exactly(tls, 4) == b"ping"
            tls.sendall(b"pong")
            assert tls.recv(1) == b""  # the peer's close_notify
            tls.close()
        assert thread.join() == [False, True]


# -- closing, truncation, alerts, tampering ------------------------------------------------


def test_peer_close_notify_ends_stream(certs: Certs, io: IOStyle, engine: str) -> None:
    def close_first(conn: ssl.SSLSocket) -> bytes:
        conn.sendall(b"bye")
        conn.unwrap()  # close_notify, then waits for ours
        return b"ok"

    with python_ssl_server(python_ssl_context(certs, server=True), close_first) as (addr, peer):
        tls = io.connect(_client(certs, engine), addr, server_hostname="localhost")
        assert _recv_exactly(tls, 3) == b"bye"
        assert tls.recv(10) == b""
        assert tls.recv(10) == b""  # stays at end of stream
        tls.close()  # answers with our close_notify: the peer's unwrap() completes
        assert peer.join() == b"ok"


def test_truncated_stream_is_an_error(certs: Certs, io: IOStyle, engine: str) -> None:
    def cut(conn: ssl.SSLSocket) -> None:
        conn.sendall(b"partial")
        raw = socket.socket(fileno=os.dup(conn.fileno()))
        raw.shutdown(socket.SHUT_RDWR)  # TCP FIN with no close_notify
        raw.close()

    with python_ssl_server(python_ssl_context(certs, server=True), cut) as (address, peer):
        tls = io.connect(_client(certs, engine), address, server_hostname="localhost")
        assert _recv_exactly(tls, 7) == b"partial"
        with pytest.raises(ktls.TruncatedStream, match="without close_notify"):
            tls.recv(10)
        with pytest.raises(io.after_failure):
            tls.recv(10)
        tls.close()
        peer.join()


def test_tampered_record_from_peer(certs: Certs, io: IOStyle, engine: str) -> None:
    def serve(conn: ssl.SSLSocket) -> str:
        conn.sendall(b"first")
        assert conn.recv(2) == b"go"
        conn.sendall(b"second, tampered")
        try:
            conn.recv(10)
        except ssl.SSLError as exc:
            return exc.reason or str(exc)
        return "no alert"

    with python_ssl_server(python_ssl_context(certs, server=True), serve) as (address, peer):
        relay = TamperingRelay(address)
        tls = io.connect(_client(certs, engine), relay.address, server_hostname="localhost")
        assert _recv_exactly(tls, 5) == b"first"
        relay.tamper_to_client.set()
        tls.sendall(b"go")
        with pytest.raises(ktls.ProtocolViolation) as info:
            tls.recv(100)
        assert info.value.alert is AlertDescription.BAD_RECORD_MAC
        assert relay.tampered.is_set()
        with pytest.raises(io.after_failure):
            tls.recv(100)
        tls.close()
        # The peer was told why: our bad_record_mac alert reached it.
        assert "BAD_RECORD_MAC" in peer.join().upper()
        relay.close()


def test_peer_alert_after_tampering_toward_peer(certs: Certs, io: IOStyle, engine: str) -> None:
    def serve(conn: ssl.SSLSocket) -> str:
        conn.sendall(b"ready")  # the handshake is over on both sides
        try:
            conn.recv(100)
        except ssl.SSLError as exc:
            return exc.reason or str(exc)
        return "no error"

    with python_ssl_server(python_ssl_context(certs, server=True), serve) as (address, peer):
        relay = TamperingRelay(address)
        tls = io.connect(_client(certs, engine), relay.address, server_hostname="localhost")
        assert _recv_exactly(tls, 5) == b"ready"
        relay.tamper_to_server.set()
        tls.sendall(b"this record gets a flipped bit")
        with pytest.raises(ktls.AlertReceived) as info:
            tls.recv(100)
        assert info.value.alert is AlertDescription.BAD_RECORD_MAC
        assert "bad_record_mac" in str(info.value)
        tls.close()
        assert "DECRYPTION_FAILED_OR_BAD_RECORD_MAC" in peer.join().upper()
        relay.close()


# -- KeyUpdate -----------------------------------------------------------------------------


def test_key_update_started_by_us(certs: Certs, io: IOStyle, engine: str) -> None:
    def serve(conn: ssl.SSLSocket) -> int:
        return echo_until_close(conn)

    server_ctx = python_ssl_context(certs, server=True, version="TLSv1.3")
    with python_ssl_server(server_ctx, serve) as (address, peer):
        tls = io.connect(_client(certs, engine, "TLSv1.3"), address, server_hostname="localhost")
        assert_engine(tls, engine)
        tls.sendall(b"before")
        assert _recv_exactly(tls, 6) == b"before"
        if not rekey_expected(engine):
            with pytest.raises(ktls.RekeyUnsupported, match=r"6\.14"):
                tls.key_update()
            # Nothing was sent: the connection still works.
        else:
            tls.key_update(request_peer=True)
            assert tls.tls_session.tx.generation == 0  # the session value is the hand-off
        tls.sendall(b"after")
        assert _recv_exactly(tls, 5) == b"after"
        if rekey_expected(engine):
            tls.key_update(request_peer=False)
            tls.sendall(b"again")
            assert _recv_exactly(tls, 5) == b"again"
        tls.shutdown(socket.SHUT_WR)
        assert tls.recv(10) == b""
        tls.close()
        assert peer.join() == (16 if rekey_expected(engine) else 11)


def _tls_stat_delta(before: dict[str, int] | None, name: str) -> int:
    after = ktls.kernel.read_tls_stat() or {}
    return after.get(name, 0) - (before or {}).get(name, 0)


def test_our_key_update_reaches_openssl(certs: Certs, io: IOStyle, engine: str) -> None:
    """Proof from outside that we sent a KeyUpdate and then used the new keys: the
    peer's own message trace shows it, the data after it decrypts there, and on the
    kernel engine the kernel's read-back and counters show the new key in use."""
    with openssl_server(certs, "TLSv1.3", None, "-msg") as (address, proc):
        tls = io.connect(_client(certs, engine, "TLSv1.3"), address, server_hostname="localhost")
        assert_engine(tls, engine)
        proc.wait_for(rb"CIPHER is")
        tls.sendall(b"before the update\n")
        proc.wait_for(rb"before the update")
        if not rekey_expected(engine):
            with pytest.raises(ktls.RekeyUnsupported, match=r"6\.14"):
                tls.key_update(request_peer=True)
            tls.close()
            return
        ktls.capabilities()  # its probe installs keys too: not inside the counted window
        stats = ktls.kernel.read_tls_stat()
        tls.key_update(request_peer=True)
        tls.sendall(b"after the update\n")
        # s_server's trace: our KeyUpdate (update_requested) came in, before our data.
        trace = proc.wait_for(rb"after the update").string
        ours = trace.index(b"KeyUpdate")
        assert ours < trace.index(b"after the update")
        assert b"18 00 00 01 01" in trace[ours:]  # KeyUpdate, request_update = 1
        proc.write(b"answer under its new key\n")  # s_server answered with its own
        assert _recv_exactly(tls, 25) == b"answer under its new key\n"
        assert tls.key_generation == (1, 1)
        if engine == "kernel":
            session, suite = tls.tls_session, tls.tls_session.suite
            tx, rx = tls.kernel_crypto_info("tx"), tls.kernel_crypto_info("rx")
            assert tx is not None
            assert rx is not None
            assert (tx.rec_seq, rx.rec_seq) == (1, 1)  # sequence numbers restarted
            assert tx.key == ktls.session.next_generation(suite, session.tx).key
            assert rx.key == ktls.session.next_generation(suite, session.rx).key
            assert _tls_stat_delta(stats, "TlsTxRekeyOk") == 1
            assert _tls_stat_delta(stats, "TlsRxRekeyOk") == 1
        tls.close()


def test_our_key_update_reaches_gnutls(certs: Certs, io: IOStyle, engine: str) -> None:
    """GnuTLS's echo server: it can only echo what follows our KeyUpdate if it took the
    update, and we can only read the echo if we took its answer."""
    server = GnuTLSServer(certs)
    try:
        tls = io.connect(
            _client(certs, engine, "TLSv1.3"), server.address, server_hostname="localhost"
        )
        assert_engine(tls, engine)
        tls.sendall(b"one\n")  # gnutls-serv --echo answers line by line
        assert _recv_exactly(tls, 4) == b"one\n"
        if not rekey_expected(engine):
            with pytest.raises(ktls.RekeyUnsupported):
                tls.key_update(request_peer=True)
            tls.close()
            return
        for request_peer in (True, False, True):
            tls.key_update(request_peer=request_peer)
            tls.sendall(b"echo me\n")
            assert _recv_exactly(tls, 8) == b"echo me\n"
        assert tls.key_generation == (3, 2)
        tls.close()
    finally:
        server.stop()


def test_key_update_started_by_peer(certs: Certs, io: IOStyle, engine: str) -> None:
    with openssl_server(certs, "TLSv1.3", None) as (address, proc):
        tls = io.connect(_client(certs, engine, "TLSv1.3"), address, server_hostname="localhost")
        assert_engine(tls, engine)
        proc.wait_for(rb"CIPHER is")
        proc.write(b"K\n")  # s_server: KeyUpdate, update_requested
        time.sleep(1)  # s_server must read "K" alone (its output is buffered: no signal)
        # Where the kernel cannot rekey, a transport (reading at once) has ended the
        # connection by now, and the peer may be gone.
        with contextlib.suppress(BrokenPipeError):
            proc.write(b"under the new key\n")
        if rekey_expected(engine):
            assert _recv_exactly(tls, 18) == b"under the new key\n"
            tls.sendall(b"reply under our new key\n")
            proc.wait_for(rb"reply under our new key")
        else:
            with pytest.raises(ktls.RekeyUnsupported, match=r"6\.14"):
                tls.recv(100)
            with pytest.raises(io.after_failure):
                tls.recv(100)
        tls.close()


def test_key_update_started_by_peer_to_our_server(certs: Certs, io: IOStyle, engine: str) -> None:
    context = _server(certs, engine, "TLSv1.3")
    with io.listen(context, ("127.0.0.1", 0)) as listener:
        proc = openssl_client(certs, listener.getsockname(), "TLSv1.3", None)
        try:
            tls, _ = listener.accept()
            assert_engine(tls, engine)
            proc.wait_for(rb"Verify return code: 0")
            proc.write(b"K\n")  # s_client: KeyUpdate, update_requested
            time.sleep(1)
            # Where the kernel cannot rekey, a transport (reading at once) has ended the
            # connection by now, and the peer may be gone.
            with contextlib.suppress(BrokenPipeError):
                proc.write(b"under the new key\n")
            if rekey_expected(engine):
                assert _recv_exactly(tls, 18) == b"under the new key\n"
                tls.sendall(b"server reply under its new key\n")
                proc.wait_for(rb"server reply under its new key")
            else:
                with pytest.raises(ktls.RekeyUnsupported, match=r"6\.14"):
                    tls.recv(100)
            tls.close()
        finally:
            proc.stop()


def test_key_update_from_a_gnutls_client(certs: Certs, io: IOStyle, engine: str) -> None:
    """gnutls-cli's ^rekey^ (KeyUpdate, update_requested) against our server: we must
    take its new key and answer with ours before our reply, which it then decrypts."""
    context = _server(certs, engine, "TLSv1.3")
    with io.listen(context, ("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        proc = PeerProcess(
            ["--x509cafile", str(certs.ca), "-p", str(port), "--inline-commands", "localhost"],
            program="gnutls-cli",
        )
        try:
            tls, _ = listener.accept()
            assert_engine(tls, engine)
            proc.write(b"hello\n")
            assert _recv_exactly(tls, 6) == b"hello\n"
            proc.write(b"^rekey^\n")
            proc.write(b"after the update\n")
            if not rekey_expected(engine):
                with pytest.raises(ktls.RekeyUnsupported):
                    tls.recv(100)
                tls.close()
                return
            assert _recv_exactly(tls, 17) == b"after the update\n"
            tls.sendall(b"reply under our new key\n")
            proc.wait_for(rb"reply under our new key")
            assert tls.key_generation == (1, 1)
            tls.close()
        finally:
            proc.stop()


# -- renegotiation -------------------------------------------------------------------------


def test_tls12_renegotiation_is_refused(certs: Certs, io: IOStyle, engine: str) -> None:
    with openssl_server(certs, "TLSv1.2", None) as (address, proc):
        tls = io.connect(_client(certs, engine, "TLSv1.2"), address, server_hostname="localhost")
        proc.wait_for(rb"CIPHER is")
        proc.write(b"R\n")  # s_server: send HelloRequest
        time.sleep(1)
        # A blocking client reads the HelloRequest only when asked; a transport reads
        # (and refuses) at once, and s_server may be gone before this line.
        with contextlib.suppress(BrokenPipeError):
            proc.write(b"still there\n")
        # We refuse with a no_renegotiation warning.  OpenSSL as a server takes that
        # refusal as fatal: it says "no renegotiation" and ends with handshake_failure.
        received = bytearray()

        def read_until_error() -> None:
            while True:
                received.extend(tls.recv(100))

        with pytest.raises(ktls.AlertReceived) as info:
            read_until_error()
        assert info.value.alert is AlertDescription.HANDSHAKE_FAILURE
        if io.name == "blocking":
            assert received == b"still there\n"
        tls.close()
        proc.finish()
        assert b"no renegotiation" in proc.errors


# -- a peer that resets the connection while we stream -----------------------------------------


@pytest.mark.parametrize("how", ["sendfile", "sendall"])
def test_peer_reset_while_streaming_is_reported(
    certs: Certs, io: IOStyle, engine: str, how: str, tmp_path: Path
) -> None:
    """The client reads half of a 16 MiB transfer, then resets (SO_LINGER 0).  The
    kernel's TLS send path hides the reset (every later send "succeeds"); ktls must
    report it as the software engine does: BrokenError, caused by ECONNRESET/EPIPE."""
    size = 16 * 1024 * 1024
    path = tmp_path / "big"
    path.write_bytes(os.urandom(size))
    server = _server(certs, engine)
    with io.listen(server, ("127.0.0.1", 0)) as listener:

        def client() -> int:
            raw = socket.socket()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            raw.connect(listener.getsockname())
            ctx = python_ssl_context(certs, server=False)
            conn = ctx.wrap_socket(raw, server_hostname="localhost")
            received = 0
            while received < size // 2:
                received += len(conn.recv(1 << 16))
            time.sleep(0.3)  # the server is blocked for buffer space now
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            conn.close()
            return received

        def stream() -> None:  # one call: it must not end as if all went well
            if how == "sendfile":
                with path.open("rb") as f:
                    tls.sendfile(f)
            else:
                tls.sendall(path.read_bytes())

        peer = run_in_thread(client)
        tls, _ = listener.accept()
        assert_engine(tls, engine)
        # A blocking socket: the reset must arrive while the kernel waits in a send call.
        streamer = run_in_thread(stream)
        with pytest.raises(ktls.BrokenError, match="the peer is gone") as info:
            streamer.join(60)
        assert isinstance(info.value.__cause__, (ConnectionResetError, BrokenPipeError))
        with pytest.raises(ktls.BrokenError):  # and it stays broken
            tls.sendall(b"more")
        tls.close()
        assert peer.join() >= size // 2


@pytest.mark.kernel
def test_kernel_sendfile_is_sendfile(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's claim, checked from outside: on the kernel engine the file's bytes
    go by sendfile(2) -- the kernel counts them as written by this process (wchar in
    /proc/thread-self/io) with no read() calls -- and Python never sends them itself."""
    size = 4 * 1024 * 1024 + 99
    path = tmp_path / "file"
    path.write_bytes(os.urandom(size))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    sent_by_python: list[int] = []
    real_send = socket.socket.send

    def counting_send(sock: socket.socket, data: bytes, *args: int) -> int:
        n = real_send(sock, data, *args)
        sent_by_python.append(n)
        return n

    def io_counter(name: str) -> int:
        for line in Path("/proc/thread-self/io").read_text().splitlines():  # this thread
            key, _, value = line.partition(":")
            if key == name:
                return int(value)
        raise AssertionError(f"no {name} in /proc/thread-self/io")

    with python_ssl_server(python_ssl_context(certs, server=True), hash_until_close) as (
        address,
        peer,
    ):
        tls = _client(certs, "kernel").connect(address, server_hostname="localhost")
        assert_engine(tls, "kernel")
        monkeypatch.setattr(socket.socket, "send", counting_send)
        with path.open("rb") as f:
            written, reads = io_counter("wchar"), io_counter("syscr")
            assert tls.sendfile(f) == size
            # sendfile(2) counts as a write (socket sends do not), and no read() ran:
            # a fallback would read the file in chunks and send them.
            assert io_counter("wchar") - written >= size
            assert io_counter("syscr") - reads < 8
        assert sent_by_python == []
        monkeypatch.undo()
        tls.shutdown(socket.SHUT_WR)
        assert tls.recv(1) == b""
        tls.close()
        assert peer.join() == (expected, size)
