"""Two ends of one loopback TCP connection, run as two threads or as two processes.

The *main* side runs in the calling thread; the *other* side runs in a second thread,
or in a forked child process (so the two ends share no interpreter and no GIL).  The
other side calls :meth:`Sync.ready` once it is set up (handshake done), and the main
side starts its clock in :meth:`Sync.wait`, so set-up is never timed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import traceback
from collections.abc import Callable
from typing import Any

Result = dict[str, Any]


class PeerFailed(RuntimeError):
    """The other side raised; the message carries its traceback."""


class Sync:
    """A pipe: the other side says "ready" (or "failed"), the main side waits for it."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()

    def ready(self) -> None:
        os.write(self._w, b"r")

    def failed(self) -> None:
        os.write(self._w, b"!")

    def wait(self) -> None:
        if os.read(self._r, 1) != b"r":
            raise PeerFailed("the other side failed before it was ready")

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


Side = Callable[[socket.socket, Sync], Result]


def tcp_pair(*, nodelay: bool = False) -> tuple[socket.socket, socket.socket]:
    """(client, server): a connected loopback TCP pair, blocking, no timeouts."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.settimeout(None)
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def _guarded(other: Side, sock: socket.socket, sync: Sync) -> Result:
    try:
        return other(sock, sync)
    except BaseException:
        sync.failed()
        sock.close()  # unblocks the main side if it is sending or receiving
        raise


def _main_guarded(main: Side, sock: socket.socket, sync: Sync) -> Result:
    try:
        return main(sock, sync)
    except BaseException:
        sock.close()  # unblocks the other side before we wait for it
        raise


def run_pair(
    main: Side,
    other: Side,
    main_sock: socket.socket,
    other_sock: socket.socket,
    *,
    processes: bool,
) -> tuple[Result, Result]:
    """Run both sides to the end; returns (main result, other result)."""
    sync = Sync()
    try:
        run = _in_process if processes else _in_thread
        return run(main, other, main_sock, other_sock, sync)
    finally:
        sync.close()


def _in_thread(
    main: Side, other: Side, main_sock: socket.socket, other_sock: socket.socket, sync: Sync
) -> tuple[Result, Result]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = _guarded(other, other_sock, sync)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="bench-other", daemon=True)
    thread.start()
    try:
        mine = _main_guarded(main, main_sock, sync)
    finally:
        thread.join()
    if "error" in box:
        raise PeerFailed(f"other side failed: {box['error']!r}") from box["error"]
    return mine, box["result"]


def _in_process(
    main: Side, other: Side, main_sock: socket.socket, other_sock: socket.socket, sync: Sync
) -> tuple[Result, Result]:
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: run the other side, report as JSON, never return
        status = 1
        try:
            main_sock.close()
            os.close(result_r)
            report: dict[str, Any]
            try:
                report = {"result": _guarded(other, other_sock, sync)}
                status = 0
            except BaseException:
                report = {"error": traceback.format_exc()}
            with os.fdopen(result_w, "w") as out:
                json.dump(report, out)
        finally:
            os._exit(status)
    os.close(result_w)
    other_sock.close()  # the child's copy is the one that counts
    try:
        mine = _main_guarded(main, main_sock, sync)
    finally:
        with os.fdopen(result_r) as results:
            text = results.read()
        os.waitpid(pid, 0)
    payload: dict[str, Any] = json.loads(text) if text else {"error": "the child process died"}
    if "error" in payload:
        raise PeerFailed(f"other side (child process) failed:\n{payload['error']}")
    result: Result = payload["result"]
    return mine, result
