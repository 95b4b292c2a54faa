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
from .errors import ProtocolViolation
from .protection import RecordReceiver, RecordSender
from .records import MAX_PLAINTEXT
from .session import TrafficKeys
from .suites import Cipher
from .wire import ContentType, ProtocolVersion

__all__ = ["SoftwareRx", "SoftwareTx"]

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
        # Sealed bytes not yet taken by the socket are _out[_sent:_filled].  The buffer
        # grows to what the largest call needed (at most about _SEND_MAX) and is reused
        # from the start once all went out: no allocation per call.
        self._out = bytearray()
        self._filled = 0
        self._sent = 0
        # Plaintext length of the data records in _out from a call that could not finish:
        # the caller retries with the same data and is told it was taken.
        self._taken_pending = 0

    @property
    def queued(self) -> bool:
        return self._sent < self._filled

    def _room(self, size: int) -> memoryview:
        """Room for ``size`` more sealed bytes after what is queued."""
        missing = self._filled + size - len(self._out)
        if missing > 0:
            self._out += bytes(missing)
        return memoryview(self._out)[self._filled : self._filled + size]

    def queue_record(self, content_type: ContentType, payload: bytes) -> None:
        room = self._room(len(payload) + self._sender.overhead)
        self._filled += self._sender.seal_into(content_type, payload, room)

    def queue_keys(self, keys: TrafficKeys) -> None:
        # What is queued is sealed already: the new keys apply from here on.
        self._sender.rekey(keys)

    def flush(self, flags: int = 0) -> None:
        if self._sent == self._filled:
            return
        with memoryview(self._out) as out:
            while self._sent < self._filled:
                self._sent += self._sock.send(out[self._sent : self._filled], flags)
        self._filled = self._sent = 0

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
        if self._sent < self._filled:
            self.flush(flags)
        self._filled = self._sent = 0
        taken, self._taken_pending = self._taken_pending, 0
        return taken

    def send_data(self, data: memoryview, flags: int = 0) -> int:
        if self._taken_pending:  # the retry of a call that had sealed its data
            if len(data) < self._taken_pending:
                raise ValueError("send() retried with less data than the interrupted call")
            return self._finish_interrupted(flags)
        if self._filled:
            self.flush(flags)  # queued control records go first
        chunk = data[:_SEND_MAX]
        size = len(chunk)
        if not size:
            return 0
        with self._room(self._sender.sealed_size(size)) as room:  # at 0: nothing queued
            filled = self._filled = self._sender.seal_data_into(chunk, room)
            # Recorded before sending: should the send fail with EAGAIN, the retry
            # finishes this call's records instead of sealing the data again.
            self._taken_pending = size
            sent = self._sent = self._sock.send(room[:filled], flags)
        if sent < filled:
            return self._finish_interrupted(flags)
        self._filled = self._sent = self._taken_pending = 0
        return size

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
        # Opened while filling a caller's buffer, for the next call: a record that did
        # not fit or is not data, or the violation found in the record after the data.
        self._held: tuple[ContentType, memoryview] | ProtocolViolation | None = None

    def read_into(
        self, buffer: memoryview, flags: int = 0
    ) -> tuple[ContentType, memoryview | int] | None:
        # Like the kernel: consecutive data records already here are merged into the
        # caller's buffer (one call, one trip through the driver); a record is opened
        # where it lies, so the one copy is into ``buffer``.  Anything else is returned
        # as a view of the receiver's buffer, valid until the next call.
        receiver = self._receiver
        record: tuple[ContentType, memoryview] | None
        if self._held is not None:
            record = self._take_held()
        else:
            record = receiver.next_record()
            while record is None:
                room = receiver.receive_buffer()
                count = self._sock.recv_into(room, 0, flags)
                if not count:
                    return None  # a record cut short by the end of the stream is truncation too
                receiver.received(count)
                record = receiver.next_record()
        content_type, plaintext = record
        if content_type is not ContentType.APPLICATION_DATA or len(plaintext) > len(buffer):
            return record
        filled = len(plaintext)
        buffer[:filled] = plaintext
        while filled < len(buffer):
            try:
                following = receiver.next_record()
            except ProtocolViolation as exc:
                self._held = exc  # this call's data is good; the next call fails
                break
            if following is None:
                break
            content_type, plaintext = following
            if content_type is not ContentType.APPLICATION_DATA or (
                len(plaintext) > len(buffer) - filled
            ):
                self._held = following
                break
            buffer[filled : filled + len(plaintext)] = plaintext
            filled += len(plaintext)
        return ContentType.APPLICATION_DATA, filled

    def _take_held(self) -> tuple[ContentType, memoryview]:
        held, self._held = self._held, None
        if isinstance(held, ProtocolViolation):
            raise held
        assert held is not None
        return held

    def ready(self) -> int | None:
        # A whole record in user space (select() won't show it) must be opened to know
        # its type; bytes still in the socket are for select() to see.
        held = self._held
        if held is None:
            return None if self._receiver.has_record() else 0
        if isinstance(held, tuple) and held[0] is ContentType.APPLICATION_DATA:
            return len(held[1])
        return None

    def held(self) -> bool:
        return self._held is not None or self._receiver.has_record()

    def rekey(self, keys: TrafficKeys) -> None:
        self._receiver.rekey(keys)

    def rekey_refusal(self) -> str | None:
        return None

    def crypto_info(self) -> None:
        return None
