"""The wrap suite: ``ktls wrap`` and ``ktls handshaked`` against stunnel4 (inetd style).

Three servers, each started for one measurement and stopped after it (services.py), on
the serve suite's certificate (ECDSA P-256), all TLS 1.3 with TLS_AES_128_GCM_SHA256:

* ``wrap``: ``ktls wrap --offload kernel --tls1.3 --quiet -- PROGRAM``: a handshake, both
  directions into the kernel, then PROGRAM with the socket as its stdin and stdout;
* ``handshaked``: ``ktls handshaked --tls1.3 --quiet`` with one worker process
  (worker.py, ``ktls.handshaked.worker.Worker``, ``offload="kernel"``) that answers each
  connection itself: no process per connection;
* ``stunnel``: Debian's stunnel4 with ``exec = PROGRAM`` (services.STUNNEL_CONF): a
  thread per connection, which forks the program on a socketpair and relays through
  user-space OpenSSL;
* ``limit`` (bulk only): the same program on a kernel-engine TLSSocket accepted in the
  bench's own process (``ktls.ServerContext(offload="kernel")``, ``Popen(stdin=stdout=
  fd)``): what ``ktls wrap`` would be with nothing of its own in the way.

One client for all, Python's ``ssl`` in one thread (measure.py).  Handshakes:
sequential connections, each a handshake, one line there and back (``head -n 1`` per
connection; the worker echoes it) and the server's end, in connections/s (the JSON has
each connection's time, p50/p90/p99/max, and the server side's CPU per connection).
Bulk: ``dd`` writes ``--size`` zeros to its stdout, the direction simplest for a
program (its end of file is the connection's); MB/s from the first byte received to
the end, and the CPU seconds per GiB of the wrapper process itself (``ktls wrap``'s,
stunnel's: utime+stime of that one process, all threads, over that span; not its
children's, whose CPU the kernel adds to its cutime/cstime when it reaps them).  The
ktls paths prove from /proc/net/tls_stat that every connection had kernel TLS both
ways, stunnel that it had none.
"""

from __future__ import annotations

import functools

from bench.model import Path, Row, Suite

from . import measure
from .measure import BulkPath
from .services import Contender

CAVEAT = (
    "Inside UML the kernel's crypto is generic C (no AES-NI) while stunnel's OpenSSL "
    "and the ssl client have AES-NI. Handshakes compare like for like: every handshake "
    "is user-space OpenSSL on both sides (ktls's through pyOpenSSL, stunnel's its own), "
    "and per connection the rows measure what each design adds (a process and a thread "
    "per connection for ktls wrap and stunnel, a hand-off to a standing worker for "
    "handshaked). Bulk ktls wrap ÷ the in-process limit is like for like (the same "
    "kernel crypto, the same program, the same client). stunnel's bulk row is not: its "
    "crypto is AES-NI in user space, the kTLS paths' generic C in the guest kernel. CPU "
    "s/GiB is the wrapper process's own (ktls wrap: nothing to do while the program "
    "writes to the socket itself; stunnel: the relay and its crypto); UML books the "
    "guest kernel's work as user time of whoever runs, in 10 ms ticks."
)

HANDSHAKES: dict[Contender, str] = {
    "wrap": "ktls wrap --offload kernel, head -n 1 per connection",
    "handshaked": "ktls handshaked → worker (kernel engine), one line per connection",
    "stunnel": "stunnel4, exec = head -n 1 per connection",
}
BULK: dict[BulkPath, tuple[str, bool]] = {
    "wrap": ("ktls wrap --offload kernel running dd (zeros to stdout)", True),
    "limit": ("dd on a kernel-engine socket accepted in-process (no wrapper)", True),
    "stunnel": ("stunnel4, exec = dd (zeros to stdout)", False),
}
# (row name, label, candidate, baseline)
ROWS = (
    ("handshakes/wrap", "ktls wrap / stunnel4, connections/s", "wrap", "stunnel"),
    (
        "handshakes/handshaked",
        "handshaked → worker / stunnel4, connections/s",
        "handshaked",
        "stunnel",
    ),
    ("bulk/wrap", "ktls wrap / in-process limit, MB/s", "wrap", "limit"),
    ("bulk/stunnel", "stunnel4 / in-process limit, MB/s", "stunnel", "limit"),
)


def _paths() -> tuple[Path, ...]:
    paths = [
        Path(
            name=f"handshakes/{name}",
            label=label,
            unit="connections/s",
            measure=functools.partial(measure.handshakes, name),
            needs_kernel=name in measure.KERNEL_TLS,
        )
        for name, label in HANDSHAKES.items()
    ]
    paths += [
        Path(
            name=f"bulk/{name}",
            label=label,
            unit="MB/s",
            measure=functools.partial(measure.bulk, name),
            needs_kernel=needs_kernel,
        )
        for name, (label, needs_kernel) in BULK.items()
    ]
    return tuple(paths)


def _rows() -> tuple[Row, ...]:
    return tuple(
        Row(
            name=name,
            label=label,
            candidate=f"{name.split('/')[0]}/{candidate}",
            baseline=f"{name.split('/')[0]}/{baseline}",
        )
        for name, label, candidate, baseline in ROWS
    )


SUITE = Suite(
    name="wrap",
    description="ktls wrap and ktls handshaked against stunnel4 (exec= per connection): "
    "handshakes ÷ stunnel4, bulk ÷ the same program on an in-process kTLS socket. " + CAVEAT,
    paths=_paths(),
    rows=_rows(),
)

__all__ = ["SUITE"]
