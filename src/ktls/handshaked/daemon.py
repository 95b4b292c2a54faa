"""``ktls handshaked``: the daemon.

It alone reads the private key.  It listens on TCP, does each handshake (on the
software engine: the keys stay movable), and hands the finished connection -- the
socket by SCM_RIGHTS, the hand-off value in a :mod:`.codec` message -- to one of the
workers registered on its Unix socket, round robin, then closes its own copy.  From
then on the connection lives in the worker alone: a worker that dies loses only its
own connections, and a daemon restart loses none.

Workers are admitted by the Unix socket's file mode and by SO_PEERCRED: the
connecting process's uid or gid must be on the allowed lists.  A worker that sends
anything but one HELLO is dropped; nothing a worker sends can reach a handshake.
"""

from __future__ import annotations

import array
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.serialization import Encoding

from ..context import ServerContext
from ..errors import KTLSError
from . import codec

__all__ = ["Daemon"]

log = logging.getLogger("ktls.handshaked")
_HELLO_TIMEOUT = 5.0  # seconds a worker has to say HELLO
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(eq=False)
class _Worker:
    sock: socket.socket
    name: str
    pid: int
    uid: int


class Daemon:
    """Handshakes on the TCP listener, connections to the workers."""

    def __init__(
        self,
        context: ServerContext,
        control: socket.socket,
        *,
        allowed_uids: Iterable[int] = (),
        allowed_gids: Iterable[int] = (),
        quiet: bool = False,
    ) -> None:
        if context.offload != "software":
            raise ValueError("the daemon's handshakes run on the software engine")
        self.context = context
        self.control = control
        self.allowed_uids = set(allowed_uids)
        self.allowed_gids = set(allowed_gids)
        self.quiet = quiet
        self._workers: list[_Worker] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def _say(self, text: str) -> None:
        if not self.quiet:
            log.warning("%s", text)

    # -- workers ---------------------------------------------------------------------------

    def admit_workers(self) -> None:
        """Accept workers on the control socket until stop() (run in a thread)."""
        self.control.settimeout(0.2)
        while not self._stopping.is_set():
            try:
                sock, _ = self.control.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            threading.Thread(target=self._admit, args=(sock,), daemon=True).start()

    def _admit(self, sock: socket.socket) -> None:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        if uid not in self.allowed_uids and gid not in self.allowed_gids:
            self._say(f"refused a worker: pid {pid} uid {uid} gid {gid} is not allowed")
            sock.close()
            return
        try:
            sock.settimeout(_HELLO_TIMEOUT)
            hello = codec.decode(sock.recv(codec.MAX_MESSAGE))
            if not isinstance(hello, codec.Hello):
                raise codec.MessageError("the first message must be HELLO")
            sock.sendall(codec.encode(codec.Welcome("ktls handshaked")))
            sock.settimeout(None)
        except (OSError, codec.MessageError) as exc:
            self._say(f"dropped a worker (pid {pid}, uid {uid}): {exc}")
            sock.close()
            return
        worker = _Worker(sock, hello.name, pid, uid)
        with self._lock:
            self._workers.append(worker)
        self._say(f"worker {hello.name!r} (pid {pid}, uid {uid}) registered")
        self._watch(worker)

    def _watch(self, worker: _Worker) -> None:
        """A worker has nothing more to say: whatever comes (its end, or anything else)
        ends its registration."""
        try:
            data = worker.sock.recv(codec.MAX_MESSAGE)
            reason = "went away" if not data else "sent a message after HELLO"
        except OSError as exc:
            reason = f"failed: {exc}"
        self._drop(worker, reason)

    def _drop(self, worker: _Worker, reason: str) -> None:
        with self._lock:
            if worker not in self._workers:
                return
            self._workers.remove(worker)
        with contextlib.suppress(OSError):
            worker.sock.shutdown(socket.SHUT_RDWR)
        self._say(f"worker {worker.name!r} (pid {worker.pid}) {reason}: dropped")

    def _pick(self) -> _Worker | None:
        with self._lock:
            if not self._workers:
                return None
            self._next = (self._next + 1) % len(self._workers)
            return self._workers[self._next]

    # -- connections -----------------------------------------------------------------------

    def serve(self, listener: socket.socket) -> None:
        """Accept TCP connections until stop(); one thread per handshake."""
        admitting = threading.Thread(target=self.admit_workers, daemon=True)
        admitting.start()
        listener.settimeout(0.2)
        while not self._stopping.is_set():
            try:
                sock, address = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            threading.Thread(target=self._connection, args=(sock, address), daemon=True).start()
        listener.close()
        admitting.join()

    def stop(self) -> None:
        self._stopping.set()

    def _connection(self, sock: socket.socket, address: tuple[str, int]) -> None:
        try:
            self._hand_over(sock, address)
        except Exception:  # a bug of ours: this connection only, and said loudly
            log.exception("%s:%s: internal error", *address[:2])
            sock.close()

    def _hand_over(self, sock: socket.socket, address: tuple[str, int]) -> None:
        peer = f"{address[0]}:{address[1]}"
        try:
            tls = self.context.wrap_socket(sock, do_handshake_on_connect=False)
            tls.do_handshake()
        except (KTLSError, OSError) as exc:
            sock.close()
            self._say(f"{peer}: handshake failed: {exc}")
            return
        certificate = tls.peer_certificate
        raw, session = tls.hand_off()
        message = codec.encode(
            codec.Connection(
                session,
                raw.getpeername()[:2],
                raw.getsockname()[:2],
                None if certificate is None else certificate.public_bytes(Encoding.DER),
            )
        )
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [raw.fileno()]))]
        try:
            while (worker := self._pick()) is not None:
                try:
                    worker.sock.sendmsg([message], fds)
                except OSError as exc:
                    self._drop(worker, f"could not take a connection ({exc})")
                    continue
                if not self.quiet:
                    self._say(f"{peer}: {session.version.label} to worker {worker.name!r}")
                return
            self._say(f"{peer}: no worker to take it: closed")
        finally:
            raw.close()  # the worker holds its own copy now (or nobody does)
