"""The connection suite through ``ktls.asyncio``: a blocking face on the asyncio API.

Tests written against TLSSocket's blocking calls run unchanged through the asyncio
transport: each call here runs a coroutine on an event loop in a background thread
(the default loop or uvloop).  The transport does the work; this only waits for it.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO, TypeVar

import uvloop

import ktls
import ktls.asyncio as kasyncio

_T = TypeVar("_T")
TIMEOUT = 60.0


class LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.loop = loop_factory()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = TIMEOUT) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on the loop's thread (transports are not thread-safe)."""

        async def call() -> _T:
            return fn()

        return self.run(call())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()


class Collector(asyncio.Protocol):
    """Keeps what arrives until the test asks for it; ``sendall`` waits for the
    transport's buffer to empty (write buffer limits 0: paused while anything waits)."""

    def __init__(self) -> None:
        self.transport: kasyncio.TLSTransport | None = None
        self.data = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.lost = asyncio.Event()
        self.changed = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, kasyncio.TLSTransport)
        self.transport = transport
        transport.set_write_buffer_limits(0)

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.changed.set()
        return True  # a TLS half-close: we may still send (the blocking API allows it)

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        self.eof = True
        self.lost.set()
        self.changed.set()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class AsyncioTLS:
    """What the suite uses of a TLSSocket, done through a TLSTransport."""

    def __init__(self, loop: LoopThread, transport: kasyncio.TLSTransport, protocol: Collector):
        self._loop = loop
        self.transport = transport
        self.protocol = protocol
        self._tls: ktls.TLSSocket = transport.get_extra_info("ssl_object")

    def __getattr__(self, name: str) -> Any:
        # What is negotiated (tls_session, version(), engines, session, ...) is read from
        # the connection object the transport drives.
        return getattr(self._tls, name)

    def sendall(self, data: bytes) -> None:
        async def sendall() -> None:
            self.transport.write(data)
            await self.protocol.writable.wait()
            if self.protocol.error is not None:
                raise self.protocol.error

        self._loop.run(sendall())

    def recv(self, size: int) -> bytes:
        async def recv() -> bytes:
            protocol = self.protocol
            while not protocol.data and not protocol.eof:
                protocol.changed.clear()
                await protocol.changed.wait()
            if protocol.data:
                chunk = bytes(protocol.data[:size])
                del protocol.data[:size]
                return chunk
            if protocol.error is not None:
                raise protocol.error
            return b""

        return self._loop.run(recv())

    def pending(self) -> int:
        return self._loop.call(lambda: len(self.protocol.data))

    def key_update(self, request_peer: bool = True) -> None:
        self._loop.call(lambda: self.transport.key_update(request_peer))

    def sendfile(self, file: BinaryIO, offset: int = 0, count: int | None = None) -> int:
        return self._loop.run(kasyncio.sendfile(self.transport, file, offset, count))

    def shutdown(self, how: int) -> None:
        assert how == socket.SHUT_WR, "the asyncio face has write_eof() only"
        self._loop.call(self.transport.write_eof)

    def close(self) -> None:
        async def close() -> None:
            self.transport.close()
            await self.protocol.lost.wait()

        self._loop.run(close())

    def __enter__(self) -> AsyncioTLS:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncioListener:
    """What the suite uses of a TLSListener: a ktls.asyncio server whose connections
    are handed out by ``accept()``."""

    def __init__(self, loop: LoopThread, context: ktls.ServerContext, address: Any) -> None:
        self._loop = loop
        self._accepted: queue.Queue[AsyncioTLS] = queue.Queue()

        def factory() -> asyncio.BaseProtocol:
            protocol = Collector()
            original = protocol.connection_made

            def made(transport: asyncio.BaseTransport) -> None:
                original(transport)
                assert isinstance(transport, kasyncio.TLSTransport)
                self._accepted.put(AsyncioTLS(loop, transport, protocol))

            protocol.connection_made = made  # type: ignore[method-assign]
            return protocol

        self.server = loop.run(
            kasyncio.create_server(factory, address[0], address[1], context=context)
        )

    def getsockname(self) -> tuple[str, int]:
        name: tuple[str, int] = self.server.sockets[0].getsockname()[:2]
        return name

    def accept(self) -> tuple[AsyncioTLS, Any]:
        tls = self._accepted.get(timeout=TIMEOUT)
        return tls, tls.transport.get_extra_info("peername")

    def close(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        self._loop.run(close())

    def __enter__(self) -> AsyncioListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


IO_STYLES = ("blocking", "asyncio", "uvloop")


class IOStyle:
    """How a test opens connections: ``blocking`` (the contexts' own calls) or
    ``asyncio``/``uvloop`` (ktls.asyncio on that loop, behind the blocking face)."""

    def __init__(self, name: str, loop: LoopThread | None) -> None:
        self.name = name
        self._loop = loop
        # What reading raises after a failure was reported: the blocking API says the
        # connection is broken; a transport is gone and keeps its first error.
        self.after_failure: type[Exception] = ktls.BrokenError if loop is None else ktls.KTLSError

    def __repr__(self) -> str:
        return self.name

    def connect(self, context: ktls.ClientContext, address: Any, **kwargs: Any) -> Any:
        if self._loop is None:
            return context.connect(address, **kwargs)
        protocol = Collector()
        transport, _ = self._loop.run(
            kasyncio.create_connection(
                lambda: protocol, address[0], address[1], context=context, **kwargs
            )
        )
        assert isinstance(transport, kasyncio.TLSTransport)
        return AsyncioTLS(self._loop, transport, protocol)

    def listen(self, context: ktls.ServerContext, address: Any) -> Any:
        if self._loop is None:
            return context.listen(address)
        return AsyncioListener(self._loop, context, address)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        return uvloop.new_event_loop
    return asyncio.new_event_loop


@contextmanager
def io_style(name: str) -> Iterator[IOStyle]:
    if name == "blocking":
        yield IOStyle(name, None)
        return
    loop = LoopThread(loop_factory(name))
    try:
        yield IOStyle(name, loop)
    finally:
        loop.close()
