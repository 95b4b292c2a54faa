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
    HEADER_LEN,
    MAX_PLAINTEXT,
    PROTECTED_VERSIONS,
    RECORD_HEADER,
    RecordHeader,
    encode_header,
    max_ciphertext,
    parse_header_from,
)
from .session import TrafficKeys
from .suites import Cipher
from .wire import AlertDescription, ContentType, ProtocolVersion

_Bytes = bytes | bytearray | memoryview

__all__ = ["Opener", "RecordReceiver", "RecordSender", "Sealer", "software_supports"]

_SEQ = struct.Struct("!Q")
_SEQ_LIMIT = 1 << 64


class _AEAD(Protocol):
    # The *_into forms (cryptography >= 47) work in place: no allocation per record.
    def encrypt_into(
        self, nonce: bytes, data: _Bytes, associated_data: bytes | None, buf: memoryview
    ) -> int: ...
    def decrypt_into(
        self, nonce: bytes, data: _Bytes, associated_data: bytes | None, buf: memoryview
    ) -> int: ...


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
        # TLS 1.3 and ChaCha20 (RFC 8446 5.3, RFC 7905): nonce = iv XOR the padded
        # sequence number; TLS 1.2 GCM/CCM: salt + explicit nonce.
        self._tls13 = version is ProtocolVersion.TLS1_3
        self._xor_nonce = self._tls13 or not cipher.salt_len
        self._iv_int = int.from_bytes(iv, "big")
        self._nonce_len = len(iv)

    def _nonce(self, explicit: bytes) -> bytes:
        if self._xor_nonce:
            return (self._iv_int ^ self.seq).to_bytes(self._nonce_len, "big")
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
        if version is ProtocolVersion.TLS1_3:
            self.overhead = HEADER_LEN + 1 + cipher.tag_len  # + inner content type
        else:
            self.overhead = HEADER_LEN + cipher.tls12_explicit_nonce_len + cipher.tag_len

    @classmethod
    def from_keys(cls, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys) -> Sealer:
        """A sealer that continues exactly where ``keys`` (a hand-off value) stand."""
        return cls(version, cipher, keys.key, keys.iv, keys.seq, keys.explicit_nonce)

    def seal(self, content_type: ContentType, plaintext: bytes) -> bytes:
        out = bytearray(len(plaintext) + self.overhead)
        self.seal_into(content_type, plaintext, memoryview(out))
        return bytes(out)

    def seal_into(self, content_type: ContentType, plaintext: _Bytes, out: memoryview) -> int:
        """Write one record protecting ``plaintext`` at the start of ``out`` (which has
        room for ``len(plaintext) + overhead`` bytes); return the record's length."""
        size = len(plaintext)
        if size > MAX_PLAINTEXT:
            raise ValueError(f"record plaintext over {MAX_PLAINTEXT} bytes")
        seq = self.seq
        if seq >= _SEQ_LIMIT:
            self._check_seq()
        end = size + self.overhead
        if self._tls13:
            # The per-record path: inlined, as it runs once per record sent.
            header = RECORD_HEADER.pack(ContentType.APPLICATION_DATA, 0x0303, end - HEADER_LEN)
            inner_end = HEADER_LEN + size + 1
            out[:HEADER_LEN] = header
            out[HEADER_LEN : inner_end - 1] = plaintext
            out[inner_end - 1] = content_type
            # Encrypted in place: the inner plaintext is already where the ciphertext goes.
            self._aead.encrypt_into(
                (self._iv_int ^ seq).to_bytes(self._nonce_len, "big"),
                out[HEADER_LEN:inner_end],
                header,
                out[HEADER_LEN:end],
            )
        else:
            explicit = b""
            if self.cipher.tls12_explicit_nonce_len:
                explicit = (self.explicit_nonce % _SEQ_LIMIT).to_bytes(8, "big")
                self.explicit_nonce += 1
            sealed_at = HEADER_LEN + len(explicit)
            out[:HEADER_LEN] = encode_header(content_type, end - HEADER_LEN)
            out[HEADER_LEN:sealed_at] = explicit
            aad = _SEQ.pack(seq) + encode_header(content_type, size)
            self._aead.encrypt_into(self._nonce(explicit), plaintext, aad, out[sealed_at:end])
        self.seq = seq + 1
        return end


class Opener(_Direction):
    """Authenticates and decrypts incoming records for one direction."""

    @classmethod
    def from_keys(cls, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys) -> Opener:
        return cls(version, cipher, keys.key, keys.iv, keys.seq)

    def open(self, header: RecordHeader, body: bytes) -> tuple[ContentType, bytes]:
        """Return (inner content type, plaintext) of one record, or raise.

        Never returns a byte that failed authentication.
        """
        content_type, plaintext = self.open_in_place(header, memoryview(bytearray(body)))
        return content_type, bytes(plaintext)

    def open_in_place(
        self, header: RecordHeader, body: memoryview
    ) -> tuple[ContentType, memoryview]:
        """Like :meth:`open`, decrypting ``body`` where it lies: the plaintext returned
        is a part of ``body``, and ``body`` holds garbage after a failure."""
        seq = self.seq
        if seq >= _SEQ_LIMIT:
            self._check_seq()
        tag = self.cipher.tag_len
        if self._tls13:
            # The per-record path: inlined, as it runs once per record received.
            content_type, legacy_version, length = header
            if content_type != ContentType.APPLICATION_DATA:
                raise ProtocolViolation(
                    f"unprotected record of type {content_type} after the handshake",
                    AlertDescription.UNEXPECTED_MESSAGE,
                )
            size = len(body)
            if size > MAX_PLAINTEXT + 256:
                raise ProtocolViolation("record too long", AlertDescription.RECORD_OVERFLOW)
            if size < tag + 1:  # tag plus at least the inner content type
                raise ProtocolViolation("record too short", AlertDescription.BAD_RECORD_MAC)
            inner = body[: size - tag]
            try:
                self._aead.decrypt_into(
                    (self._iv_int ^ seq).to_bytes(self._nonce_len, "big"),
                    body,
                    RECORD_HEADER.pack(content_type, legacy_version, length),
                    inner,
                )
            except InvalidTag:
                raise _failed_authentication() from None
            if len(inner) > MAX_PLAINTEXT + 1:
                raise ProtocolViolation(
                    "inner plaintext too long", AlertDescription.RECORD_OVERFLOW
                )
            # RFC 8446 5.4: padding is zeros after the content type.
            end = len(inner) if inner[-1] else len(bytes(inner).rstrip(b"\x00"))
            if not end:
                raise ProtocolViolation(
                    "record with no content type (all padding)",
                    AlertDescription.UNEXPECTED_MESSAGE,
                )
            content_type, plaintext = inner[end - 1], inner[: end - 1]
        else:
            explicit_len = self.cipher.tls12_explicit_nonce_len
            if len(body) > MAX_PLAINTEXT + 2048:
                raise ProtocolViolation("record too long", AlertDescription.RECORD_OVERFLOW)
            if len(body) < explicit_len + tag:
                raise ProtocolViolation("record too short", AlertDescription.BAD_RECORD_MAC)
            explicit, sealed = bytes(body[:explicit_len]), body[explicit_len:]
            aad = _SEQ.pack(seq) + encode_header(
                header.content_type, len(sealed) - tag, header.legacy_version
            )
            plaintext = sealed[: len(sealed) - tag]
            try:
                self._aead.decrypt_into(self._nonce(explicit), sealed, aad, plaintext)
            except InvalidTag:
                raise _failed_authentication() from None
            content_type = header.content_type
            if len(plaintext) > MAX_PLAINTEXT:
                raise ProtocolViolation("plaintext too long", AlertDescription.RECORD_OVERFLOW)
        self.seq = seq + 1
        known = _OPEN_TYPES.get(content_type)
        if known is None:
            raise ProtocolViolation(
                f"unexpected inner content type {content_type}",
                AlertDescription.UNEXPECTED_MESSAGE,
            )
        return known, plaintext


def _failed_authentication() -> ProtocolViolation:
    return ProtocolViolation(
        "record failed authentication (tampered or wrong key)", AlertDescription.BAD_RECORD_MAC
    )


# What a protected record may carry (change_cipher_spec never: RFC 8446 5, RFC 5246 7.1
# after the handshake), by wire value.
_OPEN_TYPES = {t.value: t for t in ContentType if t is not ContentType.CHANGE_CIPHER_SPEC}


class RecordSender:
    """One sending direction as a stream: application data cut into records, control
    records, and new keys after a KeyUpdate.  Bytes out; the caller sends them."""

    def __init__(self, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys) -> None:
        self._version = version
        self._cipher = cipher
        self._sealer = Sealer.from_keys(version, cipher, keys)

    def sealed_size(self, size: int) -> int:
        """The most bytes :meth:`seal_data_into` writes for ``size`` bytes of data."""
        records = -(-size // MAX_PLAINTEXT)
        return size + records * self._sealer.overhead

    def seal_data_into(self, data: memoryview, out: memoryview) -> int:
        """``data`` as application data records of at most 2^14 bytes each, written to
        ``out`` (room for :meth:`sealed_size` bytes); return the bytes written."""
        seal_into = self._sealer.seal_into
        if len(data) <= MAX_PLAINTEXT:
            return seal_into(ContentType.APPLICATION_DATA, data, out)
        written = 0
        for start in range(0, len(data), MAX_PLAINTEXT):
            written += seal_into(
                ContentType.APPLICATION_DATA, data[start : start + MAX_PLAINTEXT], out[written:]
            )
        return written

    def seal_into(self, content_type: ContentType, payload: bytes, out: memoryview) -> int:
        """One non-data record into ``out`` (room for ``len(payload) + overhead``)."""
        return self._sealer.seal_into(content_type, payload, out)

    @property
    def overhead(self) -> int:
        """Bytes a record adds to its plaintext (header, explicit nonce, tag...)."""
        return self._sealer.overhead

    def rekey(self, keys: TrafficKeys) -> None:
        self._sealer = Sealer.from_keys(self._version, self._cipher, keys)


# Room a receiver offers for bytes from the socket (beyond a partial record it keeps):
# small at first, so that a connection that carries little costs little memory, and
# the size that makes bulk reads cheap once a read fills it (grown once, not per call).
_FIRST_ROOM = 1 << 15
_MAX_ROOM = 1 << 17


class RecordReceiver:
    """One receiving direction as a stream: bytes in, whole opened records out.

    The receiver owns its buffer so that records are read into it and opened where
    they lie: :meth:`receive_buffer` gives room for the next bytes (``recv_into``),
    :meth:`received` says how many came.  A plaintext returned by :meth:`next_record`
    is a view into that buffer, valid until the next :meth:`receive_buffer`.
    """

    def __init__(self, version: ProtocolVersion, cipher: Cipher, keys: TrafficKeys) -> None:
        self._version = version
        self._cipher = cipher
        self._opener = Opener.from_keys(version, cipher, keys)
        self._max_length = max_ciphertext(version)
        self._buffer = bytearray()  # allocated when the first bytes come
        self._view = memoryview(self._buffer)
        self._start = 0  # first byte not yet taken by next_record
        self._end = 0  # end of the bytes received
        self._room = _FIRST_ROOM
        self._offered = 0

    def receive_buffer(self) -> memoryview:
        """Room for incoming bytes; call :meth:`received` after."""
        if self._start:  # move the start of a partial record to the front
            kept = self._end - self._start
            self._view[:kept] = self._view[self._start : self._end]
            self._start, self._end = 0, kept
        if len(self._buffer) - self._end < self._room:
            # Room for a partial record as well, so a kept one never needs a new buffer.
            grown = bytearray(self._room + HEADER_LEN + self._max_length)
            grown[: self._end] = self._view[: self._end]
            self._buffer, self._view = grown, memoryview(grown)
        self._offered = len(self._buffer) - self._end
        return self._view[self._end :]

    def received(self, count: int) -> None:
        if count >= self._offered:
            self._room = _MAX_ROOM  # the socket had more: offer more next time
        self._end += count

    def _header(self) -> RecordHeader | None:
        if self._end - self._start < HEADER_LEN:
            return None
        return parse_header_from(
            self._buffer, self._start, max_length=self._max_length, versions=PROTECTED_VERSIONS
        )

    def next_record(self) -> tuple[ContentType, memoryview] | None:
        """The next record's (content type, plaintext), or None until more bytes come.
        Raises ProtocolViolation for anything that must not be accepted."""
        header = self._header()
        if header is None:
            return None
        body_at = self._start + HEADER_LEN
        end = body_at + header.length
        if end > self._end:
            return None
        self._start = end
        if end == self._end:  # all taken: the next bytes go to the front, no move
            self._start = self._end = 0
        return self._opener.open_in_place(header, self._view[body_at:end])

    def has_record(self) -> bool:
        """Whether a whole record (or a header already known to be bad) is buffered:
        :meth:`next_record` then answers without more bytes."""
        try:
            header = self._header()
        except ProtocolViolation:
            return True
        return header is not None and self._end - self._start >= HEADER_LEN + header.length

    def rekey(self, keys: TrafficKeys) -> None:
        self._opener = Opener.from_keys(self._version, self._cipher, keys)
