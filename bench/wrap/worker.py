"""The wrap suite's ``ktls handshaked`` worker: ``python worker.py SOCKET``.

Registers on the daemon's Unix socket SOCKET, then, for each connection handed over
(the kernel engine both ways, ``offload="kernel"``), reads one line, writes it back and
closes (close_notify): the same answer as ``head -n 1`` run by ``ktls wrap`` or
stunnel.  One connection at a time, in the main thread, no process per connection (the
bench's client is sequential).  Prints "registered" once, and a line per failure.
"""

from __future__ import annotations

import sys

from ktls.errors import ClosedError, KTLSError
from ktls.handshaked.worker import Worker
from ktls.tlssocket import TLSSocket


def answer(tls: TLSSocket) -> None:
    line = b""
    while not line.endswith(b"\n"):
        chunk = tls.recv(4096)
        if not chunk:
            break
        line += chunk
    tls.sendall(line)


def main() -> None:
    with Worker(sys.argv[1], name="bench wrap", offload="kernel") as worker:
        print("registered", flush=True)
        while True:
            try:
                tls, _info = worker.accept()
            except ClosedError:
                print("the daemon went away", flush=True)
                return
            except (KTLSError, OSError) as exc:
                print(f"a connection failed: {exc!r}", flush=True)
                continue
            try:
                with tls:
                    answer(tls)
            except (KTLSError, OSError) as exc:
                print(f"a connection ended: {exc!r}", flush=True)


if __name__ == "__main__":
    main()
