"""Downloading a manifest with s5cmd, resumably, and proving the disk matches it file by file.

A download runs four named steps (``Download.scan``, ``.list``, ``.transfer``, ``.verify``):

1. Scan: every row is checked (``safety.series_problem``: allow-listed bucket, UUID, URL,
   directory inside the root) and its directory compared with what the state recorded for it:
   every object name with its size. Series whose files all have their recorded size cost no
   request. Temporary files a killed s5cmd left (``<object name><digits>``) are removed; nothing
   else is ever deleted.
2. List: series with files on disk but no record (first run of this version, a lost or
   unreadable state) are listed, one listing per series, and their files compared with it.
   A listing that disagrees with the index (objects missing on the server, more objects than
   the index has) is reported for that series.
3. Transfer: one ``s5cmd run`` of a private command file: ``cp`` of the whole prefix for series
   with nothing on disk, ``cp`` of each missing or wrong-sized object for the others. It stops
   at the first "no space left on device" and when no file completes for ``stall_timeout_s``.
4. Verify: every transferred series against its record (the listing, or the sizes s5cmd
   reported for each object it copied), as soon as its last file lands. s5cmd's exit code is not
   trusted (``sync`` exits 0 even when every request fails); success means every file has its
   own right size on disk.

The manifest is worked through in batches of series (``batch_files`` files, ``batch_bytes``
bytes, ``batch_series`` series at most): each batch is scanned, listed, transferred by one
``s5cmd run`` and verified before the next, so memory depends on the batch, not on the
collection (``nlst``: 21.5 M files). Each series verified is appended to the state's journal at
once (``state.Journal``): a run killed at any moment resumes without listing or fetching again
what it had verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from dataset_assets.core.errors import (
    BadDestinationError,
    DownloadError,
    IncompleteDownloadError,
    OptionError,
    TransferStoppedError,
)
from dataset_assets.core.fmt import human_bytes, redact_url, scrub_text
from dataset_assets.core.fs import check_writable, space_reservation
from dataset_assets.core.safety import IDC_BUCKETS, endpoint_problem, object_name_problem, require_name, series_problem
from dataset_assets.core.select.manifest import is_whole_collection
from dataset_assets.core.transfer import s5cmd
from dataset_assets.core.transfer.claims import SeriesClaims
from dataset_assets.core.transfer.control import (
    DownloadRoot,
    check_control,
    collection_locks,
    command_file,
    remove_stale_command_files,
)
from dataset_assets.core.transfer.disk import (
    ENGINE_COLUMNS,
    TEMP_SUFFIX,
    SeriesOnDisk,
    best_record,
    compare,
    describe,
    files_fit,
    manifest_rows,
    scan_series,
)
from dataset_assets.core.transfer.progress import DEFAULT_STALL_TIMEOUT_S, Progress, parse_line
from dataset_assets.core.transfer.s5cmd import command_line, quoted
from dataset_assets.core.transfer.state import (
    Journal,
    SeriesRecord,
    compact_state,
    journal_lines,
    load_shard_records,
    load_state,
    remove_stale_temporaries,
)

_UUID_DCM = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\.dcm")
#: A batch (one ``s5cmd run``) holds at most this many files, bytes and series.
BATCH_FILES = 100_000
BATCH_BYTES = 50 * 10**9
BATCH_SERIES = 10_000
#: A state with at most this many series is rewritten whole at the end of every run that changed it.
COMPACT_ALWAYS_BELOW = 20_000
MAX_LISTED_FAILURES = 100
Log = Callable[[str], None]


@dataclass
class DownloadResult:
    """What a download did and what the disk holds afterwards."""

    series: int
    files: int
    bytes: int
    skipped_series: int = 0
    listed_series: int = 0
    transferred_files: int = 0
    transferred_bytes: int = 0
    failed_count: int = 0
    failed_series: list[str] = field(default_factory=list)  # the first MAX_LISTED_FAILURES
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    returncode: int | None = None
    replaced_series: list[str] = field(default_factory=list)
    removed_series: list[str] = field(default_factory=list)

    @property
    def complete_series(self) -> int:
        return self.series - self.failed_count

    @property
    def mb_per_s(self) -> float:
        return self.transferred_bytes / 1e6 / self.duration_s if self.duration_s > 0 else 0.0


def check_root(root: Path) -> None:
    """The download root must be usable as given (``BadDestinationError``: no line break or
    wildcard, which s5cmd cannot take; not a dangling link or a file) and writable."""
    check_root_shape(root)
    check_writable(root)
    check_control(root)


def check_root_shape(root: Path) -> None:
    """``check_root`` without creating or writing anything (for dry runs and ``verify``)."""
    bad = sorted({c for c in str(root) if c in "\n\r*?"})
    if bad:
        raise BadDestinationError(
            f"download root {str(root)!r} contains {', '.join(map(repr, bad))}, which s5cmd cannot write to; "
            "choose a path without line breaks, '*' or '?'"
        )
    if root.is_symlink() and not root.exists():
        raise BadDestinationError(
            f"download root {root} is a dangling symbolic link (to {os.readlink(root)!r}); "
            "create its target or choose another folder"
        )
    if root.exists() and not root.is_dir():
        raise BadDestinationError(f"download root {root} is a file, not a folder")


def check_endpoint(options: s5cmd.S5cmdOptions, timeout_s: float = 10.0) -> None:
    """Raise ``DownloadError`` when the endpoint cannot be reached at all (any HTTP answer is
    fine), trusting the CA bundle s5cmd is given (proxies: requests honours the same variables)."""
    endpoint_url, verify = options.endpoint_url, options.ca_bundle or True
    import requests  # here, not at import: every start of the definitions would pay for it

    try:
        requests.head(endpoint_url, timeout=timeout_s, allow_redirects=False, verify=verify)
    except requests.RequestException as exc:
        raise DownloadError(
            f"cannot reach the S3 endpoint {redact_url(endpoint_url)}: {exc.__class__.__name__}: {scrub_text(str(exc))}"
        ) from None


def state_path_for(root: Path, manifest: pa.Table) -> Path:
    """Where the state of ``manifest`` lives below ``root``: one file per collection for a
    collection's manifest, one per selection otherwise (the asset and the CLI share them)."""
    collections = sorted(set(manifest.column("collection_id").to_pylist()))
    if len(collections) == 1:
        name = require_name(collections[0], "collection_id")
    else:
        name = "selection-" + hashlib.sha256("\n".join(map(str, collections)).encode()).hexdigest()[:12]
    return DownloadRoot(root.absolute()).state_path(name)


def _folders_named_as_files(folder: Path) -> list[str]:
    """Folders (not links) in a series folder whose names are DICOM file names."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if e.name.endswith(".dcm") and e.is_dir(follow_symlinks=False))
    except OSError:
        return []


class _Stop(Exception):
    """Raised from inside the transfer loop to stop s5cmd: ``kind`` is "disk", "stall" or "astray"
    (a file landed outside every series folder of the batch)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass
class _Todo:
    """A series that needs a listing or a transfer."""

    row: dict
    disk: SeriesOnDisk
    expected: dict[str, int] | None = None  # object name -> size, when known
    whole: bool = False  # nothing on disk and no record: copy the whole prefix
    fetch: list[str] = field(default_factory=list)  # object names to copy one by one
    note: str | None = None  # a reason the series cannot complete whatever is transferred


class LandingWatch(Protocol):
    """Told of each file of a batch as s5cmd reports it copied (say, to read its header while the
    rest arrive); ``finish`` ends the batch (``drain``: wait for what was reported, else stop)."""

    def file_copied(self, destination: str) -> None: ...

    def finish(self, drain: bool) -> None: ...


#: Called once per batch with the root and the batch's manifest rows; returns its ``LandingWatch``.
WatchBatch = Callable[[Path, list[dict]], LandingWatch]


@dataclass(frozen=True)
class EngineOptions:
    """How one download runs, beside where it writes (the root) and how s5cmd reaches the bucket
    (``S5cmdOptions``). Checked when made: ``OptionError`` in one line."""

    state_path: Path | None = None  # default: state_path_for(root, manifest)
    allowed_buckets: tuple[str, ...] = IDC_BUCKETS
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S  # no file completing for this long stops s5cmd (0: never)
    log: Log = print
    on_progress: Callable[[Progress], None] | None = None
    progress_interval_s: float = 5.0
    check_endpoint_first: bool = True
    watch_batch: WatchBatch | None = None
    # the manifest columns ``watch_batch`` reads beside the engine's own (None: every column)
    watch_columns: tuple[str, ...] | None = None
    batch_files: int = BATCH_FILES
    batch_bytes: int = BATCH_BYTES
    batch_series: int = BATCH_SERIES

    def __post_init__(self) -> None:
        stall = self.stall_timeout_s
        if isinstance(stall, bool) or not isinstance(stall, (int, float)) or not math.isfinite(stall) or stall < 0:
            raise OptionError(f"stall timeout {stall!r} is not a number of seconds >= 0 (0: wait forever)")
        for name in ("batch_files", "batch_bytes", "batch_series"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{name} {value!r} is not a whole number >= 1")
        object.__setattr__(self, "allowed_buckets", tuple(self.allowed_buckets))
        columns = self.watch_columns
        if columns is not None and (
            isinstance(columns, str)
            or not isinstance(columns, (tuple, list))
            or not all(isinstance(c, str) and c for c in columns)
        ):
            raise OptionError(f"watch_columns {columns!r} is not a list of column names (None: whole rows)")
        if columns is not None:
            object.__setattr__(self, "watch_columns", tuple(columns))


class Download:
    """One download of ``manifest`` into ``root``; ``run()`` does the four steps in order."""

    def __init__(
        self, manifest: pa.Table, root: Path, options: s5cmd.S5cmdOptions, engine: EngineOptions | None = None
    ) -> None:
        engine = engine or EngineOptions()
        problem = endpoint_problem(options.endpoint_url)
        if problem:
            raise OptionError(problem)
        self.manifest, self.root, self.options, self.engine = manifest, root, options, engine
        self.log, self.state_path, self.on_progress = engine.log, engine.state_path, engine.on_progress
        self.progress_interval_s, self.check_endpoint_first = engine.progress_interval_s, engine.check_endpoint_first
        self.stall_timeout_s, self.allowed_buckets = engine.stall_timeout_s, engine.allowed_buckets
        self.batch_files, self.batch_bytes = engine.batch_files, engine.batch_bytes
        self.batch_series = engine.batch_series
        # a batch's rows hold the columns the engine and its watch read, not the whole row
        watched = () if engine.watch_batch is None else engine.watch_columns
        missing = sorted(set(watched or ()) - set(manifest.column_names))
        if missing:  # the watch would get None for them and match nothing: said now, not found out later
            raise OptionError(f"watch_columns {missing} are not columns of the manifest")
        extra = () if watched is None else tuple(sorted(set(watched) - set(ENGINE_COLUMNS)))
        self.row_columns = None if watched is None else ENGINE_COLUMNS + extra
        self.paths = DownloadRoot(root)
        self.control = self.paths.control
        self.started = time.monotonic()
        self.records: dict[str, SeriesRecord] = {}  # the state, updated as series are verified
        self.shard_records: dict[str, SeriesRecord] = {}
        self.failed: dict[str, str] = {}  # target_dir -> why
        self.todo: list[_Todo] = []
        self.temporaries: list[tuple[dict, SeriesOnDisk, dict[str, int] | None]] = []
        self.result = DownloadResult(series=manifest.num_rows, files=0, bytes=0)
        self.progress: Progress | None = None
        self.claims: SeriesClaims | None = None
        self._endpoint_checked = False
        self.journal = Journal(self.state_path) if self.state_path is not None else None
        self.batches = 0
        self._landed: list[str] = []  # series folders whose last file s5cmd reported (reader thread appends)
        self._pending: dict[str, int] = {}  # series folder -> files still to land in this batch
        self._astray: str | None = None  # a file s5cmd wrote outside every series folder of the batch
        self._real_root = os.path.realpath(root)  # the root may be a link; folders below it may not

    # -- the steps -------------------------------------------------------------------------

    def scan(self, rows: list[dict]) -> None:
        """Validate each row of a batch, compare its directory with its record, plan the rest."""
        for row in rows:
            if row.get("target_dir") in self.failed:  # refused while setting revised series aside
                continue
            problem = series_problem(row, self.allowed_buckets)
            if problem:
                self.failed[row.get("target_dir") or str(row.get("SeriesInstanceUID"))] = problem
                continue
            disk = scan_series(self.root / row["target_dir"])
            record = best_record(row, self.records, self.shard_records)
            if disk.temp_files:  # removed once this download holds the series' claim (see run)
                self.temporaries.append((row, disk, None))
            if record is not None and record.holds(disk.files):
                self.result.skipped_series += 1
                continue
            # no record, or the disk differs from it: what to fetch, a listing says (none when empty)
            self.todo.append(_Todo(row, disk, whole=not disk.files))

    def list(self) -> None:
        """One listing per series that has files on disk but no record; compare the files with it."""
        unlisted = [t for t in self.todo if t.expected is None and not t.whole]
        if not unlisted:
            return
        self.result.listed_series += len(unlisted)
        self.log(f"listing {len(unlisted):,} series that have files on disk but no record of their sizes")
        self._require_endpoint()
        prefixes = {self._prefix(t.row): t for t in unlisted}
        listed: dict[str, dict[str, int]] = {p: {} for p in prefixes}
        errors: dict[str, str] = {}
        odd: dict[str, str] = {}
        activity = Progress(total_files=0, total_bytes=0)

        def on_stdout(line: str) -> None:
            record = parse_line(line) or {}
            key, size = record.get("key"), record.get("size")
            if not isinstance(key, str):
                activity.on_stdout(line)  # a retried request
                return
            activity.last_success = time.monotonic()
            prefix, _, name = key.rpartition("/")
            target = listed.get(prefix + "/")
            if target is None:  # a key below a deeper prefix, or one nobody asked for
                owner = next((p for p in prefixes if key.startswith(p)), None)
                if owner:
                    odd.setdefault(
                        owner, f"the server lists {key!r}, which is not a plain object name below the series"
                    )
                return
            problem = object_name_problem(name)
            if problem or not isinstance(size, int) or size < 0:
                odd.setdefault(prefix + "/", f"the server listed {problem or f'a size {size!r}'}")
                return
            target[name] = size

        def on_stderr(line: str) -> None:
            activity.on_stderr(line)
            record = parse_line(line) or {}
            command, error = str(record.get("command", "")), str(record.get("error", line.strip()))
            for prefix in prefixes:
                if f" {prefix}*" in command or command.endswith(prefix + "*"):
                    if "no object found" not in error:
                        errors.setdefault(prefix, error)
                    return

        with command_file(self.control, "list") as (path, handle):
            for prefix in prefixes:
                handle.write(f"ls {quoted(prefix + '*')}\n")
            handle.close()
            try:
                s5cmd.run_commands(
                    self.options, path, on_stdout=on_stdout, on_stderr=on_stderr, check=lambda: self._check(activity)
                )
            except _Stop as stop:
                self._stopped(stop, activity, listing=True)
        completed: set[str] = set()
        for prefix, todo in prefixes.items():
            row = todo.row
            objects = listed[prefix]
            where = f"series {row['SeriesInstanceUID']} (s3 prefix {prefix})"
            if prefix in odd:
                self.failed[row["target_dir"]] = f"{where}: {odd[prefix]}; nothing fetched"
            elif prefix in errors:
                self.failed[row["target_dir"]] = f"{where}: listing failed: {errors[prefix]}"
            elif not objects:
                self.failed[row["target_dir"]] = (
                    f"{where}: not found on the server (no object under the prefix); a re-run will not fix "
                    "it: the index and the bucket disagree"
                )
            elif len(objects) > row["instanceCount"]:
                self.failed[row["target_dir"]] = (
                    f"{where}: the server holds {len(objects)} objects but the index lists "
                    f"{row['instanceCount']}; the bucket and the index disagree, nothing fetched"
                )
            elif len(objects) == row["instanceCount"] and sum(objects.values()) != row["series_bytes"]:
                self.failed[row["target_dir"]] = (
                    f"{where}: the server's objects hold {sum(objects.values()):,} bytes but the index says "
                    f"{row['series_bytes']:,}; the bucket and the index disagree, nothing fetched"
                )
            else:
                todo.expected = objects
                todo.fetch, _ = compare(objects, todo.disk)
                if len(objects) < row["instanceCount"]:
                    todo.note = (
                        f"{row['instanceCount'] - len(objects)} of {row['instanceCount']} object(s) not found on "
                        "the server; a re-run will not fix it: the index and the bucket disagree"
                    )
                elif describe(row, todo.disk, objects) is None:
                    self._complete(row, objects)
                    completed.add(row["target_dir"])
        self.result.skipped_series += len(completed)
        self.todo = [
            t for t in self.todo if t.row["target_dir"] not in self.failed and t.row["target_dir"] not in completed
        ]

    def transfer(self, reservation) -> None:
        """One ``s5cmd run`` of the copies the scan and the listing planned for this batch; each
        series is verified (and journaled) as soon as its last file lands."""
        todo = [t for t in self.todo if t.whole or t.fetch]
        if not todo:
            return
        missing_files = sum(t.row["instanceCount"] if t.whole else len(t.fetch) for t in todo)
        missing_bytes = sum(
            t.row["series_bytes"] if t.whole else sum(t.expected[n] for n in t.fetch)
            for t in todo  # type: ignore[index]
        )
        flags = self.options.copy_flags()
        self._require_endpoint()
        progress = self.progress
        if progress is None:  # one progress for the whole run: its totals grow as batches are planned
            progress = self.progress = Progress(total_files=0, total_bytes=0)
        progress.total_files += missing_files
        progress.total_bytes += missing_bytes
        self.log(
            f"downloading {len(todo):,} series ({missing_files:,} files, {human_bytes(missing_bytes)}) of batch "
            f"{self.batches} from {redact_url(self.options.endpoint_url)} with {self.options.workers} workers; "
            f"{self.result.skipped_series:,} series already complete so far"
        )

        def tick() -> None:
            self._verify_landed()
            reservation.update(self.estimate_bytes - progress.done_bytes)
            self.on_progress(progress) if self.on_progress else self.log("progress: " + progress.line())

        self._pending = {}
        with command_file(self.control, "run") as (path, handle):
            for t in todo:
                dest = self.root / t.row["target_dir"]
                if link := self._link_below_root(dest):  # files are never written through a link
                    self.failed[t.row["target_dir"]] = (
                        f"series {t.row['SeriesInstanceUID']}: {link} is a link (to {os.path.realpath(link)}); "
                        f"downloads never write through links below {self.root}: make it a folder (or link "
                        "the download root itself)"
                    )
                    continue
                try:
                    dest.mkdir(parents=True, exist_ok=True)
                except OSError as exc:  # e.g. a file in the way: this series fails, the others go on
                    self.failed[t.row["target_dir"]] = (
                        f"series {t.row['SeriesInstanceUID']}: cannot create its directory {dest} "
                        f"({exc.strerror or exc}; is a file in the way?)"
                    )
                    continue
                if folders := _folders_named_as_files(dest):  # s5cmd would write into them
                    self.failed[t.row["target_dir"]] = (
                        f"series {t.row['SeriesInstanceUID']}: {dest / folders[0]} is a folder where a file of "
                        "the series belongs; move it away and run again"
                    )
                    continue
                self._pending[os.path.normpath(dest)] = t.row["instanceCount"] if t.whole else len(t.fetch)
                if t.whole:
                    # --flatten: each object lands under its own base name in the series folder, never
                    # where a listed key such as <uuid>/../../x.dcm would put it (s5cmd keeps the
                    # key's path below the wildcard); IDC series hold no folders.
                    handle.write(command_line("cp", self._prefix(t.row) + "*", f"{dest}/", [*flags, "--flatten"]))
                else:
                    for name in t.fetch:
                        handle.write(command_line("cp", self._prefix(t.row) + name, f"{dest}/{name}", flags))
            handle.close()
            watch = self.engine.watch_batch
            watching = watch(self.root, [t.row for t in todo]) if watch is not None else None
            progress.on_copied = self._landing(watching.file_copied if watching is not None else None)
            try:
                try:
                    self.result.returncode = s5cmd.run_commands(
                        self.options,
                        path,
                        on_stdout=progress.on_stdout,
                        on_stderr=progress.on_stderr,
                        on_tick=tick,
                        tick_s=self.progress_interval_s,
                        check=lambda: self._check(progress),
                    )
                finally:
                    if watching is not None:  # what was read is kept; an interrupted run stops reading
                        watching.finish(drain=sys.exc_info()[0] is None)
                if self._astray:  # a last file landed astray after the last check
                    raise _Stop("astray")
            except _Stop as stop:
                self.log("transfer stopped: " + progress.line())
                self.verify()
                self._stopped(stop, progress)
        self.log("transfer ended: " + progress.line() + f", s5cmd exit code {self.result.returncode}")

    def _link_below_root(self, folder: Path) -> Path | None:
        """The first folder from the root down to ``folder`` that is a symbolic link, if any."""
        if os.path.realpath(folder) == os.path.join(self._real_root, os.path.relpath(folder, self.root)):
            return None
        current = self.root
        for part in folder.relative_to(self.root).parts:
            current = current / part
            if current.is_symlink():
                return current
        return None

    def _landing(self, then: Callable[[str], None] | None) -> Callable[[str], None]:
        """The hook s5cmd's reader thread calls with each copied file: counts the files of each
        series down, and queues a series for verification when its last one has landed."""
        pending, landed = self._pending, self._landed

        def copied(destination: str) -> None:
            folder = os.path.normpath(os.path.dirname(destination))
            left = pending.get(folder)
            if left is not None:
                pending[folder] = left - 1
                if left == 1:
                    landed.append(folder)
            elif not self._astray:  # never a series folder of the batch: s5cmd is stopped at once
                self._astray = destination
            if then is not None:
                then(destination)

        return copied

    def _verify_landed(self) -> None:
        """Verify (and journal) the series whose last file has landed since the last call."""
        if not self._landed:
            return
        folders = set()
        while self._landed:
            folders.add(self._landed.pop())
        done = [t for t in self.todo if os.path.normpath(self.root / t.row["target_dir"]) in folders]
        self._verify(done)

    def verify(self) -> None:
        """Every series of the batch not verified yet against its record (the listing, or what
        s5cmd reported copying); the per-file sizes s5cmd reported are then dropped."""
        self._verify([t for t in self.todo if t.row["target_dir"] not in self.failed])
        if self.progress is not None:
            self.progress.copied.clear()  # memory holds one batch's files at most
            self.progress.not_found.clear()

    def _verify(self, todo: list[_Todo]) -> None:
        verified = set()
        for t in todo:
            row = t.row
            if row["target_dir"] in self.failed or row["target_dir"] in self.verified:
                continue
            verified.add(row["target_dir"])
            disk = scan_series(self.root / row["target_dir"])
            # memory: the per-file sizes of this batch's own series only
            got = self.progress.take_copied(str(self.root / row["target_dir"])) if self.progress is not None else {}
            expected = t.expected
            if expected is None:  # fetched whole: s5cmd said which objects it copied, with their sizes
                if self.progress is not None and self._prefix(row) + "*" in self.progress.not_found:
                    self.failed[row["target_dir"]] = (
                        f"series {row['SeriesInstanceUID']} in {row['target_dir']}: not found on the server (no "
                        f"object under {self._prefix(row)}); a re-run will not fix it: "
                        "the index and the bucket disagree"
                    )
                    continue
                if len(got) > row["instanceCount"]:
                    self.failed[row["target_dir"]] = (
                        f"series {row['SeriesInstanceUID']}: the server holds more objects ({len(got)}) than the "
                        f"index lists ({row['instanceCount']}); the bucket and the index disagree "
                        f"(the files fetched are in {row['target_dir']})"
                    )
                    continue
                expected = got if files_fit(got, row) else None
            problem = (
                describe(row, disk, expected)
                if expected is not None
                else (
                    f"series {row['SeriesInstanceUID']} in {row['target_dir']}: {disk.count}/{row['instanceCount']} "
                    f"files, {disk.bytes:,}/{row['series_bytes']:,} bytes"
                )
            )
            if t.note:
                problem = f"series {row['SeriesInstanceUID']} in {row['target_dir']}: {t.note}"
            if problem:
                self.failed[row["target_dir"]] = problem
            else:
                self._complete(row, expected)  # type: ignore[arg-type]
        self.verified_total += len(verified - self.verified)
        self.verified |= verified

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> DownloadResult:
        claims = self.claims = SeriesClaims(self.root)
        self.records = load_state(self.state_path, self.log) if self.state_path else {}
        self.shard_records = load_shard_records(self.state_path, self.log)  # what shards of it verified
        self.verified: set[str] = set()  # series of this batch verified (ok or not); emptied per batch
        self.verified_total = 0
        self.recorded_new = 0  # series this run recorded that the state did not hold
        self._set_aside_revised()
        self.estimate_bytes = self._estimate()
        label = ",".join(sorted(set(self.manifest.column("collection_id").to_pylist())))
        deferred: dict[str, dict] = {}
        try:
            with space_reservation(self.root, self.paths.reservations, self.estimate_bytes, label) as reservation:
                for rows in self._batches(manifest_rows(self.manifest, self.row_columns)):
                    for row in rows:
                        if row.get("target_dir") not in self.failed and not series_problem(row, self.allowed_buckets):
                            self.result.files += row["instanceCount"]
                            self.result.bytes += row["series_bytes"]
                    deferred.update(self._batch(claims, rows, reservation))
                while deferred:  # series another download into this root was fetching: now ours to check
                    self._wait_for(claims, deferred)
                    rows, deferred = list(deferred.values()), {}
                    for batch in self._batches(iter(rows)):
                        deferred.update(self._batch(claims, batch, reservation))
        finally:
            self._tally()
            self._save()
        return self._finish()

    def _tally(self) -> None:
        if self.progress is not None:
            self.result.transferred_files = self.progress.done_files
            self.result.transferred_bytes = self.progress.done_bytes
            self.result.errors = list(self.progress.errors)

    def _batch(self, claims: SeriesClaims, rows: list[dict], reservation) -> dict[str, dict]:
        """Scan, claim, list, transfer and verify one batch; the rows another download holds."""
        self.batches += 1
        self.todo, self.temporaries = [], []
        self.verified = set()
        self.scan(rows)
        planned = {t.row["target_dir"]: t.row for t in self.todo}
        planned.update({row["target_dir"]: row for row, _, _ in self.temporaries})
        deferred = claims.claim(list(planned.values()))
        self.todo = [t for t in self.todo if t.row["target_dir"] not in deferred]
        try:
            self.list()
            listed = {t.row["target_dir"]: t.expected for t in self.todo}
            for row, disk, _ in self.temporaries:  # what a killed s5cmd left, in series we now hold
                if row["target_dir"] not in deferred:
                    self._remove_temp_files(row, disk, listed.get(row["target_dir"]))
            self.transfer(reservation)
            self.verify()
        finally:
            claims.release()
        self.todo, self.temporaries = [], []
        return deferred

    def _batches(self, rows: Iterator[dict]) -> Iterator[list[dict]]:
        """Rows in batches of at most ``batch_series`` series, ``batch_files`` files and
        ``batch_bytes`` bytes (a series larger than a batch is a batch of its own)."""
        batch: list[dict] = []
        files = size = 0
        for row in rows:
            n, b = row.get("instanceCount"), row.get("series_bytes")
            n, b = (n if isinstance(n, int) else 0), (b if isinstance(b, int) else 0)
            if batch and (
                len(batch) >= self.batch_series or files + n > self.batch_files or size + b > self.batch_bytes
            ):
                yield batch
                batch, files, size = [], 0, 0
            batch.append(row)
            files, size = files + n, size + b
        if batch:
            yield batch

    def _estimate(self) -> int:
        """Bytes still to fetch, judged by the records alone (no disk access): for the space check."""
        missing = 0
        for row in manifest_rows(self.manifest, self.row_columns):
            record = best_record(row, self.records, self.shard_records)
            size = row.get("series_bytes")
            if isinstance(size, int) and size > 0 and record is None:
                missing += size
        return missing

    def _wait_for(self, claims: SeriesClaims, deferred: dict[str, dict]) -> None:
        """Wait until the other downloads let go of the ``deferred`` series (they finish them, or
        die). A holder whose heartbeat is older than ``stall_timeout_s`` (stopped with Ctrl-Z,
        hung) fails this download with one line naming it; a holder busy elsewhere keeps beating."""
        holders = sorted({h for d in deferred if (h := claims.holder(d))})
        self.log(
            f"{len(deferred):,} series are being fetched by another download into {self.root} "
            f"({', '.join(holders) or 'holder unknown'}); waiting for it, then checking them here"
        )
        started = last_log = time.monotonic()
        while busy := [(d, h) for d in deferred if (h := claims.holder(d))]:
            time.sleep(1.0)
            for d, holder in busy:
                age = claims.heartbeat_age(holder)
                idle = age if age is not None else time.monotonic() - started
                if self.stall_timeout_s and idle > self.stall_timeout_s:
                    pid, _, rest = holder.partition(" ")
                    raise DownloadError(
                        f"{len(busy):,} series are claimed by another download (pid {pid} on "
                        f"{rest.partition(' ')[2] or 'this host'}) that showed no sign of work for "
                        f"{self.stall_timeout_s:g} s (stopped, or hung?); let it finish or stop it, or remove "
                        f"{claims.path_of(d)} if it is gone, and run again"
                    )
            if time.monotonic() - last_log > 30:
                self.log(f"still waiting for {len(busy):,} series another download is fetching")
                last_log = time.monotonic()

    def _finish(self) -> DownloadResult:
        result = self.result
        result.failed_count = len(self.failed)
        result.failed_series = list(self.failed.values())[:MAX_LISTED_FAILURES]
        result.duration_s = time.monotonic() - self.started
        if not result.failed_count:
            if self.progress is None:
                self.log(
                    f"all {self.manifest.num_rows:,} series already complete on disk "
                    f"({human_bytes(result.bytes)}); nothing to transfer"
                )
            return result
        shown = "; ".join(result.failed_series[:10])
        more = f"; and {result.failed_count - 10} more" if result.failed_count > 10 else ""
        errors = " | ".join(result.errors[:3])
        raise IncompleteDownloadError(
            f"{result.failed_count} of {result.series} series incomplete"
            + (f" (s5cmd exit code {result.returncode})" if result.returncode is not None else "")
            + f": {shown}{more}"
            + (f". s5cmd errors: {errors}" if errors else "")
            + ". Everything that completed is kept; run it again (materialize, or the same command) to fetch "
            "only what is missing.",
            result,
        )

    # -- helpers ---------------------------------------------------------------------------

    def _prefix(self, row: dict) -> str:
        """``s3://<bucket>/<uuid>/`` on this endpoint (the GCS mirror names two buckets differently)."""
        return self.options.source_url(row["series_aws_url"], row["aws_bucket"])[:-1]

    def _complete(self, row: dict, files: dict[str, int]) -> None:
        record = SeriesRecord(
            row["SeriesInstanceUID"], row["crdc_series_uuid"], files, row.get("series_revised_idc_version")
        )
        if row["target_dir"] not in self.records:  # memory: a count, not a record per series (the journal has it)
            self.recorded_new += 1
        if self.journal is not None:
            try:
                self.journal.record(row["target_dir"], record)  # the journal keeps every name and size
            except OSError as exc:
                self._state_unwritable(exc)

    def _remove_temp_files(self, row: dict, disk: SeriesOnDisk, expected: dict[str, int] | None) -> None:
        """Remove what a killed s5cmd left: ``<object name><digits>`` of this series' objects (or,
        with no record of them, of names shaped as IDC's ``<uuid>.dcm``). Nothing else."""
        for name in disk.temp_files:
            base = TEMP_SUFFIX.fullmatch(name).group(1)  # type: ignore[union-attr]
            if (base in expected) if expected is not None else bool(_UUID_DCM.fullmatch(base)):
                (self.root / row["target_dir"] / name).unlink(missing_ok=True)

    def _set_aside_revised(self) -> None:
        """Move the directories of series that a new release revised (same directory, another
        ``crdc_series_uuid``) to ``<root>/.dataset_assets/replaced/<old uuid>/``: kept, not deleted."""
        revised = []
        in_manifest = set()
        for row in manifest_rows(self.manifest, self.row_columns):
            in_manifest.add(row["target_dir"])
            before = self.records.get(row["target_dir"])
            if before is None or before.crdc_series_uuid == row["crdc_series_uuid"]:
                continue
            if before.series_uid != row["SeriesInstanceUID"]:  # another series, not a revision: never moved
                self.failed[row["target_dir"]] = (
                    f"series {row['SeriesInstanceUID']}: its directory {row['target_dir']} holds series "
                    f"{before.series_uid}, downloaded before with another selection; nothing was moved. "
                    "Use a layout with %SeriesInstanceUID so that each series has its own directory"
                )
                continue
            if series_problem(row, self.allowed_buckets):
                continue  # reported by the scan; never move anything for a row that is not safe
            source = self.root / row["target_dir"]
            holder = self.claims.holder(row["target_dir"]) if self.claims is not None else None
            if holder is not None:  # another download is working in it right now: never pulled away
                self.failed[row["target_dir"]] = (
                    f"series {row['SeriesInstanceUID']}: another download ({holder}) is writing its directory; "
                    "nothing was moved, run again once it is done"
                )
                continue
            on_disk = scan_series(source).files
            new_complete = len(on_disk) == row["instanceCount"] and sum(on_disk.values()) == row["series_bytes"]
            holds_old = before.holds(on_disk) or (bool(on_disk) and not new_complete)
            if not holds_old:  # the record is stale (another download put the new files there): just forget it
                revised.append(row["target_dir"])
                continue
            if source.is_dir() and not source.is_symlink():
                dest = self.paths.replaced / before.crdc_series_uuid
                n = 1
                while os.path.lexists(dest):  # never overwrite what was set aside before
                    dest, n = self.paths.replaced / f"{before.crdc_series_uuid}.{n}", n + 1
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, dest)
                self.log(
                    f"series {row['SeriesInstanceUID']} was revised ({before.crdc_series_uuid} -> "
                    f"{row['crdc_series_uuid']}); previous files moved to {dest}"
                )
            revised.append(row["target_dir"])
            self.result.replaced_series.append(
                f"{row['SeriesInstanceUID']} ({before.crdc_series_uuid} -> {row['crdc_series_uuid']})"
            )
        for target_dir in revised:  # an interrupted run must not set the new files aside again
            del self.records[target_dir]
        if revised and self.journal is not None:
            try:
                self.journal.forget(revised)
                self.journal.sync()
            except OSError as exc:
                self._state_unwritable(exc)
        if self.records and is_whole_collection(self.manifest):  # a filtered selection leaves out series on purpose
            removed = sorted(f"{r.series_uid} ({d})" for d, r in self.records.items() if d not in in_manifest)
            self.result.removed_series = removed
            if removed:
                self.log(
                    f"{len(removed)} series downloaded before are no longer in the collection; kept on disk: "
                    + "; ".join(removed[:10])
                )

    def _save(self) -> None:
        """The journal to disk; the snapshot rewritten (journal emptied) only when the journal has
        grown past a share of it, or the state is small: a large state is not rewritten for a few series."""
        if self.journal is None or self.state_path is None:
            return
        try:
            self.journal.close()
            lines = journal_lines(self.state_path)
            size = len(self.records) + self.recorded_new
            if lines and (size <= COMPACT_ALWAYS_BELOW or lines * 4 >= size):
                compact_state(self.state_path, self.log)
        except OSError as exc:
            self._state_unwritable(exc)

    def _state_unwritable(self, exc: OSError) -> None:
        """The state is a cache: when it cannot be written (a full disk, a read-only folder) the
        download goes on, said once; the next run checks the disk again."""
        self.log(
            f"cannot record the state in {self.state_path} ({exc.strerror or exc}); the download goes on, "
            "and the next run checks the disk again for what is not recorded"
        )
        journal, self.journal = self.journal, None
        if journal is not None:
            with contextlib.suppress(OSError):
                journal.close()

    def _require_endpoint(self) -> None:
        if self.check_endpoint_first and not self._endpoint_checked:
            check_endpoint(self.options)
        self._endpoint_checked = True

    def _check(self, progress: Progress) -> None:
        """Called about twice a second while s5cmd runs: heartbeat, series that landed, stops."""
        if self.claims is not None:
            self.claims.beat()
        self._verify_landed()
        if self.journal is not None:
            try:
                self.journal.sync_if_due()
            except OSError as exc:
                self._state_unwritable(exc)
        if self._astray:
            raise _Stop("astray")
        if progress.disk_full:
            raise _Stop("disk")
        if self.stall_timeout_s and progress.seconds_without_success() > self.stall_timeout_s:
            raise _Stop("stall")

    def _stopped(self, stop: _Stop, progress: Progress, listing: bool = False) -> None:
        """Save what is verified and raise ``TransferStoppedError`` with one line saying why."""
        self._tally()
        try:
            self._save()
        except OSError as exc:  # e.g. the full disk itself: the state is a cache, the next run rebuilds it
            self.log(f"could not record the state ({exc.strerror or exc}); the next run checks the disk again")
        self.result.failed_count = max(self.result.series - self.result.skipped_series - self.verified_total, 0)
        self.result.duration_s = time.monotonic() - self.started
        kept = "everything complete is kept; run again to resume"
        if stop.kind == "astray":
            raise TransferStoppedError(
                f"s5cmd wrote {self._astray!r}, outside the folder of every series it was fetching: the "
                f"endpoint {redact_url(self.options.endpoint_url)} lists object names that are not plain files "
                "of their series; s5cmd was stopped (series verified before are kept); remove that file and "
                "check the endpoint",
                self.result,
            )
        if stop.kind == "disk":
            still = max((progress.total_bytes - progress.done_bytes), 0)
            free = shutil.disk_usage(self.root).free
            raise TransferStoppedError(
                f"the disk holding {self.root} is full (no space left on device, {human_bytes(free)} free): "
                f"{human_bytes(still)} of this download still to write; free space and run again ({kept})",
                self.result,
            )
        what = "no listing answer" if listing else "no file completed"
        seen = (
            f"it answered only errors ({progress.failures} failed and {progress.retried} retried request(s)); "
            f"first error: {progress.first_error}"
            if progress.failures or progress.retried
            else "the endpoint did not answer (no data and no error: it is silent, or every request is still "
            "being retried)"
        )
        raise TransferStoppedError(
            f"{what} for {self.stall_timeout_s:g} s from {redact_url(self.options.endpoint_url)}: {seen}; "
            f"s5cmd stopped ({kept}; raise stall_timeout_s / --stall-timeout for very large files on a slow link)",
            self.result,
        )


def download(
    manifest: pa.Table, root: Path, options: s5cmd.S5cmdOptions, engine: EngineOptions | None = None
) -> DownloadResult:
    """Bring ``root`` in line with ``manifest`` (``engine``: how; its state defaults to
    ``state_path_for(root, manifest)``). Raises
    ``IncompleteDownloadError`` (with ``.result``) when series are still incomplete afterwards,
    ``TransferStoppedError`` when the endpoint stalled or the disk filled; what completed stays."""
    root = root.absolute()
    check_root(root)
    engine = engine or EngineOptions()
    state_path = engine.state_path or state_path_for(root, manifest)
    engine = replace(engine, state_path=state_path)
    # One download per state (a collection, a cohort, a selection) at a time; downloads of other
    # states into the same root run in parallel, and SeriesClaims keeps them off each other's series.
    with collection_locks(root, [state_path.stem]):
        control = DownloadRoot(root).control
        control.mkdir(exist_ok=True)
        remove_stale_command_files(control)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(state_path)
        return Download(manifest, root, options, engine).run()
