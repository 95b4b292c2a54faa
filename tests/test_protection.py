"""Unit tests for ktls.protection: the software record layer (Sealer / Opener).

Sans-IO only.  Where the expected bytes come from:

* RFC 8448 §3 "Simple 1-RTT Handshake" (TLS_AES_128_GCM_SHA256): the published write
  keys/IVs and complete protected records -- the server's EncryptedExtensions..Finished
  flight, the client Finished, the server NewSessionTicket, both application_data
  records and both close_notify alerts.  The hex is copied as published (it is also
  carried verbatim by Botan's src/tests/test_tls_cipher_state.cpp and
  test_tls_rfc8448.cpp); an AEAD tag makes a transcription error impossible to miss.
* For the other ciphers and TLS 1.2, the record is rebuilt here with ``cryptography``'s
  AEADs following the RFC text directly: RFC 8446 §5.2/§5.3 (nonce = iv XOR seq, AAD =
  the 5-byte header, inner plaintext = data || type || zeros), RFC 5288 / RFC 6655
  (nonce = salt(4) || explicit(8), AAD = seq || type || version || length) and RFC 7905
  (nonce = iv XOR seq, no explicit nonce).
"""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from ktls.errors import ProtocolViolation, SoftwareUnsupported
from ktls.protection import Opener, Sealer, software_supports
from ktls.records import (
    MAX_PLAINTEXT,
    HandshakeBuffer,
    HandshakeMessage,
    RecordHeader,
    encode_alert,
    encode_key_update,
    max_ciphertext,
    parse_alert,
    parse_header,
)
from ktls.suites import CIPHERS, Cipher
from ktls.wire import (
    AlertDescription,
    AlertLevel,
    ContentType,
    HandshakeType,
    KeyUpdateRequest,
    ProtocolVersion,
)

TLS12 = ProtocolVersion.TLS1_2
TLS13 = ProtocolVersion.TLS1_3
VERSIONS = [TLS12, TLS13]
SOFTWARE = [c for c in CIPHERS.values() if software_supports(c)]
NOT_SOFTWARE = [c for c in CIPHERS.values() if not software_supports(c)]
SALTED = [c for c in SOFTWARE if c.salt_len]  # TLS 1.2 GCM/CCM: explicit nonce in records
APP = ContentType.APPLICATION_DATA
FUZZ = settings(max_examples=200, deadline=None)

cipher_param = pytest.mark.parametrize("cipher", SOFTWARE, ids=lambda c: c.name)
version_param = pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.label)

AEAD = AESGCM | AESCCM | ChaCha20Poly1305


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def aead(cipher: Cipher, key: bytes) -> AEAD:
    """The AEAD straight from cryptography, chosen here and not by ktls."""
    if cipher.name.startswith("AES-") and cipher.name.endswith("-GCM"):
        return AESGCM(key)
    if cipher.name == "AES-128-CCM":
        return AESCCM(key, tag_length=16)
    assert cipher.name == "CHACHA20-POLY1305"
    return ChaCha20Poly1305(key)


def xor_nonce(iv: bytes, seq: int) -> bytes:
    """RFC 8446 §5.3 / RFC 7905 §2: the 64-bit seq, left-padded to the IV size, XOR iv."""
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(len(iv), "big"), strict=True))


def header_bytes(content_type: int, length: int, version: int = 0x0303) -> bytes:
    return struct.pack("!BHH", content_type, version, length)


def iv_len(version: ProtocolVersion, cipher: Cipher) -> int:
    # TLS 1.3: the 12-byte nonce base.  TLS 1.2: the key block's write IV (4-byte salt
    # for GCM/CCM, the 12-byte nonce mask for ChaCha20-Poly1305).
    if version is TLS13:
        return 12
    return 4 if cipher.salt_len else 12


def material(version: ProtocolVersion, cipher: Cipher, tag: int = 1) -> tuple[bytes, bytes]:
    key = bytes((tag * 7 + 3 * i) % 256 for i in range(cipher.key_len))
    iv = bytes((tag * 13 + 100 + 5 * i) % 256 for i in range(iv_len(version, cipher)))
    return key, iv


def pair(
    version: ProtocolVersion, cipher: Cipher, seq: int = 0, explicit_nonce: int | None = None
) -> tuple[Sealer, Opener]:
    key, iv = material(version, cipher)
    sealer = Sealer(version, cipher, key, iv, seq, explicit_nonce)
    return sealer, Opener(version, cipher, key, iv, seq)


def split(record: bytes, version: ProtocolVersion = TLS12) -> tuple[RecordHeader, bytes]:
    header = parse_header(record[:5], max_length=max_ciphertext(version))
    body = record[5:]
    assert header.length == len(body)
    return header, body


def expect_violation(
    opener: Opener, header: RecordHeader, body: bytes, alert: AlertDescription
) -> None:
    seq = opener.seq
    with pytest.raises(ProtocolViolation) as info:
        opener.open(header, body)
    assert info.value.alert is alert
    if alert is AlertDescription.BAD_RECORD_MAC or alert is AlertDescription.RECORD_OVERFLOW:
        assert opener.seq == seq  # a record that failed is not counted


# --------------------------------------------------------------------------- RFC 8448 §3

# {server} derive write traffic keys for handshake data / application data,
# {client} derive write traffic keys for handshake data / application data.
S_HS_KEY, S_HS_IV = h("3fce516009c21727d0f2e4e86ee403bc"), h("5d313eb2671276ee13000b30")
C_HS_KEY, C_HS_IV = h("dbfaa693d1762c5b666af5d950258d01"), h("5bd3c71b836e0b76bb73265f")
S_AP_KEY, S_AP_IV = h("9f02283b6c9c07efc26bb9f2ac92e356"), h("cf782b88dd83549aadf1e984")
C_AP_KEY, C_AP_IV = h("17422dda596ed5d9acd890e3c63f5051"), h("5b78923dee08579033e523d9")

# {server} send handshake record: EncryptedExtensions, Certificate, CertificateVerify and
# Finished in one record (679 octets), under the server handshake key, seq 0.
R8448_SERVER_FLIGHT = h(
    """
    17 03 03 02 a2 d1 ff 33 4a 56 f5 bf
    f6 59 4a 07 cc 87 b5 80 23 3f 50 0f 45 e4 89 e7 f3 3a f3 5e df
    78 69 fc f4 0a a4 0a a2 b8 ea 73 f8 48 a7 ca 07 61 2e f9 f9 45
    cb 96 0b 40 68 90 51 23 ea 78 b1 11 b4 29 ba 91 91 cd 05 d2 a3
    89 28 0f 52 61 34 aa dc 7f c7 8c 4b 72 9d f8 28 b5 ec f7 b1 3b
    d9 ae fb 0e 57 f2 71 58 5b 8e a9 bb 35 5c 7c 79 02 07 16 cf b9
    b1 18 3e f3 ab 20 e3 7d 57 a6 b9 d7 47 76 09 ae e6 e1 22 a4 cf
    51 42 73 25 25 0c 7d 0e 50 92 89 44 4c 9b 3a 64 8f 1d 71 03 5d
    2e d6 5b 0e 3c dd 0c ba e8 bf 2d 0b 22 78 12 cb b3 60 98 72 55
    cc 74 41 10 c4 53 ba a4 fc d6 10 92 8d 80 98 10 e4 b7 ed 1a 8f
    d9 91 f0 6a a6 24 82 04 79 7e 36 a6 a7 3b 70 a2 55 9c 09 ea d6
    86 94 5b a2 46 ab 66 e5 ed d8 04 4b 4c 6d e3 fc f2 a8 94 41 ac
    66 27 2f d8 fb 33 0e f8 19 05 79 b3 68 45 96 c9 60 bd 59 6e ea
    52 0a 56 a8 d6 50 f5 63 aa d2 74 09 96 0d ca 63 d3 e6 88 61 1e
    a5 e2 2f 44 15 cf 95 38 d5 1a 20 0c 27 03 42 72 96 8a 26 4e d6
    54 0c 84 83 8d 89 f7 2c 24 46 1a ad 6d 26 f5 9e ca ba 9a cb bb
    31 7b 66 d9 02 f4 f2 92 a3 6a c1 b6 39 c6 37 ce 34 31 17 b6 59
    62 22 45 31 7b 49 ee da 0c 62 58 f1 00 d7 d9 61 ff b1 38 64 7e
    92 ea 33 0f ae ea 6d fa 31 c7 a8 4d c3 bd 7e 1b 7a 6c 71 78 af
    36 87 90 18 e3 f2 52 10 7f 24 3d 24 3d c7 33 9d 56 84 c8 b0 37
    8b f3 02 44 da 8c 87 c8 43 f5 e5 6e b4 c5 e8 28 0a 2b 48 05 2c
    f9 3b 16 49 9a 66 db 7c ca 71 e4 59 94 26 f7 d4 61 e6 6f 99 88
    2b d8 9f c5 08 00 be cc a6 2d 6c 74 11 6d bd 29 72 fd a1 fa 80
    f8 5d f8 81 ed be 5a 37 66 89 36 b3 35 58 3b 59 91 86 dc 5c 69
    18 a3 96 fa 48 a1 81 d6 b6 fa 4f 9d 62 d5 13 af bb 99 2f 2b 99
    2f 67 f8 af e6 7f 76 91 3f a3 88 cb 56 30 c8 ca 01 e0 c6 5d 11
    c6 6a 1e 2a c4 c8 59 77 b7 c7 a6 99 9b bf 10 dc 35 ae 69 f5 51
    56 14 63 6c 0b 9b 68 c1 9e d2 e3 1c 0b 3b 66 76 30 38 eb ba 42
    f3 b3 8e dc 03 99 f3 a9 f2 3f aa 63 97 8c 31 7f c9 fa 66 a7 3f
    60 f0 50 4d e9 3b 5b 84 5e 27 55 92 c1 23 35 ee 34 0b bc 4f dd
    d5 02 78 40 16 e4 b3 be 7e f0 4d da 49 f4 b4 40 a3 0c b5 d2 af
    93 98 28 fd 4a e3 79 4e 44 f9 4d f5 a6 31 ed e4 2c 17 19 bf da
    bf 02 53 fe 51 75 be 89 8e 75 0e dc 53 37 0d 2b
    """
)
# The server Finished verify_data (the last message of that flight).
R8448_SERVER_VERIFY_DATA = h("9b9b141d906337fbd2cbdce71df4deda4ab42c309572cb7fffee5454b78f0718")

# {client} send handshake record: Finished (58 octets), client handshake key, seq 0.
R8448_CLIENT_FINISHED = h(
    """
    17 03 03 00 35 75 ec 4d c2 38 cc e6
    0b 29 80 44 a7 1e 21 9c 56 cc 77 b0 51 7f e9 b9 3c 7a 4b fc 44
    d8 7f 38 f8 03 38 ac 98 fc 46 de b3 84 bd 1c ae ac ab 68 67 d7
    26 c4 05 46
    """
)
R8448_CLIENT_FINISHED_MSG = h(
    """
    14 00 00 20 a8 ec 43 6d 67 76 34 ae 52 5a c1
    fc eb e1 1a 03 9e c1 76 94 fa c6 e9 85 27 b6 42 f2 ed d5 ce 61
    """
)

# {server} send handshake record: NewSessionTicket (227 octets), server app key, seq 0.
R8448_NST = h(
    """
    17 03 03 00 de 3a 6b 8f 90 41 4a 97
    d6 95 9c 34 87 68 0d e5 13 4a 2b 24 0e 6c ff ac 11 6e 95 d4 1d
    6a f8 f6 b5 80 dc f3 d1 1d 63 c7 58 db 28 9a 01 59 40 25 2f 55
    71 3e 06 1d c1 3e 07 88 91 a3 8e fb cf 57 53 ad 8e f1 70 ad 3c
    73 53 d1 6d 9d a7 73 b9 ca 7f 2b 9f a1 b6 c0 d4 a3 d0 3f 75 e0
    9c 30 ba 1e 62 97 2a c4 6f 75 f7 b9 81 be 63 43 9b 29 99 ce 13
    06 46 15 13 98 91 d5 e4 c5 b4 06 f1 6e 3f c1 81 a7 7c a4 75 84
    00 25 db 2f 0a 77 f8 1b 5a b0 5b 94 c0 13 46 75 5f 69 23 2c 86
    51 9d 86 cb ee ac 87 aa c3 47 d1 43 f9 60 5d 64 f6 50 db 4d 02
    3e 70 e9 52 ca 49 fe 51 37 12 1c 74 bc 26 97 68 7e 24 87 46 d6
    df 35 30 05 f3 bc e1 86 96 12 9c 81 53 55 6b 3b 6c 67 79 b3 7b
    f1 59 85 68 4f
    """
)
R8448_NST_MSG = h(
    """
    04 00 00 c9 00 00 00 1e fa d6 aa c5 02 00
    00 00 b2 2c 03 5d 82 93 59 ee 5f f7 af 4e c9 00 00 00 00 26 2a
    64 94 dc 48 6d 2c 8a 34 cb 33 fa 90 bf 1b 00 70 ad 3c 49 88 83
    c9 36 7c 09 a2 be 78 5a bc 55 cd 22 60 97 a3 a9 82 11 72 83 f8
    2a 03 a1 43 ef d3 ff 5d d3 6d 64 e8 61 be 7f d6 1d 28 27 db 27
    9c ce 14 50 77 d4 54 a3 66 4d 4e 6d a4 d2 9e e0 37 25 a6 a4 da
    fc d0 fc 67 d2 ae a7 05 29 51 3e 3d a2 67 7f a5 90 6c 5b 3f 7d
    8f 92 f2 28 bd a4 0d da 72 14 70 f9 fb f2 97 b5 ae a6 17 64 6f
    ac 5c 03 27 2e 97 07 27 c6 21 a7 91 41 ef 5f 7d e6 50 5e 5b fb
    c3 88 e9 33 43 69 40 93 93 4a e4 d3 57 00 08 00 2a 00 04 00 00
    04 00
    """
)

# {client} / {server} send application_data record: 50 octets 00 01 .. 31 each.
R8448_APP_PAYLOAD = bytes(range(50))
R8448_CLIENT_APP = h(  # client app key, seq 0
    """
    17 03 03 00 43 a2 3f 70 54 b6 2c 94
    d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa 66 bc ab 3f 2b
    98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62
    92 a2 97 70 14 bd 1e 3d ea e6 3a ee bb 21 69 49 15 e4
    """
)
R8448_SERVER_APP = h(  # server app key, seq 1 (after the NewSessionTicket)
    """
    17 03 03 00 43 2e 93 7e 11 ef 4a c7
    40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f 82 aa 1b 36 e3
    0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5
    f0 a2 1c 00 47 c2 ab f3 32 54 0d d0 32 e1 67 c2 95 5d
    """
)
# {client} / {server} send alert record: close_notify (24 octets each).
R8448_CLIENT_ALERT = h("17 03 03 00 13 c9 87 27 60 65 56 66 b7 4d 7f f1 15 3e fd 6d b6 d0 b0 e3")
R8448_SERVER_ALERT = h("17 03 03 00 13 b5 8f d6 71 66 eb f5 99 d2 47 20 cf be 7e fa 7a 88 64 a9")

AES128GCM = CIPHERS["AES-128-GCM"]


def test_rfc8448_server_flight_one_record_four_messages() -> None:
    opener = Opener(TLS13, AES128GCM, S_HS_KEY, S_HS_IV, 0)
    content_type, plaintext = opener.open(*split(R8448_SERVER_FLIGHT, TLS13))
    assert content_type is ContentType.HANDSHAKE
    assert len(plaintext) == len(R8448_SERVER_FLIGHT) - 5 - 16 - 1
    buf = HandshakeBuffer()
    buf.feed(plaintext)
    messages = []
    while (message := buf.next_message()) is not None:
        messages.append(message)
    assert buf.pending() == 0
    assert [(m.msg_type, len(m.body)) for m in messages] == [
        (HandshakeType.ENCRYPTED_EXTENSIONS, 0x24),
        (HandshakeType.CERTIFICATE, 0x1B9),
        (HandshakeType.CERTIFICATE_VERIFY, 0x84),
        (HandshakeType.FINISHED, 0x20),
    ]
    assert messages[-1].body == R8448_SERVER_VERIFY_DATA
    # And sealing the same plaintext rebuilds the published record bit for bit.
    sealer = Sealer(TLS13, AES128GCM, S_HS_KEY, S_HS_IV, 0)
    assert sealer.seal(ContentType.HANDSHAKE, plaintext) == R8448_SERVER_FLIGHT


def test_rfc8448_client_finished() -> None:
    sealer = Sealer(TLS13, AES128GCM, C_HS_KEY, C_HS_IV, 0)
    assert sealer.seal(ContentType.HANDSHAKE, R8448_CLIENT_FINISHED_MSG) == R8448_CLIENT_FINISHED
    opener = Opener(TLS13, AES128GCM, C_HS_KEY, C_HS_IV, 0)
    assert opener.open(*split(R8448_CLIENT_FINISHED, TLS13)) == (
        ContentType.HANDSHAKE,
        R8448_CLIENT_FINISHED_MSG,
    )


def test_rfc8448_server_application_direction() -> None:
    """NewSessionTicket (seq 0), application data (seq 1), close_notify (seq 2)."""
    sealer = Sealer(TLS13, AES128GCM, S_AP_KEY, S_AP_IV, 0)
    assert sealer.seal(ContentType.HANDSHAKE, R8448_NST_MSG) == R8448_NST
    assert sealer.seal(APP, R8448_APP_PAYLOAD) == R8448_SERVER_APP
    assert sealer.seal(ContentType.ALERT, encode_alert(AlertDescription.CLOSE_NOTIFY)) == (
        R8448_SERVER_ALERT
    )
    assert sealer.seq == 3

    opener = Opener(TLS13, AES128GCM, S_AP_KEY, S_AP_IV, 0)
    content_type, plaintext = opener.open(*split(R8448_NST, TLS13))
    assert content_type is ContentType.HANDSHAKE
    assert plaintext == R8448_NST_MSG
    buf = HandshakeBuffer()
    buf.feed(plaintext)
    ticket = buf.next_message()
    assert ticket is not None
    assert ticket.msg_type == HandshakeType.NEW_SESSION_TICKET
    assert len(ticket.body) == 0xC9
    assert opener.open(*split(R8448_SERVER_APP, TLS13)) == (APP, R8448_APP_PAYLOAD)
    content_type, plaintext = opener.open(*split(R8448_SERVER_ALERT, TLS13))
    assert content_type is ContentType.ALERT
    alert = parse_alert(plaintext)
    assert (alert.level, alert.known) == (AlertLevel.WARNING, AlertDescription.CLOSE_NOTIFY)
    assert opener.seq == 3


def test_rfc8448_client_application_direction() -> None:
    """Application data (seq 0), close_notify (seq 1)."""
    sealer = Sealer(TLS13, AES128GCM, C_AP_KEY, C_AP_IV, 0)
    assert sealer.seal(APP, R8448_APP_PAYLOAD) == R8448_CLIENT_APP
    assert sealer.seal(ContentType.ALERT, b"\x01\x00") == R8448_CLIENT_ALERT
    opener = Opener(TLS13, AES128GCM, C_AP_KEY, C_AP_IV, 0)
    assert opener.open(*split(R8448_CLIENT_APP, TLS13)) == (APP, R8448_APP_PAYLOAD)
    assert opener.open(*split(R8448_CLIENT_ALERT, TLS13)) == (ContentType.ALERT, b"\x01\x00")


def test_rfc8448_records_are_bound_to_their_sequence_number() -> None:
    # The server's application data record is seq 1: at seq 0 or 2 it must not open.
    for seq in (0, 2):
        opener = Opener(TLS13, AES128GCM, S_AP_KEY, S_AP_IV, seq)
        expect_violation(opener, *split(R8448_SERVER_APP, TLS13), AlertDescription.BAD_RECORD_MAC)
    # ... nor under the other direction's key.
    opener = Opener(TLS13, AES128GCM, C_AP_KEY, C_AP_IV, 1)
    expect_violation(opener, *split(R8448_SERVER_APP, TLS13), AlertDescription.BAD_RECORD_MAC)


# --------------------------------------------------------------------------- known answers


@cipher_param
@pytest.mark.parametrize("seq", [0, 1, 0x0102030405060708, 2**64 - 2])
@pytest.mark.parametrize("content_type", [APP, ContentType.HANDSHAKE, ContentType.ALERT])
def test_tls13_record_matches_rfc8446(cipher: Cipher, seq: int, content_type: ContentType) -> None:
    """RFC 8446 §5.2: TLSCiphertext = 23 || 0x0303 || len || AEAD(iv XOR seq, inner, header)."""
    key, iv = material(TLS13, cipher)
    payload = b"kernel TLS record " * 3
    inner = payload + bytes((content_type,))
    header = header_bytes(23, len(inner) + 16)
    expected = header + aead(cipher, key).encrypt(xor_nonce(iv, seq), inner, header)
    assert Sealer(TLS13, cipher, key, iv, seq).seal(content_type, payload) == expected
    opener = Opener(TLS13, cipher, key, iv, seq)
    assert opener.open(*split(expected, TLS13)) == (content_type, payload)


@pytest.mark.parametrize("cipher", SALTED, ids=lambda c: c.name)
@pytest.mark.parametrize(("seq", "explicit"), [(0, 0), (9, 0x0102030405060708), (2**40, 2**63)])
def test_tls12_gcm_ccm_record_matches_rfc5288(cipher: Cipher, seq: int, explicit: int) -> None:
    """RFC 5288 §3 (GCM) and RFC 6655 §3 (CCM): nonce = salt || explicit, 8-byte explicit.

    AAD (RFC 5246 §6.2.3.3) = seq_num(8) || type || version || plaintext length.
    """
    key, salt = material(TLS12, cipher)
    payload = b"GET / HTTP/1.1\r\n\r\n"
    explicit_bytes = explicit.to_bytes(8, "big")
    aad = seq.to_bytes(8, "big") + header_bytes(APP, len(payload))
    sealed = aead(cipher, key).encrypt(salt + explicit_bytes, payload, aad)
    expected = header_bytes(APP, 8 + len(sealed)) + explicit_bytes + sealed
    sealer = Sealer(TLS12, cipher, key, salt, seq, explicit_nonce=explicit)
    assert sealer.seal(APP, payload) == expected
    assert Opener(TLS12, cipher, key, salt, seq).open(*split(expected)) == (APP, payload)


@pytest.mark.parametrize("seq", [0, 1, 0x0102030405060708])
def test_tls12_chacha_record_matches_rfc7905(seq: int) -> None:
    """RFC 7905 §2: nonce = 12-byte iv XOR padded seq; no explicit nonce in the record."""
    cipher = CIPHERS["CHACHA20-POLY1305"]
    key, iv = material(TLS12, cipher)
    assert len(iv) == 12
    payload = b"\x00\x01\x02 chacha"
    aad = seq.to_bytes(8, "big") + header_bytes(ContentType.HANDSHAKE, len(payload))
    sealed = ChaCha20Poly1305(key).encrypt(xor_nonce(iv, seq), payload, aad)
    expected = header_bytes(ContentType.HANDSHAKE, len(sealed)) + sealed
    sealer = Sealer(TLS12, cipher, key, iv, seq, explicit_nonce=424242)  # ignored for ChaCha
    assert sealer.seal(ContentType.HANDSHAKE, payload) == expected
    assert Opener(TLS12, cipher, key, iv, seq).open(*split(expected)) == (
        ContentType.HANDSHAKE,
        payload,
    )


# --------------------------------------------------------------------------- round trips

PAYLOADS = [
    (APP, b""),
    (APP, b"x"),
    (ContentType.ALERT, encode_alert(AlertDescription.CLOSE_NOTIFY)),
    (ContentType.HANDSHAKE, encode_key_update(KeyUpdateRequest.UPDATE_REQUESTED)),
    (APP, bytes(i % 251 for i in range(MAX_PLAINTEXT))),
    (ContentType.HANDSHAKE, HandshakeMessage(HandshakeType.NEW_SESSION_TICKET, b"t" * 99).encode()),
]


def overhead(version: ProtocolVersion, cipher: Cipher) -> int:
    if version is TLS13:
        return 1 + cipher.tag_len  # inner content type + tag
    return cipher.tls12_explicit_nonce_len + cipher.tag_len


@cipher_param
@version_param
@pytest.mark.parametrize("start", [0, 1000, 2**64 - 20])
def test_round_trip(version: ProtocolVersion, cipher: Cipher, start: int) -> None:
    sealer, opener = pair(version, cipher, start)
    for i, (content_type, payload) in enumerate(PAYLOADS, 1):
        record = sealer.seal(content_type, payload)
        header, body = split(record, version)  # also: within the version's length limit
        assert header.legacy_version == 0x0303
        assert header.length == len(payload) + overhead(version, cipher)
        # TLS 1.3 hides the real type behind application_data; TLS 1.2 shows it.
        assert header.content_type == (APP if version is TLS13 else content_type)
        assert opener.open(header, body) == (content_type, payload)
        assert sealer.seq == opener.seq == start + i


@given(
    st.sampled_from(SOFTWARE),
    st.sampled_from(VERSIONS),
    st.integers(0, 2**64 - 10),
    st.lists(
        st.tuples(
            st.sampled_from([APP, ContentType.ALERT, ContentType.HANDSHAKE]),
            st.binary(max_size=600),
        ),
        max_size=5,
    ),
)
@settings(max_examples=100, deadline=None)
def test_round_trip_property(
    cipher: Cipher,
    version: ProtocolVersion,
    start: int,
    records: list[tuple[ContentType, bytes]],
) -> None:
    sealer, opener = pair(version, cipher, start)
    for content_type, payload in records:
        assert opener.open(*split(sealer.seal(content_type, payload), version)) == (
            content_type,
            payload,
        )
    assert sealer.seq == opener.seq == start + len(records)


@pytest.mark.parametrize("cipher", SALTED, ids=lambda c: c.name)
@pytest.mark.parametrize("explicit", [None, 0, 5, 2**40 + 3, 2**64 - 4])
def test_tls12_explicit_nonce_counter(cipher: Cipher, explicit: int | None) -> None:
    seq = 7
    sealer, opener = pair(TLS12, cipher, seq, explicit)
    first = seq if explicit is None else explicit
    for i in range(4):
        header, body = split(sealer.seal(APP, b"data %d" % i))
        assert body[:8] == (first + i).to_bytes(8, "big")
        assert opener.open(header, body) == (APP, b"data %d" % i)
    assert sealer.explicit_nonce == first + 4
    assert sealer.seq == opener.seq == seq + 4


@version_param
def test_chacha_has_no_explicit_nonce(version: ProtocolVersion) -> None:
    cipher = CIPHERS["CHACHA20-POLY1305"]
    sealer, _ = pair(version, cipher, 3, explicit_nonce=99)
    header, _ = split(sealer.seal(APP, b"12345"), version)
    assert header.length == 5 + overhead(version, cipher)
    assert overhead(version, cipher) == (17 if version is TLS13 else 16)


def test_tls13_ignores_explicit_nonce() -> None:
    a, _ = pair(TLS13, AES128GCM, 4, explicit_nonce=None)
    b, _ = pair(TLS13, AES128GCM, 4, explicit_nonce=123456)
    assert a.seal(APP, b"same") == b.seal(APP, b"same")


# --------------------------------------------------------------------------- tampering


@cipher_param
@version_param
def test_every_bit_flip_is_rejected(version: ProtocolVersion, cipher: Cipher) -> None:
    sealer, opener = pair(version, cipher, 3)
    header, body = split(sealer.seal(APP, b"attack at dawn!"), version)
    for bit in range(len(body) * 8):
        tampered = bytearray(body)
        tampered[bit // 8] ^= 1 << (bit % 8)
        expect_violation(opener, header, bytes(tampered), AlertDescription.BAD_RECORD_MAC)
    # The failures left the opener untouched: the genuine record still opens.
    assert opener.open(header, body) == (APP, b"attack at dawn!")


@cipher_param
@version_param
def test_header_is_authenticated(version: ProtocolVersion, cipher: Cipher) -> None:
    sealer, opener = pair(version, cipher)
    header, body = split(sealer.seal(APP, b"payload"), version)
    for forged in (
        RecordHeader(header.content_type, 0x0301, header.length),
        RecordHeader(header.content_type, 0x0302, header.length),
    ):
        expect_violation(opener, forged, body, AlertDescription.BAD_RECORD_MAC)
    if version is TLS12:  # the content type is in the TLS 1.2 AAD
        for other in (ContentType.HANDSHAKE, ContentType.ALERT):
            expect_violation(
                opener,
                RecordHeader(other, 0x0303, header.length),
                body,
                AlertDescription.BAD_RECORD_MAC,
            )
    assert opener.open(header, body) == (APP, b"payload")


@cipher_param
@version_param
def test_truncated_or_extended_body_is_rejected(version: ProtocolVersion, cipher: Cipher) -> None:
    sealer, opener = pair(version, cipher)
    header, body = split(sealer.seal(APP, b"0123456789abcdef"), version)
    for changed in (body[:-1], body + b"\x00", body[1:]):
        forged = RecordHeader(header.content_type, 0x0303, len(changed))
        expect_violation(opener, forged, changed, AlertDescription.BAD_RECORD_MAC)


@cipher_param
@version_param
def test_wrong_sequence_number(version: ProtocolVersion, cipher: Cipher) -> None:
    sealer, _ = pair(version, cipher, 10)
    record = split(sealer.seal(APP, b"ordered"), version)
    key, iv = material(version, cipher)
    for seq in (0, 9, 11, 10 + 2**32, 2**64 - 1):
        expect_violation(
            Opener(version, cipher, key, iv, seq), *record, AlertDescription.BAD_RECORD_MAC
        )


@cipher_param
@version_param
def test_replay_and_reorder_rejected(version: ProtocolVersion, cipher: Cipher) -> None:
    sealer, opener = pair(version, cipher)
    first = split(sealer.seal(APP, b"one"), version)
    second = split(sealer.seal(APP, b"two"), version)
    expect_violation(opener, *second, AlertDescription.BAD_RECORD_MAC)  # reordered
    assert opener.open(*first) == (APP, b"one")
    expect_violation(opener, *first, AlertDescription.BAD_RECORD_MAC)  # replayed
    assert opener.open(*second) == (APP, b"two")


@cipher_param
@version_param
def test_wrong_key_or_iv(version: ProtocolVersion, cipher: Cipher) -> None:
    sealer, _ = pair(version, cipher)
    record = split(sealer.seal(APP, b"secret"), version)
    key, iv = material(version, cipher)
    other_key, other_iv = material(version, cipher, tag=2)
    for k, v in ((other_key, iv), (key, other_iv)):
        expect_violation(Opener(version, cipher, k, v, 0), *record, AlertDescription.BAD_RECORD_MAC)


@cipher_param
@version_param
def test_change_cipher_spec_after_handshake_rejected(
    version: ProtocolVersion, cipher: Cipher
) -> None:
    # A protected change_cipher_spec is never valid (RFC 8446 §5, RFC 5246 §7.1).
    sealer, opener = pair(version, cipher)
    expect_violation(
        opener,
        *split(sealer.seal(ContentType.CHANGE_CIPHER_SPEC, b"\x01"), version),
        AlertDescription.UNEXPECTED_MESSAGE,
    )


@given(
    st.sampled_from(SOFTWARE),
    st.sampled_from(VERSIONS),
    st.sampled_from(list(ContentType)),
    st.binary(max_size=120),
)
@FUZZ
def test_fuzz_opener_only_raises_protocol_violation(
    cipher: Cipher, version: ProtocolVersion, content_type: ContentType, body: bytes
) -> None:
    key, iv = material(version, cipher)
    opener = Opener(version, cipher, key, iv, 0)
    with pytest.raises(ProtocolViolation):  # random bytes never authenticate
        opener.open(RecordHeader(content_type, 0x0303, len(body)), body)
    assert opener.seq == 0


# --------------------------------------------------------------------------- TLS 1.3 framing


def tls13_record(
    cipher: Cipher,
    inner: bytes,
    seq: int = 5,
    outer_type: int = 23,
    key_iv: tuple[bytes, bytes] | None = None,
) -> tuple[RecordHeader, bytes]:
    """Protect ``inner`` (TLSInnerPlaintext) by hand, per RFC 8446 §5.2-5.3."""
    key, iv = key_iv or material(TLS13, cipher)
    header = header_bytes(outer_type, len(inner) + 16)
    body = aead(cipher, key).encrypt(xor_nonce(iv, seq), inner, header)
    return RecordHeader(outer_type, 0x0303, len(body)), body


def tls13_opener(cipher: Cipher, seq: int = 5) -> Opener:
    key, iv = material(TLS13, cipher)
    return Opener(TLS13, cipher, key, iv, seq)


@cipher_param
@pytest.mark.parametrize(
    ("data", "content_type", "padding"),
    [
        (b"hello", APP, 0),
        (b"hello", APP, 1),
        (b"hello", APP, 255),
        (b"zeros at the end\x00\x00\x00", APP, 40),  # the data's own zeros survive
        (b"", APP, 100),
        (b"\x01\x00", ContentType.ALERT, 13),
        (encode_key_update(KeyUpdateRequest.UPDATE_NOT_REQUESTED), ContentType.HANDSHAKE, 7),
        (b"p", APP, MAX_PLAINTEXT - 1),  # inner plaintext exactly 2^14 + 1
        (b"\xee" * MAX_PLAINTEXT, APP, 0),  # inner plaintext exactly 2^14 + 1
    ],
    ids=lambda v: str(v)[:12],
)
def test_tls13_padding_is_stripped(
    cipher: Cipher, data: bytes, content_type: ContentType, padding: int
) -> None:
    inner = data + bytes((content_type,)) + bytes(padding)
    opener = tls13_opener(cipher)
    assert opener.open(*tls13_record(cipher, inner)) == (content_type, data)
    assert opener.seq == 6


@cipher_param
@pytest.mark.parametrize("size", [1, 2, 300])
def test_tls13_all_padding_rejected(cipher: Cipher, size: int) -> None:
    # RFC 8446 §5.4: no non-zero octet in the cleartext -> unexpected_message.
    expect_violation(
        tls13_opener(cipher),
        *tls13_record(cipher, bytes(size)),
        AlertDescription.UNEXPECTED_MESSAGE,
    )


@cipher_param
@pytest.mark.parametrize(
    "inner",
    [
        b"\xee" * (MAX_PLAINTEXT + 1) + b"\x17",  # data over 2^14
        b"x\x17" + bytes(MAX_PLAINTEXT),  # padding makes it 2^14 + 2
    ],
    ids=["data", "padding"],
)
def test_tls13_inner_plaintext_overflow(cipher: Cipher, inner: bytes) -> None:
    # RFC 8446 §5.4: TLSInnerPlaintext over 2^14 + 1 octets -> record_overflow.
    assert len(inner) == MAX_PLAINTEXT + 2
    expect_violation(
        tls13_opener(cipher), *tls13_record(cipher, inner), AlertDescription.RECORD_OVERFLOW
    )


@cipher_param
def test_tls13_ciphertext_overflow(cipher: Cipher) -> None:
    # RFC 8446 §5.2: TLSCiphertext.length over 2^14 + 256 -> record_overflow (before AEAD).
    body = bytes(MAX_PLAINTEXT + 257)
    expect_violation(
        tls13_opener(cipher),
        RecordHeader(23, 0x0303, len(body)),
        body,
        AlertDescription.RECORD_OVERFLOW,
    )


@cipher_param
@pytest.mark.parametrize(
    "outer_type",
    [ContentType.HANDSHAKE, ContentType.ALERT, ContentType.CHANGE_CIPHER_SPEC],
    ids=lambda t: t.name,
)
def test_tls13_outer_type_must_be_application_data(cipher: Cipher, outer_type: int) -> None:
    expect_violation(
        tls13_opener(cipher),
        *tls13_record(cipher, b"data\x17", outer_type=outer_type),
        AlertDescription.UNEXPECTED_MESSAGE,
    )


@cipher_param
@pytest.mark.parametrize("length", range(17))
def test_tls13_record_shorter_than_tag(cipher: Cipher, length: int) -> None:
    # Up to the tag alone (16): no room for even the inner content type.
    body = bytes(range(length))
    expect_violation(
        tls13_opener(cipher),
        RecordHeader(23, 0x0303, length),
        body,
        AlertDescription.BAD_RECORD_MAC,
    )


@cipher_param
def test_tls13_tag_only_record_is_rejected(cipher: Cipher) -> None:
    # A genuine AEAD output of an empty TLSInnerPlaintext: authentic, but has no type.
    header, body = tls13_record(cipher, b"")
    assert len(body) == 16
    with pytest.raises(ProtocolViolation) as info:
        tls13_opener(cipher).open(header, body)
    assert info.value.alert in (
        AlertDescription.BAD_RECORD_MAC,
        AlertDescription.UNEXPECTED_MESSAGE,
    )


@cipher_param
@pytest.mark.parametrize("inner_type", [1, 19, 24, 99, 0xFF])
def test_tls13_unknown_inner_type(cipher: Cipher, inner_type: int) -> None:
    expect_violation(
        tls13_opener(cipher),
        *tls13_record(cipher, b"data" + bytes((inner_type,)) + bytes(3)),
        AlertDescription.UNEXPECTED_MESSAGE,
    )


# --------------------------------------------------------------------------- TLS 1.2 framing


def tls12_record(
    cipher: Cipher, content_type: int, payload: bytes, seq: int = 5, explicit: int = 77
) -> tuple[RecordHeader, bytes]:
    key, iv = material(TLS12, cipher)
    aad = seq.to_bytes(8, "big") + header_bytes(content_type, len(payload))
    if cipher.salt_len:
        explicit_bytes = explicit.to_bytes(8, "big")
        body = explicit_bytes + aead(cipher, key).encrypt(iv + explicit_bytes, payload, aad)
    else:
        body = aead(cipher, key).encrypt(xor_nonce(iv, seq), payload, aad)
    return RecordHeader(content_type, 0x0303, len(body)), body


def tls12_opener(cipher: Cipher, seq: int = 5) -> Opener:
    key, iv = material(TLS12, cipher)
    return Opener(TLS12, cipher, key, iv, seq)


@cipher_param
def test_tls12_hand_built_record_opens(cipher: Cipher) -> None:
    opener = tls12_opener(cipher)
    for content_type in (APP, ContentType.ALERT, ContentType.HANDSHAKE):
        payload = b"by hand %d" % content_type
        record = tls12_record(cipher, content_type, payload, seq=opener.seq)
        assert opener.open(*record) == (content_type, payload)


@cipher_param
def test_tls12_plaintext_overflow(cipher: Cipher) -> None:
    # RFC 5246 §6.2.1: TLSPlaintext.length MUST NOT exceed 2^14 -> record_overflow.
    record = tls12_record(cipher, APP, bytes(MAX_PLAINTEXT + 1))
    expect_violation(tls12_opener(cipher), *record, AlertDescription.RECORD_OVERFLOW)
    largest = tls12_record(cipher, APP, bytes(MAX_PLAINTEXT))
    assert tls12_opener(cipher).open(*largest) == (APP, bytes(MAX_PLAINTEXT))


@cipher_param
def test_tls12_ciphertext_overflow(cipher: Cipher) -> None:
    # RFC 5246 §6.2.3: TLSCiphertext.length over 2^14 + 2048 -> record_overflow.
    body = bytes(MAX_PLAINTEXT + 2049)
    expect_violation(
        tls12_opener(cipher),
        RecordHeader(23, 0x0303, len(body)),
        body,
        AlertDescription.RECORD_OVERFLOW,
    )


@cipher_param
def test_tls12_record_too_short(cipher: Cipher) -> None:
    opener = tls12_opener(cipher)
    for length in range(cipher.tls12_explicit_nonce_len + cipher.tag_len):
        expect_violation(
            opener,
            RecordHeader(23, 0x0303, length),
            bytes(length),
            AlertDescription.BAD_RECORD_MAC,
        )


# --------------------------------------------------------------------------- misuse


@cipher_param
@version_param
def test_seal_refuses_oversized_plaintext(version: ProtocolVersion, cipher: Cipher) -> None:
    sealer, _ = pair(version, cipher)
    with pytest.raises(ValueError, match="plaintext"):
        sealer.seal(APP, bytes(MAX_PLAINTEXT + 1))
    assert sealer.seq == 0


@cipher_param
@version_param
@pytest.mark.parametrize("cls", [Sealer, Opener])
def test_bad_key_or_iv_length(
    version: ProtocolVersion, cipher: Cipher, cls: type[Sealer] | type[Opener]
) -> None:
    key, iv = material(version, cipher)
    for k, v in ((key[:-1], iv), (key + b"\x00", iv), (key, iv[:-1]), (key, iv + b"\x00")):
        with pytest.raises(ValueError, match="length"):
            cls(version, cipher, k, v, 0)


def test_tls12_gcm_iv_is_the_salt_not_a_full_nonce() -> None:
    key, _ = material(TLS12, AES128GCM)
    with pytest.raises(ValueError, match="length"):
        Sealer(TLS12, AES128GCM, key, bytes(12), 0)
    with pytest.raises(ValueError, match="length"):
        Sealer(TLS13, AES128GCM, key, bytes(4), 0)


@cipher_param
@version_param
def test_sequence_number_never_wraps(version: ProtocolVersion, cipher: Cipher) -> None:
    # RFC 8446 §5.3 / RFC 5246 §6.1: sequence numbers MUST NOT wrap.
    sealer, opener = pair(version, cipher, 2**64 - 3)
    opener.open(*split(sealer.seal(APP, b"a"), version))
    assert sealer.seq == opener.seq == 2**64 - 2
    sealer.seal(APP, b"b")
    error: ProtocolViolation | None = None
    for _ in range(2):  # the record with seq 2^64 - 1 may go out, nothing after it
        try:
            sealer.seal(APP, b"c")
        except ProtocolViolation as exc:
            error = exc
            break
    assert error is not None, "sealed a record past sequence number 2^64 - 1"
    assert error.alert is AlertDescription.INTERNAL_ERROR


@pytest.mark.parametrize(
    "version",
    [pytest.param(TLS12, id="TLSv1.2"), pytest.param(TLS13, id="TLSv1.3")],
)
@cipher_param
def test_exhausted_direction_keeps_raising_protocol_violation(
    version: ProtocolVersion, cipher: Cipher
) -> None:
    """Once the sequence space is used up, every further call fails the same clean way."""
    key, iv = material(version, cipher)
    sealer = Sealer(version, cipher, key, iv, 2**64 - 1)
    opener = Opener(version, cipher, key, iv, 2**64 - 1)
    last = 2**64 - 1
    record = (
        tls13_record(cipher, b"last\x17", seq=last)
        if version is TLS13
        else tls12_record(cipher, APP, b"last", seq=last)
    )
    sealer.seal(APP, b"x")  # the last sequence number is still usable, once
    assert opener.open(*record) == (APP, b"last")
    for _ in range(3):
        with pytest.raises(ProtocolViolation, match="exhausted") as sealing:
            sealer.seal(APP, b"x")
        assert sealing.value.alert is AlertDescription.INTERNAL_ERROR
        with pytest.raises(ProtocolViolation, match="exhausted"):
            opener.open(*record)


@pytest.mark.parametrize("cipher", NOT_SOFTWARE, ids=lambda c: c.name)
@version_param
@pytest.mark.parametrize("cls", [Sealer, Opener])
def test_cipher_unsupported(
    version: ProtocolVersion, cipher: Cipher, cls: type[Sealer] | type[Opener]
) -> None:
    assert not software_supports(cipher)
    key, iv = material(version, cipher)
    with pytest.raises(SoftwareUnsupported, match=cipher.name):
        cls(version, cipher, key, iv, 0)


def test_software_cipher_set() -> None:
    assert {c.name for c in SOFTWARE} == {
        "AES-128-GCM",
        "AES-256-GCM",
        "AES-128-CCM",
        "CHACHA20-POLY1305",
    }
    assert {c.name for c in NOT_SOFTWARE} == {
        "SM4-GCM",
        "SM4-CCM",
        "ARIA-128-GCM",
        "ARIA-256-GCM",
    }
