"""Contexts: TLS settings in, :class:`~ktls.tlssocket.TLSSocket` out.

A context is shared by every connection (and thread) that uses it: its OpenSSL
context is configured once, on first use, under a lock (OpenSSL contexts must not
change once a connection uses them), because the suites it offers depend on what the
kernel accepts, probed at that time.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from OpenSSL import SSL

from . import handoff
from .errors import ConfigError, ULPUnavailable
from .handoff import Offload
from .handshake import keylog_callback, verify_callback
from .kernel import kernel_accepts, ulp_error
from .protection import software_supports
from .session import Role
from .suites import SUITES, Suite, suite_by_name
from .tlssocket import TLSSocket
from .wire import ProtocolVersion

__all__ = ["ClientContext", "Offload", "ServerContext", "TLSListener"]

_OFFLOADS = ("auto", "kernel", "software")
_VERSION_NAMES = {"TLSv1.2": ProtocolVersion.TLS1_2, "TLSv1.3": ProtocolVersion.TLS1_3}
_OPENSSL_VERSIONS = {
    ProtocolVersion.TLS1_2: SSL.TLS1_2_VERSION,
    ProtocolVersion.TLS1_3: SSL.TLS1_3_VERSION,
}
#: Seconds a handshake may take unless the context says otherwise (asyncio's default).
DEFAULT_HANDSHAKE_TIMEOUT = 60.0
# Offered unless the caller names suites: what every kernel since 5.11 and the software
# engine can carry.  CCM, ARIA and SM4 are offloadable too, on request.
DEFAULT_CIPHERS = (
    "TLS_AES_128_GCM_SHA256",
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)


def _resolve_suites(names: Iterable[str]) -> tuple[Suite, ...]:
    suites = []
    for name in names:
        suite = suite_by_name(name)
        if suite is None:
            offloadable = ", ".join(s.openssl_name for s in SUITES)
            raise ConfigError(
                f"cipher suite {name!r} cannot be offloaded to the kernel; choose from: "
                f"{offloadable}"
            )
        suites.append(suite)
    return tuple(suites)


def _parse_version(value: str | ProtocolVersion) -> ProtocolVersion:
    if isinstance(value, ProtocolVersion):
        return value
    try:
        return _VERSION_NAMES[value]
    except KeyError:
        raise ConfigError(f"unknown TLS version {value!r}: use 'TLSv1.2' or 'TLSv1.3'") from None


def _check_file(path: str | os.PathLike[str] | None, what: str) -> str | None:
    if path is None:
        return None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{what} {path!r} is not readable")
    return path


def _set_groups(ctx: SSL.Context, groups: Sequence[str]) -> None:
    """The key exchange groups to offer or accept, in order of preference.

    pyOpenSSL has no call for SSL_CTX_set1_groups_list; its cffi binding has the same
    function under its older name.  OpenSSL's default (left alone when ``groups`` is
    None) leads with the post-quantum hybrid X25519MLKEM768 from OpenSSL 3.5 on.
    """
    from OpenSSL._util import lib  # noqa: PLC0415 -- private, so kept to these places

    if not groups or lib.SSL_CTX_set1_curves_list(ctx._context, ":".join(groups).encode()) != 1:
        lib.ERR_clear_error()  # else pyOpenSSL reports it at its next call
        raise ConfigError(f"OpenSSL refused the key exchange groups {list(groups)!r}")


class _Context:
    """What client and server contexts share: versions, suites, ALPN, offload."""

    _role: Role

    def __init__(
        self,
        *,
        ciphers: Sequence[str] | None,
        minimum_version: str | ProtocolVersion,
        maximum_version: str | ProtocolVersion,
        alpn_protocols: Sequence[str] | None,
        offload: Offload,
        handshake_timeout: float | None,
        groups: Sequence[str] | None,
    ) -> None:
        if offload not in _OFFLOADS:
            raise ConfigError(f"offload must be one of {_OFFLOADS}, not {offload!r}")
        if handshake_timeout is not None and handshake_timeout <= 0:
            raise ConfigError("handshake_timeout must be positive (or None: no limit)")
        self.offload: Offload = offload
        self.handshake_timeout = handshake_timeout
        self.minimum_version = _parse_version(minimum_version)
        self.maximum_version = _parse_version(maximum_version)
        if self.minimum_version > self.maximum_version:
            raise ConfigError("minimum_version is above maximum_version")
        self.suites = _resolve_suites(ciphers if ciphers is not None else DEFAULT_CIPHERS)
        self.alpn_protocols = list(alpn_protocols or [])
        self._ssl = SSL.Context(SSL.TLS_METHOD)
        self._ssl.set_keylog_callback(keylog_callback)
        self._ssl.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        self.groups = list(groups) if groups is not None else None
        if self.groups is not None:
            _set_groups(self._ssl, self.groups)
        self._configure_lock = threading.Lock()
        self._configured = False

    # The offered suites depend on the kernel (found on first use, not at import).
    def _offered(self) -> tuple[Suite, ...]:
        suites = self.suites
        if self.offload == "software":
            suites = tuple(s for s in suites if software_supports(s.cipher))
        else:
            missing = ulp_error()
            if missing is not None and self.offload == "kernel":
                raise ULPUnavailable(missing)
            kernel_ok = tuple(
                s for s in suites if missing is None and kernel_accepts(s.cipher, s.version)
            )
            if self.offload == "kernel":
                suites = kernel_ok
            else:  # auto: what the kernel takes, plus what software can carry instead
                suites = tuple(s for s in suites if s in kernel_ok or software_supports(s.cipher))
        suites = tuple(
            s for s in suites if self.minimum_version <= s.version <= self.maximum_version
        )
        if not suites:
            raise ConfigError(
                f"no cipher suite left to offer with offload={self.offload!r} "
                f"between {self.minimum_version.label} and {self.maximum_version.label}"
            )
        return suites

    def _ssl_context(self) -> SSL.Context:
        """The OpenSSL context, configured exactly once (thread-safe)."""
        if self._configured:
            return self._ssl
        with self._configure_lock:
            if not self._configured:
                self._configure(self._offered())
                self._configured = True
        return self._ssl

    def _configure(self, suites: tuple[Suite, ...]) -> None:
        versions = sorted({s.version for s in suites})
        self._ssl.set_min_proto_version(_OPENSSL_VERSIONS[versions[0]])
        self._ssl.set_max_proto_version(_OPENSSL_VERSIONS[versions[-1]])
        tls12 = [s.openssl_name for s in suites if s.version is ProtocolVersion.TLS1_2]
        tls13 = [s.openssl_name for s in suites if s.version is ProtocolVersion.TLS1_3]
        try:
            if tls12:
                self._ssl.set_cipher_list(":".join(tls12).encode())
            self._ssl.set_tls13_ciphersuites(":".join(tls13).encode())
        except SSL.Error as exc:
            raise ConfigError(f"OpenSSL refused the cipher list: {exc}") from exc

    def _wrap(
        self,
        sock: socket.socket,
        *,
        do_handshake_on_connect: bool,
        server_hostname: str | None = None,
        check_hostname: bool = False,
        session: SSL.Session | None = None,
        handshake_timeout: float | None = None,
    ) -> TLSSocket:
        """A TLSSocket on a connected socket, handshaken now or on first use.

        The socket is ours from here on: it is closed if anything fails here.
        """
        try:
            pending = handoff.prepare(
                sock,
                self._ssl_context(),
                self._role,
                self.offload,
                server_hostname=server_hostname,
                check_hostname=check_hostname,
                session=session,
            )
            tls = TLSSocket(
                pending,
                handshake_timeout=handshake_timeout
                if handshake_timeout is not None
                else self.handshake_timeout,
            )
            if do_handshake_on_connect:
                tls.do_handshake()
        except BaseException:
            sock.close()
            raise
        return tls


class ClientContext(_Context):
    """Settings for client connections.

    Certificates are verified by default against the system trust store (or
    ``cafile``/``capath``), and the host name is checked.
    """

    _role = Role.CLIENT

    def __init__(
        self,
        *,
        verify: bool = True,
        cafile: str | os.PathLike[str] | None = None,
        capath: str | os.PathLike[str] | None = None,
        check_hostname: bool = True,
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        ciphers: Sequence[str] | None = None,
        minimum_version: str | ProtocolVersion = "TLSv1.2",
        maximum_version: str | ProtocolVersion = "TLSv1.3",
        alpn_protocols: Sequence[str] | None = None,
        offload: Offload = "auto",
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        groups: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            ciphers=ciphers,
            minimum_version=minimum_version,
            maximum_version=maximum_version,
            alpn_protocols=alpn_protocols,
            offload=offload,
            handshake_timeout=handshake_timeout,
            groups=groups,
        )
        self.verify = verify
        self.check_hostname = check_hostname and verify
        ctx = self._ssl
        if verify:
            ctx.set_verify(SSL.VERIFY_PEER, verify_callback)
            cafile_ok = _check_file(cafile, "CA file")
            if cafile_ok is not None or capath is not None:
                ctx.load_verify_locations(cafile_ok, os.fspath(capath) if capath else None)
            else:
                ctx.set_default_verify_paths()
        else:
            ctx.set_verify(SSL.VERIFY_NONE)
        if certfile is not None:
            _load_identity(ctx, certfile, keyfile)
        if self.alpn_protocols:
            ctx.set_alpn_protos([p.encode() for p in self.alpn_protocols])

    def wrap_socket(
        self,
        sock: socket.socket,
        server_hostname: str | None = None,
        *,
        session: SSL.Session | None = None,
        do_handshake_on_connect: bool = True,
    ) -> TLSSocket:
        """TLS as a client on a connected TCP socket (which the result takes over).

        The handshake runs now, or with ``do_handshake_on_connect=False`` on
        ``do_handshake()`` or the first I/O; either way within ``handshake_timeout``."""
        if self.check_hostname and not server_hostname:
            raise ConfigError("check_hostname needs server_hostname")
        return self._wrap(
            sock,
            do_handshake_on_connect=do_handshake_on_connect,
            server_hostname=server_hostname,
            check_hostname=self.check_hostname,
            session=session,
        )

    def connect(
        self,
        address: tuple[str, int],
        *,
        server_hostname: str | None = None,
        timeout: float | None = None,
        session: SSL.Session | None = None,
    ) -> TLSSocket:
        """Open a TCP connection to ``address`` and handshake; SNI defaults to the host.

        ``timeout`` bounds the connection and the handshake (else ``handshake_timeout``
        bounds the handshake), and stays the socket's timeout afterwards."""
        host = address[0]
        self._ssl_context()  # settings and kernel errors come before any connection
        sock = socket.create_connection(address, timeout=timeout)
        name = server_hostname if server_hostname is not None else host
        if self.check_hostname and not name:
            sock.close()
            raise ConfigError("check_hostname needs server_hostname")
        return self._wrap(
            sock,
            do_handshake_on_connect=True,
            server_hostname=name,
            check_hostname=self.check_hostname,
            session=session,
            handshake_timeout=timeout,
        )


def _load_identity(
    ctx: SSL.Context,
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str] | None,
) -> None:
    cert_path = _check_file(certfile, "certificate file")
    key_path = _check_file(keyfile, "key file") or cert_path
    assert cert_path is not None
    assert key_path is not None
    try:
        ctx.use_certificate_chain_file(cert_path)
    except SSL.Error as exc:
        raise ConfigError(f"cannot load certificate chain from {cert_path!r}: {exc}") from exc
    try:
        ctx.use_privatekey_file(key_path)
    except SSL.Error as exc:
        raise ConfigError(f"cannot load private key from {key_path!r}: {exc}") from exc
    try:
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise ConfigError(
            f"private key {key_path!r} does not match certificate {cert_path!r}"
        ) from exc


def _dns_names(certfile: str | os.PathLike[str]) -> list[str]:
    """The host names a PEM certificate (the first in the file) is for."""
    try:
        cert = x509.load_pem_x509_certificate(Path(certfile).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a certificate from {os.fspath(certfile)!r}: {exc}") from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return list(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return [str(common[0].value)] if common else []


VerifyClient = Literal["none", "optional", "required"]


class ServerContext(_Context):
    """Settings for server connections: certificate chain and key (RSA or ECDSA)."""

    _role = Role.SERVER

    def __init__(
        self,
        certfile: str | os.PathLike[str],
        keyfile: str | os.PathLike[str] | None = None,
        *,
        client_cafile: str | os.PathLike[str] | None = None,
        verify_client: VerifyClient = "none",
        ciphers: Sequence[str] | None = None,
        minimum_version: str | ProtocolVersion = "TLSv1.2",
        maximum_version: str | ProtocolVersion = "TLSv1.3",
        alpn_protocols: Sequence[str] | None = None,
        offload: Offload = "auto",
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        groups: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            ciphers=ciphers,
            minimum_version=minimum_version,
            maximum_version=maximum_version,
            alpn_protocols=alpn_protocols,
            offload=offload,
            handshake_timeout=handshake_timeout,
            groups=groups,
        )
        # What another identity (add_identity) needs to be configured like this one.
        self._settings: dict[str, Any] = {
            "client_cafile": client_cafile, "verify_client": verify_client,
            "ciphers": ciphers, "minimum_version": minimum_version,
            "maximum_version": maximum_version, "alpn_protocols": alpn_protocols,
            "offload": offload, "handshake_timeout": handshake_timeout, "groups": groups,
        }  # fmt: skip
        self._identities: dict[str, ServerContext] = {}  # server name (or *.suffix)
        ctx = self._ssl
        _load_identity(ctx, certfile, keyfile)
        ctx.set_session_id(b"ktls")
        if verify_client != "none":
            ca = _check_file(client_cafile, "client CA file")
            if ca is None:
                raise ConfigError("verify_client needs client_cafile")
            ctx.load_verify_locations(ca)
            ctx.load_client_ca(ca.encode())
            mode = SSL.VERIFY_PEER
            if verify_client == "required":
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            ctx.set_verify(mode, verify_callback)
        elif client_cafile is not None:
            raise ConfigError("client_cafile given but verify_client is 'none'")
        if self.alpn_protocols:
            offered = [p.encode() for p in self.alpn_protocols]

            def select(conn: SSL.Connection, protos: list[bytes]) -> bytes | Any:
                for proto in offered:
                    if proto in protos:
                        return proto
                return SSL.NO_OVERLAPPING_PROTOCOLS

            ctx.set_alpn_select_callback(select)

    def add_identity(
        self,
        certfile: str | os.PathLike[str],
        keyfile: str | os.PathLike[str] | None = None,
        *,
        server_names: Sequence[str] | None = None,
    ) -> list[str]:
        """Another certificate chain and key, presented to clients whose SNI asks for
        one of ``server_names`` (default: the certificate's DNS names, from its
        subjectAltName, else its common name; ``*.example.org`` matches one label).
        Clients without SNI, or asking for another name, get the first identity.
        Returns the names now served by this identity."""
        other = ServerContext(certfile, keyfile, **self._settings)
        names = [n.lower() for n in (server_names or _dns_names(certfile))]
        if not names:
            raise ConfigError(f"{os.fspath(certfile)!r} names no host (no DNS name in it)")
        for name in names:
            self._identities[name] = other
        self._ssl.set_tlsext_servername_callback(self._choose_identity)
        return names

    def _choose_identity(self, conn: SSL.Connection) -> None:
        """OpenSSL's SNI callback: switch the connection to the identity for its name
        (only the certificate and key change; the connection's settings stay)."""
        requested = conn.get_servername()
        if not requested:
            return
        name = requested.decode("ascii", "replace").lower().rstrip(".")
        _, _, parent = name.partition(".")
        chosen = self._identities.get(name) or self._identities.get(f"*.{parent}")
        if chosen is not None:
            conn.set_context(chosen._ssl_context())

    def wrap_socket(
        self, sock: socket.socket, *, do_handshake_on_connect: bool = True
    ) -> TLSSocket:
        """TLS as a server on an accepted TCP socket (which the result takes over).

        The handshake runs now, or with ``do_handshake_on_connect=False`` on
        ``do_handshake()`` or the first I/O; either way within ``handshake_timeout``."""
        return self._wrap(sock, do_handshake_on_connect=do_handshake_on_connect)

    def listen(
        self,
        address: tuple[str, int],
        backlog: int = 128,
        *,
        do_handshake_on_connect: bool = True,
    ) -> TLSListener:
        """A listening socket whose ``accept()`` gives TLSSockets.

        By default ``accept()`` runs the handshake (as ``ssl`` does), bounded by
        ``handshake_timeout``: one slow client then delays the next accept.  A server
        that handles each connection in its own thread should pass
        ``do_handshake_on_connect=False``: ``accept()`` returns at once and the
        handshake runs in the handler, on ``do_handshake()`` or the first I/O."""
        return TLSListener(
            self,
            socket.create_server(address, backlog=backlog),
            do_handshake_on_connect=do_handshake_on_connect,
        )


class TLSListener:
    """A listening socket whose ``accept()`` returns TLSSockets."""

    def __init__(
        self, context: ServerContext, sock: socket.socket, *, do_handshake_on_connect: bool = True
    ) -> None:
        self.context = context
        self.socket = sock
        self.do_handshake_on_connect = do_handshake_on_connect

    def accept(self) -> tuple[TLSSocket, tuple[str, int]]:
        """Accept one connection; HandshakeError if its handshake (run here unless
        ``do_handshake_on_connect`` is off) fails."""
        sock, address = self.socket.accept()
        tls = self.context.wrap_socket(sock, do_handshake_on_connect=self.do_handshake_on_connect)
        return tls, address

    def getsockname(self) -> tuple[str, int]:
        name: tuple[str, int] = self.socket.getsockname()[:2]
        return name

    def fileno(self) -> int:
        return self.socket.fileno()

    def close(self) -> None:
        self.socket.close()

    def __enter__(self) -> TLSListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
