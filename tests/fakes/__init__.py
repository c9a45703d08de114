"""Loopback fake servers for the web APIs moelab talks to, and the HTTP plumbing they share."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    """What arrived: method, path (without the query), parsed query, headers (lower-case names) and body."""
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] | None = None

    @classmethod
    def json(cls, status: int, data: Any, headers: dict[str, str] | None = None) -> "Response":
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass
class _Fault:
    status: int
    times: int
    method: str | None
    path_contains: str | None
    message: str | None

    def matches(self, request: Request) -> bool:
        return ((self.method is None or self.method == request.method)
                and (self.path_contains is None or self.path_contains in request.path))


class LoopbackServer:
    """An HTTP/1.1 server on 127.0.0.1 (a free port) in a daemon thread; use it as a context manager.

    Subclasses implement `handle(request) -> Response` and `fault(status, message) -> Response` (the error body
    in the API's own shape). `fail_next` makes the next matching requests fail before `handle` sees them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start the fake first (use it in a `with` block)"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def fail_next(self, status: int, times: int = 1, method: str | None = None, path_contains: str | None = None,
                  message: str | None = None) -> None:
        """Answer the next `times` requests (of `method`, whose path contains `path_contains`) with `status`."""
        with self._lock:
            self._faults.append(_Fault(status, times, method, path_contains, message))

    def handle(self, request: Request) -> Response:
        raise NotImplementedError

    def fault(self, status: int, message: str | None) -> Response:
        raise NotImplementedError

    def record(self, request: Request) -> None:
        """Called for every request, faulted or not, before it is answered."""

    def _respond(self, request: Request) -> Response:
        with self._lock:
            fault = next((f for f in self._faults if f.matches(request)), None)
            if fault is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
        self.record(request)
        if fault is not None:
            return self.fault(fault.status, fault.message)
        with self._lock:
            return self.handle(request)

    def start(self) -> "LoopbackServer":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = Request(self.command, parts.path, parse_qs(parts.query), headers, body)
                response = fake._respond(request)
                self.send_response(response.status)
                for key, value in (response.headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(response.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(response.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
