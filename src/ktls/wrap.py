"""``ktls wrap``: run a program on each TLS connection, nothing in the data path.

Like inetd or ucspi-tcp's ``tcpserver``, but TLS: for each connection the wrapper does
the handshake, puts both directions into the kernel, and runs the program with the
socket as its stdin and stdout.  The program reads and writes plaintext with ordinary
``read``/``write``; no process copies its bytes.  Where the kernel can't take a
direction (no kTLS, a cipher it lacks) or ``--relay`` asks for it, the program gets one
end of a socketpair instead and the wrapper relays through ktls (the same plaintext
stream, and a clean end of file when the peer closes).

The wrapper keeps its own handle on the connection while the program runs: when the
program exits it takes in what the peer sent, sends close_notify and closes, so a
program that simply exits ends the TLS connection properly.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from .command import UsageError, add_version_options, address_option, run_command
from .context import ServerContext
from .errors import KTLSError
from .kernel import capabilities
from .tlssocket import TLSSocket

__all__ = ["add_arguments", "run"]

log = logging.getLogger("ktls.wrap")
_RELAY_CHUNK = 1 << 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        type=address_option,
        metavar="[HOST]:PORT",
        help="address to listen on (':8443' is every IPv4 address); without it, the "
        "socket systemd passes (LISTEN_FDS)",
    )
    parser.add_argument(
        "--cert", type=Path, required=True, metavar="FILE", help="certificate chain, PEM"
    )
    parser.add_argument(
        "--key", type=Path, metavar="FILE", help="private key, PEM (default: in --cert's file)"
    )
    parser.add_argument(
        "--client-ca",
        type=Path,
        metavar="FILE",
        help="verify client certificates against these CAs (PEM)",
    )
    parser.add_argument(
        "--verify-client",
        choices=("optional", "required"),
        help="with --client-ca: whether a client must present a certificate (default required)",
    )
    parser.add_argument(
        "--alpn",
        action="append",
        metavar="PROTO",
        help="ALPN protocol to accept (repeatable, in preference order)",
    )
    add_version_options(parser)
    parser.add_argument(
        "--offload",
        choices=("auto", "kernel", "software"),
        default="auto",
        help="auto: the kernel where it can, else a relay on the software engine; "
        "kernel: refuse to start without kTLS; software: always relay",
    )
    parser.add_argument(
        "--relay",
        action="store_true",
        help="always give the program a socketpair and relay (clean EOF "
        "when the peer closes; KeyUpdate handled) instead of the socket",
    )
    parser.add_argument(
        "--max-conns",
        type=int,
        default=40,
        metavar="N",
        help="connections at once; more wait in the backlog (default 40)",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds for a TLS handshake (default 10)",
    )
    parser.add_argument("--user", metavar="USER", help="run the program as this user (needs root)")
    parser.add_argument(
        "--group", metavar="GROUP", help="run the program with this group (needs root)"
    )
    parser.add_argument("--quiet", action="store_true", help="no line per connection on stderr")
    parser.add_argument(
        "program",
        nargs=argparse.REMAINDER,
        metavar="-- PROGRAM [ARGS...]",
        help="what to run for each connection",
    )


# -- the connection's description for the program --------------------------------------------


def environment(tls: TLSSocket, mode: str, base: dict[str, str]) -> dict[str, str]:
    """The program's environment: ucspi-tcp's TCP* variables, and TLS_* for the TLS
    session (names as s6/ucspi-ssl spell such things, documented in the README)."""
    env = dict(base)
    remote, local = tls.getpeername(), tls.getsockname()
    env.update(
        PROTO="TCP",
        TCPREMOTEIP=str(remote[0]),
        TCPREMOTEPORT=str(remote[1]),
        TCPLOCALIP=str(local[0]),
        TCPLOCALPORT=str(local[1]),
        TLS_VERSION=tls.version() or "",
        TLS_CIPHER=(tls.cipher() or ("",))[0],
        TLS_SNI=tls.server_hostname or "",
        TLS_ALPN=tls.selected_alpn_protocol() or "",
        KTLS_MODE=mode,
    )
    peer = tls.peer_certificate
    if peer is not None:
        env["TLS_PEER_SUBJECT"] = peer.subject.rfc4514_string()
        env["TLS_PEER_SHA256"] = hashlib.sha256(peer.public_bytes(Encoding.DER)).hexdigest()
    return env


# -- one connection ---------------------------------------------------------------------------


class Wrapper:
    """Accepts on one listening socket; one thread per connection runs the program."""

    def __init__(
        self,
        context: ServerContext,
        program: Sequence[str],
        *,
        max_conns: int = 40,
        relay: bool = False,
        user: str | None = None,
        group: str | None = None,
        quiet: bool = False,
    ) -> None:
        self.context = context
        self.program = list(program)
        self.relay = relay
        self.user = user
        self.group = group
        self.quiet = quiet
        self._slots = threading.BoundedSemaphore(max_conns)
        self._stopping = threading.Event()
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._base_env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
        }

    def serve(self, listener: socket.socket) -> None:
        """Accept until stop(); then wait for the connections' programs."""
        listener.settimeout(0.2)
        while not self._stopping.is_set():
            if not self._slots.acquire(timeout=0.2):
                continue
            try:
                sock, address = listener.accept()
            except TimeoutError:
                self._slots.release()
                continue
            except OSError as exc:
                self._slots.release()
                if self._stopping.is_set():
                    break
                log.warning("accept: %s", exc)
                continue
            thread = threading.Thread(target=self._connection, args=(sock, address))
            with self._lock:
                self._threads.add(thread)
            thread.start()
        listener.close()
        for thread in list(self._threads):
            thread.join()

    def stop(self) -> None:
        """No more connections; the running programs get SIGTERM."""
        self._stopping.set()
        with self._lock:
            for child in self._children.values():
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(f"ktls wrap: {text}", file=sys.stderr, flush=True)

    def _connection(self, sock: socket.socket, address: tuple[str, int]) -> None:
        peer = f"{address[0]}:{address[1]}"
        try:
            try:
                tls = self.context.wrap_socket(sock, do_handshake_on_connect=False)
                tls.do_handshake()
            except (KTLSError, OSError) as exc:
                sock.close()
                self._say(f"{peer}: handshake failed: {exc}")
                return
            with tls:
                self._run_program(tls, peer)
        finally:
            self._slots.release()
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _run_program(self, tls: TLSSocket, peer: str) -> None:
        direct = not self.relay and tls.tx_engine == "kernel" and tls.rx_engine == "kernel"
        mode = "direct" if direct else "relay"
        env = environment(tls, mode, self._base_env)
        tls.settimeout(None)
        if direct:
            tls.flush()  # what we owe the peer goes before the program's first byte
            ends: tuple[socket.socket, socket.socket] | None = None
            stdio = tls.fileno()
        else:
            ends = socket.socketpair()
            stdio = ends[1].fileno()
        try:
            child = subprocess.Popen(
                self.program,
                stdin=stdio,
                stdout=stdio,
                env=env,
                close_fds=True,  # (the listening socket, keys, others' connections)
                user=self.user,
                group=self.group,
                extra_groups=[] if self.user is not None else None,
            )
        except OSError as exc:
            self._say(f"{peer}: cannot run {self.program[0]}: {exc}")
            if ends is not None:
                for end in ends:
                    end.close()
            return
        with self._lock:
            self._children[child.pid] = child
        self._say(
            f"{peer}: {tls.version()} {(tls.cipher() or ('?',))[0]} tx={tls.tx_engine} "
            f"rx={tls.rx_engine} {mode}: pid {child.pid}"
        )
        relays: list[threading.Thread] = []
        if ends is not None:
            ends[1].close()
            relays = _start_relay(tls, ends[0])
        status = child.wait()
        with self._lock:
            del self._children[child.pid]
        for relay in relays:
            relay.join()
        self._say(f"{peer}: pid {child.pid} exited {status}")


# -- the relay (software engine, or --relay) ----------------------------------------------------


def _start_relay(tls: TLSSocket, plain: socket.socket) -> list[threading.Thread]:
    """Two threads: the peer's plaintext to the program's end, and back.  The peer's
    close_notify becomes an end of file for the program; its end of file becomes
    our close_notify; a broken connection becomes a reset."""
    done = threading.Barrier(2, action=plain.close)

    def to_program() -> None:
        try:
            while data := tls.recv(_RELAY_CHUNK):
                plain.sendall(data)
            plain.shutdown(socket.SHUT_WR)
        except (KTLSError, OSError) as exc:
            log.debug("relay to the program: %s", exc)
            with contextlib.suppress(OSError):
                plain.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                plain.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(threading.BrokenBarrierError):
            done.wait()

    def from_program() -> None:
        try:
            while data := plain.recv(_RELAY_CHUNK):
                tls.sendall(data)
            tls.shutdown(socket.SHUT_WR)  # close_notify
        except (KTLSError, OSError) as exc:
            log.debug("relay from the program: %s", exc)
            with contextlib.suppress(OSError):
                plain.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(threading.BrokenBarrierError):
            done.wait()

    threads = [threading.Thread(target=to_program), threading.Thread(target=from_program)]
    for thread in threads:
        thread.start()
    return threads


# -- the command --------------------------------------------------------------------------------


def _listener(args: argparse.Namespace) -> socket.socket:
    if args.listen is not None:
        host, port = args.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            return socket.create_server((host, port), family=family, backlog=128, reuse_port=False)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS"):
        sock = socket.socket(fileno=3)  # systemd's first socket (sd_listen_fds)
        sock.set_inheritable(False)
        return sock
    raise UsageError("give --listen [HOST]:PORT, or run under systemd socket activation")


def run(args: argparse.Namespace) -> int:
    return run_command("wrap", _run, args)


def _run(args: argparse.Namespace) -> int:
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        raise UsageError("no program: ktls wrap [options] -- PROGRAM [ARGS...]")
    if args.max_conns < 1:
        raise UsageError("--max-conns must be at least 1")
    if not args.handshake_timeout > 0:
        raise UsageError("--handshake-timeout must be more than 0")
    if (args.user or args.group) and os.geteuid() != 0:
        raise UsageError("--user/--group need root")
    if args.verify_client and not args.client_ca:
        raise UsageError("--verify-client needs --client-ca")
    if args.offload == "kernel" and not capabilities().ulp:
        raise UsageError(f"--offload kernel: no kernel TLS here: {capabilities().ulp_error}")
    try:
        context = ServerContext(
            args.cert,
            args.key,
            client_cafile=args.client_ca,
            verify_client=(args.verify_client or "required") if args.client_ca else "none",
            minimum_version=args.version or "TLSv1.2",
            maximum_version=args.version or "TLSv1.3",
            alpn_protocols=args.alpn,
            offload=args.offload,
            handshake_timeout=args.handshake_timeout,
        )
    except (KTLSError, OSError) as exc:
        raise UsageError(f"cannot use {args.cert} / {args.key or args.cert}: {exc}") from None
    listener = _listener(args)
    wrapper = Wrapper(
        context,
        program,
        max_conns=args.max_conns,
        relay=args.relay or args.offload == "software",
        user=args.user,
        group=args.group,
        quiet=args.quiet,
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _s, _f: wrapper.stop())
    if not args.quiet:
        name = listener.getsockname()
        print(
            f"ktls wrap: listening on {name[0]}:{name[1]}, running {' '.join(program)}",
            file=sys.stderr,
            flush=True,
        )
    wrapper.serve(listener)
    return 0
