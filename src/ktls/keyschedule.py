"""Key derivation for the kernel's record layer: TLS 1.3 HKDF-Expand-Label and the TLS 1.2 PRF.

The handshake runs in OpenSSL; what the kernel needs afterwards is the raw write key and
IV (or salt) of each direction.  This module turns the secrets OpenSSL reports into that
key material, and advances TLS 1.3 traffic secrets on KeyUpdate.

Sans-IO: pure functions over ``bytes``, no sockets, no files.  The HMAC and HKDF
primitives come from ``cryptography``; nothing here hashes by hand.

Every argument error raises :class:`ValueError` with a message naming the bound that was
broken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

__all__ = [
    "SUPPORTED_HASHES",
    "Tls12KeyBlock",
    "hash_length",
    "hkdf_expand_label",
    "hkdf_label",
    "split_tls12_key_block",
    "tls12_key_block",
    "tls12_key_block_length",
    "tls12_prf",
    "tls13_next_traffic_secret",
    "tls13_traffic_key_iv",
]

_TLS13_LABEL_PREFIX: Final = b"tls13 "
# RFC 8446 §7.1: ``opaque label<7..255> = "tls13 " + Label; opaque context<0..255>;``
_MAX_LABEL_LEN: Final = 255 - len(_TLS13_LABEL_PREFIX)
_MAX_CONTEXT_LEN: Final = 255
# RFC 5869 §2.3: HKDF-Expand yields at most 255 blocks of HashLen octets.
_HKDF_MAX_BLOCKS: Final = 255
# RFC 5246 §8.1 and §7.4.1.2: the master secret is 48 bytes, each Random 32 bytes.
_TLS12_MASTER_SECRET_LEN: Final = 48
_TLS12_RANDOM_LEN: Final = 32


def _hmac_works(algorithm: hashes.HashAlgorithm) -> bool:
    """Whether this cryptography/OpenSSL build can compute HMAC with ``algorithm``."""
    try:
        hmac.HMAC(b"\x00" * 32, algorithm).finalize()
    except UnsupportedAlgorithm:
        return False
    return True


# SM3 (RFC 8998, the TLS_SM4_*_SM3 suites) exists in ``cryptography`` but the OpenSSL
# underneath may be built without it, so it is offered only when HMAC-SM3 works here.
_KNOWN_HASHES: Final[dict[str, Callable[[], hashes.HashAlgorithm]]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sm3": hashes.SM3,
}
_AVAILABLE_HASHES: Final[dict[str, Callable[[], hashes.HashAlgorithm]]] = {
    name: factory for name, factory in _KNOWN_HASHES.items() if _hmac_works(factory())
}

#: The ``hash_name`` values this build accepts ("sha256", "sha384", and "sm3" when the
#: OpenSSL under ``cryptography`` supports it).
SUPPORTED_HASHES: Final[tuple[str, ...]] = tuple(_AVAILABLE_HASHES)


def _hash_algorithm(hash_name: str) -> hashes.HashAlgorithm:
    factory = _AVAILABLE_HASHES.get(hash_name)
    if factory is not None:
        return factory()
    supported = ", ".join(SUPPORTED_HASHES)
    if hash_name in _KNOWN_HASHES:
        raise ValueError(
            f"hash {hash_name!r} is not supported by the OpenSSL under 'cryptography' "
            f"in this environment; supported: {supported}"
        )
    raise ValueError(f"unsupported hash {hash_name!r}; supported: {supported}")


def hash_length(hash_name: str) -> int:
    """Hash.length in bytes for ``hash_name`` (32 for sha256 and sm3, 48 for sha384)."""
    return _hash_algorithm(hash_name).digest_size


# --------------------------------------------------------------------------- TLS 1.3


def hkdf_label(label: bytes, context: bytes, length: int) -> bytes:
    """Encode the RFC 8446 §7.1 ``HkdfLabel`` struct used as HKDF-Expand ``info``.

    ``struct { uint16 length; opaque label<7..255>; opaque context<0..255>; }`` with the
    label prefixed by ``"tls13 "``.
    """
    if not 1 <= len(label) <= _MAX_LABEL_LEN:
        raise ValueError(
            f"label must be 1..{_MAX_LABEL_LEN} bytes (255 with the 'tls13 ' prefix), "
            f"got {len(label)}"
        )
    if len(context) > _MAX_CONTEXT_LEN:
        raise ValueError(f"context must be at most {_MAX_CONTEXT_LEN} bytes, got {len(context)}")
    if not 0 <= length <= 0xFFFF:
        raise ValueError(f"length must fit in a uint16, got {length}")
    full_label = _TLS13_LABEL_PREFIX + label
    return (
        length.to_bytes(2, "big")
        + len(full_label).to_bytes(1, "big")
        + full_label
        + len(context).to_bytes(1, "big")
        + context
    )


def hkdf_expand_label(
    hash_name: str, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """RFC 8446 §7.1 ``HKDF-Expand-Label(Secret, Label, Context, Length)``.

    ``label`` is given without the ``"tls13 "`` prefix (e.g. ``b"key"``).  ``secret``
    must be Hash.length bytes: every secret TLS 1.3 expands is the output of
    HKDF-Extract or Derive-Secret, so any other size means the wrong hash or a
    truncated secret.  ``length`` must be 1..255*Hash.length (RFC 5869 §2.3).
    """
    algorithm = _hash_algorithm(hash_name)
    hash_len = algorithm.digest_size
    if len(secret) != hash_len:
        raise ValueError(
            f"secret must be {hash_len} bytes (Hash.length of {hash_name}), got {len(secret)}"
        )
    max_length = _HKDF_MAX_BLOCKS * hash_len
    if not 1 <= length <= max_length:
        raise ValueError(
            f"length must be 1..{max_length} (255*Hash.length for {hash_name}), got {length}"
        )
    info = hkdf_label(label, context, length)
    return HKDFExpand(algorithm, length, info).derive(secret)


def tls13_traffic_key_iv(
    hash_name: str, traffic_secret: bytes, key_len: int, iv_len: int
) -> tuple[bytes, bytes]:
    """RFC 8446 §7.3: the write key and IV of a traffic secret, as ``(key, iv)``.

    ``key = HKDF-Expand-Label(secret, "key", "", key_len)`` and
    ``iv = HKDF-Expand-Label(secret, "iv", "", iv_len)``.
    """
    if key_len < 1:
        raise ValueError(f"key_len must be positive, got {key_len}")
    if iv_len < 1:
        raise ValueError(f"iv_len must be positive, got {iv_len}")
    key = hkdf_expand_label(hash_name, traffic_secret, b"key", b"", key_len)
    iv = hkdf_expand_label(hash_name, traffic_secret, b"iv", b"", iv_len)
    return key, iv


def tls13_next_traffic_secret(hash_name: str, traffic_secret: bytes) -> bytes:
    """RFC 8446 §7.2: the traffic secret after a KeyUpdate.

    ``application_traffic_secret_N+1 =
    HKDF-Expand-Label(application_traffic_secret_N, "traffic upd", "", Hash.length)``
    """
    return hkdf_expand_label(hash_name, traffic_secret, b"traffic upd", b"", hash_length(hash_name))


# --------------------------------------------------------------------------- TLS 1.2


def tls12_prf(hash_name: str, secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """RFC 5246 §5 ``PRF(secret, label, seed) = P_<hash>(secret, label + seed)``.

    ``hash_name`` is the suite's PRF hash (sha256 for most suites, sha384 for the
    ``*_SHA384`` ones).  The output is the first ``length`` bytes of the P_hash stream,
    so a shorter request is always a prefix of a longer one.
    """
    algorithm = _hash_algorithm(hash_name)
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    # cryptography exposes HMAC and HKDF but no TLS 1.2 PRF, so the P_hash loop is
    # written here; every HMAC in it is computed by cryptography.
    #   A(0) = label + seed;  A(i) = HMAC(secret, A(i-1))
    #   P_hash = HMAC(secret, A(1) + label + seed) + HMAC(secret, A(2) + label + seed) + ...
    keyed = hmac.HMAC(secret, algorithm)
    label_seed = label + seed
    a = label_seed
    out = bytearray()
    while len(out) < length:
        mac = keyed.copy()
        mac.update(a)
        a = mac.finalize()
        mac = keyed.copy()
        mac.update(a + label_seed)
        out += mac.finalize()
    return bytes(out[:length])


def tls12_key_block(
    hash_name: str,
    master_secret: bytes,
    server_random: bytes,
    client_random: bytes,
    length: int,
) -> bytes:
    """RFC 5246 §6.3: ``PRF(master_secret, "key expansion", server_random + client_random)``.

    Note the order: server random first (the master secret uses client first).
    """
    if len(master_secret) != _TLS12_MASTER_SECRET_LEN:
        raise ValueError(
            f"master_secret must be {_TLS12_MASTER_SECRET_LEN} bytes, got {len(master_secret)}"
        )
    for name, random in (("server_random", server_random), ("client_random", client_random)):
        if len(random) != _TLS12_RANDOM_LEN:
            raise ValueError(f"{name} must be {_TLS12_RANDOM_LEN} bytes, got {len(random)}")
    return tls12_prf(
        hash_name, master_secret, b"key expansion", server_random + client_random, length
    )


@dataclass(frozen=True, slots=True)
class Tls12KeyBlock:
    """The write keys and IVs of a TLS 1.2 AEAD suite, cut from the key block.

    For AES-GCM/CCM (RFC 5288, RFC 6655) each IV is the 4-byte implicit "salt"; the
    8-byte explicit nonce travels in each record.  For ChaCha20-Poly1305 (RFC 7905) each
    IV is the full 12-byte nonce mask.  The fields are kept out of ``repr`` so that
    logging the object does not leak keys.
    """

    client_write_key: bytes = field(repr=False)
    server_write_key: bytes = field(repr=False)
    client_write_iv: bytes = field(repr=False)
    server_write_iv: bytes = field(repr=False)


def tls12_key_block_length(key_len: int, iv_len: int) -> int:
    """Bytes of key block an AEAD suite consumes: ``2 * key_len + 2 * iv_len``.

    AEAD suites have no MAC keys (RFC 5246 §6.3 with mac_key_length = 0).  ``iv_len``
    is 4 for GCM/CCM and 12 for ChaCha20-Poly1305.
    """
    if key_len < 1:
        raise ValueError(f"key_len must be positive, got {key_len}")
    if iv_len < 1:
        raise ValueError(f"iv_len must be positive, got {iv_len}")
    return 2 * key_len + 2 * iv_len


def split_tls12_key_block(block: bytes, key_len: int, iv_len: int) -> Tls12KeyBlock:
    """Cut an AEAD key block in the RFC 5246 §6.3 order.

    The order is client_write_key, server_write_key, client_write_IV, server_write_IV
    (the two MAC keys that would come first are empty for AEAD suites).  ``block`` must
    be exactly :func:`tls12_key_block_length` bytes.
    """
    expected = tls12_key_block_length(key_len, iv_len)
    if len(block) != expected:
        raise ValueError(
            f"key block must be {expected} bytes for key_len={key_len}, iv_len={iv_len}, "
            f"got {len(block)}"
        )
    ivs = 2 * key_len
    return Tls12KeyBlock(
        client_write_key=block[:key_len],
        server_write_key=block[key_len:ivs],
        client_write_iv=block[ivs : ivs + iv_len],
        server_write_iv=block[ivs + iv_len :],
    )
