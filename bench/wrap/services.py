"""The contenders, each started for one measurement and stopped after it: ``ktls wrap``,
``ktls handshaked`` with one worker, and stunnel4 in inetd style (``exec=``).

Each process runs in a session (process group) of its own, on a fresh loopback port,
with the serve suite's certificate and key (bench/serve/servers.py ``site()``: the core
suite's ECDSA P-256 from trustme) and in a temporary directory under that suite's.
The process handling is the serve suite's ``Server`` (stop: SIGTERM, then SIGKILL for
the whole group; logs; the group's CPU), here with commands of this suite's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.cpu import Cpu
from bench.serve import servers

Contender = Literal["wrap", "handshaked", "stunnel"]

WORKER = Path(__file__).with_name("worker.py")

# stunnel4 (Debian 12: 5.68, OpenSSL 3.0) in inetd style: a thread per connection, which
# forks and execs the program and relays between it and TLS.  The program's end is one
# side of a loopback TCP connection that stunnel makes for it (strace: socket, bind
# 127.0.0.1:0, connect; its make_sockets() as Debian builds it), not a socketpair.
# Only what the comparison needs differs from stunnel's defaults: the same protocol and
# suite as everyone else, and errors only in the log (ktls wrap runs --quiet).
STUNNEL_CONF = """\
; ktls bench: stunnel4 in inetd style, one program per connection
foreground = yes
pid = {run}/stunnel.pid
syslog = no
debug = 3

[wrap]
accept = 127.0.0.1:{port}
cert = {cert}
key = {key}
sslVersionMin = TLSv1.3
ciphersuites = TLS_AES_128_GCM_SHA256
exec = {exec}
execArgs = {args}
"""


def program(name: str, *args: str) -> list[str]:
    """A coreutils program's argv, its full path first."""
    return [servers.find_program(name, "coreutils"), *args]


def stunnel_conf(run: Path, port: int, argv: Sequence[str]) -> str:
    site = servers.site()
    return STUNNEL_CONF.format(
        run=run,
        port=port,
        cert=site.cert,
        key=site.key,
        exec=argv[0],
        args=" ".join([Path(argv[0]).name, *argv[1:]]),
    )


def own_cpu(pid: int) -> Cpu:
    """CPU time of process ``pid`` itself, all its threads (utime, stime of
    /proc/PID/stat): not its children's (cutime, cstime), nor its group's."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # from field 3 (state) on
    return Cpu(int(fields[11]) / servers.CLK_TCK, int(fields[12]) / servers.CLK_TCK)


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1/0.0.0.0:``port`` (IPv4, /proc/net/tcp):
    asked without connecting, so that no program runs for it."""
    with open("/proc/net/tcp", encoding="ascii") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


class Service(servers.Server):
    """One started process of this suite's: the serve suite's Server (its ``stop()``,
    ``logs()`` and group ``cpu()``) with a command of ours (Server's own constructor
    builds one of serve's commands, so it is not called)."""

    def __init__(self, label: str, command: list[str], run: Path, port: int) -> None:
        self.label = label
        self.run = run
        self.port = port
        self.command = command
        self.log = run / f"{label}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=run,
                start_new_session=True,  # its own process group: its programs are found by it
            )
        self.handshake = (None, None)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.label} exited with status {self.process.returncode}")

    def own_cpu(self) -> Cpu:
        return own_cpu(self.process.pid)


@dataclass(frozen=True)
class Running:
    contender: Contender
    port: int
    wrapper: Service  # ktls wrap, stunnel, the handshaked daemon
    services: tuple[Service, ...]  # all of them (the daemon and its worker)

    @property
    def commands(self) -> list[list[str]]:
        return [s.command for s in self.services]

    def cpu(self) -> Cpu:
        """CPU time of every process on the server side so far, the programs run for
        connections included (each service's process group, reaped children too)."""
        total = Cpu(0.0, 0.0)
        for service in self.services:
            total += service.cpu()
        return total


def _until(what: str, services: Sequence[Service], ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + servers.STARTUP_SECONDS
    while not ready():
        for service in services:
            service.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready in {servers.STARTUP_SECONDS:.0f} s")
        time.sleep(0.02)


def _start(
    contender: Contender, argv: Sequence[str], run: Path, port: int, started: list[Service]
) -> None:
    site = servers.site()
    address = f"127.0.0.1:{port}"
    ktls = str(servers.ktls_program())
    keys = ["--cert", str(site.cert), "--key", str(site.key)]
    if contender == "wrap":
        command = [ktls, "wrap", "--listen", address, *keys, "--offload", "kernel"]
        started.append(
            Service("ktls-wrap", [*command, "--tls1.3", "--quiet", "--", *argv], run, port)
        )
    elif contender == "handshaked":
        control = run / "workers.sock"
        command = [ktls, "handshaked", "--listen", address, *keys, "--socket", str(control)]
        daemon = Service("handshaked", [*command, "--tls1.3", "--quiet"], run, port)
        started.append(daemon)
        _until("ktls handshaked's worker socket", started, control.exists)
        started.append(Service("worker", [sys.executable, str(WORKER), str(control)], run, port))
    else:
        conf = run / "stunnel.conf"
        conf.write_text(stunnel_conf(run, port, argv))
        started.append(
            Service("stunnel", [servers.find_program("stunnel4", "stunnel4"), str(conf)], run, port)
        )
    _until(f"{contender} on port {port}", started, lambda: listening(port))


@contextmanager
def running(contender: Contender, argv: Sequence[str]) -> Iterator[Running]:
    """``contender`` listening on a fresh port, running ``argv`` for each connection
    (the handshaked worker answers by itself), stopped on exit.  Up means listening:
    no connection is made for it.  A failure inside carries the tail of its logs."""
    run = Path(tempfile.mkdtemp(prefix=f"{contender}-", dir=servers.site().base))
    started: list[Service] = []
    try:
        port = servers.free_port()
        try:
            _start(contender, argv, run, port, started)
            yield Running(contender, port, started[0], tuple(started))
        except Exception as exc:
            for service in reversed(started):
                service.stop()
            if logs := "\n".join(filter(None, (s.logs() for s in started))):
                raise RuntimeError(f"{exc}\n{logs}") from exc
            raise
    finally:
        for service in reversed(started):
            service.stop()
        shutil.rmtree(run, ignore_errors=True)
