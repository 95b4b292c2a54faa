"""The handshaked <-> worker message codec: round trips, every malformed input a
MessageError (never another exception), fuzzed with Hypothesis."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktls.handshaked import codec
from ktls.session import Role, Session, TrafficKeys
from ktls.suites import SUITES
from ktls.wire import ProtocolVersion


def _keys(suite_index: int, seq: int, generation: int) -> TrafficKeys:
    suite = SUITES[suite_index]
    cipher = suite.cipher
    tls12_salt = suite.version is ProtocolVersion.TLS1_2 and cipher.salt_len
    return TrafficKeys(
        key=os.urandom(cipher.key_len),
        iv=os.urandom(cipher.salt_len if tls12_salt else cipher.nonce_len),
        seq=seq,
        secret=os.urandom(32) if suite.version is ProtocolVersion.TLS1_3 else None,
        explicit_nonce=seq + 7 if suite.version is ProtocolVersion.TLS1_2 else None,
        generation=generation,
    )


def _connection(
    index: int, ipv6: bool = False, cert: bytes | None = b"\x30\x03der"
) -> codec.Connection:
    suite = SUITES[index]
    session = Session(
        role=Role.SERVER,
        version=suite.version,
        suite=suite,
        tx=_keys(index, 3, 1),
        rx=_keys(index, 0, 0),
        alpn="http/1.1",
        server_name="example.org",
        resumed=True,
    )
    peer = ("::1", 40000) if ipv6 else ("127.0.0.1", 40000)
    local = ("::1", 443) if ipv6 else ("10.0.0.1", 443)
    return codec.Connection(session, peer, local, cert)


@pytest.mark.parametrize("index", range(len(SUITES)), ids=[s.openssl_name for s in SUITES])
def test_connection_round_trip_every_suite(index: int) -> None:
    message = _connection(index, ipv6=index % 2 == 0, cert=None if index % 3 else b"cert")
    assert codec.decode(codec.encode(message)) == message


def test_hello_and_welcome_round_trip() -> None:
    assert codec.decode(codec.encode(codec.Hello("worker 1"))) == codec.Hello("worker 1")
    assert codec.decode(codec.encode(codec.Welcome("d"))) == codec.Welcome("d")


def test_repr_holds_no_keys() -> None:
    message = _connection(0)
    assert message.session.tx.key.hex() not in repr(message)
    assert "key" not in repr(message).lower()


def test_unknown_fields_are_skipped() -> None:
    data = codec.encode(codec.Hello("w")) + bytes([200, 0, 2]) + b"xx"
    assert codec.decode(data) == codec.Hello("w")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than a message header"),
        (b"HTTP/1.1 200", "not a ktls handshaked message"),
        (b"KTLH\x02\x01", "message version 2"),
        (b"KTLH\x01\x09", "unknown message kind 9"),
        (b"KTLH\x01\x01", "NAME is missing"),
        (b"KTLH\x01\x01\x01\x00\x05ab", "longer than the message"),
        (b"KTLH\x01\x01\x01", "cut short"),
        (b"KTLH\x01\x01\x01\x00\x01a\x01\x00\x01b", "appears twice"),
        (b"KTLH\x01\x01\x01\x00\x01\xff", "not UTF-8"),
        (b"KTLH\x01\x03", "TLS_VERSION is missing"),
        (b"KTLH\x01\x03\x02\x00\x02\x03\x01", "not TLS 1.2 or 1.3"),
    ],
)
def test_malformed_messages(data: bytes, message: str) -> None:
    with pytest.raises(codec.MessageError, match=message):
        codec.decode(data)


def test_wrong_key_length_is_refused() -> None:
    good = codec.encode(_connection(0))
    # The TX key field (tag 10) with one byte less, everything else intact.
    index = good.index(bytes([10]) + len(_connection(0).session.tx.key).to_bytes(2, "big"))
    key_len = int.from_bytes(good[index + 1 : index + 3], "big")
    bad = good[:index] + bytes([10]) + (key_len - 1).to_bytes(2, "big")
    bad += good[index + 3 : index + 3 + key_len - 1] + good[index + 3 + key_len :]
    with pytest.raises(codec.MessageError, match="TX_KEY must be"):
        codec.decode(bad)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_any_bytes_give_a_message_or_message_error(data: bytes) -> None:
    with contextlib.suppress(codec.MessageError):
        codec.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_messages(data: st.DataObject) -> None:
    encoded = bytearray(codec.encode(_connection(data.draw(st.integers(0, len(SUITES) - 1)))))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(encoded) - 1))
        encoded[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(encoded)))
    with contextlib.suppress(codec.MessageError):
        codec.decode(bytes(encoded[:cut]))
