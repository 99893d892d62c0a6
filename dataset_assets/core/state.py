"""What downloads into a root have verified: per collection, which series each directory holds
and the size of every one of its files.

The state is a cache of what is on disk, never an authority: an entry only says which object
names and sizes a series directory should hold; the disk is checked against it on every run.
A state file that cannot be read (empty, truncated, garbage, a directory, another schema) is
set aside with one line in the log and rebuilt from the disk, the manifest and one listing per
series. Entries whose values could not have come from a download (a uuid that is not a UUID,
a directory that leaves the root, sizes that are not sizes) are dropped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import arrow_build
from .fs import new_file
from .safety import is_uuid, object_name_problem, target_dir_problem

Log = Callable[[str], None]

SCHEMA = pa.schema(
    [
        ("target_dir", pa.string()),
        ("SeriesInstanceUID", pa.string()),
        ("crdc_series_uuid", pa.string()),
        ("series_revised_idc_version", pa.int64()),
        ("file_names", pa.list_(pa.string())),
        ("file_sizes", pa.list_(pa.int64())),
    ]
)


@dataclass(frozen=True)
class SeriesRecord:
    """A series verified complete: its UIDs, and every object name with its size in bytes."""

    series_uid: str
    crdc_series_uuid: str
    files: dict[str, int] | None = None  # None: written by a version that did not record files
    revised_version: int | None = None


def _set_aside(path: Path, why: str, log: Log) -> None:
    aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    try:
        os.replace(path, aside)
        log(f"state file {path} {why}; set aside as {aside.name}, rebuilding it from the disk")
    except OSError as exc:
        log(f"state file {path} {why} and could not be set aside ({exc.strerror or exc}); ignoring it")


def load_state(path: Path | None, log: Log = print, *, repair: bool = True) -> dict[str, SeriesRecord]:
    """``target_dir -> SeriesRecord`` of the series verified complete before. Never raises for
    a bad file: it is set aside (logged) and an empty state returned (``repair=False``: only
    logged, for readers such as checks that must not change anything)."""
    if path is None or not os.path.lexists(path):
        return {}

    def bad(why: str) -> dict[str, SeriesRecord]:
        if repair:
            _set_aside(path, why, log)
        else:
            log(f"state file {path} {why}; ignored")
        return {}

    if path.is_symlink() or not path.is_file():
        return bad("is not a regular file")
    try:
        table = arrow_build.read_parquet(path)
    except (OSError, pa.ArrowException, ValueError) as exc:
        return bad(f"cannot be read ({exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0][:120]})")
    names = set(table.column_names)
    if not {"target_dir", "SeriesInstanceUID", "crdc_series_uuid"} <= names:
        return bad("does not have the columns of a state file")
    columns = [c for c in SCHEMA.names if c in names]
    records: dict[str, SeriesRecord] = {}
    dropped = 0
    for batch in table.select(columns).to_batches(50_000):
        for row in batch.to_pylist():
            record = _record(row)
            if record is None:
                dropped += 1
            else:
                records[row["target_dir"]] = record
    if dropped:
        log(
            f"state file {path}: ignored {dropped} entr{'y' if dropped == 1 else 'ies'} with unsafe or malformed values"
        )
    return records


def _record(row: dict) -> SeriesRecord | None:
    target_dir, uuid = row.get("target_dir"), row.get("crdc_series_uuid")
    if target_dir_problem(target_dir) or not is_uuid(uuid):
        return None
    files = None
    names, sizes = row.get("file_names"), row.get("file_sizes")
    if names is not None or sizes is not None:
        if (
            names is None
            or sizes is None
            or len(names) != len(sizes)
            or any(object_name_problem(n) for n in names)
            or any(not isinstance(s, int) or s < 0 for s in sizes)
        ):
            return None
        files = dict(zip(names, sizes, strict=False))
    revised = row.get("series_revised_idc_version")
    return SeriesRecord(
        str(row.get("SeriesInstanceUID") or ""), uuid, files, revised if isinstance(revised, int) else None
    )


def save_state(path: Path, records: dict[str, SeriesRecord]) -> None:
    """Write ``records`` atomically (a temporary file in the same folder, then a rename)."""
    rows = {name: [] for name in SCHEMA.names}
    for target_dir, rec in records.items():
        rows["target_dir"].append(target_dir)
        rows["SeriesInstanceUID"].append(rec.series_uid)
        rows["crdc_series_uuid"].append(rec.crdc_series_uuid)
        rows["series_revised_idc_version"].append(rec.revised_version)
        rows["file_names"].append(list(rec.files) if rec.files is not None else None)
        rows["file_sizes"].append(list(rec.files.values()) if rec.files is not None else None)
    table = arrow_build.table(rows, SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    with new_file(path) as handle:
        pq.write_table(table, handle)


def remove_stale_temporaries(path: Path) -> list[str]:
    """Remove temporary state files of ``path`` that a killed writer left (call it holding the
    collection's lock: no one else writes this state then)."""
    removed = []
    for pattern in (f".{path.name}.*.tmp", f"{path.name}.*.tmp"):
        for tmp in path.parent.glob(pattern):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                removed.append(tmp.name)
    return removed
