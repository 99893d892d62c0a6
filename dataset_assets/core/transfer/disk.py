"""What a series directory holds, compared with what it should hold: the ``*.dcm`` files and their
sizes (``scan_series``), against a listing or a record (``compare``, ``describe``), for every row of
a manifest (``series_status``). Nothing here writes; nothing here knows s5cmd or DICOM."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from dataset_assets.core.transfer.state import SeriesRecord, load_shard_records, recorded_files

#: What s5cmd leaves when killed: the object's name followed by digits.
TEMP_SUFFIX = re.compile(r"(.+\.dcm)\d+")
DETAILED_SERIES = 20  # series whose differing files are named (the rest: counts); each reads the state once


@dataclass(frozen=True)
class SeriesOnDisk:
    """The ``*.dcm`` regular files of one series directory with their sizes, and the names that
    look like s5cmd's temporary files."""

    files: dict[str, int]
    temp_files: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


EMPTY_SERIES = SeriesOnDisk({})


class AbsentFolders:
    """Which folders below a root do not exist, learned one folder at a time: a series directory
    below a missing folder is empty without a system call (a dry run of ``nlst`` into a new
    folder asks the file system once, not 592,600 times)."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.known: dict[str, bool] = {}

    def __call__(self, target_dir: str) -> bool:
        parts = target_dir.strip("/").split("/")
        prefix = ""
        for part in parts[:-1]:
            prefix = f"{prefix}{part}/"
            there = self.known.get(prefix)
            if there is None:
                there = self.known[prefix] = os.path.isdir(os.path.join(self.root, prefix))
                if len(self.known) > 100_000:  # bounded: forget, and learn again
                    self.known = {prefix: there}
            if not there:
                return True
        return False


def scan_series(directory: Path | str) -> SeriesOnDisk:
    """The ``*.dcm`` regular files in one series directory (no recursion, links not followed)."""
    files: dict[str, int] = {}
    temps: list[str] = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if entry.name.endswith(".dcm"):
                    files[entry.name] = entry.stat(follow_symlinks=False).st_size
                elif TEMP_SUFFIX.fullmatch(entry.name):
                    temps.append(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return SeriesOnDisk(files, tuple(temps))


def compare(expected: dict[str, int], disk: SeriesOnDisk) -> tuple[list[str], list[str]]:
    """(object names missing or of the wrong size on disk, ``.dcm`` files that are not objects of the series)."""
    wrong = [name for name, size in expected.items() if disk.files.get(name) != size]
    foreign = [name for name in disk.files if name not in expected]
    return wrong, foreign


def record_fits(record: SeriesRecord, row: dict) -> bool:
    """A record of this very series (same ``crdc_series_uuid``) with its ``instanceCount`` files and bytes."""
    return (
        record.crdc_series_uuid == row.get("crdc_series_uuid")
        and record.digest is not None
        and record.count == row.get("instanceCount")
        and record.bytes == row.get("series_bytes")
    )


def best_record(row: dict, *sources: dict[str, SeriesRecord]) -> SeriesRecord | None:
    """The first record of this series (the collection's state, then its shards') that fits the row."""
    for source in sources:
        record = source.get(row.get("target_dir"))
        if record is not None and record_fits(record, row):
            return record
    return None


def files_fit(files: dict[str, int] | None, row: dict) -> bool:
    """A record that accounts for exactly the series' ``instanceCount`` files and bytes."""
    return files is not None and len(files) == row["instanceCount"] and sum(files.values()) == row["series_bytes"]


#: The columns a download reads of a manifest row: a batch of rows holds only these (the 16
#: columns of a whole row are 2.5 kB of Python objects: 5 MB for the 2,000 series of a batch).
ENGINE_COLUMNS = (
    "collection_id",
    "SeriesInstanceUID",
    "crdc_series_uuid",
    "aws_bucket",
    "series_aws_url",
    "instanceCount",
    "series_bytes",
    "series_revised_idc_version",
    "target_dir",
)


def manifest_rows(manifest: pa.Table, columns: Iterable[str] | None = None) -> Iterator[dict]:
    """The rows of ``manifest`` as dicts, a thousand at a time (memory: one batch of rows at most);
    with ``columns``, only those of them the manifest has."""
    if columns is not None:
        manifest = manifest.select([c for c in columns if c in manifest.column_names])
    for batch in manifest.to_batches(1_000):
        yield from batch.to_pylist()


def describe(row: dict, disk: SeriesOnDisk, expected: dict[str, int] | None) -> str | None:
    """Why a series is not complete on disk (``None`` when it is): per file against ``expected``
    when known, else against the index's counts (``instanceCount`` files, ``series_bytes``)."""
    where = f"series {row['SeriesInstanceUID']} in {row['target_dir']}"
    if expected is None:
        if disk.count == row["instanceCount"] and disk.bytes == row["series_bytes"]:
            return None
        return f"{where}: {disk.count}/{row['instanceCount']} files, {disk.bytes:,}/{row['series_bytes']:,} bytes"
    wrong, foreign = compare(expected, disk)
    if not wrong and not foreign:
        return None
    parts = []
    absent = [n for n in wrong if n not in disk.files]
    sized = [n for n in wrong if n in disk.files]
    if absent:
        parts.append(f"{len(absent)} of {len(expected)} file(s) missing (e.g. {absent[0]})")
    if sized:
        n = sized[0]
        parts.append(
            f"{len(sized)} file(s) of the wrong size (e.g. {n}: {disk.files[n]:,} bytes, expected {expected[n]:,})"
        )
    if foreign:
        parts.append(
            f"{len(foreign)} .dcm file(s) that are not objects of this series (e.g. {foreign[0]}): move them out"
        )
    return f"{where}: " + "; ".join(parts)


def series_status(
    manifest: pa.Table,
    root: Path,
    records: dict[str, SeriesRecord] | None = None,
    *,
    strict: bool = False,
    state_path: Path | None = None,
) -> Iterator[tuple[dict, SeriesOnDisk, str | None]]:
    """Each manifest row, what its directory holds, and why it is not complete (``None``: complete).

    With ``records`` (the state), a series is checked file by file against its record (its
    digest; a series that differs is described file by file from the names in ``state_path``); a
    series without a record is checked by its counts, or, when ``strict``, reported as unverified."""
    records = records or {}
    shards = load_shard_records(state_path, lambda _m: None) if state_path is not None else {}
    absent = AbsentFolders(root)
    detailed = 0  # series described file by file: each reads the names from the state on disk
    for row in manifest_rows(manifest):
        target_dir = row["target_dir"]
        disk = EMPTY_SERIES if absent(target_dir) else scan_series(os.path.join(root, target_dir))
        record = best_record(row, records, shards)
        if record is not None:
            problem = None
            if not record.holds(disk.files):
                detailed += 1
                names = (
                    recorded_files(state_path, [row["target_dir"]]).get(row["target_dir"])
                    if detailed <= DETAILED_SERIES
                    else None
                )
                problem = (
                    describe(row, disk, names)
                    if names is not None and record.holds(names)
                    else (
                        f"series {row['SeriesInstanceUID']} in {row['target_dir']}: its files are not the ones "
                        f"verified ({disk.count}/{record.count} files, {disk.bytes:,}/{record.bytes:,} bytes; a file "
                        "is missing, of another size, or not of this series)"
                    )
                )
        else:
            problem = describe(row, disk, None)
            if problem is None and strict:
                problem = (
                    f"series {row['SeriesInstanceUID']} in {row['target_dir']}: no per-file sizes recorded "
                    "(materialize downloaded_collection, or run the download again, to record them)"
                )
        yield row, disk, problem
