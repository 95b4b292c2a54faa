"""ktls: kernel TLS for Python.

The handshake runs in OpenSSL (pyOpenSSL); the record layer runs in the Linux
kernel's TLS ULP when it can, and in an equivalent software engine when it can't.
"""

from __future__ import annotations

from .context import ClientContext, ServerContext, TLSListener
from .errors import (
    AlertReceived,
    BrokenError,
    CipherUnsupported,
    ClosedError,
    ConfigError,
    HandshakeError,
    KernelUnsupported,
    KTLSError,
    ProtocolViolation,
    RekeyUnsupported,
    SoftwareUnsupported,
    TruncatedStream,
    ULPUnavailable,
)
from .kernel import KernelCapabilities, capabilities
from .session import Session, TrafficKeys
from .suites import CIPHERS, SUITES, Cipher, Suite
from .tlssocket import TLSSocket
from .wire import AlertDescription, ProtocolVersion

__version__ = "0.1.0"

__all__ = [
    "CIPHERS",
    "SUITES",
    "AlertDescription",
    "AlertReceived",
    "BrokenError",
    "Cipher",
    "CipherUnsupported",
    "ClientContext",
    "ClosedError",
    "ConfigError",
    "HandshakeError",
    "KTLSError",
    "KernelCapabilities",
    "KernelUnsupported",
    "ProtocolVersion",
    "ProtocolViolation",
    "RekeyUnsupported",
    "ServerContext",
    "Session",
    "SoftwareUnsupported",
    "Suite",
    "TLSListener",
    "TLSSocket",
    "TrafficKeys",
    "TruncatedStream",
    "ULPUnavailable",
    "__version__",
    "capabilities",
]
