"""The serve suite: HTTPS file serving, ``ktls serve`` against nginx and http.server.

Four servers, one worker each, the same certificate (the core suite's ECDSA P-256) and
the same files, each started for one measurement and stopped after it (servers.py):

* ``ktls``: ``ktls serve --workers 1 --offload kernel``, file bodies by ``sendfile``
  through kernel TLS;
* ``nginx-ktls``: Debian's nginx with ``ssl_conf_command Options KTLS`` and
  ``sendfile on`` (OpenSSL 3.0 puts TLS 1.3 TX into the kernel, ``SSL_sendfile``);
* ``nginx``: the same configuration without that line (TLS in user space, OpenSSL);
* ``http.server``: Python's ``ThreadingHTTPServer`` behind ``ssl`` (http_server.py).

wrk loads each for a few seconds with 4 keep-alive connections, TLS 1.3 with
TLS_AES_128_GCM_SHA256 (load.py).  Workloads: the ``--size`` file (64 MiB) and a 1 MiB
file in MB/s, a 1 KiB file (``message_size``) in requests/s, and the ``--size`` file
again in MB served per CPU second of the server (``efficiency``: the inverse of CPU
s/GiB, so that higher is better here as in every row; ktls ÷ nginx + kTLS there is
nginx's CPU s/GiB ÷ ktls serve's).  Every row divides by nginx + kTLS, measured in the
same run.  The kernel TLS paths prove it from ``/proc/net/tls_stat`` (kept in the JSON
with wrk's counts and both CPU times), the others prove they did not use it.
``python -m bench.serve.chart`` draws a PNG from the JSON where matplotlib is installed.

``ktls serve`` is measured when ``ktls serve --help`` works; until then its paths and
rows are left out and the suite's description says why (the runner's only "skipped"
state is "no kTLS here").
"""

from __future__ import annotations

import functools

from bench.model import Path, Row, Suite

from . import load
from .load import Workload
from .servers import ServerName, ktls_serve_missing

# name: (label, needs kTLS)
SERVERS: dict[ServerName, tuple[str, bool]] = {
    "ktls": ("ktls serve, kernel TLS", True),
    "nginx-ktls": ("nginx + kTLS", True),
    "nginx": ("nginx, TLS in user space", False),
    "http.server": ("http.server + ssl", False),
}
BASELINE: ServerName = "nginx-ktls"
# name: (label, unit)
WORKLOADS: dict[Workload, tuple[str, str]] = {
    "large": ("64 MiB file (--size)", "MB/s"),
    "medium": ("1 MiB file", "MB/s"),
    "small": ("1 KiB file", "requests/s"),
    "efficiency": ("64 MiB file (--size), per server CPU second", "MB/CPU s"),
}

CAVEAT = (
    "Inside UML the kernel's crypto is generic C (no AES-NI) while user-space OpenSSL "
    "(nginx without kTLS, http.server's ssl, wrk) has AES-NI: only paths doing the same "
    "crypto compare fairly (ktls serve and nginx + kTLS); the rows of nginx without kTLS "
    "and of http.server measure that gap there as much as the servers. Server CPU is the "
    "server's process group only (utime+stime, /proc/PID/stat), not wrk's; UML books the "
    "guest kernel's work, kTLS crypto included, as user time."
)


def _servers() -> dict[ServerName, tuple[str, bool]]:
    if ktls_serve_missing() is None:
        return SERVERS
    return {name: spec for name, spec in SERVERS.items() if name != "ktls"}


def _paths() -> tuple[Path, ...]:
    return tuple(
        Path(
            name=f"{workload}/{server}",
            label=f"{label}, {workload_label}",
            unit=unit,
            measure=functools.partial(load.measure, server, workload),
            needs_kernel=needs_kernel,
        )
        for workload, (workload_label, unit) in WORKLOADS.items()
        for server, (label, needs_kernel) in _servers().items()
    )


def _rows() -> tuple[Row, ...]:
    return tuple(
        Row(
            name=f"{workload}/{server}",
            label=f"{label} / {SERVERS[BASELINE][0]}, {workload_label}",
            candidate=f"{workload}/{server}",
            baseline=f"{workload}/{BASELINE}",
        )
        for workload, (workload_label, _unit) in WORKLOADS.items()
        for server, (label, _needs_kernel) in _servers().items()
        if server != BASELINE
    )


def _description() -> str:
    text = "HTTPS file serving (wrk): ktls serve, nginx and http.server ÷ nginx + kTLS. "
    missing = ktls_serve_missing()
    if missing is not None:
        text += f"ktls serve is not measured: {missing}. "
    return text + CAVEAT


SUITE = Suite(name="serve", description=_description(), paths=_paths(), rows=_rows())

__all__ = ["SUITE"]
