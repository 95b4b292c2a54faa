"""What a record engine offers a driver, per direction.

Two implementations exist: :mod:`ktls.kernel` (the Linux TLS ULP does the records)
and :mod:`ktls.software` (``cryptography``'s AEADs, same rules).  Drivers (the
blocking :class:`~ktls.tlssocket.TLSSocket`, the asyncio transport) only ever talk to
these two protocols, which is what makes the software engine a true drop-in.

Every call makes at most the system calls needed and never waits by itself beyond what
the socket's own blocking mode implies: on a non-blocking socket (or with
``MSG_DONTWAIT`` in ``flags``) a call that cannot go on raises ``BlockingIOError``
and keeps its state, so the driver waits for readiness in its own way and calls
again.  The post-hand-off protocol itself is not here: see :mod:`ktls.core`.
"""

from __future__ import annotations

from typing import Literal, Protocol

from .linux import CryptoInfo
from .session import TrafficKeys
from .wire import ContentType

__all__ = ["EngineName", "RxEngine", "TxEngine"]

EngineName = Literal["kernel", "software"]


class TxEngine(Protocol):
    name: EngineName

    def send_data(self, data: memoryview, flags: int = 0) -> int:
        """Send application data after everything queued; return how many bytes were
        taken (at least one).

        ``BlockingIOError`` means none of ``data`` was taken -- except on the software
        engine after a record went out in part: like ``ssl``, call again with the same
        data and the call returns the length of what had been taken."""

    def queue_record(self, content_type: ContentType, payload: bytes) -> None:
        """Queue one whole non-data record (alert, handshake message); it goes out
        before any later data.  Call :meth:`flush` to push it."""

    def queue_keys(self, keys: TrafficKeys) -> None:
        """Protect every record queued after this call with ``keys`` (KeyUpdate)."""

    def flush(self, flags: int = 0) -> None:
        """Send what is queued; ``BlockingIOError`` when some of it must wait."""

    @property
    def queued(self) -> bool:
        """Whether records or bytes wait to be sent."""

    def drain(self, timeout: float | None) -> bool:
        """Send what is queued and wait (at most ``timeout`` seconds, None: no limit)
        until the TCP socket holds it all, whatever the socket's mode: what must reach
        the peer before a close or a shutdown.  False when the time ran out; OSError
        (or a KTLSError from a key change) when the socket failed."""

    def sendfile(self, file_fd: int, offset: int, count: int, flags: int = 0) -> int:
        """Send up to ``count`` bytes of a file from ``offset`` as application data;
        return how many were sent (0: end of file).  Same retry rule as send_data."""

    def rekey_refusal(self) -> str | None:
        """None when this engine can change keys (TLS 1.3 KeyUpdate), else why not."""

    def crypto_info(self) -> CryptoInfo | None:
        """The kernel's live state for this direction (None on the software engine)."""


class RxEngine(Protocol):
    name: EngineName

    def read_into(
        self, buffer: memoryview, flags: int = 0
    ) -> tuple[ContentType, memoryview | int] | None:
        """The next plaintext: one whole non-data record, or application data (one record
        or, from the kernel, several merged).  The engine may put application data
        straight into ``buffer`` (at most ``len(buffer)`` bytes) and return its length;
        otherwise it returns a view of its own storage, valid until the next call.  None
        means TCP end of stream.  Raises ProtocolViolation for a record that must not be
        accepted (the alert it names is owed to the peer)."""

    def ready(self) -> int | None:
        """Application data bytes a read returns now without waiting (0: none known),
        or None when something else comes first (a control record, a whole record of
        unknown type, an error, the end): read it to find out.  Without waiting."""

    def held(self) -> bool:
        """Whether a read may find something ready that poll() does not show: True
        while records wait in user space, and always on a kernel that hides records it
        decrypted ahead.  Event loops wait for readability only when this is False."""

    def rekey(self, keys: TrafficKeys) -> None:
        """Open every following record with new keys (TLS 1.3 KeyUpdate)."""

    def rekey_refusal(self) -> str | None:
        """None when this engine can change keys (TLS 1.3 KeyUpdate), else why not."""

    def crypto_info(self) -> CryptoInfo | None:
        """The kernel's live state for this direction (None on the software engine)."""
