"""The software engine's receiving side, over a real socket pair: what it merges into
one read, where it stops, and that nothing after a bad record comes out.

Records are sealed by our own Sealer (checked against RFC 8448 in test_protection), so
each case can put exactly the records it needs on the wire.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from ktls.errors import ProtocolViolation
from ktls.protection import RecordSender
from ktls.records import encode_key_update
from ktls.session import TrafficKeys
from ktls.software import SoftwareRx
from ktls.suites import CIPHERS
from ktls.wire import AlertDescription, ContentType, KeyUpdateRequest, ProtocolVersion

APP = ContentType.APPLICATION_DATA
TLS13 = ProtocolVersion.TLS1_3
AES128 = CIPHERS["AES-128-GCM"]
KEYS = TrafficKeys(key=bytes(range(16)), iv=bytes(range(12)), seq=0, explicit_nonce=0)


Wire = tuple[socket.socket, SoftwareRx, RecordSender]  # the peer's end, ours, the peer's sealer


@pytest.fixture
def wire() -> Iterator[Wire]:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        yield theirs, SoftwareRx(ours, TLS13, AES128, KEYS), RecordSender(TLS13, AES128, KEYS)


def _seal(sender: RecordSender, content_type: ContentType, payload: bytes) -> bytes:
    if content_type is APP:
        out = memoryview(bytearray(sender.sealed_size(len(payload))))
        return bytes(out[: sender.seal_data_into(memoryview(payload), out)])
    out = memoryview(bytearray(len(payload) + sender.overhead))
    return bytes(out[: sender.seal_into(content_type, payload, out)])


def _read(rx: SoftwareRx, buffer: memoryview) -> tuple[ContentType, bytes]:
    result = rx.read_into(buffer)
    assert result is not None
    content_type, payload = result
    return content_type, bytes(buffer[:payload] if isinstance(payload, int) else payload)


def test_data_records_already_here_come_in_one_read(wire: Wire) -> None:
    peer, rx, sender = wire
    parts = [os.urandom(1000) for _ in range(5)]
    peer.sendall(b"".join(_seal(sender, APP, part) for part in parts))
    buffer = memoryview(bytearray(1 << 16))
    result = rx.read_into(buffer)
    assert result == (APP, 5000), "the records were not merged into the caller's buffer"
    assert bytes(buffer[:5000]) == b"".join(parts)


def test_a_read_stops_before_a_control_record_and_returns_it_next(wire: Wire) -> None:
    peer, rx, sender = wire
    key_update = encode_key_update(KeyUpdateRequest.UPDATE_NOT_REQUESTED)
    new_keys = TrafficKeys(key=bytes(16), iv=bytes(12), seq=0, explicit_nonce=0)
    wire_bytes = _seal(sender, APP, b"before") + _seal(sender, ContentType.HANDSHAKE, key_update)
    sender.rekey(new_keys)
    peer.sendall(wire_bytes + _seal(sender, APP, b"after"))  # under the new keys
    buffer = memoryview(bytearray(1 << 16))
    assert _read(rx, buffer) == (APP, b"before")
    assert _read(rx, buffer) == (ContentType.HANDSHAKE, key_update)
    # Nothing was opened ahead under the old keys: the new ones open what follows.
    rx.rekey(new_keys)
    assert _read(rx, buffer) == (APP, b"after")


def test_data_before_a_tampered_record_is_given_then_the_error(wire: Wire) -> None:
    peer, rx, sender = wire
    good = _seal(sender, APP, b"good")
    bad = bytearray(_seal(sender, APP, b"evil"))
    bad[-1] ^= 1
    peer.sendall(good + bytes(bad) + _seal(sender, APP, b"never"))
    buffer = memoryview(bytearray(1 << 16))
    assert _read(rx, buffer) == (APP, b"good")
    assert rx.ready() is None  # something other than data comes first
    with pytest.raises(ProtocolViolation) as failure:
        rx.read_into(buffer)
    assert failure.value.alert is AlertDescription.BAD_RECORD_MAC
    assert b"evil" not in bytes(buffer)
    assert b"never" not in bytes(buffer)


def test_a_record_larger_than_the_buffer_comes_as_a_view(wire: Wire) -> None:
    peer, rx, sender = wire
    payload = os.urandom(3000)
    peer.sendall(_seal(sender, APP, payload) + _seal(sender, APP, b"next"))
    small = memoryview(bytearray(100))
    assert _read(rx, small) == (APP, payload)  # the driver keeps what does not fit
    assert _read(rx, small) == (APP, b"next")


def test_end_of_stream_inside_a_record_is_not_data(wire: Wire) -> None:
    peer, rx, sender = wire
    peer.sendall(_seal(sender, APP, b"whole") + _seal(sender, APP, b"cut short")[:-3])
    peer.shutdown(socket.SHUT_WR)
    buffer = memoryview(bytearray(1 << 16))
    assert _read(rx, buffer) == (APP, b"whole")
    assert rx.read_into(buffer) is None
