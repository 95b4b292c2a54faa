"""A ktls handshaked worker for the tests: python tests/handshaked_worker.py SOCKET NAME
ENGINE KEYFILE [USER].

Imports as the user that started it, then (with USER) drops to that user before it
registers -- the way a service manager would start it unprivileged; tries to read
KEYFILE and says whether it could; then serves each connection in a thread: a GET gets
an HTTP answer naming this worker, anything else a greeting line and an echo.
"""

from __future__ import annotations

# The interpreter here lives under /root (mode 0700): what Python would load lazily
# (the idna codec, for socket names) is loaded before the user changes.
import encodings.idna  # noqa: F401
import os
import pwd
import sys
import threading
import traceback

from ktls.errors import ClosedError, KTLSError
from ktls.handshaked.worker import Worker
from ktls.tlssocket import TLSSocket


def serve(tls: TLSSocket, name: str) -> None:
    with tls:
        try:
            first = tls.recv(65536)
            about = f"{name} uid={os.getuid()} tx={tls.tx_engine} rx={tls.rx_engine}"
            if first.startswith(b"GET "):
                body = f"{about} {tls.version()}\n".encode()
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                    % len(body)
                    + body
                )
                return
            tls.sendall(f"{about}\n".encode() + first)
            while data := tls.recv(65536):
                tls.sendall(data)
        except (KTLSError, OSError) as exc:
            print(f"{name}: connection ended: {exc}", flush=True)


def main() -> None:
    path, name, engine, keyfile = sys.argv[1:5]
    if len(sys.argv) > 5:
        user = pwd.getpwnam(sys.argv[5])
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    try:
        with open(keyfile, "rb"):
            print(f"{name}: key readable", flush=True)
    except PermissionError:
        print(f"{name}: key not readable", flush=True)
    try:
        worker = Worker(path, name=name, offload=engine)  # type: ignore[arg-type]
    except (ClosedError, OSError) as exc:
        print(f"{name}: not registered: {exc}", flush=True)
        sys.exit(3)
    print(f"{name}: registered", flush=True)
    with worker:
        while True:
            try:
                tls, _message = worker.accept()
            except ClosedError:
                print(f"{name}: the daemon went away", flush=True)
                break
            except (KTLSError, OSError):  # that connection only
                print(f"{name}: a connection failed: {traceback.format_exc()!r}", flush=True)
                continue
            threading.Thread(target=serve, args=(tls, name)).start()


if __name__ == "__main__":
    main()
