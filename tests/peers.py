"""Real TLS peers for the tests: Python's ``ssl`` (in a thread) and ``openssl`` (a process).

Nothing here is a mock: each peer is an independent TLS implementation that checks
our records the way any server or client on the Internet would.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

OPENSSL_TLS12_NAMES = {
    "AES-128-GCM": "ECDHE-RSA-AES128-GCM-SHA256",
    "AES-256-GCM": "ECDHE-RSA-AES256-GCM-SHA384",
    "CHACHA20-POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "AES-128-CCM": "ECDHE-ECDSA-AES128-CCM",
}
OPENSSL_TLS13_NAMES = {
    "AES-128-GCM": "TLS_AES_128_GCM_SHA256",
    "AES-256-GCM": "TLS_AES_256_GCM_SHA384",
    "CHACHA20-POLY1305": "TLS_CHACHA20_POLY1305_SHA256",
    "AES-128-CCM": "TLS_AES_128_CCM_SHA256",
}


def suite_name(version: str, cipher: str) -> str:
    table = OPENSSL_TLS13_NAMES if version == "TLSv1.3" else OPENSSL_TLS12_NAMES
    return table[cipher]


@dataclass
class Certs:
    """Files made by trustme: a CA and RSA/ECDSA server and client certificates."""

    ca: Path
    server_rsa: Path
    server_ecdsa: Path
    client: Path
    other_ca: Path  # a CA nobody trusts


def python_ssl_context(
    certs: Certs, *, server: bool, version: str | None = None, cipher: str | None = None
) -> ssl.SSLContext:
    if server:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(server_cert(certs, version or "TLSv1.3", cipher))
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(certs.ca)
    if version is not None:
        tls_version = ssl.TLSVersion.TLSv1_3 if version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
        ctx.minimum_version = ctx.maximum_version = tls_version
    if cipher is not None and version == "TLSv1.2":
        ctx.set_ciphers(suite_name(version, cipher))
    # Python's ssl has no API for TLS 1.3 suites; the ktls side restricts them.
    return ctx


@dataclass
class ThreadPeer:
    """A Python-ssl peer running ``handler`` in a thread; exceptions come back on join."""

    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)
    result: list[Any] = field(default_factory=list)

    def join(self, timeout: float = 60) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("peer thread did not finish")
        if self.errors:
            raise self.errors[0]
        return self.result[0] if self.result else None


def run_in_thread(handler: Callable[[], Any]) -> ThreadPeer:
    peer = ThreadPeer(threading.Thread(target=lambda: None))

    def target() -> None:
        try:
            peer.result.append(handler())
        except BaseException as exc:
            peer.errors.append(exc)

    peer.thread = threading.Thread(target=target, daemon=True)
    peer.thread.start()
    return peer


def echo_until_close(conn: ssl.SSLSocket) -> int:
    """Echo everything back until the client's close_notify, then close cleanly."""
    total = 0
    while data := conn.recv(65536):
        conn.sendall(data)
        total += len(data)
    conn.unwrap()
    conn.close()
    return total


def hash_until_close(conn: ssl.SSLSocket) -> tuple[str, int]:
    """SHA-256 and size of everything received until the client's close_notify."""
    digest = hashlib.sha256()
    total = 0
    while data := conn.recv(1 << 16):
        digest.update(data)
        total += len(data)
    conn.unwrap()
    return digest.hexdigest(), total


@contextlib.contextmanager
def python_ssl_server(
    ctx: ssl.SSLContext, handler: Callable[[ssl.SSLSocket], Any]
) -> Iterator[tuple[tuple[str, int], ThreadPeer]]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(60)

    def serve() -> Any:
        raw, _ = listener.accept()
        raw.settimeout(60)
        with ctx.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False) as conn:
            return handler(conn)

    peer = run_in_thread(serve)
    try:
        yield listener.getsockname(), peer
    finally:
        listener.close()


class PeerProcess:
    """A peer program (``openssl s_server``/``s_client``, ``gnutls-cli``/``gnutls-serv``)
    as a subprocess, with its output collected."""

    def __init__(self, args: list[str], program: str = "openssl") -> None:
        self.args = args
        self.program = program
        self.proc = subprocess.Popen(
            [program, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._output = bytearray()
        self._errors = bytearray()
        self._lock = threading.Condition()
        self._reader = threading.Thread(
            target=self._read, args=(self.proc.stdout, self._output), daemon=True
        )
        self._reader.start()
        self._error_reader = threading.Thread(
            target=self._read, args=(self.proc.stderr, self._errors), daemon=True
        )
        self._error_reader.start()

    def _read(self, stream: Any, into: bytearray) -> None:
        while chunk := stream.read1(65536):
            with self._lock:
                into += chunk
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    @property
    def errors(self) -> bytes:
        with self._lock:
            return bytes(self._errors)

    @property
    def output(self) -> bytes:
        with self._lock:
            return bytes(self._output)

    def wait_for(
        self, pattern: bytes, timeout: float = 30, *, stderr: bool = False
    ) -> re.Match[bytes]:
        regex = re.compile(pattern)
        stream = self._errors if stderr else self._output
        with self._lock:
            ok = self._lock.wait_for(
                lambda: regex.search(stream) or not self._reader.is_alive(), timeout
            )
            match = regex.search(stream)
        if not ok or match is None:
            raise AssertionError(
                f"{self.program} {' '.join(self.args)} never printed {pattern!r}; output:\n"
                + self.output.decode(errors="replace")
                + "\nstderr:\n"
                + self.errors.decode(errors="replace")
            )
        return match

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def finish(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        self._error_reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def server_cert(certs: Certs, version: str, cipher: str | None) -> Path:
    """ECDSA for the ECDHE-ECDSA suites, RSA for the rest."""
    if cipher is not None and "ECDSA" in suite_name(version, cipher):
        return certs.server_ecdsa
    return certs.server_rsa


def openssl_version_args(version: str, cipher: str | None) -> list[str]:
    args = ["-tls1_3"] if version == "TLSv1.3" else ["-tls1_2"]
    if cipher is not None:
        name = suite_name(version, cipher)
        args += ["-ciphersuites", name] if version == "TLSv1.3" else ["-cipher", name]
    return args


@contextlib.contextmanager
def openssl_server(
    certs: Certs, version: str, cipher: str | None, *extra: str
) -> Iterator[tuple[tuple[str, int], PeerProcess]]:
    """``openssl s_server`` on a free loopback port, one connection."""
    proc = PeerProcess(
        [
            "s_server",
            "-accept",
            "127.0.0.1:0",
            "-naccept",
            "1",
            "-cert",
            str(server_cert(certs, version, cipher)),
            *openssl_version_args(version, cipher),
            *extra,
        ]
    )
    try:
        match = proc.wait_for(rb"ACCEPT 127\.0\.0\.1:(\d+)")
        yield ("127.0.0.1", int(match.group(1))), proc
    finally:
        proc.stop()


def openssl_client(
    certs: Certs, address: tuple[str, int], version: str, cipher: str | None, *extra: str
) -> PeerProcess:
    return PeerProcess(
        [
            "s_client",
            "-connect",
            f"{address[0]}:{address[1]}",
            "-servername",
            "localhost",
            "-CAfile",
            str(certs.ca),
            "-verify_return_error",
            *openssl_version_args(version, cipher),
            *extra,
        ]
    )


class TamperingRelay:
    """A TCP relay that can flip one bit in the next protected record it forwards, and
    rewrite the record version of the client's first record (its ClientHello).

    Records are parsed as they pass (5-byte headers), so the flip lands inside the
    ciphertext of a whole record of type 23, where only authentication can catch it.
    """

    def __init__(
        self, target: tuple[str, int], *, first_client_record_version: int | None = None
    ) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.target = target
        self.first_client_record_version = first_client_record_version
        self.tamper_to_client = threading.Event()
        self.tamper_to_server = threading.Event()
        self.tampered = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return host, port

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        threads = [
            threading.Thread(
                target=self._pipe,
                args=(client, server, self.tamper_to_server, self.first_client_record_version),
                daemon=True,
            ),
            threading.Thread(
                target=self._pipe, args=(server, client, self.tamper_to_client, None), daemon=True
            ),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client.close()
        server.close()

    def _pipe(
        self,
        src: socket.socket,
        dst: socket.socket,
        flag: threading.Event,
        first_version: int | None,
    ) -> None:
        buffer = bytearray()
        try:
            while data := src.recv(65536):
                buffer += data
                while len(buffer) >= 5:
                    length = int.from_bytes(buffer[3:5], "big")
                    if len(buffer) < 5 + length:
                        break
                    record = bytearray(buffer[: 5 + length])
                    del buffer[: 5 + length]
                    if first_version is not None:
                        record[1:3] = first_version.to_bytes(2, "big")
                        first_version = None
                    if flag.is_set() and record[0] == 23 and not self.tampered.is_set():
                        record[-1] ^= 0x01  # inside the AEAD tag
                        self.tampered.set()
                    dst.sendall(record)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        self._thread.join(30)


class GnuTLSServer(PeerProcess):
    """``gnutls-serv --echo`` on a free loopback port: a second TLS implementation."""

    def __init__(self, certs: Certs, *extra: str) -> None:
        with socket.socket() as probe:  # gnutls-serv cannot report a port it picked
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        super().__init__(
            [
                "--echo",
                "-p",
                str(self.port),
                "--x509certfile",
                str(certs.server_ecdsa),
                "--x509keyfile",
                str(certs.server_ecdsa),
                *extra,
            ],
            program="gnutls-serv",
        )
        self.wait_for(rb"listening on IPv4 [^\n]*done", stderr=True)  # "done": listening

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port


def io_counter(process: str, name: str) -> int:
    """One of the kernel's I/O counters of a process ("self", "thread-self" or a pid):
    rchar, wchar, syscr, syscw... (/proc/PID/io)."""
    for line in Path(f"/proc/{process}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value)
    raise AssertionError(f"no {name} in /proc/{process}/io")


def require_root(why: str) -> None:
    """Fail (never skip: some of these run on the kernel engine) where the test can't
    do what it must; `make test` runs as root, on the host and in the UML kernels."""
    if os.geteuid() != 0:
        pytest.fail(f"this test needs root ({why}); run it as `make test` does", pytrace=False)
