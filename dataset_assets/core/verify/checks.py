"""Verifying a downloaded collection against its manifest.

Three checks, each streaming over the manifest (memory does not grow with the number of files):

* ``check_files``: every file of every series has its own recorded size (names and sizes from
  the listing or from s5cmd's report of each copy), and no other ``*.dcm`` file is there;
* ``check_headers``: every file's DICOM header (read without pixel data) carries the PatientID,
  StudyInstanceUID, SeriesInstanceUID and Modality of its manifest row; in worker processes
  (parsing is pure Python: threads would share one core), with an optional sample of
  ``sample_per_series`` files per series for very large collections;
* ``check_tree``: no stray or partial file anywhere in the collection's tree (a file outside
  the manifest's series directories, a non-``.dcm`` file, a temporary file left by a killed
  transfer).

Each returns a ``CheckReport`` naming up to ``MAX_LISTED`` culprits with counts.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import stat
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import pyarrow as pa

from dataset_assets.core.errors import VerifyError
from dataset_assets.core.transfer.control import CONTROL_DIR, DownloadRoot
from dataset_assets.core.transfer.disk import series_status
from dataset_assets.core.transfer.download import state_path_for
from dataset_assets.core.transfer.state import load_state
from dataset_assets.core.verify import dicom_headers
from dataset_assets.core.verify.dicom_headers import HEADER_FIELDS

MAX_LISTED = 20


@dataclass
class CheckReport:
    """Outcome of one check: what was looked at and what is wrong."""

    checked: int = 0
    problem_count: int = 0
    problems: list[str] = field(default_factory=list)
    culprit_series: set[str] = field(default_factory=set)
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.problem_count == 0

    def add(self, series_uid: str | None, problem: str) -> None:
        self.problem_count += 1
        if series_uid:
            self.culprit_series.add(series_uid)
        if len(self.problems) < MAX_LISTED:
            self.problems.append(problem)

    def summary(self, what: str) -> str:
        if self.passed:
            return f"{what}: all {self.checked:,} passed"
        more = f" (first {MAX_LISTED} listed)" if self.problem_count > MAX_LISTED else ""
        return (
            f"{what}: {self.problem_count:,} problem(s) in {len(self.culprit_series):,} series "
            f"of {self.checked:,} checked{more}: " + "; ".join(self.problems)
        )


def check_files(manifest: pa.Table, root: Path, state_path: Path | None = None) -> CheckReport:
    """Every file of every series has its own size as recorded when it was fetched or listed
    (the download state), and no other ``.dcm`` file is in the series' directory; a series
    without such a record is reported as unverified."""
    notes: list[str] = []
    state = state_path or state_path_for(root, manifest)
    records = load_state(state, notes.append, repair=False)
    report = CheckReport(notes={"state": notes[0]} if notes else {})
    for row, _disk, problem in series_status(manifest, root, records, strict=True, state_path=state):
        report.checked += 1
        if problem:
            report.add(row["SeriesInstanceUID"], problem)
    return report


def _series_batches(
    manifest: pa.Table, root: Path, sample_per_series: int, files_per_batch: int, cached: dict[str, int] | None = None
) -> Iterator[list[dicom_headers.Series]]:
    """Series grouped into batches of about ``files_per_batch`` files to read (``instanceCount``
    less the files ``cached`` per folder)."""
    batch: list[dicom_headers.Series] = []
    files = 0
    cached = cached or {}
    for rb in manifest.select(["target_dir", "instanceCount", *HEADER_FIELDS]).to_batches(10_000):
        for row in rb.to_pylist():
            expected = tuple(row[name] or "" for name in HEADER_FIELDS)
            folder = os.path.normpath(root / row["target_dir"])
            batch.append((folder, row["SeriesInstanceUID"], expected))
            count = row["instanceCount"] or 1
            count = min(count, sample_per_series) if sample_per_series else count
            files += max(count - cached.get(folder, 0), 0) + 1  # + 1: a directory to list
            if files >= files_per_batch:
                yield batch
                batch, files = [], 0
    if batch:
        yield batch


MAX_DEFAULT_PROCESSES = 8  # ~50 MB each; a container may see a whole node's CPUs


def default_processes() -> int:
    """The CPUs this process may run on, at most ``MAX_DEFAULT_PROCESSES``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_PROCESSES))


def header_cache_path(root: Path, manifest: pa.Table, state_path: Path | None = None) -> Path:
    """Where the header check remembers the files whose header matched (beside the state)."""
    state = state_path or state_path_for(root, manifest)
    return DownloadRoot.header_cache(state)


def check_headers(
    manifest: pa.Table,
    root: Path,
    *,
    sample_per_series: int = 0,
    processes: int = 0,
    files_per_batch: int = 1_000,
    cache_path: Path | None = None,
    reread: bool = False,
) -> CheckReport:
    """DICOM header UIDs and Modality of every (or a sample of every series') file.

    Header parsing is pure Python, so batches of series go to ``processes`` worker processes
    (0: one per CPU, at most 8), at most two batches per worker in flight (memory stays flat).
    When what is left to read fits in one batch it is read in this process: starting workers
    would cost more than it saves. With ``cache_path``, files whose header matched before (read
    by this check, or by the download as each file arrived) and whose size and mtime are
    unchanged are not read again (``reread`` reads everything). Workers are spawned, so a
    script that calls this needs ``if __name__ == "__main__":``, as any multiprocessing code does."""
    processes = processes or default_processes()
    report = CheckReport(notes={"sample_per_series": sample_per_series or "all files", "processes": processes})
    cache = dicom_headers.HeaderCache(cache_path, root) if cache_path is not None else None
    if cache is not None and not reread:
        cache.load()
    elif cache is not None:
        # A reread trusts nothing the old cache says, so it goes first: a reread that is stopped,
        # or whose cache cannot be written, must not leave it vouching for a file it failed.
        for stale in [cache_path, *cache.parts()]:  # the parts downloads added vouch for files too
            with contextlib.suppress(OSError):
                stale.unlink()
    by_folder: dict[str, dict] = {}
    if cache is not None:
        for (folder, name), value in cache.entries.items():
            by_folder.setdefault(folder, {})[(folder, name)] = value
    cached = {folder: len(entries) for folder, entries in by_folder.items()}

    def known(batch: list[dicom_headers.Series]) -> dict:
        merged: dict = {}
        for folder, _, _ in batch:
            merged.update(by_folder.get(folder, {}))
        return merged

    def merge(result: tuple) -> None:
        checked, count, listed, culprits, passed = result
        report.checked += checked
        report.problem_count += count
        report.problems.extend(listed[: MAX_LISTED - len(report.problems)])
        report.culprit_series.update(culprits)
        if cache is not None:
            for folder, name, size, mtime_ns in passed:
                report.notes["read"] = int(report.notes.get("read", 0)) + 1
                cache.add(folder, name, size, mtime_ns, keys[folder])

    keys: dict[str, str] = {}
    batches = _series_batches(manifest, root, sample_per_series, files_per_batch, cached)

    def remember(batch):
        for folder, _, expected in batch:
            keys[folder] = dicom_headers.header_key(expected)
        return batch

    first = next(batches, None)
    second = next(batches, None)
    if first is None:
        return report
    if second is None or processes == 1:
        for batch in chain(filter(None, (first, second)), batches):
            merge(dicom_headers.check_series(remember(batch), sample_per_series, MAX_LISTED, known(batch)))
        report.notes["processes"] = 1
    else:
        _check_in_workers(chain((first, second), batches), remember, known, merge, sample_per_series, processes)
    if cache is not None:
        report.notes.setdefault("read", 0)
        try:
            cache.save()
        except OSError as exc:  # only a cache: the next check reads more
            report.notes["cache_not_saved"] = str(exc.strerror or exc)
    return report


def _check_in_workers(batches, remember, known, merge, sample_per_series: int, processes: int) -> None:
    pool = ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),  # never fork a process that runs threads
        initializer=dicom_headers.die_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        pending: set[Future] = set()
        for batch in batches:
            pending.add(
                pool.submit(dicom_headers.check_series, remember(batch), sample_per_series, MAX_LISTED, known(batch))
            )
            if len(pending) >= 2 * processes:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    merge(future.result())
        for future in pending:
            merge(future.result())
    except BaseException as exc:  # interrupted or failed: stop the workers now, whatever they are reading
        for proc in list((pool._processes or {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(exc, BrokenProcessPool):
            raise VerifyError(
                f"a DICOM header worker process died ({exc}); killed for memory, or a script calling "
                "check_headers without `if __name__ == '__main__':`? processes=1 reads headers in this process"
            ) from exc
        raise
    pool.shutdown(wait=True)


def check_tree(manifest: pa.Table, root: Path) -> CheckReport:
    """No file in the collection's tree that the manifest does not account for. Series that
    downloads into ``root`` recorded as complete (their state files) are accounted for too: a
    filtered manifest, or a layout whose top directory several collections share, leaves
    other series there on purpose."""
    report = CheckReport()
    dirs = manifest.column("target_dir").to_pylist()
    expected = {os.path.normpath(root / d) for d in dirs}
    for state in DownloadRoot(root).states():
        try:
            unreadable: list[str] = []
            expected.update(os.path.normpath(root / d) for d in load_state(state, unreadable.append, repair=False))
            if unreadable:  # its series count as stray, as without it
                report.notes["unreadable_state_files"] = int(report.notes.get("unreadable_state_files", 0)) + 1
        except OSError:
            report.notes["unreadable_state_files"] = int(report.notes.get("unreadable_state_files", 0)) + 1
    tops = sorted({d.split("/", 1)[0] for d in dirs})
    for top in tops:
        for folder, subdirs, files in os.walk(root / top):
            subdirs[:] = [s for s in subdirs if s != CONTROL_DIR]
            inside_series = os.path.normpath(folder) in expected
            for name in files:
                report.checked += 1
                path = os.path.join(folder, name)
                if inside_series and name.endswith(".dcm"):
                    if stat.S_ISREG(os.lstat(path).st_mode):
                        continue
                    report.add(None, f"not a regular file: {path}")
                    continue
                kind = "partial (temporary) file" if inside_series and ".dcm" in name else "stray file"
                report.add(None, f"{kind}: {path}")
    report.notes["directories_walked"] = len(tops)
    return report
