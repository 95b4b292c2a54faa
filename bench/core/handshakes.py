"""Handshakes per second: ``handshakes`` sequential TLS 1.3 connections on loopback,
each one connect + handshake + close; the server accepts in a thread of the same
process.  Timed from the first connect to the server closing the last connection."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from bench.cpu import thread_cpu
from bench.model import Config, Sample

from . import endpoints
from .endpoints import Kind


def _serve(listener: socket.socket, kind: Kind, count: int, out: dict[str, Any]) -> None:
    try:
        cpu0 = thread_cpu()
        for _ in range(count):
            sock, _ = listener.accept()
            tls = endpoints.wrap(sock, kind, "server")
            out["engines"] = endpoints.engines(tls)
            tls.close()
        out["cpu"] = thread_cpu() - cpu0
        out["t1"] = time.perf_counter()
    except BaseException as exc:
        out["error"] = exc
        listener.close()  # the client's next connect fails instead of hanging


def measure(client_kind: Kind, server_kind: Kind, cfg: Config) -> Sample:
    out: dict[str, Any] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = listener.getsockname()
        thread = threading.Thread(
            target=_serve, args=(listener, server_kind, cfg.handshakes, out), daemon=True
        )
        thread.start()
        t0, cpu0 = time.perf_counter(), thread_cpu()
        try:
            for _ in range(cfg.handshakes):
                tls = endpoints.wrap(socket.create_connection(address), client_kind, "client")
                engines = endpoints.engines(tls)
                tls.close()
            cpu = thread_cpu() - cpu0
        except BaseException:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the server's accept()
            raise
        finally:
            thread.join()
    if "error" in out:
        raise RuntimeError(f"server side failed: {out['error']!r}") from out["error"]
    seconds = out["t1"] - t0
    return Sample(
        value=cfg.handshakes / seconds,
        seconds=seconds,
        cpu=cpu + out["cpu"],
        detail={"client_engines": engines, "server_engines": out["engines"]},
    )
