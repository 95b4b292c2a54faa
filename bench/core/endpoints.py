"""The contenders: how each kind of end is set up on a connected TCP socket.

* ``raw``: no handshake; the TLS ULP is attached and the same random AES-128-GCM
  key/iv/seq is installed by hand, as TX on the sending end and RX on the receiving one.
* ``ktls-x25519``: ``ktls-auto`` offering X25519 alone, the key exchange Python's
  ``ssl`` does here (OpenSSL 3.0), where ktls's OpenSSL (4.0) leads with the
  post-quantum hybrid X25519MLKEM768: the same handshake work on both sides.
* ``ktls-kernel`` / ``ktls-software`` / ``ktls-auto``: a real handshake through ktls's
  contexts with ``offload`` set accordingly.
* ``ssl``: Python's standard ``ssl`` module.

Every TLS end is TLS 1.3 with TLS_AES_128_GCM_SHA256, on one ECDSA P-256 certificate
made by trustme; what was negotiated is checked, never assumed.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import os
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import trustme

import ktls
from ktls import kernel, linux
from ktls.suites import CIPHERS
from ktls.wire import ProtocolVersion

Kind = Literal["raw", "ktls-kernel", "ktls-software", "ktls-auto", "ktls-x25519", "ssl"]
Role = Literal["client", "server"]

SUITE = "TLS_AES_128_GCM_SHA256"
HOSTNAME = "localhost"
_CIPHER = CIPHERS["AES-128-GCM"]


class Stream(Protocol):
    """What the benchmarks use of a connection (socket, ssl.SSLSocket, TLSSocket)."""

    def sendall(self, data: bytes, /) -> None: ...
    def recv_into(self, buffer: bytearray, /) -> int: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Certs:
    ca: Path
    server: Path  # chain and key, PEM


_CERTS_LOCK = threading.Lock()


def certs() -> Certs:
    """An ECDSA P-256 server certificate for "localhost", made once per process.

    Both ends ask for it at the same time from two threads: made under a lock, else each
    end could make its own CA.
    """
    with _CERTS_LOCK:
        return _make_certs()


@functools.cache
def _make_certs() -> Certs:
    base = Path(tempfile.mkdtemp(prefix="ktls-bench-"))
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    leaf = ca.issue_cert(HOSTNAME, key_type=trustme.KeyType.ECDSA)
    leaf.private_key_and_cert_chain_pem.write_to_path(str(base / "server.pem"))
    return Certs(ca=base / "ca.pem", server=base / "server.pem")


# -- Python's ssl --------------------------------------------------------------------


def _force_tls13_suite(ctx: ssl.SSLContext) -> None:
    """Python's ssl has no API for TLS 1.3 suites (3.11): call OpenSSL's directly.

    ``_ssl`` links the libssl whose SSL_CTX the context wraps; the pointer is the first
    field after the object header.  The effect is checked through get_ciphers().
    """
    lib = ctypes.CDLL(_ssl.__file__)
    setter = lib.SSL_CTX_set_ciphersuites
    setter.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    setter.restype = ctypes.c_int
    ssl_ctx = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if setter(ssl_ctx, SUITE.encode()) != 1:
        raise RuntimeError("OpenSSL refused to restrict Python's ssl to " + SUITE)
    names = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
    if names != [SUITE]:
        raise RuntimeError(f"Python's ssl still offers {names}, not only {SUITE}")


@functools.cache
def ssl_context(role: Role) -> ssl.SSLContext:
    if role == "server":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs().server)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(certs().ca)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    _force_tls13_suite(ctx)
    return ctx


# -- ktls ---------------------------------------------------------------------------------

Offload = Literal["kernel", "software", "auto"]


@functools.cache
def ktls_context(
    role: Role, offload: Offload, groups: tuple[str, ...] | None = None
) -> ktls.ClientContext | ktls.ServerContext:
    common = {"ciphers": [SUITE], "minimum_version": "TLSv1.3", "offload": offload}
    if groups is not None:
        common["groups"] = list(groups)
    if role == "server":
        return ktls.ServerContext(certs().server, **common)  # type: ignore[arg-type]
    return ktls.ClientContext(cafile=certs().ca, **common)  # type: ignore[arg-type]


# -- raw kTLS ------------------------------------------------------------------------------


def random_keys() -> ktls.TrafficKeys:
    return ktls.TrafficKeys(
        key=os.urandom(_CIPHER.key_len), iv=os.urandom(_CIPHER.nonce_len), seq=0
    )


def raw_ktls(sock: socket.socket, keys: ktls.TrafficKeys, *, sending: bool) -> socket.socket:
    kernel.attach_ulp(sock)
    direction = linux.TLS_TX if sending else linux.TLS_RX
    kernel.install(sock, direction, ProtocolVersion.TLS1_3, _CIPHER, keys)
    return sock


# -- one entry point ------------------------------------------------------------------------


def wrap(sock: socket.socket, kind: Kind, role: Role) -> ssl.SSLSocket | ktls.TLSSocket:
    """Handshake on ``sock`` as ``role``; the result is checked (version, suite, engine)."""
    if kind == "ssl":
        ctx = ssl_context(role)
        if role == "server":
            tls: ssl.SSLSocket | ktls.TLSSocket = ctx.wrap_socket(sock, server_side=True)
        else:
            tls = ctx.wrap_socket(sock, server_hostname=HOSTNAME)
    elif kind == "raw":
        raise ValueError("raw kTLS has no handshake: use raw_ktls()")
    else:
        if kind == "ktls-x25519":
            context = ktls_context(role, "auto", ("X25519",))
        else:
            offload: Offload = kind.removeprefix("ktls-")  # type: ignore[assignment]
            context = ktls_context(role, offload)
        if isinstance(context, ktls.ServerContext):
            tls = context.wrap_socket(sock)
        else:
            tls = context.wrap_socket(sock, server_hostname=HOSTNAME)
    check(tls, kind)
    return tls


def check(tls: ssl.SSLSocket | ktls.TLSSocket, kind: Kind) -> None:
    """Fail loudly when the connection is not what the row claims."""
    cipher = tls.cipher()
    if tls.version() != "TLSv1.3" or cipher is None or cipher[0] != SUITE:
        raise RuntimeError(f"{kind}: negotiated {tls.version()} {cipher}, wanted TLSv1.3 {SUITE}")
    if isinstance(tls, ktls.TLSSocket) and kind in ("ktls-kernel", "ktls-software"):
        want = kind.removeprefix("ktls-")
        if (tls.tx_engine, tls.rx_engine) != (want, want):
            raise RuntimeError(
                f"{kind}: engines are tx={tls.tx_engine} rx={tls.rx_engine}, not {want} both ways"
            )


def engines(tls: ssl.SSLSocket | ktls.TLSSocket) -> str:
    if isinstance(tls, ktls.TLSSocket):
        return f"{tls.tx_engine}/{tls.rx_engine}"
    return "openssl"
