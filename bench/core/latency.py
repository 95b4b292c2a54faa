"""Latency: ``round_trips`` request/response exchanges of ``message_size`` bytes each
way on one connection (TCP_NODELAY on both ends).  The client (main side) times them;
the server answers from the other thread or process."""

from __future__ import annotations

import os
import socket
import time

from bench.cpu import Cpu, thread_cpu
from bench.model import Config, Sample
from bench.pair import Result, Sync, run_pair, tcp_pair

from . import endpoints
from .endpoints import Kind, Stream


def _read_exactly(stream: Stream, buffer: bytearray) -> None:
    view = memoryview(buffer)
    got = 0
    while got < len(buffer):
        n = stream.recv_into(view[got:])  # type: ignore[arg-type]
        if n == 0:
            raise RuntimeError("connection ended in the middle of a message")
        got += n


def measure(kind: Kind, processes: bool, cfg: Config) -> Sample:
    request = os.urandom(cfg.message_size)
    endpoints.certs()  # made before any fork: both ends must trust one CA

    def client(sock: socket.socket, sync: Sync) -> Result:
        tls = endpoints.wrap(sock, kind, "client")
        answer = bytearray(cfg.message_size)
        sync.wait()
        t0, cpu0 = time.perf_counter(), thread_cpu()
        for _ in range(cfg.round_trips):
            tls.sendall(request)
            _read_exactly(tls, answer)
        seconds, cpu = time.perf_counter() - t0, thread_cpu() - cpu0
        tls.close()
        return {"seconds": seconds, "cpu": cpu.as_dict(), "engines": endpoints.engines(tls)}

    def server(sock: socket.socket, sync: Sync) -> Result:
        tls = endpoints.wrap(sock, kind, "server")
        question = bytearray(cfg.message_size)
        response = os.urandom(cfg.message_size)
        sync.ready()
        cpu0 = thread_cpu()
        for _ in range(cfg.round_trips):
            _read_exactly(tls, question)
            tls.sendall(response)
        cpu = thread_cpu() - cpu0
        tls.close()
        return {"cpu": cpu.as_dict(), "engines": endpoints.engines(tls)}

    c, s = tcp_pair(nodelay=True)
    mine, theirs = run_pair(client, server, c, s, processes=processes)
    return Sample(
        value=cfg.round_trips / mine["seconds"],
        seconds=mine["seconds"],
        cpu=Cpu(**mine["cpu"]) + Cpu(**theirs["cpu"]),
        detail={"client_engines": mine["engines"], "server_engines": theirs["engines"]},
    )
