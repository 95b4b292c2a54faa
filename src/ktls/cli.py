"""The ``ktls`` command: ``probe``, ``connect``, ``serve``, ``wrap`` and ``handshaked``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from . import __version__, wrap
from .context import ClientContext
from .errors import (
    AlertReceived,
    BrokenError,
    ConfigError,
    HandshakeError,
    KernelUnsupported,
    KTLSError,
    ProtocolViolation,
    SoftwareUnsupported,
)
from .handshaked import main as handshaked_main
from .kernel import KernelCapabilities, capabilities, read_tls_stat
from .serve import main as serve_main
from .suites import CIPHERS
from .wire import ProtocolVersion

if TYPE_CHECKING:
    from .tlssocket import TLSSocket

__all__ = ["main"]

# Exit statuses of `ktls connect` (documented in the README).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_HANDSHAKE = 3
EXIT_PEER_ALERT = 4
EXIT_PROTOCOL = 5
EXIT_KERNEL = 6


def _probe_dict(caps: KernelCapabilities) -> dict[str, object]:
    return {
        "kernel": caps.release,
        "ulp": caps.ulp,
        "ulp_error": caps.ulp_error,
        "ciphers": [
            {
                "cipher": cipher,
                "version": version,
                "direction": direction,
                "accepted": error is None,
                "error": error,
            }
            for (cipher, version, direction), error in caps.ciphers.items()
        ],
        "rekey": caps.rekey,
        "rekey_error": caps.rekey_error,
        "zerocopy_sendfile": caps.zerocopy_sendfile,
        "rx_expect_no_pad": caps.rx_expect_no_pad,
        "tls_stat": read_tls_stat(),
    }


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


def cmd_probe(args: argparse.Namespace) -> int:
    caps = capabilities()
    if args.json:
        print(json.dumps(_probe_dict(caps), indent=2))
        return EXIT_OK
    console = Console()
    console.print(f"kernel {caps.release}")
    if not caps.ulp:
        console.print(f"TLS ULP: [red]unavailable[/] -- {caps.ulp_error}")
        console.print("ktls will use its software engine on this machine.")
        return EXIT_OK
    console.print("TLS ULP: [green]available[/]")
    table = Table(title="ciphers accepted by the kernel (tried on loopback sockets)")
    table.add_column("cipher", no_wrap=True)
    table.add_column("since")
    for version in ProtocolVersion:
        table.add_column(f"{version.label} TX")
        table.add_column(f"{version.label} RX")
    for cipher in CIPHERS.values():
        cells = [cipher.name, cipher.kernel_since]
        for version in ProtocolVersion:
            for direction in ("tx", "rx"):
                error = caps.ciphers.get((cipher.name, version.label, direction), "untested")
                cells.append(_yes(True) if error is None else f"[red]no[/] {error.split(':')[0]}")
        table.add_row(*cells)
    console.print(table)
    console.print(
        "EINVAL: the kernel does not know the cipher; ENOENT: its crypto module is missing"
    )
    console.print(
        f"TLS 1.3 KeyUpdate (rekey): {_yes(caps.rekey)}"
        + ("" if caps.rekey else f" -- {caps.rekey_error}")
    )
    console.print(f"zero-copy sendfile (TLS_TX_ZEROCOPY_RO): {_yes(caps.zerocopy_sendfile)}")
    console.print(f"RX expect no padding (TLS_RX_EXPECT_NO_PAD): {_yes(caps.rx_expect_no_pad)}")
    stats = read_tls_stat()
    if stats:
        stat_table = Table(title="/proc/net/tls_stat")
        stat_table.add_column("counter")
        stat_table.add_column("value", justify="right")
        for name, value in stats.items():
            stat_table.add_row(name, str(value))
        console.print(stat_table)
    return EXIT_OK


def _parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _pump_to_stdout(tls: TLSSocket, done: threading.Event, result: list[BaseException]) -> None:
    """Copy the server's data to stdout until it ends; keep any failure for main."""
    out = sys.stdout.buffer
    try:
        while data := tls.recv(1 << 16):
            out.write(data)
            out.flush()
    except BaseException as exc:  # reported by the main thread
        result.append(exc)
    finally:
        done.set()


def _pump_from_stdin(tls: TLSSocket, done: threading.Event) -> None:
    """Copy stdin to the server until end of file, or until the reader is done.

    select() rather than a blocking read: when the peer ends the connection (its
    close_notify, a fatal alert, a cut) while stdin stays open, there is nothing left
    to wait for.
    """
    fd = sys.stdin.fileno()
    while not done.is_set():
        readable, _, _ = select.select([fd], [], [], 0.1)
        if readable:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            tls.sendall(chunk)


def cmd_connect(args: argparse.Namespace) -> int:
    versions = {"tls1_2": "TLSv1.2", "tls1_3": "TLSv1.3"}
    minimum = maximum = versions[args.version] if args.version else None
    try:
        context = ClientContext(
            verify=not args.insecure,
            cafile=args.cafile,
            ciphers=args.cipher or None,
            minimum_version=minimum or "TLSv1.2",
            maximum_version=maximum or "TLSv1.3",
            alpn_protocols=args.alpn or None,
            offload=args.offload,
        )
        host, _port = args.address
        tls = context.connect(args.address, server_hostname=args.sni or host, timeout=args.timeout)
    except ConfigError as exc:
        print(f"ktls: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except HandshakeError as exc:
        print(f"ktls: {exc}", file=sys.stderr)
        return EXIT_HANDSHAKE
    except KernelUnsupported as exc:
        print(f"ktls: {exc}", file=sys.stderr)
        return EXIT_KERNEL
    except SoftwareUnsupported as exc:  # neither engine can carry the cipher
        print(f"ktls: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(
            f"ktls: cannot connect to {args.address[0]}:{args.address[1]}: {exc}", file=sys.stderr
        )
        return EXIT_ERROR
    tls.settimeout(None)
    alpn = tls.selected_alpn_protocol()
    print(
        f"ktls: connected {tls.version()} {tls.tls_session.suite.openssl_name} "
        f"tx={tls.tx_engine} "
        f"rx={tls.rx_engine}"
        + (f" alpn={alpn}" if alpn else "")
        + (" resumed" if tls.session_reused else ""),
        file=sys.stderr,
    )
    done = threading.Event()
    failures: list[BaseException] = []  # the reader's
    own_failure: BaseException | None = None  # the sending side's, when not an echo
    reader = threading.Thread(target=_pump_to_stdout, args=(tls, done, failures), daemon=True)
    reader.start()
    try:
        try:
            if args.sendfile:
                with open(args.sendfile, "rb") as f:
                    tls.sendfile(f)
            else:
                _pump_from_stdin(tls, done)
            if not done.is_set():
                # close_notify: we have nothing more to say.  If the peer is gone already
                # (ENOTCONN), the reader tells why.
                with contextlib.suppress(OSError):
                    tls.shutdown(socket.SHUT_WR)
        except (KTLSError, OSError) as exc:
            # A send failing because the reader failed first ("failed earlier") is not news.
            echo = isinstance(exc, BrokenError) and isinstance(exc.__cause__, KTLSError)
            if not done.is_set() and not echo:
                own_failure = exc
            with contextlib.suppress(OSError):
                tls.socket.shutdown(socket.SHUT_RDWR)  # the reader must end too
        reader.join()
    finally:
        tls.close()
    return _report([own_failure, *failures] if own_failure else failures)


def _report(failures: list[BaseException]) -> int:
    if not failures:
        return EXIT_OK
    exc = failures[0]
    print(f"ktls: {exc}", file=sys.stderr)
    if isinstance(exc, AlertReceived):
        return EXIT_PEER_ALERT
    if isinstance(exc, ProtocolViolation):
        return EXIT_PROTOCOL
    if isinstance(exc, KernelUnsupported):
        return EXIT_KERNEL
    return EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ktls", description="Kernel TLS for Python: tools around the ktls library."
    )
    parser.add_argument("--version", action="version", version=f"ktls {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    probe = commands.add_parser("probe", help="what this kernel's TLS layer supports")
    probe.add_argument("--json", action="store_true", help="machine-readable output")
    probe.set_defaults(func=cmd_probe)

    connect = commands.add_parser(
        "connect",
        help="TLS client: stdin to the server, the server's bytes to stdout",
        description="Connect, handshake, then copy stdin to the server and the server's "
        "data to stdout. At end of stdin a close_notify is sent and the server's reply "
        "is read to its end. A status line on stderr names the version, cipher and the "
        "engine of each direction.",
    )
    connect.add_argument("address", type=_parse_address, metavar="HOST:PORT")
    connect.add_argument("--insecure", action="store_true", help="do not verify the server")
    connect.add_argument(
        "--cafile", help="trust these CA certificates (PEM) instead of the system's"
    )
    connect.add_argument("--sni", help="server name to send and verify (default: HOST)")
    connect.add_argument(
        "--alpn", action="append", metavar="PROTO", help="offer this ALPN protocol (repeatable)"
    )
    group = connect.add_mutually_exclusive_group()
    group.add_argument(
        "--tls1.2", dest="version", action="store_const", const="tls1_2", help="TLS 1.2 only"
    )
    group.add_argument(
        "--tls1.3", dest="version", action="store_const", const="tls1_3", help="TLS 1.3 only"
    )
    connect.add_argument(
        "--cipher",
        action="append",
        metavar="NAME",
        help="offer this suite (OpenSSL or IANA name; repeatable)",
    )
    connect.add_argument(
        "--offload",
        choices=("auto", "kernel", "software"),
        default="auto",
        help="record engine: kernel if possible (auto), kernel only, or software",
    )
    connect.add_argument(
        "--sendfile", metavar="FILE", help="send FILE with sendfile(2) instead of reading stdin"
    )
    connect.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds for connecting and the handshake (default 30)",
    )
    connect.set_defaults(func=cmd_connect)

    serve = commands.add_parser(
        "serve",
        help="HTTPS file server: file bodies by sendfile through the kernel's TLS",
        description="Serve a directory over HTTPS (HTTP/1.1: GET and HEAD, ranges, "
        "conditional requests, directory listings). After each handshake the records go "
        "to the kernel's TLS layer where it can take them, and file bodies leave by "
        "sendfile(2) with no copy through Python; elsewhere the software engine serves the "
        "same bytes. Without --cert a fresh self-signed certificate for localhost is made "
        "(printed with a curl line that trusts it). SIGINT or SIGTERM stops it gracefully "
        "and prints what was served, per engine, and the kernel's tls_stat changes.",
    )
    serve_main.add_arguments(serve)
    serve.set_defaults(func=serve_main.run)

    wrap_parser = commands.add_parser(
        "wrap",
        help="run a program on each TLS connection (its stdin/stdout are the socket)",
        description="Listen, do each TLS handshake, put the records into the kernel, then "
        "run PROGRAM with the connection as its stdin and stdout: it reads and writes "
        "plaintext and nothing copies its bytes. Where the kernel can't (or with --relay) "
        "the program gets a socketpair and the wrapper relays on the software engine. "
        "When the program exits, the wrapper sends close_notify and closes.",
    )
    wrap.add_arguments(wrap_parser)
    wrap_parser.set_defaults(func=wrap.run)

    daemon_parser = commands.add_parser(
        "handshaked",
        help="do TLS handshakes with keys only this daemon reads; hand the connections "
        "to worker processes",
        description="Listen for TLS clients, do each handshake here (the only process "
        "that reads the private key), and hand the finished connection -- its socket "
        "and its traffic keys, never the private key -- to a worker registered on the "
        "Unix socket (ktls.handshaked.Worker), which puts it into the kernel.",
    )
    handshaked_main.add_arguments(daemon_parser)
    daemon_parser.set_defaults(func=handshaked_main.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "sendfile", None) and not os.path.isfile(args.sendfile):
        print(f"ktls: --sendfile {args.sendfile!r}: no such file", file=sys.stderr)
        return EXIT_USAGE
    code: int = args.func(args)
    return code
