"""The sans-IO rules of ``ktls serve`` (:mod:`ktls.serve.rules`): which file a target
names, what a GET/HEAD of it answers (conditionals, ranges), what a listing says.

Each test asserts something an HTTP client relies on; where RFC 9110 decides, the
section is named.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ktls.serve.rules import (
    Entry,
    FileInfo,
    Plan,
    TargetError,
    content_type,
    display_path,
    error_body,
    http_date,
    listing,
    plan_file,
    target_parts,
)

# -- target_parts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "parts", "slash"),
    [
        (b"/", (), True),
        (b"/index.html", ("index.html",), False),
        (b"/a/b/c.txt", ("a", "b", "c.txt"), False),
        (b"/a/b/", ("a", "b"), True),
        # The query and the fragment are not part of the path (RFC 9110, 4.2.1 / 7.1).
        (b"/a?x=1", ("a",), False),
        (b"/a/?x=1&y=/..", ("a",), True),
        (b"/a#frag", ("a",), False),
        (b"/a?q=1#frag", ("a",), False),
        (b"/a?", ("a",), False),
        # Encoded delimiters are data, decoded once into the name.
        (b"/a%3Fb", ("a?b",), False),
        (b"/a%23b", ("a#b",), False),
        (b"/a%20b", ("a b",), False),
        (b"/caf%C3%A9.txt", ("café.txt",), False),
        (b"/caf\xc3\xa9.txt", ("café.txt",), False),
        # "." and empty segments name nothing.
        (b"/./a/./b", ("a", "b"), False),
        (b"//a///b//", ("a", "b"), True),
        (b"/%2e/a", ("a",), False),
        # ".." that stays under the root is resolved.
        (b"/a/../b", ("b",), False),
        (b"/a/b/../../c", ("c",), False),
        (b"/a/%2e%2e/b", ("b",), False),
        (b"/a/.%2E/b/", ("b",), True),
        # Names that merely contain dots are names.
        (b"/...", ("...",), False),
        (b"/..a/b..", ("..a", "b.."), False),
        # An encoded slash, decoded once, separates segments.
        (b"/a%2fb", ("a", "b"), False),
        # Decoded once only: "%252e%252e" is a file literally called "%2e%2e".
        (b"/%252e%252e/x", ("%2e%2e", "x"), False),
        (b"/%252e%252e%252fx", ("%2e%2e%2fx",), False),
        # A path ending in a dot segment names a directory (RFC 3986, 5.2.4).
        (b"/a/.", ("a",), True),
        (b"/a/b/..", ("a",), True),
        # The absolute-form is accepted (RFC 9112, 3.2.2); its path is what counts.
        (b"http://localhost:8443/a/b", ("a", "b"), False),
        (b"HTTPS://x", (), True),
    ],
)
def test_target_parts(target: bytes, parts: tuple[str, ...], slash: bool) -> None:
    assert target_parts(target) == (parts, slash)


@pytest.mark.parametrize(
    "target",
    [
        b"/..",
        b"/../",
        b"/../x",
        b"/%2e%2e/x",
        b"/%2E%2E/x",
        b"/.%2e/x",
        b"/%2e./x",
        b"/a/../../x",
        b"/a/./../../x",
        b"/%2e%2e%2fx",  # decoded once: "/../x"
        b"/..%2f..%2fetc/passwd",
        b"/a%2f..%2f..%2fx",
        b"/../x?y",
    ],
)
def test_target_above_the_root_is_forbidden(target: bytes) -> None:
    with pytest.raises(TargetError) as caught:
        target_parts(target)
    assert caught.value.status == 403


@pytest.mark.parametrize(
    "target",
    [
        b"/a%00b",  # NUL
        b"/%00",
        b"/%ff",  # not UTF-8
        b"/%c3",  # truncated UTF-8
        b"/%C0%AE%C0%AE/x",  # overlong UTF-8 for "..": refused, never read as ".."
        b"/\xff",
        b"*",  # asterisk-form: not a path
        b"a/b",
        b"",
    ],
)
def test_bad_target_is_a_bad_request(target: bytes) -> None:
    with pytest.raises(TargetError) as caught:
        target_parts(target)
    assert caught.value.status == 400
    assert str(caught.value)  # a reason for the error body


# -- FileInfo ------------------------------------------------------------------------------

SIZE = 100
SECONDS = 784_111_777  # Sun, 06 Nov 1994 08:49:37 GMT (the example of RFC 9110, 5.6.7)
MTIME_NS = SECONDS * 10**9 + 250_000_000  # a quarter of a second past it
INODE = 0x1234
INFO = FileInfo.of(SIZE, MTIME_NS, INODE)
LAST_MODIFIED = "Sun, 06 Nov 1994 08:49:37 GMT"
EARLIER = "Sun, 06 Nov 1994 08:49:36 GMT"
LATER = "Sun, 06 Nov 1994 08:49:38 GMT"

# entity-tag = [ weak ] opaque-tag; opaque-tag = DQUOTE *etagc DQUOTE (RFC 9110, 8.8.3)
ETAG_SYNTAX = re.compile(r'"[\x21\x23-\x7e]*"')


def test_file_info_etag_is_strong_and_well_formed() -> None:
    assert ETAG_SYNTAX.fullmatch(INFO.etag)
    assert not INFO.etag.startswith("W/")
    assert INFO.size == SIZE
    assert INFO.mtime == pytest.approx(MTIME_NS / 1e9)
    assert FileInfo.of(SIZE, MTIME_NS, INODE) == INFO  # the same file: the same tag


@pytest.mark.parametrize(
    ("size", "mtime_ns", "inode"),
    [
        (SIZE + 1, MTIME_NS, INODE),
        (SIZE, MTIME_NS + 1, INODE),  # a nanosecond is enough
        (SIZE, MTIME_NS, INODE + 1),  # replaced by another file (rename over it)
    ],
)
def test_file_info_etag_changes_with_the_file(size: int, mtime_ns: int, inode: int) -> None:
    # A strong validator changes whenever the content may have (RFC 9110, 8.8.1).
    other = FileInfo.of(size, mtime_ns, inode)
    assert ETAG_SYNTAX.fullmatch(other.etag)
    assert other.etag != INFO.etag


def test_file_info_etag_of_unusual_stats() -> None:
    for info in (FileInfo.of(0, 0, 0), FileInfo.of(0, -(10**9), 1)):  # empty; before 1970
        assert ETAG_SYNTAX.fullmatch(info.etag)


# -- plan_file -------------------------------------------------------------------------------


def plan(
    headers: dict[str, str] | None = None,
    method: str = "GET",
    info: FileInfo = INFO,
    name: str = "notes.txt",
) -> Plan:
    return plan_file(method, headers or {}, name, info)


def fields(answer: Plan) -> dict[str, str]:
    """The response header fields, each at most once."""
    names = [name.lower() for name, _ in answer.headers]
    assert len(names) == len(set(names)), answer.headers
    return {name.lower(): value for name, value in answer.headers}


def test_get_is_the_whole_file() -> None:
    answer = plan()
    assert answer.status == 200
    assert (answer.offset, answer.length) == (0, SIZE)
    assert fields(answer) == {
        "content-type": "text/plain",
        "content-length": str(SIZE),
        "etag": INFO.etag,
        "last-modified": LAST_MODIFIED,
        "accept-ranges": "bytes",  # RFC 9110, 14.3
    }


def test_get_of_an_empty_file() -> None:
    answer = plan(info=FileInfo.of(0, MTIME_NS, INODE))
    assert answer.status == 200
    assert (answer.offset, answer.length) == (0, 0)
    assert fields(answer)["content-length"] == "0"


def test_head_has_the_headers_of_get_and_no_body() -> None:
    # HEAD: the same header fields as GET, no content (RFC 9110, 9.3.2); Content-Length
    # is the size GET would send (RFC 9110, 8.6).
    answer = plan(method="HEAD")
    assert answer.status == 200
    assert answer.length == 0
    assert fields(answer) == fields(plan())


def test_head_ignores_range() -> None:
    # Range handling is defined for GET only (RFC 9110, 14.2).
    answer = plan({"range": "bytes=0-9"}, method="HEAD")
    assert answer.status == 200
    assert answer.length == 0
    assert fields(answer)["content-length"] == str(SIZE)
    assert "content-range" not in fields(answer)


@pytest.mark.parametrize(
    "if_none_match",
    [
        INFO.etag,
        f"W/{INFO.etag}",  # If-None-Match compares weakly (RFC 9110, 13.1.2)
        "*",
        f'"other", {INFO.etag}',
        f'"other",W/{INFO.etag}',
        f'  "a" ,  "b",{INFO.etag}  ',
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_if_none_match_hit_is_not_modified(if_none_match: str, method: str) -> None:
    answer = plan({"if-none-match": if_none_match}, method=method)
    assert answer.status == 304
    assert answer.length == 0  # a 304 has no content (RFC 9110, 15.4.5)
    # ... but the ETag a 200 would have had (RFC 9110, 15.4.5).
    assert fields(answer)["etag"] == INFO.etag
    assert fields(answer)["last-modified"] == LAST_MODIFIED


@pytest.mark.parametrize(
    "if_none_match",
    ['"other"', f'W/"other", "x{INFO.etag[1:]}', INFO.etag[:-2] + '"', ""],
)
def test_if_none_match_miss_is_the_file(if_none_match: str) -> None:
    answer = plan({"if-none-match": if_none_match})
    assert answer.status == 200
    assert answer.length == SIZE


def test_if_none_match_wins_over_if_modified_since() -> None:
    # With If-None-Match present, If-Modified-Since is ignored (RFC 9110, 13.1.3, 13.2.2).
    answer = plan({"if-none-match": '"other"', "if-modified-since": LATER})
    assert answer.status == 200
    assert answer.length == SIZE


@pytest.mark.parametrize(
    ("if_modified_since", "status"),
    [
        (LAST_MODIFIED, 304),  # the Last-Modified sent: the fraction of a second is lost
        (LATER, 304),
        ("Sun, 32 Nov 2094 08:49:37 GMT", 200),  # not a date: ignored (RFC 9110, 13.1.3)
        (EARLIER, 200),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 200),
        ("yesterday", 200),
        ("", 200),
        # Recipients accept the obsolete formats too (RFC 9110, 5.6.7).
        ("Sunday, 06-Nov-94 08:49:37 GMT", 304),
        ("Sunday, 06-Nov-94 08:49:36 GMT", 200),
    ],
)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_if_modified_since(if_modified_since: str, status: int, method: str) -> None:
    answer = plan({"if-modified-since": if_modified_since}, method=method)
    assert answer.status == status
    assert fields(answer)["etag"] == INFO.etag


@contextmanager
def time_zone(tz: str) -> Iterator[None]:
    """The process's local time zone, for a while (a POSIX TZ string: no tzdata needed)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = tz
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_if_modified_since_asctime_in_utc() -> None:
    # asctime-date, the third format recipients accept (RFC 9110, 5.6.7).
    with time_zone("UTC0"):
        assert plan({"if-modified-since": "Sun Nov  6 08:49:37 1994"}).status == 304
        assert plan({"if-modified-since": "Sun Nov  6 08:49:36 1994"}).status == 200


def test_if_modified_since_asctime_is_utc_whatever_the_local_zone() -> None:
    # Every HTTP-date is UTC, asctime-date included (RFC 9110, 5.6.7).  The file changed
    # an hour after the client's copy: the client must get it, not a 304.
    changed = FileInfo.of(SIZE, (SECONDS + 3600) * 10**9, INODE)
    with time_zone("EST5"):  # five hours west of UTC
        answer = plan({"if-modified-since": "Sun Nov  6 08:49:37 1994"}, info=changed)
    assert answer.status == 200


def test_validators_round_trip() -> None:
    """What a 200 says, sent back, is what a client's cache relies on."""
    first = fields(plan())
    assert plan({"if-none-match": first["etag"]}).status == 304
    assert plan({"if-modified-since": first["last-modified"]}).status == 304
    for validator in (first["etag"], first["last-modified"]):
        resumed = plan({"range": "bytes=50-", "if-range": validator})
        assert resumed.status == 206
        assert (resumed.offset, resumed.length) == (50, 50)


def test_not_modified_comes_before_range() -> None:
    # If-None-Match is evaluated before Range/If-Range (RFC 9110, 13.2.2).
    answer = plan({"if-none-match": INFO.etag, "range": "bytes=0-9"})
    assert answer.status == 304
    assert answer.length == 0


@pytest.mark.parametrize(
    ("range_", "offset", "length", "content_range"),
    [
        ("bytes=0-9", 0, 10, "bytes 0-9/100"),
        ("bytes=0-0", 0, 1, "bytes 0-0/100"),
        ("bytes=99-99", 99, 1, "bytes 99-99/100"),
        ("bytes=5-", 5, 95, "bytes 5-99/100"),
        ("bytes=0-", 0, 100, "bytes 0-99/100"),
        ("bytes=-3", 97, 3, "bytes 97-99/100"),  # suffix: the last 3 bytes
        ("bytes=-100", 0, 100, "bytes 0-99/100"),
        # A suffix longer than the file is the whole file (RFC 9110, 14.1.1) ...
        ("bytes=-500", 0, 100, "bytes 0-99/100"),
        # ... and a last-pos beyond it is the last byte (RFC 9110, 14.1.1).
        ("bytes=90-500", 90, 10, "bytes 90-99/100"),
        ("bytes=90-99999999999999999999999", 90, 10, "bytes 90-99/100"),
        ("Bytes=0-9", 0, 10, "bytes 0-9/100"),  # range units are case-insensitive (14.1)
        ("bytes= 10-19 ", 10, 10, "bytes 10-19/100"),
    ],
)
def test_range_is_partial_content(
    range_: str, offset: int, length: int, content_range: str
) -> None:
    answer = plan({"range": range_})
    assert answer.status == 206
    assert (answer.offset, answer.length) == (offset, length)
    got = fields(answer)
    # Content-Range: bytes first-last/complete-length (RFC 9110, 14.4, 15.3.7).
    assert got["content-range"] == content_range
    assert got["content-length"] == str(length)
    assert got["content-type"] == "text/plain"
    assert got["etag"] == INFO.etag
    assert got["last-modified"] == LAST_MODIFIED


# "bytes=N-" with N >= size: rules.py computes last = size - 1 < first and takes that
# for a malformed range (ignored, 200) before it checks first >= size (416).
@pytest.mark.parametrize(
    ("range_", "size"),
    [
        ("bytes=-0", SIZE),  # a zero-length suffix is unsatisfiable (RFC 9110, 14.1.1)
        ("bytes=100-", SIZE),
        ("bytes=500-", SIZE),
        ("bytes=100-100", SIZE),  # first-pos at or past the end (RFC 9110, 14.1.1)
        ("bytes=1000-2000", SIZE),
        # Nothing in an empty file is satisfiable (RFC 9110, 14.1.1).
        ("bytes=0-", 0),
        ("bytes=0-0", 0),
        ("bytes=-5", 0),
    ],
)
def test_unsatisfiable_range(range_: str, size: int) -> None:
    answer = plan({"range": range_}, info=FileInfo.of(size, MTIME_NS, INODE))
    assert answer.status == 416
    assert answer.length == 0
    got = fields(answer)
    # 416 says the current length: "bytes */complete-length" (RFC 9110, 15.5.17).
    assert got["content-range"] == f"bytes */{size}"
    assert got["content-length"] == "0"


@pytest.mark.parametrize(
    "range_",
    [
        "bytes=0-1,3-4",  # several ranges: the whole file is a valid answer (RFC 9110, 14.2)
        "bytes=0-1, 3-4",
        "items=0-1",  # a unit not understood MUST be ignored (RFC 9110, 14.2)
        "bytes=abc",
        "bytes=5-2",  # last-pos < first-pos: invalid (RFC 9110, 14.1.1)
        "bytes=",
        "bytes=-",
        "bytes",
        "0-9",
        "bytes=-abc",
        "bytes=a1-",
        "bytes=5-abc",
        "bytes=0-9;x",
        "",
    ],
)
def test_ignored_range_is_the_whole_file(range_: str) -> None:
    answer = plan({"range": range_})
    assert answer.status == 200
    assert (answer.offset, answer.length) == (0, SIZE)
    assert fields(answer)["content-length"] == str(SIZE)
    assert "content-range" not in fields(answer)


@pytest.mark.parametrize(
    "range_",
    [
        "bytes=x-1",
        "bytes=0x1-2",
        "bytes=\xb2-",  # "²" (latin-1 0xB2): str.isdigit() says yes, int() says no
        "bytes=0-\xb2",
        "bytes=-\xb9",
    ],
)
def test_range_with_bad_numbers_is_answered(range_: str) -> None:
    # An invalid ranges-specifier may be ignored (200) or refused (416) (RFC 9110, 14.2).
    assert plan({"range": range_}).status in (200, 416)


@pytest.mark.parametrize(
    ("if_range", "status"),
    [
        (INFO.etag, 206),  # the client's copy is current: the range (RFC 9110, 13.1.5)
        ('"stale"', 200),  # it is not: the whole file
        (FileInfo.of(SIZE, MTIME_NS + 1, INODE).etag, 200),
        (f"W/{INFO.etag}", 200),  # If-Range needs the strong comparison (13.1.5)
        (LAST_MODIFIED, 206),  # the exact Last-Modified date
        (EARLIER, 200),
        (LATER, 200),  # not exactly the date: the whole file (RFC 9110, 13.1.5)
        ("garbage", 200),
        ("", 200),
    ],
)
def test_if_range(if_range: str, status: int) -> None:
    answer = plan({"range": "bytes=10-19", "if-range": if_range})
    assert answer.status == status
    got = fields(answer)
    if status == 206:
        assert (answer.offset, answer.length) == (10, 10)
        assert got["content-range"] == "bytes 10-19/100"
        assert got["content-length"] == "10"
    else:
        assert (answer.offset, answer.length) == (0, SIZE)
        assert got["content-length"] == str(SIZE)
        assert "content-range" not in got


def test_if_range_stale_with_unsatisfiable_range_is_the_file() -> None:
    # A failed If-Range means "send me the whole new file", not 416.
    answer = plan({"range": "bytes=500-", "if-range": '"stale"'})
    assert answer.status == 200
    assert answer.length == SIZE


def test_if_range_without_range_is_ignored() -> None:
    # RFC 9110, 13.1.5: If-Range without Range MUST be ignored.
    answer = plan({"if-range": INFO.etag})
    assert answer.status == 200
    assert answer.length == SIZE


@pytest.mark.parametrize(
    "precondition",
    [
        {"if-match": '"other"'},  # RFC 9110, 13.1.1: the origin MUST evaluate it
        {"if-unmodified-since": EARLIER},  # RFC 9110, 13.1.4: likewise
    ],
    ids=["if-match", "if-unmodified-since"],
)
def test_failed_precondition(precondition: dict[str, str]) -> None:
    assert plan(precondition).status == 412  # RFC 9110, 13.2.2 steps 1-2, 15.5.13


# -- content_type ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("index.html", "text/html"),
        ("INDEX.HTML", "text/html"),
        ("notes.txt", "text/plain"),
        ("style.css", "text/css"),
        ("image.png", "image/png"),
        ("Photo.PNG", "image/png"),
        ("data.json", "application/json"),
        ("file.unknownext", "application/octet-stream"),
        ("Makefile", "application/octet-stream"),
        (".bashrc", "application/octet-stream"),
        ("", "application/octet-stream"),
    ],
)
def test_content_type(name: str, kind: str) -> None:
    assert content_type(name) == kind


def test_content_type_of_javascript() -> None:
    # Python 3.12 moved .js from application/javascript to text/javascript (RFC 9239).
    assert content_type("app.js") in ("text/javascript", "application/javascript")


@pytest.mark.parametrize("name", ["notes.txt.gz", "backup.tar.gz", "page.html.bz2"])
def test_content_type_of_a_compressed_file(name: str) -> None:
    # The bytes sent are compressed; their media type is not that of what they hold
    # (RFC 9110, 8.3 and 8.4).
    assert content_type(name) not in ("text/plain", "application/x-tar", "text/html")


# -- listing --------------------------------------------------------------------------------

WHEN = float(SECONDS)


def hrefs(page: bytes) -> list[str]:
    return re.findall(r'href="([^"]*)"', page.decode("utf-8"))


def test_listing_is_utf8_html() -> None:
    page = listing("/docs/", [Entry("café.txt", False, 5, WHEN)])
    assert isinstance(page, bytes)
    text = page.decode("utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in text
    assert "<title>Index of /docs/</title>" in text
    assert "<h1>Index of /docs/</h1>" in text
    assert ">café.txt</a>" in text
    assert f"<td>5</td><td>{LAST_MODIFIED}</td>" in text


def test_listing_escapes_names_in_text_and_href() -> None:
    # A file may be called anything but "/" and NUL: no name may become markup.
    name = "<b>&\"'x.txt"
    text = listing("/", [Entry(name, False, 1, WHEN)]).decode("utf-8")
    assert "<b>" not in text
    assert "&lt;b&gt;&amp;&quot;&#x27;x.txt</a>" in text
    assert hrefs(text.encode()) == ["%3Cb%3E%26%22%27x.txt"]


@pytest.mark.parametrize(
    ("name", "is_dir", "href"),
    [
        ("a b.txt", False, "a%20b.txt"),
        ("a#b.txt", False, "a%23b.txt"),  # not a fragment
        ("a?b.txt", False, "a%3Fb.txt"),  # not a query
        ("50%.txt", False, "50%25.txt"),
        ("café.txt", False, "caf%C3%A9.txt"),  # UTF-8, percent-encoded
        ("日本", True, "%E6%97%A5%E6%9C%AC/"),
        ("javascript:alert(1)", False, "javascript%3Aalert%281%29"),  # never a scheme
        ("my dir", True, "my%20dir/"),
    ],
)
def test_listing_href_is_percent_encoded(name: str, is_dir: bool, href: str) -> None:
    page = listing("/", [Entry(name, is_dir, 0, WHEN)])
    assert hrefs(page) == [href]
    # The link, followed, names this entry again.
    assert target_parts(b"/" + href.encode("ascii")) == ((name,), is_dir)


def test_listing_html_title_is_escaped() -> None:
    text = listing("/<i>&/", []).decode("utf-8")
    assert "<i>" not in text
    assert "<title>Index of /&lt;i&gt;&amp;/</title>" in text


def test_listing_directories_first_with_a_slash() -> None:
    entries = [
        Entry("b.txt", False, 2, WHEN),
        Entry("zdir", True, 4096, WHEN),
        Entry("a.txt", False, 1, WHEN),
        Entry("adir", True, 4096, WHEN),
    ]
    page = listing("/", entries)
    assert hrefs(page) == ["adir/", "zdir/", "a.txt", "b.txt"]
    text = page.decode("utf-8")
    assert ">adir/</a></td><td>-</td>" in text  # no size for a directory
    assert ">b.txt</a></td><td>2</td>" in text


def test_listing_parent_link_only_below_the_root() -> None:
    assert hrefs(listing("/", [Entry("a", False, 0, WHEN)])) == ["a"]
    assert hrefs(listing("/sub/", [Entry("a", False, 0, WHEN)])) == ["../", "a"]
    assert hrefs(listing("/sub/deeper/", [])) == ["../"]


def test_listing_of_a_name_that_is_not_utf8() -> None:
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")  # what os.scandir yields
    page = listing("/", [Entry(name, False, 1, WHEN), Entry("ok.txt", False, 1, WHEN)])
    assert "ok.txt" in hrefs(page)


# -- error_body, display_path, http_date -------------------------------------------------


def test_error_body() -> None:
    assert error_body(404, "no such file") == b"404 no such file\n"
    assert error_body(403, "the path leads outside the served directory") == (
        b"403 the path leads outside the served directory\n"
    )
    assert error_body(400, "café") == "400 café\n".encode()


@pytest.mark.parametrize(
    ("parts", "is_dir", "shown"),
    [
        ((), True, "/"),
        ((), False, "/"),
        (("a",), False, "/a"),
        (("a",), True, "/a/"),
        (("a", "b", "c.txt"), False, "/a/b/c.txt"),
        (("a", "b"), True, "/a/b/"),
        (("café", "<x>"), True, "/café/<x>/"),  # decoded, not escaped: for titles and logs
    ],
)
def test_display_path(parts: tuple[str, ...], is_dir: bool, shown: str) -> None:
    assert display_path(parts, is_dir) == shown


def test_display_path_of_a_target() -> None:
    assert display_path(*target_parts(b"/a/./b/../c%20d/?x")) == "/a/c d/"


# IMF-fixdate = day-name "," SP date1 SP time-of-day SP GMT (RFC 9110, 5.6.7)
IMF_FIXDATE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT"
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (SECONDS, "Sun, 06 Nov 1994 08:49:37 GMT"),  # RFC 9110, 5.6.7's own example
        (SECONDS + 0.999, "Sun, 06 Nov 1994 08:49:37 GMT"),  # whole seconds, not rounded
        (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
        (951_782_400, "Tue, 29 Feb 2000 00:00:00 GMT"),
        (4_102_444_799, "Thu, 31 Dec 2099 23:59:59 GMT"),
    ],
)
def test_http_date(seconds: float, text: str) -> None:
    assert http_date(seconds) == text
    assert IMF_FIXDATE.fullmatch(http_date(seconds))


def test_http_date_is_utc_whatever_the_local_zone() -> None:
    with time_zone("JST-9"):
        assert http_date(SECONDS) == LAST_MODIFIED
