"""The cipher suites ktls can move into the kernel, as two tables.

``CIPHERS`` describes each AEAD the way ``include/uapi/linux/tls.h`` lays out its
``crypto_info``; ``SUITES`` maps every offloadable TLS 1.2/1.3 suite (OpenSSL name,
IANA id) to one of those ciphers and its handshake hash.  Nothing else in the package
hard-codes a size or a suite name.
"""

from __future__ import annotations

from dataclasses import dataclass

from .wire import ProtocolVersion

__all__ = ["CIPHERS", "SUITES", "Cipher", "Suite", "suite_by_id", "suite_by_name"]

TLS12 = ProtocolVersion.TLS1_2
TLS13 = ProtocolVersion.TLS1_3


@dataclass(frozen=True)
class Cipher:
    """An AEAD as the kernel's TLS layer knows it."""

    name: str
    kernel_type: int  # TLS_CIPHER_* in linux/tls.h
    key_len: int
    salt_len: int  # implicit nonce part (0 for ChaCha20-Poly1305)
    iv_len: int  # crypto_info.iv: the explicit nonce (8) or, for ChaCha, the whole nonce (12)
    kernel_since: str  # first Linux release with this cipher in kTLS
    tag_len: int = 16

    @property
    def nonce_len(self) -> int:
        """Length of the per-record AEAD nonce (always 12 for TLS)."""
        return self.salt_len + self.iv_len if self.salt_len else self.iv_len

    @property
    def tls12_explicit_nonce_len(self) -> int:
        """Bytes of explicit nonce in each TLS 1.2 record (RFC 5288: 8; RFC 7905: 0)."""
        return self.iv_len if self.salt_len else 0

    @property
    def tls12_fixed_iv_len(self) -> int:
        """Bytes of the TLS 1.2 key block's "write IV" for this cipher."""
        return self.salt_len if self.salt_len else self.iv_len


#   name                 type key salt iv  since
CIPHERS: dict[str, Cipher] = {
    c.name: c
    for c in (
        Cipher("AES-128-GCM", 51, 16, 4, 8, "4.13"),
        Cipher("AES-256-GCM", 52, 32, 4, 8, "5.1"),
        Cipher("AES-128-CCM", 53, 16, 4, 8, "5.2"),
        Cipher("CHACHA20-POLY1305", 54, 32, 0, 12, "5.11"),
        Cipher("SM4-GCM", 55, 16, 4, 8, "5.16"),
        Cipher("SM4-CCM", 56, 16, 4, 8, "5.16"),
        Cipher("ARIA-128-GCM", 57, 16, 4, 8, "6.1"),
        Cipher("ARIA-256-GCM", 58, 32, 4, 8, "6.1"),
    )
}


@dataclass(frozen=True)
class Suite:
    """One TLS cipher suite whose record protection the kernel can take over."""

    openssl_name: str
    iana_id: int
    version: ProtocolVersion
    cipher: Cipher
    hash_name: str  # of the handshake / PRF / HKDF

    @property
    def iana_name(self) -> str:
        return IANA_NAMES.get(self.iana_id, self.openssl_name)


def _suite(name: str, iana_id: int, version: ProtocolVersion, cipher: str, hash_name: str) -> Suite:
    return Suite(name, iana_id, version, CIPHERS[cipher], hash_name)


#   OpenSSL name                          IANA id  version cipher               hash
SUITES: tuple[Suite, ...] = (
    _suite("TLS_AES_128_GCM_SHA256",          0x1301, TLS13, "AES-128-GCM",       "sha256"),
    _suite("TLS_AES_256_GCM_SHA384",          0x1302, TLS13, "AES-256-GCM",       "sha384"),
    _suite("TLS_CHACHA20_POLY1305_SHA256",    0x1303, TLS13, "CHACHA20-POLY1305", "sha256"),
    _suite("TLS_AES_128_CCM_SHA256",          0x1304, TLS13, "AES-128-CCM",       "sha256"),
    _suite("TLS_SM4_GCM_SM3",                 0x00C6, TLS13, "SM4-GCM",           "sm3"),
    _suite("TLS_SM4_CCM_SM3",                 0x00C7, TLS13, "SM4-CCM",           "sm3"),
    _suite("ECDHE-ECDSA-AES128-GCM-SHA256",   0xC02B, TLS12, "AES-128-GCM",       "sha256"),
    _suite("ECDHE-RSA-AES128-GCM-SHA256",     0xC02F, TLS12, "AES-128-GCM",       "sha256"),
    _suite("DHE-RSA-AES128-GCM-SHA256",       0x009E, TLS12, "AES-128-GCM",       "sha256"),
    _suite("ECDHE-ECDSA-AES256-GCM-SHA384",   0xC02C, TLS12, "AES-256-GCM",       "sha384"),
    _suite("ECDHE-RSA-AES256-GCM-SHA384",     0xC030, TLS12, "AES-256-GCM",       "sha384"),
    _suite("DHE-RSA-AES256-GCM-SHA384",       0x009F, TLS12, "AES-256-GCM",       "sha384"),
    _suite("ECDHE-ECDSA-CHACHA20-POLY1305",   0xCCA9, TLS12, "CHACHA20-POLY1305", "sha256"),
    _suite("ECDHE-RSA-CHACHA20-POLY1305",     0xCCA8, TLS12, "CHACHA20-POLY1305", "sha256"),
    _suite("DHE-RSA-CHACHA20-POLY1305",       0xCCAA, TLS12, "CHACHA20-POLY1305", "sha256"),
    _suite("ECDHE-ECDSA-AES128-CCM",          0xC0AC, TLS12, "AES-128-CCM",       "sha256"),
    _suite("DHE-RSA-AES128-CCM",              0xC09E, TLS12, "AES-128-CCM",       "sha256"),
    _suite("ECDHE-ECDSA-ARIA128-GCM-SHA256",  0xC05C, TLS12, "ARIA-128-GCM",      "sha256"),
    _suite("ECDHE-ECDSA-ARIA256-GCM-SHA384",  0xC05D, TLS12, "ARIA-256-GCM",      "sha384"),
    _suite("ECDHE-ARIA128-GCM-SHA256",        0xC060, TLS12, "ARIA-128-GCM",      "sha256"),
    _suite("ECDHE-ARIA256-GCM-SHA384",        0xC061, TLS12, "ARIA-256-GCM",      "sha384"),
)  # fmt: skip

IANA_NAMES: dict[int, str] = {
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    0x009E: "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
    0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    0x009F: "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCAA: "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xC0AC: "TLS_ECDHE_ECDSA_WITH_AES_128_CCM",
    0xC09E: "TLS_DHE_RSA_WITH_AES_128_CCM",
    0xC05C: "TLS_ECDHE_ECDSA_WITH_ARIA_128_GCM_SHA256",
    0xC05D: "TLS_ECDHE_ECDSA_WITH_ARIA_256_GCM_SHA384",
    0xC060: "TLS_ECDHE_RSA_WITH_ARIA_128_GCM_SHA256",
    0xC061: "TLS_ECDHE_RSA_WITH_ARIA_256_GCM_SHA384",
}

_BY_NAME = {s.openssl_name: s for s in SUITES}
_BY_NAME.update({s.iana_name: s for s in SUITES})
_BY_ID = {s.iana_id: s for s in SUITES}


def suite_by_name(name: str) -> Suite | None:
    """Look a suite up by its OpenSSL or IANA name; None when it can't be offloaded."""
    return _BY_NAME.get(name)


def suite_by_id(iana_id: int) -> Suite | None:
    return _BY_ID.get(iana_id)


def suites_for(version: ProtocolVersion) -> tuple[Suite, ...]:
    return tuple(s for s in SUITES if s.version is version)
