"""The software engine: the same record semantics as the kernel, in user space.

Used when the kernel has no TLS ULP or refuses the cipher, or when asked for.  The
record work is :mod:`ktls.protection` (sans-IO); this module only moves bytes.
"""

from __future__ import annotations

import socket
from typing import BinaryIO

from .engine import RxEngine, TxEngine
from .protection import Opener, Sealer
from .records import MAX_PLAINTEXT, PROTECTED_VERSIONS, RecordBuffer, max_ciphertext
from .session import TrafficKeys
from .suites import Cipher
from .wire import ContentType, ProtocolVersion

__all__ = ["SoftwareRx", "SoftwareTx"]

_READ_SIZE = 1 << 16
_FILE_CHUNK = 1 << 18
_SEND_MAX = 16 * MAX_PLAINTEXT


class _SoftwareDirection:
    name = "software"

    def __init__(self, sock: socket.socket, version: ProtocolVersion, cipher: Cipher) -> None:
        self._sock = sock
        self._version = version
        self._cipher = cipher

    def crypto_info(self) -> None:
        return None  # nothing in the kernel


class SoftwareTx(_SoftwareDirection, TxEngine):
    def __init__(
        self, sock: socket.socket, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys
    ) -> None:
        super().__init__(sock, version, cipher)
        self._sealer = Sealer.from_keys(version, cipher, keys)

    def _seal_all(self, content_type: ContentType, data: memoryview) -> bytes:
        return b"".join(
            self._sealer.seal(content_type, bytes(data[i : i + MAX_PLAINTEXT]))
            for i in range(0, max(len(data), 1), MAX_PLAINTEXT)
        )

    def send(self, data: memoryview) -> int:
        # Records go out whole (sendall): a partial record would corrupt the stream.
        # At most _SEND_MAX per call keeps memory bounded; sendall() loops.
        data = data[:_SEND_MAX]
        self._sock.sendall(self._seal_all(ContentType.APPLICATION_DATA, data))
        return len(data)

    def send_record(self, content_type: ContentType, payload: bytes) -> None:
        self._sock.sendall(self._sealer.seal(content_type, payload))

    def sendfile(self, file: BinaryIO, offset: int, count: int | None) -> int:
        file.seek(offset)
        sent = 0
        while count is None or sent < count:
            want = _FILE_CHUNK if count is None else min(_FILE_CHUNK, count - sent)
            chunk = file.read(want)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[self.send(view) :]
            sent += len(chunk)
        file.seek(offset + sent)
        return sent

    def rekey(self, keys: TrafficKeys) -> None:
        self._sealer = Sealer.from_keys(self._version, self._cipher, keys)


class SoftwareRx(_SoftwareDirection, RxEngine):
    def __init__(
        self, sock: socket.socket, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys
    ) -> None:
        super().__init__(sock, version, cipher)
        self._opener = Opener.from_keys(version, cipher, keys)
        self._records = RecordBuffer(
            max_length=max_ciphertext(version), versions=PROTECTED_VERSIONS
        )

    def recv_record(self, bufsize: int) -> tuple[ContentType, bytes] | None:
        while True:
            record = self._records.next_record()
            if record is not None:
                return self._opener.open(*record)
            data = self._sock.recv(max(bufsize, _READ_SIZE))
            if not data:
                return None
            self._records.feed(data)

    def buffered(self) -> bool:
        return self._records.pending() > 0 and self._records.needed() == 0

    def rekey(self, keys: TrafficKeys) -> None:
        self._opener = Opener.from_keys(self._version, self._cipher, keys)
