"""Tiny threaded HTTP file server on 127.0.0.1 for download tests (standard library only).

Serves ``files[path] = bytes`` (GET, HEAD; the query string is ignored) with ``Range: bytes=N-``
-> 206 + Content-Range (416 past the end), a strong ``ETag`` (from the content) honoured in
``If-Range`` (a changed file is sent whole, 200). Faults hit upcoming GETs in the order queued:
``fail_next`` (status, with ``Retry-After: <retry_after>`` when given), ``throttle_next`` (429 +
``Retry-After: 0``), ``truncate_next`` (full Content-Length, part of the body, connection dropped),
``overlong_next`` (``extra`` bytes more than announced: a 206 whose Content-Length exceeds its
Content-Range by ``extra``; a 200 sent chunked, longer than its own Content-Length header,
which chunked framing overrides); ``ignore_range`` always answers 200;
``validators`` = ``"etag"`` (default), ``"last-modified"`` (a date per content, no ETag) or
``None``; ``honour_if_range = False`` ignores If-Range (a broken server); ``max_range_bytes``
answers a range with at most that many bytes (allowed by HTTP: the client asks again);
``unsized_next`` sends a response without Content-Length, part of the body, then closes;
``endless_next`` sends a chunked body with no Content-Length that never ends (until the client
hangs up); ``content_types[path]`` is sent as Content-Type (none by default).
``stats``: per-path ``get``/``head`` counts, ``ranges`` seen, ``bytes_sent``. Quiet; stops after ``max_lifetime_s``.
"""

from __future__ import annotations

import email.utils
import hashlib
import socket
import threading
from collections import Counter
from contextlib import suppress
from http.server import ThreadingHTTPServer
from urllib.parse import urlsplit

from dataset_assets_tests.support.s3server import TrackedHandler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FileServer

    def handle_error(self, request, client_address) -> None:  # quiet: clients hang up on purpose
        pass


class FileServer:
    def __init__(self, max_lifetime_s: float = 600):
        self.files: dict[str, bytes] = {}
        self.ignore_range = False
        self.validators: str | None = "etag"
        self.honour_if_range = True
        self.max_range_bytes = 0
        self.content_types: dict[str, str] = {}
        self._lock = threading.Lock()
        self._faults: list[tuple[str, float, str]] = []  # (kind, status/fraction/bytes, Retry-After), one per GET
        self._conns: set[socket.socket] = set()
        self._stopped = False
        self.reset_stats()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._timer = threading.Timer(max_lifetime_s, self.stop)  # never outlive a forgotten test
        self._timer.daemon = True

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def _queue(self, n: int, kind: str, value: float, retry_after: str = "") -> None:
        with self._lock:
            self._faults += [(kind, value, retry_after)] * n

    def fail_next(self, n: int, status: int = 503, retry_after: str | None = None) -> None:
        self._queue(n, "fail", status, "" if retry_after is None else str(retry_after))

    def throttle_next(self, n: int) -> None:
        self._queue(n, "fail", 429, "0")

    def overlong_next(self, n: int, extra: int = 1000) -> None:
        self._queue(n, "overlong", extra)

    def truncate_next(self, n: int, fraction: float = 0.5) -> None:
        self._queue(n, "truncate", fraction)

    def unsized_next(self, n: int, fraction: float = 0.0) -> None:
        self._queue(n, "unsized", fraction)

    def endless_next(self, n: int) -> None:
        self._queue(n, "endless", 0)

    def reset_stats(self) -> None:
        with self._lock:
            self._get, self._head, self._ranges, self._bytes = Counter(), Counter(), [], 0
            self.requests: list[tuple[str, dict]] = []  # (path with query, headers) of every GET and HEAD

    @property
    def stats(self) -> dict:
        with self._lock:
            return {
                "get": dict(self._get),
                "head": dict(self._head),
                "ranges": list(self._ranges),
                "bytes_sent": self._bytes,
            }

    def __enter__(self) -> FileServer:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped, conns = True, list(self._conns)
        self._timer.cancel()
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(TrackedHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _Server

    def _reply(self, status: int, body: bytes, headers: dict | None = None, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for item in (headers or {}).items():
            self.send_header(*item)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)
            with self.server.owner._lock:
                self.server.owner._bytes += len(body)

    def do_GET(self) -> None:
        srv, path, rng = self.server.owner, urlsplit(self.path).path, self.headers.get("Range")
        with srv._lock:
            (srv._get if self.command == "GET" else srv._head)[path] += 1
            srv._ranges += [rng] if rng and self.command == "GET" else []
            srv.requests.append((self.path, dict(self.headers)))
            fault = srv._faults.pop(0) if srv._faults and self.command == "GET" else None
            data = srv.files.get(path)
        if data is None:
            return self._reply(404, b"not found\n")
        if fault and fault[0] == "fail":
            return self._reply(int(fault[1]), b"injected failure\n", {"Retry-After": fault[2]} if fault[2] else {})
        start, end, status, headers = 0, len(data) - 1, 200, {"Accept-Ranges": "bytes"}
        if path in srv.content_types:
            headers["Content-Type"] = srv.content_types[path]
        digest = hashlib.sha256(data).digest()
        etag = '"' + digest.hex()[:20] + '"'
        modified = email.utils.formatdate(1_600_000_000 + int.from_bytes(digest[:3], "big"), usegmt=True)
        validator = {"etag": etag, "last-modified": modified}.get(srv.validators or "")
        if srv.validators == "etag":
            headers["ETag"] = etag
        elif srv.validators == "last-modified":
            headers["Last-Modified"] = modified
        if_range = self.headers.get("If-Range") if srv.honour_if_range else None
        if rng and not srv.ignore_range and (if_range is None or if_range == validator):
            try:
                a, _, b = rng.removeprefix("bytes=").partition("-")
                start, end = int(a), min(int(b or len(data) - 1), len(data) - 1)
            except ValueError:
                return self._reply(400, b"bad range\n")
            if start >= len(data):
                return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            if srv.max_range_bytes:
                end = min(end, start + srv.max_range_bytes - 1)
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{len(data)}"
        body = data[start : end + 1]
        if not fault:
            return self._reply(status, body, headers)
        if fault[0] == "overlong":
            surplus = b"\0" * int(fault[1])
            if status == 206:  # Content-Range announces the range; Content-Length and the body are longer
                return self._reply(status, body + surplus, headers)
            self.send_response(status)  # chunked framing overrides the (shorter) Content-Length
            for item in {**headers, "Content-Length": str(len(body)), "Transfer-Encoding": "chunked"}.items():
                self.send_header(*item)
            self.end_headers()
            for piece in (body, surplus):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            with srv._lock:
                srv._bytes += len(body) + len(surplus)
            return
        if fault[0] == "endless":
            self.send_response(status)
            for item in {**headers, "Transfer-Encoding": "chunked"}.items():
                self.send_header(*item)
            self.end_headers()
            block = b"\0" * (1 << 20)
            with suppress(OSError):
                while not srv._stopped:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
                    with srv._lock:
                        srv._bytes += len(block)
            self.close_connection = True
            return
        if fault[0] == "unsized":  # no Content-Length: the body ends where the connection does
            self.send_response(status)
            for item in {**headers, "Connection": "close"}.items():
                self.send_header(*item)
            self.end_headers()
            self.wfile.write(body[: int(len(body) * fault[1])])
            self.wfile.flush()
            self.close_connection = True
            return
        self._reply(status, body[: int(len(body) * fault[1])], headers, length=len(body))
        self.wfile.flush()
        self.close_connection = True
        with suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    do_HEAD = do_GET
