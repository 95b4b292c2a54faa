"""Small socket helpers the I/O edges share: retry after EAGAIN, and the TCP state.

Kept in one place so that the blocking driver and the engines wait the same way.
Linux only (TCP_INFO, TIOCOUTQ), like the rest of ktls.
"""

from __future__ import annotations

import fcntl
import math
import select
import socket
import sys
import termios
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["NO_WAIT", "TCP_CLOSE", "retry", "tcp_state", "unacknowledged", "wait_fd"]

_T = TypeVar("_T")

NO_WAIT = -1.0  # a deadline that says: non-blocking, let BlockingIOError through
TCP_CLOSE = 7  # tcpi_state once the connection is reset (include/net/tcp_states.h)


def wait_fd(fd: int, writing: bool, timeout: float) -> bool:
    """Wait until ``fd`` is readable (or writable), at most ``timeout`` seconds (inf:
    no limit).  False when the time ran out."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT if writing else select.POLLIN)
    return bool(poller.poll(None if math.isinf(timeout) else max(1, int(timeout * 1000 + 0.999))))


def retry(attempt: Callable[[], _T], fd: int, writing: bool, deadline: float | None) -> _T:
    """Try ``attempt``; after EAGAIN wait for ``fd`` until ``deadline`` (a monotonic
    time, or inf) and try again.  TimeoutError when the deadline passes.

    With ``deadline`` None (the socket blocks: the attempt waits in the kernel) or
    NO_WAIT, BlockingIOError goes through to the caller.
    """
    while True:
        try:
            return attempt()
        except BlockingIOError:
            if deadline is None or deadline == NO_WAIT:
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out") from None
            wait_fd(fd, writing, remaining)


def tcp_state(sock: socket.socket) -> int:
    """The TCP state (tcpi_state, the first byte of TCP_INFO)."""
    return sock.getsockopt(socket.SOL_TCP, socket.TCP_INFO, 1)[0]


def unacknowledged(sock: socket.socket) -> int:
    """Bytes we sent that the peer's kernel has not acknowledged yet (TIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int.from_bytes(raw, sys.byteorder, signed=True)
