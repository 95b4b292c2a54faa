"""The post-hand-off core without any socket: records in, events and records out.

Every record kind in every state, then a hypothesis state machine that drives one
connection with any sequence of peer records and local commands and checks the rules
that must always hold.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ktls import AlertDescription as A
from ktls import (
    AlertReceived,
    BrokenError,
    ClosedError,
    KTLSError,
    ProtocolViolation,
    TruncatedStream,
)
from ktls.core import (
    Connection,
    Data,
    Failed,
    Output,
    PeerClosed,
    RxKeys,
    SendRecord,
    State,
    TxKeys,
)
from ktls.records import encode_alert, encode_handshake, encode_key_update
from ktls.session import Role, Session, TrafficKeys
from ktls.suites import suite_by_name
from ktls.wire import AlertLevel, ContentType, HandshakeType, KeyUpdateRequest, ProtocolVersion

ALERT, HANDSHAKE, DATA = ContentType.ALERT, ContentType.HANDSHAKE, ContentType.APPLICATION_DATA
CLOSE_NOTIFY = encode_alert(A.CLOSE_NOTIFY)
KU_REQUESTED = encode_key_update(KeyUpdateRequest.UPDATE_REQUESTED)
KU_NOT_REQUESTED = encode_key_update(KeyUpdateRequest.UPDATE_NOT_REQUESTED)
# lifetime, age_add, an empty nonce, a 2-byte ticket, no extensions
TICKET = encode_handshake(
    HandshakeType.NEW_SESSION_TICKET, bytes(8) + b"\x00" + b"\x00\x02ab" + b"\x00\x00"
)
HELLO_REQUEST = encode_handshake(HandshakeType.HELLO_REQUEST, b"")
NO_RENEGOTIATION = encode_alert(A.NO_RENEGOTIATION, AlertLevel.WARNING)


def session(version: ProtocolVersion = ProtocolVersion.TLS1_3, role: Role = Role.CLIENT) -> Session:
    name = (
        "TLS_AES_128_GCM_SHA256"
        if version is ProtocolVersion.TLS1_3
        else ("ECDHE-RSA-AES128-GCM-SHA256")
    )
    suite = suite_by_name(name)
    assert suite is not None
    secret = os.urandom(32) if version is ProtocolVersion.TLS1_3 else None
    iv_len = 12 if version is ProtocolVersion.TLS1_3 else 4
    keys = TrafficKeys(key=os.urandom(16), iv=os.urandom(iv_len), seq=0, secret=secret)
    return Session(role=role, version=version, suite=suite, tx=keys, rx=keys)


def tls13(role: Role = Role.CLIENT, tickets: list[bytes] | None = None) -> Connection:
    sink = None if tickets is None else tickets.append
    return Connection(session(role=role), tickets=sink)


def tls12(role: Role = Role.CLIENT) -> Connection:
    return Connection(session(ProtocolVersion.TLS1_2, role))


def failed_with(
    events: Sequence[object], kind: type[KTLSError], alert: A | None = None
) -> KTLSError:
    assert len(events) == 1
    assert isinstance(events[0], Failed), events
    error = events[0].error
    assert isinstance(error, kind), error
    if alert is not None:
        assert isinstance(error, ProtocolViolation)
        assert error.alert is alert
    return error


def sent(output: list[Output]) -> list[tuple[ContentType, bytes]]:
    return [(o.content_type, o.payload) for o in output if isinstance(o, SendRecord)]


# -- application data and the end of the stream ---------------------------------------------


def test_data_passes_through() -> None:
    conn = tls13()
    assert conn.receive_record(DATA, b"hello") == [Data(b"hello")]
    assert conn.receive_record(DATA, b"") == []  # legal, carries nothing
    assert conn.state is State.OPEN
    assert conn.takes_data


def test_close_notify_then_eof_is_clean() -> None:
    conn = tls13()
    assert conn.receive_record(ALERT, CLOSE_NOTIFY) == [PeerClosed()]
    assert conn.state is State.PEER_CLOSED
    assert not conn.takes_data
    assert conn.receive_eof() == [PeerClosed()]
    conn.check_can_send()  # we may still send


def test_eof_without_close_notify_is_truncation() -> None:
    conn = tls13()
    failed_with(conn.receive_eof(), TruncatedStream)
    assert conn.take_output() == []  # nobody to tell
    with pytest.raises(BrokenError) as info:
        conn.check_usable()
    assert isinstance(info.value.__cause__, TruncatedStream)


@pytest.mark.parametrize("kind", [DATA, HANDSHAKE])
def test_nothing_after_close_notify(kind: ContentType) -> None:
    conn = tls13()
    conn.receive_record(ALERT, CLOSE_NOTIFY)
    payload = TICKET if kind is HANDSHAKE else b"late"
    failed_with(conn.receive_record(kind, payload), ProtocolViolation, A.UNEXPECTED_MESSAGE)
    assert sent(conn.take_output()) == [(ALERT, encode_alert(A.UNEXPECTED_MESSAGE))]


# -- alerts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [AlertLevel.WARNING, AlertLevel.FATAL])
def test_tls13_alerts_are_fatal_whatever_the_level(level: AlertLevel) -> None:
    conn = tls13()
    error = failed_with(conn.receive_record(ALERT, bytes((level, 42))), AlertReceived)
    assert isinstance(error, AlertReceived)
    assert error.alert is A.BAD_CERTIFICATE
    assert conn.take_output() == []  # never answer an alert with one


def test_tls13_user_canceled_is_not_fatal() -> None:
    conn = tls13()
    assert conn.receive_record(ALERT, encode_alert(A.USER_CANCELED)) == []
    assert conn.state is State.OPEN


def test_tls12_warning_is_informational_fatal_is_not() -> None:
    conn = tls12()
    assert conn.receive_record(ALERT, encode_alert(A.NO_RENEGOTIATION, AlertLevel.WARNING)) == []
    failed_with(conn.receive_record(ALERT, encode_alert(A.DECODE_ERROR)), AlertReceived)


def test_unknown_alert_description_is_kept() -> None:
    error = failed_with(tls13().receive_record(ALERT, b"\x02\xfe"), AlertReceived)
    assert isinstance(error, AlertReceived)
    assert error.alert == 254


@pytest.mark.parametrize(
    ("payload", "alert"),
    [
        (b"", A.UNEXPECTED_MESSAGE),  # RFC 8446 5.1: empty alert record
        (b"\x02", A.DECODE_ERROR),
        (b"\x02\x28\x00", A.DECODE_ERROR),
        (b"\x07\x28", A.ILLEGAL_PARAMETER),
    ],
)
def test_malformed_alerts(payload: bytes, alert: A) -> None:
    conn = tls13()
    failed_with(conn.receive_record(ALERT, payload), ProtocolViolation, alert)
    assert sent(conn.take_output()) == [(ALERT, encode_alert(alert))]


# -- handshake messages after the hand-off -----------------------------------------------------


def test_tickets_go_to_the_sink_whole_even_when_fragmented() -> None:
    tickets: list[bytes] = []
    conn = tls13(tickets=tickets)
    assert conn.receive_record(HANDSHAKE, TICKET[:3]) == []
    assert not conn.takes_data  # a message is half-read
    assert conn.receive_record(HANDSHAKE, TICKET[3:] + TICKET) == []
    assert tickets == [TICKET, TICKET]
    assert conn.takes_data


def test_ticket_refused_by_the_sink_fails_with_its_alert() -> None:
    def refuse(message: bytes) -> None:
        raise ProtocolViolation("bad ticket", A.DECODE_ERROR)

    conn = Connection(session(), tickets=refuse)
    failed_with(conn.receive_record(HANDSHAKE, TICKET), ProtocolViolation, A.DECODE_ERROR)


@pytest.mark.parametrize("role", [Role.SERVER])
def test_ticket_to_a_server_is_unexpected(role: Role) -> None:
    conn = tls13(role=role)
    failed_with(conn.receive_record(HANDSHAKE, TICKET), ProtocolViolation, A.UNEXPECTED_MESSAGE)


@pytest.mark.parametrize("split", [1, 2, 3, 4])
def test_data_inside_a_fragmented_message_is_refused(split: int) -> None:
    conn = tls13()
    conn.receive_record(HANDSHAKE, TICKET[:split])
    failed_with(conn.receive_record(DATA, b"x"), ProtocolViolation, A.UNEXPECTED_MESSAGE)


def test_alert_inside_a_fragmented_message_is_refused() -> None:
    conn = tls13()
    conn.receive_record(HANDSHAKE, TICKET[:5])
    failed_with(conn.receive_record(ALERT, CLOSE_NOTIFY), ProtocolViolation, A.UNEXPECTED_MESSAGE)


# -- KeyUpdate ---------------------------------------------------------------------------------


def test_key_update_not_requested_changes_rx_keys_only() -> None:
    conn = tls13()
    before = conn.rx_keys
    events = conn.receive_record(HANDSHAKE, KU_NOT_REQUESTED)
    assert len(events) == 1
    assert isinstance(events[0], RxKeys)
    keys = events[0].keys
    assert (keys.generation, keys.seq) == (1, 0)
    assert keys.key != before.key
    assert conn.rx_keys == keys
    assert not conn.has_output
    assert conn.take_output() == []


def test_key_update_requested_is_owed_not_sent() -> None:
    conn = tls13()
    events = conn.receive_record(HANDSHAKE, KU_REQUESTED)
    assert [type(e) for e in events] == [RxKeys]
    assert conn.has_output  # owed, for the sending side to take
    output = conn.take_output()
    assert sent(output) == [(HANDSHAKE, KU_NOT_REQUESTED)]
    assert isinstance(output[1], TxKeys)
    assert output[1].keys.generation == 1
    assert conn.tx_keys.generation == 1
    assert conn.take_output() == []


def test_many_requests_owe_one_answer() -> None:
    conn = tls13()
    for _ in range(5):
        conn.receive_record(HANDSHAKE, KU_REQUESTED)
    assert conn.rx_keys.generation == 5
    output = conn.take_output()
    assert len(output) == 2
    assert conn.tx_keys.generation == 1


def test_key_update_split_over_records() -> None:
    conn = tls13()
    assert conn.receive_record(HANDSHAKE, KU_REQUESTED[:2]) == []
    events = conn.receive_record(HANDSHAKE, KU_REQUESTED[2:])
    assert [type(e) for e in events] == [RxKeys]


def test_key_update_must_end_its_record() -> None:
    conn = tls13()
    events = conn.receive_record(HANDSHAKE, KU_NOT_REQUESTED + TICKET[:2])
    failed_with(events, ProtocolViolation, A.UNEXPECTED_MESSAGE)


def test_ticket_then_key_update_in_one_record() -> None:
    tickets: list[bytes] = []
    conn = tls13(tickets=tickets)
    events = conn.receive_record(HANDSHAKE, TICKET + KU_NOT_REQUESTED)
    assert tickets == [TICKET]
    assert [type(e) for e in events] == [RxKeys]


def test_key_update_in_tls12_is_unexpected() -> None:
    conn = tls12()
    failed_with(
        conn.receive_record(HANDSHAKE, KU_REQUESTED), ProtocolViolation, A.UNEXPECTED_MESSAGE
    )


def test_bad_key_update_value() -> None:
    conn = tls13()
    bad = encode_handshake(HandshakeType.KEY_UPDATE, b"\x05")
    failed_with(conn.receive_record(HANDSHAKE, bad), ProtocolViolation, A.ILLEGAL_PARAMETER)


def test_our_key_update() -> None:
    conn = tls13()
    conn.start_key_update(request_peer=True)
    output = conn.take_output()
    assert sent(output) == [(HANDSHAKE, KU_REQUESTED)]
    assert isinstance(output[1], TxKeys)
    assert output[1].keys.generation == 1


def test_our_key_update_answers_an_owed_one() -> None:
    conn = tls13()
    conn.receive_record(HANDSHAKE, KU_REQUESTED)
    conn.start_key_update(request_peer=False)
    assert sent(conn.take_output()) == [(HANDSHAKE, KU_NOT_REQUESTED)]
    assert conn.tx_keys.generation == 1


def test_our_queued_key_update_answers_a_request_that_comes_after_it() -> None:
    """Found by the state machine: a request read while our own KeyUpdate is still
    queued needs no second answer, and generations go out in order."""
    conn = tls13()
    conn.start_key_update(request_peer=False)
    conn.receive_record(HANDSHAKE, KU_REQUESTED)
    output = conn.take_output()
    assert sent(output) == [(HANDSHAKE, KU_NOT_REQUESTED)]
    assert [o.keys.generation for o in output if isinstance(o, TxKeys)] == [1]


def test_key_update_refused_in_tls12_and_after_close() -> None:
    with pytest.raises(ValueError, match=r"TLS 1\.3"):
        tls12().start_key_update(request_peer=True)
    conn = tls13()
    conn.send_close_notify()
    with pytest.raises(ClosedError):
        conn.start_key_update(request_peer=True)


# -- after our close_notify nothing more goes out (defect: EPIPE on a closed socket) -----------


def test_key_update_request_after_our_close_notify_is_not_answered() -> None:
    conn = tls13()
    assert conn.send_close_notify()
    assert sent(conn.take_output()) == [(ALERT, CLOSE_NOTIFY)]
    events = conn.receive_record(HANDSHAKE, KU_REQUESTED)
    assert [type(e) for e in events] == [RxKeys]  # we still read the peer's new key
    assert not conn.has_output
    assert conn.take_output() == []
    assert conn.receive_record(DATA, b"rest") == [Data(b"rest")]


def test_owed_answer_goes_before_our_close_notify() -> None:
    conn = tls13()
    conn.receive_record(HANDSHAKE, KU_REQUESTED)
    conn.send_close_notify()
    assert sent(conn.take_output()) == [(HANDSHAKE, KU_NOT_REQUESTED), (ALERT, CLOSE_NOTIFY)]


def test_close_notify_once() -> None:
    conn = tls13()
    assert conn.send_close_notify()
    assert not conn.send_close_notify()
    assert conn.state is State.SENT_CLOSE
    with pytest.raises(ClosedError, match="close_notify was sent"):
        conn.check_can_send()


# -- TLS 1.2 renegotiation -----------------------------------------------------------------------


def test_hello_request_is_refused_once_owed() -> None:
    conn = tls12()
    assert conn.receive_record(HANDSHAKE, HELLO_REQUEST) == []
    assert conn.receive_record(HANDSHAKE, HELLO_REQUEST) == []
    assert sent(conn.take_output()) == [(ALERT, NO_RENEGOTIATION)]
    assert conn.state is State.OPEN


def test_client_hello_to_a_tls12_server_is_refused() -> None:
    conn = tls12(Role.SERVER)
    hello = encode_handshake(HandshakeType.CLIENT_HELLO, bytes(40))
    assert conn.receive_record(HANDSHAKE, hello) == []
    assert sent(conn.take_output()) == [(ALERT, NO_RENEGOTIATION)]


def test_hello_request_after_our_close_notify_is_ignored() -> None:
    conn = tls12()
    conn.send_close_notify()
    conn.take_output()
    assert conn.receive_record(HANDSHAKE, HELLO_REQUEST) == []
    assert conn.take_output() == []


def test_hello_request_to_a_server_is_unexpected() -> None:
    conn = tls12(Role.SERVER)
    failed_with(
        conn.receive_record(HANDSHAKE, HELLO_REQUEST), ProtocolViolation, A.UNEXPECTED_MESSAGE
    )


def test_change_cipher_spec_is_unexpected() -> None:
    failed_with(
        tls13().receive_record(ContentType.CHANGE_CIPHER_SPEC, b"\x01"),
        ProtocolViolation,
        A.UNEXPECTED_MESSAGE,
    )


# -- failure is sticky, and owes exactly one alert ------------------------------------------------


def test_failure_replaces_queued_output_with_the_alert() -> None:
    conn = tls13()
    conn.start_key_update(request_peer=True)  # queued, not taken yet
    conn.receive_record(HANDSHAKE, KU_REQUESTED)
    failed_with(conn.receive_record(HANDSHAKE, b"\x63\x00\x00\x00"), ProtocolViolation)
    assert sent(conn.take_output()) == [(ALERT, encode_alert(A.UNEXPECTED_MESSAGE))]
    assert not conn.send_close_notify()  # nothing after the alert
    assert conn.take_output() == []


def test_after_failure_every_input_reports_the_first_failure() -> None:
    conn = tls13()
    first = failed_with(conn.receive_record(ALERT, b"\x02\x14"), AlertReceived)
    for events in (conn.receive_record(DATA, b"x"), conn.receive_eof()):
        assert events == [Failed(first)]
    assert conn.receive_error(BrokenError("later")) == Failed(first)
    with pytest.raises(BrokenError):
        conn.check_can_send()


def test_engine_violation_owes_its_alert() -> None:
    conn = tls13()
    failed = conn.receive_error(ProtocolViolation("tampered", A.BAD_RECORD_MAC))
    assert isinstance(failed.error, ProtocolViolation)
    assert sent(conn.take_output()) == [(ALERT, encode_alert(A.BAD_RECORD_MAC))]


def test_local_failure_with_a_polite_close() -> None:
    conn = tls13()
    failed = conn.fail(BrokenError("kernel refused the key"), A.CLOSE_NOTIFY)
    assert conn.state is State.FAILED
    assert isinstance(failed.error, BrokenError)
    assert sent(conn.take_output()) == [(ALERT, CLOSE_NOTIFY)]


def test_no_alert_after_our_close_notify() -> None:
    conn = tls13()
    conn.send_close_notify()
    conn.take_output()
    conn.receive_record(DATA, b"x")
    failed_with(conn.receive_record(ALERT, b"\x07\x05"), ProtocolViolation, A.ILLEGAL_PARAMETER)
    assert conn.take_output() == []


# -- the state machine ----------------------------------------------------------------------------

PEER_RECORDS = st.sampled_from(
    [
        (DATA, b"data"),
        (DATA, b""),
        (ALERT, CLOSE_NOTIFY),
        (ALERT, encode_alert(A.USER_CANCELED)),
        (ALERT, encode_alert(A.DECODE_ERROR)),
        (ALERT, b""),
        (HANDSHAKE, TICKET),
        (HANDSHAKE, TICKET[:3]),
        (HANDSHAKE, TICKET[3:]),
        (HANDSHAKE, KU_REQUESTED),
        (HANDSHAKE, KU_NOT_REQUESTED),
        (HANDSHAKE, KU_REQUESTED[:2]),
        (HANDSHAKE, KU_REQUESTED[2:]),
        (HANDSHAKE, HELLO_REQUEST),
        (ContentType.CHANGE_CIPHER_SPEC, b"\x01"),
    ]
)


class ConnectionMachine(RuleBasedStateMachine):
    """Any mix of peer records, EOF, engine errors and local commands, in TLS 1.2 and 1.3."""

    def __init__(self) -> None:
        super().__init__()
        self.conn: Connection | None = None
        self.sent: list[Output] = []  # everything the driver took, in order
        self.failed = False
        self.close_taken = False

    @rule(version=st.sampled_from(list(ProtocolVersion)), role=st.sampled_from(list(Role)))
    @precondition(lambda self: self.conn is None)
    def start(self, version: ProtocolVersion, role: Role) -> None:
        self.conn = Connection(session(version, role), tickets=lambda _m: None)

    @rule(record=PEER_RECORDS)
    @precondition(lambda self: self.conn is not None)
    def peer_sends(self, record: tuple[ContentType, bytes]) -> None:
        assert self.conn is not None
        rx_before = self.conn.rx_keys.generation
        events = self.conn.receive_record(*record)
        for event in events:
            if isinstance(event, Data):
                assert event.data
                assert not self.failed
            if isinstance(event, RxKeys):
                assert event.keys.generation == rx_before + 1
        if any(isinstance(e, Failed) for e in events):
            assert events[-1] == Failed(self.conn.failure)  # type: ignore[arg-type]
            self.failed = True

    @rule()
    @precondition(lambda self: self.conn is not None)
    def peer_eof(self) -> None:
        assert self.conn is not None
        events = self.conn.receive_eof()
        self.failed = self.failed or any(isinstance(e, Failed) for e in events)

    @rule()
    @precondition(lambda self: self.conn is not None)
    def driver_takes_output(self) -> None:
        assert self.conn is not None
        self.sent += self.conn.take_output()

    @rule(request_peer=st.booleans())
    @precondition(lambda self: self.conn is not None)
    def we_update_keys(self, request_peer: bool) -> None:
        assert self.conn is not None
        with contextlib.suppress(KTLSError, ValueError):
            self.conn.start_key_update(request_peer)

    @rule()
    @precondition(lambda self: self.conn is not None)
    def we_close(self) -> None:
        assert self.conn is not None
        self.conn.send_close_notify()

    @rule()
    @precondition(lambda self: self.conn is not None)
    def we_send_data(self) -> None:
        assert self.conn is not None
        try:
            self.conn.check_can_send()
        except KTLSError:
            return
        self.sent += self.conn.take_output()
        assert not self.conn.has_output  # nothing owed is left before our data

    @invariant()
    def rules_hold(self) -> None:
        if self.conn is None:
            return
        records = [o for o in self.sent if isinstance(o, SendRecord)]
        ends = [
            i
            for i, o in enumerate(records)
            if (o.content_type is ALERT and o.payload[0] == AlertLevel.FATAL)
            or o.payload == CLOSE_NOTIFY
        ]
        # close_notify or a fatal alert is the last record we ever send, and comes once.
        assert len(ends) <= 1
        if ends:
            assert ends[0] == len(records) - 1
        # Every KeyUpdate we send is followed by the new keys, one generation at a time.
        generations = [o.keys.generation for o in self.sent if isinstance(o, TxKeys)]
        assert generations == list(range(1, len(generations) + 1))
        for i, output in enumerate(self.sent):
            if isinstance(output, TxKeys):
                previous = self.sent[i - 1]
                assert isinstance(previous, SendRecord)
                assert previous.payload in (KU_REQUESTED, KU_NOT_REQUESTED)
        if self.conn.failure is not None:
            assert self.conn.state is State.FAILED
            assert not self.conn.takes_data
        if self.conn.session.version is ProtocolVersion.TLS1_2:
            assert all(o.payload not in (KU_REQUESTED, KU_NOT_REQUESTED) for o in records)


TestConnectionMachine = ConnectionMachine.TestCase
TestConnectionMachine.settings = settings(max_examples=300, stateful_step_count=30, deadline=None)
