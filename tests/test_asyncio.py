"""ktls.asyncio beyond the shared connection suite: streams, servers under load, real
clients (curl, Python ssl) and servers (openssl s_server -www), STARTTLS, sendfile,
flow control, cancellation and timeouts -- on the default event loop and on uvloop,
each on the kernel engine (in a UML kernel) and the software engine.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import socket
import ssl
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvicorn
import uvloop
from aiohttp import web

import ktls
import ktls.asyncio as kasyncio
from ktls.kernel import read_tls_stat

from .conftest import assert_engine
from .peers import Certs, io_counter, python_ssl_context

LOOPS = ["asyncio", "uvloop"]


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[Any]], Any]:
    """Runs a coroutine to the end on the loop under test: ktls's loops, which are the
    default loop and uvloop's taking ktls contexts as ``ssl=``."""
    on_uvloop = request.param == "uvloop"

    def run(coro: Awaitable[Any]) -> Any:
        loop = kasyncio.new_event_loop(uvloop=on_uvloop)
        assert isinstance(loop, uvloop.Loop) is on_uvloop
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, 120))
        finally:
            # As asyncio.run does: what is still running (a transport's close) is
            # cancelled and allowed to finish, so every socket is closed.
            async def finish() -> None:
                for _ in range(10):  # closing tasks may start others (the peer's close)
                    pending = asyncio.all_tasks() - {asyncio.current_task()}
                    if not pending:
                        return
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)

            loop.run_until_complete(finish())
            loop.close()

    return run


def _server_ctx(certs: Certs, engine: str, **kw: Any) -> ktls.ServerContext:
    return ktls.ServerContext(certs.server_ecdsa, offload=engine, **kw)  # type: ignore[arg-type]


def _client_ctx(certs: Certs, engine: str, **kw: Any) -> ktls.ClientContext:
    return ktls.ClientContext(cafile=certs.ca, offload=engine, **kw)  # type: ignore[arg-type]


async def _curl(ca: Path, port: int, path: str = "/") -> bytes:
    """``curl`` fetches https://localhost:port/path, trusting ``ca``.

    Started by Python's subprocess in a thread, never by the loop: uvloop's own process
    spawning (libuv) corrupted the child's memory inside UML 7.2 (garbled argv, "Bad
    page map", kernel panics), where Python's subprocess works."""
    argv = ["curl", "-sS", "--cacert", str(ca), "--resolve", f"localhost:{port}:127.0.0.1",
            f"https://localhost:{port}{path}"]  # fmt: skip
    done = await asyncio.to_thread(subprocess.run, argv, stdout=subprocess.PIPE, check=False)
    assert done.returncode == 0
    return done.stdout


async def _connect(
    certs: Certs, engine: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A ktls.asyncio client on ``engine`` to a local test server."""
    return await kasyncio.open_connection(
        "127.0.0.1", port, context=_client_ctx(certs, engine), server_hostname="localhost"
    )


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()


# -- streams ---------------------------------------------------------------------------------


def test_streams_echo_with_extra_info(certs: Certs, engine: str, run: Any) -> None:
    async def main() -> None:
        server = await kasyncio.start_server(
            _echo, "127.0.0.1", 0, context=_server_ctx(certs, engine)
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await _connect(certs, engine, port)
            payload = os.urandom(300_000)
            writer.write(payload)
            await writer.drain()
            assert await reader.readexactly(len(payload)) == payload
            info = writer.get_extra_info
            assert info("tx_engine") == info("rx_engine") == engine
            assert info("peername") == ("127.0.0.1", port)
            assert info("sockname") == info("socket").getsockname()
            assert isinstance(info("sslcontext"), ktls.ClientContext)
            assert info("cipher")[1] == "TLSv1.3"
            assert ("DNS", "localhost") in info("peercert")["subjectAltName"]
            assert info("tls_session").version is ktls.ProtocolVersion.TLS1_3
            assert_engine(info("ssl_object"), engine)
            writer.close()
            await writer.wait_closed()

    run(main())


def test_buffered_protocol_and_write_flow_control(certs: Certs, engine: str, run: Any) -> None:
    """A BufferedProtocol reads into its own buffer; a writer far ahead of a reader that
    paused is told pause_writing, then resume_writing once the peer reads again."""
    received = bytearray()
    events: list[str] = []
    size = 8 << 20

    class Sink(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buffer = bytearray(10_000)
            self.done = asyncio.get_running_loop().create_future()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, kasyncio.TLSTransport)
            self.transport = transport
            transport.pause_reading()  # let the sender run into flow control
            asyncio.get_running_loop().call_later(0.5, transport.resume_reading)

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buffer

        def buffer_updated(self, nbytes: int) -> None:
            received.extend(self.buffer[:nbytes])
            if len(received) >= size:
                self.done.set_result(None)

        def eof_received(self) -> bool:
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.done.done():
                self.done.set_exception(exc or ConnectionError("lost early"))

    class Source(asyncio.Protocol):
        def pause_writing(self) -> None:
            events.append("pause")

        def resume_writing(self) -> None:
            events.append("resume")

    async def main() -> None:
        sinks: list[Sink] = []

        def make_sink() -> Sink:
            sinks.append(Sink())
            return sinks[-1]

        server = await kasyncio.create_server(
            make_sink, "127.0.0.1", 0, context=_server_ctx(certs, engine)
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            transport, _ = await kasyncio.create_connection(
                Source,
                "127.0.0.1",
                port,
                context=_client_ctx(certs, engine),
                server_hostname="localhost",
            )
            payload = os.urandom(size)
            transport.write(payload)
            assert transport.get_write_buffer_size() > 0
            assert events == ["pause"]
            while not sinks:
                await asyncio.sleep(0.01)
            await sinks[0].done
            assert bytes(received[:size]) == payload
            assert events == ["pause", "resume"]
            assert transport.get_write_buffer_size() == 0
            transport.close()

    run(main())


def test_peer_close_notify_is_eof_and_alert_is_an_error(
    certs: Certs, engine: str, run: Any
) -> None:
    """close_notify from the peer: eof_received, then a clean connection_lost(None).
    A fatal alert (the peer rejects our certificate-less client): connection_lost with
    ktls's exception."""
    py_server = python_ssl_context(certs, server=True)

    def serve_once(listener: socket.socket, request_cert: bool) -> None:
        raw, _ = listener.accept()
        if request_cert:
            py_server.verify_mode = ssl.CERT_REQUIRED
            py_server.load_verify_locations(certs.ca)
        try:
            with py_server.wrap_socket(raw, server_side=True) as conn:
                conn.sendall(b"bye")
                conn.unwrap()
        except (ssl.SSLError, OSError):
            pass

    class Watcher(asyncio.Protocol):
        def __init__(self) -> None:
            self.data = b""
            self.eof = False
            self.lost = asyncio.get_running_loop().create_future()

        def data_received(self, data: bytes) -> None:
            self.data += data

        def eof_received(self) -> bool:
            self.eof = True
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost.set_result(exc)

    async def connect(port: int) -> Watcher:
        _, protocol = await kasyncio.create_connection(
            Watcher,
            "127.0.0.1",
            port,
            context=_client_ctx(certs, engine),
            server_hostname="localhost",
        )
        assert isinstance(protocol, Watcher)
        await protocol.lost
        return protocol

    for request_cert in (False, True):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            thread = threading.Thread(target=serve_once, args=(listener, request_cert))
            thread.start()
            try:
                watcher = run(connect(listener.getsockname()[1]))
            except ktls.HandshakeError:
                assert request_cert  # TLS 1.2 would fail here; 1.3 fails after
                thread.join()
                continue
            thread.join()
        if request_cert:
            error = watcher.lost.result()
            assert isinstance(error, ktls.AlertReceived)
            assert "certificate" in str(error)
        else:
            assert (watcher.data, watcher.eof, watcher.lost.result()) == (b"bye", True, None)


# -- load ------------------------------------------------------------------------------------


def test_500_concurrent_echoes(certs: Certs, engine: str, run: Any) -> None:
    """500 clients at once, each echoing 64 KiB through one server: every byte checked,
    every fd closed afterwards."""
    count, size = 500, 64 * 1024
    _raise_fd_limit(4 * count + 200)

    async def client(port: int, context: ktls.ClientContext) -> None:
        reader, writer = await kasyncio.open_connection(
            "127.0.0.1", port, context=context, server_hostname="localhost"
        )
        assert writer.get_extra_info("tx_engine") == engine
        payload = os.urandom(size)
        writer.write(payload)
        await writer.drain()
        assert await reader.readexactly(size) == payload
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        server = await kasyncio.start_server(
            _echo, "127.0.0.1", 0, context=_server_ctx(certs, engine), backlog=count
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            context = _client_ctx(certs, engine)
            await asyncio.gather(*(client(port, context) for _ in range(count)))
            # The server's side closes after the client's close_notify reached it.
            for _ in range(200):
                if not server._transports:
                    break
                await asyncio.sleep(0.05)
            assert not server._transports

    before = _open_fds()
    run(main())
    assert _open_fds() <= before


# -- real clients and servers ------------------------------------------------------------------


def test_curl_and_python_ssl_fetch_from_an_asyncio_server(
    certs: Certs, engine: str, run: Any
) -> None:
    body = os.urandom(1 << 20)

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            assert writer.get_extra_info("tx_engine") == engine
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            writer.write(head % len(body))
            writer.write(body)
            await writer.drain()
        finally:
            writer.close()

    def python_get(port: int) -> bytes:
        ctx = python_ssl_context(certs, server=False)
        data = bytearray()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=60) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as conn,
        ):
            conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            while chunk := conn.recv(1 << 16):  # ends with close_notify
                data += chunk
        return bytes(data)

    async def main() -> None:
        server = await kasyncio.start_server(
            http, "127.0.0.1", 0, context=_server_ctx(certs, engine)
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            out = await _curl(certs.ca, port)
            assert hashlib.sha256(out).digest() == hashlib.sha256(body).digest()
            reply = await asyncio.get_running_loop().run_in_executor(None, python_get, port)
            assert reply.endswith(b"\r\n\r\n" + body)

    run(main())


def test_asyncio_client_against_openssl_www(certs: Certs, engine: str, run: Any) -> None:
    proc = subprocess.Popen(
        ["openssl", "s_server", "-accept", "127.0.0.1:0", "-naccept", "1", "-www",
         "-cert", str(certs.server_rsa)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while b"ACCEPT" not in line:
            line = proc.stdout.readline()
        port = int(line.rsplit(b":", 1)[1])

        async def main() -> bytes:
            reader, writer = await kasyncio.open_connection(
                "localhost", port, context=_client_ctx(certs, engine)
            )
            assert writer.get_extra_info("rx_engine") == engine
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            page = await reader.read()  # to the server's close_notify
            writer.close()
            await writer.wait_closed()
            return page

        page = run(main())
        assert page.startswith(b"HTTP/1.0 200 ok")
        assert b"TLSv1.3" in page
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_starttls_upgrades_a_plain_connection(certs: Certs, engine: str, run: Any) -> None:
    """SMTP-style: a plain line each way, then both sides upgrade the same connection,
    ktls on one end and Python's ssl (loop.start_tls) on the other, in both roles."""

    async def upgrade(ktls_is_server: bool) -> None:
        loop = asyncio.get_running_loop()
        upgraded: asyncio.Future[bytes] = loop.create_future()

        async def plain_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert await reader.readline() == b"STARTTLS\r\n"
            if ktls_is_server:
                # Nothing may be read past this point by the plain transport: the
                # ClientHello that answers our go-ahead belongs to the TLS side.
                writer.transport.pause_reading()  # type: ignore[attr-defined]
            writer.write(b"220 go ahead\r\n")
            await writer.drain()
            if ktls_is_server:
                protocol = asyncio.StreamReaderProtocol(tls_reader := asyncio.StreamReader())
                transport = await kasyncio.start_tls(
                    writer.transport, protocol, _server_ctx(certs, engine)
                )
                assert transport.get_extra_info("tx_engine") == engine
                line = await tls_reader.readline()
                transport.write(b"secret reply\r\n")
                transport.close()
            else:
                ctx = python_ssl_context(certs, server=True)
                await writer.start_tls(ctx)  # type: ignore[attr-defined]  # (3.11+)
                line = await reader.readline()
                writer.write(b"secret reply\r\n")
                await writer.drain()
                writer.close()
            upgraded.set_result(line)

        server = await asyncio.start_server(plain_server, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"STARTTLS\r\n")
            assert await reader.readline() == b"220 go ahead\r\n"
            if ktls_is_server:
                await writer.start_tls(  # type: ignore[attr-defined]  # (3.11+)
                    python_ssl_context(certs, server=False), server_hostname="localhost"
                )
                writer.write(b"secret line\r\n")
                reply = await reader.readline()
                writer.close()
            else:
                tls_reader = asyncio.StreamReader()
                transport = await kasyncio.start_tls(
                    writer.transport,
                    asyncio.StreamReaderProtocol(tls_reader),
                    _client_ctx(certs, engine),
                    server_hostname="localhost",
                )
                assert transport.get_extra_info("rx_engine") == engine
                transport.write(b"secret line\r\n")
                reply = await tls_reader.readline()
                transport.close()
            assert reply == b"secret reply\r\n"
            assert await upgraded == b"secret line\r\n"

    async def main() -> None:
        for ktls_is_server in (True, False):
            await upgrade(ktls_is_server)

    run(main())


# -- files -----------------------------------------------------------------------------------


def test_sendfile_and_loop_sendfile(certs: Certs, engine: str, run: Any, tmp_path: Path) -> None:
    """ktls.asyncio.sendfile (os.sendfile on the kernel engine) and the loop's own
    loop.sendfile (on ktls's loops: the same path) deliver the same bytes."""
    path = tmp_path / "file"
    path.write_bytes(os.urandom(6 * 1024 * 1024 + 777))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    digests: list[str] = []

    async def hash_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        try:
            while chunk := await reader.read(1 << 16):
                digest.update(chunk)
            digests.append(digest.hexdigest())
        finally:
            writer.close()

    async def main() -> None:
        server = await kasyncio.start_server(
            hash_all, "127.0.0.1", 0, context=_server_ctx(certs, engine)
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            for how in ("ktls", "loop"):
                _, writer = await _connect(certs, engine, port)
                with path.open("rb") as f:
                    if how == "ktls":
                        sent = await kasyncio.sendfile(writer, f)
                    else:  # ktls's loops route it to the transport (uvloop's too)
                        sent = await asyncio.get_running_loop().sendfile(writer.transport, f)
                    assert sent == path.stat().st_size
                    assert f.tell() == sent
                writer.close()
                await writer.wait_closed()
            for _ in range(100):
                if len(digests) == 2:
                    break
                await asyncio.sleep(0.05)

    run(main())
    assert digests == [expected, expected]


@pytest.mark.kernel
def test_asyncio_sendfile_is_sendfile_on_the_kernel(certs: Certs, run: Any, tmp_path: Path) -> None:
    """From the kernel's side: the loop's thread wrote the file's bytes by sendfile(2)
    (wchar grows by the size with almost no read() calls), and the kernel built the
    records (TlsTxSw stays at one per connection setup, not one per record)."""
    size = 4 * 1024 * 1024 + 5
    path = tmp_path / "file"
    path.write_bytes(os.urandom(size))

    async def drain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(1 << 16):
                pass
        finally:  # (also when the test's end cancels this task)
            writer.close()

    async def main() -> tuple[int, int]:
        server = await kasyncio.start_server(
            drain, "127.0.0.1", 0, context=_server_ctx(certs, "kernel")
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            _, writer = await _connect(certs, "kernel", port)
            with path.open("rb") as f:
                written = io_counter("thread-self", "wchar")
                reads = io_counter("thread-self", "syscr")
                assert await kasyncio.sendfile(writer, f) == size
                # The loop's thread is this one: its counters are the sender's.
                wrote_now = io_counter("thread-self", "wchar") - written
                result = wrote_now, io_counter("thread-self", "syscr") - reads
            writer.close()
            await writer.wait_closed()
            return result

    stats = read_tls_stat()
    wrote, reads = run(main())
    assert wrote >= size
    assert reads < 64  # the server's reads of the socket, not the file's
    after = read_tls_stat()
    assert stats is not None
    assert after is not None
    assert after["TlsTxSw"] - stats["TlsTxSw"] == 2  # both ends' TX keys: kernel records


# -- cancellation and timeouts ---------------------------------------------------------------


def test_handshake_timeout_and_cancellation_leave_nothing(
    certs: Certs, engine: str, run: Any
) -> None:
    """A server that accepts and never answers: the handshake times out with
    HandshakeError; a cancelled handshake raises CancelledError; no fd is left."""

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as silent:
            port = silent.getsockname()[1]
            context = _client_ctx(certs, engine, handshake_timeout=0.3)
            with pytest.raises(ktls.HandshakeError, match="timed out"):
                await kasyncio.open_connection(
                    "127.0.0.1", port, context=context, server_hostname="localhost"
                )
            task = asyncio.ensure_future(_connect(certs, engine, port))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    before = _open_fds()
    run(main())
    assert _open_fds() <= before


def test_server_wait_closed_waits_for_its_connections(certs: Certs, engine: str, run: Any) -> None:
    """As asyncio.Server from 3.12: wait_closed() returns once every accepted connection
    has ended; close_clients() ends them (with close_notify: the client sees EOF)."""

    async def main() -> None:
        server = await kasyncio.start_server(
            _echo, "127.0.0.1", 0, context=_server_ctx(certs, engine)
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await _connect(certs, engine, port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        server.close()
        waiting = asyncio.ensure_future(server.wait_closed())
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the connection is still up
        server.close_clients()
        await asyncio.wait_for(waiting, 5)
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()

    run(main())


def test_a_bad_client_costs_only_its_own_connection(certs: Certs, engine: str, run: Any) -> None:
    """Garbage instead of a ClientHello, and a client that connects and says nothing,
    while a good client is served."""

    async def main() -> None:
        context = _server_ctx(certs, engine, handshake_timeout=0.5)
        server = await kasyncio.start_server(_echo, "127.0.0.1", 0, context=context)
        async with server:
            port = server.sockets[0].getsockname()[1]
            garbage_r, garbage_w = await asyncio.open_connection("127.0.0.1", port)
            garbage_w.write(b"GET / HTTP/1.0\r\n\r\n" * 10)
            _silent_r, silent_w = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = await _connect(certs, engine, port)
            writer.write(b"still served")
            assert await reader.readexactly(12) == b"still served"
            writer.close()
            await writer.wait_closed()
            assert await garbage_r.read() == b""  # dropped (after an alert at most)
            garbage_w.close()
            await asyncio.sleep(0.8)  # past the handshake timeout: the silent one is dropped
            assert len(server._handshakes) == 0
            silent_w.close()

    run(main())


def test_cancelled_drain_and_sendfile_are_clean(
    certs: Certs, engine: str, run: Any, tmp_path: Path
) -> None:
    """Cancel a drain() and a sendfile toward a peer that does not read: the tasks
    end, the connection closes, and no fd is left."""
    path = tmp_path / "file"
    path.write_bytes(os.urandom(32 * 1024 * 1024))

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.sleep(3)  # reads nothing
        finally:
            writer.close()

    async def main() -> None:
        server = await kasyncio.start_server(
            stall, "127.0.0.1", 0, context=_server_ctx(certs, engine)
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            for how in ("drain", "sendfile"):
                _, writer = await _connect(certs, engine, port)
                task: asyncio.Future[Any]
                with path.open("rb") as f:
                    if how == "drain":
                        writer.write(f.read())
                        task = asyncio.ensure_future(writer.drain())
                    else:
                        task = asyncio.ensure_future(kasyncio.sendfile(writer, f))
                    await asyncio.sleep(0.3)
                    assert not task.done()
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                writer.transport.abort()
                await asyncio.sleep(0)
            server.abort_clients()

    before = _open_fds()
    run(main())
    assert _open_fds() <= before


# -- frameworks, unchanged -------------------------------------------------------------------


def test_aiohttp_app_on_ktls(certs: Certs, engine: str, run: Any) -> None:
    """An aiohttp web app whose TCPSite gets a ktls context as ssl_context, fetched by
    curl: aiohttp calls loop.create_server(ssl=...) and the loop routes it to ktls."""

    async def hello(request: web.Request) -> web.Response:
        transport = request.transport
        assert transport is not None
        engines = f"{transport.get_extra_info('tx_engine')}/{transport.get_extra_info('rx_engine')}"
        return web.Response(text=f"{request.scheme} {engines}")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_server_ctx(certs, engine))  # type: ignore[arg-type]
        await site.start()
        try:
            server: Any = site._server  # what the loop's create_server returned
            assert isinstance(server, kasyncio.TLSServer)
            port = server.sockets[0].getsockname()[1]
            assert await _curl(certs.ca, port) == f"https {engine}/{engine}".encode()
        finally:
            await runner.cleanup()

    run(main())


class KTLSConnector(aiohttp.TCPConnector):
    """The README's recipe for aiohttp's client: its ``ssl=`` takes only an
    ssl.SSLContext, so the connector hands the loop a ktls context itself."""

    def __init__(self, context: ktls.ClientContext, **kw: Any) -> None:
        super().__init__(**kw)
        self._ktls_context = context

    def _get_ssl_context(self, req: Any) -> Any:
        return self._ktls_context if req.is_ssl() else None


def test_aiohttp_client_on_ktls(certs: Certs, engine: str, run: Any) -> None:
    """An aiohttp client request to a Python-ssl HTTPS server, on ktls's loop."""
    body = os.urandom(200_000)

    def serve_once(listener: socket.socket) -> None:
        raw, _ = listener.accept()
        ctx = python_ssl_context(certs, server=True)
        with ctx.wrap_socket(raw, server_side=True) as conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            conn.sendall(head % len(body) + body)
            conn.unwrap()

    engines: list[str] = []

    class Recording(KTLSConnector):  # (the test's own: which engine carried it)
        async def _wrap_create_connection(self, *args: Any, **kw: Any) -> Any:
            transport, protocol = await super()._wrap_create_connection(*args, **kw)
            engines.append(transport.get_extra_info("rx_engine"))
            return transport, protocol

    async def main(port: int) -> bytes:
        connector = Recording(_client_ctx(certs, engine))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"https://localhost:{port}/") as response,
        ):
            return await response.read()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=serve_once, args=(listener,))
        thread.start()
        received = run(main(listener.getsockname()[1]))
        thread.join(30)
    assert (received, engines) == (body, [engine])


def test_uvicorn_app_on_ktls(certs: Certs, engine: str, run: Any) -> None:
    """A uvicorn ASGI app: its Config's ssl set to a ktls context after load() (the
    recipe in the README), fetched by curl."""
    engines: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        for protocol in server.server_state.connections:
            transport = protocol.transport
            engines.append(f"{transport.get_extra_info('tx_engine')}")
        body = f"asgi over {scope['scheme']}".encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, loop="none", lifespan="off", log_level="warning"
    )
    config.load()
    config.ssl = _server_ctx(certs, engine)  # type: ignore[assignment]
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.ensure_future(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        assert await _curl(certs.ca, port) == b"asgi over https"
        server.should_exit = True
        await task

    run(main())
    assert engines == [engine]


def test_install_makes_new_loops_take_ktls_contexts() -> None:
    """install() (default loop or uvloop): asyncio.run's loop routes ktls contexts."""

    async def loop_class() -> type:
        return type(asyncio.get_running_loop())

    saved = asyncio.get_event_loop_policy()
    try:
        kasyncio.install()
        assert issubclass(asyncio.run(loop_class()), kasyncio.KTLSEventLoop)
        kasyncio.install(uvloop=True)
        made = asyncio.run(loop_class())
        assert issubclass(made, uvloop.Loop)
        assert kasyncio._Routes in made.__mro__  # the methods that route ssl=
    finally:
        asyncio.set_event_loop_policy(saved)
