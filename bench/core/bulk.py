"""Bulk transfer: one end sends ``bulk_bytes`` in ``buffer_size`` writes (or one
sendfile), the other takes them with ``recv_into`` into one preallocated buffer.

Throughput is bytes over the time from the sender's start signal to the receiver
holding the last byte (``perf_counter``, CLOCK_MONOTONIC, comparable across
processes).  CPU is each end's own thread CPU time (CLOCK_THREAD_CPUTIME_ID, user +
sys) over the same span, summed: honest for threads and processes alike.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ktls
from bench.cpu import Cpu, thread_cpu
from bench.model import Config, Sample
from bench.pair import Result, Sync, run_pair, tcp_pair

from . import endpoints
from .endpoints import Kind, Role, Stream

Method = Literal["sendall", "sendfile"]


@dataclass(frozen=True)
class Bulk:
    kind: Kind
    method: Method
    sender: Role  # the role (client/server) of the sending end


def _other(role: Role) -> Role:
    return "server" if role == "client" else "client"


@functools.cache
def data_file(size: int) -> Path:
    """A file of ``size`` random bytes for sendfile (written once: in the page cache)."""
    path = endpoints.certs().ca.parent / f"data-{size}"
    path.write_bytes(os.urandom(size))
    return path


def _open(
    sock: socket.socket, spec: Bulk, role: Role, keys: ktls.TrafficKeys, *, sending: bool
) -> Stream:
    if spec.kind == "raw":
        return endpoints.raw_ktls(sock, keys, sending=sending)
    return endpoints.wrap(sock, spec.kind, role)


def _send(stream: Stream, spec: Bulk, cfg: Config) -> None:
    if spec.method == "sendall":
        chunk = os.urandom(cfg.buffer_size)
        for _ in range(cfg.bulk_bytes // cfg.buffer_size):
            stream.sendall(chunk)
        return
    with open(data_file(cfg.bulk_bytes), "rb") as f:
        if isinstance(stream, ktls.TLSSocket):
            sent = stream.sendfile(f)
        else:  # raw kTLS: the plain system call, as any program would use it
            sent = 0
            while sent < cfg.bulk_bytes:
                sent += os.sendfile(stream.fileno(), f.fileno(), sent, cfg.bulk_bytes - sent)  # type: ignore[attr-defined]
    if sent != cfg.bulk_bytes:
        raise RuntimeError(f"sendfile sent {sent} of {cfg.bulk_bytes} bytes")


def _receive(stream: Stream, total: int, buffer_size: int) -> None:
    buffer = bytearray(buffer_size)
    got = 0
    while got < total:
        n = stream.recv_into(buffer)
        if n == 0:
            raise RuntimeError(f"stream ended after {got} of {total} bytes")
        got += n


def _wait_for_eof(stream: Stream) -> None:
    """Close only after the receiver did: a TCP close with unread bytes (TLS 1.3 tickets)
    resets the connection, and the reset destroys data still in flight."""
    scratch = bytearray(4096)
    while stream.recv_into(scratch):
        pass


def measure(spec: Bulk, processes: bool, cfg: Config) -> Sample:
    keys = endpoints.random_keys()  # raw kTLS: the same key on both ends

    def sender(sock: socket.socket, sync: Sync) -> Result:
        stream = _open(sock, spec, spec.sender, keys, sending=True)
        sync.wait()
        t0, cpu0 = time.perf_counter(), thread_cpu()
        _send(stream, spec, cfg)
        cpu = thread_cpu() - cpu0
        _wait_for_eof(stream)
        stream.close()
        return {"t0": t0, "cpu": cpu.as_dict(), "engines": _engines(stream)}

    def receiver(sock: socket.socket, sync: Sync) -> Result:
        stream = _open(sock, spec, _other(spec.sender), keys, sending=False)
        sync.ready()
        cpu0 = thread_cpu()
        _receive(stream, cfg.bulk_bytes, cfg.buffer_size)
        t1, cpu = time.perf_counter(), thread_cpu() - cpu0
        stream.close()
        return {"t1": t1, "cpu": cpu.as_dict(), "engines": _engines(stream)}

    client, server = tcp_pair()
    socks = (client, server) if spec.sender == "client" else (server, client)
    sent, received = run_pair(sender, receiver, *socks, processes=processes)
    seconds = received["t1"] - sent["t0"]
    return Sample(
        value=cfg.bulk_bytes / seconds / 1e6,
        seconds=seconds,
        cpu=Cpu(**sent["cpu"]) + Cpu(**received["cpu"]),
        nbytes=cfg.bulk_bytes,
        detail={
            "sender_cpu": sent["cpu"],
            "receiver_cpu": received["cpu"],
            "sender_engines": sent["engines"],
            "receiver_engines": received["engines"],
        },
    )


def _engines(stream: Stream) -> str:
    if isinstance(stream, socket.socket) and not hasattr(stream, "cipher"):
        return "raw kTLS"
    return endpoints.engines(stream)  # type: ignore[arg-type]
