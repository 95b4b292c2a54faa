"""The handshake driver without any socket: two drivers pumped into each other.

Sans-IO pays off here: a whole TLS handshake runs in memory, and the two hand-off
values must mirror each other exactly (keys, IVs, sequence numbers) for every suite
and version, full and resumed.
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

import ktls
from ktls.handshake import HandshakeDriver
from ktls.protection import Opener, Sealer, software_supports
from ktls.records import RecordBuffer
from ktls.session import Role, Session
from ktls.wire import ContentType

from .peers import Certs

SOFTWARE_SUITES = [s for s in ktls.SUITES if software_supports(s.cipher)]


def _contexts(certs: Certs, suite: ktls.Suite) -> tuple[ktls.ClientContext, ktls.ServerContext]:
    cert = certs.server_ecdsa if "ECDSA" in suite.openssl_name else certs.server_rsa
    common = {
        "ciphers": [suite.openssl_name],
        "minimum_version": suite.version,
        "maximum_version": suite.version,
        "offload": "software",
    }
    client = ktls.ClientContext(cafile=certs.ca, **common)  # type: ignore[arg-type]
    server = ktls.ServerContext(cert, **common)  # type: ignore[arg-type]
    return client, server


# After its last handshake flight the server sends data: a peeking caller sees it too.
_TRAILER = b"\x17\x03\x03\x00\x03abc"


def _done(driver: HandshakeDriver) -> bool:
    return driver.done


def _pump(client: HandshakeDriver, server: HandshakeDriver, *, peek: bool = False) -> bytes:
    """Move bytes both ways until both are done: at most one record per read, or (a
    caller that peeks) all there is, taking out only what the driver used.

    Returns what the server sent that the client's driver did not take: it belongs to
    the record engine (TLS 1.3: the server's NewSessionTickets).
    """
    to_server, to_client = bytearray(client.data_to_send()), bytearray()
    for _ in range(100):
        if client.done and server.done:
            if peek:  # the data after each side's last flight was left where it was
                assert to_server == _TRAILER
                assert to_client.endswith(_TRAILER)
                del to_client[-len(_TRAILER) :]
            return bytes(to_client)
        for driver, inbox, outbox in (
            (server, to_server, to_client),
            (client, to_client, to_server),
        ):
            while inbox and not driver.done:
                if peek:
                    used = driver.receive(bytes(inbox))
                    assert 0 < used <= len(inbox)
                    assert driver.done or used == len(inbox)
                    del inbox[:used]
                else:
                    n = driver.bytes_wanted()
                    chunk = bytes(inbox[:n])
                    del inbox[:n]
                    assert driver.receive(chunk) == len(chunk)
                outbox.extend(driver.data_to_send())
                if peek and _done(driver):  # (a call: mypy keeps done narrowed to False)
                    outbox.extend(_TRAILER)
    raise AssertionError("handshake did not finish")


def _handshake(
    certs: Certs,
    suite: ktls.Suite,
    session: SSL.Session | None = None,
    contexts: tuple[ktls.ClientContext, ktls.ServerContext] | None = None,
    *,
    peek: bool = False,
) -> tuple[HandshakeDriver, HandshakeDriver, bytes]:
    client_ctx, server_ctx = contexts or _contexts(certs, suite)
    client_conn = SSL.Connection(client_ctx._ssl_context(), None)
    client_conn.set_tlsext_host_name(b"localhost")
    if session is not None:
        client_conn.set_session(session)
    server_conn = SSL.Connection(server_ctx._ssl_context(), None)
    server = HandshakeDriver(server_conn, Role.SERVER)
    client = HandshakeDriver(
        client_conn, Role.CLIENT, server_hostname="localhost", check_hostname=True
    )
    leftover = _pump(client, server, peek=peek)
    return client, server, leftover


def _assert_mirrored(client: Session, server: Session, in_flight: bytes = b"") -> None:
    """The two hand-off values fit: what one side seals, the other opens, in sequence."""
    assert client.suite is server.suite
    assert (client.tx.key, client.tx.iv) == (server.rx.key, server.rx.iv)
    assert (client.rx.key, client.rx.iv) == (server.tx.key, server.tx.iv)
    for sender, receiver, pending in ((client, server, b""), (server, client, in_flight)):
        keys = sender.tx
        sealer = Sealer(
            sender.version, sender.suite.cipher, keys.key, keys.iv, keys.seq, keys.explicit_nonce
        )
        keys = receiver.rx
        opener = Opener(receiver.version, receiver.suite.cipher, keys.key, keys.iv, keys.seq)
        records = RecordBuffer()
        records.feed(pending)  # records the server's driver wrote after the hand-off point
        while (record := records.next_record()) is not None:
            assert opener.open(*record)[0] is ContentType.HANDSHAKE  # a ticket
        assert opener.seq == sealer.seq
        records.feed(sealer.seal(ContentType.APPLICATION_DATA, b"hand-off"))
        record = records.next_record()
        assert record is not None
        assert opener.open(*record) == (ContentType.APPLICATION_DATA, b"hand-off")


@pytest.mark.parametrize("peek", [False, True], ids=["by-record", "peek"])
@pytest.mark.parametrize("suite", SOFTWARE_SUITES, ids=lambda s: s.openssl_name)
def test_hand_off_values_mirror_each_other(certs: Certs, suite: ktls.Suite, peek: bool) -> None:
    # peek: each driver is given the peer's whole last flight and the data after it at
    # once (TLS 1.2: the server's ticket, CCS, Finished), and must use nothing after the
    # peer's last handshake record.
    client, server, in_flight = _handshake(certs, suite, peek=peek)
    _assert_mirrored(client.session, server.session, in_flight)
    assert client.session.version is suite.version
    if suite.version is ktls.ProtocolVersion.TLS1_3:
        # The server wrote its tickets under the application key; the client nothing.
        assert server.session.tx.seq >= 1
        assert client.session.tx.seq == 0
    else:
        assert (client.session.tx.seq, server.session.tx.seq) == (1, 1)  # after Finished


TLS12_SUITES = [s for s in SOFTWARE_SUITES if s.version is ktls.ProtocolVersion.TLS1_2]


@pytest.mark.parametrize("peek", [False, True], ids=["by-record", "peek"])
@pytest.mark.parametrize("suite", TLS12_SUITES, ids=lambda s: s.openssl_name)
def test_resumed_tls12_hand_off(certs: Certs, suite: ktls.Suite, peek: bool) -> None:
    contexts = _contexts(certs, suite)
    client, _server, _ = _handshake(certs, suite, contexts=contexts)
    session = client.connection.get_session()
    client2, server2, in_flight = _handshake(certs, suite, session, contexts, peek=peek)
    assert client2.session.resumed
    assert server2.session.resumed
    # Resumed, the server sends its Finished first: still seq 1 after Finished both ways.
    assert (client2.session.tx.seq, server2.session.tx.seq) == (1, 1)
    _assert_mirrored(client2.session, server2.session, in_flight)


@settings(max_examples=150, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=600))
def test_garbage_only_raises_our_errors(certs: Certs, garbage: bytes) -> None:
    _client_ctx, server_ctx = _contexts(certs, SOFTWARE_SUITES[0])
    server = HandshakeDriver(SSL.Connection(server_ctx._ssl_context(), None), Role.SERVER)
    try:
        while garbage and not server.done:
            n = server.bytes_wanted()
            chunk, garbage = garbage[:n], garbage[n:]
            server.receive(chunk)
    except ktls.KTLSError:
        pass
    assert not server.done


@settings(max_examples=150, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=600))
def test_garbage_at_once_only_raises_our_errors(certs: Certs, garbage: bytes) -> None:
    _client_ctx, server_ctx = _contexts(certs, SOFTWARE_SUITES[0])
    server = HandshakeDriver(SSL.Connection(server_ctx._ssl_context(), None), Role.SERVER)
    with contextlib.suppress(ktls.KTLSError):
        assert server.receive(garbage) == len(garbage)
    assert not server.done
