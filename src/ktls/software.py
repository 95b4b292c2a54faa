"""The software engine: the same record semantics as the kernel, in user space.

Used when the kernel has no TLS ULP or refuses the cipher, or when asked for.  The
record work is sans-IO (:class:`~ktls.protection.RecordSender` /
:class:`~ktls.protection.RecordReceiver`); this module only moves bytes, and never
loses any: a record that went out in part stays queued until the rest is sent.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import time

from . import sockio
from .engine import EngineName, RxEngine, TxEngine
from .protection import RecordReceiver, RecordSender
from .records import MAX_PLAINTEXT
from .session import TrafficKeys
from .suites import Cipher
from .wire import ContentType, ProtocolVersion

__all__ = ["SoftwareRx", "SoftwareTx"]

_READ_SIZE = 1 << 17
# Plaintext sealed per send call: bounds memory and the data a retry must repeat.
_SEND_MAX = 16 * MAX_PLAINTEXT
_FILE_CHUNK = _SEND_MAX


class SoftwareTx(TxEngine):
    name: EngineName = "software"

    def __init__(
        self, sock: socket.socket, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys
    ) -> None:
        self._sock = sock
        self._sender = RecordSender(version, cipher, keys)
        self._out = bytearray()  # sealed bytes not yet taken by the socket
        self._sent = 0  # how much of _out went out already
        # Plaintext length of the data records in _out from a call that could not finish:
        # the caller retries with the same data and is told it was taken.
        self._taken_pending = 0

    @property
    def queued(self) -> bool:
        return self._sent < len(self._out)

    def queue_record(self, content_type: ContentType, payload: bytes) -> None:
        self._out += self._sender.seal(content_type, payload)

    def queue_keys(self, keys: TrafficKeys) -> None:
        # What is queued is sealed already: the new keys apply from here on.
        self._sender.rekey(keys)

    def flush(self, flags: int = 0) -> None:
        out = memoryview(self._out)
        try:
            while self._sent < len(out):
                self._sent += self._sock.send(out[self._sent :], flags)
        finally:
            out.release()
        self._out.clear()
        self._sent = 0

    def drain(self, timeout: float | None) -> bool:
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        flush = functools.partial(self.flush, socket.MSG_DONTWAIT)
        try:
            sockio.retry(flush, self._sock.fileno(), True, deadline)
        except TimeoutError:
            return False
        return True

    def _finish_interrupted(self, flags: int) -> int:
        """Push out what an interrupted call sealed; return that call's data length."""
        self.flush(flags)
        taken, self._taken_pending = self._taken_pending, 0
        return taken

    def send_data(self, data: memoryview, flags: int = 0) -> int:
        if self._taken_pending:  # the retry of a call that had sealed its data
            if len(data) < self._taken_pending:
                raise ValueError("send() retried with less data than the interrupted call")
            return self._finish_interrupted(flags)
        self.flush(flags)  # queued control records go first
        chunk = data[:_SEND_MAX]
        if not chunk:
            return 0
        self._out += self._sender.seal_data(chunk)
        self._taken_pending = len(chunk)
        return self._finish_interrupted(flags)

    def sendfile(self, file_fd: int, offset: int, count: int, flags: int = 0) -> int:
        if self._taken_pending:  # the retry: the same file range was sealed already
            return self._finish_interrupted(flags)
        data = os.pread(file_fd, min(count, _FILE_CHUNK), offset)
        return self.send_data(memoryview(data), flags) if data else 0

    def rekey_refusal(self) -> str | None:
        return None

    def crypto_info(self) -> None:
        return None  # nothing in the kernel


class SoftwareRx(RxEngine):
    name: EngineName = "software"

    def __init__(
        self, sock: socket.socket, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys
    ) -> None:
        self._sock = sock
        self._receiver = RecordReceiver(version, cipher, keys)

    def read(self, bufsize: int, flags: int = 0) -> tuple[ContentType, bytes] | None:
        while True:
            record = self._receiver.next_record()
            if record is not None:
                return record
            # Whatever the caller asked for: the records come whole, this much at a time.
            data = self._sock.recv(_READ_SIZE, flags)
            if not data:
                return None  # a record cut short by the end of the stream is truncation too
            self._receiver.feed(data)

    def ready(self) -> int | None:
        # A whole record in user space (select() won't show it) must be opened to know
        # its type; bytes still in the socket are for select() to see.
        return None if self._receiver.has_record() else 0

    def rekey(self, keys: TrafficKeys) -> None:
        self._receiver.rekey(keys)

    def rekey_refusal(self) -> str | None:
        return None

    def crypto_info(self) -> None:
        return None
