"""What a record engine offers the connection, per direction.

Two implementations exist: :mod:`ktls.kernel` (the Linux TLS ULP does the records)
and :mod:`ktls.software` (``cryptography``'s AEADs, same rules).  The connection
object only ever talks to these two protocols, which is what makes the software
engine a true drop-in.
"""

from __future__ import annotations

from typing import BinaryIO, Protocol

from .linux import CryptoInfo
from .session import TrafficKeys
from .wire import ContentType

__all__ = ["RxEngine", "TxEngine"]


class TxEngine(Protocol):
    name: str  # "kernel" or "software"

    def send(self, data: memoryview) -> int:
        """Send application data; return how many bytes were taken."""

    def send_record(self, content_type: ContentType, payload: bytes) -> None:
        """Send one whole non-data record (alert, handshake message)."""

    def sendfile(self, file: BinaryIO, offset: int, count: int | None) -> int:
        """Send a file's bytes as application data; return how many were sent."""

    def rekey(self, keys: TrafficKeys) -> None:
        """Protect all following records with new keys (TLS 1.3 KeyUpdate)."""

    def crypto_info(self) -> CryptoInfo | None:
        """The kernel's live state for this direction (None on the software engine)."""


class RxEngine(Protocol):
    name: str

    def recv_record(self, bufsize: int) -> tuple[ContentType, bytes] | None:
        """Return the next plaintext: one non-data record, or application data (one
        record or, from the kernel, several).  ``bufsize`` is a hint: more may come
        back, and the connection keeps the rest.  None means TCP EOF."""

    def rekey(self, keys: TrafficKeys) -> None:
        """Open all following records with new keys (TLS 1.3 KeyUpdate)."""

    def buffered(self) -> bool:
        """Whether a whole record waits in user space (so select() on the fd would not
        show it)."""

    def crypto_info(self) -> CryptoInfo | None:
        """The kernel's live state for this direction (None on the software engine)."""
