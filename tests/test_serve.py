"""``ktls serve`` as users run it: a real subprocess, real clients (curl, Python's
``http.client`` and ``ssl``), real files checked by SHA-256, on both engines.

The server runs without CAP_DAC_OVERRIDE when the tests run as root (``setpriv``), as a
file server should: a file with mode 000 is then unreadable to it as it would be to
any unprivileged server.  Kernel-engine claims are read from the kernel:
``/proc/net/tls_stat`` deltas and the server process's own I/O counters.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import resource
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ktls.kernel import read_tls_stat

from .conftest import ENGINES
from .peers import Certs, io_counter

TIMEOUT = 60  # seconds any one server or client may take: a bug fails, it does not hang
BIG = 5 * 1024 * 1024 + 123  # "several MiB", not a multiple of a record
SECRET = b"the secret outside the root\n"

# Raise the fd limit for this process's clients (and the servers it starts) once.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < 8192 and (_hard == resource.RLIM_INFINITY or _hard >= 8192):
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, _hard))


def _no_dac_override() -> list[str]:
    """As root, run the server without the capabilities that bypass file modes."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]


# -- the served tree ------------------------------------------------------------------------


@dataclass
class Tree:
    base: Path
    root: Path
    digests: dict[str, str]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    base = tmp_path_factory.mktemp("serve")
    root = base / "www"
    root.mkdir()
    (base / "secret.txt").write_bytes(SECRET)
    (base / "private").mkdir()
    (base / "private" / "secret.txt").write_bytes(SECRET)
    files = {
        "hello.txt": b"hello, world\n",
        "empty.txt": b"",
        "big.bin": os.urandom(BIG),
        "quarter.bin": os.urandom(256 * 1024),
        "page.html": b"<p>hi</p>\n",
        "sub/<b>&'\".txt": b"markup in a name\n",
        "sub/a b#?%.txt": b"reserved characters in a name\n",
        "sub/caf\u00e9.txt": b"non-ASCII name\n",
        "sub/deeper/x.txt": b"x\n",
        "site/index.html": b"<h1>the index</h1>\n",
        "unreadable.txt": b"mode 000\n",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "unreadable.txt").chmod(0)
    os.mkfifo(root / "fifo")
    (root / "inside-link.txt").symlink_to("hello.txt")
    (root / "outside-link.txt").symlink_to(base / "secret.txt")
    (root / "outside-dir").symlink_to(base / "private")
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    return Tree(base, root, digests)


# -- the server ------------------------------------------------------------------------------


@dataclass
class Served:
    """A running ``ktls serve`` and what it printed."""

    process: subprocess.Popen[str]
    engine: str
    port: int
    cert: Path
    access_log: Path
    banner: list[str]
    output: list[str] = field(default_factory=list)
    collector: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def settled_fds(self, certs: Certs) -> int:
        """The server's descriptors once its event loop runs (after a first request)."""
        assert request(self, certs, "/hello.txt").status == 200
        count, steady_since = self.fds(), time.monotonic()
        while time.monotonic() - steady_since < 0.5:  # (that connection's close)
            time.sleep(0.05)
            if self.fds() != count:
                count, steady_since = self.fds(), time.monotonic()
        return count

    def io(self, name: str) -> int:
        return io_counter(str(self.process.pid), name)

    def log_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines()

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        """Signal it; its exit status and everything it printed after the banner."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        status = self.process.wait(TIMEOUT)
        if self.collector is not None:
            self.collector.join(TIMEOUT)
        assert self.process.stdout is not None
        self.process.stdout.close()
        return status, "".join(self.output)


def start_server(root: Path, cert: Path | None, engine: str, tmp: Path, *options: str) -> Served:
    """``ktls serve ROOT --port 0 …``; returns once it printed its banner."""
    access_log = tmp / f"access-{time.monotonic_ns()}.log"
    argv = [*_no_dac_override(), sys.executable, "-m", "ktls", "serve", str(root),
            "--port", "0", "--workers", "1", "--offload", engine,
            "--access-log", str(access_log)]  # fmt: skip
    if cert is not None:
        argv += ["--cert", str(cert)]
    argv += options
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert process.stdout is not None
    banner: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            process.wait(TIMEOUT)
            raise AssertionError(f"ktls serve exited {process.returncode}: {banner}")
        banner.append(line)
        if line.startswith("records:"):
            break
    found = re.search(r"https://localhost:(\d+)/", banner[0])
    assert found, banner
    served = Served(process, engine, int(found.group(1)), Path(), access_log, banner)
    cert_line = re.search(r"^certificate: (\S+) ", banner[1])
    assert cert_line, banner
    served.cert = Path(cert_line.group(1))

    def collect() -> None:
        assert process.stdout is not None
        served.output.extend(process.stdout)

    served.collector = threading.Thread(target=collect, daemon=True)
    served.collector.start()
    return served


@contextlib.contextmanager
def serving(tree: Tree, certs: Certs, engine: str, *options: str) -> Iterator[Served]:
    served = start_server(tree.root, certs.server_ecdsa, engine, tree.base, *options)
    try:
        yield served
    finally:
        served.stop(signal.SIGKILL)


@pytest.fixture(scope="module", params=ENGINES)
def served(request: pytest.FixtureRequest, tree: Tree, certs: Certs) -> Iterator[Served]:
    """One server per engine for the module's request tests."""
    with serving(tree, certs, request.param) as server:
        yield server


# -- clients ---------------------------------------------------------------------------------


def client_context(certs: Certs, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if maximum is not None:
        context.maximum_version = maximum
    return context


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def request(
    served: Served,
    certs: Certs,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPSConnection | None = None,
) -> Reply:
    """One request with http.client (on ``conn`` when given: keep-alive)."""
    own = conn is None
    if conn is None:
        conn = http.client.HTTPSConnection(
            "localhost", served.port, context=client_context(certs), timeout=TIMEOUT
        )
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        if own:
            conn.close()


@contextlib.contextmanager
def tls_to(port: int, context: ssl.SSLContext) -> Iterator[ssl.SSLSocket]:
    """A Python ``ssl`` client connection to 127.0.0.1:``port``."""
    plain = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    with context.wrap_socket(plain, server_hostname="localhost") as tls:
        yield tls


def raw_request(served: Served, certs: Certs, target: bytes) -> tuple[int, bytes]:
    """The exact request target, unnormalised (clients clean up ".." themselves):
    the status and the whole answer."""
    line = b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    answer = exchange(served, certs, line)
    status = int(answer.split(b" ", 2)[1])
    return status, answer


def exchange(served: Served, certs: Certs, data: bytes) -> bytes:
    """Send ``data`` on a new TLS connection; everything the server answers until it
    closes (or resets)."""
    answer = b""
    with tls_to(served.port, client_context(certs)) as tls:
        tls.sendall(data)
        with contextlib.suppress(OSError):
            while chunk := tls.recv(65536):
                answer += chunk
    return answer


def curl(served: Served, certs: Certs, *args: str) -> subprocess.CompletedProcess[bytes]:
    argv = ["curl", "-sS", "--cacert", str(certs.ca), *args]
    return subprocess.run(argv, capture_output=True, timeout=TIMEOUT, check=False)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


# -- what users see first ---------------------------------------------------------------------


def test_banner_self_signed_curl_line_works(tree: Tree, tmp_path: Path) -> None:
    """Without --cert: a fresh certificate; the banner's fingerprint is that
    certificate's, and its curl line, run as printed, fetches the directory."""
    served = start_server(tree.root, None, "software", tmp_path)
    try:
        text = "".join(served.banner)
        assert f"{served.url}/" in text
        cert = x509.load_pem_x509_certificate(served.cert.read_bytes())
        digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest().upper()
        shown = re.search(r"SHA-256 ([0-9A-F:]+)", text)
        assert shown, text
        assert shown.group(1).replace(":", "") == digest
        line = re.search(r"try: (curl .*)$", text, re.MULTILINE)
        assert line, text
        done = subprocess.run(
            [*line.group(1).split(), "-sS"], capture_output=True, timeout=TIMEOUT, check=False
        )
        assert done.returncode == 0, done.stderr
        assert b"hello.txt" in done.stdout
        assert "records: software engine both ways (--offload software)" in text
    finally:
        status, _ = served.stop()
    assert status == 0
    assert not served.cert.exists()  # the generated key does not outlive the server


def test_banner_names_the_engines(served: Served) -> None:
    text = "".join(served.banner)
    if served.engine == "kernel":
        assert re.search(
            r"records: kernel engine both ways on Linux \S+ "
            r"for TLSv1\.2: .*; TLSv1\.3: .*AES-128-GCM",
            text,
        )
    else:
        assert "software engine both ways" in text


def test_alpn_is_http11(served: Served, certs: Certs) -> None:
    context = client_context(certs)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with tls_to(served.port, context) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"


# -- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hello.txt", "empty.txt", "big.bin", "quarter.bin"])
def test_whole_files_by_curl(served: Served, certs: Certs, tree: Tree, name: str) -> None:
    done = curl(served, certs, f"{served.url}/{name}")
    assert done.returncode == 0, done.stderr
    assert sha256(done.stdout) == tree.digests[name]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_whole_file_by_http_client(
    served: Served, certs: Certs, tree: Tree, version: ssl.TLSVersion
) -> None:
    conn = http.client.HTTPSConnection(
        "localhost", served.port, context=client_context(certs, version), timeout=TIMEOUT
    )
    with contextlib.closing(conn):
        reply = request(served, certs, "/big.bin", conn=conn)
        assert reply.status == 200
        assert reply.headers["Content-Length"] == str(BIG)
        assert reply.headers["Content-Type"] == "application/octet-stream"
        assert sha256(reply.body) == tree.digests["big.bin"]
        assert conn.sock.version() == version.name.replace("_", ".")


def test_head_and_headers(served: Served, certs: Certs) -> None:
    get = request(served, certs, "/page.html")
    head = request(served, certs, "/page.html", "HEAD")
    assert head.status == get.status == 200
    assert head.body == b""
    for name in ("Content-Length", "Content-Type", "ETag", "Last-Modified", "Accept-Ranges"):
        assert head.headers[name] == get.headers[name], name
    assert get.headers["Content-Type"] == "text/html"
    assert get.headers["Server"].startswith("ktls/")


def test_ranges(served: Served, certs: Certs, tree: Tree) -> None:
    data = (tree.root / "big.bin").read_bytes()
    done = curl(served, certs, "-r", "1000-1999", f"{served.url}/big.bin")
    assert done.stdout == data[1000:2000]
    tail = request(served, certs, "/big.bin", headers={"Range": "bytes=-100"})
    assert tail.status == 206
    assert tail.body == data[-100:]
    assert tail.headers["Content-Range"] == f"bytes {BIG - 100}-{BIG - 1}/{BIG}"
    middle = request(served, certs, "/big.bin", headers={"Range": "bytes=4000000-"})
    assert middle.status == 206
    assert middle.body == data[4000000:]
    beyond = request(served, certs, "/big.bin", headers={"Range": f"bytes={BIG}-"})
    assert beyond.status == 416
    assert beyond.headers["Content-Range"] == f"bytes */{BIG}"
    etag = request(served, certs, "/hello.txt", "HEAD").headers["ETag"]
    current = request(served, certs, "/hello.txt", headers={"Range": "bytes=0-4", "If-Range": etag})
    assert (current.status, current.body) == (206, b"hello")
    stale = request(
        served, certs, "/hello.txt", headers={"Range": "bytes=0-4", "If-Range": '"old"'}
    )
    assert (stale.status, stale.body) == (200, b"hello, world\n")


def test_conditional_requests(served: Served, certs: Certs) -> None:
    first = request(served, certs, "/hello.txt")
    etag, modified = first.headers["ETag"], first.headers["Last-Modified"]
    again = request(served, certs, "/hello.txt", headers={"If-None-Match": etag})
    assert (again.status, again.body, again.headers["ETag"]) == (304, b"", etag)
    dated = request(served, certs, "/hello.txt", headers={"If-Modified-Since": modified})
    assert dated.status == 304
    other = request(served, certs, "/hello.txt", headers={"If-None-Match": '"other"'})
    assert (other.status, other.body) == (200, b"hello, world\n")


def test_errors_have_short_bodies(served: Served, certs: Certs) -> None:
    missing = request(served, certs, "/no-such-file")
    assert (missing.status, missing.body) == (404, b"404 not found\n")
    post = request(served, certs, "/hello.txt", "POST")
    assert post.status == 405
    assert post.headers["Allow"] == "GET, HEAD"
    unreadable = request(served, certs, "/unreadable.txt")
    assert unreadable.status == 403
    assert b"mode 000" not in unreadable.body
    fifo = request(served, certs, "/fifo")  # opening must not block the server
    assert fifo.status == 403


def test_directories(served: Served, certs: Certs) -> None:
    redirect = request(served, certs, "/sub")
    assert redirect.status == 301
    assert redirect.headers["Location"] == "/sub/"
    index = request(served, certs, "/site/")
    assert (index.status, index.body) == (200, b"<h1>the index</h1>\n")
    page = request(served, certs, "/sub/")
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    text = page.body.decode()
    assert "&lt;b&gt;&amp;&#x27;&quot;.txt" in text  # escaped, never markup
    assert "<b>" not in text
    assert 'href="a%20b%23%3F%25.txt"' in text
    assert 'href="deeper/"' in text
    assert "caf\u00e9.txt" in text
    top = request(served, certs, "/").body.decode()
    assert "inside-link.txt" in top
    assert "outside-link.txt" not in top  # (not even its size and date)
    assert "outside-dir" not in top
    # ... and each link leads to its file.
    for href, body in [
        ("a%20b%23%3F%25.txt", b"reserved characters in a name\n"),
        ("caf%C3%A9.txt", b"non-ASCII name\n"),
        ("%3Cb%3E%26%27%22.txt", b"markup in a name\n"),
    ]:
        assert request(served, certs, "/sub/" + href).body == body


@pytest.mark.parametrize(
    ("target", "statuses"),
    [
        (b"/../secret.txt", {403}),
        (b"/%2e%2e/secret.txt", {403}),
        (b"/%2E%2E/secret.txt", {403}),
        (b"/.%2e/secret.txt", {403}),
        (b"/sub/../../secret.txt", {403}),
        (b"/%2e%2e%2fsecret.txt", {403}),
        (b"/..%2f..%2fsecret.txt", {403}),
        (b"/sub/..%5c..%5csecret.txt", {404}),  # a backslash is a name character here
        (b"/%252e%252e/secret.txt", {404}),  # decoded once: a directory named "%2e%2e"
        (b"/hello.txt%00.html", {400}),
        (b"/%ff", {400}),
        (b"/outside-link.txt", {403}),  # symbolic links out of the root are not followed
        (b"/outside-dir/secret.txt", {403}),
        (b"//etc/passwd", {404}),
    ],
)
def test_no_path_escapes_the_root(
    served: Served, certs: Certs, target: bytes, statuses: set[int]
) -> None:
    status, answer = raw_request(served, certs, target)
    assert status in statuses, answer[:200]
    assert SECRET not in answer


def test_links_inside_the_root_are_served(served: Served, certs: Certs) -> None:
    assert request(served, certs, "/inside-link.txt").body == b"hello, world\n"


def test_follow_symlinks_option(tree: Tree, certs: Certs) -> None:
    with serving(tree, certs, "software", "--follow-symlinks") as served:
        assert request(served, certs, "/outside-link.txt").body == SECRET
        assert request(served, certs, "/outside-dir/secret.txt").body == SECRET


def test_listing_shows_links_out_when_followed(tree: Tree, certs: Certs) -> None:
    with serving(tree, certs, "software", "--follow-symlinks") as served:
        top = request(served, certs, "/").body.decode()
        assert "outside-link.txt" in top
        assert 'href="outside-dir/"' in top


def test_no_listing_option(tree: Tree, certs: Certs) -> None:
    with serving(tree, certs, "software", "--no-listing") as served:
        assert request(served, certs, "/sub/").status == 403
        assert request(served, certs, "/site/").body == b"<h1>the index</h1>\n"


def test_certificates_chosen_by_sni(tree: Tree, certs: Certs, tmp_path: Path) -> None:
    """Several --cert: the first for clients without a known name, each other for the
    names its certificate carries (wildcards too)."""
    ca = trustme.CA()
    other = tmp_path / "other.pem"
    ca.issue_cert("other.test", "*.wild.test").private_key_and_cert_chain_pem.write_to_path(
        str(other)
    )
    both = tmp_path / "both-cas.pem"
    both.write_bytes(certs.ca.read_bytes() + ca.cert_pem.bytes())
    with serving(tree, certs, "software", "--cert", str(other)) as served:
        assert "for SNI other.test, *.wild.test" in "".join(served.banner)
        for host in ("other.test", "a.wild.test", "localhost"):
            done = subprocess.run(
                [
                    "curl",
                    "-sS",
                    "--cacert",
                    str(both),
                    "--resolve",
                    f"{host}:{served.port}:127.0.0.1",
                    f"https://{host}:{served.port}/hello.txt",
                ],
                capture_output=True,
                timeout=TIMEOUT,
                check=False,
            )
            assert (done.returncode, done.stdout) == (0, b"hello, world\n"), done.stderr
        context = ssl.create_default_context(cafile=str(both))
        with tls_to(served.port, context) as tls:  # (tls_to asks for "localhost")
            peer = tls.getpeercert()
            assert peer is not None
            assert ("DNS", "localhost") in peer["subjectAltName"]


# -- connections -----------------------------------------------------------------------------


def test_keep_alive_many_requests_one_connection(served: Served, certs: Certs) -> None:
    conn = http.client.HTTPSConnection(
        "localhost", served.port, context=client_context(certs), timeout=TIMEOUT
    )
    with contextlib.closing(conn):
        for i in range(200):
            path = ["/hello.txt", "/quarter.bin", "/sub/", "/no-such-file"][i % 4]
            reply = request(served, certs, path, conn=conn)
            assert reply.status == (404 if path == "/no-such-file" else 200)
        first_socket = conn.sock
        assert request(served, certs, "/hello.txt", conn=conn).status == 200
        assert conn.sock is first_socket  # still the one connection


def test_pipelined_requests_answered_in_order(served: Served, certs: Certs) -> None:
    names = ["hello.txt", "page.html", "no-such", "hello.txt"]
    data = b"".join(f"GET /{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for n in names)
    data = data[:-4] + b"\r\nConnection: close\r\n\r\n"
    answer = exchange(served, certs, data)  # all at once: one record
    statuses = re.findall(rb"^HTTP/1\.1 (\d+) ", answer, re.MULTILINE)
    assert statuses == [b"200", b"200", b"404", b"200"]
    assert answer.index(b"hello, world") < answer.index(b"<p>hi</p>")


def test_access_log(served: Served, certs: Certs) -> None:
    request(served, certs, "/hello.txt?x=1")
    engine = served.engine
    pattern = (
        r"^127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "
        rf'"GET /hello\.txt\?x=1 HTTP/1\.1" 200 13 engine={engine}/{engine}$'
    )
    wait_until(lambda: any(re.match(pattern, line) for line in served.log_lines()), "the log line")


def test_access_log_escapes_what_could_forge_a_line(served: Served, certs: Certs) -> None:
    status, _ = raw_request(served, certs, b'/x"\\.txt')
    assert status == 404
    wait_until(
        lambda: any('"GET /x\\x22\\x5C.txt HTTP/1.1" 404' in line for line in served.log_lines()),
        f"the escaped line; the log ends: {served.log_lines()[-2:]}",
    )


# -- records on the wire ---------------------------------------------------------------------


class RecordTap:
    """A TCP relay between a client and the server that notes the type and length of
    every TLS record the server sends, and can spoil the client's first application
    data record (one flipped bit in its authentication tag)."""

    def __init__(self, port: int, spoil: bool = False) -> None:
        self.server_port = port
        self.spoil = spoil
        self.records: list[tuple[int, int]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.server_port))
        up = threading.Thread(target=self._client_to_server, args=(client, server))
        up.start()
        self._server_to_client(server, client)
        up.join()
        client.close()
        server.close()
        self.listener.close()

    @staticmethod
    def _records(source: socket.socket) -> Iterator[bytes]:
        buffer = b""
        while True:
            while len(buffer) >= 5 and len(buffer) >= 5 + struct.unpack("!H", buffer[3:5])[0]:
                size = 5 + struct.unpack("!H", buffer[3:5])[0]
                yield buffer[:size]
                buffer = buffer[size:]
            try:
                chunk = source.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        for record in self._records(client):
            data = record
            if self.spoil and record[0] == 23:
                data = record[:-1] + bytes([record[-1] ^ 1])
                self.spoil = False
            with contextlib.suppress(OSError):
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _server_to_client(self, server: socket.socket, client: socket.socket) -> None:
        for record in self._records(server):
            self.records.append((record[0], len(record) - 5))
            with contextlib.suppress(OSError):
                client.sendall(record)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)


def test_small_response_is_one_record_large_is_full_records(
    served: Served, certs: Certs, tree: Tree
) -> None:
    """TLS 1.2 (no tickets after the handshake): a small file's headers and body leave
    as one record; a large file's body as full records (16384 bytes of plaintext, plus
    AES-GCM's 8-byte explicit nonce and 16-byte tag) after the headers' record."""
    tap = RecordTap(served.port)
    context = client_context(certs, ssl.TLSVersion.TLSv1_2)
    context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    with tls_to(tap.port, context) as tls:
        seen = len(tap.records)
        tls.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b"hello, world\n"):
            reply += tls.recv(65536)
        wait_until(lambda: len(tap.records) > seen, "the record")
        small = tap.records[seen:]
        seen = len(tap.records)
        tls.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while tls.recv(1 << 16):
            pass
    tap.thread.join(TIMEOUT)
    assert small == [(23, 24 + len(reply))], small
    big = [length for kind, length in tap.records[seen:] if kind == 23]  # (not the alert)
    assert big[0] < 400  # the headers alone
    body = big[1:]
    assert body[:-1] == [16384 + 24] * (len(body) - 1)
    assert sum(length - 24 for length in body) == BIG


def test_a_tampered_record_ends_that_connection_only(served: Served, certs: Certs) -> None:
    tap = RecordTap(served.port, spoil=True)
    context = client_context(certs, ssl.TLSVersion.TLSv1_2)
    with tls_to(tap.port, context) as tls:
        tls.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ssl.SSLError, match=r"BAD_RECORD_MAC|bad record mac"):
            tls.recv(100)
    assert request(served, certs, "/hello.txt").status == 200


# -- the kernel's evidence --------------------------------------------------------------------


@pytest.mark.kernel
def test_kernel_carries_the_records_and_sendfile_the_bodies(tree: Tree, certs: Certs) -> None:
    """The kernel's counters: one TX and one RX kernel context per connection, and the
    server process wrote the 5 MiB by sendfile (its write count grew by the size while
    it made almost no read calls: the file's pages never passed through Python)."""
    with serving(tree, certs, "kernel") as served:
        before = read_tls_stat()
        reads, written = served.io("syscr"), served.io("wchar")
        done = curl(served, certs, f"{served.url}/big.bin")
        assert sha256(done.stdout) == tree.digests["big.bin"]
        after = read_tls_stat()
        assert before is not None
        assert after is not None
        assert after["TlsTxSw"] - before["TlsTxSw"] == 1
        assert after["TlsRxSw"] - before["TlsRxSw"] == 1
        assert served.io("wchar") - written >= BIG
        assert served.io("syscr") - reads < 50
        status, output = served.stop()
    assert status == 0
    assert "served: connections (tx/rx engine): 1 kernel/kernel; body bytes: " in output
    assert re.search(r"tls_stat changes: .*TlsTxSw \+1", output), output


def test_software_engine_serves_the_same_bytes(tree: Tree, certs: Certs) -> None:
    """--offload software: the same bytes, and the kernel's TLS layer untouched."""
    with serving(tree, certs, "software") as served:
        before = read_tls_stat()
        done = curl(served, certs, f"{served.url}/big.bin")
        assert sha256(done.stdout) == tree.digests["big.bin"]
        assert read_tls_stat() == before
        status, output = served.stop()
    assert status == 0
    assert "served: connections (tx/rx engine): 1 software/software" in output


# -- faults ----------------------------------------------------------------------------------


def _tls(served: Served, certs: Certs) -> ssl.SSLSocket:
    plain = socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT)
    return client_context(certs).wrap_socket(plain, server_hostname="localhost")


def test_slowloris_is_dropped_others_served(tree: Tree, certs: Certs, engine: str) -> None:
    """A client dribbling its headers gets 408 after --header-timeout; one that sends
    nothing after the handshake is closed after --idle-timeout; one that never starts
    the handshake after --handshake-timeout; everyone else is served meanwhile."""
    options = ("--header-timeout", "1", "--idle-timeout", "2", "--handshake-timeout", "1")
    with serving(tree, certs, engine, *options) as served:
        baseline = served.settled_fds(certs)
        slow, idle = _tls(served, certs), _tls(served, certs)
        silent = socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT)
        started = time.monotonic()
        slow.sendall(b"GET /hello.txt HTTP/1.1\r\n")
        answer = b""
        served_meanwhile = 0
        with slow, idle, silent:
            slow.settimeout(0.2)
            while time.monotonic() - started < 10:
                with contextlib.suppress(OSError):
                    slow.sendall(b"X")  # one header byte at a time
                try:
                    chunk = slow.recv(4096)
                except TimeoutError:
                    chunk = None
                except OSError:
                    break
                if chunk == b"":
                    break
                answer += chunk or b""
                assert request(served, certs, "/hello.txt").status == 200
                served_meanwhile += 1
            took = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert 0.9 < took < 5
            assert served_meanwhile >= 3
            idle.settimeout(10)
            assert idle.recv(100) == b""  # closed (with close_notify), no answer
            assert time.monotonic() - started < 5
            silent.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert silent.recv(100) == b""
        wait_until(lambda: served.fds() <= baseline, "the server's fds back to the baseline")


def test_header_too_large_is_431(served: Served, certs: Certs) -> None:
    status, answer = raw_request(served, certs, b"/hello.txt?" + b"a" * 20000)
    assert status == 431, answer[:200]
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n"
    answer = exchange(served, certs, big)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_body_on_get_too_large_is_413(served: Served, certs: Certs) -> None:
    head = b"GET /hello.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    answer = exchange(served, certs, head + b"z" * 100000)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def test_malformed_request_is_400(served: Served, certs: Certs) -> None:
    answer = exchange(served, certs, b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]


def test_connection_limit_is_503(tree: Tree, certs: Certs) -> None:
    with serving(tree, certs, "software", "--max-connections", "2") as served:
        held = [
            http.client.HTTPSConnection(
                "localhost", served.port, context=client_context(certs), timeout=TIMEOUT
            )
            for _ in range(2)
        ]
        for conn in held:  # two connections the server has taken in, kept open
            assert request(served, certs, "/hello.txt", conn=conn).status == 200
        status, answer = raw_request(served, certs, b"/hello.txt")
        assert status == 503, answer
        for conn in held:
            conn.close()
        wait_until(lambda: raw_request(served, certs, b"/hello.txt")[0] == 200, "a free connection")


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP on the TLS port
        b"\x16\x03\x01\x00\x05hello",  # a handshake record that is no ClientHello
        b"\x16\x03\x01\xff\xff" + b"\0" * 100,  # a record longer than TLS allows
        os.urandom(2000),
    ],
    ids=["plain-http", "bad-hello", "oversized", "random"],
)
def test_garbage_instead_of_client_hello(served: Served, certs: Certs, garbage: bytes) -> None:
    baseline = served.settled_fds(certs)
    with (
        socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT) as plain,
        contextlib.suppress(ConnectionResetError, BrokenPipeError),
    ):
        plain.sendall(garbage)
        while plain.recv(4096):  # an alert perhaps, then the end
            pass
    assert request(served, certs, "/hello.txt").status == 200
    wait_until(lambda: served.fds() <= baseline, "the server's fds back to the baseline")


def test_client_reset_mid_transfer(tree: Tree, certs: Certs, engine: str) -> None:
    """A client that resets the connection in the middle of a sendfile costs the server
    that connection only (no fd left, others served)."""
    big = tree.root / f"reset-{engine}.bin"
    big.write_bytes(os.urandom(32 << 20))
    with serving(tree, certs, engine) as served:
        baseline = served.settled_fds(certs)
        for _ in range(3):
            tls = _tls(served, certs)
            tls.sendall(f"GET /{big.name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert tls.recv(65536)
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tls.close()  # RST
        assert request(served, certs, "/hello.txt").status == 200
        wait_until(lambda: served.fds() <= baseline, "the server's fds back to the baseline")
        status, _ = served.stop()
        assert status == 0
    big.unlink()


def test_file_truncated_during_transfer(tree: Tree, certs: Certs, engine: str) -> None:
    """A file that shrinks under a response: the response ends short and the
    connection closes (the only way to tell the client); the server goes on."""
    path = tree.root / f"shrinking-{engine}.bin"
    path.write_bytes(os.urandom(64 << 20))
    with serving(tree, certs, engine) as served:
        conn = http.client.HTTPSConnection(
            "localhost", served.port, context=client_context(certs), timeout=TIMEOUT
        )
        with contextlib.closing(conn):
            conn.request("GET", "/" + path.name)
            response = conn.getresponse()
            assert response.headers["Content-Length"] == str(64 << 20)
            assert len(response.read(1 << 20)) == 1 << 20
            os.truncate(path, 2 << 20)
            with pytest.raises(http.client.IncompleteRead):
                response.read()
        assert request(served, certs, "/hello.txt").status == 200
        path.unlink()
        assert request(served, certs, "/" + path.name).status == 404


def test_sigterm_lets_transfers_finish(tree: Tree, certs: Certs, engine: str) -> None:
    """SIGTERM: the listener closes at once (new connections refused), idle keep-alive
    connections close, a response under way completes; then the server exits 0 with
    its report."""
    path = tree.root / f"long-{engine}.bin"
    data = os.urandom(32 << 20)
    path.write_bytes(data)
    with serving(tree, certs, engine, "--shutdown-timeout", "30") as served:
        idle = http.client.HTTPSConnection(
            "localhost", served.port, context=client_context(certs), timeout=TIMEOUT
        )
        assert request(served, certs, "/hello.txt", conn=idle).status == 200
        conn = http.client.HTTPSConnection(
            "localhost", served.port, context=client_context(certs), timeout=TIMEOUT
        )
        conn.request("GET", "/" + path.name)
        response = conn.getresponse()
        body = response.read(1 << 16)
        served.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT).close()
        body += response.read()
        conn.close()
        assert sha256(body) == sha256(data)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            request(served, certs, "/hello.txt", conn=idle)
        idle.close()
        status, output = served.stop()
    assert status == 0
    assert re.search(r"served: connections \(tx/rx engine\): 2 ", output), output
    path.unlink()


class _Fetch:
    """One Python ``ssl`` client of fetch_all_at_once: a non-blocking socket and an
    SSLObject between memory buffers."""

    def __init__(self, port: int, context: ssl.SSLContext, request: bytes) -> None:
        self.sock = socket.socket()
        self.sock.setblocking(False)
        self.sock.connect_ex(("127.0.0.1", port))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.request: bytes | None = request
        self.unsent = b""
        self.head = b""
        self.left: int | None = None  # body bytes still to come, once the head is in
        self.digest = hashlib.sha256()

    def step(self, readable: bool) -> str | None:
        """Move what can move; the body's SHA-256 once it is complete."""
        if readable:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("the server closed before the whole body")
            self.incoming.write(data)
        try:
            if self.request is not None:
                self.tls.do_handshake()
                self.tls.write(self.request)
                self.request = None
            while self.left != 0 and (data := self.tls.read(65536)):
                self._take(data)
        except ssl.SSLWantReadError:
            pass
        self.unsent += self.outgoing.read()
        with contextlib.suppress(BlockingIOError):
            self.unsent = self.unsent[self.sock.send(self.unsent) :] if self.unsent else b""
        return self.digest.hexdigest() if self.left == 0 else None

    def _take(self, data: bytes) -> None:
        if self.left is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            self.head, _, data = self.head.partition(b"\r\n\r\n")
            assert self.head.startswith(b"HTTP/1.1 200 "), self.head
            length = re.search(rb"\r\nContent-Length: (\d+)", self.head)
            assert length, self.head
            self.left = int(length.group(1))
        self.digest.update(data)
        self.left -= len(data)


def fetch_all_at_once(port: int, context: ssl.SSLContext, path: str, count: int) -> list[str]:
    """``count`` Python ``ssl`` clients connected at once, each GETting ``path``: the
    SHA-256 of each body.  One thread, non-blocking sockets and ssl's MemoryBIO:
    asyncio's SSL transport keeps 256 KiB per connection, a quarter of the test
    kernel's memory at a thousand."""
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    clients = [_Fetch(port, context, request) for _ in range(count)]
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
    digests: list[str] = []
    deadline = time.monotonic() + 300
    while len(digests) < count:
        assert time.monotonic() < deadline, f"{len(digests)} of {count} done in 300 s"
        for key, events in selector.select(1):
            client = key.data
            digest = client.step(bool(events & selectors.EVENT_READ))
            if digest is not None:
                digests.append(digest)
                selector.unregister(client.sock)
                client.sock.close()
            else:
                wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.unsent else 0)
                if key.events != wanted:
                    selector.modify(client.sock, wanted, client)
    selector.close()
    return digests


def test_many_concurrent_connections(tree: Tree, certs: Certs, engine: str) -> None:
    """1,000 clients at once, each fetching a 256 KiB file: every byte right, and the
    server holds no more descriptors afterwards than before."""
    with serving(tree, certs, engine, "--max-connections", "1100") as served:
        baseline = served.settled_fds(certs)
        expected = tree.digests["quarter.bin"]
        context = client_context(certs)

        digests = fetch_all_at_once(served.port, context, "/quarter.bin", 1000)
        assert digests == [expected] * 1000
        wait_until(lambda: served.fds() <= baseline, "the server's fds back to the baseline")
        status, output = served.stop()
    assert status == 0
    assert re.search(rf"served: connections \(tx/rx engine\): 1001 {engine}/{engine};", output)


def test_workers_share_the_port(tree: Tree, certs: Certs) -> None:
    with serving(tree, certs, "software", "--workers", "3") as served:
        children = Path(f"/proc/{served.process.pid}/task/{served.process.pid}/children")
        wait_until(lambda: len(children.read_text().split()) == 3, "three workers")
        for _ in range(30):
            assert request(served, certs, "/hello.txt").status == 200
        status, output = served.stop()
    assert status == 0
    assert "served: connections (tx/rx engine): 30 software/software" in output


# -- the command line ------------------------------------------------------------------------


def ktls_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ktls", "serve", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/dir"], "/no/such/dir: not a directory"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--cert", "/no/such.pem"], "cannot use /no/such.pem"),
        (["--key", "/k.pem"], "--key needs --cert"),
        (["--port", "70000"], "--port must be 0-65535"),
        (["--offload", "sometimes"], "invalid choice"),
        (["--idle-timeout", "0"], "--idle-timeout must be more than 0"),
    ],
)
def test_bad_options_one_line_exit_2(args: list[str], message: str) -> None:
    done = ktls_serve(*args)
    assert done.returncode == 2, done
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_unusable_key_file(tmp_path: Path, certs: Certs) -> None:
    bad = tmp_path / "garbage.pem"
    bad.write_text("not a key\n")
    done = ktls_serve("--cert", str(certs.server_ecdsa), "--key", str(bad))
    assert done.returncode == 2
    assert done.stderr.startswith(f"ktls serve: cannot use {certs.server_ecdsa} / {bad}: ")
    assert len(done.stderr.splitlines()) == 1


def test_port_in_use_exit_1(served: Served) -> None:
    done = ktls_serve("--port", str(served.port))
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{served.port}" in done.stderr


def test_help_lists_every_option() -> None:
    done = ktls_serve("--help")
    assert done.returncode == 0
    for option in ("--bind", "--port", "--cert", "--key", "--workers", "--offload",
                   "--tls1.2", "--tls1.3", "--no-listing", "--follow-symlinks", "--quiet",
                   "--access-log", "--loop", "--handshake-timeout", "--header-timeout",
                   "--idle-timeout", "--send-timeout", "--shutdown-timeout",
                   "--max-connections"):  # fmt: skip
        assert option in done.stdout


@pytest.mark.noktls
def test_offload_kernel_without_ktls_is_refused(tree: Tree) -> None:
    """A kernel without the tls module: --offload kernel says why and exits 2; auto
    says plainly that it serves on the software engine."""
    done = ktls_serve(str(tree.root), "--offload", "kernel", "--port", "0")
    assert done.returncode == 2
    assert "--offload kernel: records: software engine -- this kernel" in done.stderr
    served = start_server(tree.root, None, "auto", tree.base)
    status, _ = served.stop()
    assert "has no kernel TLS" in "".join(served.banner)
    assert status == 0
