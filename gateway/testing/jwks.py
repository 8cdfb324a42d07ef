"""An issuer's JWKS endpoint on loopback, for key-rotation tests.

A real HTTP server (the standard library's, in a thread) on a free port: tests change
what it publishes, make it fail, and count the requests it got.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gateway.testing.issuer import TestIssuer


class FakeJwksServer:
    __test__ = False

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.status = 200  # set to 500 (or anything) to make fetches fail
        self.requests = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/.well-known/jwks.json"

    def publish(self, *issuers: TestIssuer, extra: list[dict[str, Any]] | None = None) -> None:
        """Publish the public keys of these issuers (one key each), plus raw ``extra`` JWKs."""
        keys = [i.key.as_dict(private=False) for i in issuers] + list(extra or [])
        with self._lock:
            self.document = {"keys": keys}

    def _respond(self) -> tuple[int, bytes]:
        with self._lock:
            self.requests += 1
            return self.status, json.dumps(self.document).encode()

    @classmethod
    @contextmanager
    def running(cls) -> Iterator[FakeJwksServer]:
        server = cls()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the stdlib's naming
                status, body = server._respond()
                self.send_response(status)
                self.send_header("Content-Type", "application/jwk-set+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # quiet: the tests count requests instead

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        server._httpd = httpd
        thread = threading.Thread(target=httpd.serve_forever, name="fake-jwks", daemon=True)
        thread.start()
        try:
            yield server
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)
