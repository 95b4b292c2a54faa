"""``ktls serve``: the command, its workers, its certificate and what it reports."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import resource
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .. import asyncio as kasyncio
from ..command import UsageError, add_version_options, run_command
from ..context import ServerContext
from ..errors import KTLSError
from ..kernel import capabilities, read_tls_stat
from .server import FileServer, Limits, Stats

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Limits()
    parser.add_argument(
        "directory", nargs="?", default=".", help="what to serve (default: the current directory)"
    )
    parser.add_argument(
        "--bind",
        default="127.0.0.1",
        metavar="ADDR",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 or :: for all)",
    )
    parser.add_argument("--port", type=int, default=8443, help="TCP port (default 8443)")
    parser.add_argument(
        "--cert",
        type=Path,
        action="append",
        metavar="FILE",
        help="certificate chain, PEM (default: a fresh self-signed one); repeat for "
        "several sites: the first is the default, each other one is chosen when the "
        "client's SNI names a host of its certificate",
    )
    parser.add_argument(
        "--key",
        type=Path,
        action="append",
        metavar="FILE",
        help="private key, PEM, RSA or ECDSA (default: in --cert's file); none, or one "
        "per --cert in the same order",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="worker processes sharing the port (SO_REUSEPORT; default one per CPU)",
    )
    parser.add_argument(
        "--offload",
        choices=("auto", "kernel", "software"),
        default="auto",
        help="record engine: auto (kernel where it can), kernel (refuse otherwise), software",
    )
    add_version_options(parser)
    parser.add_argument(
        "--no-listing",
        dest="listing",
        action="store_false",
        help="no directory listings (403 where there is no index.html)",
    )
    parser.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="serve files that symbolic links lead to outside the directory",
    )
    parser.add_argument("--quiet", action="store_true", help="no banner, no access log on stdout")
    parser.add_argument(
        "--access-log",
        type=Path,
        metavar="FILE",
        help="append the access log here (default: stdout unless --quiet)",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (default: uvloop when installed)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds for a TLS handshake (default 10)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=defaults.header_timeout,
        metavar="S",
        help="seconds from a request's first byte to its end "
        f"of headers (default {defaults.header_timeout:g})",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=defaults.idle_timeout,
        metavar="S",
        help="seconds a keep-alive connection may wait for its "
        f"next request (default {defaults.idle_timeout:g})",
    )
    parser.add_argument(
        "--send-timeout",
        type=float,
        default=defaults.send_timeout,
        metavar="S",
        help="seconds a client may take to accept each 4 MiB "
        f"of a response (default {defaults.send_timeout:g})",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=defaults.shutdown_timeout,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds responses under way "
        f"may take to finish (default {defaults.shutdown_timeout:g})",
    )
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        metavar="N", help="connections per worker; beyond, 503 "
                        f"(default {defaults.max_connections})")  # fmt: skip


# -- the certificate -------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A fresh ECDSA P-256 certificate for localhost, 127.0.0.1 and ::1 (30 days),
    with its key (mode 0600), in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def fingerprint(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


# -- what the kernel will do -----------------------------------------------------------------


def engine_summary(offload: str, version: str | None) -> tuple[str, bool]:
    """A line on which engine carries each direction here, and whether the kernel can
    carry anything at all."""
    if offload == "software":
        return "records: software engine both ways (--offload software)", False
    caps = capabilities()
    if not caps.ulp:
        return (
            f"records: software engine -- this kernel ({caps.release}) has no kernel TLS: "
            f"{caps.ulp_error}",
            False,
        )
    both: dict[str, list[str]] = {}
    halves: list[str] = []
    pairs: dict[tuple[str, str], dict[str, bool]] = {}
    for (cipher, tls_version, direction), error in caps.ciphers.items():
        if version is None or str(tls_version) == version:
            pairs.setdefault((str(tls_version), cipher), {})[direction] = error is None
    for (tls_version, cipher), directions in sorted(pairs.items()):
        if all(directions.values()) and len(directions) == 2:
            both.setdefault(tls_version, []).append(cipher)
        elif any(directions.values()):
            halves.append(f"{cipher} {tls_version} " + "+".join(
                d for d, ok in directions.items() if ok))  # fmt: skip
    text = "; ".join(f"{v}: {', '.join(c)}" for v, c in both.items()) or "none"
    line = f"records: kernel engine both ways on Linux {caps.release} for {text}"
    if halves:
        line += f" (one direction only: {', '.join(halves)})"
    return line + "; anything else on the software engine", bool(both or halves)


# -- running ---------------------------------------------------------------------------------


def _listener(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _new_loop(choice: str) -> asyncio.AbstractEventLoop:
    if choice == "asyncio":
        return kasyncio.new_event_loop()
    try:
        return kasyncio.new_event_loop(uvloop=True)
    except ImportError:
        if choice == "uvloop":
            raise UsageError("--loop uvloop: uvloop is not installed") from None
        return kasyncio.new_event_loop()


# Set by a SIGTERM/SIGINT that arrives before a worker's loop handles them (between the
# banner and the loop's start, or in a worker just forked): the worker stops at once.
_early_stop: list[int] = []


def _note_early_stop(signum: int, _frame: object) -> None:
    _early_stop.append(signum)


def _worker(server: FileServer, listener: socket.socket, loop_choice: str) -> Stats:
    """One worker: serve until SIGTERM or SIGINT, then shut down gracefully."""
    loop = _new_loop(loop_choice)
    try:

        async def main() -> None:
            stop = asyncio.Event()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            if _early_stop:  # a signal came before the loop could take it
                stop.set()
            await server.start(sock=listener)
            await stop.wait()
            await server.shutdown()

        loop.run_until_complete(main())
    finally:
        loop.close()
    return server.stats


def _report(stats: Stats, before: dict[str, int] | None, out: Callable[[str], None]) -> None:
    after = read_tls_stat()
    conns = ", ".join(f"{n} {e}" for e, n in sorted(stats.connections.items())) or "none"
    sent = ", ".join(f"{n} {e}" for e, n in sorted(stats.body_bytes.items())) or "none"
    out(f"served: connections (tx/rx engine): {conns}; body bytes: {sent}; "
        f"requests: {sum(stats.requests.values())}")  # fmt: skip
    if before is not None and after is not None:
        delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        out("kernel /proc/net/tls_stat changes: "
            + (", ".join(f"{k} +{v}" for k, v in delta.items()) or "none"))  # fmt: skip


def _context(
    args: argparse.Namespace, certs: list[Path], keys: list[Path | None]
) -> tuple[ServerContext, dict[Path, list[str]]]:
    """The server's context: one identity per certificate, the first the default, each
    other one chosen by SNI; and the names each of those serves."""
    context: ServerContext | None = None
    names: dict[Path, list[str]] = {}
    for cert, key in zip(certs, keys, strict=True):
        try:
            if context is None:
                context = ServerContext(
                    cert,
                    key,
                    offload=args.offload,
                    minimum_version=args.version or "TLSv1.2",
                    maximum_version=args.version or "TLSv1.3",
                    alpn_protocols=["http/1.1"],
                    handshake_timeout=args.handshake_timeout,
                )
            else:
                names[cert] = context.add_identity(cert, key)
        except (KTLSError, OSError, ValueError) as exc:
            raise UsageError(f"cannot use {cert} / {key or cert}: {exc}") from None
    assert context is not None
    return context, names


def _raise_fd_limit(max_connections: int) -> None:
    """Room for each connection's socket and open file, as far as the hard limit allows
    (the usual soft limit, 1024, would refuse connections well below --max-connections)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * max_connections + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def run(args: argparse.Namespace) -> int:
    return run_command("serve", _run, args)


def _run(args: argparse.Namespace) -> int:
    root = Path(args.directory)
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be 0-65535")
    certs: list[Path] = args.cert or []
    keys: list[Path | None] = args.key or [None] * len(certs)
    if args.key and not certs:
        raise UsageError("--key needs --cert")
    if len(keys) != len(certs):
        raise UsageError("give no --key, or one --key per --cert")
    for option in ("handshake", "header", "idle", "send", "shutdown"):
        if not getattr(args, f"{option}_timeout") > 0:
            raise UsageError(f"--{option}-timeout must be more than 0")
    if args.max_connections < 1:
        raise UsageError("--max-connections must be at least 1")
    _raise_fd_limit(args.max_connections)
    say: Callable[[str], None] = (lambda _line: None) if args.quiet else print
    with contextlib.ExitStack() as cleanup:
        if not certs:
            scratch = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ktls-serve-")))
            cert, key = self_signed(scratch)
            certs, keys = [cert], [key]
        for signum in (signal.SIGTERM, signal.SIGINT):
            cleanup.callback(signal.signal, signum, signal.signal(signum, _note_early_stop))
        engines, kernel_can = engine_summary(args.offload, args.version)
        if args.offload == "kernel" and not kernel_can:
            raise UsageError(f"--offload kernel: {engines}")
        context, sni_names = _context(args, certs, keys)
        access_log: TextIO | None = None
        if args.access_log is not None:
            try:
                access_log = cleanup.enter_context(args.access_log.open("a", encoding="utf-8"))
            except OSError as exc:
                raise UsageError(f"--access-log: {exc}") from None
        elif not args.quiet:
            access_log = sys.stdout
        listeners: list[socket.socket] = []
        try:
            listeners.append(_listener(args.bind, args.port, args.workers > 1))
            port = listeners[0].getsockname()[1]  # (--port 0: the one the first got)
            for _ in range(args.workers - 1):
                listeners.append(_listener(args.bind, port, True))
        except OSError as exc:
            for listener in listeners:
                listener.close()
            print(f"ktls serve: cannot listen on {args.bind}:{args.port}: {exc.strerror}",
                  file=sys.stderr)  # fmt: skip
            return 1
        shown = "localhost" if args.bind in ("127.0.0.1", "0.0.0.0", "::", "::1") else args.bind
        url = f"https://{shown}:{port}/"
        say(f"ktls serve: {root.resolve()} on {url} "
            f"({args.workers} worker{'s' * (args.workers > 1)}, bound to {args.bind})")  # fmt: skip
        for index, cert in enumerate(certs):
            names = f", for SNI {', '.join(sni_names[cert])}" if index else ""
            say(f"certificate: {cert} (SHA-256 {fingerprint(cert)}{names})")
        if args.cert is None:
            say(f"  self-signed for localhost; try: curl --cacert {certs[0]} {url}")
        say(engines)
        sys.stdout.flush()

        limits = Limits(
            header_timeout=args.header_timeout,
            idle_timeout=args.idle_timeout,
            send_timeout=args.send_timeout,
            shutdown_timeout=args.shutdown_timeout,
            max_connections=args.max_connections,
        )

        def make_server() -> FileServer:
            return FileServer(root, context, listing=args.listing,
                              follow_symlinks=args.follow_symlinks, limits=limits,
                              access_log=access_log)  # fmt: skip

        before = read_tls_stat()
        if args.workers == 1:
            stats = _worker(make_server(), listeners[0], args.loop)
        else:
            stats = _run_workers(make_server, listeners, args.loop)
        _report(stats, before, say)
    return 0


def _run_workers(
    make_server: Callable[[], FileServer], listeners: list[socket.socket], loop_choice: str
) -> Stats:
    """One process per listener (each its own SO_REUSEPORT socket: the kernel spreads
    connections); each reports its stats on a pipe when it ends."""
    read_end, write_end = os.pipe()
    children: list[int] = []
    for index, listener in enumerate(listeners):
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                os.close(read_end)
                for other in listeners[:index] + listeners[index + 1 :]:
                    other.close()
                stats = _worker(make_server(), listener, loop_choice)
                os.write(write_end, (json.dumps(stats.as_dict()) + "\n").encode())
                status = 0
            finally:
                os._exit(status)
        children.append(pid)
    os.close(write_end)
    for listener in listeners:
        listener.close()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    if _early_stop:
        forward(_early_stop[0], None)
    try:
        for child in children:
            os.waitpid(child, 0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    total = Stats()
    with open(read_end, encoding="utf-8") as reports:
        for line in reports:
            total.merge(json.loads(line))
    return total
