"""The hand-off value: what the handshake hands to a record engine.

A :class:`Session` is frozen and complete: version, suite and, for each direction, the
key, IV, sequence number (and for TLS 1.3 the traffic secret, for KeyUpdate).  Exactly
one function turns it into kernel state (:func:`ktls.kernel.install`) and exactly one
into a software engine (:func:`ktls.software.SoftwareTx` / ``SoftwareRx``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from .keyschedule import tls13_next_traffic_secret, tls13_traffic_key_iv
from .suites import Suite
from .wire import ProtocolVersion

__all__ = ["Role", "Session", "TrafficKeys", "next_generation"]


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True)
class TrafficKeys:
    """Keys of one direction, at the record where the kernel (or software) takes over."""

    key: bytes = field(repr=False)
    # TLS 1.3: the 12-byte per-record nonce base.  TLS 1.2: the key block's write IV
    # (4-byte salt for GCM/CCM, 12-byte nonce base for ChaCha20-Poly1305).
    iv: bytes = field(repr=False)
    seq: int
    secret: bytes | None = field(default=None, repr=False)  # TLS 1.3 traffic secret
    # TLS 1.2 GCM/CCM sending side: the next explicit nonce, continuing OpenSSL's.
    explicit_nonce: int | None = None
    generation: int = 0  # how many KeyUpdates led here


def next_generation(suite: Suite, keys: TrafficKeys) -> TrafficKeys:
    """The keys after a TLS 1.3 KeyUpdate (RFC 8446 7.2): new secret, seq back to 0."""
    if suite.version is not ProtocolVersion.TLS1_3 or keys.secret is None:
        raise ValueError("KeyUpdate exists only in TLS 1.3")
    secret = tls13_next_traffic_secret(suite.hash_name, keys.secret)
    key, iv = tls13_traffic_key_iv(
        suite.hash_name, secret, suite.cipher.key_len, suite.cipher.nonce_len
    )
    return replace(keys, key=key, iv=iv, seq=0, secret=secret, generation=keys.generation + 1)


@dataclass(frozen=True)
class Session:
    role: Role
    version: ProtocolVersion
    suite: Suite
    tx: TrafficKeys
    rx: TrafficKeys
    alpn: str | None = None
    server_name: str | None = None
    resumed: bool = False
