"""``ktls handshaked`` with real worker processes (tests/handshaked_worker.py) that run
as another, unprivileged user: they serve HTTPS to curl and keep connections through
daemon restarts and each other's deaths, and can't read the key the daemon used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ktls import asyncio as kasyncio
from ktls.handshaked import codec
from ktls.handshaked.worker import Worker

from .peers import Certs, require_root

TIMEOUT = 60
WORKER = Path(__file__).with_name("handshaked_worker.py")


@dataclass
class Proc:
    """A subprocess whose output lines are collected."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, argv: list[str]) -> Proc:
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        proc = cls(process)
        threading.Thread(target=proc._collect, daemon=True).start()
        return proc

    def _collect(self) -> None:
        assert self.process.stdout is not None
        self.lines.extend(self.process.stdout)

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if found := re.search(pattern, line):
                    return found
            if self.process.poll() is not None and not any(
                re.search(pattern, line) for line in self.lines
            ):
                time.sleep(0.1)  # (the collector may still be reading)
                if not any(re.search(pattern, line) for line in self.lines):
                    break
            time.sleep(0.02)
        raise AssertionError(f"no line like {pattern!r} in {self.lines}")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        status = self.process.wait(TIMEOUT)
        if self.process.stdout is not None:
            time.sleep(0.05)
            self.process.stdout.close()
        return status


@dataclass
class Setup:
    base: Path
    key: Path
    control: Path
    daemon: Proc
    port: int
    workers: list[Proc]

    def worker(self, name: str, engine: str, user: str | None = "nobody") -> Proc:
        argv = [sys.executable, str(WORKER), str(self.control), name, engine, str(self.key)]
        proc = Proc.start(argv + ([user] if user else []))
        self.workers.append(proc)
        return proc


@contextlib.contextmanager
def handshaked(certs: Certs, *extra: str) -> Iterator[Setup]:
    """The daemon, its key a root-only copy (mode 0600), its control socket world-
    connectable (mode 666) so that SO_PEERCRED alone decides who may be a worker."""
    base = Path(tempfile.mkdtemp(prefix="ktls-handshaked-"))
    base.chmod(0o755)  # (pytest's own directories are 0700: nobody could reach in)
    key = base / "key.pem"
    shutil.copyfile(certs.server_ecdsa, key)
    key.chmod(0o600)
    control = base / "control.sock"
    argv = [sys.executable, "-m", "ktls", "handshaked", "--listen", "127.0.0.1:0", "--cert",
            str(key), "--socket", str(control), "--socket-mode", "666", *extra]  # fmt: skip
    daemon = Proc.start(argv)
    found = daemon.wait_for(r"listening on [\d.]+:(\d+),")
    setup = Setup(base, key, control, daemon, int(found.group(1)), [])
    try:
        yield setup
    finally:
        for proc in [*setup.workers, daemon]:
            if proc.process.poll() is None:
                proc.process.kill()
            proc.stop()
        shutil.rmtree(base, ignore_errors=True)


def curl(certs: Certs, port: int) -> str:
    done = subprocess.run(
        ["curl", "-sS", "--cacert", str(certs.ca), f"https://localhost:{port}/"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def echo_client(certs: Certs, port: int) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(certs.ca))
    plain = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return context.wrap_socket(plain, server_hostname="localhost")


def _ended(tls: ssl.SSLSocket) -> bool:
    """Whether the connection is gone: a reset, or an end without an answer."""
    try:
        tls.sendall(b"more")
        return not tls.recv(100)
    except (OSError, ssl.SSLError):
        return True


def test_unprivileged_workers_serve_https_without_the_key(certs: Certs, engine: str) -> None:
    require_root("workers of another uid")
    with handshaked(certs, "--allow-uid", "nobody") as setup:
        one, two = setup.worker("one", engine), setup.worker("two", engine)
        for worker in (one, two):
            worker.wait_for(r"key not readable")
            worker.wait_for(r"registered")
        setup.daemon.wait_for(r"worker 'two' .* registered")
        setup.daemon.wait_for(r"worker 'one' .* registered")
        answers = [curl(certs, setup.port) for _ in range(6)]
    nobody = subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True, check=True)
    for answer in answers:
        assert re.fullmatch(
            rf"(one|two) uid={nobody.stdout.strip()} tx={engine} rx={engine} TLSv1\.3\n", answer
        ), answer
    assert {answer.split()[0] for answer in answers} == {"one", "two"}  # spread over both


def test_worker_not_on_the_allowed_list_is_refused(certs: Certs) -> None:
    require_root("workers of another uid")
    with handshaked(certs) as setup:  # only root (and the daemon's user) may
        stranger = setup.worker("stranger", "software", user="nobody")
        stranger.wait_for(r"not registered: .* refused this worker")
        assert stranger.process.wait(TIMEOUT) == 3
        setup.daemon.wait_for(r"refused a worker: pid \d+ uid \d+")


def test_dead_worker_loses_only_its_connections(certs: Certs, engine: str) -> None:
    with handshaked(certs) as setup:
        one = setup.worker("one", engine, user=None)
        one.wait_for("registered")
        held = echo_client(certs, setup.port)
        held.sendall(b"hi")
        assert held.recv(100).startswith(b"one ")
        two = setup.worker("two", engine, user=None)
        two.wait_for("registered")
        setup.daemon.wait_for("worker 'two'.*registered")
        one.stop(signal.SIGKILL)
        assert _ended(held)
        held.close()
        setup.daemon.wait_for(r"worker 'one' .* went away: dropped")
        for _ in range(3):
            assert curl(certs, setup.port).startswith("two ")


def test_connections_survive_a_daemon_restart(certs: Certs, engine: str) -> None:
    with handshaked(certs) as setup:
        worker = setup.worker("one", engine, user=None)
        worker.wait_for("registered")
        with echo_client(certs, setup.port) as tls:
            tls.sendall(b"before")
            assert tls.recv(100).endswith(b"before")
            assert setup.daemon.stop() == 0
            worker.wait_for("the daemon went away")
            tls.sendall(b"after")  # the connection lives in the worker alone
            assert tls.recv(100) == b"after"


def test_hostile_messages_on_the_control_socket(certs: Certs, engine: str) -> None:
    """Garbage instead of HELLO, or anything after it: that control connection is
    dropped; the daemon and its real workers go on."""
    with handshaked(certs) as setup:
        worker = setup.worker("real", engine, user=None)
        worker.wait_for("registered")
        for garbage in (b"", b"GET / HTTP/1.1\r\n\r\n", b"KTLH\x01\x03\x02\x00\x02\x03\x04",
                        b"KTLH\x01\x01\x01\xff\xff", os.urandom(3000)):  # fmt: skip
            hostile = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            hostile.connect(str(setup.control))
            if garbage:
                hostile.sendall(garbage)
            else:
                hostile.shutdown(socket.SHUT_WR)
            hostile.settimeout(TIMEOUT)
            assert hostile.recv(100) == b""  # dropped, nothing said
            hostile.close()
        hostile = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        hostile.connect(str(setup.control))
        hostile.sendall(codec.encode(codec.Hello("late garbage")))
        assert isinstance(codec.decode(hostile.recv(codec.MAX_MESSAGE)), codec.Welcome)
        hostile.sendall(b"\x00" * 10)
        setup.daemon.wait_for(r"'late garbage' .* sent a message after HELLO: dropped")
        hostile.close()
        for _ in range(3):
            assert curl(certs, setup.port).startswith("real ")
        assert setup.daemon.process.poll() is None


def test_asyncio_worker(certs: Certs, engine: str) -> None:
    """Worker.accept_async and ktls.asyncio.adopt_streams: the same connection on an
    event loop, answering curl."""

    async def main(setup: Setup) -> str:
        with Worker(setup.control, name="aio", offload=engine) as worker:  # type: ignore[arg-type]
            answer = asyncio.create_task(asyncio.to_thread(curl, certs, setup.port))
            tls, message = await asyncio.wait_for(worker.accept_async(), TIMEOUT)
            assert message.peer_address[0] == "127.0.0.1"
            reader, writer = await kasyncio.adopt_streams(tls)
            assert writer.get_extra_info("tx_engine") == engine
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"GET / HTTP/1.1")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nasync\n"
            )
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            return await answer

    with handshaked(certs) as setup:
        assert asyncio.run(main(setup)) == "async\n"


def test_bad_usage(certs: Certs) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ktls",
            "handshaked",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            str(certs.server_ecdsa),
            "--socket",
            "/nonexistent/dir/sock",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("ktls handshaked: cannot listen on /nonexistent/dir/sock")


def test_daemon_drops_privileges_after_reading_the_key(certs: Certs) -> None:
    require_root("--user")
    with handshaked(certs, "--user", "nobody") as setup:
        status = Path(f"/proc/{setup.daemon.process.pid}/status").read_text()
        nobody = subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True, check=True)
        uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)", status, re.MULTILINE)
        assert uids is not None
        assert set(uids.groups()) == {nobody.stdout.strip()}  # real, effective, saved
        worker = setup.worker("one", "software", user=None)
        worker.wait_for("registered")
        assert curl(certs, setup.port).startswith("one ")  # the key it read as root
