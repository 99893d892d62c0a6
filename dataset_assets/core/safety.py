"""Values from outside (index rows, manifest files, server listings) checked before they become
a path, a command line or a file name.

Every check returns a one-line problem naming the value (or ``None`` when it is fine), so a
caller can fail one series and keep going with the others; ``require_*`` raise instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from dataset_assets.core.errors import UnsafeValueError

#: IDC's public buckets on AWS, and their names on the GCS mirror.
IDC_BUCKETS = (
    "idc-open-data",
    "idc-open-data-cr",
    "idc-open-data-two",
    "idc-open-cr",
    "idc-open-idc1",
)


#: Control characters (C0, DEL, C1), the Unicode line and paragraph separators, and lone surrogates
#: (bytes that were not UTF-8, as Python decodes them): never part of a path, a name or a line.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
#: The name of a download root's control folder (see ``control``): never a series' directory.
CONTROL_DIR = ".dataset_assets"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
#: An object name below a series prefix that can safely become a file name.
_OBJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,250}")
#: Many object names at once, joined with "/" (which no name may hold): one match for a series.
_OBJECTS = re.compile(rf"{_OBJECT.pattern}(?:/{_OBJECT.pattern})*")
NAME_MAX_BYTES = 255


def name_problem(value: object, what: str) -> str | None:
    """A value used as a file name of its own (a collection id in lock and state file names)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        return (
            f"{what} {value!r} cannot be used as a file name (letters, digits, '.', '_', '-', "
            "starting with a letter or digit, at most 200 characters)"
        )
    return None


def require_name(value: object, what: str) -> str:
    problem = name_problem(value, what)
    if problem:
        raise UnsafeValueError(problem)
    return value  # type: ignore[return-value]


def bucket_problem(bucket: object, allowed: Iterable[str]) -> str | None:
    allowed = tuple(allowed)
    if not isinstance(bucket, str) or not _BUCKET.fullmatch(bucket):
        return f"bucket {bucket!r} is not a valid S3 bucket name"
    if bucket not in allowed:
        return (
            f"bucket {bucket!r} is not an allowed bucket ({', '.join(allowed)}); "
            "set IDC_ALLOWED_BUCKETS to download from a mirror with other bucket names"
        )
    return None


def target_dir_problem(target_dir: object) -> str | None:
    """A series directory relative to the download root: no absolute path, no ``.``/``..``,
    no empty or over-long component, no control character or backslash."""
    if not isinstance(target_dir, str) or not target_dir.strip("/"):
        return f"target directory {target_dir!r} is empty"
    if target_dir.startswith("/") or CONTROL.search(target_dir) or "\\" in target_dir:
        return f"target directory {target_dir!r} is absolute or contains a control character or backslash"
    for part in target_dir.rstrip("/").split("/"):
        if part in ("", ".", ".."):
            return (
                f"target directory {target_dir!r} has a {part or 'empty'!r} component, "
                "which could leave the download root"
            )
        if len(part.encode()) > NAME_MAX_BYTES:
            return f"target directory {target_dir!r} has a component over {NAME_MAX_BYTES} bytes"
    if target_dir.rstrip("/").split("/")[0] == CONTROL_DIR:
        return f"target directory {target_dir!r} is inside the control folder {CONTROL_DIR}"
    return None


def location_problem(row: dict, allowed_buckets: Iterable[str], *, url: bool = True) -> str | None:
    """Where a row's objects are, before it becomes a URL: the bucket (allow-listed),
    ``crdc_series_uuid`` (a UUID) and, with ``url``, ``series_aws_url`` (exactly
    ``s3://<bucket>/<uuid>/*``). The one check every row kind shares (series, prior-release
    series, instances)."""
    problem = bucket_problem(row.get("aws_bucket"), allowed_buckets)
    uuid = row.get("crdc_series_uuid")
    if problem is None and not is_uuid(uuid):
        problem = f"crdc_series_uuid {uuid!r} is not a UUID"
    if problem is None and url and row.get("series_aws_url") != f"s3://{row.get('aws_bucket')}/{uuid}/*":
        problem = (
            f"series_aws_url {row.get('series_aws_url')!r} is not s3://<aws_bucket>/<crdc_series_uuid>/* "
            f"(s3://{row.get('aws_bucket')}/{uuid}/*)"
        )
    return problem


def series_problem(row: dict, allowed_buckets: Iterable[str]) -> str | None:
    """Everything of one manifest row that becomes a path or a URL: the bucket (allow-listed),
    ``crdc_series_uuid`` (a UUID), ``series_aws_url`` (exactly ``s3://<bucket>/<uuid>/*``), the
    target directory and the counts."""
    uid = row.get("SeriesInstanceUID")
    problem = location_problem(row, allowed_buckets)
    if problem is None:
        problem = target_dir_problem(row.get("target_dir"))
    if problem is None:
        count, size = row.get("instanceCount"), row.get("series_bytes")
        if not isinstance(count, int) or count <= 0 or not isinstance(size, int) or size < count:
            problem = (
                f"the index gives instanceCount {count!r} and series_size_MB x 10^6 = {size!r} bytes, which are "
                "not a count of files and their size (every file holds at least one byte)"
            )
    return f"series {uid!r}: {problem}" if problem else None


def object_name_problem(name: object) -> str | None:
    """A name a server listed below a series prefix, before it becomes a file name."""
    if not isinstance(name, str) or not _OBJECT.fullmatch(name) or name in (".", ".."):
        return f"object name {name!r} is not a plain file name"
    return None


def object_names_ok(names: object) -> bool:
    """``object_name_problem`` is ``None`` for every name of ``names`` (a list), in one regex match."""
    if not isinstance(names, list) or not all(type(n) is str for n in names):
        return False
    joined = "/".join(names)  # a "/" inside a name shows as one separator too many
    return not names or (joined.count("/") == len(names) - 1 and bool(_OBJECTS.fullmatch(joined)))


def is_uuid(value: object) -> bool:
    return isinstance(value, str) and bool(_UUID.fullmatch(value))


def endpoint_problem(url: object) -> str | None:
    """An S3 endpoint URL: http(s), a host, a valid port, no path, no whitespace or control character."""
    from urllib.parse import urlsplit

    from dataset_assets.core.fmt import redact_url

    if not isinstance(url, str) or not url or CONTROL.search(url) or any(c.isspace() for c in url):
        return f"endpoint {url!r} is empty or contains whitespace or control characters"
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"endpoint {shown!r} is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"endpoint {shown!r} is not an http(s) URL with a host, e.g. https://s3.amazonaws.com"
    if port is not None and not 0 < port < 65536:
        return f"endpoint {shown!r} has an invalid port"
    if "@" in parts.netloc:
        return f"endpoint {shown!r} holds credentials (user:password@); s5cmd runs with --no-sign-request, give none"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"endpoint {shown!r} has a path or query; s5cmd takes a bare endpoint such as https://s3.amazonaws.com"
    return None
