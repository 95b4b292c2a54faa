"""What the file server answers, decided without the network or the disk.

The I/O edge (:mod:`ktls.serve.server`) parses requests with h11, looks at the file
system and moves bytes; everything in between -- which file a target names, whether a
request is conditional, which bytes a Range asks for, what a directory listing says --
is here, as plain functions of their inputs, so each rule is tested on its own.
"""

from __future__ import annotations

import datetime
import html
import mimetypes
import posixpath
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime

__all__ = [
    "Entry",
    "FileInfo",
    "Plan",
    "TargetError",
    "content_type",
    "error_body",
    "http_date",
    "listing",
    "plan_file",
    "target_parts",
]

# The built-in table only (the host's /etc/mime.types differs between machines).
_TYPES = mimetypes.MimeTypes()


class TargetError(Exception):
    """A request target the server refuses; ``status`` is the answer (400 or 403)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def target_parts(target: bytes) -> tuple[tuple[str, ...], bool]:
    """The path segments a request target names below the root, and whether it ended
    with "/".  Percent-decoding happens once, before the dot segments are resolved, so
    every encoded form of ".." or "/" is seen for what it is; climbing above the root
    is refused (403), as are NUL, bad encodings and targets that are not a path (400).
    """
    scheme, separator, rest = target.partition(b"://")
    if separator and scheme.lower() in (b"http", b"https"):  # absolute-form (RFC 9112, 3.2.2)
        target = b"/" + rest.partition(b"/")[2]
    if not target.startswith(b"/"):
        raise TargetError(400, "the request target must be a path starting with /")
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    try:
        text = urllib.parse.unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise TargetError(400, "the path is not UTF-8") from None
    if "\0" in text:
        raise TargetError(400, "the path contains NUL")
    parts: list[str] = []
    for segment in text.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not parts:
                raise TargetError(403, "the path leads outside the served directory")
            parts.pop()
        else:
            parts.append(segment)
    last = text.rsplit("/", 1)[-1]
    return tuple(parts), last in ("", ".", "..")  # "/a/." names the directory /a/


@dataclass(frozen=True)
class FileInfo:
    """What the rules need to know of a regular file."""

    size: int
    mtime: float  # seconds since the epoch
    etag: str  # strong, quoted

    @classmethod
    def of(cls, size: int, mtime_ns: int, inode: int) -> FileInfo:
        # Changes whenever the content may have: a new file (inode), size or time.
        return cls(size, mtime_ns / 1e9, f'"{inode:x}-{size:x}-{mtime_ns:x}"')


@dataclass(frozen=True)
class Plan:
    """The answer to a GET or HEAD of a file: status, headers, and the byte range
    (``offset``, ``length``) of the file that forms the body (none for HEAD/304/416)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    offset: int = 0
    length: int = 0


def http_date(seconds: float) -> str:
    return formatdate(seconds, usegmt=True)


def _parse_date(text: str) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # asctime has no zone; every HTTP date is UTC (RFC 9110, 5.6.7)
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def _etags(header: str) -> list[str]:
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def _weak_match(header: str, etag: str) -> bool:
    # If-None-Match compares weakly: W/"x" matches "x" (RFC 9110, 13.1.2).
    return any(tag == "*" or tag.removeprefix("W/") == etag for tag in _etags(header))


def _precondition_failed(headers: Mapping[str, str], info: FileInfo) -> bool:
    """If-Match (strong comparison) or, without it, If-Unmodified-Since (RFC 9110,
    13.2.2 steps 1-2)."""
    if "if-match" in headers:
        return not any(tag in ("*", info.etag) for tag in _etags(headers["if-match"]))
    since = _parse_date(headers.get("if-unmodified-since", ""))
    return since is not None and int(info.mtime) > since


def _not_modified(headers: Mapping[str, str], info: FileInfo) -> bool:
    if "if-none-match" in headers:  # when present, If-Modified-Since is ignored
        return _weak_match(headers["if-none-match"], info.etag)
    since = _parse_date(headers.get("if-modified-since", ""))
    return since is not None and int(info.mtime) <= since


def _range_applies(headers: Mapping[str, str], info: FileInfo) -> bool:
    """If-Range: the range only if the client's copy is still current (a strong ETag
    or the exact Last-Modified date; RFC 9110, 13.1.5)."""
    condition = headers.get("if-range")
    if condition is None:
        return True
    if condition.startswith('"'):
        return condition == info.etag
    return condition == http_date(info.mtime)


_RANGE_SPEC = re.compile(r"(\d*)-(\d*)", re.ASCII)


def _byte_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """(offset, length) for one satisfiable range; None when the header is to be
    ignored (not bytes, not one range, malformed); False when unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # several ranges: the whole file is a valid answer (RFC 9110, 14.2)
    found = _RANGE_SPEC.fullmatch(spec.strip())
    if found is None or found.group(0) == "-":
        return None
    first_text, last_text = found.groups()
    if not first_text:  # the last N bytes
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            return False
        return max(0, size - suffix), min(suffix, size)
    first = int(first_text)
    if last_text and int(last_text) < first:
        return None  # invalid (RFC 9110, 14.1.1): ignored
    if first >= size:
        return False
    last = min(int(last_text), size - 1) if last_text else size - 1
    return first, last - first + 1


# A file such as notes.txt.gz is served as the compressed bytes it is, not as text
# with a Content-Encoding (which clients would undo, saving something else).
_COMPRESSED = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
    "br": "application/x-brotli",
}


def content_type(name: str) -> str:
    if name.startswith("data:"):  # (mimetypes reads such a name as a data: URL)
        name = "_" + name
    kind, encoding = _TYPES.guess_type(name, strict=False)
    if encoding is not None:
        return _COMPRESSED.get(encoding, "application/octet-stream")
    return kind or "application/octet-stream"


def plan_file(method: str, headers: Mapping[str, str], name: str, info: FileInfo) -> Plan:
    """The answer to GET/HEAD of a file: 200, 206, 304, 412 or 416.  ``headers`` are
    the request's, names lowercased."""
    common = (
        ("ETag", info.etag),
        ("Last-Modified", http_date(info.mtime)),
        ("Accept-Ranges", "bytes"),
    )
    if _precondition_failed(headers, info):
        return Plan(412, (*common, ("Content-Length", "0")))
    if _not_modified(headers, info):
        return Plan(304, common)
    typed = (("Content-Type", content_type(name)), *common)
    if method == "GET" and "range" in headers and _range_applies(headers, info):
        wanted = _byte_range(headers["range"], info.size)
        if wanted is False:
            return Plan(
                416,
                (*typed, ("Content-Range", f"bytes */{info.size}"), ("Content-Length", "0")),
            )
        if isinstance(wanted, tuple):
            offset, length = wanted
            content_range = f"bytes {offset}-{offset + length - 1}/{info.size}"
            return Plan(
                206,
                (*typed, ("Content-Range", content_range), ("Content-Length", str(length))),
                offset,
                length,
            )
    sized = (*typed, ("Content-Length", str(info.size)))
    return Plan(200, sized, 0, info.size if method == "GET" else 0)


@dataclass(frozen=True)
class Entry:
    """One name in a directory listing."""

    name: str
    is_dir: bool
    size: int
    mtime: float


def _undecodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.scandir's surrogate escapes for bytes that are not UTF-8
        return True
    return False


def listing(path: str, entries: Iterable[Entry]) -> bytes:
    """An HTML listing of a directory; every name is escaped (a file may be called
    ``<script>``) and every link percent-encoded."""
    title = html.escape(f"Index of {path}")
    rows = []
    if path != "/":
        rows.append('<tr><td><a href="../">../</a></td><td></td><td></td></tr>')
    for entry in sorted(entries, key=lambda e: (not e.is_dir, e.name)):
        if not entry.name.isprintable() or _undecodable(entry.name):
            continue  # no request could name it (targets are UTF-8)
        shown = entry.name + ("/" if entry.is_dir else "")
        href = urllib.parse.quote(shown)
        size = "-" if entry.is_dir else str(entry.size)
        rows.append(
            f'<tr><td><a href="{html.escape(href)}">{html.escape(shown)}</a></td>'
            f"<td>{size}</td><td>{http_date(entry.mtime)}</td></tr>"
        )
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>\n'
        f"<body><h1>{title}</h1>\n<table>\n" + "\n".join(rows) + "\n</table></body></html>\n"
    )
    return page.encode("utf-8")


def error_body(status: int, reason: str) -> bytes:
    """A short plain-text body for an error status."""
    return f"{status} {reason}\n".encode()


def display_path(parts: tuple[str, ...], is_dir: bool) -> str:
    """The decoded path for titles and logs."""
    text = "/" + posixpath.join(*parts) if parts else "/"
    return text + "/" if is_dir and not text.endswith("/") else text
