"""From a connected TCP socket to installed record engines: prepare, pump, install.

Every I/O style goes the same three steps, and only the middle one is its own:

1. :func:`prepare` attaches the TLS ULP (before the handshake, so that a kernel that
   can't is found out early; with no keys set the socket still behaves like plain
   TCP) and sets up OpenSSL and the sans-IO :class:`~ktls.handshake.HandshakeDriver`;
2. the caller pumps the driver: blocking (:class:`~ktls.tlssocket.TLSSocket`) or from
   an event loop, taking out of the socket no more than ``driver.receive()`` used;
3. :func:`install` turns the hand-off value into a sending and a receiving engine, per
   direction the kernel if it takes the keys, else (unless ``offload="kernel"``) the
   software engine.  If it fails, the internal_error alert for the peer is queued in
   :attr:`Handshake.abort_engine` for the caller to flush before closing: nothing here
   sends by itself.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from OpenSSL import SSL

from .engine import RxEngine, TxEngine
from .errors import KernelUnsupported, SoftwareUnsupported, ULPUnavailable
from .handshake import HandshakeDriver, is_ip_address
from .kernel import KernelRx, KernelTx, attach_ulp, ulp_error
from .protection import software_supports
from .records import encode_alert
from .session import Role, Session, TrafficKeys
from .software import SoftwareRx, SoftwareTx
from .suites import Cipher
from .wire import AlertDescription, ContentType, ProtocolVersion

__all__ = ["Handshake", "Offload", "attach", "engines", "install", "prepare"]

log = logging.getLogger("ktls")

Offload = Literal["auto", "kernel", "software"]

_E = TypeVar("_E")
# Both engines of a direction are built the same way: (sock, version, cipher, keys).
_Factory = Callable[[socket.socket, ProtocolVersion, Cipher, TrafficKeys], _E]


@dataclass
class Handshake:
    """One connection between TCP and the record engines."""

    sock: socket.socket
    conn: SSL.Connection
    driver: HandshakeDriver
    offload: Offload
    ulp: bool  # the TLS ULP is attached: the kernel may take the keys
    abort_engine: TxEngine | None = field(default=None)


def prepare(
    sock: socket.socket,
    ssl_context: SSL.Context,
    role: Role,
    offload: Offload,
    *,
    server_hostname: str | None = None,
    check_hostname: bool = False,
    session: SSL.Session | None = None,
) -> Handshake:
    """Step 1: attach the ULP when the kernel has it, set up OpenSSL and the driver."""
    ulp = attach(sock, offload)
    conn = SSL.Connection(ssl_context, None)
    if server_hostname and role is Role.CLIENT and not is_ip_address(server_hostname):
        conn.set_tlsext_host_name(server_hostname.encode("idna"))  # RFC 6066: no IPs
    if session is not None:
        conn.set_session(session)
    # The context's verify callback reaches the driver through the connection's app data.
    driver = HandshakeDriver(
        conn, role, server_hostname=server_hostname, check_hostname=check_hostname
    )
    return Handshake(sock, conn, driver, offload, ulp)


def attach(sock: socket.socket, offload: Offload) -> bool:
    """Attach the TLS ULP unless ``offload`` is "software" or the kernel has none
    (ULPUnavailable then, with ``offload="kernel"``); whether it is attached."""
    if offload == "software":
        return False
    missing = ulp_error()
    if missing is not None:
        if offload == "kernel":
            raise ULPUnavailable(missing)
        log.info("software engine: %s", missing)
        return False
    try:
        attach_ulp(sock)
    except ULPUnavailable as exc:
        # ENOTCONN: the peer is gone already (it hung up right after connecting).
        # That is the handshake's failure to report, the same on every engine.
        if not isinstance(exc.__cause__, OSError) or exc.__cause__.errno != errno.ENOTCONN:
            raise
        return False
    return True


def install(handshake: Handshake) -> tuple[TxEngine, RxEngine]:
    """Step 3: the engines for the completed handshake.

    Raises KernelUnsupported (``offload="kernel"`` and the kernel refused) or
    SoftwareUnsupported, after queueing an internal_error alert in
    ``handshake.abort_engine`` when any engine can still seal it.
    """
    session = handshake.driver.session
    sock = handshake.sock
    built: list[TxEngine] = []
    try:
        return engines(sock, session, handshake.offload, handshake.ulp, built)
    except (KernelUnsupported, SoftwareUnsupported):
        handshake.abort_engine = built[0] if built else _software_tx(sock, session)
        if handshake.abort_engine is not None:
            handshake.abort_engine.queue_record(
                ContentType.ALERT, encode_alert(AlertDescription.INTERNAL_ERROR)
            )
        raise


def engines(
    sock: socket.socket,
    session: Session,
    offload: Offload,
    ulp: bool,
    built: list[TxEngine] | None = None,
) -> tuple[TxEngine, RxEngine]:
    """The sending and receiving engines for ``session`` on ``sock``: per direction the
    kernel when the ULP is attached and it takes the keys, else (unless ``offload`` is
    "kernel") the software engine.  ``built`` receives the sending engine as soon as
    it exists (for an alert when the receiving one fails)."""
    version, cipher = session.version, session.suite.cipher

    def engine(kernel: _Factory[_E], software: _Factory[_E], keys: TrafficKeys, what: str) -> _E:
        if ulp:
            try:
                return kernel(sock, version, cipher, keys)
            except KernelUnsupported as exc:
                if offload == "kernel":
                    raise
                log.info("%s on the software engine: %s", what, exc)
        if not software_supports(cipher):
            raise SoftwareUnsupported(
                f"the software engine has no {cipher.name} (the cryptography package lacks "
                "it), and the kernel did not take it"
            )
        return software(sock, version, cipher, keys)

    tx = engine(KernelTx, SoftwareTx, session.tx, "TX")
    if built is not None:
        built.append(tx)
    return tx, engine(KernelRx, SoftwareRx, session.rx, "RX")


def _software_tx(sock: socket.socket, session: Session) -> TxEngine | None:
    """A sending engine for the alert when the kernel took nothing."""
    if not software_supports(session.suite.cipher):
        return None
    return SoftwareTx(sock, session.version, session.suite.cipher, session.tx)
