"""The blocking API under threads, timeouts, non-blocking sockets, load and slow peers.

Each test runs on both engines against a real peer (Python's ``ssl`` or a ktls server
on the software engine) and checks what users rely on: no byte lost or repeated, no
thread stuck, errors that say what happened.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import hashlib
import http.client
import http.server
import os
import select
import socket
import ssl
import termios
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ktls
from ktls.records import encode_handshake
from ktls.wire import ContentType

from .conftest import assert_engine, rekey_expected
from .peers import Certs, ThreadPeer, python_ssl_context, run_in_thread

SMALL_BUFFER = 64 * 1024


def _client(certs: Certs, engine: str, **kw: object) -> ktls.ClientContext:
    return ktls.ClientContext(cafile=certs.ca, offload=engine, **kw)  # type: ignore[arg-type]


def _small_socket() -> socket.socket:
    """A TCP socket with small buffers, so that a peer that does not read blocks us soon."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    return sock


def _connect_small(
    certs: Certs, engine: str, address: tuple[str, int], **kw: object
) -> ktls.TLSSocket:
    sock = _small_socket()
    sock.connect(address)
    return _client(certs, engine, **kw).wrap_socket(sock, "localhost")


@contextlib.contextmanager
def _reluctant_reader(
    certs: Certs, version: str | None = None
) -> Iterator[tuple[tuple[str, int], threading.Event, ThreadPeer]]:
    """A Python-ssl server that reads nothing until ``go`` is set, then reads all and
    returns (sha256, size, how it ended)."""
    go = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    ctx = python_ssl_context(certs, server=True, version=version)

    def serve() -> tuple[str, int, str]:
        raw, _ = listener.accept()
        raw.settimeout(60)
        with ctx.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False) as conn:
            go.wait(60)
            digest, total = hashlib.sha256(), 0
            try:
                while data := conn.recv(1 << 16):
                    digest.update(data)
                    total += len(data)
            except (ssl.SSLError, OSError) as exc:
                return digest.hexdigest(), total, f"{type(exc).__name__}: {exc}"
            return digest.hexdigest(), total, "close_notify"

    peer = run_in_thread(serve)
    try:
        yield listener.getsockname(), go, peer
    finally:
        go.set()
        listener.close()


# -- timeouts and non-blocking sends -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["non-blocking", "timeout"])
def test_send_that_cannot_finish_keeps_its_data(certs: Certs, engine: str, mode: str) -> None:
    """BlockingIOError / TimeoutError, never BrokenError; a retry with the same data goes
    on where the record stopped (as with ssl), and the peer gets every byte once."""
    payload = os.urandom(4 * 1024 * 1024)
    with _reluctant_reader(certs) as (address, go, peer):
        tls = _connect_small(certs, engine, address)
        assert_engine(tls, engine)
        tls.settimeout(0.0 if mode == "non-blocking" else 0.2)
        expected = BlockingIOError if mode == "non-blocking" else TimeoutError
        view = memoryview(payload)
        stalls = 0
        while view:
            try:
                view = view[tls.send(view) :]
            except expected:
                stalls += 1
                go.set()  # now the peer reads
                select.select([], [tls], [], 5)
        assert stalls > 0
        tls.settimeout(10)
        tls.close()
        digest, size, ending = peer.join()
    assert (digest, size) == (hashlib.sha256(payload).hexdigest(), len(payload))
    assert ending == "close_notify"


def test_nonblocking_sendfile_returns_what_the_socket_took(
    certs: Certs, engine: str, tmp_path: Path
) -> None:
    """Non-blocking sendfile: a short count when the socket filled (the file position
    after it), BlockingIOError only when nothing went; resumed from that position,
    the peer gets the file exactly once."""
    data = os.urandom(4 * 1024 * 1024 + 7)
    path = tmp_path / "file"
    path.write_bytes(data)
    with _reluctant_reader(certs) as (address, go, peer), path.open("rb") as f:
        tls = _connect_small(certs, engine, address)
        assert_engine(tls, engine)
        tls.setblocking(False)
        sent, short, refused = 0, 0, 0
        while sent < len(data):
            try:
                chunk = tls.sendfile(f, sent)
            except BlockingIOError:
                assert f.tell() == sent
                refused += 1
                go.set()  # now the peer reads
                select.select([], [tls], [], 5)
                continue
            assert chunk > 0
            sent += chunk
            assert f.tell() == sent
            short += sent < len(data)
        assert short > 0
        tls.setblocking(True)
        tls.close()
        digest, size, ending = peer.join()
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert ending == "close_notify"


def test_nonblocking_close_waits_for_close_notify(certs: Certs, engine: str) -> None:
    """close() on a non-blocking socket whose send buffer is full still delivers
    close_notify (within close_timeout): the peer sees a clean end, not truncation."""
    with _reluctant_reader(certs) as (address, go, peer):
        tls = _connect_small(certs, engine, address)
        tls.setblocking(False)
        chunk = os.urandom(1 << 16)
        taken = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                taken += tls.send(chunk)
        go.set()
        tls.close()
        _digest, size, ending = peer.join()
    assert size >= taken
    assert ending == "close_notify"


def test_close_after_a_send_timeout_is_bounded(certs: Certs, engine: str) -> None:
    """A send timed out (the peer does not read); close() must not wait that timeout
    again for close_notify: close_timeout bounds it."""
    with _reluctant_reader(certs) as (address, go, peer):
        tls = _connect_small(certs, engine, address)
        tls.close_timeout = 0.2
        tls.settimeout(3)
        with pytest.raises(TimeoutError):
            tls.sendall(os.urandom(8 * 1024 * 1024))
        started = time.monotonic()
        tls.close()
        assert time.monotonic() - started < 2.5  # not the 3 s socket timeout again
        go.set()
        peer.join()


def test_recv_into_checks_before_reading(certs: Certs, engine: str) -> None:
    server_ctx = python_ssl_context(certs, server=True)

    def send_hello(conn: ssl.SSLSocket) -> bytes:
        conn.sendall(b"hello")
        return conn.recv(1)

    from .peers import python_ssl_server  # noqa: PLC0415

    with python_ssl_server(server_ctx, send_hello) as (address, peer):
        tls = _client(certs, engine).connect(address, server_hostname="localhost")
        with pytest.raises(ValueError, match="buffer too small"):
            tls.recv_into(bytearray(2), 5)
        buffer = bytearray(5)
        got = 0
        while got < 5:
            got += tls.recv_into(memoryview(buffer)[got:])
        assert buffer == b"hello"  # nothing was lost to the refused call
        tls.sendall(b"!")
        peer.join()
        tls.close()


def test_huge_recv_does_not_allocate_it(certs: Certs, engine: str) -> None:
    server_ctx = python_ssl_context(certs, server=True)

    def send_some(conn: ssl.SSLSocket) -> bytes:
        conn.sendall(os.urandom(100_000))
        return conn.recv(1)

    from .peers import python_ssl_server  # noqa: PLC0415

    with python_ssl_server(server_ctx, send_some) as (address, peer):
        tls = _client(certs, engine).connect(address, server_hostname="localhost")
        tracemalloc.start()
        try:
            received = 0
            while received < 100_000:
                received += len(tls.recv(1 << 30))
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16 * 1024 * 1024, f"recv(1 GiB) allocated {peak} bytes at its peak"
        tls.sendall(b"!")
        peer.join()
        tls.close()


def test_recv_into_copies_into_the_callers_buffer_only(certs: Certs, engine: str) -> None:
    """recv_into allocates nothing per call: the kernel engine reads straight into the
    caller's buffer, the software engine opens records in a buffer it reuses."""
    payload = os.urandom(4 << 20)
    server_ctx = python_ssl_context(certs, server=True)

    def send_all(conn: ssl.SSLSocket) -> bytes:
        conn.sendall(payload)
        return conn.recv(1)

    from .peers import python_ssl_server  # noqa: PLC0415

    with python_ssl_server(server_ctx, send_all) as (address, peer):
        tls = _client(certs, engine).connect(address, server_hostname="localhost")
        assert_engine(tls, engine)
        into = memoryview(bytearray(len(payload)))
        # The first reads may size buffers: let them find plenty (a full read grows the
        # software engine's room to its bulk size, once).
        queued, deadline = array.array("i", [0]), time.monotonic() + 10
        while queued[0] < 1 << 16 and time.monotonic() < deadline:
            fcntl.ioctl(tls.fileno(), termios.FIONREAD, queued)
            time.sleep(0.01)
        received = 0
        while received < len(payload) // 4:
            received += tls.recv_into(into[received : received + (256 << 10)])
        tracemalloc.start()
        try:
            while received < len(payload):
                received += tls.recv_into(into[received : received + (256 << 10)])
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert into == payload
        assert peak < 16 * 1024, f"recv_into allocated {peak} bytes at its peak"
        tls.sendall(b"!")
        peer.join()
        tls.close()


# -- threads: a reader never waits for a writer ------------------------------------------------


@pytest.mark.parametrize("request_kind", ["key-update", "hello-request"])
def test_reader_does_not_wait_for_a_blocked_writer(
    certs: Certs, engine: str, request_kind: str
) -> None:
    """Bulk data both ways; the peer asks for something we must answer (a TLS 1.3
    KeyUpdate, or TLS 1.2 renegotiation) while it is not reading, so our writer is
    blocked in send.  The reader must go on reading -- the answer is owed, not sent by
    the reader -- and the answer goes out before our next data."""
    tls13 = request_kind == "key-update"
    size = 8 * 1024 * 1024
    theirs, ours = os.urandom(size), os.urandom(size)
    version = "TLSv1.3" if tls13 else "TLSv1.2"
    server = ktls.ServerContext(
        certs.server_rsa, minimum_version=version, maximum_version=version, offload="software"
    )
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)

    def serve() -> tuple[str, tuple[int, int]]:
        raw, _ = listener.accept()
        with server.wrap_socket(raw) as tls:
            tls.settimeout(60)
            time.sleep(0.5)  # the client's writer fills the pipe and blocks
            if tls13:
                tls.key_update(request_peer=True)
            else:  # HelloRequest, through the engine (ktls itself never renegotiates)
                assert tls._tx is not None
                tls._tx.queue_record(ContentType.HANDSHAKE, encode_handshake(0, b""))
            tls.sendall(theirs)  # while not reading
            digest = hashlib.sha256()
            while data := tls.recv(1 << 16):
                digest.update(data)
            return digest.hexdigest(), tls.key_generation

    peer = run_in_thread(serve)
    tls = _connect_small(certs, engine, listener.getsockname())
    assert_engine(tls, engine)
    received = hashlib.sha256()

    def read_all() -> int:
        total = 0
        while data := tls.recv(1 << 16):
            received.update(data)
            total += len(data)
        return total

    def write_all() -> None:
        tls.sendall(ours)
        tls.shutdown(socket.SHUT_WR)

    reader, writer = run_in_thread(read_all), run_in_thread(write_all)
    if tls13 and not rekey_expected(engine):
        # This kernel cannot take the new key: the reader still must not stall behind
        # the blocked writer; it fails at once, and the writer is woken up.
        with pytest.raises(ktls.RekeyUnsupported):
            reader.join(60)
        with pytest.raises(ktls.KTLSError):
            writer.join(60)
        tls.close()
        listener.close()
        with contextlib.suppress(ktls.KTLSError, OSError):
            peer.join()
        return
    assert reader.join(60) == size
    writer.join(60)
    assert received.hexdigest() == hashlib.sha256(theirs).hexdigest()
    digest, their_generations = peer.join()
    assert digest == hashlib.sha256(ours).hexdigest()
    if tls13:
        assert their_generations == (1, 1)  # our answer reached it, then our data
        assert tls.key_generation == (1, 1)
    tls.close()
    listener.close()


def test_context_shared_by_many_threads_from_first_use(certs: Certs, engine: str) -> None:
    """Fresh contexts, first used by many threads at once: all connect."""
    count = 24
    server = ktls.ServerContext(certs.server_ecdsa, offload=engine)  # type: ignore[arg-type]
    client = _client(certs, engine)
    errors: list[BaseException] = []
    with server.listen(("127.0.0.1", 0), do_handshake_on_connect=False) as listener:

        def handle(tls: ktls.TLSSocket) -> None:
            with tls:
                tls.sendall(tls.recv(5))

        def accept_all() -> None:
            for _ in range(count):
                tls, _ = listener.accept()
                threading.Thread(target=handle, args=(tls,), daemon=True).start()

        acceptor = run_in_thread(accept_all)
        barrier = threading.Barrier(count)

        def connect() -> None:
            barrier.wait()
            try:
                with client.connect(listener.getsockname(), server_hostname="localhost") as tls:
                    tls.sendall(b"hello")
                    assert tls.recv(5) == b"hello"
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=connect) for _ in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        acceptor.join()
    assert errors == []


# -- servers: silent clients and accept() ------------------------------------------------------


def test_accept_handshake_has_a_timeout(certs: Certs, engine: str) -> None:
    server = ktls.ServerContext(
        certs.server_rsa,
        handshake_timeout=1,
        offload=engine,  # type: ignore[arg-type]
    )
    with server.listen(("127.0.0.1", 0)) as listener:
        silent = socket.create_connection(listener.getsockname())
        with pytest.raises(ktls.HandshakeError, match=r"timed out after 1 s \(handshake_timeout\)"):
            listener.accept()
        silent.close()


def test_silent_clients_do_not_stall_a_threaded_server(certs: Certs, engine: str) -> None:
    """accept() returns at once with do_handshake_on_connect=False; each handler
    handshakes in its own thread within handshake_timeout; silent clients cost nothing
    to the others, and every handler thread ends."""
    server = ktls.ServerContext(
        certs.server_ecdsa,
        handshake_timeout=2,
        offload=engine,  # type: ignore[arg-type]
    )
    handlers: list[threading.Thread] = []
    outcomes: list[str] = []
    with server.listen(("127.0.0.1", 0), do_handshake_on_connect=False) as listener:
        stop = threading.Event()

        def handle(tls: ktls.TLSSocket) -> None:
            with tls:
                try:
                    tls.sendall(tls.recv(4))
                    outcomes.append("served")
                except ktls.HandshakeError as exc:
                    outcomes.append(str(exc))

        def serve() -> None:
            listener.socket.settimeout(0.2)
            while not stop.is_set():
                try:
                    tls, _ = listener.accept()
                except TimeoutError:
                    continue
                handler = threading.Thread(target=handle, args=(tls,), daemon=True)
                handlers.append(handler)
                handler.start()

        acceptor = run_in_thread(serve)
        silent = [socket.create_connection(listener.getsockname()) for _ in range(40)]
        client = _client(certs, engine)
        for _ in range(5):
            with client.connect(
                listener.getsockname(), server_hostname="localhost", timeout=10
            ) as tls:
                tls.sendall(b"ping")
                assert tls.recv(4) == b"ping"
        for handler in list(handlers):
            handler.join(10)
        stop.set()
        acceptor.join()
        for sock in silent:
            sock.close()
    assert not any(h.is_alive() for h in handlers)
    assert outcomes.count("served") == 5
    timed_out = [o for o in outcomes if "timed out" in o]
    assert len(timed_out) == 40


# -- closing -----------------------------------------------------------------------------------


def test_send_only_tls13_client_closes_cleanly(certs: Certs, engine: str) -> None:
    """The client never reads, so the server's tickets sit unread in its socket; close()
    takes them in first, else the kernel resets the connection and the server loses
    what it has not read yet."""
    payload = os.urandom(1024 * 1024)

    def slow_reader(conn: ssl.SSLSocket) -> tuple[str, int]:
        time.sleep(0.5)  # the client has closed by now; its data is in flight
        digest, total = hashlib.sha256(), 0
        while data := conn.recv(1 << 16):
            digest.update(data)
            total += len(data)
        return digest.hexdigest(), total

    from .peers import python_ssl_server  # noqa: PLC0415

    server_ctx = python_ssl_context(certs, server=True, version="TLSv1.3")
    with python_ssl_server(server_ctx, slow_reader) as (address, peer):
        tls = _client(certs, engine).connect(address, server_hostname="localhost")
        time.sleep(0.2)  # the tickets have arrived
        tls.sendall(payload)
        tls.close()
        assert peer.join() == (hashlib.sha256(payload).hexdigest(), len(payload))


def test_makefile_keeps_the_connection_after_close(certs: Certs, engine: str) -> None:
    from .peers import echo_until_close, python_ssl_server  # noqa: PLC0415

    with python_ssl_server(python_ssl_context(certs, server=True), echo_until_close) as (
        address,
        peer,
    ):
        tls = _client(certs, engine).connect(address, server_hostname="localhost")
        reader = tls.makefile("rb")
        tls.sendall(b"line one\nline two\n")
        tls.close()  # like http.client after a "Connection: close" reply
        assert reader.readline() == b"line one\n"
        assert reader.readline() == b"line two\n"
        assert tls.fileno() >= 0
        reader.close()  # the last file: now the connection closes (close_notify)
        assert tls.fileno() == -1
        with pytest.raises(ktls.ClosedError):
            tls.recv(1)
        assert peer.join() == 18


class _FileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_http_client_reads_a_body_after_closing_the_socket(
    certs: Certs, engine: str, tmp_path: Path
) -> None:
    """http.client closes the socket after an HTTP/1.0 reply and reads the body from
    its makefile() file: the connection must stay until that file is closed."""
    body = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "file.bin").write_bytes(body)
    ctx = python_ssl_context(certs, server=True)

    def handler(*args: Any) -> http.server.BaseHTTPRequestHandler:
        return _FileHandler(*args, directory=str(tmp_path))

    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.handle_request, daemon=True).start()
    context = _client(certs, engine)
    host, port = httpd.server_address[:2]

    class KTLSConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = context.connect((str(host), int(port)), server_hostname="localhost")

    conn = KTLSConnection(str(host), int(port))
    conn.request("GET", "/file.bin")
    response = conn.getresponse()
    assert response.will_close  # http.client has closed its socket by now
    assert response.read() == body
    conn.close()
    httpd.server_close()
