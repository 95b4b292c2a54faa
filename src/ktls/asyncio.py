"""asyncio over kernel TLS: transports, streams and servers on the same connection.

The transport is a second driver of the object the blocking API uses: every
connection is a :class:`~ktls.tlssocket.TLSSocket` in non-blocking mode, so the
handshake pump, the post-hand-off rules (close_notify, alerts, tickets, KeyUpdate) and
both record engines are exactly the blocking API's.  What this module adds is
waiting the event loop's way: the handshake and every read and write are tried, and on
``BlockingIOError`` the loop watches the fd (``add_reader`` / ``add_writer``; the
default loop and uvloop alike).

Closing takes no loop time beyond one bounded push: after the buffered data went out,
close_notify is sent (on the kernel engine with one blocking push once the socket is
writable, see :meth:`ktls.kernel.KernelTx.drain`), then the transport lingers
asynchronously until the peer's kernel has what we sent, as ``TLSSocket.close`` does.
"""

from __future__ import annotations

import asyncio
import asyncio.constants
import collections
import contextlib
import errno
import functools
import io
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, BinaryIO

from OpenSSL import SSL

from .context import ClientContext, ServerContext
from .core import Connection
from .errors import ConfigError, HandshakeError, KTLSError
from .tlssocket import TLSSocket

__all__ = [
    "KTLSEventLoop",
    "KTLSEventLoopPolicy",
    "TLSServer",
    "TLSTransport",
    "create_connection",
    "create_server",
    "handshake",
    "install",
    "new_event_loop",
    "open_connection",
    "sendfile",
    "start_server",
    "start_tls",
]

log = logging.getLogger("ktls.asyncio")

# Reads per readiness callback before the loop gets a turn (data may wait in user space,
# where the fd does not show it: then the next round is scheduled, not waited for).
_READS_PER_TURN = 16
_READ_SIZE = 1 << 18  # what a plain Protocol's reads take at most (one kernel merge)
_JOIN_LIMIT = 1 << 18  # small buffered writes are joined into one send up to this
_FILE_CHUNK = 1 << 20  # bytes per sendfile call: the loop gets a turn between chunks
_ACCEPTS_PER_TURN = 100  # connections taken per readiness of a listening socket


_scratch = threading.local()


def _read_scratch() -> bytearray:
    """The read buffer of this thread's transports: each reads into it in turn and
    copies out what it got (one buffer per connection would hold 256 MB idle at a
    thousand connections)."""
    try:
        buffer: bytearray = _scratch.buffer
    except AttributeError:
        buffer = _scratch.buffer = bytearray(_READ_SIZE)
    return buffer


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, writing: bool) -> None:
    """Wait until ``fd`` is readable (or writable)."""
    waiter = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    if writing:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await waiter
    finally:
        if writing:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def handshake(tls: TLSSocket, timeout: float | None = None) -> None:
    """Run ``tls``'s handshake without blocking the loop, within ``timeout`` seconds
    (default: the context's ``handshake_timeout``).  The socket is closed when it fails
    or is cancelled: no fd, and no half-installed keys, are left behind."""
    loop = asyncio.get_running_loop()
    if timeout is None:
        timeout = tls._handshake_timeout
    tls.settimeout(0.0)

    async def pump() -> None:
        while (writing := tls._handshake_nowait()) is not None:
            await _ready(loop, tls.fileno(), writing)

    try:
        await asyncio.wait_for(pump(), timeout)
    except asyncio.TimeoutError:
        tls._abort()
        raise HandshakeError(
            f"the handshake timed out after {timeout:g} s (handshake_timeout)"
        ) from None
    except BaseException:
        tls._abort()
        raise


class TLSTransport(asyncio.transports._FlowControlMixin):
    """An ``asyncio.Transport`` over an established :class:`TLSSocket`.

    Honours the whole Transport interface (flow control both ways, ``write_eof`` as
    close_notify, ``abort``) and ``Protocol`` as well as ``BufferedProtocol``.  A
    peer's close_notify is ``eof_received``; an alert, a tampered record or a
    truncated stream end the connection with ``connection_lost(exc)``, ``exc`` one of
    ktls's exceptions.
    """

    # asyncio's loop.sendfile() reads and writes through us (its fallback wants this
    # class's base, asyncio's own flow-control mixin, which also gives the write buffer
    # limits); ktls.asyncio.sendfile() goes through os.sendfile on the kernel engine.
    _sendfile_compatible = asyncio.constants._SendfileMode.FALLBACK
    _loop: asyncio.AbstractEventLoop  # (set by the base class)

    if TYPE_CHECKING:  # the base class's own, missing from typeshed's stub

        def _maybe_pause_protocol(self) -> None: ...
        def _maybe_resume_protocol(self) -> None: ...

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tls: TLSSocket,
        protocol: asyncio.BaseProtocol,
        context: ClientContext | ServerContext | None,
        server: TLSServer | None = None,
    ) -> None:
        super().__init__(loop=loop)  # write buffer limits: asyncio's defaults
        self._tls = tls
        self._fd = tls.fileno()
        self._protocol = protocol
        self._context = context
        self._server = server
        self._out: collections.deque[memoryview] = collections.deque()
        self._out_size = 0
        self._reading = False
        self._reading_paused = False
        self._writer_armed = False
        self._eof_wanted = False  # write_eof() called: close_notify once _out is empty
        self._eof_sent = False
        self._closing = False
        self._closed = False  # connection_lost called (or scheduled)
        self._lost_writes = 0
        self._close_task: asyncio.Task[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []  # see _writable()
        self._sending_file = False
        self._failure: BaseException | None = None  # what ended the connection
        tls.settimeout(0.0)
        tls._confine_to_one_thread()  # the loop's
        if server is not None:
            server._attach(self)

    # -- set-up --------------------------------------------------------------------------

    def _start(self) -> None:
        """Tell the protocol, then start reading (connection_made comes first)."""
        self._protocol.connection_made(self)
        if not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)
            self._loop.call_soon(self._read_ready)  # data may already wait in user space

    # -- information ---------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The usual keys (``peername``, ``sockname``, ``socket``, ``sslcontext``,
        ``ssl_object``, ``peercert``, ``cipher``, ``compression``) plus ``tx_engine``,
        ``rx_engine`` and ``tls_session``."""
        tls = self._tls
        getters: dict[str, Callable[[], Any]] = {
            "peername": tls.getpeername,
            "sockname": tls.getsockname,
            "socket": lambda: tls.socket,
            "sslcontext": lambda: self._context,
            "ssl_object": lambda: tls,
            "peercert": tls.getpeercert,
            "cipher": tls.cipher,
            "compression": lambda: None,
            "tx_engine": lambda: tls.tx_engine,
            "rx_engine": lambda: tls.rx_engine,
            "tls_session": lambda: tls.tls_session,
        }
        getter = getters.get(name)
        if getter is None:
            return super().get_extra_info(name, default)
        try:
            return getter()
        except (OSError, ValueError):  # closed socket, or nothing negotiated
            return default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def is_closing(self) -> bool:
        return self._closing

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return f"<TLSTransport {state} fd={self._fd} {self._tls!r}>"

    # -- reading -------------------------------------------------------------------------

    def is_reading(self) -> bool:
        return self._reading and not self._reading_paused

    def pause_reading(self) -> None:
        if self._closing or self._reading_paused:
            return
        self._reading_paused = True
        if self._reading:
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self._closing or not self._reading_paused:
            return
        self._reading_paused = False
        if self._reading:
            self._loop.add_reader(self._fd, self._read_ready)
            self._loop.call_soon(self._read_ready)

    def _read_ready(self) -> None:
        protocol = self._protocol
        for _ in range(_READS_PER_TURN):
            if self._closing or self._reading_paused or not self._reading:
                return
            try:
                if isinstance(protocol, asyncio.BufferedProtocol):
                    buffer = memoryview(protocol.get_buffer(-1))
                    if not buffer.nbytes:
                        raise RuntimeError("get_buffer() returned an empty buffer")
                    count = self._tls.recv_into(buffer)
                    if count:
                        protocol.buffer_updated(count)
                else:
                    scratch = _read_scratch()
                    count = self._tls.recv_into(scratch)
                    if count:
                        data = bytes(memoryview(scratch)[:count])
                        protocol.data_received(data)  # type: ignore[attr-defined]
            except BlockingIOError:
                break
            except (KTLSError, OSError) as exc:
                self._fatal_error(exc)
                return
            except BaseException as exc:  # the protocol's own failure
                self._fatal_error(exc, "protocol failed while receiving")
                if not isinstance(exc, Exception):
                    raise
                return
            if not count:
                self._eof_received()
                return
            if self._tls._poll_shows_all():
                break  # the loop's readiness tells us when to read again
        else:
            self._loop.call_soon(self._read_ready)  # more may wait: after others' turn
        # Reading may owe the peer something (a KeyUpdate answer) the socket did not
        # take at once: the writer side pushes it.
        if not self._tls._flush_nowait():
            self._arm_writer()

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            if not self._reading_paused:
                self._loop.remove_reader(self._fd)

    def _eof_received(self) -> None:
        self._stop_reading()
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        except BaseException as exc:
            self._fatal_error(exc, "protocol failed in eof_received")
            if not isinstance(exc, Exception):
                raise
            return
        if not keep_open:
            self.close()

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        if self._eof_wanted:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._sending_file:
            raise RuntimeError("unable to write: sendfile is in progress")
        if self._closed or self._closing:
            self._lost_writes += 1
            if self._lost_writes in (1, 5):  # like asyncio: say so, but not forever
                log.warning("TLSTransport.write() on a closing or closed connection")
            return
        view = memoryview(data).cast("B")
        if not view:
            return
        if not self._out:
            try:
                view = view[self._tls.send(view) :]
            except BlockingIOError:
                pass
            except (KTLSError, OSError) as exc:
                self._fatal_error(exc)
                return
            if not view:
                return
        self._out.append(memoryview(bytes(view)))  # the caller may reuse its buffer
        self._out_size += len(view)
        self._arm_writer()
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def _arm_writer(self) -> None:
        if not self._writer_armed and not self._closed:
            self._writer_armed = True
            self._loop.add_writer(self._fd, self._write_ready)

    def _disarm_writer(self) -> None:
        if self._writer_armed:
            self._writer_armed = False
            self._loop.remove_writer(self._fd)

    def _write_ready(self) -> None:
        try:
            if not self._tls._flush_nowait():
                return  # still owed: wait for room again
            while self._out:
                head = self._out[0]
                if len(self._out) > 1 and len(head) < _JOIN_LIMIT:
                    # Small writes go out together (fewer records and calls).  A retry
                    # after the software engine sealed part of the head still starts
                    # with the same bytes, as the engine requires.
                    parts = [self._out.popleft()]
                    size = len(head)
                    while self._out and size + len(self._out[0]) <= _JOIN_LIMIT:
                        size += len(self._out[0])
                        parts.append(self._out.popleft())
                    head = memoryview(b"".join(parts))
                    self._out.appendleft(head)
                sent = self._tls.send(head)
                self._out_size -= sent
                if sent == len(head):
                    self._out.popleft()
                else:
                    self._out[0] = head[sent:]
        except BlockingIOError:
            pass
        except (KTLSError, OSError) as exc:
            self._fatal_error(exc)
            return
        self._maybe_resume_protocol()
        if self._out:
            return
        self._disarm_writer()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        if self._eof_wanted and not self._eof_sent:
            self._send_eof()
        if self._closing and self._close_task is None:
            self._close_task = self._loop.create_task(self._close())

    async def _writable(self) -> None:
        """Until the socket has room (and what is buffered went out)."""
        if self._closed:
            raise self._gone()
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        self._arm_writer()
        await waiter

    async def _flushed(self) -> None:
        """Until everything written so far went to the socket."""
        while self._out:
            await self._writable()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Send close_notify once the buffered data is out (a TLS half-close: the
        peer may still send)."""
        if self._closing or self._eof_wanted:
            return
        self._eof_wanted = True
        if not self._out:
            self._send_eof()

    def _send_eof(self) -> None:
        self._eof_sent = True
        try:
            self._tls.shutdown(socket.SHUT_WR)
        except BlockingIOError:
            # close_notify waits in the engine: it leaves with the close, or now with
            # the next writable round.
            self._arm_writer()
        except (KTLSError, OSError) as exc:
            self._fatal_error(exc)

    def get_write_buffer_size(self) -> int:
        return self._out_size

    def key_update(self, request_peer: bool = True) -> None:
        """Start a TLS 1.3 KeyUpdate (see :meth:`TLSSocket.key_update`): our new keys
        apply from the next record; buffered data goes out under them."""
        self._tls.key_update(request_peer)
        if not self._tls._flush_nowait():
            self._arm_writer()

    # -- files ---------------------------------------------------------------------------

    async def sendfile(self, file: BinaryIO, offset: int = 0, count: int | None = None) -> int:
        """Send a file after what is buffered: on the kernel engine by ``os.sendfile``
        (the pages go to the kernel, no copy into Python), in chunks as the socket takes
        them.  Returns the bytes sent; the file position ends after the last one."""
        if self._closing:
            raise ConnectionResetError("the connection is closing")
        if self._sending_file:
            raise RuntimeError("sendfile is already in progress")
        self._sending_file = True
        try:
            return await self._sendfile(file, offset, count)
        finally:
            self._sending_file = False

    async def _sendfile(self, file: BinaryIO, offset: int, count: int | None) -> int:
        await self._flushed()
        try:
            file_fd = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            return await self._send_by_reading(file, offset, count)
        if count is None:
            count = max(0, os.fstat(file_fd).st_size - offset)
        position, sent = offset, 0
        try:
            while sent < count:
                asked = min(_FILE_CHUNK, count - sent)
                try:
                    chunk = self._tls.sendfile(file, position, asked)
                except BlockingIOError:  # the socket took nothing
                    await self._writable()
                    continue
                if not chunk:
                    break
                sent += chunk
                position += chunk
                if chunk < asked:  # the socket is full
                    await self._writable()
                elif sent < count:
                    await asyncio.sleep(0)  # others get a turn between chunks
        except (KTLSError, OSError) as exc:
            self._fatal_error(exc)
            raise
        file.seek(position)
        return sent

    async def _send_by_reading(self, file: BinaryIO, offset: int, count: int | None) -> int:
        """A file object without a descriptor: read it and send what it gives."""
        file.seek(offset)
        sent = 0
        while count is None or sent < count:
            data = file.read(_FILE_CHUNK if count is None else min(_FILE_CHUNK, count - sent))
            if not data:
                break
            self._out.append(memoryview(data))
            self._out_size += len(data)
            self._arm_writer()
            await self._flushed()
            sent += len(data)
        return sent

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Send what is buffered, then close_notify, then close (connection_lost(None))."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if not self._out:
            self._close_task = self._loop.create_task(self._close())
        # else _write_ready starts it once the buffer is empty

    async def _close(self) -> None:
        tls = self._tls
        core = tls._core
        try:
            if core is not None:
                deadline = time.monotonic() + tls.close_timeout
                with contextlib.suppress(asyncio.TimeoutError):  # room for close_notify
                    await asyncio.wait_for(self._writable(), tls.close_timeout)
                left = max(0.0, deadline - time.monotonic())
                if tls._say_goodbye(core, left) and core.failure is None:
                    await self._linger(core, deadline)
        except (OSError, KTLSError):
            pass  # the peer is gone: nothing left to tell it
        finally:
            self._close_task = None  # ending now: nothing to cancel
            self._finish(None)

    async def _linger(self, core: Connection, deadline: float) -> None:
        """After our close_notify, wait as ``TLSSocket._linger_waits`` says, the loop's
        way."""
        waits = self._tls._linger_waits(core, deadline)
        with contextlib.suppress(StopIteration):
            readable, seconds = next(waits)
            while True:
                if readable:
                    try:
                        await asyncio.wait_for(_ready(self._loop, self._fd, False), seconds)
                        woken = True
                    except asyncio.TimeoutError:
                        woken = False
                else:
                    await asyncio.sleep(seconds)
                    woken = True  # (a pause comes only after a wake-up)
                readable, seconds = waits.send(woken)

    def abort(self) -> None:
        """Close now: buffered data is dropped, no close_notify."""
        self._closing = True
        self._finish(None)

    def _fatal_error(self, exc: BaseException, message: str = "") -> None:
        if message:
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._closing = True
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        """Stop watching the fd, close the socket, tell the protocol (once)."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        self._disarm_writer()
        self._out.clear()
        self._out_size = 0
        self._failure = exc
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(self._gone())
        self._drain_waiters.clear()
        if self._close_task is not None and not self._loop.is_closed():
            self._close_task.cancel()
        self._tls._abort()
        if not self._loop.is_closed():  # (else a task of a finished loop is being collected)
            self._loop.call_soon(self._connection_lost, exc)
        elif self._server is not None:
            self._server._detach(self)

    def _gone(self) -> Exception:
        """What a wait on a connection that ended raises: why it ended, if it failed."""
        if isinstance(self._failure, Exception):
            return self._failure
        return ConnectionResetError("the connection is closed")

    def _connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None and not isinstance(exc, Exception):
            exc = ConnectionAbortedError(str(exc))
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._protocol = asyncio.Protocol()  # break the reference cycle
            if self._server is not None:
                self._server._detach(self)

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        if not self._closed and self._tls.fileno() >= 0:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._tls._abort()


# -- connections ---------------------------------------------------------------------------

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


async def _established(
    tls: TLSSocket,
    protocol_factory: ProtocolFactory,
    context: ClientContext | ServerContext,
    timeout: float | None,
    server: TLSServer | None = None,
) -> tuple[TLSTransport, asyncio.BaseProtocol]:
    """Handshake, then a transport for the protocol the factory makes."""
    await handshake(tls, timeout)
    protocol = protocol_factory()
    transport = TLSTransport(asyncio.get_running_loop(), tls, protocol, context, server)
    transport._start()
    return transport, protocol


async def _connect_tcp(
    host: str, port: int, local_addr: tuple[str, int] | None = None
) -> socket.socket:
    """A connected non-blocking TCP socket: each address of ``host`` in turn."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned nothing")
    errors: list[OSError] = []
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if local_addr is not None:
                sock.bind(local_addr)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"could not connect to {host}:{port}: {'; '.join(map(str, errors))}")


async def create_connection(
    protocol_factory: ProtocolFactory,
    host: str | None = None,
    port: int | None = None,
    *,
    context: ClientContext,
    server_hostname: str | None = None,
    session: SSL.Session | None = None,
    sock: socket.socket | None = None,
    local_addr: tuple[str, int] | None = None,
    handshake_timeout: float | None = None,
) -> tuple[TLSTransport, asyncio.BaseProtocol]:
    """Like ``loop.create_connection(..., ssl=...)``: connect (or take ``sock``), run
    the handshake without blocking the loop, install the record engines, and return
    ``(transport, protocol)``.  SNI and the host name check default to ``host``."""
    if sock is None:
        if host is None or port is None:
            raise ValueError("host and port are needed unless sock is given")
        sock = await _connect_tcp(host, port, local_addr)
    name = server_hostname if server_hostname is not None else host
    tls = _wrap_client(context, sock, name, session)
    return await _established(tls, protocol_factory, context, handshake_timeout)


def _wrap_client(
    context: ClientContext,
    sock: socket.socket,
    server_hostname: str | None,
    session: SSL.Session | None,
) -> TLSSocket:
    if context.check_hostname and not server_hostname:
        sock.close()
        raise ConfigError("check_hostname needs server_hostname")
    return context.wrap_socket(
        sock, server_hostname, session=session, do_handshake_on_connect=False
    )


async def start_tls(
    transport_or_sock: asyncio.BaseTransport | socket.socket,
    protocol: asyncio.BaseProtocol,
    context: ClientContext | ServerContext,
    *,
    server_hostname: str | None = None,
    session: SSL.Session | None = None,
    handshake_timeout: float | None = None,
) -> TLSTransport:
    """STARTTLS: upgrade a connected plain TCP transport (or socket) to TLS, like
    ``loop.start_tls``; ``protocol`` receives the decrypted stream, and which side is
    TLS client or server follows ``context``.

    The plain transport is taken apart: its socket moves to the new transport, so
    nothing may have been read past the point of the upgrade.  A server must call
    ``transport.pause_reading()`` *before* it writes its go-ahead ("220 Ready to start
    TLS"): else the loop may read the client's ClientHello into the plain protocol.
    (A client has nothing to fear: the server speaks TLS only after our ClientHello.)"""
    if isinstance(transport_or_sock, socket.socket):
        sock = transport_or_sock
    else:
        sock = _detach_plain(transport_or_sock)
    if isinstance(context, ClientContext):
        tls = _wrap_client(context, sock, server_hostname, session)
    else:
        tls = context.wrap_socket(sock, do_handshake_on_connect=False)
    transport, _ = await _established(tls, lambda: protocol, context, handshake_timeout)
    return transport


def _detach_plain(transport: asyncio.BaseTransport) -> socket.socket:
    """The socket of a plain asyncio TCP transport, taken out of the loop's hands: a
    duplicate fd, then the transport is aborted (its fd only)."""
    raw = transport.get_extra_info("socket")
    if raw is None:
        raise TypeError(f"{transport!r} has no socket to upgrade")
    # Duck-typed: uvloop's transports are not asyncio.Transport subclasses.
    pause_reading = getattr(transport, "pause_reading", None)
    if pause_reading is None or not hasattr(transport, "abort"):
        raise TypeError(f"{transport!r} is not a stream transport")
    pause_reading()
    sock = socket.socket(raw.family, raw.type, raw.proto, fileno=os.dup(raw.fileno()))
    transport.abort()  # closes its fd; ours goes on
    return sock


async def adopt_streams(
    tls: TLSSocket, *, limit: int = 2**16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over a connection whose handshake is done already (a
    :meth:`TLSSocket.adopt`-ed one, as a ``ktls handshaked`` worker receives it)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = TLSTransport(loop, tls, protocol, None)
    transport._start()
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def open_connection(
    host: str | None = None,
    port: int | None = None,
    *,
    context: ClientContext,
    limit: int = 2**16,
    **kwargs: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Like ``asyncio.open_connection(..., ssl=...)``, on ktls: asyncio's own
    StreamReader and StreamWriter over a :class:`TLSTransport`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(lambda: protocol, host, port, context=context, **kwargs)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


# -- servers -------------------------------------------------------------------------------


class TLSServer:
    """What :func:`create_server` returns: shaped like ``asyncio.Server`` (``close``,
    ``wait_closed``, ``serve_forever``, ``sockets``, ``async with``).

    Each accepted connection's handshake runs in its own task, bounded by the
    context's ``handshake_timeout``: a slow or hostile client holds nobody else up.
    A failed handshake is logged (debug) and costs only its own connection.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        protocol_factory: ProtocolFactory,
        context: ServerContext,
        handshake_timeout: float | None,
    ) -> None:
        self._loop = loop
        self._sockets = sockets
        self._factory = protocol_factory
        self._context = context
        self._handshake_timeout = handshake_timeout
        self._handshakes: set[asyncio.Task[None]] = set()
        self._transports: set[TLSTransport] = set()
        self._idle_waiters: list[asyncio.Future[None]] = []  # see wait_closed
        self._serving = False
        self._closed = asyncio.Event()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving or self._closed.is_set():
            return
        self._serving = True
        for listener in self._sockets:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    async def serve_forever(self) -> None:
        await self.start_serving()
        try:
            await self._closed.wait()
        finally:
            self.close()

    def _accept(self, listener: socket.socket) -> None:
        # Accepted here, in the readiness callback, not in a task awaiting sock_accept:
        # a task cancelled just after the accept would drop the new socket unclosed.
        for _ in range(_ACCEPTS_PER_TURN):
            try:
                sock, _address = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # nothing more now, or the client gave up before we took it
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # Out of descriptors or memory: stop accepting for a moment (the pending
                # clients wait in the backlog) rather than spin on a readable listener.
                log.warning("accept failed (%s): pausing 0.1 s", exc)
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(0.1, self._resume_accepting, listener)
                return
            sock.setblocking(False)
            task = self._loop.create_task(self._handshake(sock))
            self._handshakes.add(task)
            task.add_done_callback(functools.partial(self._handshake_done, sock))

    def _resume_accepting(self, listener: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def _handshake_done(self, sock: socket.socket, task: asyncio.Task[None]) -> None:
        self._handshakes.discard(task)
        if task.cancelled():  # maybe before it ran at all: the socket is still ours
            sock.close()

    async def _handshake(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self._context.wrap_socket(sock, do_handshake_on_connect=False)
        except (OSError, KTLSError) as exc:
            sock.close()
            log.debug("connection dropped before its handshake: %s", exc)
            return
        try:
            await _established(tls, self._factory, self._context, self._handshake_timeout, self)
        except (OSError, KTLSError) as exc:
            log.debug("handshake failed: %s", exc)

    def _attach(self, transport: TLSTransport) -> None:
        self._transports.add(transport)

    def _detach(self, transport: TLSTransport) -> None:
        self._transports.discard(transport)
        if not self._transports:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    def close(self) -> None:
        """Stop listening (established connections go on, as with asyncio.Server)."""
        if self._closed.is_set():
            return
        if self._serving:
            for listener in self._sockets:
                self._loop.remove_reader(listener.fileno())
        self._serving = False
        for task in self._handshakes:
            task.cancel()
        for listener in self._sockets:
            listener.close()
        self._closed.set()

    def close_clients(self) -> None:
        for transport in list(self._transports):
            transport.close()

    def abort_clients(self) -> None:
        for transport in list(self._transports):
            transport.abort()

    async def wait_closed(self) -> None:
        """Until the server is closed and every connection it accepted has ended (as
        ``asyncio.Server`` from Python 3.12; ``close_clients()`` ends them)."""
        await self._closed.wait()
        pending = list(self._handshakes)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        while self._transports:
            waiter = self._loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter

    async def __aenter__(self) -> TLSServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


def _listeners(
    host: str | Iterable[str] | None, port: int, backlog: int, reuse_port: bool
) -> list[socket.socket]:
    hosts: list[str | None]
    if host is None or host == "":
        hosts = [None]
    elif isinstance(host, str):
        hosts = [host]
    else:
        hosts = list(host)
    sockets: list[socket.socket] = []
    try:
        for name in hosts:
            for family, kind, proto, _canon, address in socket.getaddrinfo(
                name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(backlog)
                sock.setblocking(False)
                if port == 0:  # one ephemeral port for every address
                    port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def create_server(
    protocol_factory: ProtocolFactory,
    host: str | Iterable[str] | None = None,
    port: int = 0,
    *,
    context: ServerContext,
    sock: socket.socket | None = None,
    backlog: int = 100,
    reuse_port: bool = False,
    handshake_timeout: float | None = None,
    start_serving: bool = True,
) -> TLSServer:
    """Like ``loop.create_server(..., ssl=...)``, on ktls."""
    loop = asyncio.get_running_loop()
    context._ssl_context()  # settings and kernel errors now, not on the first client
    if sock is not None:
        sock.setblocking(False)
        sockets = [sock]
    else:
        sockets = _listeners(host, port, backlog, reuse_port)
    server = TLSServer(loop, sockets, protocol_factory, context, handshake_timeout)
    if start_serving:
        await server.start_serving()
    return server


async def start_server(
    client_connected_cb: Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
    ],
    host: str | Iterable[str] | None = None,
    port: int = 0,
    *,
    context: ServerContext,
    limit: int = 2**16,
    **kwargs: Any,
) -> TLSServer:
    """Like ``asyncio.start_server(..., ssl=...)``, on ktls."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.BaseProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(factory, host, port, context=context, **kwargs)


async def sendfile(
    transport_or_writer: TLSTransport | asyncio.StreamWriter,
    file: BinaryIO,
    offset: int = 0,
    count: int | None = None,
) -> int:
    """Send a file over a ktls transport (or a StreamWriter on one): by ``os.sendfile``
    on the kernel engine, read and sealed on the software engine."""
    transport = (
        transport_or_writer.transport
        if isinstance(transport_or_writer, asyncio.StreamWriter)
        else transport_or_writer
    )
    if not isinstance(transport, TLSTransport):
        raise TypeError(f"not a ktls transport: {transport!r}")
    return await transport.sendfile(file, offset, count)


# -- frameworks unchanged: loops that take ktls contexts as ssl= -----------------------------


class _Routes:
    """Event loop methods that send a ktls context given as ``ssl=`` to ktls, and
    everything else to the loop they extend.  A framework that hands its ``ssl``
    object to ``loop.create_server``/``create_connection`` (aiohttp, uvicorn, ...)
    then runs on kernel TLS without a change."""

    async def create_server(self, protocol_factory: ProtocolFactory, *args: Any, **kw: Any) -> Any:
        context = kw.get("ssl")
        if not isinstance(context, ServerContext):
            return await super().create_server(protocol_factory, *args, **kw)  # type: ignore[misc]
        host, port = _host_port(args, kw)
        return await create_server(
            protocol_factory,
            host,
            port or 0,
            context=context,
            sock=kw.get("sock"),
            backlog=kw.get("backlog", 100),
            reuse_port=bool(kw.get("reuse_port")),
            handshake_timeout=kw.get("ssl_handshake_timeout"),
            start_serving=kw.get("start_serving", True),
        )

    async def create_connection(
        self, protocol_factory: ProtocolFactory, *args: Any, **kw: Any
    ) -> Any:
        context = kw.get("ssl")
        if not isinstance(context, ClientContext):
            return await super().create_connection(protocol_factory, *args, **kw)  # type: ignore[misc]
        host, port = _host_port(args, kw)
        return await create_connection(
            protocol_factory,
            host,
            port,
            context=context,
            server_hostname=kw.get("server_hostname"),
            sock=kw.get("sock"),
            local_addr=kw.get("local_addr"),
            handshake_timeout=kw.get("ssl_handshake_timeout"),
        )

    async def start_tls(
        self, transport: asyncio.BaseTransport, protocol: asyncio.BaseProtocol, sslcontext: Any,
        **kw: Any,
    ) -> Any:  # fmt: skip
        if not isinstance(sslcontext, (ClientContext, ServerContext)):
            return await super().start_tls(transport, protocol, sslcontext, **kw)  # type: ignore[misc]
        return await start_tls(
            transport,
            protocol,
            sslcontext,
            server_hostname=kw.get("server_hostname"),
            handshake_timeout=kw.get("ssl_handshake_timeout"),
        )

    async def sendfile(
        self, transport: asyncio.BaseTransport, file: BinaryIO, *args: Any, **kw: Any
    ) -> Any:
        if not isinstance(transport, TLSTransport):
            return await super().sendfile(transport, file, *args, **kw)  # type: ignore[misc]
        offset = args[0] if args else kw.get("offset", 0)
        count = args[1] if len(args) > 1 else kw.get("count")
        return await transport.sendfile(file, offset, count)


def _host_port(args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, Any]:
    host = args[0] if args else kw.get("host")
    port = args[1] if len(args) > 1 else kw.get("port")
    return host, port


class KTLSEventLoop(_Routes, asyncio.SelectorEventLoop):  # type: ignore[misc]
    """asyncio's default (selector) loop, taking ktls contexts as ``ssl=``."""


class KTLSEventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """The default policy, making loops that take ktls contexts as ``ssl=``
    (:class:`KTLSEventLoop`, or uvloop's with ``uvloop=True``)."""

    def __init__(self, *, uvloop: bool = False) -> None:
        super().__init__()
        self._uvloop = uvloop

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return new_event_loop(uvloop=self._uvloop)


def new_event_loop(*, uvloop: bool = False) -> asyncio.AbstractEventLoop:
    """A loop that takes ktls contexts as ``ssl=``: the default kind, or with
    ``uvloop=True`` uvloop's (the optional ``uvloop`` extra).  A loop factory for
    ``asyncio.Runner(loop_factory=...)`` (``asyncio.run`` in 3.12+)."""
    if uvloop:
        return _uvloop_class()()
    return KTLSEventLoop()


@functools.cache
def _uvloop_class() -> type[asyncio.AbstractEventLoop]:
    import uvloop  # noqa: PLC0415 -- optional: only when asked for

    class KTLSUVLoop(_Routes, uvloop.Loop):  # type: ignore[misc]
        """uvloop's loop, taking ktls contexts as ``ssl=``."""

    return KTLSUVLoop


def install(*, uvloop: bool = False) -> None:
    """Make every new event loop (``asyncio.run``, frameworks' runners) one that takes
    ktls contexts as ``ssl=``."""
    asyncio.set_event_loop_policy(KTLSEventLoopPolicy(uvloop=uvloop))
