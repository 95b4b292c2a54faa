"""The messages between ``ktls handshaked`` and its workers (sans-IO).

One message per SOCK_SEQPACKET datagram, so framing is the socket's; a message is

    magic "KTLH" | version u8 | kind u8 | fields

and the fields are type-length-value: ``tag u8 | length u16 | value``, each tag at most
once, in any order; unknown tags are skipped (a newer daemon may add some), a known
tag with a malformed value, a missing required field, a wrong magic, version or kind is
a :class:`MessageError`.  Nothing here trusts a length it has not checked, so a hostile
peer gets an error, never an exception of another kind or a half-built value.

A CONNECTION message carries the hand-off value of a finished handshake (the socket
itself travels beside it, SCM_RIGHTS): version, suite, for each direction the traffic
key, IV, next sequence number, TLS 1.3 traffic secret (so that the worker can follow
KeyUpdates) and TLS 1.2 explicit nonce; ALPN, SNI, resumption, both addresses and the
client's certificate.  Never the private key: that stays in the daemon.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ..errors import KTLSError
from ..session import Role, Session, TrafficKeys
from ..suites import suite_by_id
from ..wire import ProtocolVersion

__all__ = [
    "VERSION",
    "Connection",
    "Hello",
    "MessageError",
    "Welcome",
    "decode",
    "encode",
]

MAGIC = b"KTLH"
VERSION = 1
MAX_MESSAGE = 65536  # what a receiver reads per datagram (a certificate chain fits)
_HEAD = struct.Struct("!4sBB")
_FIELD = struct.Struct("!BH")


class MessageError(KTLSError):
    """A message that is not one this side can take: the sender is dropped."""


class Kind(enum.IntEnum):
    HELLO = 1  # worker -> daemon: ready for connections
    WELCOME = 2  # daemon -> worker: accepted
    CONNECTION = 3  # daemon -> worker: a finished handshake, with its socket


class Tag(enum.IntEnum):
    NAME = 1
    TLS_VERSION = 2
    SUITE = 3
    TX_KEY, TX_IV, TX_SEQ, TX_SECRET, TX_NONCE, TX_GENERATION = 10, 11, 12, 13, 14, 15
    RX_KEY, RX_IV, RX_SEQ, RX_SECRET, RX_NONCE, RX_GENERATION = 20, 21, 22, 23, 24, 25
    ALPN = 30
    SNI = 31
    RESUMED = 32
    PEER_ADDRESS = 40
    LOCAL_ADDRESS = 41
    PEER_CERTIFICATE = 42


@dataclass(frozen=True)
class Hello:
    name: str  # the worker's own description, for logs


@dataclass(frozen=True)
class Welcome:
    name: str


@dataclass(frozen=True)
class Connection:
    """A connection handed to a worker (its socket travels with the message)."""

    session: Session
    peer_address: tuple[str, int]
    local_address: tuple[str, int]
    peer_certificate: bytes | None = None  # DER

    def __repr__(self) -> str:  # (no keys in logs)
        return (
            f"Connection({self.session.version.label} {self.session.suite.openssl_name} "
            f"from {self.peer_address[0]}:{self.peer_address[1]})"
        )


Message = Hello | Welcome | Connection


# -- encoding ---------------------------------------------------------------------------------


def _u(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def _address(address: tuple[str, int]) -> bytes:
    ip = ipaddress.ip_address(address[0])
    return ip.packed + _u(address[1], 2)


def _keys(keys: TrafficKeys, base: int) -> Iterator[tuple[int, bytes]]:
    yield base, keys.key
    yield base + 1, keys.iv
    yield base + 2, _u(keys.seq, 8)
    if keys.secret is not None:
        yield base + 3, keys.secret
    if keys.explicit_nonce is not None:
        yield base + 4, _u(keys.explicit_nonce, 8)
    yield base + 5, _u(keys.generation, 4)


def _fields(message: Message) -> tuple[Kind, Iterator[tuple[int, bytes]]]:
    if isinstance(message, Hello):
        return Kind.HELLO, iter([(Tag.NAME, message.name.encode())])
    if isinstance(message, Welcome):
        return Kind.WELCOME, iter([(Tag.NAME, message.name.encode())])
    session = message.session

    def fields() -> Iterator[tuple[int, bytes]]:
        yield Tag.TLS_VERSION, _u(session.version, 2)
        yield Tag.SUITE, _u(session.suite.iana_id, 2)
        yield from _keys(session.tx, Tag.TX_KEY)
        yield from _keys(session.rx, Tag.RX_KEY)
        if session.alpn is not None:
            yield Tag.ALPN, session.alpn.encode()
        if session.server_name is not None:
            yield Tag.SNI, session.server_name.encode("idna")
        yield Tag.RESUMED, _u(session.resumed, 1)
        yield Tag.PEER_ADDRESS, _address(message.peer_address)
        yield Tag.LOCAL_ADDRESS, _address(message.local_address)
        if message.peer_certificate is not None:
            yield Tag.PEER_CERTIFICATE, message.peer_certificate

    return Kind.CONNECTION, fields()


def encode(message: Message) -> bytes:
    kind, fields = _fields(message)
    out = bytearray(_HEAD.pack(MAGIC, VERSION, kind))
    for tag, value in fields:
        if len(value) > 0xFFFF:
            raise ValueError(f"field {tag} too long")
        out += _FIELD.pack(tag, len(value)) + value
    if len(out) > MAX_MESSAGE:
        raise ValueError("message too long")
    return bytes(out)


# -- decoding ---------------------------------------------------------------------------------


def _parse_fields(body: memoryview) -> dict[int, bytes]:
    fields: dict[int, bytes] = {}
    offset = 0
    while offset < len(body):
        if len(body) - offset < _FIELD.size:
            raise MessageError("a field header is cut short")
        tag, length = _FIELD.unpack_from(body, offset)
        offset += _FIELD.size
        if length > len(body) - offset:
            raise MessageError(f"field {tag} is longer than the message")
        if tag in fields:
            raise MessageError(f"field {tag} appears twice")
        fields[tag] = bytes(body[offset : offset + length])
        offset += length
    return fields


def _need(fields: Mapping[int, bytes], tag: Tag) -> bytes:
    try:
        return fields[tag]
    except KeyError:
        raise MessageError(f"{tag.name} is missing") from None


def _int(fields: Mapping[int, bytes], tag: Tag, size: int) -> int:
    value = _need(fields, tag)
    if len(value) != size:
        raise MessageError(f"{tag.name} must be {size} bytes")
    return int.from_bytes(value, "big")


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError(f"{what} is not UTF-8") from None


def _decode_address(fields: Mapping[int, bytes], tag: Tag) -> tuple[str, int]:
    value = _need(fields, tag)
    if len(value) not in (6, 18):
        raise MessageError(f"{tag.name} must be an IPv4 or IPv6 address and a port")
    return str(ipaddress.ip_address(value[:-2])), int.from_bytes(value[-2:], "big")


def _decode_keys(fields: Mapping[int, bytes], base: Tag, suite_key: int, iv: int) -> TrafficKeys:
    tags = [Tag(base + i) for i in range(6)]
    key, iv_value = _need(fields, tags[0]), _need(fields, tags[1])
    if len(key) != suite_key:
        raise MessageError(f"{tags[0].name} must be {suite_key} bytes for this suite")
    if len(iv_value) != iv:
        raise MessageError(f"{tags[1].name} must be {iv} bytes for this suite")
    secret = fields.get(tags[3])
    if secret is not None and not 32 <= len(secret) <= 64:
        raise MessageError(f"{tags[3].name} has an impossible length")
    nonce = _int(fields, tags[4], 8) if tags[4] in fields else None
    return TrafficKeys(
        key=key,
        iv=iv_value,
        seq=_int(fields, tags[2], 8),
        secret=secret,
        explicit_nonce=nonce,
        generation=_int(fields, tags[5], 4),
    )


def _decode_connection(fields: Mapping[int, bytes]) -> Connection:
    try:
        version = ProtocolVersion(_int(fields, Tag.TLS_VERSION, 2))
    except ValueError:
        raise MessageError("TLS_VERSION is not TLS 1.2 or 1.3") from None
    suite = suite_by_id(_int(fields, Tag.SUITE, 2))
    if suite is None or suite.version is not version:
        raise MessageError("SUITE is not one ktls knows for this version")
    cipher = suite.cipher
    # TLS 1.3 IVs are the whole nonce base; TLS 1.2 keeps the 4-byte salt for GCM/CCM
    # and the whole nonce base for ChaCha20-Poly1305.
    tls12_salt = version is ProtocolVersion.TLS1_2 and cipher.salt_len
    iv_len = cipher.salt_len if tls12_salt else cipher.nonce_len
    tx = _decode_keys(fields, Tag.TX_KEY, cipher.key_len, iv_len)
    rx = _decode_keys(fields, Tag.RX_KEY, cipher.key_len, iv_len)
    if version is ProtocolVersion.TLS1_3 and (tx.secret is None or rx.secret is None):
        raise MessageError("a TLS 1.3 connection needs both traffic secrets")
    alpn = fields.get(Tag.ALPN)
    sni = fields.get(Tag.SNI)
    resumed = _int(fields, Tag.RESUMED, 1)
    if resumed > 1:
        raise MessageError("RESUMED must be 0 or 1")
    session = Session(
        role=Role.SERVER,
        version=version,
        suite=suite,
        tx=tx,
        rx=rx,
        alpn=None if alpn is None else _text(alpn, "ALPN"),
        server_name=None if sni is None else _text(sni, "SNI"),
        resumed=bool(resumed),
    )
    return Connection(
        session,
        _decode_address(fields, Tag.PEER_ADDRESS),
        _decode_address(fields, Tag.LOCAL_ADDRESS),
        fields.get(Tag.PEER_CERTIFICATE),
    )


def decode(data: bytes) -> Message:
    """One message; MessageError for anything else."""
    view = memoryview(data)
    if len(view) < _HEAD.size:
        raise MessageError("shorter than a message header")
    magic, version, kind = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise MessageError("not a ktls handshaked message")
    if version != VERSION:
        raise MessageError(f"message version {version}; this side speaks {VERSION}")
    fields = _parse_fields(view[_HEAD.size :])
    known = {tag: value for tag, value in fields.items() if tag in Tag._value2member_map_}
    if kind == Kind.HELLO:
        return Hello(_text(_need(known, Tag.NAME), "NAME"))
    if kind == Kind.WELCOME:
        return Welcome(_text(_need(known, Tag.NAME), "NAME"))
    if kind == Kind.CONNECTION:
        return _decode_connection(known)
    raise MessageError(f"unknown message kind {kind}")
