"""The core suite: bulk throughput, latency and handshakes, ktls against its limits.

The tables below are the suite: each line of BULK, LATENCY and HANDSHAKES is a path
(measured once per run), each line of the *_ROWS tables compares two of them.
"""

from __future__ import annotations

import functools

from bench.model import Path, Row, Suite

from . import bulk, handshakes, latency
from .bulk import Bulk

TOPOLOGIES = {"threads": False, "processes": True}  # name -> the other end in a child process

# name: (label, kind, method, sending role)
BULK: dict[str, tuple[str, Bulk]] = {
    "raw-send": ("raw kTLS send → recv_into", Bulk("raw", "sendall", "client")),
    "kernel-sendall": (
        "ktls kernel sendall → recv_into",
        Bulk("ktls-kernel", "sendall", "client"),
    ),
    "raw-sendfile": ("raw kTLS os.sendfile → recv_into", Bulk("raw", "sendfile", "client")),
    "kernel-sendfile": (
        "ktls kernel sendfile → recv_into",
        Bulk("ktls-kernel", "sendfile", "client"),
    ),
    "ssl-c2s": ("ssl → ssl, client sends", Bulk("ssl", "sendall", "client")),
    "ssl-s2c": ("ssl → ssl, server sends", Bulk("ssl", "sendall", "server")),
    "software-c2s": (
        "ktls software both ends, client sends",
        Bulk("ktls-software", "sendall", "client"),
    ),
    "software-s2c": (
        "ktls software both ends, server sends",
        Bulk("ktls-software", "sendall", "server"),
    ),
}
# (row name, label, candidate, baseline): per topology
BULK_ROWS = (
    ("kernel-sendall", "kernel sendall / raw kTLS send", "kernel-sendall", "raw-send"),
    ("kernel-sendfile", "kernel sendfile / raw os.sendfile", "kernel-sendfile", "raw-sendfile"),
    ("software-c2s", "software / ssl, client→server", "software-c2s", "ssl-c2s"),
    ("software-s2c", "software / ssl, server→client", "software-s2c", "ssl-s2c"),
)

LATENCY = {
    "ssl": ("ssl ↔ ssl, 1 KiB request/response", "ssl"),
    "software": ("ktls software ↔ ktls software", "ktls-software"),
    "kernel": ("ktls kernel ↔ ktls kernel", "ktls-kernel"),
}
LATENCY_ROWS = (
    ("software", "software / ssl round trips/s", "software", "ssl"),
    ("kernel", "kernel / ssl round trips/s", "kernel", "ssl"),
)

# name: (label, client kind, server kind); ktls on offload="auto" (the engine is recorded)
HANDSHAKES = {
    "ssl-ssl": ("ssl client ↔ ssl server", "ssl", "ssl"),
    "ktls-ssl": ("ktls client ↔ ssl server", "ktls-auto", "ssl"),
    "ssl-ktls": ("ssl client ↔ ktls server", "ssl", "ktls-auto"),
    "ktls-ktls": ("ktls client ↔ ktls server", "ktls-auto", "ktls-auto"),
    # ktls's OpenSSL offers the post-quantum X25519MLKEM768 first; ssl's here has no ML-KEM
    "ktls-x25519-ssl": ("ktls client, X25519 only ↔ ssl server", "ktls-x25519", "ssl"),
    "ktls-x25519-ktls-x25519": (
        "ktls client ↔ ktls server, X25519 only",
        "ktls-x25519",
        "ktls-x25519",
    ),
}
HANDSHAKE_ROWS = (
    ("client", "ktls client / ssl (client side)", "ktls-ssl", "ssl-ssl"),
    ("server", "ktls server / ssl (server side)", "ssl-ktls", "ssl-ssl"),
    ("both", "ktls both ends / ssl both ends", "ktls-ktls", "ssl-ssl"),
    ("client-x25519", "ktls client / ssl, both X25519", "ktls-x25519-ssl", "ssl-ssl"),
    ("both-x25519", "ktls both ends / ssl, all X25519", "ktls-x25519-ktls-x25519", "ssl-ssl"),
)

_KERNEL_KINDS = ("raw", "ktls-kernel")


def _paths() -> tuple[Path, ...]:
    paths: list[Path] = []
    for topology, processes in TOPOLOGIES.items():
        for name, (label, spec) in BULK.items():
            paths.append(
                Path(
                    name=f"bulk/{name}/{topology}",
                    label=f"{label} ({topology})",
                    unit="MB/s",
                    measure=functools.partial(bulk.measure, spec, processes),
                    needs_kernel=spec.kind in _KERNEL_KINDS,
                )
            )
        for name, (label, kind) in LATENCY.items():
            paths.append(
                Path(
                    name=f"latency/{name}/{topology}",
                    label=f"{label} ({topology})",
                    unit="round trips/s",
                    measure=functools.partial(latency.measure, kind, processes),  # type: ignore[arg-type]
                    needs_kernel=kind in _KERNEL_KINDS,
                )
            )
    for name, (label, client, server) in HANDSHAKES.items():
        paths.append(
            Path(
                name=f"handshakes/{name}",
                label=label,
                unit="handshakes/s",
                measure=functools.partial(handshakes.measure, client, server),  # type: ignore[arg-type]
            )
        )
    return tuple(paths)


def _rows() -> tuple[Row, ...]:
    rows: list[Row] = []
    for topology in TOPOLOGIES:
        for group, table in (("bulk", BULK_ROWS), ("latency", LATENCY_ROWS)):
            for name, label, candidate, baseline in table:
                rows.append(
                    Row(
                        name=f"{group}/{name}/{topology}",
                        label=f"{label} ({topology})",
                        candidate=f"{group}/{candidate}/{topology}",
                        baseline=f"{group}/{baseline}/{topology}",
                    )
                )
    for name, label, candidate, baseline in HANDSHAKE_ROWS:
        rows.append(
            Row(f"handshakes/{name}", label, f"handshakes/{candidate}", f"handshakes/{baseline}")
        )
    return tuple(rows)


SUITE = Suite(
    name="core",
    description="ktls engines against raw kTLS and Python's ssl: bulk, latency, handshakes",
    paths=_paths(),
    rows=_rows(),
)
