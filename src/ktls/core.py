"""The post-hand-off rules of a TLS connection, as a sans-IO state machine.

After the handshake the record engines (kernel or software) carry the bytes; what is
not application data is judged here, once, for every I/O style (the blocking
:class:`~ktls.tlssocket.TLSSocket` and the asyncio transport both drive this object):

* alerts: close_notify ends the stream; fatal alerts end the connection; TLS 1.2
  warnings and TLS 1.3 user_canceled are informational;
* TLS 1.3 NewSessionTicket (client side): handed to a ticket sink (OpenSSL), so
  resumption works after offload;
* TLS 1.3 KeyUpdate: the receive keys change at once; an answer that the peer asked
  for is *owed* and goes out before our next data record (RFC 8446 4.6.3), never
  after our close_notify;
* TLS 1.2 renegotiation (HelloRequest / ClientHello): refused with a
  no_renegotiation warning, again never after our close_notify;
* a handshake message may span records, but no other record and no key change may
  come inside it (RFC 8446 5.1);
* failure is sticky: the first error is kept, the alert we owe the peer is queued, and
  every later call reports the connection broken with that error as the cause.

In the spirit of h11's ``Connection``: records in (:meth:`Connection.receive_record`,
:meth:`~Connection.receive_eof`, :meth:`~Connection.receive_error`), events out
(:class:`Data`, :class:`PeerClosed`, :class:`RxKeys`, :class:`Failed`), and the
records to send (:class:`SendRecord`, :class:`TxKeys`) taken by the driver with
:meth:`~Connection.take_output` when it holds the sending side.  Nothing here touches
a socket, an event loop or the operating system.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from .errors import (
    AlertReceived,
    BrokenError,
    ClosedError,
    KTLSError,
    ProtocolViolation,
    TruncatedStream,
)
from .records import (
    HandshakeBuffer,
    HandshakeMessage,
    check_new_session_ticket,
    encode_alert,
    encode_key_update,
    parse_alert,
    parse_key_update,
)
from .session import Role, Session, TrafficKeys, next_generation
from .wire import (
    AlertDescription,
    AlertLevel,
    ContentType,
    HandshakeType,
    KeyUpdateRequest,
    ProtocolVersion,
)

__all__ = [
    "Connection",
    "Data",
    "Event",
    "Failed",
    "Output",
    "PeerClosed",
    "RxKeys",
    "SendRecord",
    "State",
    "TicketSink",
    "TxKeys",
]

# A callable that takes one whole NewSessionTicket message; it raises ProtocolViolation
# when the ticket is refused.
TicketSink = Callable[[bytes], None]


# -- what comes out for the reader ----------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """Application data for the caller (never empty); a view of the engine's buffer
    when the engine gave one, valid until the next read."""

    data: bytes | memoryview


@dataclass(frozen=True)
class PeerClosed:
    """The peer sent close_notify: the stream has ended cleanly."""


@dataclass(frozen=True)
class RxKeys:
    """Install these keys for reading before reading any further record (KeyUpdate)."""

    keys: TrafficKeys


@dataclass(frozen=True)
class Failed:
    """The connection failed; ``error`` is what to raise.  The alert we owe (if any) is
    queued as output."""

    error: KTLSError


Event: TypeAlias = Data | PeerClosed | RxKeys | Failed


# -- what goes out, in order, through the sending engine ------------------------------------


@dataclass(frozen=True)
class SendRecord:
    """Send one whole non-data record."""

    content_type: ContentType
    payload: bytes


@dataclass(frozen=True)
class TxKeys:
    """Protect every record after the preceding ones with these keys (KeyUpdate)."""

    keys: TrafficKeys


Output: TypeAlias = SendRecord | TxKeys


class State(enum.Enum):
    """Where the connection stands, named by what may still happen."""

    OPEN = "open"  # data both ways
    SENT_CLOSE = "sent close_notify"  # we may still read
    PEER_CLOSED = "peer sent close_notify"  # we may still send
    CLOSED = "closed both ways"
    FAILED = "failed"


# (we sent close_notify, the peer sent close_notify) -> state, while nothing failed.
_STATES = {
    (False, False): State.OPEN,
    (True, False): State.SENT_CLOSE,
    (False, True): State.PEER_CLOSED,
    (True, True): State.CLOSED,
}


class Connection:
    """One TLS connection after the hand-off.  See the module docstring.

    ``tickets`` receives TLS 1.3 NewSessionTickets (client side); without it they are
    read and dropped.
    """

    def __init__(self, session: Session, *, tickets: TicketSink | None = None) -> None:
        self.session = session
        self._tls13 = session.version is ProtocolVersion.TLS1_3
        self._tickets = tickets
        self._messages = HandshakeBuffer()
        self._tx_keys = session.tx
        self._rx_keys = session.rx
        self._output: list[Output] = []
        self._owe_key_update = False  # the peer asked; answer before our next data
        self._owe_no_renegotiation = False
        self._close_sent = False
        self._peer_closed = False
        self.failure: KTLSError | None = None

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        if self.failure is not None:
            return State.FAILED
        return _STATES[(self._close_sent, self._peer_closed)]

    @property
    def peer_closed(self) -> bool:
        return self._peer_closed

    @property
    def close_sent(self) -> bool:
        return self._close_sent

    @property
    def tx_keys(self) -> TrafficKeys:
        """The keys of the records we send now (after any KeyUpdate)."""
        return self._tx_keys

    @property
    def rx_keys(self) -> TrafficKeys:
        return self._rx_keys

    @property
    def takes_data(self) -> bool:
        """Whether an application data record may arrive now and go straight to the
        caller: open for reading, and no handshake message half-read."""
        return self.failure is None and not self._peer_closed and not self._messages.pending()

    def check_usable(self) -> None:
        """Raise BrokenError (cause: the first failure) once the connection failed."""
        if self.failure is not None:
            raise BrokenError(f"the TLS connection failed earlier: {self.failure}") from (
                self.failure
            )

    def check_can_send(self) -> None:
        """Raise unless application data may be sent now."""
        self.check_usable()
        if self._close_sent:
            raise ClosedError("close_notify was sent: no more data can be sent")

    # -- the receiving side ------------------------------------------------------------------

    def receive_record(self, content_type: ContentType, data: bytes | memoryview) -> list[Event]:
        """One plaintext record (or, for application data, several merged).  Application
        data comes back in a Data event as given (a view stays a view, no copy)."""
        if self.failure is not None:
            return [Failed(self.failure)]
        try:
            if content_type is ContentType.APPLICATION_DATA:
                return self._receive_data(data)
            if content_type is not ContentType.HANDSHAKE and self._messages.pending():
                raise ProtocolViolation(
                    f"{content_type.name} record inside a fragmented handshake message",
                    AlertDescription.UNEXPECTED_MESSAGE,
                )
            if content_type is ContentType.ALERT:
                return self._receive_alert(bytes(data))
            if content_type is ContentType.HANDSHAKE:
                return self._receive_handshake(bytes(data))
            raise ProtocolViolation(
                f"unexpected {content_type.name} record after the handshake",
                AlertDescription.UNEXPECTED_MESSAGE,
            )
        except ProtocolViolation as exc:
            return [self._fail(exc, exc.alert)]

    def receive_eof(self) -> list[Event]:
        """TCP said end of stream."""
        if self.failure is not None:
            return [Failed(self.failure)]
        if self._peer_closed:
            return [PeerClosed()]
        return [self._fail(TruncatedStream(), None)]

    def receive_error(self, error: KTLSError, alert: AlertDescription | None = None) -> Failed:
        """The engine could not read a record: a violation it detected (tampering,
        oversized record: ``error.alert`` is owed), or a broken transport."""
        if self.failure is not None:
            return Failed(self.failure)
        if alert is None and isinstance(error, ProtocolViolation):
            alert = error.alert
        return self._fail(error, alert)

    def _receive_data(self, data: bytes | memoryview) -> list[Event]:
        if self._messages.pending():
            raise ProtocolViolation(
                "application data inside a fragmented handshake message",
                AlertDescription.UNEXPECTED_MESSAGE,
            )
        if self._peer_closed:
            # RFC 8446 6.1: the peer sends nothing after close_notify.
            raise ProtocolViolation(
                "application data after close_notify", AlertDescription.UNEXPECTED_MESSAGE
            )
        return [Data(data)] if data else []  # zero-length records are legal, carry nothing

    def _receive_alert(self, data: bytes) -> list[Event]:
        if not data:  # RFC 8446 5.1: a zero-length alert record is unexpected_message
            raise ProtocolViolation("empty alert record", AlertDescription.UNEXPECTED_MESSAGE)
        alert = parse_alert(data)
        if alert.description == AlertDescription.CLOSE_NOTIFY:
            self._peer_closed = True
            return [PeerClosed()]
        # TLS 1.3 (RFC 8446 6): every alert but close_notify and user_canceled is fatal,
        # whatever its level.  TLS 1.2: warnings are informational.
        if (self._tls13 and alert.description == AlertDescription.USER_CANCELED) or (
            not self._tls13 and alert.level == AlertLevel.WARNING
        ):
            return []
        return [self._fail(AlertReceived(alert.known or alert.description), None)]

    def _receive_handshake(self, data: bytes) -> list[Event]:
        if self._peer_closed:
            raise ProtocolViolation(
                "handshake message after close_notify", AlertDescription.UNEXPECTED_MESSAGE
            )
        self._messages.feed(data)
        events: list[Event] = []
        while (message := self._messages.next_message()) is not None:
            events += self._handshake_message(message)
        return events

    def _handshake_message(self, message: HandshakeMessage) -> list[Event]:
        kind, role = message.msg_type, self.session.role
        if self._tls13 and kind == HandshakeType.NEW_SESSION_TICKET and role is Role.CLIENT:
            check_new_session_ticket(message.body)
            if self._tickets is not None:
                self._tickets(message.encode())
            return []
        if self._tls13 and kind == HandshakeType.KEY_UPDATE:
            request = parse_key_update(message.body)
            if self._messages.pending():  # RFC 8446 5.1: no message may span a key change
                raise ProtocolViolation(
                    "KeyUpdate not at the end of its record", AlertDescription.UNEXPECTED_MESSAGE
                )
            self._rx_keys = next_generation(self.session.suite, self._rx_keys)
            pending_own = any(isinstance(item, TxKeys) for item in self._output)
            if request is KeyUpdateRequest.UPDATE_REQUESTED and not (
                self._close_sent or pending_own
            ):
                # Owed, not sent now: a reader must never wait for the sending side
                # (RFC 8446 4.6.3: "prior to sending its next Application Data record").
                # One answer covers any number of requests, and a KeyUpdate of ours
                # still queued answers them too.
                self._owe_key_update = True
            return [RxKeys(self._rx_keys)]
        renegotiation = (kind == HandshakeType.HELLO_REQUEST and role is Role.CLIENT) or (
            kind == HandshakeType.CLIENT_HELLO and role is Role.SERVER
        )
        if not self._tls13 and renegotiation:
            # Refused politely (RFC 5246 7.2.2); the connection goes on.  After our
            # close_notify the request is simply ignored (RFC 5246 7.4.1.1 allows it).
            self._owe_no_renegotiation = not self._close_sent
            return []
        try:
            name = HandshakeType(kind).name
        except ValueError:
            name = str(kind)
        raise ProtocolViolation(
            f"unexpected handshake message {name} after the handshake",
            AlertDescription.UNEXPECTED_MESSAGE,
        )

    # -- the sending side --------------------------------------------------------------------

    @property
    def has_output(self) -> bool:
        """Whether :meth:`take_output` has something (queued records or owed answers)."""
        return bool(self._output) or self._owe_key_update or self._owe_no_renegotiation

    def take_output(self) -> list[Output]:
        """What to send now, in order: queued records and key changes, then owed answers.

        The driver calls this while it holds the sending side and hands every item to
        its sending engine in order.
        """
        output, self._output = self._output, []
        if self.failure is None and not self._close_sent:
            if self._owe_no_renegotiation:
                output.append(
                    SendRecord(
                        ContentType.ALERT,
                        encode_alert(AlertDescription.NO_RENEGOTIATION, AlertLevel.WARNING),
                    )
                )
            if self._owe_key_update:
                output += self._key_update(KeyUpdateRequest.UPDATE_NOT_REQUESTED)
        self._owe_no_renegotiation = self._owe_key_update = False
        return output

    def start_key_update(self, request_peer: bool) -> None:
        """Queue our KeyUpdate (and the new send keys); ``request_peer`` asks the peer to
        update its keys too.  Raises ValueError for TLS 1.2."""
        self.check_can_send()
        if not self._tls13:
            raise ValueError("KeyUpdate exists only in TLS 1.3")
        request = (
            KeyUpdateRequest.UPDATE_REQUESTED
            if request_peer
            else KeyUpdateRequest.UPDATE_NOT_REQUESTED
        )
        self._owe_key_update = False  # this one answers any owed request as well
        self._output += self._key_update(request)

    def _key_update(self, request: KeyUpdateRequest) -> list[Output]:
        # The KeyUpdate itself goes out under the old key; everything after, the new.
        self._tx_keys = next_generation(self.session.suite, self._tx_keys)
        record = SendRecord(ContentType.HANDSHAKE, encode_key_update(request))
        return [record, TxKeys(self._tx_keys)]

    def send_close_notify(self) -> bool:
        """Queue close_notify (once); after it nothing more is sent.  Returns whether it
        was queued now (False when already sent, or when the connection failed)."""
        if self._close_sent or self.failure is not None:
            return False
        output = self.take_output()  # owed answers still go first
        self._close_sent = True
        self._output = [
            *output,
            SendRecord(ContentType.ALERT, encode_alert(AlertDescription.CLOSE_NOTIFY)),
        ]
        return True

    def fail(self, error: KTLSError, alert: AlertDescription | None = None) -> Failed:
        """A local failure (a key the kernel refused, a send that broke): sticky from
        now on; ``alert`` is queued for the peer when the sending side still works."""
        if self.failure is not None:
            return Failed(self.failure)
        return self._fail(error, alert)

    def _fail(self, error: KTLSError, alert: AlertDescription | None) -> Failed:
        self.failure = error
        # Nothing queued may follow a failure (not even a close_notify not yet taken):
        # only the alert we owe, under whatever keys the sending engine has now.
        self._owe_key_update = self._owe_no_renegotiation = False
        self._output = []
        if alert is not None and not self._close_sent:
            self._output.append(SendRecord(ContentType.ALERT, encode_alert(alert)))
        self._close_sent = True
        return Failed(error)
