"""The contenders, each a real server process started for one measurement and stopped
after it: ``ktls serve``, nginx with and without kernel TLS, and Python's http.server.

Each runs one worker, in a session (process group) of its own, on a fresh loopback
port, with the same certificate and the same directory of files.  A server is up when
an HTTPS request through Python's ``ssl`` (TLS 1.3, TLS_AES_128_GCM_SHA256, the
certificate verified) returns the bytes of the file asked for.  Its CPU time is that of
its whole process group, from ``/proc/PID/stat``.  Stopping sends SIGTERM, waits, then
kills whatever of the group is left: no server outlives its measurement.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.core import endpoints
from bench.cpu import Cpu

ServerName = Literal["ktls", "nginx-ktls", "nginx", "http.server"]

STARTUP_SECONDS = 60.0  # UML takes seconds to start a Python server
STOP_SECONDS = 10.0
HTTP_SERVER = Path(__file__).with_name("http_server.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")  # nginx's home, often not on PATH
_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\n.*?-----END \1-----\n?", re.DOTALL)


class NotInstalled(RuntimeError):
    """A program the suite needs is not installed (Debian packages: the Makefile's DEBS)."""


def find_program(name: str, package: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN])
    found = shutil.which(name, path=path)
    if found is None:
        raise NotInstalled(f"{name} is not installed (Debian package {package}; `make system`)")
    return found


def ktls_program() -> Path:
    """The ``ktls`` command of the environment running the bench."""
    return Path(sys.executable).with_name("ktls")


@functools.cache
def ktls_serve_missing() -> str | None:
    """Why ``ktls serve`` can't be measured here (it does not exist yet...), or None."""
    try:
        done = subprocess.run(
            [ktls_program(), "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=STARTUP_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ktls serve --help`: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"`ktls serve --help` exited {done.returncode}: {last}"
    return None


# -- what every server is given ---------------------------------------------------------


@dataclass(frozen=True)
class Site:
    base: Path  # the suite's private directory: configs, logs, files
    cert: Path  # certificate chain, PEM
    key: Path  # private key, PEM
    www: Path  # the directory served


@functools.cache
def site() -> Site:
    """The core suite's certificate (ECDSA P-256, trustme), split into the chain and the key
    that servers take as two files, and a world-readable directory: nginx's worker process
    runs as ``nobody`` when nginx is started by root."""
    base = Path(tempfile.mkdtemp(prefix="ktls-bench-serve-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)  # the files are large
    base.chmod(0o755)
    blocks = [(m[1], m[0]) for m in _PEM.finditer(endpoints.certs().server.read_text())]
    chain = [text for kind, text in blocks if kind == "CERTIFICATE"]
    keys = [text for kind, text in blocks if kind.endswith("PRIVATE KEY")]
    if not chain or len(keys) != 1:
        raise RuntimeError(f"{endpoints.certs().server}: expected certificates and one key")
    cert, key = base / "cert.pem", base / "key.pem"
    cert.write_text("".join(chain))
    key.write_text(keys[0])
    www = base / "www"
    www.mkdir()
    www.chmod(0o755)
    return Site(base=base, cert=cert, key=key, www=www)


@functools.cache
def data_file(size: int) -> Path:
    """A file of ``size`` random bytes in the served directory (written once per process)."""
    path = site().www / f"{size}.bin"
    path.write_bytes(os.urandom(size))
    path.chmod(0o644)
    return path


@functools.cache
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- how each one is started ------------------------------------------------------------

# Everything not named keeps nginx's default, the same for both nginx paths; only the
# ssl_conf_command line differs.  nginx 1.22 (Debian 12) still defaults to TLS <= 1.2.
NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 1000000;
    client_body_temp_path {run}/client_body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
        {ktls}
        root {www};
    }}
}}
"""
# Debian 12's nginx 1.22.1 with its OpenSSL 3.0 (built with kTLS) does take this up in
# UML 7.2: each connection adds one to TlsTxSw, and nginx's debug log shows
# "BIO_get_ktls_send(): 1" then "SSL_sendfile: 2097152" per chunk.  Send side only:
# OpenSSL 3.0 has no TLS 1.3 receive offload (TlsRxSw stays put).
NGINX_KTLS = "ssl_conf_command Options KTLS;"


def _command(name: ServerName, port: int, run: Path) -> list[str]:
    s = site()
    if name == "ktls":
        return [
            *(str(ktls_program()), "serve", str(s.www)),
            *("--bind", "127.0.0.1", "--port", str(port)),
            *("--cert", str(s.cert), "--key", str(s.key)),
            *("--workers", "1", "--quiet", "--offload", "kernel"),
        ]
    if name == "http.server":
        return [
            *(sys.executable, str(HTTP_SERVER), str(s.www)),
            *("--bind", "127.0.0.1", "--port", str(port)),
            *("--cert", str(s.cert), "--key", str(s.key)),
        ]
    nginx = find_program("nginx", "nginx")
    conf = run / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            run=run,
            port=port,
            cert=s.cert,
            key=s.key,
            www=s.www,
            ktls=NGINX_KTLS if name == "nginx-ktls" else "# kernel TLS off (OpenSSL's default)",
        )
    )
    return [nginx, "-p", str(run), "-c", str(conf), "-e", str(run / "error.log")]


# -- a running server -------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    status: int
    sha256: str
    size: int
    version: str | None
    cipher: str | None


def fetch(port: int, name: str, timeout: float) -> Fetched:
    """GET /name over Python's ssl, restricted to what the bench's wrk offers: TLS 1.3,
    TLS_AES_128_GCM_SHA256, checked after the handshake."""
    digest, size = hashlib.sha256(), 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        context = endpoints.ssl_context("client")
        with context.wrap_socket(raw, server_hostname=endpoints.HOSTNAME) as tls:
            endpoints.check(tls, "ssl")
            request = f"GET /{name} HTTP/1.1\r\nHost: {endpoints.HOSTNAME}\r\n\r\n"
            tls.sendall(request.encode())
            response = http.client.HTTPResponse(tls, method="GET")
            response.begin()
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            cipher = tls.cipher()
            return Fetched(
                response.status,
                digest.hexdigest(),
                size,
                tls.version(),
                None if cipher is None else cipher[0],
            )


def _group_members(pgid: int) -> dict[int, tuple[int, int]]:
    """pid -> (user, system) clock ticks, each including its reaped children's, of every
    live (not zombie) process in process group ``pgid``."""
    members = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # proc_pid_stat(5): "pid (comm) state ppid pgrp ... utime stime cutime cstime"
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) != pgid or fields[0] == "Z":
            continue
        ticks = [int(f) for f in fields[11:15]]
        members[int(entry.name)] = (ticks[0] + ticks[2], ticks[1] + ticks[3])
    return members


class Server:
    """One started server process (and its workers: its process group)."""

    def __init__(self, name: ServerName, run: Path) -> None:
        self.name = name
        self.run = run
        self.port = free_port()
        self.command = _command(name, self.port, run)
        self.log = run / "server.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=run,
                start_new_session=True,  # its own process group: its workers are found by it
            )
        self.handshake: tuple[str | None, str | None] = (None, None)

    def cpu(self) -> Cpu:
        """CPU time of the server's process group so far (user, system)."""
        members = _group_members(self.process.pid).values()
        return Cpu(
            sum(user for user, _ in members) / CLK_TCK,
            sum(system for _, system in members) / CLK_TCK,
        )

    def logs(self) -> str:
        """The tail of what the server wrote (its output, and nginx's error log)."""
        texts = []
        for path in (self.log, self.run / "error.log"):
            with suppress(OSError):
                if text := path.read_text(errors="replace").strip():
                    texts.append(f"{path.name}: " + "\n".join(text.splitlines()[-10:]))
        return "\n".join(texts)

    def wait_ready(self, probe: Path) -> None:
        """Until ``probe`` comes back whole: the server is up and speaks TLS 1.3."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.process.returncode} before serving"
                )
            try:
                self.verify(probe)
                return
            except OSError as exc:  # refused, reset, TLS failure: not up yet, or never
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not serve in time: {exc}") from exc
                time.sleep(0.05)

    def verify(self, path: Path) -> None:
        """Fetch ``path`` once and compare it byte for byte (by SHA-256)."""
        got = fetch(self.port, path.name, STARTUP_SECONDS)
        if got.status != 200 or got.sha256 != sha256(path):
            raise RuntimeError(
                f"{self.name}: GET /{path.name} gave status {got.status} and {got.size} "
                f"bytes that are not the file's {path.stat().st_size}"
            )
        self.handshake = (got.version, got.cipher)

    def stop(self) -> None:
        """SIGTERM; SIGKILL for the whole group if it is not gone in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # A worker may outlive its parent for a moment; one that stays is killed, by pid.
        deadline = time.monotonic() + STOP_SECONDS
        while (left := _group_members(self.process.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in left:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextmanager
def running(name: ServerName, probe: Path) -> Iterator[Server]:
    """A server of kind ``name``, up (``probe`` fetched whole), stopped on exit.

    A failure inside carries the tail of the server's own log."""
    run = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=site().base))
    run.chmod(0o755)
    try:
        server = Server(name, run)
        try:
            server.wait_ready(probe)
            yield server
        except Exception as exc:
            server.stop()
            if logs := server.logs():
                raise RuntimeError(f"{exc}\n{logs}") from exc
            raise
        finally:
            server.stop()
    finally:
        shutil.rmtree(run, ignore_errors=True)
