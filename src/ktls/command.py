"""What the long-running commands (``serve``, ``wrap``, ``handshaked``) share: usage
errors as one line and exit status 2, their logging, and the options they spell alike."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

__all__ = ["EXIT_USAGE", "UsageError", "add_version_options", "address_option", "run_command"]

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad option or an unusable file: one line on stderr, exit status 2."""


def run_command(
    name: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    """Run ``body``; a UsageError becomes ``ktls NAME: why`` and exit status 2.  Log
    lines (warnings and worse) are prefixed the same way."""
    logging.basicConfig(level=logging.WARNING, format=f"ktls {name}: %(message)s")
    try:
        return body(args)
    except UsageError as exc:
        print(f"ktls {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def address_option(text: str) -> tuple[str, int]:
    """``[HOST]:PORT`` (an empty host is every IPv4 address; ``[::1]:443`` for IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: want [HOST]:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def add_version_options(parser: argparse.ArgumentParser) -> None:
    """``--tls1.2`` / ``--tls1.3`` into ``args.version`` (None: both)."""
    versions = parser.add_mutually_exclusive_group()
    versions.add_argument(
        "--tls1.2", dest="version", action="store_const", const="TLSv1.2", help="TLS 1.2 only"
    )
    versions.add_argument(
        "--tls1.3", dest="version", action="store_const", const="TLSv1.3", help="TLS 1.3 only"
    )
