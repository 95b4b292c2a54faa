"""The measurements: sequential connections (handshakes) and one bulk transfer.

The client is the same for every contender: Python's ``ssl`` in the bench's main
thread, TLS 1.3 with TLS_AES_128_GCM_SHA256 only and the certificate verified
(bench/core/endpoints.py), what was negotiated checked on every connection.

* Handshakes: ``handshakes`` connections one after the other, each: connect, handshake,
  send one line, read until the server's end (the echoed line, then close_notify or
  FIN), close.  Connections per second over the whole loop, and each connection's time.
* Bulk: one connection on which the program writes ``--size`` bytes of zeros to its
  stdout (``dd``, 256 KiB writes); the client reads them into one buffer until the end.
  MB/s from the first byte received to the end (the handshake and the program's start
  are not in it), and the wrapper's own CPU time over that same span.

Evidence, checked after each measurement (/proc/net/tls_stat): a ktls path must have put
kernel TLS on both directions of every connection (TlsTxSw + TlsTxDevice and TlsRxSw +
TlsRxDevice each grew by at least the number of connections: ``ktls wrap`` then ran the
program on the socket itself, its ``direct`` mode), stunnel on none.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from bench.core import endpoints
from bench.cpu import Cpu, thread_cpu
from bench.model import Config, Sample
from bench.serve import servers
from bench.serve.load import tls_delta
from ktls.kernel import read_tls_stat

from . import services
from .services import Contender

BulkPath = Literal["wrap", "limit", "stunnel"]

TIMEOUT = 60.0  # seconds for any one client operation (UML is slow, never this slow)
KERNEL_TLS: frozenset[str] = frozenset({"wrap", "handshaked", "limit"})


def answer_program() -> list[str]:
    """What ``ktls wrap`` and stunnel run per connection: echo one line and exit."""
    return services.program("head", "-n", "1")


def bulk_program(nbytes: int, block: int) -> list[str]:
    """Writes ``nbytes`` zeros to stdout in ``block``-byte writes and exits."""
    return services.program(
        "dd", "if=/dev/zero", f"bs={block}", f"count={nbytes}", "iflag=count_bytes", "status=none"
    )


def check_evidence(path: str, delta: dict[str, int] | None, connections: int) -> dict[str, int]:
    """Connections that got kernel TLS each way; fails unless that is what ``path``
    claims (every connection both ways for a ktls path, none for stunnel)."""
    found = {"tx": 0, "rx": 0}
    if delta is not None:
        found = {
            "tx": delta.get("TlsTxSw", 0) + delta.get("TlsTxDevice", 0),
            "rx": delta.get("TlsRxSw", 0) + delta.get("TlsRxDevice", 0),
        }
    if path in KERNEL_TLS and min(found.values()) < connections:
        raise RuntimeError(
            f"{path}: kernel TLS was not on both directions of all {connections} connections: "
            f"{found} (/proc/net/tls_stat delta: {delta})"
        )
    if path not in KERNEL_TLS and any(found.values()):
        raise RuntimeError(f"{path}: kernel TLS engaged: {found} (delta: {delta})")
    return found


def _client(port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        tls = endpoints.ssl_context("client").wrap_socket(raw, server_hostname=endpoints.HOSTNAME)
    except BaseException:
        raw.close()
        raise
    endpoints.check(tls, "ssl")
    return tls


def exchange(port: int, line: bytes) -> None:
    """One connection: handshake, ``line`` there and back, the server's end, close."""
    with _client(port) as tls:
        tls.sendall(line)
        reply = b""
        while chunk := tls.recv(4096):
            reply += chunk
    if reply != line:
        raise RuntimeError(f"sent {line!r}, got back {reply!r}")


def _probe(running: services.Running) -> None:
    """One untimed exchange: the server answers.  handshaked's daemon closes the
    connections it has no worker for, until the worker's registration is through:
    tried again there, for a while."""
    deadline = time.monotonic() + servers.STARTUP_SECONDS
    while True:
        try:
            exchange(running.port, b"probe\n")
            return
        except (OSError, RuntimeError) as exc:
            for service in running.services:
                service.check_alive()
            if running.contender != "handshaked" or time.monotonic() > deadline:
                raise RuntimeError(f"no answer on port {running.port}: {exc}") from exc
            time.sleep(0.05)


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    return {
        "p50": statistics.median(ordered) * 1e3,
        "p90": at(0.9),
        "p99": at(0.99),
        "max": ordered[-1] * 1e3,
    }


def handshakes(contender: Contender, cfg: Config) -> Sample:
    count = cfg.handshakes
    with services.running(contender, answer_program()) as running:
        _probe(running)
        times: list[float] = []
        stat0, cpu0, client0 = read_tls_stat(), running.cpu(), thread_cpu()
        t0 = time.perf_counter()
        for i in range(count):
            start = time.perf_counter()
            exchange(running.port, b"hello %d\n" % i)
            times.append(time.perf_counter() - start)
        seconds = time.perf_counter() - t0
        client_cpu = thread_cpu() - client0
        cpu, stat1 = running.cpu() - cpu0, read_tls_stat()
        commands = running.commands
    delta = tls_delta(stat0, stat1)
    engaged = check_evidence(contender, delta, count)
    return Sample(
        value=count / seconds,
        seconds=seconds,
        cpu=cpu,
        detail={
            "connections": count,
            "connection_ms": _percentiles(times),
            "server_cpu": cpu.as_dict(),
            "server_cpu_ms_per_connection": cpu.total * 1e3 / count,
            "client_cpu": client_cpu.as_dict(),
            "ktls_connections": engaged,
            "tls_stat_delta": delta,
            "commands": commands,
        },
    )


# -- bulk --------------------------------------------------------------------------------


def _receive(
    port: int, expected: int, buffer_size: int, wrapper_cpu: Callable[[], Cpu] | None
) -> dict[str, Any]:
    """Read everything the program writes; times and the wrapper's CPU from the first
    byte to the end."""
    buffer = bytearray(buffer_size)
    t_connect = time.perf_counter()
    with _client(port) as tls:
        t_handshake = time.perf_counter()
        first = tls.recv_into(buffer)
        if not first:
            raise RuntimeError("the connection ended before any byte")
        t0, client0 = time.perf_counter(), thread_cpu()
        cpu0 = None if wrapper_cpu is None else wrapper_cpu()
        total = first
        while n := tls.recv_into(buffer):
            total += n
        t1, client1 = time.perf_counter(), thread_cpu()
        cpu1 = None if wrapper_cpu is None else wrapper_cpu()
    if total != expected:
        raise RuntimeError(f"received {total} bytes, the program wrote {expected}")
    return {
        "window_bytes": total - first,
        "seconds": t1 - t0,
        "handshake_s": t_handshake - t_connect,
        "first_byte_s": t0 - t_handshake,
        "client_cpu": client1 - client0,
        "wrapper_cpu": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
    }


def _limit_server(listener: socket.socket, argv: list[str], out: dict[str, Any]) -> None:
    """The limit's server end, in a thread: one connection, handshake on the kernel
    engine, then ``argv`` on the socket itself, as ``ktls wrap`` does, nothing else."""
    try:
        sock, _ = listener.accept()
        with endpoints.ktls_context("server", "kernel").wrap_socket(sock) as tls:
            endpoints.check(tls, "ktls-kernel")
            tls.settimeout(None)
            tls.flush()  # the session tickets go before the program's first byte
            child = subprocess.Popen(
                argv, stdin=tls.fileno(), stdout=tls.fileno(), start_new_session=True
            )
            out["child"] = child
            out["status"] = child.wait()
    except BaseException as exc:
        out["error"] = exc


def _limit(argv: list[str], expected: int, buffer_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = threading.Thread(target=_limit_server, args=(listener, argv, out), daemon=True)
        thread.start()
        try:
            received = _receive(port, expected, buffer_size, None)
        finally:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting
            thread.join(TIMEOUT)
            child: subprocess.Popen[bytes] | None = out.get("child")
            if child is not None and child.poll() is None:  # (only after a failure)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                thread.join()
    if "error" in out:
        raise RuntimeError(f"the in-process server failed: {out['error']!r}") from out["error"]
    if out.get("status") != 0:
        raise RuntimeError(f"{argv[0]} exited with status {out.get('status')}")
    return received


def bulk(path: BulkPath, cfg: Config) -> Sample:
    argv = bulk_program(cfg.bulk_bytes, cfg.buffer_size)
    if path == "limit":
        stat0 = read_tls_stat()
        received = _limit(argv, cfg.bulk_bytes, cfg.buffer_size)
        stat1 = read_tls_stat()
        commands = [["(in this process) ktls.ServerContext(offload='kernel')", *argv]]
    else:
        with services.running(path, argv) as running:
            stat0 = read_tls_stat()
            received = _receive(
                running.port, cfg.bulk_bytes, cfg.buffer_size, running.wrapper.own_cpu
            )
            stat1 = read_tls_stat()
            commands = running.commands
    delta = tls_delta(stat0, stat1)
    engaged = check_evidence(path, delta, 1)
    cpu: Cpu | None = received["wrapper_cpu"]
    nbytes, seconds = received["window_bytes"], received["seconds"]
    return Sample(
        value=nbytes / seconds / 1e6,
        seconds=seconds,
        cpu=cpu,
        nbytes=nbytes,
        detail={
            "program_bytes": cfg.bulk_bytes,
            "handshake_s": received["handshake_s"],
            "first_byte_s": received["first_byte_s"],
            "wrapper_cpu": None if cpu is None else cpu.as_dict(),
            "client_cpu": received["client_cpu"].as_dict(),
            "ktls_connections": engaged,
            "tls_stat_delta": delta,
            "commands": commands,
        },
    )
