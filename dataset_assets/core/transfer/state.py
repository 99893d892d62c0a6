"""What downloads into a root have verified: per collection, which series each directory holds
and a digest of every one of its files with its size.

The state is a cache of what is on disk, never an authority: an entry only says which files a
series directory held when it was verified (their count, bytes, and the SHA-256 of the sorted
``name<TAB>size`` lines); the disk is checked against it on every run, file by file through the
digest. Memory and disk per series do not depend on its number of files (``nlst``: 21.5 M files
in 592,600 series).

Two files hold it: a Parquet snapshot (``<name>.parquet``) and beside it a journal
(``<name>.parquet.journal``, one JSON line per series verified or forgotten since the snapshot).
A download appends to the journal as each series verifies (written to the operating system at
once, ``fsync`` at least every ``JOURNAL_SYNC_S``), so a run killed at any moment keeps what it
verified; the snapshot is rewritten (and the journal emptied) only when the journal has grown
past a share of it, never while the transfer runs. A snapshot or journal that cannot be read
(empty, truncated, garbage, a directory, another schema) is set aside with one line in the log
and rebuilt from the disk, the manifest and one listing per series; a journal's torn last line
(a kill mid-write) is skipped. Entries whose values could not have come from a download (a uuid
that is not a UUID, a directory that leaves the root, sizes that are not sizes) are dropped.
An older state that recorded every file name and size is read and kept as digests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dataset_assets.core import arrow_build
from dataset_assets.core.fs import new_file
from dataset_assets.core.safety import CONTROL, is_uuid, object_names_ok, target_dir_problem

Log = Callable[[str], None]

SCHEMA = pa.schema(
    [
        ("target_dir", pa.string()),
        ("SeriesInstanceUID", pa.string()),
        ("crdc_series_uuid", pa.string()),
        ("series_revised_idc_version", pa.int64()),
        ("file_count", pa.int64()),
        ("file_bytes", pa.int64()),
        ("files_digest", pa.string()),
        ("file_names", pa.list_(pa.string())),
        ("file_sizes", pa.list_(pa.int64())),
    ]
)
#: What a download loads to decide what is complete: one small entry per series, no file names.
SLIM = [n for n in SCHEMA.names if n not in ("file_names", "file_sizes")]
JOURNAL_SYNC_S = 30.0  # the journal reaches the disk (fsync) at least this often while series verify
_DIGEST_CHARS = 64


def files_digest(files: dict[str, int]) -> str:
    """SHA-256 of the sorted ``name<TAB>size`` lines: equal digests mean the same names and sizes."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\t{files[name]}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class SeriesRecord:
    """A series verified complete: its UIDs, and its files' count, bytes and digest.

    Built with ``files`` (name -> size) the digest, count and bytes are computed from them.
    The state on disk keeps every name and size (for messages naming the file that differs);
    what a download holds in memory is the slim form (``slim()``: no names), so memory grows
    per series, not per file."""

    series_uid: str
    crdc_series_uuid: str
    files: dict[str, int] | None = None
    revised_version: int | None = None
    digest: str | None = None  # None: written by a version that recorded no sizes
    count: int | None = None
    bytes: int | None = None

    def __post_init__(self) -> None:
        if self.files is not None and self.digest is None:
            object.__setattr__(self, "digest", files_digest(self.files))
            object.__setattr__(self, "count", len(self.files))
            object.__setattr__(self, "bytes", sum(self.files.values()))

    def slim(self) -> SeriesRecord:
        return replace(self, files=None) if self.files is not None else self

    def holds(self, files: dict[str, int]) -> bool:
        """Whether ``files`` (name -> size, e.g. a directory's) are exactly the ones recorded."""
        return (
            self.digest is not None
            and len(files) == self.count
            and sum(files.values()) == self.bytes
            and files_digest(files) == self.digest
        )


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def _set_aside(path: Path, why: str, log: Log) -> None:
    aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    try:
        os.replace(path, aside)
        log(f"state file {path} {why}; set aside as {aside.name}, rebuilding it from the disk")
    except OSError as exc:
        log(f"state file {path} {why} and could not be set aside ({exc.strerror or exc}); ignoring it")


def load_state(
    path: Path | None, log: Log = print, *, repair: bool = True, files: bool = False
) -> dict[str, SeriesRecord]:
    """``target_dir -> SeriesRecord`` of the series verified complete before: the snapshot, then
    the journal on top; slim records (no file names) unless ``files``. Never raises for a bad
    file: it is set aside (logged) and what remains read (``repair=False``: only logged, for
    readers such as checks that must not change anything)."""
    if path is None:
        return {}
    records = _load_snapshot(path, log, repair, files)
    _replay_journal(journal_path(path), records, log, repair, files)
    return records


SHARD_MARK = ".shard-"


def shard_state_path(path: Path, index: int, count: int) -> Path:
    """The state of shard ``index`` of ``count`` of the state at ``path`` (beside it, its own file
    and lock: shards of one collection run in parallel, each recording what it verified)."""
    return path.with_name(f"{path.stem}{SHARD_MARK}{index:02d}-of-{count:02d}{path.suffix}")


def shard_states(path: Path) -> list[Path]:
    """The shard states recorded beside the state at ``path`` (snapshots, or journals alone)."""
    if SHARD_MARK in path.stem or not path.parent.is_dir():
        return []
    found = set(path.parent.glob(f"{path.stem}{SHARD_MARK}*{path.suffix}"))
    found |= {j.with_name(j.name[: -len(".journal")]) for j in path.parent.glob(f"{path.stem}{SHARD_MARK}*.journal")}
    return sorted(p for p in found if not p.name.startswith("."))


def load_shard_records(path: Path | None, log: Log = print) -> dict[str, SeriesRecord]:
    """What the shards of the state at ``path`` verified (slim records; read-only: a bad shard state
    is only logged, and its shard fixes it when it runs)."""
    records: dict[str, SeriesRecord] = {}
    for shard in shard_states(path) if path is not None else []:
        records.update(load_state(shard, log, repair=False))
    return records


def recorded_files(path: Path | None, target_dirs: Iterable[str]) -> dict[str, dict[str, int]]:
    """The recorded names and sizes of the series in ``target_dirs`` (those recorded with them),
    read from the state on disk batch by batch: for the few series whose files differ."""
    wanted = set(target_dirs)
    if path is None or not wanted:
        return {}
    found: dict[str, dict[str, int]] = {}
    for source in [*shard_states(path), path]:  # the collection's own state last: it wins
        for target_dir, record in _stream(source, lambda _m: None, wanted, files=True):
            if record is None:
                found.pop(target_dir, None)
            elif record.files is not None:
                found[target_dir] = record.files
    return found


def _stream(path: Path, log: Log, wanted: set[str] | None, files: bool) -> Iterator[tuple[str, SeriesRecord | None]]:
    """``(target_dir, record or None for forgotten)`` from the snapshot, then the journal, in order."""
    records = _load_snapshot(path, log, False, files, wanted)
    yield from records.items()
    journal: dict[str, SeriesRecord] = {}
    _replay_journal(journal_path(path), journal, log, False, files, wanted, forgotten := set())
    for target_dir in forgotten:
        yield target_dir, None
    yield from journal.items()


def _load_snapshot(
    path: Path, log: Log, repair: bool, files: bool = False, wanted: set[str] | None = None
) -> dict[str, SeriesRecord]:
    if not os.path.lexists(path):
        return {}

    def bad(why: str) -> dict[str, SeriesRecord]:
        if repair:
            _set_aside(path, why, log)
        else:
            log(f"state file {path} {why}; ignored")
        return {}

    if path.is_symlink() or not path.is_file():
        return bad("is not a regular file")
    records: dict[str, SeriesRecord] = {}
    dropped = 0
    try:
        batches = arrow_build.iter_parquet(path, None, 2_000)
        names = set(next(batches))
        if not {"target_dir", "SeriesInstanceUID", "crdc_series_uuid"} <= names:
            batches.close()
            return bad("does not have the columns of a state file")
        batches.close()
        # an older state has only names: they make the digest; else the names are not even read
        slim = not files and "files_digest" in names
        columns = [c for c in (SLIM if slim else SCHEMA.names) if c in names]
        batches = arrow_build.iter_parquet(path, columns, 2_000)
        next(batches)
        for batch in batches:
            if wanted is not None:
                import pyarrow.compute as pc

                batch = batch.filter(pc.is_in(batch.column("target_dir"), arrow_build.strings(sorted(wanted))))
            for row in batch.to_pylist():
                record = _record(row)
                if record is None:
                    dropped += 1
                else:
                    records[row["target_dir"]] = record if files else record.slim()
    except (OSError, pa.ArrowException, ValueError, StopIteration) as exc:
        return bad(f"cannot be read ({exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0][:120]})")
    if dropped:
        log(
            f"state file {path}: ignored {dropped} entr{'y' if dropped == 1 else 'ies'} with unsafe or malformed values"
        )
    return records


def _replay_journal(
    journal: Path,
    records: dict[str, SeriesRecord],
    log: Log,
    repair: bool,
    files: bool = False,
    wanted: set[str] | None = None,
    forgotten: set[str] | None = None,
) -> None:
    if not os.path.lexists(journal):
        return
    if journal.is_symlink() or not journal.is_file():
        if repair:
            _set_aside(journal, "is not a regular file", log)
        else:
            log(f"state journal {journal} is not a regular file; ignored")
        return
    dropped = 0
    try:
        fd = os.open(journal, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as handle:
            for entry in _entries(handle):
                if entry is None:  # a torn last line (killed mid-write), garbage, hostile values
                    dropped += 1
                    continue
                if wanted is not None and entry["target_dir"] not in wanted:
                    continue
                if entry.get("forget"):
                    records.pop(entry["target_dir"], None)
                    if forgotten is not None:
                        forgotten.add(entry["target_dir"])
                    continue
                record = _record(entry)
                if record is None:
                    dropped += 1
                else:
                    records[entry["target_dir"]] = record if files else record.slim()
                    if forgotten is not None:
                        forgotten.discard(entry["target_dir"])
    except OSError as exc:
        log(f"state journal {journal} cannot be read ({exc.strerror or exc}); the disk is checked again")
        return
    if dropped:
        log(f"state journal {journal}: ignored {dropped} line(s) that are torn or malformed")


MAX_LINE_BYTES = 64 * 1024 * 1024  # a journal line (one series' names and sizes) is never longer
_INT64 = 2**63 - 1


def _entries(handle) -> Iterator[dict | None]:
    """The journal's entries, one per line: ``None`` for a line that is not one (torn, garbage,
    nested too deep, not text, a ``target_dir`` that is not a safe relative directory)."""
    while raw := handle.readline(MAX_LINE_BYTES + 1):
        if len(raw) > MAX_LINE_BYTES:
            while raw and not raw.endswith(b"\n"):  # skip the rest of an absurd line
                raw = handle.readline(MAX_LINE_BYTES)
            yield None
            continue
        try:
            entry = json.loads(raw)
        except (ValueError, RecursionError):
            yield None
            continue
        target_dir = entry.get("target_dir") if isinstance(entry, dict) else None
        if not isinstance(target_dir, str) or target_dir_problem(target_dir):
            yield None
            continue
        yield entry


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _INT64


def _record(row: dict) -> SeriesRecord | None:
    target_dir, uuid = row.get("target_dir"), row.get("crdc_series_uuid")
    if target_dir_problem(target_dir) or not is_uuid(uuid):
        return None
    revised = row.get("series_revised_idc_version")
    revised = revised if _int(revised) else None
    uid = row.get("SeriesInstanceUID") or ""
    if not isinstance(uid, str) or len(uid) > 200 or CONTROL.search(uid):
        return None
    names, sizes = row.get("file_names"), row.get("file_sizes")
    digest, count, size = row.get("files_digest"), row.get("file_count"), row.get("file_bytes")
    if names is not None or sizes is not None:  # every name and size (an older state has only these)
        if (
            names is None
            or sizes is None
            or len(names) != len(sizes)
            or not object_names_ok(names)
            or not all(_int(s) for s in sizes)
        ):
            return None
        record = SeriesRecord(uid, uuid, dict(zip(names, sizes, strict=False)), revised)
        if digest is not None and digest != record.digest:  # the two halves of one entry disagree
            return None
        return record
    if digest is None and count is None and size is None:
        return SeriesRecord(uid, uuid, None, revised)
    if (
        not isinstance(digest, str)
        or len(digest) != _DIGEST_CHARS
        or any(c not in "0123456789abcdef" for c in digest)
        or not _int(count)
        or not _int(size)
    ):
        return None
    return SeriesRecord(uid, uuid, None, revised, digest, count, size)


def _entry(target_dir: str, rec: SeriesRecord) -> dict:
    names = sorted(rec.files) if rec.files is not None else None
    return {
        "target_dir": target_dir,
        "SeriesInstanceUID": rec.series_uid,
        "crdc_series_uuid": rec.crdc_series_uuid,
        "series_revised_idc_version": rec.revised_version,
        "file_count": rec.count,
        "file_bytes": rec.bytes,
        "files_digest": rec.digest,
        "file_names": names,
        "file_sizes": [rec.files[n] for n in names] if names is not None and rec.files is not None else None,
    }


COMPACT_BATCH_FILES = 5000


def compact_state(path: Path, log: Log = print) -> None:
    """Fold the journal into a new snapshot, streaming: the snapshot's rows the journal does
    not touch, then the journal's last entry per series; memory holds one batch and one small
    entry per series the journal names, never a file name list of the whole state."""
    journal = journal_path(path)
    if not journal.is_file() or journal.is_symlink():
        return
    last: dict[str, int] = {}  # target_dir -> line number of its last entry in the journal
    entries: list[tuple[str, SeriesRecord]] = []
    files = 0  # names held in ``entries``: written out every COMPACT_BATCH_FILES
    with open(journal, "rb") as handle:
        for number, entry in enumerate(_entries(handle)):
            if entry is not None:
                last[entry["target_dir"]] = number
    touched = arrow_build.strings(sorted(last))  # not pa.array: that imports pandas (1 s, 40 MB)
    path.parent.mkdir(parents=True, exist_ok=True)
    with new_file(path) as out:
        writer = pq.ParquetWriter(out, SCHEMA)
        try:
            if path.is_file() and not path.is_symlink():
                import pyarrow.compute as pc

                try:
                    batches = arrow_build.iter_parquet(path, SCHEMA.names, 1_000)
                    if set(SLIM[:3]) <= set(next(batches)):
                        for batch in batches:  # a batch of series, whatever their number of files
                            kept = batch.filter(pc.invert(pc.is_in(batch.column("target_dir"), touched)))
                            for row in kept.to_pylist():
                                if (record := _record(row)) is not None:
                                    entries.append((row["target_dir"], record))
                                    files += record.count or 0
                            if files >= COMPACT_BATCH_FILES:
                                _write(writer, dict(entries))
                                entries, files = [], 0
                except (OSError, pa.ArrowException, ValueError, StopIteration):
                    pass  # an unreadable snapshot: what the journal holds is kept
            restore: list[str] = []  # series whose last entry is malformed: the snapshot's record stands
            with open(journal, "rb") as handle:
                for number, entry in enumerate(_entries(handle)):
                    if entry is None or last.get(entry["target_dir"]) != number or entry.get("forget"):
                        continue
                    if (record := _record(entry)) is not None:
                        entries.append((entry["target_dir"], record))
                        files += record.count or 0
                    else:
                        restore.append(entry["target_dir"])
                    if files >= COMPACT_BATCH_FILES or len(entries) >= 10_000:
                        _write(writer, dict(entries))
                        entries, files = [], 0
            if restore and path.is_file() and not path.is_symlink():  # rare: read the snapshot once more
                import pyarrow.compute as pc

                wanted = arrow_build.strings(sorted(restore))
                with contextlib.suppress(OSError, pa.ArrowException, ValueError, StopIteration):
                    batches = arrow_build.iter_parquet(path, SCHEMA.names, 1_000)
                    next(batches)
                    for batch in batches:
                        for row in batch.filter(pc.is_in(batch.column("target_dir"), wanted)).to_pylist():
                            if (record := _record(row)) is not None:
                                entries.append((row["target_dir"], record))
            _write(writer, dict(entries))
        finally:
            writer.close()
    journal.unlink(missing_ok=True)


def _write(writer: pq.ParquetWriter, records: dict[str, SeriesRecord]) -> None:
    if not records:
        return
    rows = {name: [] for name in SCHEMA.names}
    for target_dir, rec in records.items():
        for key, value in _entry(target_dir, rec).items():
            rows[key].append(value)
    writer.write_table(arrow_build.table(rows, SCHEMA))


def save_state(path: Path, records: dict[str, SeriesRecord]) -> None:
    """Write ``records`` as the snapshot, whole and atomically (a new file renamed into place),
    and empty the journal, which the snapshot now holds. A slim record keeps its digest but no
    names."""
    rows = {name: [] for name in SCHEMA.names}
    for target_dir, rec in records.items():
        for key, value in _entry(target_dir, rec).items():
            rows[key].append(value)
    table = arrow_build.table(rows, SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    with new_file(path) as handle:
        pq.write_table(table, handle)
    journal = journal_path(path)
    if journal.is_file() and not journal.is_symlink():
        journal.unlink(missing_ok=True)


class Journal:
    """Appends to a state's journal as series verify: one JSON line each, handed to the operating
    system at once (a kill loses nothing written), ``fsync`` at least every ``sync_s`` seconds.
    The file is opened without following a link, and created exclusively when new."""

    def __init__(self, path: Path, sync_s: float = JOURNAL_SYNC_S) -> None:
        self.path, self.sync_s = journal_path(path), sync_s
        self.lines = 0
        self._fd: int | None = None
        self._synced = time.monotonic()

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                self._fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._fd = os.open(self.path, flags | os.O_NONBLOCK)
                st = os.fstat(self._fd)
                if not stat.S_ISREG(st.st_mode):
                    os.close(self._fd)
                    self._fd = None
                    raise OSError(f"{self.path} is not a regular file") from None
                if st.st_size and not _ends_with_newline(self._fd, st.st_size):
                    os.write(self._fd, b"\n")  # a torn line from a killed run stays a line of its own
        return self._fd

    def record(self, target_dir: str, rec: SeriesRecord) -> None:
        self._write(_entry(target_dir, rec))

    def forget(self, target_dirs: Iterable[str]) -> None:
        for target_dir in target_dirs:
            self._write({"target_dir": target_dir, "forget": True})

    def _write(self, entry: dict) -> None:
        fd = self._open()
        data = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        while data:  # one entry per write: O_APPEND keeps lines whole
            data = data[os.write(fd, data) :]
        self.lines += 1
        self._dirty = True
        self.sync_if_due()

    def sync_if_due(self) -> None:
        """``fsync`` what was written, when the last one is ``sync_s`` old (the download calls
        this twice a second, so nothing written waits longer than that for the disk)."""
        if getattr(self, "_dirty", False) and time.monotonic() - self._synced >= self.sync_s:
            self.sync()

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
        self._synced, self._dirty = time.monotonic(), False

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None


def _ends_with_newline(fd: int, size: int) -> bool:
    return os.pread(fd, 1, size - 1) == b"\n"


def journal_lines(path: Path) -> int:
    """Lines in the journal of the state at ``path`` (0 when there is none)."""
    journal = journal_path(path)
    try:
        with open(journal, "rb") as handle:
            return sum(1 for _ in handle)
    except OSError:
        return 0


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
