"""Tiny local S3-compatible HTTP server for tests (standard library only).

``root/<bucket>/<key>`` on disk is served as ``s3://<bucket>/<key>`` to anonymous,
path-style clients such as ``s5cmd --no-sign-request --endpoint-url URL``.
It binds 127.0.0.1 only and is read-only: ListBuckets, HeadBucket,
GetBucketLocation, ListObjects v1/v2 (prefix, delimiter, paging, encoding-type=url),
HeadObject and GetObject (single ``Range``, bodies via sendfile). Writes answer 501.

    with LocalS3Server(tmp_path / "s3") as srv:
        srv.faults.fail_next_gets(2, status=503)
        subprocess.run([S5CMD, "--no-sign-request", "--endpoint-url", srv.endpoint_url, ...])
        assert srv.stats["get_object"] == 5

Instrumentation (``stats``, ``get_keys``, ``requests``) and fault injection
(``srv.faults``) are thread-safe and may be changed while the server runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape

KeyMatch = Callable[[str], bool] | Iterable[str]
_CODES = {
    400: "InvalidArgument",
    403: "AccessDenied",
    404: "NoSuchKey",
    416: "InvalidRange",
    500: "InternalError",
    501: "NotImplemented",
    503: "SlowDown",
}
_XML = '<?xml version="1.0" encoding="UTF-8"?>\n'
_NS = ' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _matcher(match: KeyMatch) -> Callable[[str], bool]:
    if callable(match):
        return match
    return ({match} if isinstance(match, str) else set(match)).__contains__


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class Faults:
    """Fault injection for object GETs; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._fail_next: list[int] = []  # one status per upcoming GET
            self._fail_keys: list[tuple[Callable[[str], bool], int]] = []
            self._truncate_next: list[float] = []  # one fraction per upcoming GET
            self._lie: list[tuple[Callable[[str], bool], int]] = []
            self.delay_s = 0.0  # sleep between GET headers and body
            self.throttle_bytes_per_s = 0.0  # per response; 0 = unlimited

    clear_faults = clear

    def fail_next_gets(self, n: int, status: int = 503) -> None:
        """The next ``n`` object GETs answer ``status`` with an S3 XML error body."""
        with self._lock:
            self._fail_next += [status] * n

    def fail_keys(self, match: KeyMatch, status: int = 503) -> None:
        """GETs of keys in ``match`` (a key, set of keys or predicate) always fail."""
        with self._lock:
            self._fail_keys.append((_matcher(match), status))

    def truncate_next_gets(self, n: int, fraction: float = 0.5) -> None:
        """The next ``n`` GETs announce the full Content-Length, send only
        ``fraction`` of the body and then drop the connection."""
        with self._lock:
            self._truncate_next += [fraction] * n

    def lie_size_keys(self, match: KeyMatch, delta: int = 1) -> None:
        """Listings and HEAD report ``size + delta`` for matching keys, while GET
        still returns the real bytes (with an honest Content-Length)."""
        with self._lock:
            self._lie.append((_matcher(match), delta))

    def size_delta(self, key: str) -> int:
        with self._lock:
            return sum(d for m, d in self._lie if m(key))

    def on_get(self, key: str) -> tuple[int | None, float | None]:
        """Consume faults for one GET -> (error status, truncate fraction)."""
        with self._lock:
            for match, status in self._fail_keys:
                if match(key):
                    return status, None
            if self._fail_next:
                return self._fail_next.pop(0), None
            return None, (self._truncate_next.pop(0) if self._truncate_next else None)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # many workers connect at once
    owner: LocalS3Server
    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port:  # several server processes share one port: the kernel spreads connections
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _SharedPortServer(_Server):
    reuse_port = True


class LocalS3Server:
    """Serve ``root/<bucket>/<key>`` over a minimal S3 REST API on 127.0.0.1."""

    def __init__(
        self,
        root: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        max_lifetime_s: float | None = 3600,
        reuse_port: bool = False,
    ):
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError("LocalS3Server binds 127.0.0.1 only")
        self.root, self.max_lifetime_s = Path(root), max_lifetime_s
        self.faults = Faults()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._stopped = False
        self._planted: dict[tuple[str, str], Path] = {}  # (bucket, key) -> file: names a real store never lists
        self.reset_stats()
        # reuse_port: other processes may serve the same port (a benchmark's server that is not the limit)
        self._httpd = (_SharedPortServer if reuse_port else _Server)(("127.0.0.1", port), _Handler)
        self._httpd.owner = self

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalS3Server:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name=f"LocalS3Server:{self.port}", daemon=True
        )
        self._thread.start()
        if self.max_lifetime_s:  # never outlive a forgotten test
            self._timer = threading.Timer(self.max_lifetime_s, self.stop)
            self._timer.daemon = True
            self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listener and drop open connections (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped, conns = True, list(self._conns)
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = dict.fromkeys(
                ("get_object", "head_object", "list", "head_bucket", "other", "errors", "bytes_sent"), 0
            )
            self.get_keys: list[str] = []  # key of every object GET, in arrival order
            self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)

    @property
    def stats(self) -> dict[str, int]:
        """Snapshot: get_object, head_object, list, head_bucket, other (request
        counts), errors (error responses sent) and bytes_sent (body bytes)."""
        with self._lock:
            return dict(self._stats)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def plant(self, bucket: str, key: str, payload: bytes) -> None:
        """A hostile server: list and serve ``key`` (any name, e.g. ``<uuid>/../../x.dcm``) with ``payload``."""
        store = self.root.parent / f"{self.root.name}-planted"
        store.mkdir(exist_ok=True)
        path = store / hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()
        path.write_bytes(payload)
        with self._lock:
            self._planted[(bucket, key)] = path

    def path_for(self, bucket: str, key: str = "") -> Path | None:
        if (bucket, key) in self._planted:
            return self._planted[(bucket, key)]
        parts = [bucket, *key.split("/")] if key else [bucket]
        if not bucket or "\x00" in key or any(p in ("..", ".") for p in parts):
            return None
        return self.root.joinpath(*[p for p in parts if p])

    @staticmethod
    def etag(st: os.stat_result) -> str:
        """Cheap fake ETag: stable per (size, mtime_ns), shaped like a quoted md5."""
        return f'"{hashlib.md5(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest()}"'

    def list_keys(self, bucket: str, prefix: str = "") -> list[tuple[str, Path]]:
        """Sorted (key, path) of the regular files in ``bucket`` under ``prefix``."""
        base = self.path_for(bucket)
        start = self.path_for(bucket, prefix.rpartition("/")[0])
        out = []
        for dirpath, _dirs, files in os.walk(start) if start is not None else ():
            rel = os.path.relpath(dirpath, base).replace(os.sep, "/")
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    out.append((key, Path(dirpath, name)))
        out += [(key, path) for (b, key), path in self._planted.items() if b == bucket and key.startswith(prefix)]
        return sorted(out)


class TrackedHandler(BaseHTTPRequestHandler):
    """Quiet handler whose open connections the owning server can drop on stop
    (``server.owner`` has ``_lock`` and a ``_conns`` set)."""

    def log_message(self, format, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.owner._lock:
            self.server.owner._conns.add(self.connection)

    def finish(self) -> None:
        with self.server.owner._lock:
            self.server.owner._conns.discard(self.connection)
        super().finish()


class _Handler(TrackedHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response has Content-Length
    server_version = "LocalS3"
    timeout = 60  # idle keep-alive connections end eventually
    server: _Server

    def _head(self, status: int, length: int, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        self.send_header("x-amz-request-id", f"{threading.get_ident():X}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _xml(self, status: int, body: str) -> None:
        data = (_XML + body).encode()
        self._head(status, len(data), "application/xml")
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str = "", resource: str = "", msg: str = "") -> None:
        self.server.owner._count("errors")
        code = code or _CODES.get(status, "InternalError")
        self._xml(
            status,
            f"<Error><Code>{code}</Code><Message>{escape(msg or code)}</Message>"
            f"<Resource>{escape(resource)}</Resource>"
            "<RequestId>local</RequestId></Error>",
        )

    def do_GET(self) -> None:
        srv = self.server.owner
        url = urlsplit(self.path)
        with srv._lock:
            srv.requests.append((self.command, self.path, self.headers.get("Range")))
        q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        if not bucket:
            srv._count("other")
            buckets = "".join(
                f"<Bucket><Name>{escape(p.name)}</Name><CreationDate>{_iso(p.stat().st_mtime)}</CreationDate></Bucket>"
                for p in sorted(srv.root.iterdir())
                if p.is_dir()
            )
            return self._xml(200, f"<ListAllMyBucketsResult{_NS}><Buckets>{buckets}</Buckets></ListAllMyBucketsResult>")
        bdir = srv.path_for(bucket)
        if key:
            return self._object(bucket, key)
        is_list = self.command == "GET" and "location" not in q
        srv._count("head_bucket" if self.command == "HEAD" else "list" if is_list else "other")
        if bdir is None or not bdir.is_dir():
            return self._error(404, "NoSuchBucket", "/" + bucket, "The specified bucket does not exist")
        if self.command == "HEAD":
            return self._head(200, 0, "application/xml")
        if "location" in q:
            return self._xml(200, f"<LocationConstraint{_NS}></LocationConstraint>")
        return self._list(bucket, q)

    do_HEAD = do_GET

    def _read_only(self) -> None:
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0 and (chunk := self.rfile.read(min(remaining, 1 << 16))):
            remaining -= len(chunk)
        self.server.owner._count("other")
        self._error(501, msg="LocalS3Server is read-only")

    do_PUT = do_POST = do_DELETE = _read_only

    def _list(self, bucket: str, q: dict[str, str]) -> None:
        srv, v2 = self.server.owner, q.get("list-type") == "2"
        prefix, delim = q.get("prefix", ""), q.get("delimiter", "")
        try:
            max_keys = max(0, min(int(q.get("max-keys") or 1000), 1000))
        except ValueError:
            return self._error(400, msg="max-keys must be an integer")
        after = (q.get("continuation-token") or q.get("start-after", "")) if v2 else q.get("marker", "")
        url_enc = q.get("encoding-type") == "url"

        def enc(s: str) -> str:
            return escape(quote(s, safe="/") if url_enc else s)

        entries: list[tuple[str, Path | None]] = []  # (key, path) or (common prefix, None)
        for key, path in srv.list_keys(bucket, prefix):
            cut = key.find(delim, len(prefix)) if delim else -1
            if cut < 0:
                entries.append((key, path))
            elif not entries or entries[-1][0] != key[: cut + len(delim)]:
                entries.append((key[: cut + len(delim)], None))  # keys sharing it are adjacent
        entries = [e for e in entries if e[0] > after]
        page, truncated = entries[:max_keys], len(entries) > max_keys
        out = [
            f"<Name>{escape(bucket)}</Name><Prefix>{enc(prefix)}</Prefix>"
            f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{str(truncated).lower()}</IsTruncated>"
        ]
        out += [f"<Delimiter>{enc(delim)}</Delimiter>"] if delim else []
        out += ["<EncodingType>url</EncodingType>"] if url_enc else []
        if v2:
            out.append(f"<KeyCount>{len(page)}</KeyCount>")
            if q.get("continuation-token"):
                out.append(f"<ContinuationToken>{escape(after)}</ContinuationToken>")
            if truncated:
                out.append(f"<NextContinuationToken>{escape(page[-1][0])}</NextContinuationToken>")
        else:
            out.append(f"<Marker>{enc(after)}</Marker>")
            out += [f"<NextMarker>{enc(page[-1][0])}</NextMarker>"] if truncated else []
        for name, path in page:
            if path is None:
                out.append(f"<CommonPrefixes><Prefix>{enc(name)}</Prefix></CommonPrefixes>")
                continue
            try:
                st = path.stat()
            except OSError:  # deleted while listing
                continue
            out.append(
                f"<Contents><Key>{enc(name)}</Key><LastModified>{_iso(st.st_mtime)}"
                f"</LastModified><ETag>{escape(srv.etag(st))}</ETag>"
                f"<Size>{st.st_size + srv.faults.size_delta(name)}</Size>"
                "<StorageClass>STANDARD</StorageClass></Contents>"
            )
        self._xml(200, f"<ListBucketResult{_NS}>{''.join(out)}</ListBucketResult>")

    def _object(self, bucket: str, key: str) -> None:
        srv, faults, is_get = self.server.owner, self.server.owner.faults, self.command == "GET"
        srv._count("get_object" if is_get else "head_object")
        if is_get:
            with srv._lock:
                srv.get_keys.append(key)
        resource, path = f"/{bucket}/{key}", srv.path_for(bucket, key)
        if path is None or not srv.path_for(bucket).is_dir():
            return self._error(404, "NoSuchBucket", resource, "The specified bucket does not exist")
        try:
            st = path.stat()
            if not path.is_file() or key.endswith("/"):
                raise FileNotFoundError(key)
        except OSError:
            return self._error(404, "NoSuchKey", resource, "The specified key does not exist.")
        size, ctype = st.st_size, "application/octet-stream"
        headers = {
            "ETag": srv.etag(st),
            "Accept-Ranges": "bytes",
            "Last-Modified": formatdate(st.st_mtime, usegmt=True),
        }
        if not is_get:
            return self._head(200, size + faults.size_delta(key), ctype, headers)
        fail_status, trunc = faults.on_get(key)
        if fail_status is not None:
            return self._error(fail_status, resource=resource, msg="Injected failure, retry.")
        start, end, status = 0, size - 1, 200
        if rng := self.headers.get("Range"):
            try:
                unit, _, spec = rng.partition("=")
                a, _, b = spec.strip().partition("-")
                if unit.strip() != "bytes" or "," in spec:
                    raise ValueError(rng)
                start, end = (int(a), min(int(b or size - 1), size - 1)) if a else (max(0, size - int(b)), size - 1)
                if start > end:
                    raise ValueError(rng)
            except ValueError:
                return self._error(416, resource=resource, msg="Range not satisfiable")
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{size}"
        count = end - start + 1
        self._head(status, count, ctype, headers)
        if faults.delay_s:
            time.sleep(faults.delay_s)
        try:
            with open(path, "rb") as f:
                self._body(f, start, int(count * trunc) if trunc is not None else count)
        except OSError:  # client went away
            self.close_connection = True
        if trunc is not None:  # short body, then hang up
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def _body(self, f, offset: int, count: int) -> None:
        srv, rate = self.server.owner, self.server.owner.faults.throttle_bytes_per_s
        if count > 0 and not rate:
            return srv._count("bytes_sent", self.connection.sendfile(f, offset, count))
        f.seek(offset)
        sent, t0, chunk = 0, time.monotonic(), max(1024, min(1 << 16, int(rate / 20)))
        while sent < count and (data := f.read(min(chunk, count - sent))):
            self.connection.sendall(data)
            sent += len(data)
            srv._count("bytes_sent", len(data))
            time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
