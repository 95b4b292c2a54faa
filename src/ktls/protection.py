"""Software record protection (RFC 8446 5.2-5.4, RFC 5246 6.2.3.3 with RFC 5288/7905).

Sans-IO: a :class:`Sealer` turns plaintext into one protected record, an
:class:`Opener` turns one record back into (content type, plaintext).  The AEADs are
``cryptography``'s; only the record framing (nonce, additional data, TLS 1.3 inner
content type and padding) is done here, because no library exposes a TLS record
layer that takes keys from outside.  The checks follow the RFCs in the same order the
kernel's ``tls_sw.c`` applies them, so both engines fail the same way.
"""

from __future__ import annotations

import struct
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

from .errors import ProtocolViolation, SoftwareUnsupported
from .records import (
    MAX_PLAINTEXT,
    PROTECTED_VERSIONS,
    RecordBuffer,
    RecordHeader,
    encode_header,
    max_ciphertext,
)
from .session import TrafficKeys
from .suites import Cipher
from .wire import AlertDescription, ContentType, ProtocolVersion

__all__ = ["Opener", "RecordReceiver", "RecordSender", "Sealer", "software_supports"]

_SEQ = struct.Struct("!Q")
_SEQ_LIMIT = 1 << 64


class _AEAD(Protocol):
    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...
    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


def _make_aead(cipher: Cipher, key: bytes) -> _AEAD:
    if cipher.name in ("AES-128-GCM", "AES-256-GCM"):
        return AESGCM(key)
    if cipher.name == "AES-128-CCM":
        return AESCCM(key, tag_length=cipher.tag_len)
    if cipher.name == "CHACHA20-POLY1305":
        return ChaCha20Poly1305(key)
    raise SoftwareUnsupported(
        f"the software engine has no {cipher.name} (the cryptography package lacks it)"
    )


def software_supports(cipher: Cipher) -> bool:
    return cipher.name in ("AES-128-GCM", "AES-256-GCM", "AES-128-CCM", "CHACHA20-POLY1305")


def _xor_nonce(iv: bytes, seq: int) -> bytes:
    padded = seq.to_bytes(len(iv), "big")
    return bytes(a ^ b for a, b in zip(iv, padded, strict=True))


class _Direction:
    """State shared by both directions: cipher, key, IV and the record sequence number."""

    def __init__(
        self, version: ProtocolVersion, cipher: Cipher, key: bytes, iv: bytes, seq: int
    ) -> None:
        expected_iv = (
            cipher.nonce_len if version is ProtocolVersion.TLS1_3 else (cipher.tls12_fixed_iv_len)
        )
        if len(key) != cipher.key_len or len(iv) != expected_iv:
            raise ValueError(f"bad key/iv length for {cipher.name}")
        self.version = version
        self.cipher = cipher
        self.seq = seq
        self._aead = _make_aead(cipher, key)
        self._iv = iv

    def _nonce(self, explicit: bytes) -> bytes:
        if self.version is ProtocolVersion.TLS1_3 or not self.cipher.salt_len:
            return _xor_nonce(self._iv, self.seq)
        return self._iv + explicit

    def _check_seq(self) -> None:
        if self.seq >= _SEQ_LIMIT:  # RFC 8446 5.3: never wrap; a new key is required
            raise ProtocolViolation(
                "record sequence number exhausted", AlertDescription.INTERNAL_ERROR
            )


class Sealer(_Direction):
    """Protects outgoing records for one direction."""

    def __init__(
        self,
        version: ProtocolVersion,
        cipher: Cipher,
        key: bytes,
        iv: bytes,
        seq: int,
        explicit_nonce: int | None = None,
    ) -> None:
        super().__init__(version, cipher, key, iv, seq)
        # TLS 1.2 GCM/CCM: the 8-byte explicit nonce is ours to choose but must never
        # repeat under one key; continue from where OpenSSL stopped (or from seq).
        self.explicit_nonce = seq if explicit_nonce is None else explicit_nonce

    @classmethod
    def from_keys(cls, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys) -> Sealer:
        """A sealer that continues exactly where ``keys`` (a hand-off value) stand."""
        return cls(version, cipher, keys.key, keys.iv, keys.seq, keys.explicit_nonce)

    def seal(self, content_type: ContentType, plaintext: bytes) -> bytes:
        if len(plaintext) > MAX_PLAINTEXT:
            raise ValueError(f"record plaintext over {MAX_PLAINTEXT} bytes")
        self._check_seq()
        tag = self.cipher.tag_len
        if self.version is ProtocolVersion.TLS1_3:
            inner = plaintext + bytes((content_type,))
            header = encode_header(ContentType.APPLICATION_DATA, len(inner) + tag)
            body = self._aead.encrypt(self._nonce(b""), inner, header)
        else:
            explicit = b""
            if self.cipher.tls12_explicit_nonce_len:
                explicit = (self.explicit_nonce % _SEQ_LIMIT).to_bytes(8, "big")
                self.explicit_nonce += 1
            aad = _SEQ.pack(self.seq) + encode_header(content_type, len(plaintext))
            body = explicit + self._aead.encrypt(self._nonce(explicit), plaintext, aad)
            header = encode_header(content_type, len(body))
        self.seq += 1
        return header + body


class Opener(_Direction):
    """Authenticates and decrypts incoming records for one direction."""

    @classmethod
    def from_keys(cls, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys) -> Opener:
        return cls(version, cipher, keys.key, keys.iv, keys.seq)

    def open(self, header: RecordHeader, body: bytes) -> tuple[ContentType, bytes]:
        """Return (inner content type, plaintext) of one record, or raise.

        Never returns a byte that failed authentication.
        """
        self._check_seq()
        tag = self.cipher.tag_len
        if self.version is ProtocolVersion.TLS1_3:
            if header.content_type != ContentType.APPLICATION_DATA:
                raise ProtocolViolation(
                    f"unprotected record of type {header.content_type} after the handshake",
                    AlertDescription.UNEXPECTED_MESSAGE,
                )
            if len(body) > MAX_PLAINTEXT + 256:
                raise ProtocolViolation("record too long", AlertDescription.RECORD_OVERFLOW)
            if len(body) < tag + 1:  # tag plus at least the inner content type
                raise ProtocolViolation("record too short", AlertDescription.BAD_RECORD_MAC)
            aad = encode_header(header.content_type, header.length, header.legacy_version)
            inner = self._decrypt(self._nonce(b""), body, aad)
            if len(inner) > MAX_PLAINTEXT + 1:
                raise ProtocolViolation(
                    "inner plaintext too long", AlertDescription.RECORD_OVERFLOW
                )
            stripped = inner.rstrip(b"\x00")  # RFC 8446 5.4: padding is zeros after the type
            if not stripped:
                raise ProtocolViolation(
                    "record with no content type (all padding)",
                    AlertDescription.UNEXPECTED_MESSAGE,
                )
            content_type, plaintext = stripped[-1], stripped[:-1]
        else:
            explicit_len = self.cipher.tls12_explicit_nonce_len
            if len(body) > MAX_PLAINTEXT + 2048:
                raise ProtocolViolation("record too long", AlertDescription.RECORD_OVERFLOW)
            if len(body) < explicit_len + tag:
                raise ProtocolViolation("record too short", AlertDescription.BAD_RECORD_MAC)
            explicit, sealed = body[:explicit_len], body[explicit_len:]
            aad = _SEQ.pack(self.seq) + encode_header(
                header.content_type, len(sealed) - tag, header.legacy_version
            )
            plaintext = self._decrypt(self._nonce(explicit), sealed, aad)
            content_type = header.content_type
            if len(plaintext) > MAX_PLAINTEXT:
                raise ProtocolViolation("plaintext too long", AlertDescription.RECORD_OVERFLOW)
        self.seq += 1
        if content_type not in ContentType.__members__.values() or (
            content_type == ContentType.CHANGE_CIPHER_SPEC
        ):
            raise ProtocolViolation(
                f"unexpected inner content type {content_type}",
                AlertDescription.UNEXPECTED_MESSAGE,
            )
        return ContentType(content_type), plaintext

    def _decrypt(self, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise ProtocolViolation(
                "record failed authentication (tampered or wrong key)",
                AlertDescription.BAD_RECORD_MAC,
            ) from None


class RecordSender:
    """One sending direction as a stream: application data cut into records, control
    records, and new keys after a KeyUpdate.  Bytes out; the caller sends them."""

    def __init__(self, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys) -> None:
        self._version = version
        self._cipher = cipher
        self._sealer = Sealer.from_keys(version, cipher, keys)

    def seal_data(self, data: memoryview) -> bytes:
        """``data`` as application data records of at most 2^14 bytes each."""
        seal = self._sealer.seal
        return b"".join(
            seal(ContentType.APPLICATION_DATA, bytes(data[i : i + MAX_PLAINTEXT]))
            for i in range(0, len(data), MAX_PLAINTEXT)
        )

    def seal(self, content_type: ContentType, payload: bytes) -> bytes:
        return self._sealer.seal(content_type, payload)

    def rekey(self, keys: TrafficKeys) -> None:
        self._sealer = Sealer.from_keys(self._version, self._cipher, keys)


class RecordReceiver:
    """One receiving direction as a stream: bytes in, whole opened records out."""

    def __init__(self, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys) -> None:
        self._version = version
        self._cipher = cipher
        self._opener = Opener.from_keys(version, cipher, keys)
        self._records = RecordBuffer(
            max_length=max_ciphertext(version), versions=PROTECTED_VERSIONS
        )

    def feed(self, data: bytes) -> None:
        self._records.feed(data)

    def next_record(self) -> tuple[ContentType, bytes] | None:
        """The next record's (content type, plaintext), or None until more bytes come.
        Raises ProtocolViolation for anything that must not be accepted."""
        record = self._records.next_record()
        return None if record is None else self._opener.open(*record)

    def has_record(self) -> bool:
        """Whether a whole record (or a header already known to be bad) is buffered:
        :meth:`next_record` then answers without more bytes."""
        if not self._records.pending():
            return False
        try:
            return self._records.needed() == 0
        except ProtocolViolation:
            return True

    @property
    def buffered_bytes(self) -> int:
        return self._records.pending()

    def rekey(self, keys: TrafficKeys) -> None:
        self._opener = Opener.from_keys(self._version, self._cipher, keys)
