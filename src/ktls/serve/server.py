"""The file server's I/O edge: h11 over ktls.asyncio streams, files by sendfile.

One :class:`FileServer` per worker process.  Each connection is a loop of requests
(keep-alive), each request answered in full before the next is read (so pipelined
requests are answered in order).  What to answer is :mod:`ktls.serve.rules`; this
module reads the file system and moves bytes:

* A body that fits in one TLS record together with its headers leaves in one write
  (one record); a larger file goes out as the headers' record followed by
  ``sendfile`` (on the kernel engine the pages go from the page cache to the kernel's
  TLS layer, never through Python; the software engine reads and seals them).
* Files are opened first and checked after, through ``/proc/self/fd``: what is served
  is the file that was opened, so a symbolic link swapped in between cannot lead out
  of the root.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import http
import logging
import math
import os
import socket
import stat
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TextIO, TypeVar, cast

import h11

from .. import __version__
from .. import asyncio as kasyncio
from ..context import ServerContext
from ..errors import KTLSError
from . import rules

__all__ = ["FileServer", "Limits", "Stats"]

log = logging.getLogger("ktls.serve")

SERVER = f"ktls/{__version__}"
_RECORD = 16384  # the most plaintext one TLS record carries
_READ_SIZE = 65536
_FILE_CHUNK = 4 << 20  # sendfile in chunks, each bounded by send_timeout
_BODY_LIMIT = 65536  # what a GET/HEAD may carry (and we read and drop)
TICK = 0.25  # seconds between readings of the server's clock


@dataclasses.dataclass(frozen=True)
class Limits:
    """Timeouts (seconds) and sizes; the defaults are the command line's."""

    header_timeout: float = 10.0  # from a request's first byte to its last header
    idle_timeout: float = 30.0  # keep-alive: waiting for the next request
    send_timeout: float = 60.0  # the client must take each chunk of a response in this
    shutdown_timeout: float = 10.0  # in-flight responses finish within this
    max_head: int = 16384  # request line and headers, bytes (431 beyond)
    max_connections: int = 1024  # per worker (503 beyond)


@dataclasses.dataclass
class Stats:
    """What a worker served, per engine ("tx/rx", e.g. "kernel/kernel")."""

    connections: Counter[str] = dataclasses.field(default_factory=Counter)
    requests: Counter[str] = dataclasses.field(default_factory=Counter)
    body_bytes: Counter[str] = dataclasses.field(default_factory=Counter)

    def merge(self, other: dict[str, dict[str, int]]) -> None:
        for name in ("connections", "requests", "body_bytes"):
            getattr(self, name).update(other.get(name, {}))

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "connections": dict(self.connections),
            "requests": dict(self.requests),
            "body_bytes": dict(self.body_bytes),
        }


_T = TypeVar("_T")


def _escape(raw: bytes) -> str:
    """A request line for the log: quotes, backslashes and bytes outside printable
    ASCII as \\xHH (as nginx does), so a line can't be forged or broken."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02X}" for b in raw)


def _head(conn: _Connection, status: int, headers: list[tuple[str, str]]) -> bytes:
    """A response's head, through h11's books."""
    reason = http.HTTPStatus(status).phrase
    return conn.h11.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""


def _body(conn: _Connection, body: bytes) -> bytes:
    """A whole body (maybe empty) and its end, through h11's books."""
    data = (conn.h11.send(h11.Data(data=body)) or b"") if body else b""
    return data + (conn.h11.send(h11.EndOfMessage()) or b"")


def _file_error(exc: OSError) -> tuple[int, str]:
    """The answer when a file can't be opened."""
    if isinstance(exc, PermissionError):  # ours (no file name) say why; the system's don't
        return 403, "not readable" if exc.filename else str(exc.strerror)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)) or exc.errno in (
        errno.ELOOP, errno.ENAMETOOLONG,
    ):  # fmt: skip
        return 404, "not found"
    log.error("cannot open a file: %s", exc)
    return 500, "the file cannot be read"


class _Closing(Exception):
    """This connection ends now (the reason was logged or answered already)."""


class _Sized:
    """Stands for a file range in h11's books: h11 counts the body's length (and checks
    it against Content-Length) while sendfile moves the bytes."""

    def __init__(self, length: int) -> None:
        self._length = length

    def __len__(self) -> int:
        return self._length


@dataclasses.dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    engine: str
    peer: str
    h11: h11.Connection
    busy: bool = False  # a request is being answered (shutdown lets it finish)
    deadline: float = math.inf  # (loop time) when the current wait ends
    expired: bool = False  # the clock cancelled the wait: a timeout, not a shutdown


class FileServer:
    """Serves ``root`` over HTTPS on ktls.asyncio."""

    def __init__(
        self,
        root: Path,
        context: ServerContext,
        *,
        listing: bool = True,
        follow_symlinks: bool = False,
        limits: Limits | None = None,
        access_log: TextIO | None = None,
    ) -> None:
        self.root = Path(os.path.realpath(root))
        self.context = context
        self.listing = listing
        self.follow_symlinks = follow_symlinks
        self.limits = limits or Limits()
        self.access_log = access_log
        self.stats = Stats()
        self._server: kasyncio.TLSServer | None = None
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._draining = False
        # The server's clock: read once per tick, not per request (each read is a
        # system call where there is no vDSO, UML among them), for deadlines, the Date
        # header and the log.
        self._now = 0.0
        self._date = ""
        self._log_time = ""
        self._ticker: asyncio.TimerHandle | None = None

    # -- the server ------------------------------------------------------------------------

    async def start(
        self,
        host: str | None = None,
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
    ) -> kasyncio.TLSServer:
        """Listen on ``host``:``port`` or on the listening socket ``sock``."""
        self._tick()
        self._server = await kasyncio.start_server(
            self._serve_connection,
            host,
            port,
            context=self.context,
            sock=sock,
            reuse_port=reuse_port,
            backlog=1024,
            limit=self.limits.max_head * 2,
        )
        return self._server

    async def shutdown(self) -> None:
        """Stop accepting; idle connections close now, responses under way finish
        (bounded by shutdown_timeout), then whatever is left is cut."""
        self._draining = True
        if self._server is not None:
            self._server.close()
        for task, conn in list(self._connections.items()):
            if not conn.busy:
                task.cancel()
        tasks = list(self._connections)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.limits.shutdown_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            self._server.abort_clients()
            await self._server.wait_closed()
        if self._ticker is not None:
            self._ticker.cancel()

    # -- the clock -------------------------------------------------------------------------

    def _tick(self) -> None:
        """Every TICK: read the clocks, end the waits whose deadline passed."""
        loop = asyncio.get_running_loop()
        self._now = loop.time()
        wall = time.time()
        self._date = rules.http_date(wall)
        self._log_time = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(wall))
        for task, conn in self._connections.items():
            if conn.deadline <= self._now and not conn.expired:
                conn.expired = True
                task.cancel()
        self._ticker = loop.call_later(TICK, self._tick)

    async def _within(self, conn: _Connection, awaitable: Awaitable[_T], seconds: float) -> _T:
        """``await`` for ``seconds`` at least (TimeoutError), at most one TICK more.
        One deadline per connection, checked by the clock's tick: no timer per wait."""
        conn.deadline = self._now + TICK + seconds  # (_now is up to a TICK old)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if not conn.expired:
                raise
            if sys.version_info >= (3, 11):
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()
            raise TimeoutError("the client took too long") from None
        finally:
            conn.deadline = math.inf
            conn.expired = False

    # -- one connection --------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        conn = _Connection(
            reader,
            writer,
            f"{writer.get_extra_info('tx_engine')}/{writer.get_extra_info('rx_engine')}",
            peer[0] if isinstance(peer, tuple) else str(peer),
            h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head),
        )
        self.stats.connections[conn.engine] += 1
        self._connections[task] = conn
        try:
            if len(self._connections) > self.limits.max_connections:
                await self._refuse(conn, 503, "too many connections")
                return
            while not self._draining:
                request = await self._next_request(conn)
                if request is None:
                    break
                conn.busy = True
                await self._answer(conn, request)
                conn.busy = False
                if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                    break
                conn.h11.start_next_cycle()
        except _Closing:
            pass
        except (OSError, KTLSError, asyncio.IncompleteReadError) as exc:
            log.debug("%s: connection ended: %s", conn.peer, exc)
        except asyncio.CancelledError:
            if not self._draining:
                raise
        except Exception:  # a bug of ours: this connection only, and said loudly
            log.exception("%s: internal error", conn.peer)
            await self._refuse(conn, 500, "internal server error")
        finally:
            del self._connections[task]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _next_request(self, conn: _Connection) -> h11.Request | None:
        """The next request's head (None when the client closed between requests).
        Waits idle_timeout for its first byte, then header_timeout for the rest."""
        deadline: float | None = None  # of the headers, once their first byte came
        received = len(conn.h11.trailing_data[0])  # (pipelined: already here)
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                await self._refuse(conn, exc.error_status_hint, str(exc))
                raise _Closing from None
            if isinstance(event, h11.Request):
                # h11 limits a head that is still arriving; one that came whole in a
                # single read is measured here.
                if received - len(conn.h11.trailing_data[0]) > self.limits.max_head:
                    await self._refuse(conn, 431, "request line and headers too large")
                    raise _Closing
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            assert event is h11.NEED_DATA, event
            if deadline is None and conn.h11.trailing_data[0]:
                deadline = self._now + self.limits.header_timeout
            wait = self.limits.idle_timeout if deadline is None else max(0.0, deadline - self._now)
            try:
                data = await self._within(conn, conn.reader.read(_READ_SIZE), wait)
            except TimeoutError:
                if deadline is not None:
                    await self._refuse(conn, 408, "the request took too long")
                raise _Closing from None
            if data and deadline is None:
                deadline = self._now + self.limits.header_timeout
            received += len(data)
            conn.h11.receive_data(data)

    async def _refuse(self, conn: _Connection, status: int, reason: str) -> None:
        """An error answer that ends the connection (when h11 still lets us answer)."""
        log.debug("%s: %d %s", conn.peer, status, reason)
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = rules.error_body(status, reason)
        headers = [*self._base_headers(), ("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Length", str(len(body))), ("Connection", "close")]  # fmt: skip
        try:
            data = _head(conn, status, headers) + _body(conn, body)
        except h11.LocalProtocolError:
            return
        conn.writer.write(data)
        with contextlib.suppress(OSError, KTLSError, TimeoutError):
            await self._within(conn, conn.writer.drain(), self.limits.send_timeout)
        self._log(conn, None, status, len(body))

    def _base_headers(self) -> list[tuple[str, str]]:
        return [("Date", self._date), ("Server", SERVER)]

    # -- one request -----------------------------------------------------------------------

    async def _answer(self, conn: _Connection, request: h11.Request) -> None:
        method = request.method.decode("ascii", "replace")
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers
        }
        if method not in ("GET", "HEAD"):
            allow = [("Allow", "GET, HEAD")]
            await self._finish_error(conn, request, 405, "only GET and HEAD", allow)
            raise _Closing  # its body (if any) is not read
        await self._read_body(conn, request)
        try:
            parts, slash = rules.target_parts(request.target)
        except rules.TargetError as exc:
            await self._finish_error(conn, request, exc.status, str(exc))
            return
        await self._serve_path(conn, request, method, headers, parts, slash)

    async def _read_body(self, conn: _Connection, request: h11.Request) -> None:
        """Read and drop the body of a GET/HEAD (413 beyond _BODY_LIMIT)."""
        taken = 0
        while True:
            event = conn.h11.next_event()
            if isinstance(event, h11.EndOfMessage):
                return
            if isinstance(event, h11.Data):
                taken += len(event.data)
                if taken > _BODY_LIMIT:
                    await self._finish_error(conn, request, 413, "a GET or HEAD body that big")
                    raise _Closing
            elif event is h11.NEED_DATA:
                try:
                    data = await self._within(
                        conn, conn.reader.read(_READ_SIZE), self.limits.header_timeout
                    )
                except TimeoutError:
                    raise _Closing from None
                conn.h11.receive_data(data)
            else:
                raise _Closing  # the client closed mid-body

    def _open(self, parts: tuple[str, ...]) -> tuple[int, os.stat_result]:
        """Open what ``parts`` names under the root: (fd, its stat).  Refuses (403)
        anything that is not a regular file or directory, and anything outside the root
        unless symbolic links may be followed."""
        path = os.path.join(self.root, *parts)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            info = os.fstat(fd)
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                raise PermissionError(errno.EACCES, "not a regular file")
            # What was opened, whatever links led there: inside the root?
            if not self.follow_symlinks and not self._inside(os.readlink(f"/proc/self/fd/{fd}")):
                raise PermissionError(errno.EACCES, "a link leads outside the root")
        except BaseException:
            os.close(fd)
            raise
        return fd, info

    async def _serve_path(
        self,
        conn: _Connection,
        request: h11.Request,
        method: str,
        headers: dict[str, str],
        parts: tuple[str, ...],
        slash: bool,
    ) -> None:
        try:
            fd, info = self._open(parts)
        except OSError as exc:
            status, reason = _file_error(exc)
            await self._finish_error(conn, request, status, reason)
            return
        if stat.S_ISDIR(info.st_mode):
            try:
                entries = list(self._entries(fd)) if slash and self.listing else []
            finally:
                os.close(fd)
            await self._serve_directory(conn, request, method, headers, parts, slash, entries)
            return
        try:
            file_info = rules.FileInfo.of(info.st_size, info.st_mtime_ns, info.st_ino)
            plan = rules.plan_file(method, headers, parts[-1] if parts else "", file_info)
            await self._send_file(conn, request, plan, fd)
        finally:
            os.close(fd)

    async def _serve_directory(
        self,
        conn: _Connection,
        request: h11.Request,
        method: str,
        headers: dict[str, str],
        parts: tuple[str, ...],
        slash: bool,
        entries: list[rules.Entry],
    ) -> None:
        if not slash:  # relative links in the page need the slash
            location = request.target.split(b"?", 1)[0].decode("latin-1") + "/"
            await self._finish_error(conn, request, 301, "moved", [("Location", location)])
            return
        index = (*parts, "index.html")
        if any(e.name == "index.html" and not e.is_dir for e in entries) or not self.listing:
            if not self.listing and not os.path.isfile(os.path.join(self.root, *index)):
                await self._finish_error(conn, request, 403, "directory listing is off")
                return
            await self._serve_path(conn, request, method, headers, index, False)
            return
        page = rules.listing(rules.display_path(parts, True), entries)
        await self._send_small(
            conn, request, 200,
            [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(page)))],
            page if method == "GET" else b"",
        )  # fmt: skip

    def _entries(self, fd: int) -> Iterator[rules.Entry]:
        with os.scandir(fd) as entries:
            for entry in entries:
                if (
                    entry.is_symlink()
                    and not self.follow_symlinks
                    and not self._inside(os.path.realpath(f"/proc/self/fd/{fd}/{entry.name}"))
                ):
                    continue  # (not even its size and date: they are outside's)
                with contextlib.suppress(OSError):  # vanished, or a dangling link
                    info = entry.stat()
                    yield rules.Entry(entry.name, entry.is_dir(), info.st_size, info.st_mtime)

    def _inside(self, real: str) -> bool:
        return real == str(self.root) or real.startswith(str(self.root) + os.sep)

    # -- sending ---------------------------------------------------------------------------

    async def _finish_error(
        self,
        conn: _Connection,
        request: h11.Request,
        status: int,
        reason: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        body = rules.error_body(status, reason)
        headers = [*(extra or []), ("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Length", str(len(body)))]  # fmt: skip
        if request.method == b"HEAD":
            body = b""
        await self._send_small(conn, request, status, headers, body)

    async def _send_small(
        self,
        conn: _Connection,
        request: h11.Request,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        """Head and body in one write: one TLS record when they fit in one."""
        data = _head(conn, status, [*self._base_headers(), *headers]) + _body(conn, body)
        await self._write(conn, data)
        self._log(conn, request, status, len(body))

    async def _send_file(
        self, conn: _Connection, request: h11.Request, plan: rules.Plan, fd: int
    ) -> None:
        headers = [*self._base_headers(), *plan.headers]
        head = _head(conn, plan.status, headers)
        if plan.length and len(head) + plan.length <= _RECORD:
            body = os.pread(fd, plan.length, plan.offset)
            if len(body) == plan.length:  # else the file shrank: the sendfile path ends it
                await self._write(conn, head + _body(conn, body))
                self._log(conn, request, plan.status, plan.length)
                return
        await self._write(conn, head)
        sent = 0
        if plan.length:
            conn.h11.send_with_data_passthrough(h11.Data(data=cast(bytes, _Sized(plan.length))))
            # (A file object for sendfile only: making one costs an fstat.)
            with open(fd, "rb", buffering=0, closefd=False) as file:
                sent = await self._sendfile(conn, file, plan.offset, plan.length)
        self._log(conn, request, plan.status, sent)
        if sent < plan.length:
            # The file shrank under us: the promised length can't be kept, and only
            # closing the connection tells the client its copy is short.
            target = request.target.decode("latin-1")
            log.warning("%s: %s shrank while being sent", conn.peer, target)
            raise _Closing
        conn.h11.send(h11.EndOfMessage())

    async def _write(self, conn: _Connection, data: bytes) -> None:
        conn.writer.write(data)
        try:
            await self._within(conn, conn.writer.drain(), self.limits.send_timeout)
        except TimeoutError:
            raise _Closing from None

    async def _sendfile(self, conn: _Connection, file: Any, offset: int, length: int) -> int:
        sent = 0
        while sent < length:
            want = min(_FILE_CHUNK, length - sent)
            try:
                chunk = await self._within(
                    conn,
                    kasyncio.sendfile(conn.writer, file, offset + sent, want),
                    self.limits.send_timeout,
                )
            except TimeoutError:
                raise _Closing from None
            sent += chunk
            if chunk < want:
                break
        return sent

    def _log(self, conn: _Connection, request: h11.Request | None, status: int, size: int) -> None:
        """One line per request: the common log format, plus the engines (tx/rx)."""
        self.stats.requests[conn.engine] += 1
        self.stats.body_bytes[conn.engine] += size
        if self.access_log is None:
            return
        when = self._log_time
        line = "-" if request is None else _escape(
            b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)
        )  # fmt: skip
        self.access_log.write(
            f'{conn.peer} - - [{when}] "{line}" {status} {size} engine={conn.engine}\n'
        )
        self.access_log.flush()
