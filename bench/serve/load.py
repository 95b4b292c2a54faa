"""One measurement: start a server, load it with wrk for a few seconds, stop it.

wrk (Debian's, OpenSSL 3.0) runs one thread with ``CONNECTIONS`` keep-alive HTTPS
connections, all asking for the same file.  Its OpenSSL reads a configuration of the
bench's (``OPENSSL_CONF``) that offers TLS 1.3 with TLS_AES_128_GCM_SHA256 only, so
every server negotiates exactly that; a server that would not gets no requests, and the
measurement fails.  wrk counts every byte it reads, also of a response still under way
when time is up: MB/s is bytes over wrk's own elapsed time, requests/s counts whole
responses.  Any wrk error (connect, read, write, timeout, HTTP status >= 400) fails the
measurement.

Around the wrk run: the server's CPU time (its process group, /proc/PID/stat) and the
kernel's TLS counters (/proc/net/tls_stat).  The counters are the evidence for what the
path claims: a kernel TLS path must have put kTLS on every wrk connection
(TlsTxSw + TlsTxDevice grew by at least ``CONNECTIONS``), a user-space one on none.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from bench.cpu import Cpu
from bench.model import MIB, Config, Sample
from ktls.kernel import read_tls_stat

from . import servers
from .servers import ServerName

Workload = Literal["large", "medium", "small", "efficiency"]

CONNECTIONS = 4
WRK_TIMEOUT = "60s"  # per response: wrk's default (2 s) is less than a 64 MiB one takes in UML
KERNEL_TLS: frozenset[ServerName] = frozenset({"ktls", "nginx-ktls"})

_MARK = "ktls-bench-wrk "
# wrk calls done() once at the end; a response() callback would make it buffer bodies.
_DONE_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"duration_us": %d, "requests": %d, "bytes": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "status": %d, "timeout": %d}\\n',
    "MARK", summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout))
end
""".replace("MARK", _MARK)
_OPENSSL_CNF = """\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_module
[ssl_module]
system_default = tls_defaults
[tls_defaults]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_128_GCM_SHA256
"""


def seconds(cfg: Config) -> int:
    """wrk's run time: one second per 32 MiB of ``--size``, 1 to 10 (2 s at 64 MiB).

    wrk counts whole seconds, so --quick and the warm-up take 1 s a path."""
    return max(1, min(10, cfg.bulk_bytes // (32 * MIB)))


def file_size(workload: Workload, cfg: Config) -> int:
    if workload in ("large", "efficiency"):
        return cfg.bulk_bytes
    return MIB if workload == "medium" else cfg.message_size


@functools.cache
def _wrk_files() -> tuple[Path, Path]:
    base = servers.site().base
    script, cnf = base / "done.lua", base / "wrk-openssl.cnf"
    script.write_text(_DONE_LUA)
    cnf.write_text(_OPENSSL_CNF)
    return script, cnf


@dataclass(frozen=True)
class Wrk:
    seconds: float
    requests: int
    bytes: int
    errors: dict[str, int]
    # wrk's own CPU time (RUSAGE_CHILDREN around it).  Kernel work outside the server's
    # own system calls (softirq TCP processing, kernel threads) is not in the server's
    # figure; under UML's tick-based accounting it lands on whatever runs, wrk included.
    cpu: Cpu


def wrk(port: int, name: str, duration: int) -> Wrk:
    program = servers.find_program("wrk", "wrk")
    script, cnf = _wrk_files()
    command = [
        *(program, "-t1", f"-c{CONNECTIONS}", f"-d{duration}s", "--timeout", WRK_TIMEOUT),
        *("-s", str(script), f"https://127.0.0.1:{port}/{name}"),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        command,
        env={**os.environ, "OPENSSL_CONF": str(cnf)},
        capture_output=True,
        text=True,
        timeout=duration + 120,
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = Cpu(after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout}")
    found = json.loads(lines[-1].removeprefix(_MARK))
    errors = {k: found[k] for k in ("connect", "read", "write", "status", "timeout")}
    result = Wrk(found["duration_us"] / 1e6, found["requests"], found["bytes"], errors, cpu)
    if any(errors.values()) or not result.bytes:
        raise RuntimeError(
            f"wrk: {result.requests} responses, {result.bytes} bytes, errors {errors}"
        )
    return result


def tls_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None  # no tls module here: no kernel TLS at all
    return {k: after[k] - before.get(k, 0) for k in after if not k.startswith("TlsCurr")}


def _check_evidence(server: ServerName, delta: dict[str, int] | None) -> int:
    """Connections that got kernel TLS during the run; fails if that is not what the
    path claims."""
    engaged = 0 if delta is None else delta.get("TlsTxSw", 0) + delta.get("TlsTxDevice", 0)
    if server in KERNEL_TLS and engaged < CONNECTIONS:
        raise RuntimeError(
            f"{server}: kernel TLS was not engaged: TLS TX on {engaged} of {CONNECTIONS} "
            f"connections (/proc/net/tls_stat delta: {delta})"
        )
    if server not in KERNEL_TLS and engaged:
        raise RuntimeError(f"{server}: kernel TLS engaged on {engaged} connections ({delta})")
    return engaged


# Each (server, file) is fetched whole and compared once per process, before it is timed.
_verified: set[tuple[ServerName, Path]] = set()


def measure(server: ServerName, workload: Workload, cfg: Config) -> Sample:
    path = servers.data_file(file_size(workload, cfg))
    with servers.running(server, servers.data_file(cfg.message_size)) as running:
        if (server, path) not in _verified:
            running.verify(path)
            _verified.add((server, path))
        stat0, cpu0 = read_tls_stat(), running.cpu()
        result = wrk(running.port, path.name, seconds(cfg))
        cpu, stat1 = running.cpu() - cpu0, read_tls_stat()
        version, cipher = running.handshake
    delta = tls_delta(stat0, stat1)
    engaged = _check_evidence(server, delta)
    if workload == "small":
        value = result.requests / result.seconds
    elif workload == "efficiency":
        if cpu.total <= 0:
            raise RuntimeError(f"{server}: no CPU time measured ({cpu})")
        value = result.bytes / cpu.total / 1e6
    else:
        value = result.bytes / result.seconds / 1e6
    detail: dict[str, Any] = {
        "file_bytes": path.stat().st_size,
        "wrk": {**asdict(result), "connections": CONNECTIONS, "threads": 1},
        "server_cpu": cpu.as_dict(),
        "ktls_connections": engaged,
        "tls_stat_delta": delta,
        "probe_tls": {"version": version, "cipher": cipher},
        "command": running.command,
    }
    return Sample(value=value, seconds=result.seconds, cpu=cpu, nbytes=result.bytes, detail=detail)
