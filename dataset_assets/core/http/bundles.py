"""Single-file dataset bundles behind HTTP(S) URLs: declared in YAML, fetched resumably, verified.

Some sample datasets are published as one file behind a public or signed URL. A bundle file
lists them::

    bundles:
      - name: lidc-sample          # partition key and directory name
        url: https://example.org/lidc-sample.zip?X-Amz-Signature=...
        sha256: 3f7a...            # optional, 64 hex digits
        size: 123456789            # optional, bytes
        filename: lidc.zip         # optional; default: the last segment of the URL path
        content_type: application/zip   # optional: the media type the server must answer with

``download_bundle`` works in four steps:

1. Skip: when the final file exists and matches the known size and sha256, nothing is
   requested (a file at the final name got there by an atomic rename after verification).
2. Check: the destination directory is writable (before any request, with a clear error).
   The final name, the part and its validator side-file are never followed through a symbolic
   link: one that is a link (or not a regular file, or a part with other hard links) is refused.
3. Transfer: the body streams in ``chunk_size`` pieces (never whole in memory) to
   ``.<filename>.part`` next to the final name, hashed while written. The part file is locked
   (``flock``) so two runs cannot write it at once. Never more than the server announced
   (Content-Length, or the Content-Range of a 206; else ``bundle.size``) is accepted: a longer
   body fails. A 200 or 206 whose Content-Type is not the bundle's ``content_type`` fails;
   without one, an HTML page (``text/html``) for a file not named ``.html``/``.htm`` fails (an
   error or sign-in page). An existing part is resumed with
   ``Range: bytes=<len>-`` and ``If-Range: <validator>`` (the strong ETag or Last-Modified of
   the response the part began with, kept in ``.<filename>.part.validator``) after hashing what
   it holds: ``206`` appends when it carries the same validator (a server that ignores
   If-Range is caught there; a range shorter than asked is followed by the next one), ``200``
   (Range ignored, or the file changed on the server) starts over, ``416`` means the part is
   complete when its size is the expected size (else starts over). A part whose origin cannot
   be proven (no validator and no sha256) is not resumed but started over: a changed file is
   never spliced onto an old head. A body cut short keeps the part and is resumed, up to
   ``attempts`` times with a short backoff. Request-level retries (5xx, refused or reset
   connections) happen below, in the session's ``urllib3`` ``Retry``; an answer carrying
   ``Retry-After`` is handed back to this module instead, which waits as asked, up to
   ``attempts`` times, unless the wait is longer than ``max_retry_after_s`` (default 300 s, or
   ``$DATASET_BUNDLES_MAX_RETRY_AFTER_S``): then the download fails at once, naming both.
4. Verify: the size (``bundle.size``, else what the server announced) and the sha256 (when
   given). A mismatch deletes the part. Success is ``os.replace(part, final)``: the final name
   only ever holds a complete, verified file.

Signed URLs carry credentials in their query string, and URLs may carry ``user:password@``:
messages and logs show ``?…`` and no user info instead (``redact_url``, ``scrub_text``); exceptions
from requests/urllib3, which quote the URL, are scrubbed and not chained, and YAML errors are
rebuilt from their line and column (PyYAML's excerpt of the line could show part of a secret).
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import fcntl
import hashlib
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlsplit

import yaml

from dataset_assets.core.errors import DatasetError, DownloadError
from dataset_assets.core.fmt import human_bytes, human_duration, redact_url, scrub_text
from dataset_assets.core.fs import DECLARATION_LIMIT, DISK_MARGIN_MIN, check_free_space, check_writable, read_small

if TYPE_CHECKING:  # requests and urllib3 load with the first download: the definitions load without them
    import requests

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SHA256 = re.compile(r"[0-9a-fA-F]{64}")
FIELDS = ("name", "url", "sha256", "size", "filename", "content_type")
MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")
HTML_SUFFIXES = (".html", ".htm")
RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_RETRY_AFTER_S = 300.0  # longest wait honoured by default
MAX_RETRY_AFTER_ENV = "DATASET_BUNDLES_MAX_RETRY_AFTER_S"  # the setting that changes it (named in messages)
MAX_UNSIZED_BYTES = 4_000_000_000  # above the largest on-demand IDC index
MAX_UNSIZED_ENV = "DATASET_HTTP_MAX_UNSIZED_BYTES"
RESUME_BACKOFF_S = 0.5  # pause before the first resume of a cut-short body; doubles each time
RESUME_BACKOFF_MAX_S = 8.0
MAX_RESTARTS = 3  # times one download may start over (Range ignored or refused)
MAX_FILENAME_BYTES = 200  # leaves room for the ".part" name within the usual 255
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")
# Files the download writes are opened without following a link (O_NOFOLLOW), without blocking on
# a FIFO put there (O_NONBLOCK: no effect on regular files), in binary mode on Windows.
_OPEN_FLAGS = sum(getattr(os, flag, 0) for flag in ("O_NOFOLLOW", "O_NONBLOCK", "O_CLOEXEC", "O_BINARY"))
MAX_VALIDATOR_BYTES = 1024  # an ETag or a date: anything longer is not kept nor sent back
Log = Callable[[str], None]


def _safe_filename(name: object) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".")
        and ".." not in name
        and not any(c in "/\\\0" or ord(c) < 32 or ord(c) == 127 for c in name)
        and len(name.encode("utf-8", "surrogatepass")) <= MAX_FILENAME_BYTES
    )


def default_filename(url: str, name: str) -> str:
    """The last segment of the URL path (percent-decoded, no query), or ``name`` when that is unsafe."""
    segment = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    return segment if _safe_filename(segment) else name


def _bundle_problem(
    name: Any, url: Any, sha256: Any = None, size: Any = None, filename: Any = None, content_type: Any = None
) -> str | None:
    """What is wrong with these bundle fields, in words, or ``None``."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return (
            f"name {name!r} is not valid: use letters, digits, '_', '.' and '-', starting with a letter "
            "or digit (it becomes a partition key and a directory name)"
        )
    if not isinstance(url, str) or not url.strip():
        return f"url {url!r} is not a URL string"
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        return f"url {redact_url(url)} is not a valid URL: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"url {redact_url(url)} has scheme {parts.scheme or '(none)'!r}; only http and https are supported"
    if not host:
        return f"url {redact_url(url)} has no host"
    if sha256 is not None and (not isinstance(sha256, str) or not SHA256.fullmatch(sha256)):
        hint = "" if isinstance(sha256, str) else " (quote it in YAML)"
        return f"sha256 {sha256!r} is not 64 hexadecimal digits{hint}"
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        return f"size {size!r} is not a non-negative integer number of bytes"
    if filename is not None and not _safe_filename(filename):
        return (
            f"filename {filename!r} is not a plain file name (no '/', '\\', NUL, control characters "
            f"or '..'; at most {MAX_FILENAME_BYTES} bytes)"
        )
    if content_type is not None and (
        not isinstance(content_type, str) or not MEDIA_TYPE.fullmatch(content_type.strip().lower())
    ):
        return (
            f"content_type {content_type!r} is not a media type: use type/subtype without "
            "parameters, e.g. application/zip or application/octet-stream"
        )
    return None


@dataclass(frozen=True)
class Bundle:
    """One file behind a URL. ``filename`` defaults to the URL's last path segment (made safe)."""

    name: str
    url: str
    sha256: str | None = None
    size: int | None = None
    filename: str | None = None
    content_type: str | None = None  # the media type the server must answer with, e.g. application/zip

    def __post_init__(self) -> None:
        problem = _bundle_problem(self.name, self.url, self.sha256, self.size, self.filename, self.content_type)
        if problem:
            raise DatasetError(scrub_text(f"bundle {self.name!r}: {problem}"))
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", self.sha256.lower())
        if self.content_type is not None:
            object.__setattr__(self, "content_type", self.content_type.strip().lower())
        if self.filename is None:
            object.__setattr__(self, "filename", default_filename(self.url, self.name))


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _yaml_problem(exc: Exception) -> str:
    """A YAML error in one line, from its line and column only: PyYAML's own message quotes an
    excerpt of the offending line, cut at an arbitrary point, where a secret could show."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        text = f"{exc.problem or 'syntax error'} at line {mark.line + 1}, column {mark.column + 1}"
        if exc.context and exc.context_mark is not None:
            text += (
                f" ({exc.context} started at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
            )
        return scrub_text(" ".join(text.split()))
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return scrub_text(_one_line(exc))


ENV_TEMPLATE = re.compile(r"\{\{\s*env\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _with_env(entries: list, env: Mapping[str, str]) -> list:
    """Entries with each value that is exactly ``{{ env.NAME }}`` (Dagster's template for a secret
    kept out of the file) replaced by ``env[NAME]``; other templates are left for the checks."""
    out = []
    for number, entry in enumerate(entries, 1):
        if isinstance(entry, dict):
            entry = dict(entry)
            for key, value in entry.items():
                match = ENV_TEMPLATE.fullmatch(value.strip()) if isinstance(value, str) else None
                if match:
                    if match[1] not in env:
                        raise DatasetError(f"entry {number}: {key} needs ${match[1]}, which is not set")
                    entry[key] = env[match[1]]
        out.append(entry)
    return out


def _parse_bundles(path: Path, env: Mapping[str, str] | None = None) -> dict[str, Bundle]:
    try:
        text = read_small(path, DECLARATION_LIMIT, follow_links=True).decode("utf-8")
    except FileNotFoundError:
        raise DatasetError(f"bundle file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"bundle file {path} cannot be read: {_one_line(exc)}") from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise DatasetError(f"bundle file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if isinstance(data, dict) and "type" in data and isinstance(data.get("attributes"), dict):
        data = data["attributes"]  # a component's defs.yaml: the bundles are its attributes
    if not isinstance(data, dict) or not isinstance(data.get("bundles"), list):
        raise DatasetError(
            f"bundle file {path}: expected a mapping with a 'bundles' list, as in 'bundles: [{{name: ..., url: ...}}]'"
        )
    if extra := sorted(map(str, set(data) - {"bundles"})):
        raise DatasetError(
            f"bundle file {path}: unknown top-level key(s) {', '.join(extra)}; only 'bundles' is allowed"
        )
    entries = data["bundles"]
    if env is not None:
        try:
            entries = _with_env(entries, env)
        except DatasetError as exc:
            raise DatasetError(f"bundle file {path}, {exc}") from None
    return bundles_from_entries(entries, f"bundle file {path}")


def bundles_from_entries(entries: list, source: str) -> dict[str, Bundle]:
    """``name -> Bundle`` from declarations (mappings, as a bundles file or a ``defs.yaml`` holds
    them); ``DatasetError`` naming ``source``, the entry and the problem."""
    bundles: dict[str, Bundle] = {}
    first_entry: dict[str, int] = {}
    for number, entry in enumerate(entries, 1):
        where = f"{source}, entry {number}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected a mapping with name and url, got {type(entry).__name__} {entry!r}")
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']!r})"
        if unknown := sorted(map(str, set(entry) - set(FIELDS))):
            raise DatasetError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
        if missing := [key for key in ("name", "url") if entry.get(key) is None]:
            raise DatasetError(f"{where}: missing {' and '.join(missing)}")
        if problem := _bundle_problem(**{key: entry.get(key) for key in FIELDS}):
            raise DatasetError(f"{where}: {problem}")
        name = entry["name"]
        if name in first_entry:
            raise DatasetError(f"{where}: duplicate name {name!r} (entry {first_entry[name]} has it too)")
        first_entry[name] = number
        bundles[name] = Bundle(**{key: entry[key] for key in FIELDS if entry.get(key) is not None})
    return bundles


def load_bundles(path: Path, env: Mapping[str, str] | None = None) -> dict[str, Bundle]:
    """``name -> Bundle`` from a YAML file ``bundles: [{name, url, sha256?, size?, filename?,
    content_type?}, ...]``.

    Raises ``DatasetError`` naming the file, the entry and the problem, in one line, with the
    query strings and ``user:password@`` of URLs removed."""
    try:
        return _parse_bundles(Path(path), env)
    except DatasetError as exc:
        raise DatasetError(scrub_text(_one_line(exc))) from None


def try_load_bundles(path: Path, env: Mapping[str, str] | None = None) -> tuple[dict[str, Bundle], str | None]:
    """``(bundles, None)``, or ``({}, one-line problem naming the file)``: never raises, for
    callers that must go on without the bundles (a code location that must load)."""
    try:
        return load_bundles(path, env), None
    except DatasetError as exc:
        return {}, str(exc)
    except Exception as exc:
        return {}, scrub_text(f"bundle file {path} cannot be loaded: {exc.__class__.__name__}: {_one_line(exc)}")


def make_session(retries: int = 5, backoff: float = 0.5) -> requests.Session:
    """A session retrying GET/HEAD on connection errors, 429 and 5xx (with exponential backoff).

    An answer with ``Retry-After`` is returned, not retried: ``download_bundle`` honours it up to
    its ``max_retry_after_s`` (urllib3 itself would wait up to 6 hours). ``trust_env`` stays on:
    ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` and ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``
    from the environment apply."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util import Retry

    class _Retry(Retry):
        """urllib3's ``Retry``, except that an answer carrying ``Retry-After`` is not retried (nor
        waited for) here but handed back: ``download_bundle`` waits as asked, within its cap."""

        def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
            return not has_retry_after and super().is_retry(method, status_code, has_retry_after)

    retry = _Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET", "HEAD"}),
        respect_retry_after_header=False,
        raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@dataclass
class BundleResult:
    """What ``download_bundle`` did. ``sha256`` is ``None`` only for a skip without a known sha256."""

    path: Path
    bytes: int
    sha256: str | None
    transferred_bytes: int = 0
    resumed: bool = False
    skipped: bool = False
    duration_s: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.transferred_bytes / 1e6 / self.duration_s if self.duration_s > 0 else 0.0


class _Interrupted(Exception):
    """The body stopped before its end (the message is already scrubbed)."""


class _TooLong(Exception):
    """The body went on past the length that was announced for it."""


class _Wait(Exception):
    """The server answered a retryable status with ``Retry-After``: wait, then ask again."""

    def __init__(self, status: int, value: str, error: DownloadError):
        super().__init__(value)
        self.status, self.value, self.error = status, value, error


def _not_regular(path: Path, what: str) -> str | None:
    """Why the existing ``path`` must not be used as ``what`` (a symbolic link, not a regular
    file), or ``None`` (a regular file, or nothing there)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # nothing there (or not reachable: what comes next says why)
        return None
    if stat.S_ISLNK(mode):
        try:
            target = f" (to {os.readlink(path)})"
        except OSError:
            target = ""
        return (
            f"{what} {path} is a symbolic link{target}; refusing to follow it: remove the link "
            "(its target is left alone)"
        )
    if not stat.S_ISREG(mode):
        return f"{what} {path} is not a regular file; remove it"
    return None


def _open_own(name: str, path: Path, flags: int, what: str) -> int:
    """A descriptor for ``path`` opened without following a symbolic link, when it is a regular
    file with no other hard link; else ``DownloadError`` (``FileNotFoundError`` when missing and
    not created)."""
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, 0o644)
    except OSError as exc:
        if exc.errno != errno.ENOENT and (why := _not_regular(path, what)):
            raise DownloadError(f"bundle {name}: {why}") from None
        raise
    info = os.fstat(fd)
    why = (
        f"{what} {path} is not a regular file; remove it"
        if not stat.S_ISREG(info.st_mode)
        else f"{what} {path} has {info.st_nlink - 1} other hard link(s); refusing to write into a file "
        "shared with another name: remove it"
        if info.st_nlink > 1
        else None
    )
    if why:
        os.close(fd)
        raise DownloadError(f"bundle {name}: {why}")
    return fd


def _remove_own(path: Path) -> None:
    """Delete ``path`` when it is a regular file (never a link or anything else put there)."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(path).st_mode):
            path.unlink()


def _header_value(value: str) -> str | None:
    """``value`` when it can be sent back as a header (printable ASCII, not too long)."""
    value = value.strip()
    ok = value and len(value) <= MAX_VALIDATOR_BYTES and all(32 <= ord(c) < 127 for c in value)
    return value if ok else None


class _Part:
    """The open, locked ``.part`` file and the sha256 of the bytes it holds."""

    def __init__(self, handle: BinaryIO, chunk_size: int, validator_path: Path | None = None, name: str = ""):
        self.handle, self.chunk_size = handle, chunk_size
        self.validator_path = validator_path
        self.name = name
        self.hasher: Any = None
        self.hashed = -1  # bytes covered by ``hasher``; -1: not hashed yet
        self.transferred = 0
        self.resumed = False

    def validator(self) -> str | None:
        """The strong ETag or Last-Modified of the response the part's first byte came from."""
        if self.validator_path is None:
            return None
        try:
            fd = _open_own(self.name, self.validator_path, os.O_RDONLY, "the validator file")
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            return _header_value(handle.read(MAX_VALIDATOR_BYTES + 1).decode("utf-8", "replace"))

    def remember(self, response: requests.Response) -> None:
        """Keep the response's validator, for ``If-Range`` when resuming (weak ETags do not count)."""
        if self.validator_path is None:
            return
        etag = response.headers.get("ETag", "").strip()
        value = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified", "").strip()
        if value := _header_value(value):
            fd = _open_own(self.name, self.validator_path, os.O_WRONLY | os.O_CREAT, "the validator file")
            with os.fdopen(fd, "wb") as handle:
                handle.truncate(0)
                handle.write(value.encode("ascii"))
        else:
            _remove_own(self.validator_path)

    @property
    def size(self) -> int:
        self.handle.flush()
        return os.fstat(self.handle.fileno()).st_size

    def digest(self) -> str:
        """The sha256 of the whole part (what is on disk is hashed once, then kept up to date)."""
        size = self.size
        if self.hashed != size:
            self.hasher, self.hashed = hashlib.sha256(), 0
            while self.hashed < size and (block := os.pread(self.handle.fileno(), self.chunk_size, self.hashed)):
                self.hasher.update(block)
                self.hashed += len(block)
        return self.hasher.hexdigest()

    def restart(self) -> None:
        self.handle.truncate(0)
        self.hasher, self.hashed = hashlib.sha256(), 0
        if self.validator_path is not None:
            _remove_own(self.validator_path)

    def append(self, chunk: bytes) -> None:
        self.handle.write(chunk)
        self.hasher.update(chunk)
        self.hashed += len(chunk)
        self.transferred += len(chunk)


def _sha256_file(path: Path, chunk_size: int) -> str:
    hasher = hashlib.sha256()
    with os.fdopen(os.open(path, os.O_RDONLY | _OPEN_FLAGS), "rb") as handle:
        while block := handle.read(chunk_size):
            hasher.update(block)
    return hasher.hexdigest()


def _existing_final(bundle: Bundle, final: Path, chunk_size: int) -> tuple[bool, int, str | None, str]:
    """(matches, size, sha256 or None, why not) for a file already at the final name."""
    size = final.stat().st_size
    if bundle.size is not None and size != bundle.size:
        return False, size, None, f"{size:,} bytes instead of {bundle.size:,}"
    if bundle.sha256 is None:
        return True, size, None, ""
    digest = _sha256_file(final, chunk_size)
    return digest == bundle.sha256, size, digest, f"sha256 {digest} instead of {bundle.sha256}"


def _lock(part: _Part, bundle: Bundle, path: Path) -> None:
    try:
        fcntl.flock(part.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DownloadError(f"bundle {bundle.name}: another download is writing {path}; wait for it to end") from None


def _int_header(response: requests.Response, name: str) -> int | None:
    try:
        return int(response.headers[name])
    except (KeyError, ValueError):
        return None


def _http_error(bundle: Bundle, response: requests.Response) -> DownloadError:
    status = response.status_code
    message = f"bundle {bundle.name}: HTTP {status} {response.reason or ''}".rstrip() + f" for {redact_url(bundle.url)}"
    if response.history:
        message += f" (redirected to {redact_url(response.url)})"
    if status in RETRY_STATUSES:
        message += " after retries"
    if status in (401, 403):
        message += "; check access rights (a signed URL may have expired)"
    return DownloadError(message)


#: A body that brings fewer than LOW_SPEED_BYTES in LOW_SPEED_WINDOW_S is stopped: a server that
#: trickles one byte at a time never trips the per-read timeout, and would hold a run for days.
LOW_SPEED_BYTES = 1024
LOW_SPEED_WINDOW_S = 60.0


def _body(response: requests.Response, chunk_size: int, limit: int | None) -> Iterator[bytes]:
    """The raw body bytes (no content decoding: they match Range offsets and Content-Length), at
    most ``limit`` of them: ``_TooLong`` when the body goes on after that, ``DownloadError`` when
    fewer than ``LOW_SPEED_BYTES`` arrive in ``LOW_SPEED_WINDOW_S``."""
    import requests
    from urllib3.exceptions import HTTPError as Urllib3Error

    received = 0
    window_start, window_bytes = time.monotonic(), 0
    try:
        while limit is None or received < limit:
            # read1: whatever has arrived (up to the size), so a trickling server is seen at once
            block = response.raw.read1(
                chunk_size if limit is None else min(chunk_size, limit - received), decode_content=False
            )
            if not block:
                return
            received += len(block)
            window_bytes += len(block)
            now = time.monotonic()
            if now - window_start >= LOW_SPEED_WINDOW_S:
                if window_bytes < LOW_SPEED_BYTES:
                    raise DownloadError(
                        f"the server sent {window_bytes} bytes in {now - window_start:.0f} s (under "
                        f"{LOW_SPEED_BYTES} bytes in {LOW_SPEED_WINDOW_S:g} s): stopped; what arrived is kept, "
                        "run again to resume"
                    )
                window_start, window_bytes = now, 0
            yield block
    except (Urllib3Error, requests.RequestException, OSError) as exc:
        raise _Interrupted(scrub_text(f"{exc.__class__.__name__}: {exc}")) from None
    try:  # all announced bytes are in: anything after them is a lie about the length
        more = response.raw.read(1, decode_content=False)
    except (Urllib3Error, requests.RequestException, OSError):
        more = b""
    if more:
        raise _TooLong()


def _media_type(value: str | None) -> str:
    """``'Text/HTML; charset=utf-8'`` -> ``'text/html'``."""
    return (value or "").split(";", 1)[0].strip().lower()


def _content_type_problem(bundle: Bundle, response: requests.Response) -> str:
    """Why the response's Content-Type shows it is not the bundle's file ('' when it may be)."""
    assert bundle.filename is not None
    got = _media_type(response.headers.get("Content-Type"))
    if bundle.content_type is not None and got != bundle.content_type:
        return (
            f"the server answered with Content-Type {got or '(none)'}, not the bundle's content_type "
            f"{bundle.content_type}"
        )
    if bundle.content_type is None and got == "text/html" and not bundle.filename.lower().endswith(HTML_SUFFIXES):
        return (
            f"the server answered with an HTML page (Content-Type text/html) instead of {bundle.filename}, "
            "most likely an error or sign-in page; if the file really is HTML, give the bundle "
            "content_type: text/html"
        )
    return ""


def _changed(validator: str, response: requests.Response) -> str:
    """Why a 206 cannot continue the part begun under ``validator`` ('' when it can)."""
    etag, modified = response.headers.get("ETag", "").strip(), response.headers.get("Last-Modified", "").strip()
    if validator.startswith('"'):  # a strong ETag
        return "" if etag == validator else f"ETag {validator} -> {etag or 'none'}"
    return "" if modified == validator else f"Last-Modified {validator} -> {modified or 'none'}"


#: While a body arrives, free space is checked every this many bytes; under ``DISK_MARGIN_MIN`` free stops it.
FREE_SPACE_EVERY_BYTES = 64 * 1024 * 1024


def _check_room(bundle: Bundle, part: _Part, path: Path) -> None:
    """``DownloadError`` (the part deleted) when the disk holding ``path`` is nearly full."""
    free = shutil.disk_usage(path.parent).free
    if free < DISK_MARGIN_MIN:
        part.restart()
        raise DownloadError(
            f"bundle {bundle.name}: only {human_bytes(free)} left free in {path.parent} while receiving "
            f"{redact_url(bundle.url)}; stopped and the partial file was deleted"
        )


def _check_total(bundle: Bundle, total: int | None, part: _Part, path: Path) -> None:
    """Fail before transferring when the server announces another size than the bundle file."""
    if bundle.size is not None and total is not None and total != bundle.size:
        part.restart()
        _remove_own(path)
        raise DownloadError(
            f"bundle {bundle.name}: size mismatch: expected {bundle.size:,} bytes, the server "
            f"announces {total:,} for {redact_url(bundle.url)}; the partial file was deleted"
        )


def _seconds(value: float) -> str:
    return f"{value:,.0f} s" if value >= 10 else f"{value:.3g} s"


def retry_after_seconds(value: str) -> float | None:
    """The wait a ``Retry-After`` value asks for (seconds, or an HTTP date), ``None`` when it is
    neither; never negative."""
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,30}", value):
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


@dataclass(frozen=True)
class HttpLimits:
    """What an HTTP download accepts: the longest wait a server may ask for (``Retry-After``),
    and the most bytes of a body whose size nothing announces (no Content-Length, no declared
    size). The CLI and the Dagster layer read them from the environment (``parse``)."""

    max_retry_after_s: float = MAX_RETRY_AFTER_S
    max_unsized_bytes: int = MAX_UNSIZED_BYTES

    @classmethod
    def parse(cls, retry_after: str | None, unsized: str | None) -> HttpLimits:
        """From the settings' text (``None`` or empty: the default); ``DownloadError`` naming the
        variable when a value is not a number of seconds >= 0, or of bytes > 0."""
        wait = MAX_RETRY_AFTER_S
        if (retry_after or "").strip():
            wait = max_retry_after(retry_after.strip(), f"${MAX_RETRY_AFTER_ENV}")  # type: ignore[union-attr]
        size = MAX_UNSIZED_BYTES
        if (unsized or "").strip():
            raw = unsized.strip()  # type: ignore[union-attr]
            if not (raw.isascii() and raw.isdigit()) or int(raw) <= 0:
                raise DownloadError(
                    f"${MAX_UNSIZED_ENV} {raw!r} is not a number of bytes > 0 (the largest body accepted from a "
                    "server that announces no size)"
                )
            size = int(raw)
        return cls(wait, size)


def max_retry_after(value: object, source: str = "max_retry_after_s") -> float:
    """``value`` as the longest server-requested wait (``Retry-After``) to honour, in seconds;
    ``DownloadError`` naming ``source`` when it is not a number of seconds >= 0."""
    shown = repr(value)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = -1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DownloadError(
            f"{source} {shown} is not a number of seconds >= 0 (the longest wait a server may "
            f"ask for with Retry-After), e.g. {MAX_RETRY_AFTER_S:g}"
        )
    return float(value)


def _fetch(
    bundle: Bundle, part: _Part, path: Path, session: requests.Session, timeout: float, log: Log, max_unsized: int
) -> tuple[str, int | None, str]:
    """One GET filling the part -> (``complete`` | ``more`` | ``restart`` | ``interrupted``, total size,
    detail); ``more``: a whole response, but a range ending before the file does. ``_Wait`` when
    the server asks (Retry-After) to come back later."""
    offset = part.size
    headers = {"Accept-Encoding": "identity"}
    validator = part.validator() if offset else None
    if offset and validator is None and bundle.sha256 is None:
        # Nothing could show that the file on the server is still the one the part began with.
        log(
            f"bundle {bundle.name}: the server gave no ETag or Last-Modified and the bundle has no sha256, "
            f"so the {offset:,} bytes received cannot be trusted to match; starting over"
        )
        part.restart()
        offset = 0
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator  # a changed file comes back whole (200), never spliced
        log(f"bundle {bundle.name}: resuming at {offset:,} bytes")
    import requests

    try:
        response = session.get(bundle.url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as exc:
        raise DownloadError(
            f"bundle {bundle.name}: cannot download {redact_url(bundle.url)}: "
            f"{exc.__class__.__name__}: {scrub_text(str(exc))}"
        ) from None
    with response:
        status = response.status_code
        if status == 416 and offset:
            match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            expected = bundle.size if bundle.size is not None else int(match.group(1)) if match else None
            if expected == offset:
                return "complete", expected, ""
            return "restart", None, f"the server refused the range of the {offset:,}-byte part (416)"
        if status in RETRY_STATUSES and "Retry-After" in response.headers:
            raise _Wait(status, response.headers["Retry-After"], _http_error(bundle, response))
        if status not in (200, 206):
            raise _http_error(bundle, response)
        if problem := _content_type_problem(bundle, response):
            raise DownloadError(f"bundle {bundle.name}: {problem} for {redact_url(bundle.url)}")
        length = _int_header(response, "Content-Length")
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if (
                not match
                or int(match.group(1)) != offset
                or int(match.group(2)) < offset
                or (match.group(3) != "*" and int(match.group(2)) >= int(match.group(3)))
            ):
                return (
                    "restart",
                    None,
                    f"the server answered Range bytes={offset}- with Content-Range "
                    f"{response.headers.get('Content-Range')!r}",
                )
            total = None if match.group(3) == "*" else int(match.group(3))
            range_end = int(match.group(2))
            if validator and (changed := _changed(validator, response)):  # a server that ignored If-Range
                return "restart", None, f"the file changed on the server ({changed})"
            part.resumed = part.resumed or offset > 0
            limit, announced = range_end - offset + 1, "Content-Range"
        else:
            if offset:
                log(
                    f"bundle {bundle.name}: the server sent the whole file (Range ignored, or the file "
                    "changed since the part began); starting over"
                )
                part.restart()
                offset = 0
            part.remember(response)
            total = length
            range_end = None
            limit, announced = (length, "Content-Length") if length is not None else (bundle.size, "size")
            if limit is None:  # nothing says how long the body is: it is capped, never endless
                limit, announced = max_unsized, "cap"
        _check_total(bundle, total, part, path)
        expected_total = bundle.size if bundle.size is not None else total
        if expected_total is not None:
            check_free_space(path.parent, expected_total - offset, f"bundle {bundle.name}")
        part.digest()  # hash what the part already holds before appending
        received, checked = 0, 0
        try:
            for chunk in _body(response, part.chunk_size, limit):
                part.append(chunk)
                received += len(chunk)
                if received - checked >= FREE_SPACE_EVERY_BYTES:  # the disk is watched as the bytes arrive
                    checked = received
                    _check_room(bundle, part, path)
        except _Interrupted as exc:
            return "interrupted", total, str(exc)
        except _TooLong:
            part.restart()
            what = {
                "size": f"the bundle's size of {limit:,} bytes",
                "cap": f"{limit:,} bytes without announcing a size (the cap, ${MAX_UNSIZED_ENV})",
            }.get(announced, f"the {limit:,} bytes it announced ({announced})")
            raise DownloadError(
                f"bundle {bundle.name}: the server sent more than {what} for "
                f"{redact_url(bundle.url)}; the partial file was deleted"
            ) from None
        finally:
            part.handle.flush()
        if status == 200 and length is not None and received < length:
            return "interrupted", total, f"body ended after {received:,} of {length:,} bytes"
        if status == 206 and received < limit:  # Content-Length shorter than the range, or body cut
            return "interrupted", total, f"range body ended after {received:,} of {limit:,} bytes"
        if range_end is not None and total is not None and range_end + 1 < total:
            return "more", total, ""  # the server may answer a range with less than asked: ask again
        return "complete", total, ""


def _transfer(
    bundle: Bundle,
    part: _Part,
    path: Path,
    session: requests.Session,
    attempts: int,
    timeout: float,
    max_wait: float,
    log: Log,
    max_unsized: int = MAX_UNSIZED_BYTES,
) -> int | None:
    """Fill the part until the server says it is complete; the total size announced (or ``None``)."""
    failures = restarts = waits = 0
    while True:
        if bundle.size is not None and part.size > bundle.size:
            log(f"bundle {bundle.name}: {path} is larger than {bundle.size:,} bytes; starting over")
            part.restart()
        try:
            kind, total, detail = _fetch(bundle, part, path, session, timeout, log, max_unsized)
        except _Wait as wait:
            waits += 1
            pause = retry_after_seconds(wait.value)
            if pause is not None and pause > max_wait:
                raise DownloadError(
                    f"bundle {bundle.name}: the server asks to wait {_seconds(pause)} "
                    f"({human_duration(pause)}; HTTP {wait.status}, Retry-After: {wait.value.strip()[:40]!r}) "
                    f"before trying again, longer than the {_seconds(max_wait)} allowed (max_retry_after_s or "
                    f"${MAX_RETRY_AFTER_ENV}) for {redact_url(bundle.url)}; try again later or allow a longer wait"
                ) from None
            if waits > attempts:
                raise DownloadError(f"{wait.error}; the server asked to wait (Retry-After) {waits} times") from None
            if pause is None:  # not a number of seconds nor a date: back off as for an interruption
                pause = min(RESUME_BACKOFF_S * 2 ** (waits - 1), RESUME_BACKOFF_MAX_S)
            log(
                f"bundle {bundle.name}: HTTP {wait.status}; the server asks to wait {_seconds(pause)}, "
                f"trying again then (wait {waits} of at most {attempts})"
            )
            time.sleep(pause)
            continue
        if kind == "complete":
            return total
        if kind == "more":  # progress was made (at least one byte): not a failure
            continue
        if kind == "restart":
            restarts += 1
            if restarts > MAX_RESTARTS:
                raise DownloadError(f"bundle {bundle.name}: {detail}, {restarts} times, for {redact_url(bundle.url)}")
            log(f"bundle {bundle.name}: {detail}; starting over")
            part.restart()
            continue
        failures += 1
        if failures >= attempts:
            raise DownloadError(
                f"bundle {bundle.name}: the transfer of {redact_url(bundle.url)} was interrupted {failures} "
                f"time(s), last: {detail}; the {part.size:,} bytes received are kept in {path}: run again to resume"
            )
        pause = min(RESUME_BACKOFF_S * 2 ** (failures - 1), RESUME_BACKOFF_MAX_S)
        log(
            f"bundle {bundle.name}: transfer interrupted at {part.size:,} bytes ({detail}); "
            f"resuming in {pause:.1f}s (attempt {failures + 1} of {attempts})"
        )
        time.sleep(pause)


def _verify(bundle: Bundle, part: _Part, path: Path, total: int | None) -> str:
    """The part's sha256 once its size and sha256 match; else delete it and raise ``DownloadError``."""
    expected = bundle.size if bundle.size is not None else total
    size = part.size
    problem = f"size mismatch: expected {expected:,} bytes, got {size:,}" if expected not in (None, size) else ""
    digest = part.digest()
    if not problem and bundle.sha256 is not None and digest != bundle.sha256:
        problem = f"sha256 mismatch: expected {bundle.sha256}, got {digest}"
    if problem:
        part.restart()
        _remove_own(path)
        raise DownloadError(
            f"bundle {bundle.name}: {problem} for {redact_url(bundle.url)}; "
            "the partial file was deleted, run again to download it afresh"
        )
    return digest


def download_bundle(
    bundle: Bundle,
    dest_dir: Path,
    *,
    session: requests.Session | None = None,
    attempts: int = 5,
    chunk_size: int = 1 << 20,
    timeout: float = 60,
    max_retry_after_s: float | None = None,
    limits: HttpLimits = HttpLimits(),
    log: Log = lambda msg: None,
) -> BundleResult:
    """Fetch ``bundle`` to ``dest_dir/<filename>``, resuming and verifying (see the module docstring).

    ``max_retry_after_s``: the longest wait a server may ask for with ``Retry-After`` (default:
    ``limits``'s, 300 s unless the caller read another from ``$DATASET_BUNDLES_MAX_RETRY_AFTER_S``);
    a longer one fails at once. ``limits`` also caps a body whose size nothing announces. A
    ``session`` not made by ``make_session`` whose ``Retry`` honours ``Retry-After`` waits
    as that ``Retry`` says before this cap is reached.

    Raises ``DownloadError`` on HTTP errors (after the session's retries), on a size or sha256
    mismatch (the part is deleted), on a wrong Content-Type or a body longer than announced, on
    a part, validator or final name that is a symbolic link or not a regular file, and when the
    body keeps breaking off (the part is kept)."""
    started = time.monotonic()
    max_wait = limits.max_retry_after_s if max_retry_after_s is None else max_retry_after(max_retry_after_s)
    dest_dir = Path(dest_dir)
    assert bundle.filename is not None  # set by Bundle.__post_init__
    final, path = dest_dir / bundle.filename, dest_dir / f".{bundle.filename}.part"
    validator_path = path.with_name(path.name + ".validator")
    if why := _not_regular(final, "the final file"):
        raise DownloadError(f"bundle {bundle.name}: {why}")
    if final.is_file():
        matches, size, digest, why = _existing_final(bundle, final, chunk_size)
        if matches:
            _remove_own(path)  # a part left behind by an older run
            _remove_own(validator_path)
            log(f"bundle {bundle.name}: {final} already complete ({human_bytes(size)}); nothing to transfer")
            return BundleResult(final, size, digest, skipped=True, duration_s=time.monotonic() - started)
        log(f"bundle {bundle.name}: {final} does not match ({why}); downloading it again")
    for side, what in ((path, "the partial file"), (validator_path, "the validator file")):
        if why := _not_regular(side, what):
            raise DownloadError(f"bundle {bundle.name}: {why}")
    check_writable(dest_dir, f"bundle {bundle.name}: destination")
    own_session = session is None
    session = session or make_session()
    size_text = human_bytes(bundle.size) if bundle.size is not None else "size unknown"
    log(f"bundle {bundle.name}: downloading {redact_url(bundle.url)} ({size_text}) to {final}")
    try:
        fd = _open_own(bundle.name, path, os.O_RDWR | os.O_CREAT | os.O_APPEND, "the partial file")
        with os.fdopen(fd, "a+b") as handle:
            part = _Part(handle, max(1, chunk_size), validator_path=validator_path, name=bundle.name)
            _lock(part, bundle, path)
            try:
                total = _transfer(
                    bundle, part, path, session, max(1, attempts), timeout, max_wait, log, limits.max_unsized_bytes
                )
                digest = _verify(bundle, part, path, total)
                size = part.size
                os.fsync(handle.fileno())
                os.replace(path, final)
                _remove_own(validator_path)
            except BaseException:
                if part.size == 0:
                    _remove_own(path)
                    _remove_own(validator_path)
                raise
    except OSError as exc:
        raise DownloadError(
            f"bundle {bundle.name}: cannot write {path if path.exists() else final}: "
            f"{exc.strerror or scrub_text(str(exc))}"
        ) from None
    finally:
        if own_session:
            session.close()
    result = BundleResult(final, size, digest, part.transferred, part.resumed, False, time.monotonic() - started)
    log(
        f"bundle {bundle.name}: {final} complete ({human_bytes(size)}, sha256 {digest[:12]}…; "
        f"{human_bytes(part.transferred)} transferred in {human_duration(result.duration_s)})"
    )
    return result
