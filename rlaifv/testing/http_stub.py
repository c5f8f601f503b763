"""Stand-in HTTP servers for tests: image hosts, generators, chat APIs and health endpoints written as a
`BaseHTTPRequestHandler`, served for real on a free loopback port."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler], *, daemon_threads: bool = False) -> Iterator[ThreadingHTTPServer]:
    """`handler` on 127.0.0.1 (a free port: `server.server_port`), on a daemon thread until the block ends.
    `daemon_threads`: requests still being handled then are not waited for (a handler that stalls on purpose)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = daemon_threads
    thread = threading.Thread(target=server.serve_forever, daemon=True, name=f"http-stub-{server.server_port}")
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
