"""`make serve` until `ktls serve` exists: real HTTPS through the kernel's TLS.

Run inside a kernel with kTLS (``make serve`` boots UML 7.x for it):

1. a ktls server on a freshly generated certificate answers HTTPS requests, sending
   the file body with zero-copy ``sendfile(2)`` through kernel TLS; ``curl`` (a real,
   independent client) fetches it and the SHA-256 is compared;
2. ``ktls``'s own client fetches ``openssl s_server -www``'s status page;
3. ``/proc/net/tls_stat`` shows the kernel's TLS counters moving.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import trustme

import ktls
from ktls.kernel import read_tls_stat


def serve_file(listener: ktls.TLSListener, path: Path, count: int) -> None:
    size = path.stat().st_size
    for _ in range(count):
        tls, _address = listener.accept()
        with tls:
            request = b""
            while b"\r\n\r\n" not in request and (chunk := tls.recv(4096)):
                request += chunk
            line = request.split(b"\r\n", 1)[0].decode(errors="replace")
            print(
                f"  server: {line!r} over {tls.version()} {tls.tls_session.suite.openssl_name} "
                f"tx={tls.tx_engine} rx={tls.rx_engine}"
            )
            tls.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                + f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode()
            )
            with path.open("rb") as f:
                tls.sendfile(f)


def main() -> int:
    caps = ktls.capabilities()
    if not caps.ulp:
        print(f"this kernel has no kTLS ({caps.ulp_error}); run `make serve`", file=sys.stderr)
        return 1
    before = read_tls_stat() or {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(base / "ca.pem"))
        ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
            str(base / "server.pem")
        )
        body = base / "body.bin"
        body.write_bytes(os.urandom(4 * 1024 * 1024))
        digest = hashlib.sha256(body.read_bytes()).hexdigest()

        print(f"Linux {caps.release}: kernel TLS available, rekey={'yes' if caps.rekey else 'no'}")
        print("1. ktls HTTPS server, body by sendfile(2) through kernel TLS; client: curl")
        server = ktls.ServerContext(base / "server.pem", offload="kernel")
        with server.listen(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            thread = threading.Thread(target=serve_file, args=(listener, body, 2), daemon=True)
            thread.start()
            for flag in ("--tlsv1.2", "--tlsv1.3"):
                max_flag = ["--tls-max", "1.2"] if flag == "--tlsv1.2" else []
                fetched = subprocess.run(
                    [
                        "curl",
                        "-sS",
                        "--cacert",
                        str(base / "ca.pem"),
                        flag,
                        *max_flag,
                        f"https://localhost:{port}/body.bin",
                    ],
                    capture_output=True,
                    check=True,
                    timeout=60,
                ).stdout
                ok = hashlib.sha256(fetched).hexdigest() == digest
                print(
                    f"  curl {flag}: {len(fetched)} bytes, sha256 {'matches' if ok else 'DIFFERS'}"
                )
                if not ok:
                    return 1
            thread.join(30)

        print("2. ktls client (kernel engine) -> openssl s_server -www")
        proc = subprocess.Popen(
            [
                "openssl",
                "s_server",
                "-www",
                "-accept",
                "127.0.0.1:0",
                "-naccept",
                "1",
                "-cert",
                str(base / "server.pem"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert proc.stdout is not None
            port = 0
            for raw in proc.stdout:
                if raw.startswith(b"ACCEPT"):
                    port = int(raw.split(b":")[-1])
                    break
            client = ktls.ClientContext(cafile=base / "ca.pem", offload="kernel")
            with client.connect(("127.0.0.1", port), server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                page = b""
                while chunk := tls.recv(65536):
                    page += chunk
                print(f"  {tls!r}: {page.splitlines()[0].decode()} ({len(page)} bytes)")
        finally:
            proc.kill()
            proc.wait()

    after = read_tls_stat() or {}
    moved = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    print("3. /proc/net/tls_stat changes:", " ".join(f"{k}+{v}" for k, v in moved.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
