"""Unit tests for ktls.records: record headers, reassembly, alerts, post-handshake messages.

Sans-IO only: bytes in, values out; no socket and no kernel.  Known answers first
(RFC 8446 §5.1/§6/§4.6.3 and RFC 5246 §6.2.1 wire formats), then properties, then a
fuzz invariant in the style of h11's: whatever bytes a peer sends, the parsers raise
nothing but :class:`~ktls.errors.ProtocolViolation`.
"""

from __future__ import annotations

import contextlib
import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktls.errors import ProtocolViolation
from ktls.records import (
    HEADER_LEN,
    MAX_PLAINTEXT,
    MAX_POST_HANDSHAKE_MESSAGE,
    Alert,
    HandshakeBuffer,
    HandshakeMessage,
    RecordBuffer,
    RecordHeader,
    check_new_session_ticket,
    encode_alert,
    encode_handshake,
    encode_header,
    encode_key_update,
    max_ciphertext,
    parse_alert,
    parse_header,
    parse_key_update,
)
from ktls.wire import (
    AlertDescription,
    AlertLevel,
    ContentType,
    HandshakeType,
    KeyUpdateRequest,
)

FUZZ = settings(max_examples=200, deadline=None)
DEFAULT_MAX = MAX_PLAINTEXT + 2048  # RFC 5246 §6.2.3: TLSCiphertext.length <= 2^14 + 2048


def raw_header(content_type: int, version: int, length: int) -> bytes:
    """A record header built by hand, independent of encode_header."""
    return struct.pack("!BHH", content_type, version, length)


def record(content_type: int, body: bytes, version: int = 0x0303) -> bytes:
    return raw_header(content_type, version, len(body)) + body


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize("content_type", list(ContentType))
@pytest.mark.parametrize("version", [0x0301, 0x0302, 0x0303])
@pytest.mark.parametrize("length", [0, 1, MAX_PLAINTEXT, DEFAULT_MAX])
def test_parse_header_accepts_valid(content_type: ContentType, version: int, length: int) -> None:
    header = parse_header(raw_header(content_type, version, length))
    assert header == RecordHeader(content_type, version, length)


def test_parse_header_known_bytes() -> None:
    # A TLS 1.3 protected record of 0x43 bytes, as in RFC 8448 §3.
    assert parse_header(bytes.fromhex("1703030043")) == RecordHeader(23, 0x0303, 0x43)


@pytest.mark.parametrize(
    "data", [b"", b"\x17", b"\x17\x03\x03\x00", b"\x17\x03\x03\x00\x01\x00"], ids=len
)
def test_parse_header_rejects_wrong_size(data: bytes) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse_header(data)
    assert info.value.alert is AlertDescription.DECODE_ERROR


@pytest.mark.parametrize("content_type", [0, 1, 19, 24, 25, 0x80, 0xFF])
def test_parse_header_rejects_unknown_content_type(content_type: int) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse_header(raw_header(content_type, 0x0303, 10))
    assert info.value.alert is AlertDescription.UNEXPECTED_MESSAGE


@pytest.mark.parametrize("version", [0x0000, 0x0200, 0x0300, 0x0304, 0x0403, 0x7F1C, 0xFEFD])
def test_parse_header_rejects_bad_version(version: int) -> None:
    # RFC 8446 §5.1: legacy_record_version is 0x0303 (0x0301 allowed in a first ClientHello).
    with pytest.raises(ProtocolViolation) as info:
        parse_header(raw_header(ContentType.APPLICATION_DATA, version, 10))
    assert info.value.alert is AlertDescription.PROTOCOL_VERSION


@pytest.mark.parametrize("length", [DEFAULT_MAX + 1, 0xFFFF])
def test_parse_header_rejects_oversized_default(length: int) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse_header(raw_header(ContentType.APPLICATION_DATA, 0x0303, length))
    assert info.value.alert is AlertDescription.RECORD_OVERFLOW


def test_parse_header_tls13_limit() -> None:
    # RFC 8446 §5.2: TLSCiphertext.length MUST NOT exceed 2^14 + 256.
    limit = max_ciphertext(0x0304)
    assert limit == MAX_PLAINTEXT + 256
    assert max_ciphertext(0x0303) == DEFAULT_MAX
    assert parse_header(raw_header(23, 0x0303, limit), max_length=limit).length == limit
    with pytest.raises(ProtocolViolation) as info:
        parse_header(raw_header(23, 0x0303, limit + 1), max_length=limit)
    assert info.value.alert is AlertDescription.RECORD_OVERFLOW


@given(
    st.sampled_from(list(ContentType)),
    st.integers(0, DEFAULT_MAX),
    st.sampled_from([0x0301, 0x0302, 0x0303]),
)
@FUZZ
def test_encode_header_round_trip(content_type: ContentType, length: int, version: int) -> None:
    data = encode_header(content_type, length, version)
    assert data == raw_header(content_type, version, length)
    assert parse_header(data) == RecordHeader(content_type, version, length)


def test_encode_header_default_version() -> None:
    assert encode_header(ContentType.ALERT, 2) == b"\x15\x03\x03\x00\x02"


# --------------------------------------------------------------------------- RecordBuffer

RECORDS = [
    (ContentType.HANDSHAKE, b"\x04\x00\x00\x00"),
    (ContentType.APPLICATION_DATA, b""),
    (ContentType.APPLICATION_DATA, bytes(range(256)) * 3),
    (ContentType.ALERT, b"\x01\x00"),
    (ContentType.APPLICATION_DATA, b"\xaa" * DEFAULT_MAX),
]
STREAM = b"".join(record(t, body) for t, body in RECORDS)
EXPECTED = [(RecordHeader(t, 0x0303, len(body)), body) for t, body in RECORDS]


def drain(buf: RecordBuffer) -> list[tuple[RecordHeader, bytes]]:
    out = []
    while (item := buf.next_record()) is not None:
        out.append(item)
    return out


def test_record_buffer_whole() -> None:
    buf = RecordBuffer()
    assert buf.needed() == HEADER_LEN
    assert buf.next_record() is None
    buf.feed(STREAM)
    assert buf.pending() == len(STREAM)
    assert drain(buf) == EXPECTED
    assert buf.pending() == 0
    assert buf.needed() == HEADER_LEN


def test_record_buffer_one_byte_at_a_time() -> None:
    buf = RecordBuffer()
    got = []
    for i in range(len(STREAM)):
        buf.feed(STREAM[i : i + 1])
        got += drain(buf)
    assert got == EXPECTED
    assert buf.pending() == 0


@pytest.mark.parametrize("garbage", [b"\x17", b"\x17\x03\x03", b"\x17\x03\x03\x00"])
def test_record_buffer_trailing_partial_header(garbage: bytes) -> None:
    buf = RecordBuffer()
    buf.feed(STREAM + garbage)
    assert drain(buf) == EXPECTED
    assert buf.pending() == len(garbage)
    assert buf.needed() == HEADER_LEN - len(garbage)


def test_record_buffer_trailing_partial_record() -> None:
    buf = RecordBuffer()
    buf.feed(STREAM + raw_header(23, 0x0303, 100) + b"x" * 40)
    assert drain(buf) == EXPECTED
    assert buf.needed() == 60


@pytest.mark.parametrize(
    ("garbage", "alert"),
    [
        (b"\xff\x03\x03\x00\x01", AlertDescription.UNEXPECTED_MESSAGE),
        (b"\x17\x00\x00\x00\x01", AlertDescription.PROTOCOL_VERSION),
        (b"\x17\x03\x03\xff\xff", AlertDescription.RECORD_OVERFLOW),
        (b"GET / HTTP/1.1\r\n", AlertDescription.UNEXPECTED_MESSAGE),
    ],
)
def test_record_buffer_trailing_garbage(garbage: bytes, alert: AlertDescription) -> None:
    """The records before the garbage come out intact; then the garbage is refused."""
    buf = RecordBuffer()
    buf.feed(STREAM + garbage)
    got = [buf.next_record() for _ in EXPECTED]
    assert got == EXPECTED
    with pytest.raises(ProtocolViolation) as info:
        buf.next_record()
    assert info.value.alert is alert
    with pytest.raises(ProtocolViolation):
        buf.needed()


def test_record_buffer_custom_limit() -> None:
    limit = max_ciphertext(0x0304)
    buf = RecordBuffer(max_length=limit)
    buf.feed(raw_header(23, 0x0303, limit + 1))
    with pytest.raises(ProtocolViolation) as info:
        buf.next_record()
    assert info.value.alert is AlertDescription.RECORD_OVERFLOW


def feed_by_needed(stream: bytes) -> list[tuple[RecordHeader, bytes]]:
    """Read ``stream`` as a socket reader would: never more than needed() bytes at a time."""
    buf = RecordBuffer()
    out = []
    pos = 0
    while pos < len(stream):
        want = buf.needed()
        assert want > 0, "needed() is 0 only when a whole record is already buffered"
        buf.feed(stream[pos : pos + want])
        pos += want
        item = buf.next_record()
        if item is None:
            assert buf.needed() > 0
        else:
            out.append(item)
            # needed() never asked past the end of the record: nothing is left over.
            assert buf.pending() == 0
            assert buf.needed() == HEADER_LEN
    return out


def test_record_buffer_needed_known() -> None:
    assert feed_by_needed(STREAM) == EXPECTED
    buf = RecordBuffer()
    buf.feed(b"\x17\x03")
    assert buf.needed() == 3
    buf.feed(b"\x03\x00\x05")
    assert buf.needed() == 5
    buf.feed(b"abc")
    assert buf.needed() == 2
    buf.feed(b"de")
    assert buf.needed() == 0
    assert buf.next_record() == (RecordHeader(23, 0x0303, 5), b"abcde")


record_st = st.tuples(
    st.sampled_from(list(ContentType)),
    st.sampled_from([0x0301, 0x0302, 0x0303]),
    st.binary(max_size=300),
)


@given(st.lists(record_st, max_size=8))
@FUZZ
def test_record_buffer_needed_invariant(records: list[tuple[ContentType, int, bytes]]) -> None:
    stream = b"".join(record(t, body, v) for t, v, body in records)
    expected = [(RecordHeader(t, v, len(body)), body) for t, v, body in records]
    assert feed_by_needed(stream) == expected


@given(st.lists(record_st, max_size=8), st.data())
@FUZZ
def test_record_buffer_any_split(
    records: list[tuple[ContentType, int, bytes]], data: st.DataObject
) -> None:
    """However the stream is cut into reads, the same records come out, in order."""
    stream = b"".join(record(t, body, v) for t, v, body in records)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    buf = RecordBuffer()
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        buf.feed(stream[start:end])
        # needed() == 0 exactly when next_record() has something to give.
        ready = buf.needed() == 0
        item = buf.next_record()
        assert (item is not None) == ready
        if item is not None:
            got.append(item)
            got += drain(buf)
    assert got == [(RecordHeader(t, v, len(body)), body) for t, v, body in records]
    assert buf.pending() == 0


# --------------------------------------------------------------------------- HandshakeBuffer


def test_encode_handshake_known() -> None:
    assert encode_handshake(HandshakeType.FINISHED, b"\xab" * 3) == b"\x14\x00\x00\x03\xab\xab\xab"
    message = HandshakeMessage(HandshakeType.HELLO_REQUEST, b"")
    assert message.encode() == b"\x00\x00\x00\x00"


def test_handshake_message_spanning_records() -> None:
    body = bytes(range(256)) + b"ticket" * 50
    wire = encode_handshake(HandshakeType.NEW_SESSION_TICKET, body)
    buf = HandshakeBuffer()
    # Split inside the 4-byte header, then inside the body.
    for piece in (wire[:2], wire[2:100], wire[100:-1]):
        buf.feed(piece)
        assert buf.next_message() is None
        assert buf.pending() > 0
    buf.feed(wire[-1:])
    assert buf.next_message() == HandshakeMessage(HandshakeType.NEW_SESSION_TICKET, body)
    assert buf.next_message() is None
    assert buf.pending() == 0


def test_handshake_several_messages_in_one_record() -> None:
    messages = [
        HandshakeMessage(HandshakeType.NEW_SESSION_TICKET, b"t" * 200),
        HandshakeMessage(HandshakeType.KEY_UPDATE, b"\x01"),
        HandshakeMessage(HandshakeType.HELLO_REQUEST, b""),
        HandshakeMessage(HandshakeType.NEW_SESSION_TICKET, b"u" * 10),
    ]
    buf = HandshakeBuffer()
    buf.feed(b"".join(m.encode() for m in messages) + b"\x04\x00")  # + start of a 5th
    got = []
    while (m := buf.next_message()) is not None:
        got.append(m)
    assert got == messages
    assert buf.pending() == 2


def test_handshake_empty_record_rejected() -> None:
    # RFC 8446 §5.1: zero-length fragments of Handshake type MUST NOT be sent.
    buf = HandshakeBuffer()
    with pytest.raises(ProtocolViolation) as info:
        buf.feed(b"")
    assert info.value.alert is AlertDescription.UNEXPECTED_MESSAGE


def test_handshake_oversized_message_rejected_early() -> None:
    buf = HandshakeBuffer()
    # The length alone condemns the message: no need to wait for its body.
    buf.feed(b"\x04" + (MAX_POST_HANDSHAKE_MESSAGE + 1).to_bytes(3, "big"))
    with pytest.raises(ProtocolViolation) as info:
        buf.next_message()
    assert info.value.alert is AlertDescription.DECODE_ERROR


def test_handshake_largest_message_accepted() -> None:
    body = b"\x5a" * MAX_POST_HANDSHAKE_MESSAGE
    wire = encode_handshake(HandshakeType.NEW_SESSION_TICKET, body)
    buf = HandshakeBuffer()
    buf.feed(wire[:4])
    assert buf.next_message() is None
    buf.feed(wire[4:])
    assert buf.next_message() == HandshakeMessage(HandshakeType.NEW_SESSION_TICKET, body)


@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=200)), max_size=6), st.data())
@FUZZ
def test_handshake_buffer_any_split(messages: list[tuple[int, bytes]], data: st.DataObject) -> None:
    wire = b"".join(encode_handshake(t, body) for t, body in messages)
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    bounds = sorted({0, len(wire), *points})  # distinct, so every piece is non-empty
    buf = HandshakeBuffer()
    got = []
    for start, end in itertools.pairwise(bounds):
        buf.feed(wire[start:end])
        while (m := buf.next_message()) is not None:
            got.append(m)
    assert got == [HandshakeMessage(t, body) for t, body in messages]
    assert buf.pending() == 0


# --------------------------------------------------------------------------- alerts


def test_parse_alert_known() -> None:
    alert = parse_alert(b"\x01\x00")
    assert alert == Alert(AlertLevel.WARNING, AlertDescription.CLOSE_NOTIFY)
    assert alert.known is AlertDescription.CLOSE_NOTIFY
    assert alert.name == "close_notify"
    fatal = parse_alert(b"\x02\x14")
    assert fatal == Alert(AlertLevel.FATAL, AlertDescription.BAD_RECORD_MAC)
    assert fatal.name == "bad_record_mac"


def test_parse_alert_unknown_description_kept() -> None:
    alert = parse_alert(b"\x02\xfe")
    assert alert.description == 254
    assert alert.known is None
    assert alert.name == "unknown(254)"


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x01\x00\x00", b"\x02\x28" * 2], ids=len)
def test_parse_alert_wrong_length(data: bytes) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse_alert(data)
    assert info.value.alert is AlertDescription.DECODE_ERROR


@pytest.mark.parametrize("level", [0, 3, 0x7F, 0xFF])
def test_parse_alert_bad_level(level: int) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse_alert(bytes((level, 0)))
    assert info.value.alert is AlertDescription.ILLEGAL_PARAMETER


def test_encode_alert_known() -> None:
    assert encode_alert(AlertDescription.CLOSE_NOTIFY) == b"\x01\x00"
    assert encode_alert(AlertDescription.USER_CANCELED) == b"\x01\x5a"
    assert encode_alert(AlertDescription.BAD_RECORD_MAC) == b"\x02\x14"
    assert encode_alert(AlertDescription.DECODE_ERROR) == b"\x02\x32"


@pytest.mark.parametrize("description", list(AlertDescription))
def test_encode_alert_default_level(description: AlertDescription) -> None:
    # RFC 8446 §6: close_notify and user_canceled are the only non-error alerts.
    warning = description in (AlertDescription.CLOSE_NOTIFY, AlertDescription.USER_CANCELED)
    encoded = encode_alert(description)
    expected_level = AlertLevel.WARNING if warning else AlertLevel.FATAL
    assert encoded == bytes((expected_level, description))
    assert parse_alert(encoded) == Alert(expected_level, description)


@pytest.mark.parametrize("level", list(AlertLevel))
def test_encode_alert_explicit_level(level: AlertLevel) -> None:
    assert encode_alert(AlertDescription.CLOSE_NOTIFY, level) == bytes((level, 0))
    assert encode_alert(AlertDescription.INTERNAL_ERROR, level) == bytes((level, 80))


# --------------------------------------------------------------------------- KeyUpdate


def test_encode_key_update_known() -> None:
    # RFC 8446 §4.6.3: HandshakeType key_update(24), uint24 length 1, request_update.
    assert encode_key_update(KeyUpdateRequest.UPDATE_NOT_REQUESTED) == b"\x18\x00\x00\x01\x00"
    assert encode_key_update(KeyUpdateRequest.UPDATE_REQUESTED) == b"\x18\x00\x00\x01\x01"


@pytest.mark.parametrize("request_update", list(KeyUpdateRequest))
def test_key_update_round_trip(request_update: KeyUpdateRequest) -> None:
    buf = HandshakeBuffer()
    buf.feed(encode_key_update(request_update))
    message = buf.next_message()
    assert message is not None
    assert message.msg_type == HandshakeType.KEY_UPDATE
    assert parse_key_update(message.body) is request_update


@pytest.mark.parametrize("body", [b"", b"\x00\x00", b"\x01\x01\x01"], ids=len)
def test_parse_key_update_wrong_length(body: bytes) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse_key_update(body)
    assert info.value.alert is AlertDescription.DECODE_ERROR


@pytest.mark.parametrize("value", [2, 3, 0x80, 0xFF])
def test_parse_key_update_bad_value(value: int) -> None:
    with pytest.raises(ProtocolViolation) as info:
        parse_key_update(bytes((value,)))
    assert info.value.alert is AlertDescription.ILLEGAL_PARAMETER


# --------------------------------------------------------------------------- fuzz
# Whatever a hostile peer sends, the only exception is our own ProtocolViolation:
# anything else (IndexError, ValueError, struct.error, ...) escapes and fails the test.

chunks_st = st.lists(st.binary(max_size=64), max_size=12)
# Bytes that often look like records, so the fuzzer gets past the header checks.
recordish_st = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.builds(
            raw_header,
            st.sampled_from([*ContentType, 0, 99]),
            st.sampled_from([0x0303, 0x0301, 0x0304]),
            st.integers(0, 64),
        ),
    ),
    max_size=12,
)


@given(st.binary(max_size=512))
@FUZZ
def test_fuzz_parsers(data: bytes) -> None:
    for parse in (parse_header, parse_alert, parse_key_update):
        with contextlib.suppress(ProtocolViolation):
            parse(data)


@given(st.one_of(chunks_st, recordish_st))
@FUZZ
def test_fuzz_record_buffer(chunks: list[bytes]) -> None:
    buf = RecordBuffer()
    with contextlib.suppress(ProtocolViolation):
        for chunk in chunks:
            buf.feed(chunk)
            assert buf.needed() >= 0
            for header, body in drain(buf):
                assert header.length == len(body)
                with contextlib.suppress(ProtocolViolation):
                    parse_alert(body)
    assert buf.pending() >= 0


@given(st.one_of(chunks_st, recordish_st))
@FUZZ
def test_fuzz_handshake_buffer(chunks: list[bytes]) -> None:
    buf = HandshakeBuffer()
    with contextlib.suppress(ProtocolViolation):
        for chunk in chunks:
            buf.feed(chunk)
            while (message := buf.next_message()) is not None:
                with contextlib.suppress(ProtocolViolation):
                    parse_key_update(message.body)


# --------------------------------------------------------------------------- NewSessionTicket

# lifetime, age_add, nonce <1 byte>, ticket <32 bytes>, extensions <early_data(42), 4 bytes>
GOOD_TICKET = (
    (7200).to_bytes(4, "big") + b"\x01\x02\x03\x04" + b"\x01\x00" + b"\x00\x20" + bytes(32)
    + b"\x00\x08" + b"\x00\x2a\x00\x04" + (16384).to_bytes(4, "big")
)  # fmt: skip


def test_new_session_ticket_accepted() -> None:
    check_new_session_ticket(GOOD_TICKET)
    check_new_session_ticket(GOOD_TICKET[:-10] + b"\x00\x00")  # no extensions


def test_new_session_ticket_of_rfc8448() -> None:
    from .test_protection import R8448_NST_MSG  # noqa: PLC0415 -- RFC 8448's bytes, once

    assert R8448_NST_MSG[0] == HandshakeType.NEW_SESSION_TICKET
    check_new_session_ticket(R8448_NST_MSG[4:])


@pytest.mark.parametrize("cut", range(len(GOOD_TICKET)))
def test_new_session_ticket_cut_anywhere_is_a_decode_error(cut: int) -> None:
    with pytest.raises(ProtocolViolation) as info:
        check_new_session_ticket(GOOD_TICKET[:cut])
    assert info.value.alert is AlertDescription.DECODE_ERROR


@pytest.mark.parametrize(
    ("body", "alert"),
    [
        (GOOD_TICKET + b"\x00", AlertDescription.DECODE_ERROR),  # bytes after the extensions
        # an empty ticket (RFC 8446 4.6.1: ticket<1..2^16-1>)
        (bytes(8) + b"\x00" + b"\x00\x00" + b"\x00\x00", AlertDescription.DECODE_ERROR),
        # early_data with 2 bytes instead of a uint32
        (
            bytes(8) + b"\x00" + b"\x00\x01x" + b"\x00\x06" + b"\x00\x2a\x00\x02\x00\x00",
            AlertDescription.DECODE_ERROR,
        ),
        # the same extension twice
        (
            bytes(8) + b"\x00" + b"\x00\x01x" + b"\x00\x08" + b"\xfa\xfa\x00\x00" * 2,
            AlertDescription.ILLEGAL_PARAMETER,
        ),
    ],
    ids=["trailing-bytes", "empty-ticket", "short-early-data", "repeated-extension"],
)
def test_malformed_new_session_ticket(body: bytes, alert: AlertDescription) -> None:
    with pytest.raises(ProtocolViolation) as info:
        check_new_session_ticket(body)
    assert info.value.alert is alert


@FUZZ
@given(st.binary(max_size=300))
def test_new_session_ticket_check_only_raises_protocol_violation(data: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        check_new_session_ticket(data)
