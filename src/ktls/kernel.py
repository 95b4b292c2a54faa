"""The kernel engine: hand keys to the Linux TLS ULP and move records through it.

Traps handled here (each found on real kernels, see DESIGN.md):

* ``TCP_ULP`` can only be attached to an ESTABLISHED socket, and only once.
* After ``TLS_RX`` a plain ``recv()`` fails with EIO when the next record is not
  application data (TLS 1.3 tickets!).  Every read therefore uses ``recvmsg`` with
  room for the ``TLS_GET_RECORD_TYPE`` control message.
* Authentication failure gives EBADMSG, and it is sticky: the socket stays failed.
* Before Linux 6.14 a second ``setsockopt(TLS_TX/TLS_RX)`` fails with EBUSY: no
  KeyUpdate.  From 6.14, after a KeyUpdate record is read, reads fail with
  EKEYEXPIRED until the new RX key is set.
* A socket with a timeout is non-blocking underneath; ``socket.sendfile`` copes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

from . import linux, sockio
from .engine import EngineName, RxEngine, TxEngine
from .errors import (
    CipherUnsupported,
    KernelUnsupported,
    ProtocolViolation,
    RekeyUnsupported,
    ULPUnavailable,
)
from .records import CONTENT_TYPES, MAX_PLAINTEXT
from .session import TrafficKeys
from .suites import CIPHERS, Cipher
from .wire import AlertDescription, ContentType, ProtocolVersion

__all__ = [
    "KernelCapabilities",
    "KernelRx",
    "KernelTx",
    "attach_ulp",
    "capabilities",
    "cipher_errors",
    "forget_probes",
    "install",
    "kernel_accepts",
    "read_crypto_info",
    "read_tls_stat",
    "rekey_error",
    "ulp_error",
]

_CMSG_SPACE = socket.CMSG_SPACE(1)
_WHOLE_RECORD = MAX_PLAINTEXT + 1  # room that never cuts a record the kernel returns
# What the kernel's RX errors mean, and the alert RFC 8446/5246 name for each.
_RX_ERRORS: dict[int, tuple[str, AlertDescription]] = {
    errno.EBADMSG: (
        "record failed authentication or is malformed",
        AlertDescription.BAD_RECORD_MAC,
    ),
    errno.EMSGSIZE: ("record too large", AlertDescription.RECORD_OVERFLOW),
    # The kernel's only EINVAL on receive: a header whose version is not 0x0303.
    errno.EINVAL: ("record header with a bad version", AlertDescription.PROTOCOL_VERSION),
    errno.EKEYEXPIRED: (
        "record under a key that was not installed after KeyUpdate",
        AlertDescription.UNEXPECTED_MESSAGE,
    ),
}


MODULES_ROOT = Path("/lib/modules")


def _why_no_tls_module() -> str:
    """Tell "built, not loaded" from "not there at all" for ENOENT on TCP_ULP."""
    release = os.uname().release
    modules = MODULES_ROOT / release / "kernel" / "net" / "tls"
    if any(modules.glob("tls.ko*")):
        return (
            f"the kernel has no 'tls' module loaded, and did not load {modules}/tls.ko on "
            "demand: run `modprobe tls` as root"
        )
    return (
        "the kernel has no 'tls' module loaded and none is installed for Linux "
        f"{release} (CONFIG_TLS off?): modprobe tls cannot help"
    )


def attach_ulp(sock: socket.socket) -> None:
    """Attach the ``tls`` upper-layer protocol; raise ULPUnavailable with the reason."""
    try:
        sock.setsockopt(socket.SOL_TCP, linux.TCP_ULP, b"tls")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            reason = _why_no_tls_module()
        elif exc.errno == errno.ENOTCONN:
            reason = "the socket is not connected"
        elif exc.errno == errno.EEXIST:
            reason = "an upper-layer protocol is already attached to this socket"
        else:
            reason = exc.strerror or str(exc)
        raise ULPUnavailable(f"cannot attach kernel TLS: {reason}") from exc


def install(
    sock: socket.socket,
    direction: int,
    version: ProtocolVersion,
    cipher: Cipher,
    keys: TrafficKeys,
) -> None:
    """Give one direction's keys to the kernel (``direction`` is TLS_TX or TLS_RX)."""
    info = linux.pack_crypto_info(version, cipher, keys)
    try:
        sock.setsockopt(linux.SOL_TLS, direction, info)
    except OSError as exc:
        what = "TX" if direction == linux.TLS_TX else "RX"
        if exc.errno == errno.EBUSY:
            raise RekeyUnsupported(
                f"this kernel cannot replace {what} keys (TLS 1.3 KeyUpdate needs Linux >= 6.14)"
            ) from exc
        if exc.errno in (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
            hint = " (crypto module missing?)" if exc.errno == errno.ENOENT else ""
            raise CipherUnsupported(
                f"kernel refused {cipher.name} {version.label} {what}: {exc.strerror}{hint}"
            ) from exc
        raise KernelUnsupported(f"kernel refused {what} keys: {exc.strerror}") from exc


def read_crypto_info(sock: socket.socket, direction: int, cipher: Cipher) -> linux.CryptoInfo:
    """What the kernel holds for one direction now: ``getsockopt(SOL_TLS, TLS_TX/RX)``.

    ``rec_seq`` is the live sequence number (and for TLS 1.2 ``iv`` the next explicit
    nonce), so this shows the kernel doing the record work.
    """
    data = sock.getsockopt(linux.SOL_TLS, direction, linux.crypto_info_size(cipher))
    return linux.unpack_crypto_info(data)


class _KernelDirection:
    """One direction handed to the kernel: install, re-key, read back."""

    name: EngineName = "kernel"
    _direction: int  # linux.TLS_TX or linux.TLS_RX

    def __init__(
        self, sock: socket.socket, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys
    ) -> None:
        install(sock, self._direction, version, cipher, keys)
        self._sock = sock
        self._version = version
        self._cipher = cipher

    def _install(self, keys: TrafficKeys) -> None:
        install(self._sock, self._direction, self._version, self._cipher, keys)

    def crypto_info(self) -> linux.CryptoInfo:
        return read_crypto_info(self._sock, self._direction, self._cipher)


class KernelTx(_KernelDirection, TxEngine):
    """Records are built by the kernel from plain ``send``/``sendfile``; control records
    go with ``sendmsg`` and a ``TLS_SET_RECORD_TYPE`` cmsg.  Control records and key
    changes wait in a queue until the socket takes them, in order."""

    _direction = linux.TLS_TX

    def __init__(
        self, sock: socket.socket, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys
    ) -> None:
        super().__init__(sock, version, cipher, keys)
        # (content type, payload) records, or new keys to install once what precedes
        # them is in the kernel.
        self._queue: deque[tuple[ContentType, bytes] | TrafficKeys] = deque()

    @property
    def queued(self) -> bool:
        return bool(self._queue)

    def queue_record(self, content_type: ContentType, payload: bytes) -> None:
        self._queue.append((content_type, payload))

    def queue_keys(self, keys: TrafficKeys) -> None:
        self._queue.append(keys)

    def flush(self, flags: int = 0) -> None:
        while self._queue:
            item = self._queue[0]
            if isinstance(item, TrafficKeys):
                self._install(item)
            else:
                content_type, payload = item
                sent = self._send_record(content_type, payload, flags)
                self._check_reset()
                if sent < len(payload):
                    # Never seen for records this small, but the rest must not be lost:
                    # it goes out as the next record of the same type.
                    self._queue[0] = (content_type, payload[sent:])
                    continue
            self._queue.popleft()

    def _send_record(self, content_type: ContentType, payload: bytes, flags: int) -> int:
        cmsg = [(linux.SOL_TLS, linux.TLS_SET_RECORD_TYPE, bytes((content_type,)))]
        try:
            return self._sock.sendmsg([payload], cmsg, flags)
        except OSError as exc:
            # A failed decryption parks its error (EBADMSG, ...) in the socket's error
            # slot, and sends report it instead of sending.  Reading SO_ERROR clears
            # it, so that our alert can still tell the peer why we stop.
            if exc.errno not in _RX_ERRORS:
                raise
            self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            return self._sock.sendmsg([payload], cmsg, flags)

    def drain(self, timeout: float | None) -> bool:
        # A trap: records that TCP could not take yet wait in the kernel's own list
        # (a non-blocking send returned success for them), are pushed later from a work
        # queue, and are DROPPED when the socket is closed; a shutdown(SHUT_WR) strands
        # them too.  Only a blocking send makes the kernel push them all, in order,
        # before its own record: so the last records (close_notify, an alert) go out
        # with the fd blocking, bounded by SO_SNDTIMEO.
        sock = self._sock
        saved = sock.gettimeout()
        try:
            sock.settimeout(None)
            if timeout is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
            self.flush()
        except BlockingIOError:  # SO_SNDTIMEO ran out
            return False
        else:
            return True
        finally:
            with contextlib.suppress(OSError):
                if timeout is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
                sock.settimeout(saved)

    def send_data(self, data: memoryview, flags: int = 0) -> int:
        self.flush(flags)
        if flags & socket.MSG_DONTWAIT or self._sock.gettimeout() is not None:
            return self._sock.send(data, flags)  # never waits: nothing to swallow
        # Blocking: first what fits without waiting, which needs no reset check (see
        # _check_reset); then the rest with waiting, and the check.
        try:
            sent = self._sock.send(data, flags | socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return sent
        sent += self._sock.send(data[sent:], flags)
        self._check_reset()
        return sent

    def sendfile(self, file_fd: int, offset: int, count: int, flags: int = 0) -> int:
        # The kernel reads the file's pages and builds the records itself: no copy into
        # Python.  (It encrypts into its own buffers; TLS_TX_ZEROCOPY_RO only matters
        # for NIC offload.)  os.sendfile has no flags: it follows the socket's mode.
        self.flush(flags)
        sent = os.sendfile(self._sock.fileno(), file_fd, offset, count)
        if self._sock.gettimeout() is None:  # (one that could not wait swallowed nothing)
            self._check_reset()
        return sent

    def _check_reset(self) -> None:
        # A trap: when the peer's reset arrives while a send waits for buffer space, the
        # kernel's TLS send path swallows the error (it returns the bytes it took), and
        # from then on every send "succeeds" on a socket in state CLOSE with SO_ERROR 0,
        # where plain TCP raises EPIPE.  The TCP state after such a call tells the truth.
        # A send that did not wait (non-blocking, or it found room) cannot have swallowed
        # anything: an error it meets stays in sk_err for the next call.
        if sockio.tcp_state(self._sock) == sockio.TCP_CLOSE:
            code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNRESET
            raise ConnectionResetError(code, "the peer reset the connection")

    def rekey_refusal(self) -> str | None:
        return rekey_error()


class KernelRx(_KernelDirection, RxEngine):
    """Records are opened by the kernel and read with ``recvmsg``, whose
    ``TLS_GET_RECORD_TYPE`` cmsg tells data from control records: a plain ``recv``
    fails with EIO at the first non-data record (a TLS 1.3 ticket, say).

    Two 7.x traps live here.  Poll does not show a control record the kernel already
    decrypted ahead (while reading the data before it) or any record while a KeyUpdate
    is pending, so drivers must read first and wait only after EAGAIN (see
    :meth:`ready`).  And the kernel marks "KeyUpdate pending" on any handshake record
    whose first byte is 24: a KeyUpdate split over two records (legal), or a ticket
    fragment that happens to start with 24, stops reads with EKEYEXPIRED although the
    key must not change yet; installing the *same* key again at the live sequence
    number clears it, and the next record opens under the old key as it must.
    """

    _direction = linux.TLS_RX
    _scratch: memoryview | None = None  # for reads smaller than a record

    def rekey(self, keys: TrafficKeys) -> None:
        self._install(keys)

    def rekey_refusal(self) -> str | None:
        return rekey_error()

    def ready(self) -> int | None:
        """Application data readable now without waiting (0: none), or None when a
        control record (or an error, or the end) comes first: read it to find out.
        A peek, because poll can't be trusted for this (see the class docstring)."""
        try:
            count, ancdata, _flags, _addr = self._sock.recvmsg_into(
                [self._room()], _CMSG_SPACE, socket.MSG_PEEK | socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return 0
        except OSError:
            return None
        if not count or _record_type(ancdata) is not ContentType.APPLICATION_DATA:
            return None
        return count

    def held(self) -> bool:
        return True  # the 7.x trap: only a read that fails with EAGAIN proves nothing is

    def read_into(
        self, buffer: memoryview, flags: int = 0
    ) -> tuple[ContentType, memoryview | int] | None:
        # Straight into the caller's buffer when a whole record fits (the kernel merges
        # data records up to its size); a control record must never be cut, so a smaller
        # buffer gets our own room.  A control record read into the caller's buffer
        # leaves its bytes there, past the zero bytes of data the caller is told of.
        target = buffer if len(buffer) >= _WHOLE_RECORD else self._room()
        receive = functools.partial(self._sock.recvmsg_into, [target], _CMSG_SPACE, flags)
        try:
            try:
                count, ancdata, _flags, _addr = receive()
            except OSError as exc:
                if exc.errno != errno.EKEYEXPIRED:
                    raise
                # The kernel saw the first byte of something that is not (yet) a whole
                # KeyUpdate: keep the key, clear the flag, read on (class docstring).
                self._install_raw(
                    self._sock.getsockopt(
                        linux.SOL_TLS, self._direction, linux.crypto_info_size(self._cipher)
                    )
                )
                count, ancdata, _flags, _addr = receive()
        except OSError as exc:
            known = _RX_ERRORS.get(exc.errno or 0)
            if known is None:
                raise
            raise ProtocolViolation(f"kernel TLS: {known[0]}", known[1]) from exc
        content_type = _record_type(ancdata)
        if content_type is ContentType.APPLICATION_DATA:
            if not count and not ancdata:
                return None
            if target is buffer:
                return content_type, count
        return content_type, target[:count]

    def _room(self) -> memoryview:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(_WHOLE_RECORD))
        return self._scratch

    def _install_raw(self, info: bytes) -> None:
        try:
            self._sock.setsockopt(linux.SOL_TLS, self._direction, info)
        except OSError as exc:
            raise RekeyUnsupported(f"kernel refused the RX key again: {exc.strerror}") from exc


def _record_type(ancdata: list[tuple[int, int, bytes]]) -> ContentType:
    for level, kind, value in ancdata:
        if level == linux.SOL_TLS and kind == linux.TLS_GET_RECORD_TYPE:
            if value[0] not in CONTENT_TYPES:  # the kernel passes any inner type on
                raise ProtocolViolation(
                    f"record of unknown content type {value[0]}",
                    AlertDescription.UNEXPECTED_MESSAGE,
                )
            return ContentType(value[0])
    return ContentType.APPLICATION_DATA


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def read_tls_stat() -> dict[str, int] | None:
    """The kernel's TLS counters, or None where /proc/net/tls_stat does not exist."""
    try:
        with open("/proc/net/tls_stat", encoding="ascii") as f:
            return linux.parse_tls_stat(f.read())
    except OSError:
        return None


# -- capabilities, found by trial on loopback sockets ---------------------------------------


@dataclass(frozen=True)
class KernelCapabilities:
    """What this kernel's TLS layer accepts, each item tried on a real loopback socket."""

    ulp: bool
    ulp_error: str | None = None
    # (cipher name, "TLSv1.2"/"TLSv1.3", "tx"/"rx") -> None when accepted, else the error
    ciphers: dict[tuple[str, str, str], str | None] = field(default_factory=dict)
    rekey: bool = False
    rekey_error: str | None = None
    zerocopy_sendfile: bool = False
    rx_expect_no_pad: bool = False
    release: str = ""


class _NoLoopback(Exception):
    """No loopback TCP connection could be made to try the kernel on."""


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    failures = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family) as listener:
                listener.bind((host, 0))
                listener.listen(1)
                client = socket.create_connection(listener.getsockname()[:2], timeout=5)
                server, _ = listener.accept()
        except OSError as exc:
            failures.append(f"{host}: {exc.strerror or exc}")
            continue
        client.settimeout(None)
        return client, server
    raise _NoLoopback(f"no usable loopback connection ({'; '.join(failures)})")


def _dummy_keys(version: ProtocolVersion, cipher: Cipher) -> TrafficKeys:
    iv_len = cipher.nonce_len if version is ProtocolVersion.TLS1_3 else cipher.tls12_fixed_iv_len
    return TrafficKeys(key=bytes(cipher.key_len), iv=bytes(iv_len), seq=0, explicit_nonce=0)


def _try(action: functools.partial[None]) -> str | None:
    """None if the action worked, else "ERRNAME: message" saying why not."""
    try:
        action()
    except (KernelUnsupported, OSError) as exc:
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        code = getattr(cause, "errno", None)
        name = errno.errorcode.get(code, "error") if isinstance(code, int) else "error"
        return f"{name}: {exc}"
    return None


# Each probe runs once per process, and only when asked: on a kernel that lacks a
# cipher's module, each refusal costs a failed module autoload (~0.6 s under UML), so
# a connection only probes the suites it offers; `ktls probe` probes them all.  The
# lock makes threads that connect at the same time wait for one probe, not run many.

_PROBE_LOCK = threading.RLock()
_P = ParamSpec("_P")
_R = TypeVar("_R")
_PROBE_CACHES: list[Callable[[], None]] = []


def _probe(func: Callable[_P, _R]) -> Callable[_P, _R]:
    cache: dict[tuple[object, ...], _R] = {}
    _PROBE_CACHES.append(cache.clear)

    @functools.wraps(func)
    def probe(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        key = (*args, *sorted(kwargs.items()))
        with _PROBE_LOCK:
            if key not in cache:
                cache[key] = func(*args, **kwargs)
            return cache[key]

    return probe


def forget_probes() -> None:
    """Probe the kernel afresh on next use (for tests, and after `modprobe tls`)."""
    with _PROBE_LOCK:
        for clear in _PROBE_CACHES:
            clear()


@_probe
def ulp_error() -> str | None:
    """None when the TLS ULP attaches here, else why not."""
    try:
        client, server = _loopback_pair()
    except _NoLoopback as exc:
        return f"cannot try kernel TLS: {exc}"
    with client, server:
        try:
            attach_ulp(client)
        except ULPUnavailable as exc:
            return str(exc)
    return None


@_probe
def cipher_errors(cipher: Cipher, version: ProtocolVersion) -> tuple[str | None, str | None]:
    """(TX, RX) refusal of this cipher and version by the kernel; None where accepted."""
    if ulp_error() is not None:
        return ulp_error(), ulp_error()
    keys = _dummy_keys(version, cipher)
    try:
        client, server = _loopback_pair()
    except _NoLoopback as exc:
        return f"cannot try: {exc}", f"cannot try: {exc}"
    with client, server:
        attach_ulp(client)
        attach_ulp(server)
        return (
            _try(functools.partial(install, client, linux.TLS_TX, version, cipher, keys)),
            _try(functools.partial(install, server, linux.TLS_RX, version, cipher, keys)),
        )


def kernel_accepts(cipher: Cipher, version: ProtocolVersion) -> bool:
    return cipher_errors(cipher, version) == (None, None)


@_probe
def _features() -> tuple[str | None, bool, bool]:
    """(rekey refusal, zero-copy sendfile, RX no-pad), tried on TLS 1.3 AES-128-GCM."""
    if ulp_error() is not None:
        return ulp_error(), False, False
    cipher, version = CIPHERS["AES-128-GCM"], ProtocolVersion.TLS1_3
    keys = _dummy_keys(version, cipher)
    try:
        client, server = _loopback_pair()
    except _NoLoopback as exc:
        return f"cannot try: {exc}", False, False
    with client, server:
        attach_ulp(client)
        attach_ulp(server)
        tx_error = _try(functools.partial(install, client, linux.TLS_TX, version, cipher, keys))
        rekey_error = tx_error or _try(
            functools.partial(install, client, linux.TLS_TX, version, cipher, keys)
        )
        zerocopy = tx_error is None and not _try(
            functools.partial(client.setsockopt, linux.SOL_TLS, linux.TLS_TX_ZEROCOPY_RO, 1)
        )
        rx_error = _try(functools.partial(install, server, linux.TLS_RX, version, cipher, keys))
        no_pad = rx_error is None and not _try(
            functools.partial(server.setsockopt, linux.SOL_TLS, linux.TLS_RX_EXPECT_NO_PAD, 1)
        )
    return rekey_error, zerocopy, no_pad


def rekey_error() -> str | None:
    """None when this kernel can change TLS 1.3 keys (Linux >= 6.14), else why not."""
    return _features()[0]


@_probe
def capabilities() -> KernelCapabilities:
    """Everything this kernel's TLS layer accepts, probed on loopback sockets."""
    release = os.uname().release
    if ulp_error() is not None:
        return KernelCapabilities(ulp=False, ulp_error=ulp_error(), release=release)
    ciphers: dict[tuple[str, str, str], str | None] = {}
    for cipher in CIPHERS.values():
        for version in ProtocolVersion:
            tx, rx = cipher_errors(cipher, version)
            ciphers[(cipher.name, version.label, "tx")] = tx
            ciphers[(cipher.name, version.label, "rx")] = rx
    rekey, zerocopy, no_pad = _features()
    return KernelCapabilities(
        ulp=True,
        ciphers=ciphers,
        rekey=rekey is None,
        rekey_error=rekey,
        zerocopy_sendfile=zerocopy,
        rx_expect_no_pad=no_pad,
        release=release,
    )
