"""The ``ktls`` command, run as a real subprocess (``python -m ktls``) against real peers.

``ktls connect`` gets ``--offload <engine>`` and the status line it prints on stderr
must name that engine for both directions.  ``ktls probe`` must tell the truth about
the kernel it runs on: the host, or a UML kernel for the ``kernel``/``noktls`` tests.

Every subprocess has a deadline, so a command that hangs is a failure, not a stuck run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import ktls
from ktls.cli import (
    EXIT_ERROR,
    EXIT_HANDSHAKE,
    EXIT_KERNEL,
    EXIT_OK,
    EXIT_PEER_ALERT,
    EXIT_PROTOCOL,
    EXIT_USAGE,
)
from ktls.suites import SUITES

from .peers import (
    Certs,
    ThreadPeer,
    echo_until_close,
    hash_until_close,
    python_ssl_context,
    python_ssl_server,
)

TIMEOUT = 60  # seconds for any one command: a bug must fail, not hang
STATUS_LINE = re.compile(
    r"^ktls: connected (?P<version>TLSv1\.[23]) (?P<cipher>\S+) "
    r"tx=(?P<tx>\w+) rx=(?P<rx>\w+)(?: alpn=(?P<alpn>\S+))?(?P<resumed> resumed)?$",
    re.MULTILINE,
)
# stdin modes: "eof" = the bytes given, then end of file; "open" = a pipe that stays
# open (nothing written, never closed) for as long as the command runs.
STDIN_MODES = ["eof", "open"]


@dataclass(repr=False)
class Result:
    args: Sequence[str]
    status: int
    stdout: bytes
    stderr: str

    def __repr__(self) -> str:  # what a failed assert shows
        return (
            f"`ktls {' '.join(self.args)}` exited {self.status}; "
            f"stderr:\n{self.stderr}\nstdout: {self.stdout[:300]!r}"
        )


def run_ktls(*args: str, stdin: bytes | None = b"") -> Result:
    """Run ``python -m ktls ARGS``; ``stdin=None`` keeps stdin open until it exits."""
    command = [sys.executable, "-m", "ktls", *args]
    if stdin is not None:
        done = subprocess.run(
            command, input=stdin, capture_output=True, timeout=TIMEOUT, check=False
        )
        return Result(args, done.returncode, done.stdout, done.stderr.decode(errors="replace"))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out, stderr=err)
        try:
            status = proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            err.seek(0)
            pytest.fail(
                f"`ktls {' '.join(args)}` was still running after {TIMEOUT} s with its stdin "
                f"open; stderr:\n{err.read().decode(errors='replace')}"
            )
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
        out.seek(0)
        err.seek(0)
        return Result(args, status, out.read(), err.read().decode(errors="replace"))


def connect_args(address: tuple[str, int], engine: str, *options: str) -> list[str]:
    host, port = address[:2]
    return ["connect", f"{host}:{port}", "--offload", engine, "--timeout", "30", *options]


def trusted(certs: Certs) -> list[str]:
    return ["--cafile", str(certs.ca)]


def status_line(result: Result, engine: str) -> re.Match[str]:
    """The ``ktls: connected ...`` line; both directions ran on ``engine``."""
    match = STATUS_LINE.search(result.stderr)
    assert match is not None, f"no status line: {result}"
    assert (match["tx"], match["rx"]) == (engine, engine), (
        f"expected tx={engine} rx={engine}: {match[0]}"
    )
    return match


def peer_outcome(peer: ThreadPeer) -> str:
    """What the Python server saw: its handler's result, or the error that ended it."""
    try:
        return str(peer.join())
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


def read_until_error(conn: ssl.SSLSocket) -> str:
    """Read until the client's alert (or end of stream) shows up."""
    try:
        while conn.recv(1 << 16):
            pass
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "clean end of stream"


def one_line(text: str) -> str:
    """Text with its whitespace squeezed: rich wraps long lines to the terminal width."""
    return " ".join(text.split())


# -- connect: data both ways, clean close --------------------------------------------------


def test_connect_echo_and_close_notify(certs: Certs, engine: str) -> None:
    payload = os.urandom(300_000)
    server_ctx = python_ssl_context(certs, server=True)
    with python_ssl_server(server_ctx, echo_until_close) as (address, peer):
        result = run_ktls(*connect_args(address, engine, *trusted(certs)), stdin=payload)
        # echo_until_close reads to our close_notify (a bare TCP FIN would raise
        # SSLEOFError: the server context has suppress_ragged_eofs=False), then unwraps.
        assert peer.join() == len(payload)
    assert result.status == EXIT_OK, result
    assert result.stdout == payload
    match = status_line(result, engine)
    assert match["version"] == "TLSv1.3"
    assert match["cipher"] in {s.openssl_name for s in SUITES}
    assert match["alpn"] is None
    assert f"TLSv1.3 {match['cipher']} tx={engine} rx={engine}" in match[0]


def test_connect_server_closes_first(certs: Certs, engine: str) -> None:
    """The server's close_notify ends the command, even while stdin is still open."""

    def greet_and_close(conn: ssl.SSLSocket) -> str:
        conn.sendall(b"hello from the server\n")
        conn.unwrap()  # close_notify, then waits for the client's
        return "clean"

    server_ctx = python_ssl_context(certs, server=True)
    with python_ssl_server(server_ctx, greet_and_close) as (address, peer):
        result = run_ktls(*connect_args(address, engine, *trusted(certs)), stdin=None)
        assert peer_outcome(peer) == "clean"
    assert result.status == EXIT_OK, result
    assert result.stdout == b"hello from the server\n"
    status_line(result, engine)


# -- connect: versions, suites, ALPN -------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "version", "cipher"),
    [
        pytest.param(["--tls1.2"], "TLSv1.2", None, id="tls1.2"),
        pytest.param(
            ["--tls1.2", "--cipher", "ECDHE-RSA-AES256-GCM-SHA384"],
            "TLSv1.2",
            "ECDHE-RSA-AES256-GCM-SHA384",
            id="tls1.2-aes256",
        ),
        pytest.param(
            # An IANA name works too; the status line gives OpenSSL's.
            ["--cipher", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"],
            "TLSv1.2",
            "ECDHE-RSA-CHACHA20-POLY1305",
            id="tls1.2-chacha-iana",
        ),
        pytest.param(
            ["--tls1.3", "--cipher", "TLS_CHACHA20_POLY1305_SHA256"],
            "TLSv1.3",
            "TLS_CHACHA20_POLY1305_SHA256",
            id="tls1.3-chacha",
        ),
        pytest.param(
            ["--tls1.3", "--cipher", "TLS_AES_128_GCM_SHA256"],
            "TLSv1.3",
            "TLS_AES_128_GCM_SHA256",
            id="tls1.3-aes128",
        ),
    ],
)
def test_connect_version_and_cipher(
    certs: Certs, engine: str, options: list[str], version: str, cipher: str | None
) -> None:
    server_ctx = python_ssl_context(certs, server=True)  # offers TLS 1.2 and 1.3, all suites

    def serve(conn: ssl.SSLSocket) -> tuple[str | None, str | None, int]:
        suite = conn.cipher()
        return conn.version(), suite[0] if suite else None, echo_until_close(conn)

    with python_ssl_server(server_ctx, serve) as (address, peer):
        result = run_ktls(*connect_args(address, engine, *trusted(certs), *options), stdin=b"x")
        server_version, server_cipher, echoed = peer.join()
    assert result.status == EXIT_OK, result
    assert result.stdout == b"x"
    match = status_line(result, engine)
    assert match["version"] == version == server_version
    assert match["cipher"] == server_cipher
    if cipher is not None:
        assert match["cipher"] == cipher
    assert echoed == 1


def test_connect_alpn(certs: Certs, engine: str) -> None:
    server_ctx = python_ssl_context(certs, server=True)
    server_ctx.set_alpn_protocols(["http/1.1"])

    def serve(conn: ssl.SSLSocket) -> tuple[str | None, int]:
        return conn.selected_alpn_protocol(), echo_until_close(conn)

    with python_ssl_server(server_ctx, serve) as (address, peer):
        options = [*trusted(certs), "--alpn", "h2", "--alpn", "http/1.1"]
        result = run_ktls(*connect_args(address, engine, *options), stdin=b"GET\n")
        assert peer.join() == ("http/1.1", 4)
    assert result.status == EXIT_OK, result
    assert result.stdout == b"GET\n"
    assert status_line(result, engine)["alpn"] == "http/1.1"


# -- connect --sendfile --------------------------------------------------------------------


def test_connect_sendfile(certs: Certs, engine: str, tmp_path: Path) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()

    server_ctx = python_ssl_context(certs, server=True)
    with python_ssl_server(server_ctx, hash_until_close) as (address, peer):
        options = [*trusted(certs), "--sendfile", str(path)]
        result = run_ktls(*connect_args(address, engine, *options), stdin=None)
        assert peer.join() == (expected, path.stat().st_size)
    assert result.status == EXIT_OK, result
    assert result.stdout == b""
    status_line(result, engine)


# -- connect: certificate verification -----------------------------------------------------


def test_connect_unknown_ca_fails(certs: Certs, engine: str) -> None:
    # No --cafile: the system's trust store, which has never heard of the trustme CA.
    server_ctx = python_ssl_context(certs, server=True)
    with python_ssl_server(server_ctx, read_until_error) as (address, peer):
        result = run_ktls(*connect_args(address, engine))
        outcome = peer_outcome(peer)
    assert result.status == EXIT_HANDSHAKE, result
    assert "certificate verify failed" in result.stderr, result
    assert "unknown CA" in result.stderr, result
    assert STATUS_LINE.search(result.stderr) is None
    assert result.stdout == b""
    assert "UNKNOWN_CA" in outcome.upper(), outcome  # we told the server why


def test_connect_insecure(certs: Certs, engine: str) -> None:
    server_ctx = python_ssl_context(certs, server=True)
    with python_ssl_server(server_ctx, echo_until_close) as (address, peer):
        result = run_ktls(*connect_args(address, engine, "--insecure"), stdin=b"trust me")
        assert peer.join() == 8
    assert result.status == EXIT_OK, result
    assert result.stdout == b"trust me"
    status_line(result, engine)


def test_connect_hostname_mismatch(certs: Certs, engine: str) -> None:
    server_ctx = python_ssl_context(certs, server=True)
    with python_ssl_server(server_ctx, read_until_error) as (address, peer):
        options = [*trusted(certs), "--sni", "other.example"]
        result = run_ktls(*connect_args(address, engine, *options), stdin=b"never sent")
        outcome = peer_outcome(peer)
    assert result.status == EXIT_HANDSHAKE, result
    assert "'other.example'" in result.stderr, result
    assert "does not match" in result.stderr, result
    assert STATUS_LINE.search(result.stderr) is None
    assert result.stdout == b""
    assert "BAD_CERTIFICATE" in outcome.upper(), outcome


# -- connect: the peer ends the connection -------------------------------------------------


def _client_cert_required(certs: Certs, version: str) -> ssl.SSLContext:
    ctx = python_ssl_context(certs, server=True, version=version)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(certs.ca)
    return ctx


def _no_data_expected(conn: ssl.SSLSocket) -> str:
    return "the handshake succeeded without a client certificate"


@pytest.mark.parametrize("stdin", STDIN_MODES)
def test_connect_alert_after_handshake(certs: Certs, engine: str, stdin: str) -> None:
    # TLS 1.3: the client's handshake is over before the server reads its (empty)
    # Certificate; the server's certificate_required alert comes as a record afterwards.
    server_ctx = _client_cert_required(certs, "TLSv1.3")
    with python_ssl_server(server_ctx, _no_data_expected) as (address, peer):
        result = run_ktls(
            *connect_args(address, engine, *trusted(certs)),
            stdin=b"" if stdin == "eof" else None,
        )
        outcome = peer_outcome(peer)
    assert result.status == EXIT_PEER_ALERT, result
    assert "certificate_required" in result.stderr, result
    match = status_line(result, engine)
    assert match["version"] == "TLSv1.3"
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in outcome, outcome


def test_connect_alert_during_tls12_handshake(certs: Certs, engine: str) -> None:
    # TLS 1.2: the server's alert ends the handshake itself.
    server_ctx = _client_cert_required(certs, "TLSv1.2")
    with python_ssl_server(server_ctx, _no_data_expected) as (address, peer):
        result = run_ktls(*connect_args(address, engine, *trusted(certs)))
        outcome = peer_outcome(peer)
    assert result.status == EXIT_HANDSHAKE, result
    assert "the peer sent alert handshake_failure" in result.stderr, result
    assert STATUS_LINE.search(result.stderr) is None
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in outcome, outcome


# How the server's cut meets the client's close_notify: "idle", the client (stdin open)
# has nothing to say; "unanswered", the client's close_notify comes first and the server
# closes TCP instead of answering it; "racing", the client's close_notify (stdin is empty)
# crosses the cut, reaches a closed socket and draws an RST after the FIN.
TRUNCATIONS = ["idle", "unanswered", "racing"]


@pytest.mark.parametrize("how", TRUNCATIONS)
def test_connect_truncated_stream(certs: Certs, engine: str, how: str) -> None:
    def cut(conn: ssl.SSLSocket) -> None:
        conn.sendall(b"partial")
        if how == "unanswered":
            assert conn.recv(100) == b""  # the client's close_notify
        raw = socket.socket(fileno=os.dup(conn.fileno()))
        raw.shutdown(socket.SHUT_RDWR)  # TCP FIN, no close_notify
        raw.close()

    server_ctx = python_ssl_context(certs, server=True)
    with python_ssl_server(server_ctx, cut) as (address, peer):
        result = run_ktls(
            *connect_args(address, engine, *trusted(certs)),
            stdin=None if how == "idle" else b"",
        )
        peer.join()
    assert result.status == EXIT_PROTOCOL, result
    assert "closed without close_notify" in result.stderr, result
    assert result.stdout == b"partial"
    status_line(result, engine)


def test_connect_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        address = placeholder.getsockname()
    result = run_ktls(*connect_args(address, "software", "--insecure"))
    assert result.status == EXIT_ERROR, result
    assert f"cannot connect to 127.0.0.1:{address[1]}" in result.stderr, result


# -- usage errors --------------------------------------------------------------------------


def test_usage_unknown_cipher() -> None:
    result = run_ktls("connect", "127.0.0.1:9", "--cipher", "NOT-A-CIPHER")
    assert result.status == EXIT_USAGE, result
    assert "'NOT-A-CIPHER'" in result.stderr, result
    listed = result.stderr.split("choose from:", 1)[1]
    for suite in SUITES:
        assert suite.openssl_name in listed, result


def test_usage_bad_address() -> None:
    result = run_ktls("connect", "nohostport")
    assert result.status == EXIT_USAGE, result
    assert result.stderr.startswith("usage: ktls connect"), result
    assert "expected HOST:PORT, got 'nohostport'" in result.stderr, result


def test_usage_missing_sendfile() -> None:
    result = run_ktls("connect", "127.0.0.1:9", "--sendfile", "/nonexistent")
    assert result.status == EXIT_USAGE, result
    assert "/nonexistent" in result.stderr, result
    assert "no such file" in result.stderr, result


# -- probe ---------------------------------------------------------------------------------

PROBE_KEYS = {"kernel", "ulp", "ciphers", "rekey", "zerocopy_sendfile", "rx_expect_no_pad"}


def _probe_json() -> dict[str, Any]:
    result = run_ktls("probe", "--json")
    assert result.status == EXIT_OK, result
    data: dict[str, Any] = json.loads(result.stdout)
    assert PROBE_KEYS | {"tls_stat"} <= data.keys(), data
    return data


def test_probe_tells_the_truth() -> None:
    caps = ktls.capabilities()
    result = run_ktls("probe")
    assert result.status == EXIT_OK, result
    text = one_line(result.stdout.decode())
    assert f"kernel {os.uname().release}" in text
    if caps.ulp:
        assert "TLS ULP: available" in text
    else:
        assert "TLS ULP: unavailable" in text
        assert one_line(caps.ulp_error or "") in text
        assert "software engine" in text


def _raw_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def _raw_install(sock: socket.socket, direction: int, version: int, cipher: ktls.Cipher) -> bool:
    """Keys of zeros, packed by hand from linux/tls.h (not with ktls.linux)."""
    iv = bytes(cipher.iv_len)
    info = struct.pack("=HH", version, cipher.kernel_type) + iv + bytes(cipher.key_len)
    info += bytes(cipher.salt_len) + bytes(8)
    try:
        sock.setsockopt(282, direction, info)  # SOL_TLS, TLS_TX=1 / TLS_RX=2
    except OSError:
        return False
    return True


def _raw_evidence() -> dict[str, Any]:
    """What this kernel accepts, found with plain setsockopt calls, independently of
    the code under test: the ULP, three ciphers both ways, and TLS 1.3 rekey."""
    client, server = _raw_pair()
    with client, server:
        try:
            client.setsockopt(socket.SOL_TCP, 31, b"tls")  # TCP_ULP
        except OSError:
            return {"ulp": False}
    evidence: dict[str, Any] = {"ulp": True, "ciphers": {}}
    for name in ("AES-128-GCM", "AES-256-GCM", "CHACHA20-POLY1305"):
        for label, version in (("TLSv1.2", 0x0303), ("TLSv1.3", 0x0304)):
            client, server = _raw_pair()
            with client, server:
                for sock in (client, server):
                    sock.setsockopt(socket.SOL_TCP, 31, b"tls")
                cipher = ktls.CIPHERS[name]
                evidence["ciphers"][(name, label, "tx")] = _raw_install(client, 1, version, cipher)
                evidence["ciphers"][(name, label, "rx")] = _raw_install(server, 2, version, cipher)
    client, server = _raw_pair()
    with client, server:
        client.setsockopt(socket.SOL_TCP, 31, b"tls")
        cipher = ktls.CIPHERS["AES-128-GCM"]
        evidence["rekey"] = _raw_install(client, 1, 0x0304, cipher) and _raw_install(
            client, 1, 0x0304, cipher
        )
    return evidence


def test_probe_json_tells_the_truth() -> None:
    data = _probe_json()
    evidence = _raw_evidence()
    assert data["kernel"] == os.uname().release
    assert data["ulp"] is evidence["ulp"]
    assert (data["tls_stat"] is None) is (not Path("/proc/net/tls_stat").exists())
    if not evidence["ulp"]:
        assert data["ulp_error"]
        return
    reported = {(c["cipher"], c["version"], c["direction"]): c["accepted"] for c in data["ciphers"]}
    for key, accepted in evidence["ciphers"].items():
        assert reported[key] is accepted, key
    assert all(c["accepted"] is (c["error"] is None) for c in data["ciphers"])
    assert data["rekey"] is evidence["rekey"]


def _release_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    assert found is not None
    return (int(found[1]), int(found[2])) >= (major, minor)


@pytest.mark.kernel
def test_probe_json_in_a_ktls_kernel() -> None:
    data = _probe_json()
    assert data["ulp"] is True
    assert data["ulp_error"] is None
    accepted = {
        (c["cipher"], c["version"], c["direction"]) for c in data["ciphers"] if c["accepted"]
    }
    for cipher in ("AES-128-GCM", "AES-256-GCM", "CHACHA20-POLY1305"):
        for version in ("TLSv1.2", "TLSv1.3"):
            for direction in ("tx", "rx"):
                assert (cipher, version, direction) in accepted, data["ciphers"]
    assert isinstance(data["tls_stat"], dict)
    assert "TlsCurrTxSw" in data["tls_stat"], data["tls_stat"]
    assert data["rekey"] is _release_at_least(6, 14), data["rekey_error"]
    text = one_line(run_ktls("probe").stdout.decode())
    assert "TLS ULP: available" in text


# -- a kernel without the TLS ULP ----------------------------------------------------------


@pytest.mark.noktls
def test_connect_without_ktls(certs: Certs) -> None:
    assert not ktls.capabilities().ulp, "noktls tests need a kernel without the TLS ULP"
    with socket.create_server(("127.0.0.1", 0)) as plain_tcp:  # never reached by TLS
        result = run_ktls(*connect_args(plain_tcp.getsockname(), "kernel", *trusted(certs)))
    assert result.status == EXIT_KERNEL, result
    assert "kernel TLS" in result.stderr, result
    assert STATUS_LINE.search(result.stderr) is None

    server_ctx = python_ssl_context(certs, server=True)
    with python_ssl_server(server_ctx, echo_until_close) as (address, peer):
        result = run_ktls(*connect_args(address, "auto", *trusted(certs)), stdin=b"fallback")
        assert peer.join() == 8
    assert result.status == EXIT_OK, result
    assert result.stdout == b"fallback"
    status_line(result, "software")

    probe = one_line(run_ktls("probe").stdout.decode())
    assert "TLS ULP: unavailable" in probe
    assert "software engine" in probe


def test_software_limit_is_not_reported_as_the_kernel(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 6 means "the kernel can't"; a cipher the software engine lacks is exit 1."""
    from ktls import cli  # noqa: PLC0415

    def refuse(*args: object, **kwargs: object) -> None:
        raise ktls.SoftwareUnsupported("the software engine has no ARIA-128-GCM")

    monkeypatch.setattr(ktls.ClientContext, "connect", refuse)
    status = cli.main(["connect", "127.0.0.1:9", "--insecure"])
    assert status == EXIT_ERROR
    assert "software engine has no ARIA-128-GCM" in capsys.readouterr().err
