"""The asyncio suite: ktls.asyncio against stdlib asyncio + ssl and the blocking API.

Both ends of each connection run on one event loop in one thread (the default loop or
uvloop), so the loop's own cost is in every number alike; the blocking reference
paths are the core suite's (two threads).  Every TLS end is TLS 1.3 AES-128-GCM on the
core suite's certificate; engines are checked, not assumed.
"""

from __future__ import annotations

import asyncio
import functools
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import ktls.asyncio as kasyncio
from bench.core import bulk as core_bulk
from bench.core import endpoints
from bench.core.bulk import Bulk
from bench.model import Config, Path, Row, Sample, Suite

LoopName = Literal["asyncio", "uvloop"]
AioKind = Literal["ktls-kernel", "ktls-software", "ssl"]
LOOPS: tuple[LoopName, ...] = ("asyncio", "uvloop")


def _run(loop_name: LoopName, main: Callable[[], Awaitable[Any]]) -> Any:
    loop = kasyncio.new_event_loop(uvloop=loop_name == "uvloop")
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def _contexts(kind: AioKind) -> tuple[Any, Any]:
    """(server context, client context) for ``kind``."""
    if kind == "ssl":
        return endpoints.ssl_context("server"), endpoints.ssl_context("client")
    offload: endpoints.Offload = kind.removeprefix("ktls-")  # type: ignore[assignment]
    return endpoints.ktls_context("server", offload), endpoints.ktls_context("client", offload)


async def _pair(
    kind: AioKind, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> tuple[Any, asyncio.StreamReader, asyncio.StreamWriter]:
    """A server running ``handler`` and a connected client, both on this loop."""
    server_ctx, client_ctx = _contexts(kind)
    if kind == "ssl":
        server: Any = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=endpoints.HOSTNAME
        )
    else:
        server = await kasyncio.start_server(handler, "127.0.0.1", 0, context=server_ctx)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await kasyncio.open_connection(
            "127.0.0.1", port, context=client_ctx, server_hostname=endpoints.HOSTNAME
        )
        want = kind.removeprefix("ktls-")
        engines = (writer.get_extra_info("tx_engine"), writer.get_extra_info("rx_engine"))
        if engines != (want, want):
            raise RuntimeError(f"{kind}: engines are {engines}, not {want} both ways")
    cipher = writer.get_extra_info("cipher")
    if cipher is None or cipher[0] != endpoints.SUITE:
        raise RuntimeError(f"{kind}: negotiated {cipher}, wanted {endpoints.SUITE}")
    return server, reader, writer


async def _close(server: Any, writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


def bulk(kind: AioKind, method: str, loop_name: LoopName, cfg: Config) -> Sample:
    """The client sends ``bulk_bytes`` (writes of ``buffer_size``, or one sendfile); the
    server counts them; timed until the server has the last byte."""
    size = cfg.bulk_bytes
    path = core_bulk.data_file(size) if method == "sendfile" else None

    async def main() -> float:
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got = 0
            while got < size:
                chunk = await reader.read(cfg.buffer_size)
                if not chunk:
                    break
                got += len(chunk)
            done.set_result(time.perf_counter())
            writer.close()

        server, _reader, writer = await _pair(kind, count)
        t0 = time.perf_counter()
        if path is not None:
            with path.open("rb") as f:
                if kind == "ssl":
                    await asyncio.get_running_loop().sendfile(writer.transport, f)
                else:
                    await kasyncio.sendfile(writer, f)
        else:
            chunk = os.urandom(cfg.buffer_size)
            for _ in range(size // cfg.buffer_size):
                writer.write(chunk)
                await writer.drain()
        t1 = await done
        await _close(server, writer)
        return t1 - t0

    seconds = _run(loop_name, main)
    return Sample(value=size / seconds / 1e6, seconds=seconds, nbytes=size)


def pingpong(kind: AioKind, loop_name: LoopName, cfg: Config) -> Sample:
    """``round_trips`` exchanges of ``message_size`` bytes each way; p50/p99 in detail."""
    message = os.urandom(cfg.message_size)

    async def main() -> list[float]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    writer.write(await reader.readexactly(cfg.message_size))
            except asyncio.IncompleteReadError:
                writer.close()

        server, reader, writer = await _pair(kind, echo)
        times = []
        for _ in range(cfg.round_trips):
            t0 = time.perf_counter()
            writer.write(message)
            await reader.readexactly(cfg.message_size)
            times.append(time.perf_counter() - t0)
        await _close(server, writer)
        return times

    times = _run(loop_name, main)
    ordered = sorted(times)
    total = sum(times)
    return Sample(
        value=len(times) / total,
        seconds=total,
        detail={
            "p50_us": statistics.median(ordered) * 1e6,
            "p99_us": ordered[int(len(ordered) * 0.99) - 1] * 1e6,
        },
    )


BULK: dict[str, tuple[str, AioKind, str]] = {
    "kernel-write": ("ktls asyncio kernel, write", "ktls-kernel", "write"),
    "kernel-sendfile": ("ktls asyncio kernel, sendfile", "ktls-kernel", "sendfile"),
    "software-write": ("ktls asyncio software, write", "ktls-software", "write"),
    "ssl-write": ("asyncio + ssl, write", "ssl", "write"),
}
PINGPONG: dict[str, tuple[str, AioKind]] = {
    "kernel": ("ktls asyncio kernel, 1 KiB ping-pong", "ktls-kernel"),
    "software": ("ktls asyncio software, 1 KiB ping-pong", "ktls-software"),
    "ssl": ("asyncio + ssl, 1 KiB ping-pong", "ssl"),
}


def _paths() -> tuple[Path, ...]:
    # The blocking API's kernel engine, as the core suite measures it (two threads).
    paths = [
        Path(
            name=f"blocking/kernel-{method}",
            label=f"blocking TLSSocket kernel {method} (threads)",
            unit="MB/s",
            measure=functools.partial(
                core_bulk.measure, Bulk("ktls-kernel", method, "client"), False
            ),
            needs_kernel=True,
        )
        for method in ("sendall", "sendfile")
    ]
    for loop_name in LOOPS:
        for name, (label, kind, method) in BULK.items():
            paths.append(
                Path(
                    name=f"bulk/{name}/{loop_name}",
                    label=f"{label} ({loop_name})",
                    unit="MB/s",
                    measure=functools.partial(bulk, kind, method, loop_name),
                    needs_kernel=kind == "ktls-kernel",
                )
            )
        for name, (label, kind) in PINGPONG.items():
            paths.append(
                Path(
                    name=f"pingpong/{name}/{loop_name}",
                    label=f"{label} ({loop_name})",
                    unit="round trips/s",
                    measure=functools.partial(pingpong, kind, loop_name),
                    needs_kernel=kind == "ktls-kernel",
                )
            )
    return tuple(paths)


def _rows() -> tuple[Row, ...]:
    rows = []
    for loop_name in LOOPS:
        rows += [
            Row(
                f"bulk/kernel-write/{loop_name}",
                f"asyncio kernel write / blocking kernel sendall ({loop_name})",
                f"bulk/kernel-write/{loop_name}",
                "blocking/kernel-sendall",
            ),
            Row(
                f"bulk/kernel-sendfile/{loop_name}",
                f"asyncio kernel sendfile / blocking kernel sendfile ({loop_name})",
                f"bulk/kernel-sendfile/{loop_name}",
                "blocking/kernel-sendfile",
            ),
            Row(
                f"bulk/software/{loop_name}",
                f"asyncio software / asyncio + ssl, bulk ({loop_name})",
                f"bulk/software-write/{loop_name}",
                f"bulk/ssl-write/{loop_name}",
            ),
            Row(
                f"pingpong/kernel/{loop_name}",
                f"asyncio kernel / asyncio + ssl, round trips/s ({loop_name})",
                f"pingpong/kernel/{loop_name}",
                f"pingpong/ssl/{loop_name}",
            ),
            Row(
                f"pingpong/software/{loop_name}",
                f"asyncio software / asyncio + ssl, round trips/s ({loop_name})",
                f"pingpong/software/{loop_name}",
                f"pingpong/ssl/{loop_name}",
            ),
        ]
    return tuple(rows)


SUITE = Suite(
    name="asyncio",
    description="ktls.asyncio against asyncio + ssl and the blocking API, default loop and uvloop",
    paths=_paths(),
    rows=_rows(),
)

__all__ = ["SUITE"]
