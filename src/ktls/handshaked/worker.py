"""The workers' side of ``ktls handshaked``: register, then receive finished connections
as ordinary ktls sockets (no private key ever reaches this process)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

from cryptography import x509

from ..errors import ClosedError
from ..handoff import Offload
from ..tlssocket import TLSSocket
from . import codec

__all__ = ["Worker"]


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Worker:
    """A registration with the daemon listening on the Unix socket ``path``.

    ``accept()`` returns each connection the daemon hands over: a
    :class:`~ktls.TLSSocket` on the kernel engine where the kernel takes the keys (else
    software, unless ``offload="kernel"``), with the usual close_notify, alerts and
    KeyUpdate, and the message that came with it (addresses, client certificate).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, name: str = "", offload: Offload = "auto"
    ) -> None:
        self.offload: Offload = offload
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.connect(os.fspath(path))
            self._sock.sendall(codec.encode(codec.Hello(name or f"pid {os.getpid()}")))
            try:
                answer = self._sock.recv(codec.MAX_MESSAGE)
            except ConnectionResetError:
                answer = b""
            if not answer:  # (SO_PEERCRED: this uid or gid is not on its lists)
                raise ClosedError(f"ktls handshaked at {Path(path)} refused this worker")
            if not isinstance(codec.decode(answer), codec.Welcome):
                raise codec.MessageError("the daemon did not answer HELLO with WELCOME")
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        """Readable when a connection is waiting (for select/poll or an event loop)."""
        return self._sock.fileno()

    def accept(self) -> tuple[TLSSocket, codec.Connection]:
        """The next connection (blocking); ClosedError when the daemon went away."""
        self._sock.setblocking(True)
        return self._take()

    async def accept_async(self) -> tuple[TLSSocket, codec.Connection]:
        """The next connection, without blocking the event loop.  For streams on it:
        ``await ktls.asyncio.adopt_streams(tls)``."""
        loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        while True:
            try:
                return self._take()
            except BlockingIOError:
                waiter: asyncio.Future[None] = loop.create_future()
                loop.add_reader(self._sock.fileno(), _wake, waiter)
                try:
                    await waiter
                finally:
                    loop.remove_reader(self._sock.fileno())

    def _take(self) -> tuple[TLSSocket, codec.Connection]:
        data, fds, _flags, _address = socket.recv_fds(self._sock, codec.MAX_MESSAGE, 1)
        sock = socket.socket(fileno=fds[0]) if fds else None
        try:
            if not data:
                raise ClosedError("ktls handshaked closed the control connection")
            message = codec.decode(data)
            if not isinstance(message, codec.Connection) or sock is None:
                raise codec.MessageError("expected a connection with its socket")
            sock.setblocking(True)  # (the daemon's handshake left it non-blocking)
            peer = message.peer_certificate
            tls = TLSSocket.adopt(
                sock,
                message.session,
                offload=self.offload,
                peer_certificate=None if peer is None else x509.load_der_x509_certificate(peer),
            )
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        return tls, message

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
