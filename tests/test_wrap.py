"""``ktls wrap`` as users run it: a real subprocess running real programs (``cat``,
``sh``), driven by Python's ``ssl``, ``openssl s_client``, ``gnutls-cli`` and ktls's own
client where a half-close is needed.

On the kernel engine the program gets the TLS socket itself ("direct"); on the software
engine, or with ``--relay``, a socketpair the wrapper relays ("relay").  Which one ran
is read from the wrapper's line per connection and the program's KTLS_MODE; the kernel's
side from ``/proc/net/tls_stat`` and the wrapper's own I/O counters.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

import ktls
from ktls.kernel import read_tls_stat

from .peers import Certs, io_counter, require_root

TIMEOUT = 60


@dataclass
class Wrapped:
    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)
    collector: threading.Thread | None = None

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(TIMEOUT)
        if self.collector is not None:
            self.collector.join(TIMEOUT)
        assert self.process.stderr is not None
        self.process.stderr.close()
        return status, "".join(self.lines)

    def io(self, name: str) -> int:
        return io_counter(str(self.process.pid), name)

    def wait_for_line(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            time.sleep(0.02)
        raise AssertionError(f"no line like {pattern!r} in {self.lines}")


@contextlib.contextmanager
def wrapping(certs: Certs, engine: str, *args: str) -> Iterator[Wrapped]:
    """``ktls wrap --listen 127.0.0.1:0 --cert … --offload ENGINE ARGS``."""
    argv = [sys.executable, "-m", "ktls", "wrap", "--listen", "127.0.0.1:0",
            "--cert", str(certs.server_ecdsa), "--offload", engine, *args]  # fmt: skip
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, bufsize=1)
    assert process.stderr is not None
    first = process.stderr.readline()
    found = re.search(r"listening on [\d.]+:(\d+),", first)
    if not found:
        process.kill()
        process.wait(TIMEOUT)
        process.stderr.close()
        raise AssertionError(f"ktls wrap did not start: {first}")
    wrapped = Wrapped(process, int(found.group(1)))

    def collect() -> None:
        assert process.stderr is not None
        wrapped.lines.extend(process.stderr)

    wrapped.collector = threading.Thread(target=collect, daemon=True)
    wrapped.collector.start()
    try:
        yield wrapped
    finally:
        if process.poll() is None:
            process.kill()
        wrapped.stop()


def ssl_client(certs: Certs, port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(certs.ca))
    plain = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return context.wrap_socket(plain, server_hostname="localhost")


def read_all(tls: ssl.SSLSocket | ktls.TLSSocket) -> bytes:
    data = b""
    while chunk := tls.recv(65536):
        data += chunk
    return data


def echo_through(tls: ssl.SSLSocket, payload: bytes) -> bytes:
    """Send ``payload`` 64 KiB at a time, reading each piece's echo before the next (an
    SSLSocket must not be read and written by two threads at once)."""
    echoed = bytearray()
    for start in range(0, len(payload), 1 << 16):
        tls.sendall(payload[start : start + (1 << 16)])
        while len(echoed) < min(len(payload), start + (1 << 16)):
            chunk = tls.recv(1 << 16)
            assert chunk, "the echo ended early"
            echoed += chunk
    return bytes(echoed)


def mode_of(engine: str) -> str:
    return "direct" if engine == "kernel" else "relay"


# -- programs on the connection ---------------------------------------------------------------


def test_cat_echoes_every_byte(certs: Certs, engine: str) -> None:
    """cat on the connection: 4 MiB out and back, SHA-256 checked; the wrapper's line
    names the engines and whether the program had the socket itself."""
    payload = os.urandom(4 * 1024 * 1024)
    with wrapping(certs, engine, "--", "cat") as wrapped:
        with ssl_client(certs, wrapped.port) as tls:
            echoed = echo_through(tls, payload)
            tls.unwrap()  # close_notify both ways
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        wrapped.wait_for_line(rf"tx={engine} rx={engine} {mode_of(engine)}: pid \d+")
        wrapped.wait_for_line(r"pid \d+ exited")


def test_environment_and_descriptors(certs: Certs, engine: str) -> None:
    """The program learns the connection from its environment, and inherits nothing
    but its stdin, stdout and stderr (no listening socket, no other connection)."""
    script = 'env | grep -E "^(PROTO|TCP|TLS_|KTLS_)" | sort; ls -l /proc/self/fd'
    with wrapping(certs, engine, "--alpn", "x-test", "--", "sh", "-c", script) as wrapped:
        context = ssl.create_default_context(cafile=str(certs.ca))
        context.set_alpn_protocols(["x-test"])
        plain = socket.create_connection(("127.0.0.1", wrapped.port), timeout=TIMEOUT)
        with context.wrap_socket(plain, server_hostname="localhost") as tls:
            local_port = tls.getsockname()[1]
            text = read_all(tls).decode()
    env = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert env["PROTO"] == "TCP"
    assert env["TCPREMOTEIP"] == "127.0.0.1"
    assert env["TCPREMOTEPORT"] == str(local_port)
    assert env["TCPLOCALPORT"] == str(wrapped.port)
    assert env["TLS_VERSION"] == "TLSv1.3"
    assert env["TLS_ALPN"] == "x-test"
    assert env["TLS_SNI"] == "localhost"
    assert env["KTLS_MODE"] == mode_of(engine)
    fds = re.findall(r" (\d+) -> (.*)$", text, re.MULTILINE)
    sockets = [fd for fd, target in fds if target.startswith("socket:")]
    assert sockets == ["0", "1"], text
    assert {fd for fd, _ in fds} <= {"0", "1", "2", "3"}, text  # (3: ls's own directory)


def test_finger_style_responder_with_openssl_and_gnutls(certs: Certs, engine: str) -> None:
    script = 'read name; echo "hello, $name"'
    with wrapping(certs, engine, "--", "sh", "-c", script) as wrapped:
        done = subprocess.run(
            [
                "openssl",
                "s_client",
                "-quiet",
                "-CAfile",
                str(certs.ca),
                "-verify_return_error",
                "-servername",
                "localhost",
                "-connect",
                f"127.0.0.1:{wrapped.port}",
            ],
            input=b"openssl\n",
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert b"hello, openssl\n" in done.stdout, done.stderr
        done = subprocess.run(
            [
                "gnutls-cli",
                "--x509cafile",
                str(certs.ca),
                "--port",
                str(wrapped.port),
                "localhost",
            ],
            input=b"gnutls\n",
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
        assert b"hello, gnutls\n" in done.stdout, done.stderr


def test_program_that_exits_early_ends_the_connection_cleanly(certs: Certs, engine: str) -> None:
    with wrapping(certs, engine, "--", "sh", "-c", "echo bye") as wrapped:
        with ssl_client(certs, wrapped.port) as tls:
            assert read_all(tls) == b"bye\n"  # then close_notify: a clean end
        wrapped.wait_for_line(r"pid \d+ exited 0")


def test_client_that_disconnects_early(certs: Certs, engine: str) -> None:
    """A client that goes away (no close_notify) while cat waits: cat ends (an error
    on its read), the wrapper reaps it, and keeps serving."""
    with wrapping(certs, engine, "--", "cat") as wrapped:
        tls = ssl_client(certs, wrapped.port)
        tls.sendall(b"x" * 1000)
        assert tls.recv(1000)
        tls.close()  # Python's ssl sends no close_notify on close
        wrapped.wait_for_line(r"pid \d+ exited")
        with ssl_client(certs, wrapped.port) as tls:
            tls.sendall(b"again")
            assert tls.recv(100) == b"again"


def test_many_connections_at_once(certs: Certs, engine: str) -> None:
    results: list[bool] = []

    def one(index: int) -> None:
        data = f"connection {index}\n".encode() * 100
        with ssl_client(certs, wrapped.port) as tls:
            tls.sendall(data)
            got = b""
            while len(got) < len(data):
                got += tls.recv(65536)
            results.append(got == data)

    with wrapping(certs, engine, "--max-conns", "100", "--", "cat") as wrapped:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        status, _ = wrapped.stop()
    assert results == [True] * 50
    assert status == 0


# -- end of file: direct (EIO) and relay (clean EOF) --------------------------------------------


def _half_close_exchange(certs: Certs, port: int) -> bytes:
    """ktls's client (software engine): data, then close_notify, then read to the end."""
    context = ktls.ClientContext(cafile=certs.ca, offload="software")
    with context.connect(("127.0.0.1", port), server_hostname="localhost") as tls:
        tls.sendall(b"line one\n")
        tls.shutdown(socket.SHUT_WR)
        return read_all(tls)


@pytest.mark.kernel
def test_direct_program_sees_eio_at_the_peers_close_notify(certs: Certs) -> None:
    """Documented: on the socket itself a plain read of the peer's close_notify is an
    error (EIO), not end of file; the program may still answer after it."""
    script = 'cat; echo "cat: $?"'
    with wrapping(certs, "kernel", "--", "sh", "-c", script) as wrapped:
        answer = _half_close_exchange(certs, wrapped.port)
    assert answer.startswith(b"line one\n")
    assert answer.endswith(b"cat: 1\n")


@pytest.mark.parametrize(
    ("engine", "options"),
    [
        pytest.param("kernel", ("--relay",), marks=pytest.mark.kernel, id="kernel-relay"),
        pytest.param("software", (), id="software"),
    ],
)
def test_relay_program_sees_a_clean_end_of_file(
    certs: Certs, engine: str, options: tuple[str, ...]
) -> None:
    script = 'cat; echo "cat: $?"'
    with wrapping(certs, engine, *options, "--", "sh", "-c", script) as wrapped:
        answer = _half_close_exchange(certs, wrapped.port)
        wrapped.wait_for_line(r" relay: pid \d+")
    assert answer == b"line one\ncat: 0\n"


# -- the kernel's evidence ----------------------------------------------------------------------


@pytest.mark.kernel
def test_nothing_in_the_data_path(certs: Certs) -> None:
    """16 MiB through cat and back: the kernel carries both directions (one TX and one
    RX context for the server end) and the wrapper process moves none of the bytes."""
    payload = os.urandom(16 * 1024 * 1024)
    with wrapping(certs, "kernel", "--", "cat") as wrapped:
        before = read_tls_stat()
        read, written = wrapped.io("rchar"), wrapped.io("wchar")
        with ssl_client(certs, wrapped.port) as tls:
            assert echo_through(tls, payload) == payload
            # (Before cat ends: a reaped child's I/O counts are added to its parent's.)
            moved = wrapped.io("rchar") - read + wrapped.io("wchar") - written
            tls.unwrap()
        wrapped.wait_for_line(r"pid \d+ exited")
        after = read_tls_stat()
        assert before is not None
        assert after is not None
        assert after["TlsTxSw"] - before["TlsTxSw"] == 1
        assert after["TlsRxSw"] - before["TlsRxSw"] == 1
        assert moved < 1 << 20  # of the 32 MiB that went through cat


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "127.0.0.1:0"], "no program"),
        (["--listen", "127.0.0.1:0", "--max-conns", "0", "--", "cat"], "--max-conns"),
        (["--listen", "nonsense", "--", "cat"], "want [HOST]:PORT"),
        (["--", "cat"], "give --listen"),
        (
            ["--listen", "127.0.0.1:0", "--verify-client", "required", "--", "cat"],
            "--verify-client needs --client-ca",
        ),
    ],
)
def test_bad_usage_one_line_exit_2(certs: Certs, args: list[str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ktls", "wrap", "--cert", str(certs.server_ecdsa), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 2, done
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_client_certificates(certs: Certs, engine: str) -> None:
    """--client-ca: the client's certificate subject and SHA-256 reach the program; a
    client without one is refused in the handshake."""
    script = 'echo "$TLS_PEER_SUBJECT $TLS_PEER_SHA256"'
    args = ("--client-ca", str(certs.ca), "--", "sh", "-c", script)
    with wrapping(certs, engine, *args) as wrapped:
        context = ssl.create_default_context(cafile=str(certs.ca))
        context.load_cert_chain(str(certs.client))
        plain = socket.create_connection(("127.0.0.1", wrapped.port), timeout=TIMEOUT)
        with context.wrap_socket(plain, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            text = read_all(tls).decode()
        client_pem = certs.client.read_bytes()
        client = x509.load_pem_x509_certificates(client_pem)[0]
        digest = hashlib.sha256(client.public_bytes(Encoding.DER)).hexdigest()
        assert text == f"{client.subject.rfc4514_string()} {digest}\n"
        with pytest.raises((ssl.SSLError, ConnectionError)), ssl_client(certs, wrapped.port) as tls:
            read_all(tls)


@pytest.mark.noktls
def test_without_ktls_kernel_is_refused_and_auto_relays(certs: Certs) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ktls",
            "wrap",
            "--cert",
            str(certs.server_ecdsa),
            "--listen",
            "127.0.0.1:0",
            "--offload",
            "kernel",
            "--",
            "cat",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("ktls wrap: --offload kernel: no kernel TLS here: ")
    with wrapping(certs, "auto", "--", "sh", "-c", "echo $KTLS_MODE") as wrapped:
        with ssl_client(certs, wrapped.port) as tls:
            assert read_all(tls) == b"relay\n"
        wrapped.wait_for_line(r"tx=software rx=software relay")


def test_program_runs_as_another_user(certs: Certs, engine: str) -> None:
    require_root("--user")
    script = 'echo "$(id -u) $(id -g) $(id -G)"'
    args = ("--user", "nobody", "--group", "nogroup", "--", "sh", "-c", script)
    with wrapping(certs, engine, *args) as wrapped, ssl_client(certs, wrapped.port) as tls:
        answer = read_all(tls).decode().split()
    nobody = subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True, check=True)
    assert answer[0] == nobody.stdout.strip()
    assert answer[0] != "0"
    assert "0" not in answer[2:]  # root's supplementary groups are gone


def test_systemd_socket_activation(certs: Certs, engine: str) -> None:
    """No --listen: the socket systemd passes as fd 3 (LISTEN_PID, LISTEN_FDS), and the
    program does not see those variables."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # What systemd does: the socket as fd 3, LISTEN_PID the service's own pid.
    launcher = (
        "import os, sys\n"
        "fd = int(sys.argv[1])\n"
        "os.dup2(fd, 3)\n"
        "os.close(fd)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'ktls', 'wrap', *sys.argv[2:]])\n"
    )
    program = "echo activated; env | grep -c ^LISTEN_ || true"
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            launcher,
            str(listener.fileno()),
            "--cert",
            str(certs.server_ecdsa),
            "--offload",
            engine,
            "--",
            "sh",
            "-c",
            program,
        ],
        pass_fds=[listener.fileno()],
        stderr=subprocess.PIPE,
        text=True,
    )
    listener.close()
    try:
        assert process.stderr is not None
        assert f"listening on 127.0.0.1:{port}," in process.stderr.readline()
        with ssl_client(certs, port) as tls:
            assert read_all(tls) == b"activated\n0\n"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
        assert process.stderr is not None
        process.stderr.close()


def test_max_conns_holds_back_the_next_handshake(certs: Certs, engine: str) -> None:
    """--max-conns 1: a second client waits in the backlog (no handshake) until the
    first connection's program is done."""
    with wrapping(certs, engine, "--max-conns", "1", "--", "sh", "-c", "read x; echo $x") as w:
        first = ssl_client(certs, w.port)
        second_done = threading.Event()
        answers: list[bytes] = []

        def second() -> None:
            with ssl_client(certs, w.port) as tls:
                second_done.set()
                tls.sendall(b"two\n")
                answers.append(read_all(tls))

        thread = threading.Thread(target=second)
        thread.start()
        assert not second_done.wait(1.5)  # held back
        with first:
            first.sendall(b"one\n")
            assert read_all(first) == b"one\n"
        thread.join(TIMEOUT)
        assert second_done.is_set()
        assert answers == [b"two\n"]


def test_handshake_timeout_drops_a_silent_client(certs: Certs, engine: str) -> None:
    """A client that connects and says nothing is dropped after --handshake-timeout,
    and holds up no one meanwhile."""
    with wrapping(certs, engine, "--handshake-timeout", "1", "--", "echo", "hi") as wrapped:
        silent = socket.create_connection(("127.0.0.1", wrapped.port), timeout=TIMEOUT)
        with silent:
            started = time.monotonic()
            with ssl_client(certs, wrapped.port) as tls:  # served meanwhile
                assert read_all(tls) == b"hi\n"
            silent.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert silent.recv(100) == b""
            assert time.monotonic() - started < 5
        wrapped.wait_for_line(r"handshake failed: .*timed out")
