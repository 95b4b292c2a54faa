"""Known-answer and property tests for ktls.keyschedule.

Where the vectors come from (the hex values are copied as published):

* RFC 8448, "Example Handshake Traces for TLS 1.3", §3 "Simple 1-RTT Handshake" and
  §4 "Resumed 0-RTT Handshake" (TLS_AES_128_GCM_SHA256, so SHA-256 / 16-byte keys).
* IETF TLS WG mailing list, https://www.ietf.org/mail-archive/web/tls/current/msg03416.html:
  the TLS 1.2 PRF vectors ("test label", P_SHA256 100 bytes, P_SHA384 148 bytes).
* NIST CAVP SP 800-135 TLS 1.2 KDF vectors (master secret and key expansion, SHA-256),
  as carried in OpenSSL's test/recipes/30-test_evp_data/evpkdf_tls12_prf.txt.
* Values labelled "OpenSSL-computed" are NOT published vectors: RFC 8446 prints no
  KeyUpdate trace and RFC 8448 covers SHA-256 only.  They were computed once with the
  OpenSSL 3.0 command line (``openssl kdf ... TLS13-KDF`` / ``TLS1-PRF``), an
  implementation independent of this module that reproduces every published vector
  above, and each is also checked against an in-test derivation that builds the
  HkdfLabel struct by hand and calls cryptography's HKDFExpand directly.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from hypothesis import given, settings
from hypothesis import strategies as st

from ktls import keyschedule
from ktls.keyschedule import (
    SUPPORTED_HASHES,
    Tls12KeyBlock,
    hash_length,
    hkdf_expand_label,
    hkdf_label,
    split_tls12_key_block,
    tls12_key_block,
    tls12_key_block_length,
    tls12_prf,
    tls13_next_traffic_secret,
    tls13_traffic_key_iv,
)


def h(text: str) -> bytes:
    """Hex to bytes; whitespace is ignored so RFC-style spaced dumps paste as-is."""
    return bytes.fromhex(text)


_ALGORITHMS: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sm3": hashes.SM3,
}


def reference_expand_label(
    hash_name: str, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """An independent HKDF-Expand-Label: HkdfLabel packed by hand, cryptography's HKDFExpand."""
    full_label = b"tls13 " + label
    info = (
        struct.pack("!HB", length, len(full_label))
        + full_label
        + struct.pack("!B", len(context))
        + context
    )
    return HKDFExpand(_ALGORITHMS[hash_name](), length, info).derive(secret)


needs_sm3 = pytest.mark.skipif(
    "sm3" not in SUPPORTED_HASHES, reason="OpenSSL under cryptography lacks SM3"
)

# --------------------------------------------------------------- RFC 8448 §3 / §4 values

EMPTY_SHA256 = h("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
EARLY_SECRET = h("33ad0a1c607ec03b09e6cd9893680ce210adf300aa1f2660e1b22e10f170f92a")
HANDSHAKE_SECRET = h("1dc826e93606aa6fdc0aadc12f741b01046aa6b99f691ed221a9f0ca043fbeac")
MASTER_SECRET = h("18df06843d13a08bf2a449844c5f8a478001bc4d4c627984d5a41da8d0402919")
# Transcript hashes printed in the RFC: ClientHello..ServerHello, ..server Finished,
# ..client Finished.
HASH_CH_SH = h("860c06edc07858ee8e78f0e7428c58edd6b43f2ca3e6e95f02ed063cf0e1cad8")
HASH_CH_SF = h("9608102a0f1ccc6db6250b7b7e417b1a000eaada3daae4777a7686c9ff83df13")
HASH_CH_CF = h("209145a96ee8e2a122ff810047cc952684658d6049e86429426db87c54ad143d")

C_HS_TRAFFIC = h("b3eddb126e067f35a780b3abf45e2d8f3b1a950738f52e9600746a0e27a55a21")
S_HS_TRAFFIC = h("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
C_AP_TRAFFIC = h("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")
S_AP_TRAFFIC = h("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
RES_MASTER = h("7df235f2031d2a051287d02b0241b0bfdaf86cc856231f2d5aba46c434ec196c")
# RFC 8448 §4: binder_key of the resumed handshake.
BINDER_KEY = h("69fe131a3bbad5d63c64eebcc30e395b9d8107726a13d074e389dbc8a4e47256")

RFC8448_EXPAND_LABEL = [
    pytest.param(
        EARLY_SECRET,
        b"derived",
        EMPTY_SHA256,
        h("6f2615a108c702c5678f54fc9dbab69716c076189c48250cebeac3576c3611ba"),
        id="s3-derived-for-handshake",
    ),
    pytest.param(
        HANDSHAKE_SECRET,
        b"c hs traffic",
        HASH_CH_SH,
        C_HS_TRAFFIC,
        id="s3-c-hs-traffic",
    ),
    pytest.param(
        HANDSHAKE_SECRET,
        b"s hs traffic",
        HASH_CH_SH,
        S_HS_TRAFFIC,
        id="s3-s-hs-traffic",
    ),
    pytest.param(
        HANDSHAKE_SECRET,
        b"derived",
        EMPTY_SHA256,
        h("43de77e0c77713859a944db9db2590b53190a65b3ee2e4f12dd7a0bb7ce254b4"),
        id="s3-derived-for-master",
    ),
    pytest.param(
        MASTER_SECRET,
        b"c ap traffic",
        HASH_CH_SF,
        C_AP_TRAFFIC,
        id="s3-c-ap-traffic",
    ),
    pytest.param(
        MASTER_SECRET,
        b"s ap traffic",
        HASH_CH_SF,
        S_AP_TRAFFIC,
        id="s3-s-ap-traffic",
    ),
    pytest.param(
        MASTER_SECRET,
        b"exp master",
        HASH_CH_SF,
        h("fe22f881176eda18eb8f44529e6792c50c9a3f89452f68d8ae311b4309d3cf50"),
        id="s3-exp-master",
    ),
    pytest.param(
        MASTER_SECRET,
        b"res master",
        HASH_CH_CF,
        RES_MASTER,
        id="s3-res-master",
    ),
    pytest.param(
        S_HS_TRAFFIC,
        b"finished",
        b"",
        h("008d3b66f816ea559f96b537e885c31fc068bf492c652f01f288a1d8cdc19fc8"),
        id="s3-server-finished-key",
    ),
    pytest.param(
        C_HS_TRAFFIC,
        b"finished",
        b"",
        h("b80ad01015fb2f0bd65ff7d4da5d6bf83f84821d1f87fdc7d3c75b5a7b42d9c4"),
        id="s3-client-finished-key",
    ),
    pytest.param(
        RES_MASTER,
        b"resumption",
        h("0000"),  # the ticket_nonce of the NewSessionTicket
        h("4ecd0eb6ec3b4d87f5d6028f922ca4c5851a277fd41311c9e62d2c9492e1c4f3"),
        id="s4-resumption-psk",
    ),
    pytest.param(
        BINDER_KEY,
        b"finished",
        b"",
        h("5588673e72cb59c87d220caffe94f2dea9a3b1609f7d50e90a48227db9ed7eaa"),
        id="s4-binder-finished-key",
    ),
]


@pytest.mark.parametrize(("secret", "label", "context", "expected"), RFC8448_EXPAND_LABEL)
def test_hkdf_expand_label_rfc8448(
    secret: bytes, label: bytes, context: bytes, expected: bytes
) -> None:
    assert hkdf_expand_label("sha256", secret, label, context, 32) == expected


@pytest.mark.parametrize(
    ("traffic_secret", "key", "iv"),
    [
        pytest.param(
            S_HS_TRAFFIC,
            h("3fce516009c21727d0f2e4e86ee403bc"),
            h("5d313eb2671276ee13000b30"),
            id="server-handshake",
        ),
        pytest.param(
            C_HS_TRAFFIC,
            h("dbfaa693d1762c5b666af5d950258d01"),
            h("5bd3c71b836e0b76bb73265f"),
            id="client-handshake",
        ),
        pytest.param(
            S_AP_TRAFFIC,
            h("9f02283b6c9c07efc26bb9f2ac92e356"),
            h("cf782b88dd83549aadf1e984"),
            id="server-application",
        ),
        pytest.param(
            C_AP_TRAFFIC,
            h("17422dda596ed5d9acd890e3c63f5051"),
            h("5b78923dee08579033e523d9"),
            id="client-application",
        ),
    ],
)
def test_traffic_key_iv_rfc8448(traffic_secret: bytes, key: bytes, iv: bytes) -> None:
    """RFC 8448 §3, the "derive ... traffic keys for ... data" blocks (AES-128-GCM)."""
    assert tls13_traffic_key_iv("sha256", traffic_secret, 16, 12) == (key, iv)


@pytest.mark.parametrize(
    ("label", "context", "length", "info"),
    [
        pytest.param(b"key", b"", 16, h("00 10 09 74 6c 73 31 33 20 6b 65 79 00"), id="key"),
        pytest.param(b"iv", b"", 12, h("00 0c 08 74 6c 73 31 33 20 69 76 00"), id="iv"),
        pytest.param(
            b"finished",
            b"",
            32,
            h("00 20 0e 74 6c 73 31 33 20 66 69 6e 69 73 68 65 64 00"),
            id="finished",
        ),
        pytest.param(
            b"resumption",
            h("0000"),
            32,
            h("00 20 10 74 6c 73 31 33 20 72 65 73 75 6d 70 74 69 6f 6e 02 00 00"),
            id="resumption",
        ),
        pytest.param(
            b"c hs traffic",
            HASH_CH_SH,
            32,
            h(
                "00 20 12 74 6c 73 31 33 20 63 20 68 73 20 74 72 61 66 66 69 63 20"
                "86 0c 06 ed c0 78 58 ee 8e 78 f0 e7 42 8c 58 ed"
                "d6 b4 3f 2c a3 e6 e9 5f 02 ed 06 3c f0 e1 ca d8"
            ),
            id="c-hs-traffic",
        ),
    ],
)
def test_hkdf_label_matches_rfc8448_info(
    label: bytes, context: bytes, length: int, info: bytes
) -> None:
    """The "info" octets RFC 8448 prints next to each expansion."""
    assert hkdf_label(label, context, length) == info


# ------------------------------------------------------------------------- KeyUpdate

# OpenSSL-computed (see module docstring): `openssl kdf -keylen 32 -kdfopt digest:SHA256
# -kdfopt mode:EXPAND_ONLY -kdfopt hexkey:<secret> -kdfopt "prefix:tls13 "
# -kdfopt "label:traffic upd" TLS13-KDF`, the same command that reproduces RFC 8448's
# application key and IV.  RFC 8448 itself has no KeyUpdate.
C_AP_TRAFFIC_1 = h("fcdfcc72725aaee48bf64e4fd8b749cdbdbab39d90da0b26e2245ca6ea167207")
S_AP_TRAFFIC_1 = h("51921b8aa3001976eb401d0a4319a8516416a6c56001a357e5d162031e84f916")


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        pytest.param(C_AP_TRAFFIC, C_AP_TRAFFIC_1, id="client"),
        pytest.param(S_AP_TRAFFIC, S_AP_TRAFFIC_1, id="server"),
    ],
)
def test_next_traffic_secret_from_rfc8448_secrets(secret: bytes, expected: bytes) -> None:
    assert tls13_next_traffic_secret("sha256", secret) == expected
    assert reference_expand_label("sha256", secret, b"traffic upd", b"", 32) == expected


def test_next_traffic_secret_chains() -> None:
    """Generation N+2 is the update of generation N+1, never of N again."""
    second = tls13_next_traffic_secret("sha256", C_AP_TRAFFIC_1)
    assert second == reference_expand_label("sha256", C_AP_TRAFFIC_1, b"traffic upd", b"", 32)
    assert len({C_AP_TRAFFIC, C_AP_TRAFFIC_1, second}) == 3


# ------------------------------------------------------- SHA-384 and SM3 (TLS 1.3)

SECRET_48 = bytes(range(48))
SECRET_32 = bytes(range(32))


def test_sha384_key_iv_and_update() -> None:
    """OpenSSL-computed (TLS13-KDF, digest SHA384); secret = 00 01 .. 2f."""
    key, iv = tls13_traffic_key_iv("sha384", SECRET_48, 32, 12)
    assert key == h("6877d022f1c61d24ebb7487c16752d9a4798e40431c75b39320e537c90e23225")
    assert iv == h("42822531a0fe88648fc09e9f")
    expected_next = h(
        "401331b63e9d59f202e8f041042d9516f4cd7fa2e2ee14631d3b49fc340d7af3"
        "7fc2c0c9f252d8036f81ec5b85cbe5db"
    )
    assert tls13_next_traffic_secret("sha384", SECRET_48) == expected_next
    assert reference_expand_label("sha384", SECRET_48, b"traffic upd", b"", 48) == expected_next


@needs_sm3
def test_sm3_key_iv_and_update() -> None:
    """OpenSSL-computed (TLS13-KDF, digest SM3); secret = 00 01 .. 1f (RFC 8998 suites)."""
    key, iv = tls13_traffic_key_iv("sm3", SECRET_32, 16, 12)
    assert key == h("61239cba001ad7626f97e79fe461368f")
    assert iv == h("6d881d6752dd090573e1b665")
    expected_next = h("1f6191c1fd7cf1f9a855d2ca16fdc9c4d27820b2de3d7a1d31e931b12f0af750")
    assert tls13_next_traffic_secret("sm3", SECRET_32) == expected_next
    assert reference_expand_label("sm3", SECRET_32, b"traffic upd", b"", 32) == expected_next


def test_hash_length() -> None:
    assert hash_length("sha256") == 32
    assert hash_length("sha384") == 48
    assert set(SUPPORTED_HASHES) >= {"sha256", "sha384"}


def test_output_length_is_bound_into_the_label() -> None:
    """Unlike plain HKDF-Expand, a shorter Expand-Label is not a prefix of a longer one."""
    short = hkdf_expand_label("sha256", C_AP_TRAFFIC, b"key", b"", 16)
    long = hkdf_expand_label("sha256", C_AP_TRAFFIC, b"key", b"", 32)
    assert long[:16] != short


@settings(max_examples=200, deadline=None)
@given(data=st.data(), hash_name=st.sampled_from(SUPPORTED_HASHES))
def test_hkdf_expand_label_properties(data: st.DataObject, hash_name: str) -> None:
    size = hash_length(hash_name)
    secret = data.draw(st.binary(min_size=size, max_size=size), label="secret")
    label = data.draw(st.binary(min_size=1, max_size=249), label="label")
    context = data.draw(st.binary(max_size=255), label="context")
    length = data.draw(st.integers(min_value=1, max_value=255 * size), label="length")

    out = hkdf_expand_label(hash_name, secret, label, context, length)
    assert len(out) == length
    assert hkdf_expand_label(hash_name, secret, label, context, length) == out
    assert out == reference_expand_label(hash_name, secret, label, context, length)


# ----------------------------------------------------------------------- TLS 1.2 PRF


def test_tls12_prf_sha256_ietf_vector() -> None:
    out = tls12_prf(
        "sha256",
        h("9b be 43 6b a9 40 f0 17 b1 76 52 84 9a 71 db 35"),
        b"test label",
        h("a0 ba 9f 93 6c da 31 18 27 a6 f7 96 ff d5 19 8c"),
        100,
    )
    assert out == h(
        "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a"
        "6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab"
        "4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701"
        "87347b66"
    )


def test_tls12_prf_sha384_ietf_vector() -> None:
    out = tls12_prf(
        "sha384",
        h("b8 0b 73 3d 6c ee fc dc 71 56 6e a4 8e 55 67 df"),
        b"test label",
        h("cd 66 5c f6 a8 44 7d d6 ff 8b 27 55 5e db 74 65"),
        148,
    )
    assert out == h(
        "7b0c18e9ced410ed1804f2cfa34a336a1c14dffb4900bb5fd7942107e81c83cd"
        "e9ca0faa60be9fe34f82b1233c9146a0e534cb400fed2700884f9dc236f80edd"
        "8bfa961144c9e8d792eca722a7b32fc3d416d473ebc2c5fd4abfdad05d918425"
        "9b5bf8cd4d90fa0d31e2dec479e4f1a26066f2eea9a69236a3e52655c9e9aee6"
        "91c8f3a26854308d5eaa3be85e0990703d73e56f"
    )


# NIST CAVP (SP 800-135 TLS 1.2 KDF, SHA-256), via OpenSSL's evpkdf_tls12_prf.txt.
NIST_PRE_MASTER = h(
    "f8938ecc9edebc5030c0c6a441e213cd24e6f770a50dda07876f8d55da062bca"
    "db386b411fd4fe4313a604fce6c17fbc"
)
NIST_HELLO_CLIENT_RANDOM = h("36c129d01a3200894b9179faac589d9835d58775f9b5ea3587cb8fd0364cae8c")
NIST_HELLO_SERVER_RANDOM = h("f6c9575ed7ddd73e1f7d16eca115415812a43c2b747daaaae043abfb50053fce")
NIST_MASTER = h(
    "202c88c00f84a17a20027079604787461176455539e705be730890602c289a50"
    "01e34eeb3a043e5d52a65e66125188bf"
)
NIST_SERVER_RANDOM = h("ae6c806f8ad4d80784549dff28a4b58fd837681a51d928c3e30ee5ff14f39868")
NIST_CLIENT_RANDOM = h("62e1fd91f23f558a605f28478c58cf72637b89784d959df7e946d3f07bd1b616")
NIST_KEY_BLOCK = h(
    "d06139889fffac1e3a71865f504aa5d0d2a2e89506c6f2279b670c3e1b74f531"
    "016a2530c51a3a0f7e1d6590d0f0566b2f387f8d11fd4f731cdd572d2eae927f"
    "6f2f81410b25e6960be68985add6c38445ad9f8c64bf8068bf9a6679485d966f"
    "1ad6f68b43495b10a683755ea2b858d70ccac7ec8b053c6bd41ca299d4e51928"
)


def test_tls12_prf_nist_master_secret() -> None:
    out = tls12_prf(
        "sha256",
        NIST_PRE_MASTER,
        b"master secret",
        NIST_HELLO_CLIENT_RANDOM + NIST_HELLO_SERVER_RANDOM,
        48,
    )
    assert out == NIST_MASTER


def test_tls12_key_block_nist_vector() -> None:
    block = tls12_key_block(
        "sha256", NIST_MASTER, NIST_SERVER_RANDOM, NIST_CLIENT_RANDOM, len(NIST_KEY_BLOCK)
    )
    assert block == NIST_KEY_BLOCK


def test_tls12_key_block_sha384() -> None:
    """OpenSSL-computed (TLS1-PRF, digest SHA384); AES-256-GCM sizing, 72 bytes."""
    block = tls12_key_block(
        "sha384", bytes(range(48)), bytes(range(0x40, 0x60)), bytes(range(0x80, 0xA0)), 72
    )
    assert block == h(
        "38131831f2c862ffa5c81591f8a8c43774d1668a663ba718267c1eab1f2a01cb"
        "c2061cfc60bacf0edbef606024cefb20f6151607d630f7c158856c07e0bcc074"
        "b592a52af165e524"
    )


@pytest.mark.parametrize(
    ("key_len", "iv_len", "total"),
    [
        pytest.param(16, 4, 40, id="aes-128-gcm"),
        pytest.param(32, 4, 72, id="aes-256-gcm"),
        pytest.param(32, 12, 88, id="chacha20-poly1305"),
    ],
)
def test_split_tls12_key_block(key_len: int, iv_len: int, total: int) -> None:
    """RFC 5246 §6.3 order, applied to the NIST key block (the PRF stream is prefix-stable)."""
    assert tls12_key_block_length(key_len, iv_len) == total
    block = NIST_KEY_BLOCK[:total]
    derived = tls12_key_block("sha256", NIST_MASTER, NIST_SERVER_RANDOM, NIST_CLIENT_RANDOM, total)
    assert derived == block
    keys = split_tls12_key_block(block, key_len, iv_len)
    k = key_len
    assert keys.client_write_key == block[0:k]
    assert keys.server_write_key == block[k : 2 * k]
    assert keys.client_write_iv == block[2 * k : 2 * k + iv_len]
    assert keys.server_write_iv == block[2 * k + iv_len : total]
    assert keys == Tls12KeyBlock(
        block[0:k], block[k : 2 * k], block[2 * k : 2 * k + iv_len], block[2 * k + iv_len :]
    )


def test_split_aes128gcm_exact_bytes() -> None:
    keys = split_tls12_key_block(NIST_KEY_BLOCK[:40], 16, 4)
    assert keys.client_write_key == h("d06139889fffac1e3a71865f504aa5d0")
    assert keys.server_write_key == h("d2a2e89506c6f2279b670c3e1b74f531")
    assert keys.client_write_iv == h("016a2530")
    assert keys.server_write_iv == h("c51a3a0f")


def test_key_block_hides_keys_and_is_frozen() -> None:
    keys = split_tls12_key_block(NIST_KEY_BLOCK[:40], 16, 4)
    assert "d061" not in repr(keys)
    assert NIST_KEY_BLOCK[:16].hex() not in repr(keys)
    with pytest.raises(dataclasses.FrozenInstanceError):
        keys.client_write_key = b"x"  # type: ignore[misc]


@settings(max_examples=100, deadline=None)
@given(data=st.data(), hash_name=st.sampled_from(SUPPORTED_HASHES))
def test_tls12_prf_is_prefix_stable(data: st.DataObject, hash_name: str) -> None:
    secret = data.draw(st.binary(max_size=64), label="secret")
    label = data.draw(st.binary(min_size=1, max_size=32), label="label")
    seed = data.draw(st.binary(max_size=80), label="seed")
    short = data.draw(st.integers(min_value=1, max_value=200), label="short")
    extra = data.draw(st.integers(min_value=0, max_value=200), label="extra")

    a = tls12_prf(hash_name, secret, label, seed, short)
    b = tls12_prf(hash_name, secret, label, seed, short + extra)
    assert len(a) == short
    assert len(b) == short + extra
    assert b[:short] == a


# ------------------------------------------------------------------------- negatives

UNKNOWN_HASHES = ["md5", "sha1", "sha512", "SHA256", "sha-256", ""]

HASH_TAKERS: list[tuple[str, Callable[[str], object]]] = [
    ("hash_length", hash_length),
    ("hkdf_expand_label", lambda n: hkdf_expand_label(n, SECRET_32, b"key", b"", 16)),
    ("tls13_traffic_key_iv", lambda n: tls13_traffic_key_iv(n, SECRET_32, 16, 12)),
    ("tls13_next_traffic_secret", lambda n: tls13_next_traffic_secret(n, SECRET_32)),
    ("tls12_prf", lambda n: tls12_prf(n, b"s", b"label", b"seed", 16)),
    (
        "tls12_key_block",
        lambda n: tls12_key_block(n, SECRET_48, SECRET_32, SECRET_32, 40),
    ),
]


@pytest.mark.parametrize("name", UNKNOWN_HASHES)
@pytest.mark.parametrize(("fn_name", "fn"), HASH_TAKERS, ids=[n for n, _ in HASH_TAKERS])
def test_unknown_hash_rejected(fn_name: str, fn: Callable[[str], object], name: str) -> None:
    with pytest.raises(ValueError, match=r"unsupported hash .*supported: sha256, sha384") as exc:
        fn(name)
    assert repr(name) in str(exc.value), fn_name


def test_sm3_missing_from_openssl_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(keyschedule._AVAILABLE_HASHES, "sm3", raising=False)
    with pytest.raises(ValueError, match=r"'sm3' is not supported by the OpenSSL"):
        tls13_next_traffic_secret("sm3", SECRET_32)


@pytest.mark.parametrize(("hash_name", "size"), [("sha256", 32), ("sha384", 48)])
def test_expand_label_length_bounds(hash_name: str, size: int) -> None:
    secret = bytes(size)
    assert len(hkdf_expand_label(hash_name, secret, b"x", b"", 255 * size)) == 255 * size
    for bad in (255 * size + 1, 0, -1):
        with pytest.raises(ValueError, match=rf"length must be 1\.\.{255 * size}"):
            hkdf_expand_label(hash_name, secret, b"x", b"", bad)


def test_expand_label_rejects_secret_of_wrong_size() -> None:
    with pytest.raises(ValueError, match=r"secret must be 32 bytes"):
        hkdf_expand_label("sha256", bytes(31), b"key", b"", 16)
    with pytest.raises(ValueError, match=r"secret must be 48 bytes"):
        tls13_next_traffic_secret("sha384", SECRET_32)  # a SHA-256 secret on a SHA-384 suite


def test_expand_label_rejects_bad_label_and_context() -> None:
    assert hkdf_expand_label("sha256", SECRET_32, b"x" * 249, b"c" * 255, 16)
    with pytest.raises(ValueError, match=r"label must be 1\.\.249 bytes"):
        hkdf_expand_label("sha256", SECRET_32, b"x" * 250, b"", 16)
    with pytest.raises(ValueError, match=r"label must be 1\.\.249 bytes"):
        hkdf_expand_label("sha256", SECRET_32, b"", b"", 16)
    with pytest.raises(ValueError, match=r"context must be at most 255 bytes"):
        hkdf_expand_label("sha256", SECRET_32, b"key", b"c" * 256, 16)
    with pytest.raises(ValueError, match=r"uint16"):
        hkdf_label(b"key", b"", 0x10000)


def test_traffic_key_iv_rejects_nonpositive_sizes() -> None:
    with pytest.raises(ValueError, match=r"key_len must be positive"):
        tls13_traffic_key_iv("sha256", SECRET_32, 0, 12)
    with pytest.raises(ValueError, match=r"iv_len must be positive"):
        tls13_traffic_key_iv("sha256", SECRET_32, 16, 0)


def test_tls12_prf_rejects_nonpositive_length() -> None:
    for bad in (0, -5):
        with pytest.raises(ValueError, match=r"length must be positive"):
            tls12_prf("sha256", b"s", b"label", b"seed", bad)


def test_tls12_key_block_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError, match=r"master_secret must be 48 bytes"):
        tls12_key_block("sha256", SECRET_32, SECRET_32, SECRET_32, 40)
    with pytest.raises(ValueError, match=r"server_random must be 32 bytes"):
        tls12_key_block("sha256", SECRET_48, bytes(31), SECRET_32, 40)
    with pytest.raises(ValueError, match=r"client_random must be 32 bytes"):
        tls12_key_block("sha256", SECRET_48, SECRET_32, bytes(33), 40)


def test_split_rejects_wrong_block_length() -> None:
    with pytest.raises(ValueError, match=r"key block must be 40 bytes"):
        split_tls12_key_block(NIST_KEY_BLOCK[:39], 16, 4)
    with pytest.raises(ValueError, match=r"key block must be 40 bytes"):
        split_tls12_key_block(NIST_KEY_BLOCK[:41], 16, 4)
    with pytest.raises(ValueError, match=r"key_len must be positive"):
        tls12_key_block_length(0, 4)
    with pytest.raises(ValueError, match=r"iv_len must be positive"):
        split_tls12_key_block(b"", 16, 0)
