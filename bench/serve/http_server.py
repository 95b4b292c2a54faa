"""Python's own HTTPS file server, the serve suite's pure-Python reference.

``http.server.ThreadingHTTPServer`` (a thread per connection) with
``SimpleHTTPRequestHandler`` speaking HTTP/1.1 (keep-alive, as wrk expects), its
listening socket wrapped by an ``ssl.SSLContext``: TLS in user space, through the
OpenSSL that Python's ``ssl`` links.  Standard library only: the bench runs it as a
script, ``python http_server.py DIRECTORY --port P --cert C --key K``.  It prints one
line when it listens and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import functools
import signal
import ssl
import sys
from collections.abc import Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any


class Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the file handler sends Content-Length
    # Headers and body go out in two writes (two TLS records): with Nagle's algorithm on,
    # the body waits for the client's delayed ACK, 40 ms a response.  nginx sets
    # TCP_NODELAY on keep-alive connections too (tcp_nodelay on, its default).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request on stderr would cost more than some requests


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # ends serve_forever() in the main thread


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("directory")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True, help="certificate chain, PEM")
    p.add_argument("--key", required=True, help="private key, PEM")
    args = p.parse_args(argv)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    handler = functools.partial(Handler, directory=args.directory)
    server = ThreadingHTTPServer((args.bind, args.port), handler)
    # The documented recipe: the handshake runs in accept(), in the main thread.
    server.socket = context.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, _stop)
    print(f"http.server + ssl: https://{args.bind}:{args.port}/ <- {args.directory}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
