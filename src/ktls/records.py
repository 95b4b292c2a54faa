"""TLS record and post-handshake message codec.  Sans-IO: bytes in, values out.

Only what crosses the wire after the hand-off is handled here: record headers,
alerts, and the three handshake messages that may still arrive (NewSessionTicket,
KeyUpdate, HelloRequest) -- anything else is reported as unexpected.  Every parser
rejects short input, oversized lengths and leftover bytes with
:class:`~ktls.errors.ProtocolViolation` carrying the alert the RFCs name, so a
fuzzer only ever sees our own exception.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from .errors import ProtocolViolation
from .wire import AlertDescription, AlertLevel, ContentType, HandshakeType, KeyUpdateRequest

__all__ = [
    "ANY_RECORD_VERSION",
    "CONTENT_TYPES",
    "HEADER_LEN",
    "MAX_PLAINTEXT",
    "RECORD_HEADER",
    "Alert",
    "HandshakeBuffer",
    "HandshakeMessage",
    "RecordBuffer",
    "RecordHeader",
    "check_new_session_ticket",
    "encode_alert",
    "encode_handshake",
    "encode_header",
    "encode_key_update",
    "max_ciphertext",
    "parse_alert",
    "parse_header",
    "parse_header_from",
    "parse_key_update",
]

HEADER_LEN = 5
MAX_PLAINTEXT = 1 << 14
# RFC 8446 5.2: TLSCiphertext.length <= 2^14 + 256.  RFC 5246 6.2.3: <= 2^14 + 2048.
_MAX_CIPHERTEXT = {0x0304: MAX_PLAINTEXT + 256, 0x0303: MAX_PLAINTEXT + 2048}
# The 5-byte record header: content type, legacy version, length (RFC 8446 5.1).
RECORD_HEADER = struct.Struct("!BHH")
# During the handshake a record may say 0x0301 (RFC 8446 5.1); after it, every record
# says 0x0303, and the kernel rejects anything else, so the software engine does too.
HANDSHAKE_VERSIONS = frozenset({0x0301, 0x0302, 0x0303})
PROTECTED_VERSIONS = frozenset({0x0303})
# What a peer may put in a handshake record: any 3.x (RFC 5246 E.1, RFC 8446 5.1).
ANY_RECORD_VERSION = frozenset(range(0x0300, 0x0400))


def max_ciphertext(version: int) -> int:
    return _MAX_CIPHERTEXT[version]


class RecordHeader(NamedTuple):
    # A named tuple, not a dataclass: one is made per record, on the data path.
    content_type: int
    legacy_version: int
    length: int


# Every content type on the wire (RFC 8446 B.1), as the ints a parser sees.
CONTENT_TYPES = frozenset(ContentType.__members__.values())


def parse_header(
    data: bytes,
    *,
    max_length: int = MAX_PLAINTEXT + 2048,
    versions: frozenset[int] = HANDSHAKE_VERSIONS,
) -> RecordHeader:
    """Decode a 5-byte record header, rejecting lengths no valid peer sends."""
    if len(data) != HEADER_LEN:
        raise ProtocolViolation(
            f"record header must be {HEADER_LEN} bytes, got {len(data)}",
            AlertDescription.DECODE_ERROR,
        )
    return parse_header_from(data, 0, max_length=max_length, versions=versions)


def parse_header_from(
    buffer: bytes | bytearray | memoryview,
    offset: int,
    *,
    max_length: int = MAX_PLAINTEXT + 2048,
    versions: frozenset[int] = HANDSHAKE_VERSIONS,
) -> RecordHeader:
    """:func:`parse_header` of the 5 bytes at ``offset`` in ``buffer`` (no copy)."""
    content_type, version, length = RECORD_HEADER.unpack_from(buffer, offset)
    if content_type not in CONTENT_TYPES:
        raise ProtocolViolation(
            f"unknown record content type {content_type}", AlertDescription.UNEXPECTED_MESSAGE
        )
    if version not in versions:
        raise ProtocolViolation(
            f"bad record version 0x{version:04x}", AlertDescription.PROTOCOL_VERSION
        )
    if length > max_length:
        raise ProtocolViolation(
            f"record of {length} bytes exceeds the limit of {max_length}",
            AlertDescription.RECORD_OVERFLOW,
        )
    return RecordHeader(content_type, version, length)


def encode_header(content_type: int, length: int, legacy_version: int = 0x0303) -> bytes:
    return RECORD_HEADER.pack(content_type, legacy_version, length)


class RecordBuffer:
    """Reassembles whole records from a byte stream.

    ``needed()`` tells how many more bytes complete the next record, so a caller
    reading a socket never takes bytes beyond it (the hand-off depends on that).
    """

    def __init__(
        self,
        *,
        max_length: int = MAX_PLAINTEXT + 2048,
        versions: frozenset[int] = HANDSHAKE_VERSIONS,
    ) -> None:
        self._data = bytearray()
        self._max_length = max_length
        self._versions = versions

    def feed(self, data: bytes) -> None:
        self._data += data

    def needed(self) -> int:
        if len(self._data) < HEADER_LEN:
            return HEADER_LEN - len(self._data)
        header = parse_header(
            bytes(self._data[:HEADER_LEN]), max_length=self._max_length, versions=self._versions
        )
        return max(0, HEADER_LEN + header.length - len(self._data))

    def next_record(self) -> tuple[RecordHeader, bytes] | None:
        """Pop one whole record (header, body), or None if more bytes are needed."""
        if len(self._data) < HEADER_LEN:
            return None
        header = parse_header(
            bytes(self._data[:HEADER_LEN]), max_length=self._max_length, versions=self._versions
        )
        end = HEADER_LEN + header.length
        if len(self._data) < end:
            return None
        body = bytes(self._data[HEADER_LEN:end])
        del self._data[:end]
        return header, body

    def pending(self) -> int:
        return len(self._data)


# -- alerts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    level: int
    description: int

    @property
    def known(self) -> AlertDescription | None:
        try:
            return AlertDescription(self.description)
        except ValueError:
            return None

    @property
    def name(self) -> str:
        known = self.known
        return known.name.lower() if known is not None else f"unknown({self.description})"


def parse_alert(data: bytes) -> Alert:
    if len(data) != 2:
        raise ProtocolViolation(
            f"alert record must hold 2 bytes, got {len(data)}", AlertDescription.DECODE_ERROR
        )
    level, description = data
    if level not in (AlertLevel.WARNING, AlertLevel.FATAL):
        raise ProtocolViolation(f"bad alert level {level}", AlertDescription.ILLEGAL_PARAMETER)
    return Alert(level, description)


def encode_alert(description: AlertDescription, level: AlertLevel | None = None) -> bytes:
    if level is None:
        warning = description in (AlertDescription.CLOSE_NOTIFY, AlertDescription.USER_CANCELED)
        level = AlertLevel.WARNING if warning else AlertLevel.FATAL
    return bytes((level, description))


# -- handshake messages after the hand-off --------------------------------------------------


@dataclass(frozen=True)
class HandshakeMessage:
    msg_type: int
    body: bytes

    def encode(self) -> bytes:
        return encode_handshake(self.msg_type, self.body)


def encode_handshake(msg_type: int, body: bytes) -> bytes:
    return bytes((msg_type,)) + len(body).to_bytes(3, "big") + body


# A post-handshake message larger than this is not legitimate (tickets are a few hundred
# bytes); the bound keeps a hostile peer from growing our buffer without limit.
MAX_POST_HANDSHAKE_MESSAGE = 1 << 16


class HandshakeBuffer:
    """Splits handshake records into messages: they may span or share records."""

    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, data: bytes) -> None:
        if not data:
            raise ProtocolViolation("empty handshake record", AlertDescription.UNEXPECTED_MESSAGE)
        self._data += data

    def next_message(self) -> HandshakeMessage | None:
        if len(self._data) < 4:
            return None
        length = int.from_bytes(self._data[1:4], "big")
        if length > MAX_POST_HANDSHAKE_MESSAGE:
            raise ProtocolViolation(
                f"post-handshake message of {length} bytes is too large",
                AlertDescription.DECODE_ERROR,
            )
        if len(self._data) < 4 + length:
            return None
        message = HandshakeMessage(self._data[0], bytes(self._data[4 : 4 + length]))
        del self._data[: 4 + length]
        return message

    def pending(self) -> int:
        """Bytes of an unfinished message (must be 0 when a key changes, RFC 8446 5.1)."""
        return len(self._data)


def parse_key_update(body: bytes) -> KeyUpdateRequest:
    if len(body) != 1:
        raise ProtocolViolation(
            f"KeyUpdate body must be 1 byte, got {len(body)}", AlertDescription.DECODE_ERROR
        )
    try:
        return KeyUpdateRequest(body[0])
    except ValueError:
        raise ProtocolViolation(
            f"KeyUpdate with bad request_update {body[0]}", AlertDescription.ILLEGAL_PARAMETER
        ) from None


# RFC 8446 4.6.1 / 4.2.10: the one extension a NewSessionTicket may carry.
_EARLY_DATA = 42


class _Reader:
    """Reads a message's fields in order; running short is a decode_error."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._offset = 0
        self._what = what

    def take(self, length: int) -> bytes:
        end = self._offset + length
        if end > len(self._data):
            raise ProtocolViolation(f"{self._what} cut short", AlertDescription.DECODE_ERROR)
        piece = self._data[self._offset : end]
        self._offset = end
        return piece

    def vector(self, length_bytes: int) -> bytes:
        return self.take(int.from_bytes(self.take(length_bytes), "big"))

    @property
    def done(self) -> bool:
        return self._offset == len(self._data)


def check_new_session_ticket(body: bytes) -> None:
    """Check a TLS 1.3 NewSessionTicket's structure (RFC 8446 4.6.1); raise
    ProtocolViolation (decode_error / illegal_parameter) for a malformed one.

    Only the framing: OpenSSL interprets the ticket when a session is asked for.
    """
    ticket = _Reader(body, "NewSessionTicket")
    ticket.take(8)  # ticket_lifetime, ticket_age_add
    ticket.vector(1)  # ticket_nonce
    if not ticket.vector(2):
        raise ProtocolViolation(
            "NewSessionTicket with an empty ticket", AlertDescription.DECODE_ERROR
        )
    extensions = _Reader(ticket.vector(2), "NewSessionTicket extension")
    if not ticket.done:
        raise ProtocolViolation(
            "bytes after the NewSessionTicket's extensions", AlertDescription.DECODE_ERROR
        )
    seen = set()
    while not extensions.done:
        kind = int.from_bytes(extensions.take(2), "big")
        data = extensions.vector(2)
        if kind in seen:
            raise ProtocolViolation(
                f"NewSessionTicket repeats extension {kind}", AlertDescription.ILLEGAL_PARAMETER
            )
        seen.add(kind)
        if kind == _EARLY_DATA and len(data) != 4:
            raise ProtocolViolation(
                "NewSessionTicket early_data extension is not 4 bytes",
                AlertDescription.DECODE_ERROR,
            )


def encode_key_update(request: KeyUpdateRequest) -> bytes:
    return encode_handshake(HandshakeType.KEY_UPDATE, bytes((request,)))
