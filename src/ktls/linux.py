"""Linux kernel TLS ABI: constants and ``crypto_info`` packing (include/uapi/linux/tls.h).

Pure functions only: the socket calls live in :mod:`ktls.kernel`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .session import TrafficKeys
from .suites import CIPHERS, Cipher
from .wire import ProtocolVersion

__all__ = [
    "SOL_TLS",
    "TCP_ULP",
    "TLS_GET_RECORD_TYPE",
    "TLS_RX",
    "TLS_RX_EXPECT_NO_PAD",
    "TLS_SET_RECORD_TYPE",
    "TLS_TX",
    "TLS_TX_ZEROCOPY_RO",
    "CryptoInfo",
    "pack_crypto_info",
    "parse_tls_stat",
    "unpack_crypto_info",
]

TCP_ULP = 31  # setsockopt(SOL_TCP, TCP_ULP, b"tls"): attach the TLS upper-layer protocol
SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2
TLS_TX_ZEROCOPY_RO = 3  # Linux 5.19: sendfile without copying (file must not change meanwhile)
TLS_RX_EXPECT_NO_PAD = 4  # Linux 6.0: TLS 1.3 RX decrypts in place, assuming no padding
TLS_SET_RECORD_TYPE = 1  # cmsg type on sendmsg: send a non-data record
TLS_GET_RECORD_TYPE = 2  # cmsg type on recvmsg: the content type of what was read

_INFO = struct.Struct("=HH")  # struct tls_crypto_info { __u16 version; __u16 cipher_type; }
_BY_TYPE = {c.kernel_type: c for c in CIPHERS.values()}


def pack_crypto_info(version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys) -> bytes:
    """Build the ``tls12_crypto_info_*`` struct: info, iv, key, salt, rec_seq.

    The kernel's field called ``iv`` is the explicit part of the nonce; ``salt`` is the
    implicit part.  TLS 1.3 GCM/CCM: salt = iv[0:4], iv = iv[4:12].  TLS 1.2 GCM/CCM:
    salt = key block IV, iv = first explicit nonce the kernel will send (it increments
    it per record).  ChaCha20-Poly1305: iv = the whole 12-byte IV, no salt.
    """
    if len(keys.key) != cipher.key_len:
        raise ValueError(f"{cipher.name} needs a {cipher.key_len}-byte key")
    if cipher.salt_len == 0:
        salt, iv = b"", keys.iv
    elif version is ProtocolVersion.TLS1_3:
        salt, iv = keys.iv[: cipher.salt_len], keys.iv[cipher.salt_len :]
    else:
        salt = keys.iv
        iv = (keys.seq if keys.explicit_nonce is None else keys.explicit_nonce).to_bytes(
            cipher.iv_len, "big"
        )
    if len(salt) != cipher.salt_len or len(iv) != cipher.iv_len:
        raise ValueError(f"bad IV length for {cipher.name}")
    return (
        _INFO.pack(version, cipher.kernel_type) + iv + keys.key + salt + keys.seq.to_bytes(8, "big")
    )


@dataclass(frozen=True)
class CryptoInfo:
    version: int
    cipher: Cipher | None
    cipher_type: int
    iv: bytes
    key: bytes
    salt: bytes
    rec_seq: int


def unpack_crypto_info(data: bytes) -> CryptoInfo:
    """Decode what ``getsockopt(SOL_TLS, TLS_TX/TLS_RX)`` returns."""
    version, cipher_type = _INFO.unpack_from(data)
    cipher = _BY_TYPE.get(cipher_type)
    if cipher is None:
        return CryptoInfo(version, None, cipher_type, b"", b"", b"", 0)
    offset = _INFO.size
    iv = data[offset : offset + cipher.iv_len]
    offset += cipher.iv_len
    key = data[offset : offset + cipher.key_len]
    offset += cipher.key_len
    salt = data[offset : offset + cipher.salt_len]
    offset += cipher.salt_len
    rec_seq = int.from_bytes(data[offset : offset + 8], "big")
    return CryptoInfo(version, cipher, cipher_type, iv, key, salt, rec_seq)


def crypto_info_size(cipher: Cipher) -> int:
    return _INFO.size + cipher.iv_len + cipher.key_len + cipher.salt_len + 8


def parse_tls_stat(text: str) -> dict[str, int]:
    """Parse ``/proc/net/tls_stat`` ("TlsCurrTxSw   0" lines)."""
    stats: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            stats[parts[0]] = int(parts[1])
    return stats
