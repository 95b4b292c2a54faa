"""The ``ktls handshaked`` command."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import grp
import os
import pwd
import signal
import socket
import stat
import sys
from pathlib import Path

from ..command import UsageError, add_version_options, address_option, run_command
from ..context import ServerContext
from ..errors import KTLSError
from .daemon import Daemon

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        type=address_option,
        required=True,
        metavar="[HOST]:PORT",
        help="TCP address for TLS clients",
    )
    parser.add_argument(
        "--cert", type=Path, required=True, metavar="FILE", help="certificate chain, PEM"
    )
    parser.add_argument(
        "--key", type=Path, metavar="FILE", help="private key, PEM (default: in --cert's file)"
    )
    parser.add_argument(
        "--socket",
        type=Path,
        required=True,
        metavar="PATH",
        help="the Unix socket workers register on",
    )
    parser.add_argument(
        "--socket-mode",
        type=lambda text: int(text, 8),
        default=0o660,
        metavar="MODE",
        help="its file mode, octal (default 660)",
    )
    parser.add_argument(
        "--allow-uid",
        action="append",
        default=[],
        metavar="USER",
        help="a user (name or uid) whose processes may be workers "
        "(repeatable; root and the daemon's own user always may)",
    )
    parser.add_argument(
        "--allow-gid",
        action="append",
        default=[],
        metavar="GROUP",
        help="a group (name or gid) whose processes may be workers (repeatable)",
    )
    parser.add_argument(
        "--user", metavar="USER", help="after reading the key and binding: run as this user"
    )
    parser.add_argument("--group", metavar="GROUP", help="... and this group (default: the user's)")
    parser.add_argument(
        "--client-ca",
        type=Path,
        metavar="FILE",
        help="verify client certificates against these CAs (required)",
    )
    parser.add_argument(
        "--alpn", action="append", metavar="PROTO", help="ALPN protocol to accept (repeatable)"
    )
    add_version_options(parser)
    parser.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds for a handshake (default 10)",
    )
    parser.add_argument("--quiet", action="store_true", help="log only problems")


def _uid(text: str) -> int:
    try:
        return int(text) if text.isdigit() else pwd.getpwnam(text).pw_uid
    except KeyError:
        raise UsageError(f"no such user: {text}") from None


def _gid(text: str) -> int:
    try:
        return int(text) if text.isdigit() else grp.getgrnam(text).gr_gid
    except KeyError:
        raise UsageError(f"no such group: {text}") from None


def _control_socket(path: Path, mode: int) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # a previous daemon's
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, mode)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    return run_command("handshaked", _run, args)


def _run(args: argparse.Namespace) -> int:
    if (args.user or args.group) and os.geteuid() != 0:
        raise UsageError("--user/--group need root")
    if not args.handshake_timeout > 0:
        raise UsageError("--handshake-timeout must be more than 0")
    allowed_uids = {0, os.getuid(), *(_uid(u) for u in args.allow_uid)}
    allowed_gids = {_gid(g) for g in args.allow_gid}
    run_uid = None if args.user is None else _uid(args.user)
    run_gid = (
        _gid(args.group)
        if args.group
        else (None if args.user is None else pwd.getpwuid(_uid(args.user)).pw_gid)
    )
    if run_uid is not None:
        allowed_uids.add(run_uid)
    try:
        context = ServerContext(
            args.cert,
            args.key,
            client_cafile=args.client_ca,
            verify_client="required" if args.client_ca else "none",
            minimum_version=args.version or "TLSv1.2",
            maximum_version=args.version or "TLSv1.3",
            alpn_protocols=args.alpn,
            offload="software",  # the keys must stay movable to the workers
            handshake_timeout=args.handshake_timeout,
        )
    except (KTLSError, OSError) as exc:
        raise UsageError(f"cannot use {args.cert} / {args.key or args.cert}: {exc}") from None
    host, port = args.listen
    try:
        listener = socket.create_server((host, port), backlog=128)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    control = _control_socket(args.socket, args.socket_mode)
    if run_uid is not None or run_gid is not None:
        # What Python loads on first use must be loaded while the interpreter's files
        # are surely readable: the idna codec, which names in a handshake need.
        codecs.lookup("idna")
    if run_gid is not None:
        os.chown(args.socket, -1, run_gid)
        os.setgroups([])
        os.setgid(run_gid)
    if run_uid is not None:
        os.setuid(run_uid)  # the key is in memory; the file is out of reach from now on
    daemon = Daemon(
        context, control, allowed_uids=allowed_uids, allowed_gids=allowed_gids, quiet=args.quiet
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _s, _f: daemon.stop())
    name = listener.getsockname()
    print(
        f"ktls handshaked: listening on {name[0]}:{name[1]}, workers on {args.socket} "
        f"(uids {sorted(allowed_uids)}, gids {sorted(allowed_gids)})",
        file=sys.stderr,
        flush=True,
    )
    try:
        daemon.serve(listener)
    finally:
        control.close()
        with contextlib.suppress(OSError):
            args.socket.unlink()
    return 0
