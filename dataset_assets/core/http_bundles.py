"""Single-file dataset bundles behind HTTP(S) URLs: declared in YAML, fetched resumably, verified.

Some sample datasets are published as one file behind a public or signed URL. A bundle file
lists them::

    bundles:
      - name: lidc-sample          # partition key and directory name
        url: https://example.org/lidc-sample.zip?X-Amz-Signature=...
        sha256: 3f7a...            # optional, 64 hex digits
        size: 123456789            # optional, bytes
        filename: lidc.zip         # optional; default: the last segment of the URL path

``download_bundle`` works in four steps:

1. Skip: when the final file exists and matches the known size and sha256, nothing is
   requested (a file at the final name got there by an atomic rename after verification).
2. Check: the destination directory is writable (before any request, with a clear error).
3. Transfer: the body streams in ``chunk_size`` pieces (never whole in memory) to
   ``.<filename>.part`` next to the final name, hashed while written. The part file is locked
   (``flock``) so two runs cannot write it at once. An existing part is resumed with
   ``Range: bytes=<len>-`` and ``If-Range: <validator>`` (the strong ETag or Last-Modified of
   the response the part began with, kept in ``.<filename>.part.validator``) after hashing what
   it holds: ``206`` appends when it carries the same validator (a server that ignores
   If-Range is caught there; a range shorter than asked is followed by the next one), ``200``
   (Range ignored, or the file changed on the server) starts over, ``416`` means the part is
   complete when its size is the expected size (else starts over). A part whose origin cannot
   be proven (no validator and no sha256) is not resumed but started over: a changed file is
   never spliced onto an old head. A body cut short keeps the part and is resumed, up to
   ``attempts`` times with a short backoff. Request-level retries (429 honouring ``Retry-After``, 5xx,
   refused or reset connections) happen below, in the session's ``urllib3`` ``Retry``.
4. Verify: the size (``bundle.size``, else what the server announced) and the sha256 (when
   given). A mismatch deletes the part. Success is ``os.replace(part, final)``: the final name
   only ever holds a complete, verified file.

Signed URLs carry credentials in their query string: messages and logs show ``?…`` instead
(``redact_url``), and exceptions from requests/urllib3, which quote the URL, are scrubbed and
not chained.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

import requests
import yaml
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.util import Retry

from .errors import DatasetError, DownloadError
from .fs import check_free_space, check_writable
from .fmt import human_bytes, human_duration

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock
    fcntl = None  # type: ignore[assignment]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SHA256 = re.compile(r"[0-9a-fA-F]{64}")
FIELDS = ("name", "url", "sha256", "size", "filename")
RETRY_STATUSES = (429, 500, 502, 503, 504)
RESUME_BACKOFF_S = 0.5  # pause before the first resume of a cut-short body; doubles each time
RESUME_BACKOFF_MAX_S = 8.0
MAX_RESTARTS = 3  # times one download may start over (Range ignored or refused)
MAX_FILENAME_BYTES = 200  # leaves room for the ".part" name within the usual 255
_QUERY = re.compile(r"(?<=[\w/.~%:-])\?[^\s'\"<>)\]]+")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")
Log = Callable[[str], None]


def redact_url(url: str) -> str:
    """``https://h/f.zip?X-Amz-Signature=…`` -> ``https://h/f.zip?…`` (drops ``user:password@`` too)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "…" if parts.query else "", ""))


def _scrub(text: str) -> str:
    """Replace every query string (``?...`` right after a URL or path) in ``text`` with ``?…``."""
    return _QUERY.sub("?…", text)


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


def _bundle_problem(name: Any, url: Any, sha256: Any = None, size: Any = None, filename: Any = None) -> str | None:
    """What is wrong with these bundle fields, in words, or ``None``."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return (f"name {name!r} is not valid: use letters, digits, '_', '.' and '-', starting with a letter "
                "or digit (it becomes a partition key and a directory name)")
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
        return (f"filename {filename!r} is not a plain file name (no '/', '\\', NUL, control characters "
                f"or '..'; at most {MAX_FILENAME_BYTES} bytes)")
    return None


@dataclass(frozen=True)
class Bundle:
    """One file behind a URL. ``filename`` defaults to the URL's last path segment (made safe)."""

    name: str
    url: str
    sha256: str | None = None
    size: int | None = None
    filename: str | None = None

    def __post_init__(self) -> None:
        problem = _bundle_problem(self.name, self.url, self.sha256, self.size, self.filename)
        if problem:
            raise DatasetError(f"bundle {self.name!r}: {problem}")
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", self.sha256.lower())
        if self.filename is None:
            object.__setattr__(self, "filename", default_filename(self.url, self.name))


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def load_bundles(path: Path) -> dict[str, Bundle]:
    """``name -> Bundle`` from a YAML file ``bundles: [{name, url, sha256?, size?, filename?}, ...]``.

    Raises ``DatasetError`` naming the file, the entry and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"bundle file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"bundle file {path} cannot be read: {_one_line(exc)}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DatasetError(_scrub(f"bundle file {path} is not valid YAML: {_one_line(exc)}")) from None
    if not isinstance(data, dict) or not isinstance(data.get("bundles"), list):
        raise DatasetError(f"bundle file {path}: expected a mapping with a 'bundles' list, "
                           "as in 'bundles: [{name: ..., url: ...}]'")
    if extra := sorted(map(str, set(data) - {"bundles"})):
        raise DatasetError(f"bundle file {path}: unknown top-level key(s) {', '.join(extra)}; "
                           "only 'bundles' is allowed")
    bundles: dict[str, Bundle] = {}
    first_entry: dict[str, int] = {}
    for number, entry in enumerate(data["bundles"], 1):
        where = f"bundle file {path}, entry {number}"
        if not isinstance(entry, dict):
            raise DatasetError(_scrub(f"{where}: expected a mapping with name and url, got {type(entry).__name__} {entry!r}"))
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


def make_session(retries: int = 5, backoff: float = 0.5) -> requests.Session:
    """A session retrying GET/HEAD on connection errors, 429 (honouring ``Retry-After``) and 5xx.

    ``trust_env`` stays on: ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` and
    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` from the environment apply."""
    retry = Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        backoff_factor=backoff,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET", "HEAD"}),
        respect_retry_after_header=True,
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


class _Part:
    """The open, locked ``.part`` file and the sha256 of the bytes it holds."""

    def __init__(self, handle: BinaryIO, chunk_size: int, validator_path: Path | None = None):
        self.handle, self.chunk_size = handle, chunk_size
        self.validator_path = validator_path
        self.hasher: Any = None
        self.hashed = -1  # bytes covered by ``hasher``; -1: not hashed yet
        self.transferred = 0
        self.resumed = False

    def validator(self) -> str | None:
        """The strong ETag or Last-Modified of the response the part's first byte came from."""
        try:
            return self.validator_path.read_text(encoding="utf-8").strip() or None if self.validator_path else None
        except OSError:
            return None

    def remember(self, response: requests.Response) -> None:
        """Keep the response's validator, for ``If-Range`` when resuming (weak ETags do not count)."""
        if self.validator_path is None:
            return
        etag = response.headers.get("ETag", "").strip()
        value = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified", "").strip()
        if value:
            self.validator_path.write_text(value, encoding="utf-8")
        else:
            self.validator_path.unlink(missing_ok=True)

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
            self.validator_path.unlink(missing_ok=True)

    def append(self, chunk: bytes) -> None:
        self.handle.write(chunk)
        self.hasher.update(chunk)
        self.hashed += len(chunk)
        self.transferred += len(chunk)


def _sha256_file(path: Path, chunk_size: int) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
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
    if fcntl is None:  # pragma: no cover
        return
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


def _body(response: requests.Response, chunk_size: int) -> Iterator[bytes]:
    """The raw body bytes (no content decoding: they match Range offsets and Content-Length)."""
    try:
        yield from response.raw.stream(chunk_size, decode_content=False)
    except (Urllib3Error, requests.RequestException, OSError) as exc:
        raise _Interrupted(_scrub(f"{exc.__class__.__name__}: {exc}")) from None


def _changed(validator: str, response: requests.Response) -> str:
    """Why a 206 cannot continue the part begun under ``validator`` ('' when it can)."""
    etag, modified = response.headers.get("ETag", "").strip(), response.headers.get("Last-Modified", "").strip()
    if validator.startswith('"'):  # a strong ETag
        return "" if etag == validator else f"ETag {validator} -> {etag or 'none'}"
    return "" if modified == validator else f"Last-Modified {validator} -> {modified or 'none'}"


def _check_total(bundle: Bundle, total: int | None, part: _Part, path: Path) -> None:
    """Fail before transferring when the server announces another size than the bundle file."""
    if bundle.size is not None and total is not None and total != bundle.size:
        part.restart()
        path.unlink(missing_ok=True)
        raise DownloadError(f"bundle {bundle.name}: size mismatch: expected {bundle.size:,} bytes, the server "
                            f"announces {total:,} for {redact_url(bundle.url)}; the partial file was deleted")


def _fetch(bundle: Bundle, part: _Part, path: Path, session: requests.Session, timeout: float,
           log: Log) -> tuple[str, int | None, str]:
    """One GET filling the part -> (``complete`` | ``more`` | ``restart`` | ``interrupted``, total size,
    detail); ``more``: a whole response, but a range ending before the file does."""
    offset = part.size
    headers = {"Accept-Encoding": "identity"}
    validator = part.validator() if offset else None
    if offset and validator is None and bundle.sha256 is None:
        # Nothing could show that the file on the server is still the one the part began with.
        log(f"bundle {bundle.name}: the server gave no ETag or Last-Modified and the bundle has no sha256, "
            f"so the {offset:,} bytes received cannot be trusted to match; starting over")
        part.restart()
        offset = 0
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator  # a changed file comes back whole (200), never spliced
        log(f"bundle {bundle.name}: resuming at {offset:,} bytes")
    try:
        response = session.get(bundle.url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as exc:
        raise DownloadError(f"bundle {bundle.name}: cannot download {redact_url(bundle.url)}: "
                            f"{exc.__class__.__name__}: {_scrub(str(exc))}") from None
    with response:
        status = response.status_code
        if status == 416 and offset:
            match = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            expected = bundle.size if bundle.size is not None else int(match.group(1)) if match else None
            if expected == offset:
                return "complete", expected, ""
            return "restart", None, f"the server refused the range of the {offset:,}-byte part (416)"
        if status not in (200, 206):
            raise _http_error(bundle, response)
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != offset:
                return "restart", None, f"the server answered Range bytes={offset}- with Content-Range " \
                                        f"{response.headers.get('Content-Range')!r}"
            total = None if match.group(3) == "*" else int(match.group(3))
            range_end = int(match.group(2))
            if validator and (changed := _changed(validator, response)):  # a server that ignored If-Range
                return "restart", None, f"the file changed on the server ({changed})"
            part.resumed = part.resumed or offset > 0
        else:
            if offset:
                log(f"bundle {bundle.name}: the server sent the whole file (Range ignored, or the file "
                    "changed since the part began); starting over")
                part.restart()
                offset = 0
            part.remember(response)
            total = _int_header(response, "Content-Length")
            range_end = None
        _check_total(bundle, total, part, path)
        expected_total = bundle.size if bundle.size is not None else total
        if expected_total is not None:
            check_free_space(path.parent, expected_total - offset, f"bundle {bundle.name}")
        length = _int_header(response, "Content-Length")
        part.digest()  # hash what the part already holds before appending
        received = 0
        try:
            for chunk in _body(response, part.chunk_size):
                part.append(chunk)
                received += len(chunk)
        except _Interrupted as exc:
            return "interrupted", total, str(exc)
        finally:
            part.handle.flush()
        if length is not None and received < length:
            return "interrupted", total, f"body ended after {received:,} of {length:,} bytes"
        if range_end is not None and received < range_end - offset + 1:  # no Content-Length, body cut
            return "interrupted", total, f"range body ended after {received:,} of {range_end - offset + 1:,} bytes"
        if range_end is not None and total is not None and range_end + 1 < total:
            return "more", total, ""  # the server may answer a range with less than asked: ask again
        return "complete", total, ""


def _transfer(bundle: Bundle, part: _Part, path: Path, session: requests.Session, attempts: int,
              timeout: float, log: Log) -> int | None:
    """Fill the part until the server says it is complete; the total size announced (or ``None``)."""
    failures = restarts = 0
    while True:
        if bundle.size is not None and part.size > bundle.size:
            log(f"bundle {bundle.name}: {path} is larger than {bundle.size:,} bytes; starting over")
            part.restart()
        kind, total, detail = _fetch(bundle, part, path, session, timeout, log)
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
        log(f"bundle {bundle.name}: transfer interrupted at {part.size:,} bytes ({detail}); "
            f"resuming in {pause:.1f}s (attempt {failures + 1} of {attempts})")
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
        path.unlink(missing_ok=True)
        if part.validator_path is not None:
            part.validator_path.unlink(missing_ok=True)
        raise DownloadError(f"bundle {bundle.name}: {problem} for {redact_url(bundle.url)}; "
                            "the partial file was deleted, run again to download it afresh")
    return digest


def download_bundle(
    bundle: Bundle,
    dest_dir: Path,
    *,
    session: requests.Session | None = None,
    attempts: int = 5,
    chunk_size: int = 1 << 20,
    timeout: float = 60,
    log: Log = lambda msg: None,
) -> BundleResult:
    """Fetch ``bundle`` to ``dest_dir/<filename>``, resuming and verifying (see the module docstring).

    Raises ``DownloadError`` on HTTP errors (after the session's retries), on a size or sha256
    mismatch (the part is deleted) and when the body keeps breaking off (the part is kept)."""
    started = time.monotonic()
    dest_dir = Path(dest_dir)
    assert bundle.filename is not None  # set by Bundle.__post_init__
    final, path = dest_dir / bundle.filename, dest_dir / f".{bundle.filename}.part"
    if final.is_file():
        matches, size, digest, why = _existing_final(bundle, final, chunk_size)
        if matches:
            with contextlib.suppress(OSError):  # a part left behind by an older run
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".validator").unlink(missing_ok=True)
            log(f"bundle {bundle.name}: {final} already complete ({human_bytes(size)}); nothing to transfer")
            return BundleResult(final, size, digest, skipped=True, duration_s=time.monotonic() - started)
        log(f"bundle {bundle.name}: {final} does not match ({why}); downloading it again")
    check_writable(dest_dir, f"bundle {bundle.name}: destination")
    own_session = session is None
    session = session or make_session()
    size_text = human_bytes(bundle.size) if bundle.size is not None else "size unknown"
    log(f"bundle {bundle.name}: downloading {redact_url(bundle.url)} ({size_text}) to {final}")
    try:
        with open(path, "a+b") as handle:
            part = _Part(handle, max(1, chunk_size), validator_path=path.with_name(path.name + ".validator"))
            _lock(part, bundle, path)
            try:
                total = _transfer(bundle, part, path, session, max(1, attempts), timeout, log)
                digest = _verify(bundle, part, path, total)
                size = part.size
                os.fsync(handle.fileno())
                os.replace(path, final)
                part.validator_path.unlink(missing_ok=True)
            except BaseException:
                if path.exists() and part.size == 0:
                    path.unlink()
                    part.validator_path.unlink(missing_ok=True)
                raise
    except OSError as exc:
        raise DownloadError(f"bundle {bundle.name}: cannot write {path if path.exists() else final}: "
                            f"{exc.strerror or _scrub(str(exc))}") from None
    finally:
        if own_session:
            session.close()
    result = BundleResult(final, size, digest, part.transferred, part.resumed, False, time.monotonic() - started)
    log(f"bundle {bundle.name}: {final} complete ({human_bytes(size)}, sha256 {digest[:12]}…; "
        f"{human_bytes(part.transferred)} transferred in {human_duration(result.duration_s)})")
    return result
