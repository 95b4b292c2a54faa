"""The exceptions of ktls: one root, one branch per kind of failure.

Every error this package raises derives from :class:`KTLSError`.  ``OSError`` and
OpenSSL errors are translated only at the I/O edges, with ``raise ... from`` so that
the original stays visible in ``__cause__``.  ``TimeoutError`` is not a failure and
passes through untouched.
"""

from __future__ import annotations

from .wire import AlertDescription

__all__ = [
    "AlertReceived",
    "BrokenError",
    "CipherUnsupported",
    "ClosedError",
    "ConfigError",
    "HandshakeError",
    "KTLSError",
    "KernelUnsupported",
    "ProtocolViolation",
    "RekeyUnsupported",
    "SoftwareUnsupported",
    "TruncatedStream",
    "ULPUnavailable",
]


class KTLSError(Exception):
    """Root of every error raised by ktls."""


class ConfigError(KTLSError, ValueError):
    """Bad arguments or files given by the caller: a wrong key path, an unknown cipher."""


class HandshakeError(KTLSError):
    """The TLS handshake failed (verification, no common cipher, peer alert, ...).

    ``alert`` is the alert involved, if any; ``received`` tells whether the peer sent
    it (True) or we did (False).
    """

    def __init__(
        self, message: str, *, alert: AlertDescription | None = None, received: bool = False
    ) -> None:
        super().__init__(message)
        self.alert = alert
        self.received = received


class AlertReceived(KTLSError):
    """The peer sent a fatal alert after the handshake; the connection is over."""

    def __init__(self, alert: AlertDescription | int) -> None:
        self.alert = alert
        name = alert.name.lower() if isinstance(alert, AlertDescription) else f"unknown({alert})"
        super().__init__(f"peer sent fatal alert {name} ({int(alert)})")


class ProtocolViolation(KTLSError):
    """The peer broke the TLS record rules (tampered record, oversized record, ...).

    ``alert`` is the alert the RFCs name for the violation; ktls sends it to the peer
    when the socket can still send, then closes.
    """

    def __init__(self, message: str, alert: AlertDescription | None) -> None:
        super().__init__(message if alert is None else f"{message} (alert {alert.name.lower()})")
        self.alert = alert


class TruncatedStream(ProtocolViolation):
    """The peer closed TCP without sending close_notify: data may have been cut off."""

    def __init__(self, message: str = "connection closed without close_notify") -> None:
        super().__init__(message, None)  # nothing to tell a peer that is gone


class KernelUnsupported(KTLSError):
    """This kernel cannot do what was asked (no TLS ULP, cipher not accepted, ...)."""


class ULPUnavailable(KernelUnsupported):
    """The kernel has no usable ``tls`` upper-layer protocol."""


class CipherUnsupported(KernelUnsupported):
    """The kernel's TLS layer refused this cipher/version combination."""


class RekeyUnsupported(KernelUnsupported):
    """The kernel cannot change TLS 1.3 keys (KeyUpdate needs Linux >= 6.14)."""


class SoftwareUnsupported(KTLSError):
    """The software engine cannot carry this cipher (the ``cryptography`` package lacks
    it) where the kernel did not take it either."""


class ClosedError(KTLSError):
    """The connection was closed by this side; no more I/O on it."""


class BrokenError(KTLSError):
    """The connection failed earlier (reset, failed send, protocol error); see ``__cause__``."""
