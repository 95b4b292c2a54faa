"""Unit tests for ktls.suites: the cipher and suite tables.

The tables are checked against three independent oracles rather than against a copy
of themselves:

* the OpenSSL inside pyOpenSSL (the one ktls hands its names to): every name must be
  accepted by ``set_cipher_list`` / ``set_tls13_ciphersuites``;
* the system OpenSSL, in process through :mod:`ssl` (IANA id, cipher, protocol of each
  OpenSSL name) and through ``openssl ciphers -V -stdname`` (the RFC/IANA name);
* include/uapi/linux/tls.h for the kernel's cipher numbers and sizes.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
from collections import Counter

import pytest
from OpenSSL import SSL

from ktls import context, keyschedule
from ktls.suites import (
    CIPHERS,
    IANA_NAMES,
    SUITES,
    Cipher,
    Suite,
    suite_by_id,
    suite_by_name,
    suites_for,
)
from ktls.wire import ProtocolVersion

TLS12 = ProtocolVersion.TLS1_2
TLS13 = ProtocolVersion.TLS1_3

suite_param = pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.openssl_name)
cipher_param = pytest.mark.parametrize("cipher", list(CIPHERS.values()), ids=lambda c: c.name)

# include/uapi/linux/tls.h: TLS_CIPHER_* and the KEY/SALT/IV sizes of each crypto_info.
KERNEL_CIPHERS = {
    #  name                  type key salt iv
    "AES-128-GCM": (51, 16, 4, 8),
    "AES-256-GCM": (52, 32, 4, 8),
    "AES-128-CCM": (53, 16, 4, 8),
    "CHACHA20-POLY1305": (54, 32, 0, 12),
    "SM4-GCM": (55, 16, 4, 8),
    "SM4-CCM": (56, 16, 4, 8),
    "ARIA-128-GCM": (57, 16, 4, 8),
    "ARIA-256-GCM": (58, 32, 4, 8),
}

# Names the OpenSSL inside pyOpenSSL here does not know.  Empty on this build (OpenSSL 4.0.3
# as bundled by cryptography 50: ARIA and the RFC 8998 SM4 suites are all compiled in); a
# new build that drops one must say so here.
NOT_IN_PYOPENSSL_OPENSSL: set[str] = set()


# --------------------------------------------------------------------------- ciphers


def test_cipher_table_matches_linux_tls_h() -> None:
    assert {
        name: (c.kernel_type, c.key_len, c.salt_len, c.iv_len) for name, c in CIPHERS.items()
    } == KERNEL_CIPHERS


@cipher_param
def test_cipher_shape(cipher: Cipher) -> None:
    assert CIPHERS[cipher.name] is cipher
    assert cipher.tag_len == 16  # TLS_CIPHER_*_TAG_SIZE: all 16
    assert cipher.nonce_len == 12  # every TLS AEAD has a 96-bit nonce
    if cipher.salt_len:  # RFC 5288 style: 4-byte implicit salt, 8-byte explicit nonce
        assert (cipher.salt_len, cipher.iv_len) == (4, 8)
        assert cipher.tls12_explicit_nonce_len == 8
        assert cipher.tls12_fixed_iv_len == 4
    else:  # RFC 7905: the whole 12-byte nonce is implicit
        assert cipher.name == "CHACHA20-POLY1305"
        assert cipher.tls12_explicit_nonce_len == 0
        assert cipher.tls12_fixed_iv_len == 12
    bits = re.search(r"(128|256)", cipher.name)
    if bits:
        assert cipher.key_len * 8 == int(bits.group(1))
    assert re.fullmatch(r"\d+\.\d+", cipher.kernel_since)


def test_cipher_kernel_types_unique() -> None:
    types = [c.kernel_type for c in CIPHERS.values()]
    assert len(set(types)) == len(types)


# --------------------------------------------------------------------------- suites


def test_suite_keys_unique() -> None:
    for key in ("openssl_name", "iana_id", "iana_name"):
        counts = Counter(getattr(s, key) for s in SUITES)
        assert [k for k, n in counts.items() if n > 1] == [], key


def test_iana_names_cover_exactly_the_tls12_suites() -> None:
    assert set(IANA_NAMES) == {s.iana_id for s in SUITES if s.version is TLS12}


# The cipher spelled in a suite name, and the hash the suite's name ends with.
_TLS13_NAME = re.compile(r"TLS_(?P<cipher>[A-Z0-9_]+?)_(?P<hash>SHA256|SHA384|SM3)")
_TLS12_IANA = re.compile(
    r"TLS_(?P<kx>ECDHE_ECDSA|ECDHE_RSA|DHE_RSA)_WITH_(?P<cipher>[A-Z0-9_]+?)"
    r"(?:_(?P<hash>SHA256|SHA384))?"
)


@suite_param
def test_suite_name_hash_cipher_consistency(suite: Suite) -> None:
    assert suite.hash_name in ("sha256", "sha384", "sm3")
    assert suite.cipher is CIPHERS[suite.cipher.name]
    if suite.version is TLS13:
        match = _TLS13_NAME.fullmatch(suite.openssl_name)
        assert match, suite.openssl_name
        assert match["cipher"].replace("_", "-") == suite.cipher.name
        assert match["hash"].lower() == suite.hash_name
        assert suite.iana_name == suite.openssl_name  # TLS 1.3 has one name only
        # RFC 8446 B.4 / RFC 8998: SHA-384 only with AES-256-GCM, SM3 only with SM4.
        assert (suite.hash_name == "sha384") == (suite.cipher.name == "AES-256-GCM")
        assert (suite.hash_name == "sm3") == suite.cipher.name.startswith("SM4")
        assert suite.iana_id in (0x1301, 0x1302, 0x1303, 0x1304, 0x00C6, 0x00C7)
    else:
        match = _TLS12_IANA.fullmatch(suite.iana_name)
        assert match, suite.iana_name
        assert match["cipher"].replace("_", "-") == suite.cipher.name
        # The PRF hash: SHA-384 where the name says so; RFC 6655 CCM and RFC 7905
        # ChaCha20 suites (no hash in the name) use SHA-256.
        assert suite.hash_name == (match["hash"] or "SHA256").lower()
        assert suite.openssl_name.endswith("SHA384") == (suite.hash_name == "sha384")
        assert not suite.cipher.name.startswith("SM4")  # SM4 suites are TLS 1.3 only
        assert suite.iana_name != suite.openssl_name


def test_tls13_suite_ids_known() -> None:
    # RFC 8446 B.4 and RFC 8998 §2.
    assert {s.openssl_name: s.iana_id for s in suites_for(TLS13)} == {
        "TLS_AES_128_GCM_SHA256": 0x1301,
        "TLS_AES_256_GCM_SHA384": 0x1302,
        "TLS_CHACHA20_POLY1305_SHA256": 0x1303,
        "TLS_AES_128_CCM_SHA256": 0x1304,
        "TLS_SM4_GCM_SM3": 0x00C6,
        "TLS_SM4_CCM_SM3": 0x00C7,
    }


def test_suites_for_partitions() -> None:
    tls12, tls13 = suites_for(TLS12), suites_for(TLS13)
    assert all(s.version is TLS12 for s in tls12)
    assert all(s.version is TLS13 for s in tls13)
    assert sorted(tls12 + tls13, key=SUITES.index) == list(SUITES)


@suite_param
def test_lookups(suite: Suite) -> None:
    assert suite_by_name(suite.openssl_name) is suite
    assert suite_by_name(suite.iana_name) is suite
    assert suite_by_id(suite.iana_id) is suite


@pytest.mark.parametrize(
    "name",
    ["", "RC4-SHA", "AES128-GCM-SHA256", "TLS_AES_128_CCM_8_SHA256", "TLS_RSA_WITH_NULL_SHA"],
)
def test_lookup_unknown_name(name: str) -> None:
    assert suite_by_name(name) is None


@pytest.mark.parametrize("iana_id", [0x0000, 0x002F, 0x1305, 0xC0AE, 0xFFFF])
def test_lookup_unknown_id(iana_id: int) -> None:
    # 0x1305 TLS_AES_128_CCM_8_SHA256 and 0xC0AE ..._CCM_8 have 8-byte tags: no kTLS.
    assert suite_by_id(iana_id) is None


def test_default_ciphers_are_in_the_table() -> None:
    versions = set()
    for name in context.DEFAULT_CIPHERS:
        suite = suite_by_name(name)
        assert suite is not None, name
        assert suite.openssl_name == name
        versions.add(suite.version)
    assert versions == {TLS12, TLS13}


def test_hashes_known_to_the_key_schedule() -> None:
    needed = {s.hash_name for s in SUITES}
    # sm3 is optional (only when the OpenSSL under cryptography has HMAC-SM3).
    assert needed - {"sm3"} <= set(keyschedule.SUPPORTED_HASHES)


# --------------------------------------------------------------------------- OpenSSL


def pyopenssl_accepts(suite: Suite) -> bool:
    ctx = SSL.Context(SSL.TLS_METHOD)
    name = suite.openssl_name
    try:
        if suite.version is TLS13:
            ctx.set_tls13_ciphersuites(name.encode())
        else:
            ctx.set_cipher_list(name.encode())
    except SSL.Error:
        return False
    # Some OpenSSL versions skip unknown TLS 1.3 names silently: look at what was kept.
    return name in SSL.Connection(ctx, None).get_cipher_list()


def test_every_name_is_known_to_pyopenssl() -> None:
    missing = {s.openssl_name for s in SUITES if not pyopenssl_accepts(s)}
    assert missing == NOT_IN_PYOPENSSL_OPENSSL


def test_pyopenssl_rejects_a_made_up_name() -> None:
    fake = Suite("TLS_NOPE_GCM_SHA256", 0xFFFF, TLS13, CIPHERS["AES-128-GCM"], "sha256")
    assert not pyopenssl_accepts(fake)
    fake12 = Suite("ECDHE-RSA-NOPE-GCM-SHA256", 0xFFFE, TLS12, CIPHERS["AES-128-GCM"], "sha256")
    assert not pyopenssl_accepts(fake12)


def _enc_to_cipher(enc: str) -> str:
    """OpenSSL's ``Enc=`` column ("AESGCM(128)", "CHACHA20/POLY1305(256)") as our name."""
    match = re.fullmatch(r"(AES|ARIA|SM4)(GCM|CCM)\((\d+)\)", enc)
    if match:
        algo, mode, bits = match.groups()
        return f"{algo}-{mode}" if algo == "SM4" else f"{algo}-{bits}-{mode}"
    assert enc == "CHACHA20/POLY1305(256)", enc
    return "CHACHA20-POLY1305"


def test_against_stdlib_ssl() -> None:
    """The system OpenSSL (through :mod:`ssl`) agrees on id, cipher and protocol."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    known = {c["name"]: c for c in ctx.get_ciphers()}
    checked = 0
    for suite in SUITES:
        info = known.get(suite.openssl_name)
        if info is None:  # e.g. TLS 1.3 suites outside the default set, SM4
            continue
        assert info["id"] & 0xFFFF == suite.iana_id, suite.openssl_name
        assert info["protocol"] == suite.version.label
        assert info["aead"] is True
        assert info["symmetric"].upper() == suite.cipher.name
        checked += 1
    # At least the AES-GCM and ChaCha20 suites are in every OpenSSL 1.1.1+ build.
    assert checked >= 12


_CIPHERS_LINE = re.compile(
    r"0x(?P<hi>[0-9A-F]{2}),0x(?P<lo>[0-9A-F]{2}) - (?P<std>\S+)\s+- (?P<name>\S+)\s+"
    r"(?P<proto>TLSv1\.[23])\s.*Enc=(?P<enc>\S+)"
)


def test_against_openssl_ciphers_stdname() -> None:
    """``openssl ciphers -V -stdname``: the RFC name and id of each OpenSSL name."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command line is a test peer: `make test` installs it"
    tls13 = ":".join(s.openssl_name for s in suites_for(TLS13))
    out = subprocess.run(
        [openssl, "ciphers", "-V", "-stdname", "-ciphersuites", tls13, "ALL:@SECLEVEL=0"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    rows = {m["name"]: m for m in map(_CIPHERS_LINE.search, out.splitlines()) if m}
    checked = 0
    for suite in SUITES:
        row = rows.get(suite.openssl_name)
        if row is None:  # SM4 is not in a stock OpenSSL 3.0 build
            continue
        assert row["std"] == suite.iana_name
        assert int(row["hi"] + row["lo"], 16) == suite.iana_id
        assert row["proto"] == suite.version.label
        assert _enc_to_cipher(row["enc"]) == suite.cipher.name
        checked += 1
    assert checked >= 13, sorted(rows)
