"""Manifest files a person brings: the IDC portal's or BigQuery's s5cmd manifests, and CSV or
plain-text lists of IDs; each line becomes ``resolve.Entry`` values to look up in the index.

* s5cmd lines: ``cp s3://<bucket>/<crdc_series_uuid>/* <dest>`` (also quoted, ``gs://``, ``sync``,
  with flags); AWS or GCS bucket names (``idc-open-idc1`` is ``idc-open-data-two``,
  ``idc-open-cr`` is ``idc-open-data-cr``). Only the ``crdc_series_uuid`` is used: the index says
  where the series is; the line's destination is ignored (the layout decides).
* CSV: a first line with a known column (``SOPInstanceUID``, ``crdc_series_uuid``,
  ``SeriesInstanceUID``, ``StudyInstanceUID``, ``PatientID``, ``collection_id``, or a
  ``series_aws_url``/``gcs_url`` of ``s3://``/``gs://`` prefixes): the most specific one is read.
* Anything else: IDs separated by commas or white space, any mix of kinds.

Blank lines and ``#`` comments are skipped. A line that cannot be read becomes an ``Entry`` with
a ``problem`` (naming its line number), so all bad lines are reported together.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from dataset_assets.core.errors import FilterError
from dataset_assets.core.fs import read_small
from dataset_assets.core.safety import is_uuid
from dataset_assets.core.select.resolve import INSTANCE, Entry
from dataset_assets.core.transfer.s5cmd import GCS_BUCKETS

#: Bucket names of the GCS mirror -> AWS names (the index's ``aws_bucket``).
GCS_TO_AWS = {gcs: aws for aws, gcs in GCS_BUCKETS.items()}  # the mirror's names, back to AWS'
#: CSV columns, most specific first, and the kind they hold.
CSV_COLUMNS = {
    "sopinstanceuid": INSTANCE,
    "crdc_series_uuid": "crdc_series_uuid",
    "series_aws_url": "url",
    "gcs_url": "url",
    "seriesinstanceuid": "series",
    "studyinstanceuid": "study",
    "patientid": "patient",
    "analysis_result_id": "analysis_result",
    "collection_id": "collection",
}
MAX_FILE_BYTES = 200 * 1024 * 1024
_URL = re.compile(r"['\"]?(s3|gs)://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/([^/\s'\"]+)/\*?['\"]?")
_S5CMD_VERBS = ("cp", "sync")


def _from_url(text: str, origin: str) -> Entry:
    match = _URL.fullmatch(text.strip())
    if not match:
        return Entry(
            text, origin=origin, problem="not an s3:// or gs:// series prefix s3://<bucket>/<crdc_series_uuid>/*"
        )
    _scheme, _bucket, uuid = match.groups()
    if not is_uuid(uuid):
        return Entry(uuid, origin=origin, problem=f"{uuid!r} in the URL is not a crdc_series_uuid")
    return Entry(uuid, "crdc_series_uuid", origin)


def _s5cmd_line(line: str, origin: str) -> Entry:
    words = line.split()
    args = [w for w in words[1:] if not w.startswith("-")]
    if not args:
        return Entry(line, origin=origin, problem="an s5cmd line without a source URL")
    return _from_url(args[0], origin)


def bucket_of(line: str) -> str | None:
    """The AWS name of the bucket an s5cmd line or URL names (for messages), or None."""
    for word in line.split():
        match = _URL.fullmatch(word)
        if match:
            return GCS_TO_AWS.get(match.group(2), match.group(2))
    return None


def read_entries(path: Path, kind: str = "auto") -> list[Entry]:
    """The entries of a manifest file; ``kind`` applies to bare IDs (not s5cmd lines, URLs or CSV columns)."""
    try:
        text = read_small(path, MAX_FILE_BYTES, follow_links=True).decode("utf-8-sig")
    except OSError as exc:
        raise FilterError(f"manifest file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise FilterError(f"manifest file {path} is not UTF-8 text") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise FilterError(f"manifest file {path} lists nothing (only blank lines and # comments)")
    first = [c.strip().lower() for c in next(csv.reader([lines[0][1]]))]
    column = next((c for c in CSV_COLUMNS if c in first), None)
    if column is not None:
        return _csv_entries(lines, first.index(column), CSV_COLUMNS[column])
    entries: list[Entry] = []
    forced = None if kind == "auto" else kind
    for n, line in lines:
        origin = f"line {n}"
        word = line.split(None, 1)[0]
        if word in _S5CMD_VERBS:
            entries.append(_s5cmd_line(line, origin))
        elif line.startswith(("s3://", "gs://", "'s3://", '"s3://', "'gs://", '"gs://')):
            entries.append(_from_url(line, origin))
        else:
            for value in re.split(r"[,\s]+", line):
                if not value:
                    continue
                if _bad_id(value):
                    entries.append(
                        Entry(value, origin=origin, problem="not an ID (quotes, control characters or a command?)")
                    )
                else:
                    entries.append(Entry(value, forced, origin))
    return entries


def _bad_id(value: str) -> bool:
    return any(ord(c) < 32 or c in "'\"*;|&<>$`\\" for c in value) or len(value) > 200


def _csv_entries(lines: list[tuple[int, str]], index: int, kind: str) -> list[Entry]:
    entries = []
    reader = csv.reader(io.StringIO("\n".join(line for _, line in lines[1:])))
    for (n, _), cells in zip(lines[1:], reader, strict=False):
        origin = f"line {n}"
        value = cells[index].strip() if index < len(cells) else ""
        if not value:
            entries.append(Entry("", origin=origin, problem="the column is empty"))
        elif kind == "url":
            entries.append(_from_url(value, origin))
        elif _bad_id(value):
            entries.append(Entry(value, origin=origin, problem="not an ID"))
        else:
            entries.append(Entry(value, kind, origin))
    return entries
