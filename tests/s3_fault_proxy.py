"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto), on 127.0.0.1 only.

Every request is forwarded unchanged, except that a share of them (``failure_rate``) is answered
by the proxy itself with S3's own error bodies: 503 SlowDown (throttling) and 500 InternalError,
alternately. Which requests fail is decided by a seeded random sequence, one draw per request
in arrival order, so a run sees the same pattern of failures for the same seed and the same
requests. ``failure_rate`` can be changed while clients run (1.0: S3 is down). ``on_request``, when
given, is called after each forwarded or failed request with (method, path with query, status,
seconds): ``bench/s3_requests.py`` counts a night's S3 requests with it.
"""
from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_ERRORS = (
    (503, "SlowDown", "Please reduce your request rate."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
)
CONTROL = "/__fault__/rate/"
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str, failure_rate: float = 0.0, seed: int = 0, on_request=None):
        parsed = urlparse(upstream)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the proxy forwards to loopback only, not {upstream}")
        self.upstream = (parsed.hostname, parsed.port)
        self.failure_rate = failure_rate
        self.on_request = on_request
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.requests = 0
        self.injected: dict[str, int] = {"SlowDown": 0, "InternalError": 0}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _fault(self) -> tuple[int, str, str] | None:
        """The next request's fate: one seeded draw per request, in arrival order."""
        with self._lock:
            self.requests += 1
            if self._random.random() >= self.failure_rate:
                return None
            error = _ERRORS[sum(self.injected.values()) % len(_ERRORS)]
            self.injected[error[1]] += 1
            return error

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"    # keep-alive, as the SDKs' connection pools expect
            # headers and body leave in two writes: with Nagle's algorithm on, the body waits for the
            # client's delayed ACK of the headers (~40 ms on every GET with a body, e.g. each LIST)
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:   # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _relay(self) -> None:
                started = time.perf_counter()
                status = self._forward()
                if proxy.on_request is not None and status is not None:
                    proxy.on_request(self.command, self.path, status, time.perf_counter() - started)

            def _forward(self) -> int | None:
                """Answer the request (forwarded, or failed by the proxy); its status, None for a control call."""
                body = self._body()
                if self.path.startswith(CONTROL):
                    proxy.failure_rate = float(self.path[len(CONTROL):])
                    self.send_response(204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                fault = proxy._fault()
                if fault is not None:
                    status, code, message = fault
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                               f"<Message>{message}</Message><RequestId>fault-{proxy.requests}</RequestId>"
                               "</Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return status
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    connection.request(self.command, self.path, body=body or None, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    length = response.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length if length is not None else str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return response.status
                finally:
                    connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler
