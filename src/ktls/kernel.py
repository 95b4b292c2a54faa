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

import errno
import functools
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import linux
from .engine import RxEngine, TxEngine
from .errors import (
    CipherUnsupported,
    KernelUnsupported,
    ProtocolViolation,
    RekeyUnsupported,
    ULPUnavailable,
)
from .records import MAX_PLAINTEXT
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
    "install",
    "kernel_accepts",
    "read_crypto_info",
    "read_tls_stat",
    "rekey_error",
    "ulp_error",
]

_CMSG_SPACE = socket.CMSG_SPACE(1)
_KNOWN_TYPES = frozenset(ContentType.__members__.values())
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


def _why_no_tls_module() -> str:
    """Tell "built, not loaded" from "not there at all" for ENOENT on TCP_ULP."""
    release = os.uname().release
    modules = Path("/lib/modules") / release / "kernel" / "net" / "tls"
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

    name = "kernel"
    _direction: int  # linux.TLS_TX or linux.TLS_RX

    def __init__(
        self, sock: socket.socket, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys
    ) -> None:
        install(sock, self._direction, version, cipher, keys)
        self._sock = sock
        self._version = version
        self._cipher = cipher

    def rekey(self, keys: TrafficKeys) -> None:
        install(self._sock, self._direction, self._version, self._cipher, keys)

    def crypto_info(self) -> linux.CryptoInfo:
        return read_crypto_info(self._sock, self._direction, self._cipher)


class KernelTx(_KernelDirection, TxEngine):
    _direction = linux.TLS_TX

    def send(self, data: memoryview) -> int:
        return self._sock.send(data)

    def send_record(self, content_type: ContentType, payload: bytes) -> None:
        cmsg = [(linux.SOL_TLS, linux.TLS_SET_RECORD_TYPE, bytes((content_type,)))]
        try:
            sent = self._sock.sendmsg([payload], cmsg)
        except OSError as exc:
            # A failed decryption parks its error (EBADMSG, ...) in the socket's error
            # slot, and sends report it instead of sending.  Reading SO_ERROR clears
            # it, so that our alert can still tell the peer why we stop.
            if exc.errno not in _RX_ERRORS:
                raise
            self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            sent = self._sock.sendmsg([payload], cmsg)
        if sent != len(payload):  # a control record is sent whole or not at all
            raise OSError(errno.EIO, "short write of a TLS control record")

    def sendfile(self, file: BinaryIO, offset: int, count: int | None) -> int:
        # socket.sendfile() is os.sendfile() in a loop that honours the socket timeout;
        # the kernel builds the records from the page cache: zero copies in user space.
        return self._sock.sendfile(file, offset, count)


class KernelRx(_KernelDirection, RxEngine):
    _direction = linux.TLS_RX

    def __init__(
        self, sock: socket.socket, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys
    ) -> None:
        super().__init__(sock, version, cipher, keys)
        self._buffer = bytearray(MAX_PLAINTEXT + 1)

    def buffered(self) -> bool:
        return False  # records wait in the kernel, where select() sees them

    def recv_record(self, bufsize: int) -> tuple[ContentType, bytes] | None:
        # The buffer always has room for a whole record so that a control record is
        # never split across reads.
        if len(self._buffer) < bufsize:
            self._buffer = bytearray(bufsize)
        view = memoryview(self._buffer)
        try:
            nbytes, ancdata, _flags, _addr = self._sock.recvmsg_into(
                [view[: max(bufsize, MAX_PLAINTEXT + 1)]], _CMSG_SPACE
            )
        except OSError as exc:
            known = _RX_ERRORS.get(exc.errno or 0)
            if known is None:
                raise
            raise ProtocolViolation(f"kernel TLS: {known[0]}", known[1]) from exc
        content_type = ContentType.APPLICATION_DATA
        for level, kind, value in ancdata:
            if level == linux.SOL_TLS and kind == linux.TLS_GET_RECORD_TYPE:
                if value[0] not in _KNOWN_TYPES:  # the kernel passes any inner type on
                    raise ProtocolViolation(
                        f"record of unknown content type {value[0]}",
                        AlertDescription.UNEXPECTED_MESSAGE,
                    )
                content_type = ContentType(value[0])
        if nbytes == 0 and content_type is ContentType.APPLICATION_DATA and not ancdata:
            return None
        return content_type, bytes(view[:nbytes])


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


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


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
# a connection only probes the suites it offers; `ktls probe` probes them all.


@functools.cache
def ulp_error() -> str | None:
    """None when the TLS ULP attaches here, else why not."""
    client, server = _loopback_pair()
    with client, server:
        try:
            attach_ulp(client)
        except ULPUnavailable as exc:
            return str(exc)
    return None


@functools.cache
def cipher_errors(cipher: Cipher, version: ProtocolVersion) -> tuple[str | None, str | None]:
    """(TX, RX) refusal of this cipher and version by the kernel; None where accepted."""
    if ulp_error() is not None:
        return ulp_error(), ulp_error()
    keys = _dummy_keys(version, cipher)
    client, server = _loopback_pair()
    with client, server:
        attach_ulp(client)
        attach_ulp(server)
        return (
            _try(functools.partial(install, client, linux.TLS_TX, version, cipher, keys)),
            _try(functools.partial(install, server, linux.TLS_RX, version, cipher, keys)),
        )


def kernel_accepts(cipher: Cipher, version: ProtocolVersion) -> bool:
    return cipher_errors(cipher, version) == (None, None)


@functools.cache
def _features() -> tuple[str | None, bool, bool]:
    """(rekey refusal, zero-copy sendfile, RX no-pad), tried on TLS 1.3 AES-128-GCM."""
    if ulp_error() is not None:
        return ulp_error(), False, False
    cipher, version = CIPHERS["AES-128-GCM"], ProtocolVersion.TLS1_3
    keys = _dummy_keys(version, cipher)
    client, server = _loopback_pair()
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


@functools.cache
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
