"""The blocking driver: :class:`TLSSocket`, the socket-like object applications use.

It moves bytes and nothing else: the handshake is :mod:`ktls.handoff` and
:mod:`ktls.handshake`, the rules after it are :class:`ktls.core.Connection`, the
records are the engines'.  What this module adds is waiting, threads and files:

* Timeouts.  With no timeout the socket blocks in the kernel.  With a timeout (or in
  non-blocking mode) the socket is non-blocking underneath and every call is tried
  first and waited for (``poll``) only after EAGAIN, against one deadline per call.
  Trying first matters: the kernel does not always report a record it already holds
  as readable (after a KeyUpdate, for instance), so waiting first could wait for
  nothing.
* Threads.  One thread may read while another writes.  The reader never waits for the
  sending side: what it owes the peer (a KeyUpdate answer, a no_renegotiation
  warning) goes out at once only if the sending side is free and the socket takes it
  without blocking, else before the writer's next record.  The core's state is
  guarded by a lock that is never held while waiting for I/O.
* Files.  ``makefile()`` files keep the connection open after ``close()``, as with
  ``socket`` and ``ssl`` (http.client relies on it).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import socket
import threading
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from . import handoff, sockio
from .core import Connection, Data, Event, Failed, RxKeys, SendRecord
from .errors import (
    BrokenError,
    ClosedError,
    HandshakeError,
    KernelUnsupported,
    KTLSError,
    ProtocolViolation,
    RekeyUnsupported,
    SoftwareUnsupported,
    TruncatedStream,
)
from .handshake import TicketSink
from .session import Role, Session
from .wire import AlertDescription, ContentType, ProtocolVersion

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Buffer

    from .engine import RxEngine, TxEngine
    from .linux import CryptoInfo

__all__ = ["TLSSocket"]

_T = TypeVar("_T")
# One wait while lingering: (until readable, else a plain pause; at most seconds).
_Wait = tuple[bool, float]
# What recv() reads into at most: a huge bufsize must not allocate that much.
_RECV_ROOM = 1 << 18
_NOTHING = memoryview(b"")
_NO_ROOM = memoryview(bytearray())  # a read that only takes in (pending, close)
# What close() takes in from the peer, without waiting, before it closes (tickets, a
# close_notify, data nobody will read): unread bytes would make the kernel reset the
# connection, and the peer lose what it has not read yet.
_DRAIN_LIMIT = 1 << 22
# What one peek during the handshake may see: a whole flight, certificates and all.
_HANDSHAKE_PEEK = 1 << 16


class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> bool: ...
    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...


class _Unlocked:
    """The locks of a socket only one thread uses (see _confine_to_one_thread)."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self) -> bool:
        return True

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None:
        pass


_UNLOCKED = _Unlocked()


class TLSSocket:
    """A TLS connection whose records are protected by the kernel or in software.

    Made by :class:`ktls.ClientContext` / :class:`ktls.ServerContext`; modelled on
    ``ssl.SSLSocket``.  ``tx_engine`` / ``rx_engine`` tell which engine carries each
    direction ("kernel" or "software").
    """

    #: Seconds close() may wait for close_notify to leave (the peer may not be reading).
    close_timeout: float = 1.0

    _pending: handoff.Handshake | None  # the handshake still to do
    _handshake_timeout: float | None

    def __init__(self, handshake: handoff.Handshake, *, handshake_timeout: float | None) -> None:
        self._setup(handshake.sock, handshake.conn)
        self._pending = handshake
        self._handshake_timeout = handshake_timeout

    def _setup(self, sock: socket.socket, conn: SSL.Connection | None) -> None:
        self._sock = sock
        self._pending = None
        self._handshake_timeout = None
        self._handshake_failure: KTLSError | None = None
        self._tickets: TicketSink | None = None  # TLS 1.3 client: for session
        self._conn = conn  # (None: adopted, the handshake was elsewhere)
        self._adopted_peer: x509.Certificate | None = None
        self._timeout = self._sock.gettimeout()
        self._core: Connection | None = None
        self._tx: TxEngine | None = None
        self._rx: RxEngine | None = None
        # Application data read but not yet returned: a view of the engine's storage,
        # valid until the engine reads again (which it does only once this is empty).
        self._unread = _NOTHING
        self._lock: _Lock = threading.Lock()  # the core's state; never held while waiting
        self._rx_lock: _Lock = threading.Lock()  # one reader at a time
        self._tx_lock: _Lock = threading.Lock()  # one writer at a time
        self._handshake_lock: _Lock = threading.Lock()
        self._handshake_out: memoryview | None = None  # handshake bytes not sent yet
        self._closed = False
        self._io_refs = 0  # makefile() files still open
        self._taken_in = 0  # bytes read and dropped while closing

    @classmethod
    def adopt(
        cls,
        sock: socket.socket,
        session: Session,
        *,
        offload: handoff.Offload = "auto",
        peer_certificate: x509.Certificate | None = None,
    ) -> TLSSocket:
        """A connection whose handshake another process did (``ktls handshaked``): the
        TCP socket, with nothing read or sent past the handshake, and its hand-off value
        (keys and sequence numbers as the handshake left them).  The engines are
        installed here as after a handshake of our own, and from then on it is an
        ordinary TLSSocket (close_notify, alerts, KeyUpdate); it only has no OpenSSL
        session to resume from."""
        ulp = handoff.attach(sock, offload)
        tx, rx = handoff.engines(sock, session, offload, ulp)
        self = cls.__new__(cls)
        self._setup(sock, None)
        self._tx, self._rx = tx, rx
        self._core = Connection(session)
        self._adopted_peer = peer_certificate
        return self

    def hand_off(self) -> tuple[socket.socket, Session]:
        """Give the connection to another process (``ktls handshaked`` to a worker):
        the TCP socket and the hand-off value, for :meth:`adopt` there.  Only right
        after the handshake, before any data, on the software engine both ways (keys
        in the kernel can't be moved).  This object owns nothing afterwards: closing it
        sends nothing, and the caller closes the socket once it has passed it on."""
        core = self._established()
        tx, rx = self._tx, self._rx
        assert tx is not None
        assert rx is not None
        if tx.name != "software" or rx.name != "software":
            raise ValueError("hand_off needs a connection on the software engine both ways")
        if core.has_output or tx.queued or self._unread or core.failure is not None:
            raise ValueError("hand_off only right after the handshake, before any data")
        self._closed = True
        return self._sock, core.session

    def _confine_to_one_thread(self) -> None:
        """For an event loop that owns this socket: every call comes from its thread, so
        the locks have nothing to exclude (and each real acquire costs a clock read in
        CPython 3.11, a system call where there is no vDSO, as in UML)."""
        self._lock = self._rx_lock = self._tx_lock = self._handshake_lock = _UNLOCKED

    # -- the handshake -----------------------------------------------------------------------

    def do_handshake(self) -> None:
        """Run the handshake now (it also runs on first I/O when it was not done yet).

        Bounded by the context's ``handshake_timeout``; raises HandshakeError."""
        self._established()

    def _established(self) -> Connection:
        core = self._core
        if core is not None:
            return core
        with self._handshake_lock:
            if (core := self._core) is not None:
                return core  # another thread did it
            pending = self._handshake_pending()
            timeout = self._handshake_timeout
            deadline = None if timeout is None else time.monotonic() + timeout
            self._sock.setblocking(deadline is None)
            try:
                while (writing := self._handshake_step(pending)) is not None:
                    assert deadline is not None  # a blocking socket runs it to the end
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._handshake_failed(
                            HandshakeError(
                                f"the handshake timed out after {timeout:g} s (handshake_timeout)"
                            )
                        )
                    sockio.wait_fd(self._sock.fileno(), writing, remaining)
            finally:
                self.settimeout(self._timeout)
            core = self._core
            assert core is not None
            return core

    def _handshake_pending(self) -> handoff.Handshake:
        """The handshake still to do (raises if the socket is closed or it failed)."""
        if self._closed:
            raise ClosedError("the TLS connection is closed")
        if self._handshake_failure is not None:
            raise BrokenError(f"the handshake failed: {self._handshake_failure}") from (
                self._handshake_failure
            )
        pending = self._pending
        assert pending is not None
        return pending

    def _handshake_nowait(self) -> bool | None:
        """For event loops (the socket is non-blocking): advance the handshake as far
        as it goes without waiting.  None once the connection is established, else
        what it waits for: True to write, False to read.  Raises HandshakeError."""
        if self._core is not None:
            return None
        with self._handshake_lock:
            return self._handshake_step(self._handshake_pending())

    def _handshake_step(self, pending: handoff.Handshake) -> bool | None:
        """The pump, for every I/O style: peek at what the peer sent, take out of the
        socket what the driver used (never past its last handshake record), send what
        it gives; then install the engines.  On a blocking socket it runs to the end;
        on a non-blocking one it returns what it waits for (True: to write).

        A peek sees a whole flight at once: two calls where reading each record's
        header and body took two per record."""
        driver = pending.driver
        sock = self._sock
        try:
            if self._handshake_out is None:  # first step: the ClientHello, if ours
                self._handshake_out = memoryview(driver.data_to_send())
            while True:
                out = self._handshake_out
                if out:
                    try:
                        self._handshake_out = out[sock.send(out) :]
                    except BlockingIOError:
                        return True
                    continue
                if driver.done:
                    break
                try:
                    data = sock.recv(_HANDSHAKE_PEEK, socket.MSG_PEEK)
                except BlockingIOError:
                    return False
                if not data:
                    raise HandshakeError("the peer closed the connection during the handshake")
                try:
                    used = driver.receive(data)
                except HandshakeError:
                    with contextlib.suppress(OSError):  # the alert OpenSSL owes, if it fits
                        sock.send(driver.data_to_send(), socket.MSG_DONTWAIT)
                    raise
                while used:  # already in the socket: no waiting
                    taken = len(sock.recv(used))
                    if not taken:
                        raise HandshakeError("the peer closed the connection during the handshake")
                    used -= taken
                self._handshake_out = memoryview(driver.data_to_send())
            self._core = self._installed(pending)
        except KTLSError as exc:
            self._handshake_failed(exc)
        except OSError as exc:
            self._handshake_failed(
                HandshakeError(f"connection failed during the handshake: {exc}"), exc
            )
        self._pending = None
        return None

    def _handshake_failed(self, exc: KTLSError, cause: BaseException | None = None) -> NoReturn:
        """The handshake failed for good: remember why, stop the socket, raise."""
        self._handshake_failure = exc
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if cause is not None:
            raise exc from cause
        raise exc

    def _installed(self, pending: handoff.Handshake) -> Connection:
        """The engines for the finished handshake, and the connection core over them."""
        try:
            self._tx, self._rx = handoff.install(pending)
        except (KernelUnsupported, SoftwareUnsupported):
            if pending.abort_engine is not None:
                with contextlib.suppress(OSError, KTLSError):
                    pending.abort_engine.drain(self.close_timeout)
            raise
        session = pending.driver.session
        if session.version is ProtocolVersion.TLS1_3 and session.role is Role.CLIENT:
            self._tickets = TicketSink(pending.conn, session)
        return Connection(session, tickets=self._tickets)

    # -- waiting ------------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        """When this call must give up: None never (blocking), NO_WAIT at once."""
        timeout = self._timeout
        if timeout is None:
            return None
        return sockio.NO_WAIT if timeout == 0 else time.monotonic() + timeout

    def _wait_for(self, attempt: Callable[[], _T], writing: bool, deadline: float | None) -> _T:
        """Try ``attempt``; after EAGAIN wait for the fd until ``deadline`` and retry.

        With no deadline the socket is blocking and the attempt waits in the kernel.
        """
        return sockio.retry(attempt, self._sock.fileno(), writing, deadline)

    # -- what was negotiated -----------------------------------------------------------------

    def _session(self) -> Session | None:
        core = self._core
        return None if core is None else core.session

    @property
    def tx_engine(self) -> str | None:
        """Who protects the records we send: "kernel" or "software" (None before the
        handshake)."""
        return None if self._tx is None else self._tx.name

    @property
    def rx_engine(self) -> str | None:
        """Who opens the records we receive: "kernel" or "software"."""
        return None if self._rx is None else self._rx.name

    @property
    def key_generation(self) -> tuple[int, int]:
        """(send, receive): how many TLS 1.3 KeyUpdates each direction went through."""
        core = self._core
        return (0, 0) if core is None else (core.tx_keys.generation, core.rx_keys.generation)

    @property
    def tls_session(self) -> Session:
        """The hand-off value (version, suite, keys as installed)."""
        session = self._session()
        if session is None:
            raise ValueError("the handshake has not been done yet")
        return session

    def kernel_crypto_info(self, direction: str) -> CryptoInfo | None:
        """``getsockopt`` read-back of the kernel's state for "tx" or "rx" (live
        ``rec_seq``, and keys); None when that direction runs on the software engine."""
        if direction not in ("tx", "rx"):
            raise ValueError(f"direction must be 'tx' or 'rx', not {direction!r}")
        engine = self._tx if direction == "tx" else self._rx
        if engine is None:
            raise ValueError("the handshake has not been done yet")
        return engine.crypto_info()

    def version(self) -> str | None:
        session = self._session()
        return None if session is None else session.version.label

    def cipher(self) -> tuple[str, str, int] | None:
        session = self._session()
        if session is None:
            return None
        suite = session.suite
        return suite.openssl_name, session.version.label, suite.cipher.key_len * 8

    def selected_alpn_protocol(self) -> str | None:
        session = self._session()
        return None if session is None else session.alpn

    @property
    def server_hostname(self) -> str | None:
        session = self._session()
        return None if session is None else session.server_name

    @property
    def session(self) -> SSL.Session | None:
        """OpenSSL session to resume with (``ClientContext.connect(..., session=)``).

        For TLS 1.3 it holds a ticket once one has arrived, i.e. after some reading.
        """
        if self._tickets is not None:
            self._tickets.deliver()
        return None if self._conn is None else self._conn.get_session()

    @property
    def session_reused(self) -> bool:
        session = self._session()
        return session is not None and session.resumed

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        if self._core is None:
            return None
        if self._conn is None:
            return self._adopted_peer
        return self._conn.get_peer_certificate(as_cryptography=True)

    def getpeercert(self, binary_form: bool = False) -> dict[str, Any] | bytes | None:
        """The peer's certificate: DER bytes, or a dict shaped like ``ssl``'s."""
        cert = self.peer_certificate
        if cert is None:
            return None
        if binary_form:
            return cert.public_bytes(Encoding.DER)
        return _cert_dict(cert)

    # -- plain socket things -----------------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        """Like ``socket.settimeout``; a timeout (or 0.0) makes the fd non-blocking."""
        if timeout is not None and timeout < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = timeout
        self._sock.setblocking(timeout is None)

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def getpeername(self) -> Any:
        """The peer's address, as ``socket.getpeername``."""
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        """Our address, as ``socket.getsockname``."""
        return self._sock.getsockname()

    @property
    def socket(self) -> socket.socket:
        """The underlying TCP socket (its records are TLS: don't read or write it)."""
        return self._sock

    def __enter__(self) -> TLSSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        core = self._core
        if self._closed:
            state = "closed"
        elif core is None:
            state = "handshake pending" if self._handshake_failure is None else "broken"
        else:
            state = "broken" if core.failure else "open"
        if core is None:
            return f"<TLSSocket {state}>"
        return (
            f"<TLSSocket {state} {core.session.version.label} "
            f"{core.session.suite.openssl_name} tx={self.tx_engine} rx={self.rx_engine}>"
        )

    # -- reading -----------------------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes of application data; b"" after close_notify."""
        if flags:
            raise ValueError("flags are not supported on a TLS socket")
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        buffer = memoryview(bytearray(min(bufsize, _RECV_ROOM)))
        return bytes(buffer[: self._read_into(buffer)])

    def recv_into(self, buffer: Buffer, nbytes: int = 0, flags: int = 0) -> int:
        """Read into ``buffer``: from the kernel engine straight into it, no copy."""
        if flags:
            raise ValueError("flags are not supported on a TLS socket")
        view = memoryview(buffer).cast("B")
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes > len(view):  # checked before reading, so nothing read is lost
            raise ValueError("buffer too small for requested bytes")
        return self._read_into(view[: nbytes or len(view)])

    def pending(self) -> int:
        """Bytes of application data ``recv`` can return without waiting: check this
        before waiting on the fd with select().  Control records that are already
        there (tickets, KeyUpdates) are taken in here, not counted: on Linux 7.x the
        fd does not even show them as readable."""
        core, rx = self._core, self._rx
        if self._unread or core is None or rx is None:
            return len(self._unread)
        if not self._rx_lock.acquire(blocking=False):
            return 0  # another thread is reading
        try:
            while not self._unread and core.takes_data:
                ready = rx.ready()
                if ready is not None:
                    return ready
                self._read_step(core, rx, _NO_ROOM, None, socket.MSG_DONTWAIT)
        except (KTLSError, OSError):
            return 0  # the next recv reports it
        finally:
            self._rx_lock.release()
        return len(self._unread)

    def _poll_shows_all(self) -> bool:
        """For event loops, after a read: whether everything left to read is still in
        the socket, where readiness shows it (else read again before waiting)."""
        rx = self._rx
        return not self._unread and rx is not None and not rx.held()

    def _read_into(self, view: memoryview) -> int:
        core = self._core or self._established()
        rx = self._rx
        assert rx is not None
        with self._rx_lock:
            deadline = None if self._timeout is None else self._deadline()
            while True:
                unread = self._unread
                if unread:
                    count = min(len(view), len(unread))
                    view[:count] = unread[:count]
                    self._unread = unread[count:]
                    return count
                if self._closed:
                    self._check_open()
                if core.failure is not None:
                    core.check_usable()
                if core.peer_closed or not view:
                    return 0
                count = self._read_step(core, rx, view, deadline)
                if count:
                    return count

    def _read_step(
        self,
        core: Connection,
        rx: RxEngine,
        view: memoryview,
        deadline: float | None,
        flags: int = 0,
    ) -> int:
        """One record (or run of data) from the engine through the core; return how
        much application data is in ``view`` (the rest waits in ``_unread``)."""
        events: list[Event]
        placed = 0
        try:
            if deadline is None or deadline == sockio.NO_WAIT:  # no waiting of ours
                record = rx.read_into(view, flags)
            else:
                record = self._wait_for(lambda: rx.read_into(view, flags), False, deadline)
        except ProtocolViolation as exc:
            with self._lock:
                events = [core.receive_error(exc)]
        except OSError as exc:
            if isinstance(exc, (TimeoutError, BlockingIOError)):
                raise
            with self._lock:
                events = [core.receive_error(_read_failure(exc))]
        else:
            if record is None:
                with self._lock:
                    events = core.receive_eof()
            else:
                content_type, payload = record
                if content_type is ContentType.APPLICATION_DATA and core.takes_data:
                    # The core's own test that data concerns nobody but the caller:
                    # the common case goes by without the lock (one less per call).
                    if isinstance(payload, int):  # the engine put it in place
                        return payload
                    return self._place(view, payload)
                if isinstance(payload, int):
                    placed, payload = payload, view[:payload]
                with self._lock:
                    events = core.receive_record(content_type, payload)
        for event in events:
            if isinstance(event, Data):
                placed = placed or self._place(view, event.data)
            elif isinstance(event, RxKeys):
                try:
                    rx.rekey(event.keys)
                except KernelUnsupported as exc:
                    # We cannot read what follows: end politely rather than hang or misread.
                    with self._lock:
                        failed = core.fail(exc, AlertDescription.CLOSE_NOTIFY)
                    self._broken(core, failed)
            elif isinstance(event, Failed):
                self._broken(core, event)
            # PeerClosed: the core knows; the next read returns b"".
        if core.has_output:
            self._answer_without_waiting(core)
        return placed

    def _place(self, view: memoryview, data: bytes | memoryview) -> int:
        """Copy what fits of ``data`` into ``view``; keep the rest for the next read."""
        placed = min(len(view), len(data))
        if placed:
            view[:placed] = data[:placed]
        self._unread = memoryview(data)[placed:]
        return placed

    def _answer_without_waiting(self, core: Connection) -> None:
        """Send what the reader owes the peer, only if that needs no waiting at all."""
        if not self._tx_lock.acquire(blocking=False):
            return  # the writer sends it before its next record
        try:
            tx = self._move_output(core)
            try:
                tx.flush(socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass  # queued in the engine, before any later data
            except (OSError, KTLSError) as exc:
                # Sticky, but not raised here: this read's data is good and is returned.
                with self._lock:
                    core.fail(_send_failure(exc))
        finally:
            self._tx_lock.release()

    def flush(self) -> None:
        """Send now what the connection owes the peer (session tickets, a KeyUpdate
        answer), as the next write would.  For handing the descriptor to another writer
        (a program run on the socket): what ktls queued goes first."""
        core = self._core or self._established()
        if not (core.has_output or (self._tx is not None and self._tx.queued)):
            return
        with self._tx_lock:
            try:
                self._move_output(core).flush()
            except (OSError, KTLSError) as exc:
                self._send_broken(core, exc)

    def _flush_nowait(self) -> bool:
        """For event loops: push out, without waiting, what the connection owes the
        peer or has queued; whether nothing is left."""
        core, tx = self._core, self._tx
        if core is None or tx is None or not (core.has_output or tx.queued):
            return True
        with self._tx_lock:
            try:
                self._move_output(core).flush(socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            except (OSError, KTLSError) as exc:
                self._send_broken(core, exc)
        return True

    # -- writing -----------------------------------------------------------------------------

    def _move_output(self, core: Connection) -> TxEngine:
        """Hand what the core wants sent to the sending engine (caller holds _tx_lock)."""
        tx = self._tx
        assert tx is not None
        with self._lock:
            output = core.take_output()
        for item in output:
            if isinstance(item, SendRecord):
                tx.queue_record(item.content_type, item.payload)
            else:
                tx.queue_keys(item.keys)
        return tx

    def _sending(self, core: Connection) -> TxEngine:
        if self._closed:
            self._check_open()
        if core.failure is not None or core.close_sent:
            core.check_can_send()  # reads only: no need for the lock
        if core.has_output:
            return self._move_output(core)
        tx = self._tx
        assert tx is not None
        return tx

    def send(self, data: Buffer, flags: int = 0) -> int:
        """Send some of ``data``; return how much was taken.

        On a non-blocking socket a BlockingIOError (or, with a timeout, TimeoutError)
        may come after the software engine sealed ``data`` in part: as with ``ssl``,
        call again with the same data and the call returns what had been taken."""
        if flags:
            raise ValueError("flags are not supported on a TLS socket")
        core = self._core or self._established()
        view = memoryview(data).cast("B")
        with self._tx_lock:
            return self._send_some(core, self._sending(core), view, self._deadline())

    def sendall(self, data: Buffer, flags: int = 0) -> None:
        """Send all of ``data``; a timeout bounds the whole call."""
        if flags:
            raise ValueError("flags are not supported on a TLS socket")
        core = self._core or self._established()
        rest = memoryview(data).cast("B")
        with self._tx_lock:
            tx = self._sending(core)
            deadline = self._deadline()
            while rest:
                rest = rest[self._send_some(core, tx, rest, deadline) :]

    def _send_some(
        self, core: Connection, tx: TxEngine, view: memoryview, deadline: float | None
    ) -> int:
        if core.has_output:  # the reader owes the peer something: it goes first
            self._move_output(core)
        try:
            if deadline is None or deadline == sockio.NO_WAIT:  # no waiting of ours
                return tx.send_data(view)
            return self._wait_for(lambda: tx.send_data(view), True, deadline)
        except (TimeoutError, BlockingIOError):
            raise
        except (OSError, KernelUnsupported) as exc:
            self._send_broken(core, exc)

    def _send_broken(self, core: Connection, exc: BaseException) -> NoReturn:
        """A send failed: the connection is broken for good (caller holds _tx_lock)."""
        with self._lock:
            failed = core.fail(_send_failure(exc))
        self._broken(core, failed, locked=True)

    def sendfile(self, file: BinaryIO, offset: int = 0, count: int | None = None) -> int:
        """Send a file; on the kernel engine with ``sendfile(2)``: the file's pages go to
        the kernel with no copy into Python, and the kernel builds the records.

        Like ``socket.sendfile``: returns the bytes sent and leaves the file position
        after the last byte sent.  A timeout bounds each wait, not the whole call.  On a
        non-blocking socket it returns what the socket took before it filled (fewer than
        ``count``), or raises BlockingIOError when it took nothing.
        """
        core = self._established()
        try:
            file_fd = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            return self._sendfile_by_reading(file, offset, count)
        if count is None:
            count = max(0, os.fstat(file_fd).st_size - offset)
        sent = 0
        deadline = self._deadline()
        with self._tx_lock:
            tx = self._sending(core)
            while sent < count:
                asked = count - sent
                if core.has_output:  # the reader owes the peer something: it goes first
                    self._move_output(core)
                try:
                    chunk = self._wait_for(
                        functools.partial(tx.sendfile, file_fd, offset + sent, asked),
                        True,
                        deadline,
                    )
                except BlockingIOError:
                    if not sent:
                        file.seek(offset)
                        raise
                    break  # non-blocking: what the socket took before it filled
                except TimeoutError:
                    file.seek(offset + sent)
                    raise
                except (OSError, KernelUnsupported) as exc:
                    self._send_broken(core, exc)
                if not chunk:
                    break  # end of file
                sent += chunk
                if chunk < asked and deadline == sockio.NO_WAIT and self.tx_engine == "kernel":
                    break  # the socket is full: the next sendfile would only say EAGAIN
        file.seek(offset + sent)
        return sent

    def _sendfile_by_reading(self, file: BinaryIO, offset: int, count: int | None) -> int:
        file.seek(offset)
        sent = 0
        while count is None or sent < count:
            want = 1 << 18 if count is None else min(1 << 18, count - sent)
            chunk = file.read(want)
            if not chunk:
                break
            self.sendall(chunk)
            sent += len(chunk)
        return sent

    def key_update(self, request_peer: bool = True) -> None:
        """Start a TLS 1.3 KeyUpdate: new keys for what we send from now on.

        With ``request_peer`` the peer is asked to update its keys too (it answers
        with its own KeyUpdate, handled on a later read).  Raises RekeyUnsupported
        *before* sending anything when an engine cannot change keys.  On a
        non-blocking socket the KeyUpdate may wait until the next send.
        """
        core = self._established()
        if core.session.version is not ProtocolVersion.TLS1_3:
            raise ValueError("KeyUpdate exists only in TLS 1.3")
        with self._tx_lock:
            self._check_open()
            with self._lock:
                core.check_can_send()
            tx, rx = self._tx, self._rx
            assert tx is not None
            assert rx is not None
            refusal = tx.rekey_refusal() or rx.rekey_refusal()
            if refusal is not None:
                raise RekeyUnsupported(
                    f"this kernel cannot change TLS keys (KeyUpdate needs Linux >= 6.14): {refusal}"
                )
            with self._lock:
                core.start_key_update(request_peer)
            self._move_output(core)
            try:
                self._wait_for(tx.flush, True, self._deadline())
            except (TimeoutError, BlockingIOError):
                pass  # queued: it goes out before any later data
            except (OSError, KTLSError) as exc:
                self._send_broken(core, exc)

    # -- closing and failing -----------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """Like ``socket.shutdown``; SHUT_WR and SHUT_RDWR send close_notify first.

        On a non-blocking socket BlockingIOError means close_notify is still queued:
        call again."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and self._pending is None:
            core = self._established()
            with self._tx_lock:
                self._check_open()
                with self._lock:
                    core.send_close_notify()
                tx = self._move_output(core)
                # drain(): the kernel engine must push every record into TCP before the
                # FIN, whatever the socket's mode (see KernelTx.drain).
                limit = self.close_timeout if self._timeout == 0 else self._timeout
                try:
                    done = tx.drain(limit)
                except (OSError, KTLSError):
                    done = True  # the peer is gone; nothing left to tell it
                if not done:
                    error = BlockingIOError if self._timeout == 0 else TimeoutError
                    raise error("close_notify could not be sent yet: call shutdown() again")
        self._sock.shutdown(how)

    def close(self) -> None:
        """Take in what the peer already sent (without waiting), send close_notify when
        the connection is healthy (waiting at most ``close_timeout`` for it to leave),
        and close the socket.  Files from ``makefile()`` keep it open until they close."""
        if self._closed:
            return
        self._closed = True
        if self._io_refs <= 0:
            self._real_close()

    def _real_close(self) -> None:
        core = self._core
        if core is not None and self._sock.fileno() >= 0:
            deadline = time.monotonic() + self.close_timeout
            if self._say_goodbye(core, self.close_timeout) and core.failure is None:
                self._linger(core, deadline)
        self._sock.close()

    def _say_goodbye(self, core: Connection, timeout: float) -> bool:
        """Take in what the peer already sent (without waiting), then send close_notify
        (when the connection is healthy) and whatever else is queued, within
        ``timeout``.  Whether everything went out."""
        self._take_in_quietly(core)
        with self._lock:
            due = core.send_close_notify() or core.has_output
        due = due or (self._tx is not None and self._tx.queued)
        if not due:
            return True
        if not self._tx_lock.acquire(timeout=timeout):
            return False
        try:
            with contextlib.suppress(OSError, KTLSError):
                return self._move_output(core).drain(timeout)
            return False
        finally:
            self._tx_lock.release()

    def _abort(self) -> None:
        """Close the socket now: nothing more is sent or read (no close_notify)."""
        self._closed = True
        self._sock.close()

    def _linger(self, core: Connection, deadline: float) -> None:
        """After our close_notify, wait as :meth:`_linger_waits` says, blocking."""
        waits = self._linger_waits(core, deadline)
        with contextlib.suppress(StopIteration):
            readable, seconds = next(waits)
            while True:
                if readable:
                    woken = sockio.wait_fd(self._sock.fileno(), False, seconds)
                else:
                    time.sleep(seconds)
                    woken = True  # (a pause comes only after a wake-up)
                readable, seconds = waits.send(woken)

    def _linger_waits(self, core: Connection, deadline: float) -> Generator[_Wait, bool, None]:
        """After our close_notify: FIN, then until the peer's kernel has acknowledged
        every byte we sent, take in (without waiting) whatever the peer sends.  The
        waits in between are yielded, for each I/O style to do its own way: (True,
        seconds) is "until readable, at most seconds", and the caller sends back
        whether readability woke it; (False, seconds) is a plain pause.

        Closing a socket while the peer's data arrives (a TLS 1.3 server's tickets come
        after the client's handshake is over, maybe only now) or sits unread makes the
        kernel answer with a reset, and a reset throws away what is still in flight to
        the peer: the end of our data, our close_notify.  Bounded by close_timeout.
        """
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        pause = 0.001
        woken = False  # the last wait ended because the socket became readable
        while True:
            taken = self._taken_in
            self._take_in_quietly(core)
            try:
                in_flight = sockio.unacknowledged(self._sock)
                if in_flight and sockio.tcp_state(self._sock) == sockio.TCP_CLOSE:
                    return  # reset: what is in flight will never be acknowledged
            except OSError:
                return  # not TCP (TLS over a Unix socket pair): nothing to wait for
            remaining = deadline - time.monotonic()
            if not in_flight or remaining <= 0:
                return
            # The acknowledgement mostly rides on what the peer sends next (its tickets,
            # close_notify, FIN, or a reset), so wake when that arrives, not a pause
            # later.  Readable with nothing to take in (the peer's FIN, data beyond
            # _DRAIN_LIMIT) would wake at once forever: then just pause.
            readable = not (woken and self._taken_in == taken)
            woken = yield readable, min(pause, remaining)
            pause = min(pause * 2, 0.05)

    def _take_in_quietly(self, core: Connection) -> None:
        """Read, without waiting, what the peer already sent: tickets and close_notify
        go through the core; data is dropped (see _linger for why)."""
        rx = self._rx
        if rx is None or not self._rx_lock.acquire(blocking=False):
            return
        try:
            while self._taken_in < _DRAIN_LIMIT and core.failure is None:
                record = rx.read_into(_NO_ROOM, socket.MSG_DONTWAIT)
                if record is None:
                    break
                content_type, payload = record
                if isinstance(payload, int):  # (never: no data fits in no room)
                    payload = _NO_ROOM[:payload]
                with self._lock:
                    events = core.receive_record(content_type, payload)
                for event in events:
                    if isinstance(event, RxKeys):
                        rx.rekey(event.keys)
                self._taken_in += len(payload)
        except (OSError, KTLSError):
            pass  # nothing more to take in now
        finally:
            self._unread = _NOTHING
            self._rx_lock.release()

    def _check_open(self) -> None:
        if self._closed and self._io_refs <= 0:
            raise ClosedError("the TLS connection is closed")

    def _broken(self, core: Connection, failed: Failed, *, locked: bool = False) -> NoReturn:
        """Tell the peer why (the alert the core queued, if the sending side lets us
        within close_timeout), shut the socket down, and raise the failure."""
        acquired = locked or self._tx_lock.acquire(timeout=self.close_timeout)
        try:
            if acquired and self._tx is not None:
                with contextlib.suppress(OSError, KTLSError):
                    self._move_output(core).drain(self.close_timeout)
        finally:
            if acquired and not locked:
                self._tx_lock.release()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        raise failed.error

    # -- file objects ------------------------------------------------------------------------

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """A file object reading/writing application data, like ``socket.makefile``.

        The connection stays open until the socket and every such file are closed."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b)")
        reading, writing = "r" in mode, "w" in mode
        raw = _RawTLS(self, reading, writing)
        self._io_refs += 1
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if "b" not in mode:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: io.BufferedIOBase
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if "b" in mode:
            return buffer
        return io.TextIOWrapper(buffer, encoding, errors, newline)

    def _file_closed(self) -> None:
        self._io_refs -= 1
        if self._closed and self._io_refs <= 0:
            self._real_close()


def _read_failure(exc: OSError) -> KTLSError:
    """What an OS error while reading means for the connection."""
    if isinstance(exc, BrokenPipeError):
        # The kernel's TLS receive path reports the RST that follows a peer's bare FIN
        # (once we have sent to its closed socket) before the end of the stream, where
        # plain TCP reports the end first: either way the peer stopped without
        # close_notify.
        error: KTLSError = TruncatedStream()
    else:
        error = BrokenError(f"connection failed while reading: {_reason(exc)}")
    error.__cause__ = exc
    return error


def _send_failure(exc: BaseException) -> KTLSError:
    """The one place that says what a failed send means."""
    if isinstance(exc, KTLSError):
        return exc
    error = BrokenError(f"connection failed while sending: {_reason(exc)}")
    error.__cause__ = exc
    return error


def _reason(exc: BaseException) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.EPIPE, errno.ECONNRESET):
        reason = f"the peer is gone ({reason})"
    return reason


class _RawTLS(io.RawIOBase):
    def __init__(self, tls: TLSSocket, reading: bool, writing: bool) -> None:
        super().__init__()
        self._tls = tls
        self._reading = reading
        self._writing = writing

    def readable(self) -> bool:
        return self._reading

    def writable(self) -> bool:
        return self._writing

    def readinto(self, buffer: Buffer) -> int:
        return self._tls.recv_into(buffer)

    def write(self, data: Buffer) -> int:
        return self._tls.send(data)

    def fileno(self) -> int:
        return self._tls.fileno()

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._tls._file_closed()


def _cert_dict(cert: x509.Certificate) -> dict[str, Any]:
    def name(n: x509.Name) -> tuple[tuple[tuple[str, str], ...], ...]:
        return tuple(tuple((attr.oid._name, str(attr.value)) for attr in rdn) for rdn in n.rdns)

    result: dict[str, Any] = {
        "subject": name(cert.subject),
        "issuer": name(cert.issuer),
        "version": cert.version.value + 1,
        "serialNumber": f"{cert.serial_number:X}",
        "notBefore": cert.not_valid_before_utc.strftime("%b %d %H:%M:%S %Y GMT"),
        "notAfter": cert.not_valid_after_utc.strftime("%b %d %H:%M:%S %Y GMT"),
    }
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return result
    entries: list[tuple[str, Any]] = []
    for general_name in san:  # in the certificate's order, with ssl's labels
        if isinstance(general_name, x509.DNSName):
            entries.append(("DNS", general_name.value))
        elif isinstance(general_name, x509.IPAddress):
            entries.append(("IP Address", str(general_name.value)))
        elif isinstance(general_name, x509.RFC822Name):
            entries.append(("email", general_name.value))
        elif isinstance(general_name, x509.UniformResourceIdentifier):
            entries.append(("URI", general_name.value))
        elif isinstance(general_name, x509.DirectoryName):
            entries.append(("DirName", name(general_name.value)))
        elif isinstance(general_name, x509.RegisteredID):
            entries.append(("Registered ID", general_name.value.dotted_string))
        else:
            entries.append(("othername", "<unsupported>"))
    result["subjectAltName"] = tuple(entries)
    return result
