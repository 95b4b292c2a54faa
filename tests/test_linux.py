"""Unit tests for ktls.linux (the kernel TLS ABI, packed by hand) and session.next_generation.

No socket and no kernel: the expected ``crypto_info`` bytes are built here from the
struct definitions in include/uapi/linux/tls.h::

    struct tls_crypto_info { __u16 version; __u16 cipher_type; };
    struct tls12_crypto_info_aes_gcm_128 {
        struct tls_crypto_info info;
        unsigned char iv[8]; unsigned char key[16]; unsigned char salt[4];
        unsigned char rec_seq[8];
    };

(and likewise for every other cipher: info, iv, key, salt, rec_seq, no padding).
"""

from __future__ import annotations

import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktls import linux
from ktls.keyschedule import SUPPORTED_HASHES, tls13_next_traffic_secret, tls13_traffic_key_iv
from ktls.linux import (
    CryptoInfo,
    crypto_info_size,
    pack_crypto_info,
    parse_tls_stat,
    unpack_crypto_info,
)
from ktls.session import TrafficKeys, next_generation
from ktls.suites import CIPHERS, SUITES, Cipher, Suite, suite_by_name, suites_for
from ktls.wire import ProtocolVersion

TLS12 = ProtocolVersion.TLS1_2
TLS13 = ProtocolVersion.TLS1_3
VERSIONS = [TLS12, TLS13]
ALL_CIPHERS = list(CIPHERS.values())
SALTED = [c for c in ALL_CIPHERS if c.salt_len]
CHACHA = CIPHERS["CHACHA20-POLY1305"]

cipher_param = pytest.mark.parametrize("cipher", ALL_CIPHERS, ids=lambda c: c.name)
salted_param = pytest.mark.parametrize("cipher", SALTED, ids=lambda c: c.name)
version_param = pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.label)


def key_for(cipher: Cipher) -> bytes:
    return bytes(range(0x40, 0x40 + cipher.key_len))


def iv_for(version: ProtocolVersion, cipher: Cipher) -> bytes:
    size = 12 if version is TLS13 or not cipher.salt_len else 4
    return bytes(range(0xA0, 0xA0 + size))


def info_header(version: int, cipher_type: int) -> bytes:
    return struct.pack("=HH", version, cipher_type)  # native order, as the kernel reads it


# --------------------------------------------------------------------------- constants


def test_abi_constants() -> None:
    # include/linux/socket.h, include/uapi/linux/tcp.h, include/uapi/linux/tls.h.
    assert linux.SOL_TLS == 282
    assert linux.TCP_ULP == 31
    assert (linux.TLS_TX, linux.TLS_RX) == (1, 2)
    assert linux.TLS_TX_ZEROCOPY_RO == 3
    assert linux.TLS_RX_EXPECT_NO_PAD == 4
    assert (linux.TLS_SET_RECORD_TYPE, linux.TLS_GET_RECORD_TYPE) == (1, 2)
    # TLS_1_2_VERSION / TLS_1_3_VERSION are the wire versions.
    assert (int(TLS12), int(TLS13)) == (0x0303, 0x0304)


# --------------------------------------------------------------------------- sizes

EXPECTED_SIZES = {
    # sizeof(struct tls12_crypto_info_*) = 4 + iv + key + salt + rec_seq(8)
    "AES-128-GCM": 40,
    "AES-256-GCM": 56,
    "AES-128-CCM": 40,
    "CHACHA20-POLY1305": 56,
    "SM4-GCM": 40,
    "SM4-CCM": 40,
    "ARIA-128-GCM": 40,
    "ARIA-256-GCM": 56,
}


@cipher_param
@version_param
def test_crypto_info_size(version: ProtocolVersion, cipher: Cipher) -> None:
    expected = EXPECTED_SIZES[cipher.name]
    assert expected == 4 + cipher.iv_len + cipher.key_len + cipher.salt_len + 8
    assert crypto_info_size(cipher) == expected
    packed = pack_crypto_info(
        version, cipher, TrafficKeys(key_for(cipher), iv_for(version, cipher), 0)
    )
    assert len(packed) == expected


# --------------------------------------------------------------------------- layout


@salted_param
@pytest.mark.parametrize("seq", [0, 1, 0x0102030405060708, 2**64 - 1])
def test_layout_tls13_gcm_ccm(cipher: Cipher, seq: int) -> None:
    """TLS 1.3: salt = iv[0:4], iv = iv[4:12] (the kernel re-joins them per record)."""
    key, iv = key_for(cipher), iv_for(TLS13, cipher)
    packed = pack_crypto_info(TLS13, cipher, TrafficKeys(key, iv, seq))
    expected = info_header(0x0304, cipher.kernel_type) + iv[4:] + key + iv[:4]
    assert packed == expected + seq.to_bytes(8, "big")


@salted_param
@pytest.mark.parametrize(
    ("seq", "explicit", "wire_iv"),
    [
        (0, None, 0),  # no explicit nonce given: start from the sequence number
        (5, None, 5),
        (5, 0x1122334455667788, 0x1122334455667788),  # continue OpenSSL's counter
        (2**64 - 1, None, 2**64 - 1),
    ],
)
def test_layout_tls12_gcm_ccm(cipher: Cipher, seq: int, explicit: int | None, wire_iv: int) -> None:
    """TLS 1.2: salt = the 4-byte key-block IV, iv = the next explicit nonce (big-endian)."""
    key, salt = key_for(cipher), iv_for(TLS12, cipher)
    assert len(salt) == 4
    keys = TrafficKeys(key, salt, seq, explicit_nonce=explicit)
    packed = pack_crypto_info(TLS12, cipher, keys)
    expected = info_header(0x0303, cipher.kernel_type) + wire_iv.to_bytes(8, "big") + key + salt
    assert packed == expected + seq.to_bytes(8, "big")


@version_param
@pytest.mark.parametrize("seq", [0, 77, 2**63])
def test_layout_chacha(version: ProtocolVersion, seq: int) -> None:
    """ChaCha20-Poly1305: iv = the whole 12-byte IV, no salt, in both versions."""
    key, iv = key_for(CHACHA), iv_for(version, CHACHA)
    assert len(iv) == 12
    packed = pack_crypto_info(version, CHACHA, TrafficKeys(key, iv, seq, explicit_nonce=999))
    assert packed == info_header(version, 54) + iv + key + seq.to_bytes(8, "big")


def test_layout_bytes_little_endian() -> None:
    """The whole struct for one case, byte for byte (on the usual little-endian hosts)."""
    if sys.byteorder != "little":
        pytest.skip("the header bytes below are little-endian")
    key = bytes(range(16))
    iv = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaab")
    packed = pack_crypto_info(TLS13, CIPHERS["AES-128-GCM"], TrafficKeys(key, iv, 0x0102))
    assert packed == bytes.fromhex(
        "0403" "3300"  # version 0x0304, cipher_type 51
        "a4a5a6a7a8a9aaab"  # iv: the last 8 bytes of the TLS 1.3 IV
        "000102030405060708090a0b0c0d0e0f"  # key
        "a0a1a2a3"  # salt: the first 4 bytes
        "0000000000000102"  # rec_seq, big-endian
    )  # fmt: skip


@cipher_param
@version_param
def test_pack_rejects_bad_lengths(version: ProtocolVersion, cipher: Cipher) -> None:
    key, iv = key_for(cipher), iv_for(version, cipher)
    for bad_key, bad_iv in (
        (key[:-1], iv),
        (key + b"\x00", iv),
        (key, iv[:-1]),
        (key, iv + b"\x00"),
    ):
        with pytest.raises(ValueError, match=cipher.name):
            pack_crypto_info(version, cipher, TrafficKeys(bad_key, bad_iv, 0))


# --------------------------------------------------------------------------- unpack


@cipher_param
@version_param
def test_unpack_round_trip(version: ProtocolVersion, cipher: Cipher) -> None:
    key, iv = key_for(cipher), iv_for(version, cipher)
    info = unpack_crypto_info(pack_crypto_info(version, cipher, TrafficKeys(key, iv, 4242)))
    assert info.version == version
    assert info.cipher is cipher
    assert info.cipher_type == cipher.kernel_type
    assert info.key == key
    assert info.rec_seq == 4242
    if not cipher.salt_len:
        assert (info.iv, info.salt) == (iv, b"")
    elif version is TLS13:
        assert info.salt + info.iv == iv
    else:
        assert (info.salt, info.iv) == (iv, (4242).to_bytes(8, "big"))


@given(
    st.sampled_from(ALL_CIPHERS),
    st.sampled_from(VERSIONS),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=12, max_size=12),
    st.integers(0, 2**64 - 1),
    st.none() | st.integers(0, 2**64 - 1),
)
@settings(max_examples=200, deadline=None)
def test_unpack_round_trip_property(
    cipher: Cipher,
    version: ProtocolVersion,
    key_material: bytes,
    iv_material: bytes,
    seq: int,
    explicit: int | None,
) -> None:
    key = key_material[: cipher.key_len]
    iv = iv_material[: len(iv_for(version, cipher))]
    packed = pack_crypto_info(version, cipher, TrafficKeys(key, iv, seq, explicit_nonce=explicit))
    info = unpack_crypto_info(packed)
    assert (info.version, info.cipher, info.key, info.rec_seq) == (version, cipher, key, seq)
    # Packing what was unpacked gives the same bytes back.
    repacked = info_header(info.version, info.cipher_type) + info.iv + info.key + info.salt
    assert repacked + info.rec_seq.to_bytes(8, "big") == packed


def test_unpack_unknown_cipher_type() -> None:
    info = unpack_crypto_info(info_header(0x0304, 99) + bytes(52))
    assert info == CryptoInfo(0x0304, None, 99, b"", b"", b"", 0)


# --------------------------------------------------------------------------- tls_stat

# The format of net/tls/tls_proc.c: seq_printf("%-32s\t%lu\n", name, value).
TLS_STAT_FIELDS = [
    ("TlsCurrTxSw", 2),
    ("TlsCurrRxSw", 1),
    ("TlsCurrTxDevice", 0),
    ("TlsCurrRxDevice", 0),
    ("TlsTxSw", 1234),
    ("TlsRxSw", 987),
    ("TlsTxDevice", 0),
    ("TlsRxDevice", 0),
    ("TlsDecryptError", 3),
    ("TlsRxDeviceResync", 0),
    ("TlsDecryptRetry", 0),
    ("TlsRxNoPadViolation", 5),
    ("TlsRxRekeyOk", 6),
    ("TlsRxRekeyError", 0),
    ("TlsTxRekeyOk", 7),
    ("TlsTxRekeyError", 0),
    ("TlsRxRekeyReceived", 8),
]
TLS_STAT_SAMPLE = "".join(f"{name:<32}\t{value}\n" for name, value in TLS_STAT_FIELDS)


def test_parse_tls_stat() -> None:
    stats = parse_tls_stat(TLS_STAT_SAMPLE)
    assert list(stats.items()) == TLS_STAT_FIELDS  # every line, in file order
    assert stats["TlsCurrTxSw"] == 2
    assert stats["TlsCurrRxSw"] == 1
    assert stats["TlsTxSw"] == 1234
    assert stats["TlsRxSw"] == 987
    assert stats["TlsDecryptError"] == 3
    assert stats["TlsRxNoPadViolation"] == 5
    assert stats["TlsTxRekeyOk"] == 7
    assert stats["TlsRxRekeyReceived"] == 8


def test_parse_tls_stat_ignores_noise() -> None:
    text = "\n  \nTlsTxSw 5\nheader only\nTlsRxSw not-a-number\nthree fields here\nTlsRxSw\t-1\n"
    assert parse_tls_stat(text) == {"TlsTxSw": 5}
    assert parse_tls_stat("") == {}


# --------------------------------------------------------------------------- KeyUpdate

TLS13_SUITES = [s for s in suites_for(TLS13) if s.hash_name in SUPPORTED_HASHES]

# RFC 8448 §3 client_application_traffic_secret_0, and the secret one KeyUpdate later:
# not in RFC 8448, but published independently by Botan (src/tests/test_tls_cipher_state.cpp,
# "application traffic secret (1) for the client") and by OpenSSL's TLS13-KDF.
C_AP_TRAFFIC_0 = bytes.fromhex("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")
C_AP_TRAFFIC_1 = bytes.fromhex("fcdfcc72725aaee48bf64e4fd8b749cdbdbab39d90da0b26e2245ca6ea167207")


def secret_for(suite: Suite) -> bytes:
    return bytes(range(48 if suite.hash_name == "sha384" else 32))


@pytest.mark.parametrize("suite", TLS13_SUITES, ids=lambda s: s.openssl_name)
def test_next_generation(suite: Suite) -> None:
    secret = secret_for(suite)
    keys = TrafficKeys(
        key=bytes(suite.cipher.key_len), iv=bytes(12), seq=12345, secret=secret, generation=2
    )
    updated = next_generation(suite, keys)
    new_secret = tls13_next_traffic_secret(suite.hash_name, secret)
    assert updated.secret == new_secret
    assert (updated.key, updated.iv) == tls13_traffic_key_iv(
        suite.hash_name, new_secret, suite.cipher.key_len, suite.cipher.nonce_len
    )
    assert len(updated.key) == suite.cipher.key_len
    assert len(updated.iv) == 12
    assert updated.seq == 0
    assert updated.generation == 3
    assert updated.explicit_nonce is None
    # Keys a second generation on: derived from the new secret, not the old one.
    again = next_generation(suite, updated)
    assert again.secret == tls13_next_traffic_secret(suite.hash_name, new_secret)
    assert again.generation == 4
    assert len({keys.key, updated.key, again.key}) == 3
    # The kernel gets the new generation with rec_seq 0.
    packed = pack_crypto_info(TLS13, suite.cipher, updated)
    assert unpack_crypto_info(packed).rec_seq == 0


def test_next_generation_known_answer() -> None:
    suite = suite_by_name("TLS_AES_128_GCM_SHA256")
    assert suite is not None
    keys = TrafficKeys(key=bytes(16), iv=bytes(12), seq=3, secret=C_AP_TRAFFIC_0)
    updated = next_generation(suite, keys)
    assert updated.secret == C_AP_TRAFFIC_1
    assert (updated.key, updated.iv) == tls13_traffic_key_iv("sha256", C_AP_TRAFFIC_1, 16, 12)


@pytest.mark.parametrize("suite", suites_for(TLS12), ids=lambda s: s.openssl_name)
def test_next_generation_refuses_tls12(suite: Suite) -> None:
    keys = TrafficKeys(key=bytes(suite.cipher.key_len), iv=bytes(4), seq=1, secret=bytes(32))
    with pytest.raises(ValueError, match=r"TLS 1\.3"):
        next_generation(suite, keys)


def test_next_generation_needs_a_secret() -> None:
    suite = SUITES[0]
    assert suite.version is TLS13
    with pytest.raises(ValueError, match=r"TLS 1\.3"):
        next_generation(suite, TrafficKeys(key=bytes(16), iv=bytes(12), seq=0))
