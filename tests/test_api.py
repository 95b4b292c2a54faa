"""The public API: names, settings errors, verification, client certificates, ALPN."""

from __future__ import annotations

import errno
import functools
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

import ktls
import ktls.kernel
import ktls.protection
from ktls import AlertDescription

from .conftest import assert_engine, rekey_expected
from .peers import (
    Certs,
    echo_until_close,
    openssl_client,
    openssl_server,
    python_ssl_context,
    python_ssl_server,
    run_in_thread,
)

PUBLIC = {
    "AlertDescription", "AlertReceived", "BrokenError", "CIPHERS", "Cipher", "CipherUnsupported",
    "ClientContext", "ClosedError", "ConfigError", "HandshakeError", "KTLSError",
    "KernelCapabilities", "KernelUnsupported", "ProtocolVersion", "ProtocolViolation",
    "RekeyUnsupported", "SUITES", "ServerContext", "Session", "SoftwareUnsupported", "Suite",
    "TLSListener",
    "TLSSocket", "TrafficKeys", "TruncatedStream", "ULPUnavailable", "__version__",
    "capabilities",
}  # fmt: skip


def test_public_api_is_explicit() -> None:
    assert set(ktls.__all__) == PUBLIC
    for name in ktls.__all__:
        assert hasattr(ktls, name), name


def test_one_root_exception() -> None:
    for name in ktls.__all__:
        value = getattr(ktls, name)
        if isinstance(value, type) and issubclass(value, Exception):
            assert issubclass(value, ktls.KTLSError), name
    assert issubclass(ktls.RekeyUnsupported, ktls.KernelUnsupported)
    assert issubclass(ktls.TruncatedStream, ktls.ProtocolViolation)
    assert issubclass(ktls.ConfigError, ValueError)


# -- settings errors: clear messages, raised before any network I/O ------------------------


def test_wrong_certificate_path(tmp_path: Path) -> None:
    with pytest.raises(ktls.ConfigError, match=r"certificate file .*missing.pem.* does not exist"):
        ktls.ServerContext(tmp_path / "missing.pem")


def test_wrong_key_path(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(ktls.ConfigError, match=r"key file .*nokey.pem.* does not exist"):
        ktls.ServerContext(certs.server_rsa, tmp_path / "nokey.pem")


def test_key_not_matching_certificate(certs: Certs, tmp_path: Path) -> None:
    # The ECDSA file's key with the RSA file's certificate.
    cert_only = tmp_path / "cert.pem"
    pem = certs.server_rsa.read_text()
    cert_only.write_text(pem[pem.index("-----BEGIN CERTIFICATE-----") :])
    with pytest.raises(ktls.ConfigError, match="does not match certificate"):
        ktls.ServerContext(cert_only, certs.server_ecdsa)


def test_garbage_certificate(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ktls.ConfigError, match="cannot load certificate chain"):
        ktls.ServerContext(junk)


def test_unknown_or_unoffloadable_cipher() -> None:
    with pytest.raises(ktls.ConfigError, match=r"cannot be offloaded.*TLS_AES_128_GCM_SHA256"):
        ktls.ClientContext(ciphers=["AES128-SHA"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"offload": "gpu"}, "offload must be one of"),
        ({"minimum_version": "TLSv1.1"}, "unknown TLS version"),
        ({"minimum_version": "TLSv1.3", "maximum_version": "TLSv1.2"}, "above maximum"),
        ({"cafile": "/nonexistent/ca.pem"}, "CA file"),
    ],
)
def test_bad_client_settings(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ktls.ConfigError, match=message):
        ktls.ClientContext(**kwargs)  # type: ignore[arg-type]


def test_hostname_check_needs_a_name(certs: Certs) -> None:
    context = ktls.ClientContext(cafile=certs.ca)
    with socket.socket() as sock, pytest.raises(ktls.ConfigError, match="server_hostname"):
        context.wrap_socket(sock)


def test_client_verification_needs_a_ca(certs: Certs) -> None:
    with pytest.raises(ktls.ConfigError, match="client_cafile"):
        ktls.ServerContext(certs.server_rsa, verify_client="required")


# -- without kernel TLS --------------------------------------------------------------------


@pytest.mark.noktls
def test_kernel_offload_without_ulp_is_a_clear_error(certs: Certs) -> None:
    assert not ktls.capabilities().ulp
    context = ktls.ClientContext(cafile=certs.ca, offload="kernel")
    with pytest.raises(ktls.ULPUnavailable, match="no 'tls' module"):
        context.connect(("127.0.0.1", 9), server_hostname="localhost")
    # The guest's /lib/modules has nothing for this UML kernel: modprobe can't help.
    assert not (ktls.kernel.MODULES_ROOT / os.uname().release).exists()
    server = ktls.ServerContext(certs.server_rsa, offload="kernel")
    with pytest.raises(ktls.ULPUnavailable, match="modprobe tls cannot help"):
        server.wrap_socket(socket.socket())


@pytest.mark.parametrize("installed", [True, False])
def test_missing_module_advice(
    installed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOENT from TCP_ULP: a module on disk can be loaded, a missing one can't."""
    release = os.uname().release
    if installed:
        folder = tmp_path / release / "kernel" / "net" / "tls"
        folder.mkdir(parents=True)
        (folder / "tls.ko.xz").write_bytes(b"")
    monkeypatch.setattr(ktls.kernel, "MODULES_ROOT", tmp_path)
    advice = ktls.kernel._why_no_tls_module()
    if installed:
        assert "run `modprobe tls` as root" in advice
    else:
        assert "modprobe tls cannot help" in advice


@pytest.mark.noktls
def test_auto_offload_without_ulp_falls_back_and_says_so(certs: Certs) -> None:
    with python_ssl_server(python_ssl_context(certs, server=True), echo_until_close) as (
        address,
        peer,
    ):
        tls = ktls.ClientContext(cafile=certs.ca).connect(address, server_hostname="localhost")
        assert_engine(tls, "software")
        tls.sendall(b"hi")
        assert tls.recv(2) == b"hi"
        tls.close()
        peer.join()


# -- verification and certificates (both engines) ------------------------------------------


def _refused(conn: ssl.SSLSocket) -> None:  # pragma: no cover - never reached
    raise AssertionError("the handshake should have failed")


def _expect_server_error(ctx: ssl.SSLContext) -> tuple[socket.socket, object]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> str:
        raw, _ = listener.accept()
        with raw:
            try:
                with ctx.wrap_socket(raw, server_side=True) as conn:
                    conn.recv(1)
            except (ssl.SSLError, OSError) as exc:
                return getattr(exc, "reason", None) or str(exc)
        return "no error"

    return listener, run_in_thread(serve)


def test_untrusted_certificate_is_refused(certs: Certs, engine: str) -> None:
    listener, peer = _expect_server_error(python_ssl_context(certs, server=True))
    context = ktls.ClientContext(cafile=certs.other_ca, offload=engine)  # type: ignore[arg-type]
    with pytest.raises(ktls.HandshakeError, match="certificate verify failed: unable to get local"):
        context.connect(listener.getsockname(), server_hostname="localhost")
    assert "UNKNOWN_CA" in peer.join().upper()  # type: ignore[attr-defined]
    listener.close()


def test_hostname_mismatch_is_refused(certs: Certs, engine: str) -> None:
    listener, peer = _expect_server_error(python_ssl_context(certs, server=True))
    context = ktls.ClientContext(cafile=certs.ca, offload=engine)  # type: ignore[arg-type]
    with pytest.raises(ktls.HandshakeError, match=r"does not match 'other\.example'") as info:
        context.connect(listener.getsockname(), server_hostname="other.example")
    assert info.value.alert is AlertDescription.BAD_CERTIFICATE
    assert "BAD_CERTIFICATE" in peer.join().upper()  # type: ignore[attr-defined]
    listener.close()


def test_ip_address_is_verified(certs: Certs, engine: str) -> None:
    server_ctx = python_ssl_context(certs, server=True)
    names: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)
    with python_ssl_server(server_ctx, echo_until_close) as (address, peer):
        context = ktls.ClientContext(cafile=certs.ca, offload=engine)  # type: ignore[arg-type]
        tls = context.connect(address)  # the name is "127.0.0.1", in the certificate
        assert tls.server_hostname == "127.0.0.1"
        tls.sendall(b"ok")
        assert tls.recv(2) == b"ok"
        tls.shutdown(socket.SHUT_WR)
        assert tls.recv(1) == b""
        tls.close()
        assert peer.join() == 2
    assert names == [None]  # RFC 6066: no IP address in SNI


def test_peer_refuses_our_versions(certs: Certs, engine: str) -> None:
    server_ctx = python_ssl_context(certs, server=True, version="TLSv1.2")
    listener, peer = _expect_server_error(server_ctx)
    context = ktls.ClientContext(
        cafile=certs.ca,
        minimum_version="TLSv1.3",
        offload=engine,  # type: ignore[arg-type]
    )
    with pytest.raises(ktls.HandshakeError, match="peer sent alert protocol_version") as info:
        context.connect(listener.getsockname(), server_hostname="localhost")
    assert info.value.received
    assert info.value.alert is AlertDescription.PROTOCOL_VERSION
    peer.join()  # type: ignore[attr-defined]
    listener.close()


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_client_certificate_both_ways(certs: Certs, engine: str, version: str) -> None:
    server = ktls.ServerContext(
        certs.server_ecdsa,
        verify_client="required",
        client_cafile=certs.ca,
        minimum_version=version,
        maximum_version=version,
        offload=engine,  # type: ignore[arg-type]
    )
    with server.listen(("127.0.0.1", 0)) as listener:
        client = ktls.ClientContext(
            cafile=certs.ca,
            certfile=certs.client,
            offload=engine,  # type: ignore[arg-type]
        )
        peer = run_in_thread(
            lambda: client.connect(listener.getsockname(), server_hostname="localhost")
        )
        tls, _ = listener.accept()
        assert_engine(tls, engine)
        cert = tls.getpeercert()
        assert isinstance(cert, dict)
        assert cert["subjectAltName"] == (("email", "client@example.test"),)
        assert isinstance(tls.getpeercert(binary_form=True), bytes)
        client_side = peer.join()
        assert client_side.getpeercert()["subjectAltName"] == (
            ("DNS", "localhost"),
            ("IP Address", "127.0.0.1"),
        )
        client_side.close()
        tls.close()


def test_missing_client_certificate_tls12(certs: Certs, engine: str) -> None:
    server = ktls.ServerContext(
        certs.server_rsa,
        verify_client="required",
        client_cafile=certs.ca,
        maximum_version="TLSv1.2",
        offload=engine,  # type: ignore[arg-type]
    )
    with server.listen(("127.0.0.1", 0)) as listener:
        client = python_ssl_context(certs, server=False)
        peer = run_in_thread(
            lambda: client.wrap_socket(
                socket.create_connection(listener.getsockname()), server_hostname="localhost"
            )
        )
        with pytest.raises(ktls.HandshakeError, match="certificate"):
            listener.accept()
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            peer.join()


def test_tls13_missing_client_certificate_arrives_as_alert(certs: Certs, engine: str) -> None:
    server_ctx = python_ssl_context(certs, server=True, version="TLSv1.3")
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(certs.ca)
    listener, peer = _expect_server_error(server_ctx)
    context = ktls.ClientContext(cafile=certs.ca, offload=engine)  # type: ignore[arg-type]
    # TLS 1.3: the client's handshake is over before the server judges its certificate.
    tls = context.connect(listener.getsockname(), server_hostname="localhost")
    assert_engine(tls, engine)
    with pytest.raises(ktls.AlertReceived, match="certificate_required") as info:
        tls.recv(10)
    assert info.value.alert is AlertDescription.CERTIFICATE_REQUIRED
    tls.close()
    peer.join()  # type: ignore[attr-defined]
    listener.close()


def test_alpn_both_roles(certs: Certs, engine: str) -> None:
    server = ktls.ServerContext(
        certs.server_rsa,
        alpn_protocols=["h2", "http/1.1"],
        offload=engine,  # type: ignore[arg-type]
    )
    with server.listen(("127.0.0.1", 0)) as listener:
        client = ktls.ClientContext(
            cafile=certs.ca,
            alpn_protocols=["http/1.1"],
            offload=engine,  # type: ignore[arg-type]
        )
        peer = run_in_thread(
            lambda: client.connect(listener.getsockname(), server_hostname="localhost")
        )
        tls, _ = listener.accept()
        client_side = peer.join()
        assert tls.selected_alpn_protocol() == "http/1.1"
        assert client_side.selected_alpn_protocol() == "http/1.1"
        assert tls.server_hostname == "localhost"  # the SNI the client sent
        client_side.close()
        tls.close()


@pytest.mark.parametrize("groups", [[], ["no-such-group"], ["X25519", "nonsense"]])
def test_bad_groups(certs: Certs, groups: list[str]) -> None:
    with pytest.raises(ktls.ConfigError, match="key exchange groups"):
        ktls.ClientContext(cafile=certs.ca, groups=groups)
    with pytest.raises(ktls.ConfigError, match="key exchange groups"):
        ktls.ServerContext(certs.server_rsa, groups=groups)


@pytest.mark.parametrize(("ours", "works"), [(["P-256"], False), (["P-256", "X25519"], True)])
def test_client_groups_are_what_it_offers(
    certs: Certs, engine: str, ours: list[str], works: bool
) -> None:
    """Against a server that only takes X25519: P-256 alone cannot agree."""
    client = ktls.ClientContext(cafile=certs.ca, groups=ours, offload=engine)  # type: ignore[arg-type]
    with openssl_server(certs, "TLSv1.3", None, "-groups", "X25519") as (address, _proc):
        if works:
            with client.connect(address, server_hostname="localhost") as tls:
                assert_engine(tls, engine)
        else:
            with pytest.raises(ktls.HandshakeError):
                client.connect(address, server_hostname="localhost")


@pytest.mark.parametrize(("ours", "works"), [(["P-256"], False), (["X25519"], True)])
def test_server_groups_are_what_it_accepts(
    certs: Certs, engine: str, ours: list[str], works: bool
) -> None:
    """A client that only offers X25519 (openssl s_client -groups X25519)."""
    server = ktls.ServerContext(certs.server_rsa, groups=ours, offload=engine)  # type: ignore[arg-type]
    with server.listen(("127.0.0.1", 0), do_handshake_on_connect=False) as listener:
        proc = openssl_client(
            certs, listener.getsockname(), "TLSv1.3", None, "-groups", "X25519", "-quiet"
        )
        try:
            tls, _ = listener.accept()
            with tls:
                if works:
                    tls.do_handshake()
                    assert_engine(tls, engine)
                else:
                    with pytest.raises(ktls.HandshakeError):
                        tls.do_handshake()
        finally:
            proc.stop()


# -- socket-like behaviour -----------------------------------------------------------------


def test_makefile_and_closed_errors(certs: Certs, engine: str) -> None:
    with python_ssl_server(python_ssl_context(certs, server=True), echo_until_close) as (
        address,
        peer,
    ):
        context = ktls.ClientContext(cafile=certs.ca, offload=engine)  # type: ignore[arg-type]
        tls = context.connect(address, server_hostname="localhost")
        assert_engine(tls, engine)
        assert "TLSSocket open" in repr(tls)
        writer = tls.makefile("wb")
        reader = tls.makefile("r", encoding="utf-8")
        writer.write(b"line one\nline two\n")
        writer.flush()
        assert reader.readline() == "line one\n"
        assert reader.readline() == "line two\n"
        buffer = bytearray(4)
        tls.sendall(b"abcd")
        got = 0
        while got < 4:
            got += tls.recv_into(memoryview(buffer)[got:])
        assert buffer == b"abcd"
        tls.shutdown(socket.SHUT_WR)
        with pytest.raises(ktls.ClosedError, match="close_notify was sent"):
            tls.send(b"late")
        assert tls.recv(10) == b""
        writer.close()
        reader.close()
        tls.close()
        with pytest.raises(ktls.ClosedError):
            tls.recv(10)
        assert peer.join() == 22


def test_verification_is_on_by_default(certs: Certs) -> None:
    """A default client trusts the system store only: a private CA is refused."""
    listener, peer = _expect_server_error(python_ssl_context(certs, server=True))
    with pytest.raises(ktls.HandshakeError, match="certificate verify failed"):
        ktls.ClientContext().connect(listener.getsockname(), server_hostname="localhost")
    peer.join()  # type: ignore[attr-defined]
    listener.close()


def test_optional_client_certificate(certs: Certs, engine: str) -> None:
    server = ktls.ServerContext(
        certs.server_rsa,
        verify_client="optional",
        client_cafile=certs.ca,
        offload=engine,  # type: ignore[arg-type]
    )
    with server.listen(("127.0.0.1", 0)) as listener:
        for certfile in (None, certs.client):
            client = ktls.ClientContext(
                cafile=certs.ca,
                certfile=certfile,
                offload=engine,  # type: ignore[arg-type]
            )
            connect = functools.partial(
                client.connect, listener.getsockname(), server_hostname="localhost"
            )
            peer = run_in_thread(connect)
            tls, _ = listener.accept()
            assert_engine(tls, engine)
            assert (tls.peer_certificate is None) is (certfile is None)
            peer.join().close()
            tls.close()


# -- the hand-off under stress: abort paths, big flights, names, loopback ------------------


@pytest.mark.kernel
@pytest.mark.parametrize("refused", ["rx", "tx"])
def test_abort_alert_is_sealed_once(
    certs: Certs, refused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """offload="kernel" and the kernel refuses one direction after the handshake: the
    internal_error alert must reach the peer readable -- through the kernel TX when it
    was installed, sealed in software when not -- never sealed twice."""
    engine_class = ktls.kernel.KernelRx if refused == "rx" else ktls.kernel.KernelTx

    def refuse(*args: object, **kwargs: object) -> None:
        raise ktls.CipherUnsupported("refused for this test")

    monkeypatch.setattr(engine_class, "__init__", refuse)

    def serve(conn: ssl.SSLSocket) -> str:
        try:
            conn.recv(10)
        except ssl.SSLError as exc:
            return exc.reason or str(exc)
        return "no alert"

    server_ctx = python_ssl_context(certs, server=True, version="TLSv1.3")
    with python_ssl_server(server_ctx, serve) as (address, peer):
        context = ktls.ClientContext(cafile=certs.ca, offload="kernel")
        with pytest.raises(ktls.CipherUnsupported, match="refused for this test"):
            context.connect(address, server_hostname="localhost")
        assert "INTERNAL_ERROR" in peer.join().upper()


@pytest.fixture(scope="module")
def big_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A server certificate whose flight is well over 64 KiB (3500 names)."""
    base = tmp_path_factory.mktemp("big")
    ca = trustme.CA()
    names = ["localhost", *(f"host-{i:05d}.example.test" for i in range(3500))]
    cert = ca.issue_cert(*names)
    cert.private_key_and_cert_chain_pem.write_to_path(str(base / "server.pem"))
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    return base / "server.pem", base / "ca.pem"


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_handshake_flight_over_64k(
    big_certificate: tuple[Path, Path], engine: str, version: str
) -> None:
    """OpenSSL's output is read from its BIO in chunks; a record that spans two chunks
    must still be counted whole (the sequence numbers depend on it)."""
    server_pem, ca_pem = big_certificate
    assert server_pem.stat().st_size > 64 * 1024
    server = ktls.ServerContext(
        server_pem,
        minimum_version=version,
        maximum_version=version,
        offload=engine,  # type: ignore[arg-type]
    )
    with server.listen(("127.0.0.1", 0)) as listener:

        def client() -> bytes:
            ctx = ssl.create_default_context(cafile=str(ca_pem))
            raw = socket.create_connection(listener.getsockname(), timeout=30)
            with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
                conn.sendall(b"ping")
                return conn.recv(4)

        peer = run_in_thread(client)
        tls, _ = listener.accept()
        assert_engine(tls, engine)
        assert tls.recv(4) == b"ping"
        tls.sendall(b"pong")
        assert peer.join() == b"pong"
        tls.close()
    client_ctx = ktls.ClientContext(cafile=ca_pem, offload=engine)  # type: ignore[arg-type]
    with server.listen(("127.0.0.1", 0)) as listener:
        peer = run_in_thread(lambda: listener.accept()[0])
        tls = client_ctx.connect(listener.getsockname(), server_hostname="host-03499.example.test")
        theirs = peer.join()
        tls.sendall(b"hello")
        assert theirs.recv(5) == b"hello"
        theirs.close()
        tls.close()


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_wrong_name_aborts_before_our_finished(certs: Certs, engine: str, version: str) -> None:
    """The name is checked while OpenSSL verifies the chain: with a wrong name the
    server never completes its handshake and never gets our certificate."""
    server_ctx = python_ssl_context(certs, server=True, version=version)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(certs.ca)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> str:
        raw, _ = listener.accept()
        raw.settimeout(30)
        try:
            with server_ctx.wrap_socket(raw, server_side=True) as conn:
                return f"handshake completed, client certificate {conn.getpeercert()!r}"
        except (ssl.SSLError, OSError) as exc:
            return getattr(exc, "reason", None) or str(exc)

    peer = run_in_thread(serve)
    client = ktls.ClientContext(
        cafile=certs.ca,
        certfile=certs.client,
        minimum_version=version,
        maximum_version=version,
        offload=engine,  # type: ignore[arg-type]
    )
    with pytest.raises(ktls.HandshakeError, match=r"does not match 'wrong\.example'") as info:
        client.connect(listener.getsockname(), server_hostname="wrong.example")
    assert info.value.alert is AlertDescription.BAD_CERTIFICATE
    outcome = peer.join()
    assert "BAD_CERTIFICATE" in outcome.upper(), outcome
    listener.close()


def test_no_loopback_falls_back_and_says_why(certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    """The capability probes need a loopback connection; without one, offload="auto"
    uses the software engine and says why, and offload="kernel" fails clearly."""
    real = socket.create_connection

    def unreachable(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        if address[0] in ("127.0.0.1", "::1"):
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", unreachable)
    ktls.kernel.forget_probes()
    try:
        assert "no usable loopback" in (ktls.kernel.ulp_error() or "")
        assert ktls.kernel.ulp_error() == ktls.kernel.ulp_error()  # cached
        with pytest.raises(ktls.ULPUnavailable, match="no usable loopback"):
            ktls.ClientContext(offload="kernel")._ssl_context()
        server_side, client_side = socket.socketpair()  # TLS over a Unix socket pair
        context = ktls.ServerContext(certs.server_rsa)
        peer = run_in_thread(lambda: context.wrap_socket(server_side))
        ctx = python_ssl_context(certs, server=False)
        with ctx.wrap_socket(client_side, server_hostname="localhost") as conn:
            tls = peer.join()
            assert_engine(tls, "software")
            conn.sendall(b"hi")
            assert tls.recv(2) == b"hi"
            tls.close()
    finally:
        monkeypatch.undo()
        ktls.kernel.forget_probes()


def test_software_limit_is_not_a_kernel_limit() -> None:
    """A cipher neither engine can carry is the software engine's limit, not the
    kernel's: SoftwareUnsupported, which is no KernelUnsupported."""
    assert not issubclass(ktls.SoftwareUnsupported, ktls.KernelUnsupported)
    aria = ktls.CIPHERS["ARIA-128-GCM"]
    with pytest.raises(ktls.SoftwareUnsupported, match="software engine has no ARIA"):
        ktls.protection.Sealer(ktls.ProtocolVersion.TLS1_2, aria, bytes(16), bytes(4), 0)


def test_server_identities_chosen_by_sni(certs: Certs, engine: str, tmp_path: Path) -> None:
    """ServerContext.add_identity: a client asking (SNI) for a name of the added
    certificate gets that certificate; any other name, or none, the first; the
    connection is the same ktls connection either way (engines, data)."""
    other_ca = trustme.CA()
    other = tmp_path / "other.pem"
    other_ca.issue_cert(
        "other.example", "*.wild.example"
    ).private_key_and_cert_chain_pem.write_to_path(str(other))
    context = ktls.ServerContext(certs.server_ecdsa, offload=engine)  # type: ignore[arg-type]
    assert context.add_identity(other) == ["other.example", "*.wild.example"]
    with context.listen(("127.0.0.1", 0)) as listener:
        for name, expected in [
            ("other.example", "other.example"),
            ("x.wild.example", "*.wild.example"),
            ("localhost", "localhost"),
            (None, "localhost"),
        ]:

            def serve() -> None:
                tls, _ = listener.accept()
                with tls:
                    assert_engine(tls, engine)
                    tls.sendall(b"hello")

            peer = run_in_thread(serve)
            client = ssl.create_default_context()
            client.check_hostname = False
            client.verify_mode = ssl.CERT_NONE
            with (
                socket.create_connection(listener.getsockname()) as plain,
                client.wrap_socket(plain, server_hostname=name) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
                assert tls.recv(5) == b"hello"
            peer.join()
            assert der is not None
            san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            )
            assert expected in san.value.get_values_for_type(x509.DNSName), name


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_hand_off_and_adopt_continue_the_connection(
    certs: Certs, engine: str, version: str
) -> None:
    """A handshake in one object (software engine), the socket and its hand-off value
    given to another (as ktls handshaked does between processes): data both ways,
    a KeyUpdate (TLS 1.3) and close_notify go on as if nothing happened."""
    daemon = ktls.ServerContext(certs.server_ecdsa, offload="software", alpn_protocols=["x"])
    client_ctx = ktls.ClientContext(
        cafile=certs.ca, offload="software", alpn_protocols=["x"],
        minimum_version=version, maximum_version=version,
    )  # fmt: skip
    with daemon.listen(("127.0.0.1", 0)) as listener:

        def serve() -> bytes:
            handshaken, _ = listener.accept()
            sock, session = handshaken.hand_off()
            handshaken.close()  # sends nothing: the connection is no longer its
            adopted = ktls.TLSSocket.adopt(sock, session, offload=engine)  # type: ignore[arg-type]
            with adopted:
                assert_engine(adopted, engine)
                assert adopted.selected_alpn_protocol() == "x"
                got = b""
                while chunk := adopted.recv(65536):
                    got += chunk
                    adopted.sendall(chunk)
                return got

        peer = run_in_thread(serve)
        with client_ctx.connect(listener.getsockname(), server_hostname="localhost") as tls:
            tls.sendall(b"before")
            assert tls.recv(6) == b"before"
            if version == "TLSv1.3" and rekey_expected(engine):
                tls.key_update(request_peer=True)
                tls.sendall(b"after")
                assert tls.recv(5) == b"after"
                assert tls.key_generation[1] == 1  # the adopted side answered
            tls.shutdown(socket.SHUT_WR)  # close_notify
            assert tls.recv(100) == b""  # the adopted side's close_notify
        assert peer.join().startswith(b"before")


def test_hand_off_refuses_a_connection_in_use(certs: Certs) -> None:
    """Bytes read but not returned yet can't travel with the socket: refused."""
    context = ktls.ServerContext(certs.server_ecdsa, offload="software")
    with context.listen(("127.0.0.1", 0)) as listener:

        def connect() -> None:
            client = ktls.ClientContext(cafile=certs.ca, offload="software")
            with client.connect(listener.getsockname(), server_hostname="localhost") as tls:
                tls.sendall(b"xy")
                tls.recv(1)

        peer = run_in_thread(connect)
        tls, _ = listener.accept()
        with tls:
            assert tls.recv(1) == b"x"  # "y" waits in the object
            with pytest.raises(ValueError, match="only right after the handshake"):
                tls.hand_off()
            tls.sendall(b"z")
        peer.join()
