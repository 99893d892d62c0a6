"""Downloading a manifest with s5cmd, resumably, and proving the disk matches the manifest.

1. Scan: every series directory is compared with its manifest row (``instanceCount`` files
   named ``*.dcm`` and exactly ``series_bytes`` bytes). Complete series are skipped without any
   request; temporary files s5cmd leaves when killed (``<uuid>.dcm<digits>``) are removed.
2. Check: the download root is writable (checked first) and has room for the missing bytes plus a margin;
   the endpoint answers at all (a refusing endpoint fails in seconds, not after retries).
3. Transfer: one s5cmd ``run`` of a private command file: ``cp`` for series with nothing on
   disk, ``sync --size-only`` for partial ones (only the missing files move).
4. Verify: the scan again. s5cmd's exit code is not trusted (``sync`` exits 0 even when every
   request fails); success means every series is complete on disk.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import requests

from . import s5cmd
from .errors import DownloadError
from .fs import check_writable, space_reservation
from .fmt import human_bytes
from .manifest import is_whole_collection
from .progress import Progress

TEMP_FILE = re.compile(r"\.dcm\d+$")
CONTROL_DIR = ".dataset_assets"
MAX_LISTED_FAILURES = 100  # command files live here, below the download root
Log = Callable[[str], None]


@dataclass(frozen=True)
class SeriesOnDisk:
    files: int
    bytes: int
    temp_files: tuple[str, ...] = ()


@dataclass
class DownloadResult:
    """What a download did and what the disk holds afterwards."""

    series: int
    files: int
    bytes: int
    skipped_series: int = 0
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


def scan_series(directory: Path) -> SeriesOnDisk:
    """Count ``*.dcm`` files and their bytes in one series directory (no recursion)."""
    files = size = 0
    temps: list[str] = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if entry.name.endswith(".dcm"):
                    files += 1
                    size += entry.stat(follow_symlinks=False).st_size
                elif TEMP_FILE.search(entry.name):
                    temps.append(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return SeriesOnDisk(files, size, tuple(temps))


def _rows(manifest: pa.Table) -> Iterator[dict]:
    columns = ["SeriesInstanceUID", "crdc_series_uuid", "aws_bucket", "series_aws_url", "instanceCount", "series_bytes", "target_dir"]
    for batch in manifest.select(columns).to_batches(50_000):
        yield from batch.to_pylist()


def series_status(manifest: pa.Table, root: Path) -> Iterator[tuple[dict, SeriesOnDisk, bool]]:
    """Each manifest row, what its directory holds, and whether it is complete."""
    for row in _rows(manifest):
        disk = scan_series(root / row["target_dir"])
        complete = disk.files == row["instanceCount"] and disk.bytes == row["series_bytes"]
        yield row, disk, complete


def check_root(root: Path) -> None:
    """The download root must be writable, and free of what s5cmd cannot take in a destination:
    a line break (ends a command) or a wildcard ``*`` ``?`` (s5cmd refuses those in targets)."""
    bad = sorted({c for c in str(root) if c in "\n\r*?"})
    if bad:
        raise DownloadError(
            f"download root {str(root)!r} contains {', '.join(map(repr, bad))}, which s5cmd cannot write to; "
            "choose a path without line breaks, '*' or '?'"
        )
    check_writable(root)


def check_endpoint(endpoint_url: str, timeout_s: float = 10.0) -> None:
    """Raise ``DownloadError`` when the endpoint cannot be reached at all (any HTTP answer is fine)."""
    verify = os.environ.get("AWS_CA_BUNDLE") or os.environ.get("REQUESTS_CA_BUNDLE") or True
    try:
        requests.head(endpoint_url, timeout=timeout_s, allow_redirects=False, verify=verify)
    except requests.RequestException as exc:
        raise DownloadError(f"cannot reach the S3 endpoint {endpoint_url}: {exc.__class__.__name__}: {exc}") from exc


STATE_COLUMNS = ["target_dir", "SeriesInstanceUID", "crdc_series_uuid", "series_revised_idc_version"]


def state_path_for(root: Path, manifest: pa.Table) -> Path:
    """Where the state of ``manifest`` lives below ``root``: one file per collection for a
    collection's manifest, one per selection otherwise (the asset and the CLI share them)."""
    import hashlib

    collections = sorted(set(manifest.column("collection_id").to_pylist()))
    if len(collections) == 1:
        name = collections[0]
    else:
        name = "selection-" + hashlib.sha256("\n".join(collections).encode()).hexdigest()[:12]
    return root.absolute() / CONTROL_DIR / "state" / f"{name}.parquet"


def load_state(path: Path | None) -> dict[str, tuple[str, str]]:
    """``target_dir -> (SeriesInstanceUID, crdc_series_uuid)`` of series verified complete before."""
    if path is None or not path.is_file():
        return {}
    table = pq.read_table(path, columns=STATE_COLUMNS[:3])
    return {d: (s, u) for d, s, u in zip(*(table.column(c).to_pylist() for c in STATE_COLUMNS[:3]))}


def save_state(path: Path, manifest: pa.Table, failed_dirs: set[str]) -> None:
    """Record the series of ``manifest`` that are complete (all but ``failed_dirs``), atomically;
    entries for directories outside this manifest (another filter, another run) are kept."""
    table = _without(manifest.select(STATE_COLUMNS), failed_dirs)
    if path.is_file():
        previous = pq.read_table(path).select(STATE_COLUMNS)
        ours = set(manifest.column("target_dir").to_pylist())
        table = pa.concat_tables([_without(previous, ours).cast(table.schema), table])
    _write_state(path, table)


def forget_state(path: Path, dirs: set[str]) -> None:
    """Drop the entries of ``dirs`` from the state at ``path``, atomically."""
    if dirs and path.is_file():
        _write_state(path, _without(pq.read_table(path), dirs))


def _without(table: pa.Table, dirs: set[str]) -> pa.Table:
    """``table`` without the rows whose ``target_dir`` is in ``dirs``."""
    if not dirs:
        return table
    return table.filter(pa.array([d not in dirs for d in table.column("target_dir").to_pylist()]))


def _write_state(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _revised(manifest: pa.Table, state: dict[str, tuple[str, str]]) -> Iterator[tuple[str, tuple[str, str], dict]]:
    """(directory, what the state says it holds, manifest row) of each series a release revised:
    same directory, another ``crdc_series_uuid``."""
    for row in _rows(manifest):
        before = state.get(row["target_dir"])
        if before is not None and before[1] != row["crdc_series_uuid"]:
            yield row["target_dir"], before, row


def set_aside_revised(manifest: pa.Table, root: Path, state: dict[str, tuple[str, str]], log: Log) -> list[str]:
    """Move the directories of series that a new release revised (same directory, another
    ``crdc_series_uuid``) to ``<root>/.dataset_assets/replaced/<old uuid>/``: kept, not deleted."""
    replaced = []
    for _, before, row in _revised(manifest, state):
        source = root / row["target_dir"]
        if source.is_dir():
            dest = root / CONTROL_DIR / "replaced" / before[1]
            n = 1
            while dest.exists():  # never overwrite what was set aside before
                dest, n = root / CONTROL_DIR / "replaced" / f"{before[1]}.{n}", n + 1
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, dest)
            log(f"series {row['SeriesInstanceUID']} was revised ({before[1]} -> {row['crdc_series_uuid']}); "
                f"previous files moved to {dest}")
        replaced.append(f"{row['SeriesInstanceUID']} ({before[1]} -> {row['crdc_series_uuid']})")
    return replaced


def _quoted(text: str) -> str:
    """``text`` in double quotes as s5cmd's command-file parser reads it: that parser drops a
    backslash before a backslash, dollar sign, backtick or double quote, so those get one."""
    return '"' + re.sub(r'([\\$`"])', r"\\\1", text) + '"'


def _command(verb: str, url: str, dest: Path, flags: list[str]) -> str:
    extra = " --size-only" if verb == "sync" else ""
    return f'{verb}{extra} {" ".join(flags)} {_quoted(url)} {_quoted(f"{dest}/")}\n'


def _plan(manifest: pa.Table, root: Path, options: s5cmd.S5cmdOptions, commands) -> tuple[set[int], tuple[int, int, int, int]]:
    """One streaming pass: scan each series, remove temporary files a killed s5cmd left, and
    write a command for each incomplete series (``cp`` when empty, ``sync --size-only`` when
    partial). Returns the row numbers to fetch and (files, bytes, missing files, missing bytes)."""
    todo: set[int] = set()
    total_files = total_bytes = missing_files = missing_bytes = 0
    flags = options.copy_flags()
    for i, (row, disk, complete) in enumerate(series_status(manifest, root)):
        total_files += row["instanceCount"]
        total_bytes += row["series_bytes"]
        if complete:
            continue
        todo.add(i)
        missing_files += max(row["instanceCount"] - disk.files, 0)
        missing_bytes += max(row["series_bytes"] - disk.bytes, 0)
        dest = root / row["target_dir"]
        for name in disk.temp_files:  # left by a killed s5cmd: never complete files
            (dest / name).unlink(missing_ok=True)
        url = options.source_url(row["series_aws_url"], row["aws_bucket"])
        commands.write(_command("sync" if disk.files else "cp", url, dest, flags))
    return todo, (total_files, total_bytes, missing_files, missing_bytes)


def download(
    manifest: pa.Table,
    root: Path,
    options: s5cmd.S5cmdOptions,
    *,
    log: Log = print,
    progress_interval_s: float = 5.0,
    check_endpoint_first: bool = True,
    state_path: Path | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> DownloadResult:
    """Bring ``root`` in line with ``manifest``. Raises ``DownloadError`` (with ``.result``)
    when series are still incomplete afterwards; what completed stays on disk.

    ``state_path`` records which ``crdc_series_uuid`` each directory holds once verified; with
    it, a series revised by a new IDC release is set aside and fetched again, and series no
    longer in the manifest are reported (never deleted). ``on_progress`` is called with the
    ``Progress`` every ``progress_interval_s`` (the CLI draws its bar with it)."""
    started = time.monotonic()
    root = root.absolute()
    check_root(root)
    collections = sorted(set(manifest.column("collection_id").to_pylist()))
    with collection_locks(root, collections):
        return _download(manifest, root, options, started, log, progress_interval_s, check_endpoint_first,
                         state_path, on_progress)


@contextmanager
def collection_locks(root: Path, collections: list[str]) -> Iterator[None]:
    """Hold an exclusive lock per collection below ``root`` for the whole download, so two runs
    (UI and schedule, CLI and Dagster) never write one collection at once; the second fails."""
    folder = root / CONTROL_DIR / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        for collection_id in collections:
            handle = stack.enter_context(open(folder / f"{collection_id}.lock", "a+"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise DownloadError(
                    f"collection {collection_id} is being downloaded into {root} by {holder}; "
                    "wait for it to finish (or stop it) and run again"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
        yield


def _download(manifest, root, options, started, log, progress_interval_s, check_endpoint_first, state_path, on_progress):
    state = load_state(state_path)
    replaced = set_aside_revised(manifest, root, state, log) if state else []
    if replaced and state_path is not None:  # an interrupted run must not set the new files aside again
        forget_state(state_path, {d for d, _, _ in _revised(manifest, state)})
    removed: list[str] = []
    if state and is_whole_collection(manifest):  # a filtered selection leaves out series on purpose
        in_manifest = set(manifest.column("target_dir").to_pylist())
        removed = sorted(f"{s} ({d})" for d, (s, _) in state.items() if d not in in_manifest)
    if removed:
        log(f"{len(removed)} series downloaded before are no longer in the collection; kept on disk: "
            + "; ".join(removed[:10]))
    control = root / CONTROL_DIR
    control.mkdir(exist_ok=True)
    fd, command_path = tempfile.mkstemp(dir=control, prefix="run-", suffix=".s5cmd")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as commands:
            todo, totals = _plan(manifest, root, options, commands)
        total_files, total_bytes, missing_files, missing_bytes = totals
        result = DownloadResult(series=manifest.num_rows, files=total_files, bytes=total_bytes)
        result.skipped_series = manifest.num_rows - len(todo)
        result.replaced_series, result.removed_series = replaced, removed
        if not todo:
            log(f"all {manifest.num_rows:,} series already complete on disk ({human_bytes(total_bytes)}); "
                "nothing to transfer")
            if state_path is not None:
                save_state(state_path, manifest, set())
            result.duration_s = time.monotonic() - started
            return result
        label = ",".join(sorted(pc.unique(manifest.column("collection_id")).to_pylist()))
        with space_reservation(root, control / "reservations", missing_bytes, label) as reservation:
            if check_endpoint_first:
                check_endpoint(options.endpoint_url)
            progress = Progress(total_files=missing_files, total_bytes=missing_bytes)
            log(
                f"downloading {len(todo):,} of {manifest.num_rows:,} series ({missing_files:,} files, "
                f"{human_bytes(missing_bytes)}) from {options.endpoint_url} with {options.workers} workers; "
                f"{result.skipped_series:,} series already complete"
            )

            def tick() -> None:
                reservation.update(missing_bytes - progress.done_bytes)
                on_progress(progress) if on_progress else log("progress: " + progress.line())

            result.returncode = s5cmd.run(
                [*options.global_args(), "run", command_path],
                on_stdout=progress.on_stdout,
                on_stderr=progress.on_stderr,
                on_tick=tick,
                tick_s=progress_interval_s,
                grace_period_s=options.grace_period_s,
            )
    finally:
        os.unlink(command_path)
    log("transfer ended: " + progress.line() + f", s5cmd exit code {result.returncode}")

    result.transferred_files = progress.done_files
    result.transferred_bytes = progress.done_bytes
    result.errors = list(progress.errors)
    failed_dirs = set()
    for i, row in enumerate(_rows(manifest)):
        if i not in todo:
            continue
        disk = scan_series(root / row["target_dir"])
        if not (disk.files == row["instanceCount"] and disk.bytes == row["series_bytes"]):
            failed_dirs.add(row["target_dir"])
            result.failed_count += 1
            if len(result.failed_series) < MAX_LISTED_FAILURES:
                extra = (
                    f"; {disk.files - row['instanceCount']} more .dcm file(s) than the series has: "
                    f"move the ones not from {row['series_aws_url']} out of {row['target_dir']}"
                    if disk.files > row["instanceCount"] else ""
                )
                result.failed_series.append(
                    f"{row['SeriesInstanceUID']} ({disk.files}/{row['instanceCount']} files, "
                    f"{disk.bytes:,}/{row['series_bytes']:,} bytes{extra})"
                )
    if state_path is not None:
        save_state(state_path, manifest, failed_dirs)
    result.duration_s = time.monotonic() - started
    if result.failed_count:
        shown = "; ".join(result.failed_series[:10])
        more = f"; and {result.failed_count - 10} more" if result.failed_count > 10 else ""
        errors = " | ".join(result.errors[:3])
        error = DownloadError(
            f"{result.failed_count} of {result.series} series incomplete after the transfer "
            f"(s5cmd exit code {result.returncode}): {shown}{more}"
            + (f". s5cmd errors: {errors}" if errors else "")
            + ". Everything that completed is kept; run it again (materialize, or the same command) to fetch "
            "only what is missing."
        )
        error.result = result  # type: ignore[attr-defined]
        raise error
    return result
