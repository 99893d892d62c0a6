"""Verifying a downloaded collection against its manifest.

Three checks, each streaming over the manifest (memory does not grow with the number of files):

* ``check_files``: every series directory has exactly ``instanceCount`` ``*.dcm`` files and
  ``series_bytes`` bytes;
* ``check_headers``: every file's DICOM header (read without pixel data) carries the PatientID,
  StudyInstanceUID, SeriesInstanceUID and Modality of its manifest row; parallel, with an
  optional sample of ``sample_per_series`` files per series for very large collections;
* ``check_tree``: no stray or partial file anywhere in the collection's tree (a file outside
  the manifest's series directories, a non-``.dcm`` file, a temporary file left by a killed
  transfer).

Each returns a ``CheckReport`` naming up to ``MAX_LISTED`` culprits with counts.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pydicom

from .download import CONTROL_DIR, series_status

MAX_LISTED = 20
HEADER_FIELDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")


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


def check_files(manifest: pa.Table, root: Path) -> CheckReport:
    """File count and exact bytes of every series."""
    report = CheckReport()
    for row, disk, complete in series_status(manifest, root):
        report.checked += 1
        if not complete:
            report.add(
                row["SeriesInstanceUID"],
                f"series {row['SeriesInstanceUID']} in {row['target_dir']}: {disk.files}/{row['instanceCount']} "
                f"files, {disk.bytes:,}/{row['series_bytes']:,} bytes",
            )
    return report


def _header_problems(path: Path, expected: dict) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every oddity of a damaged file
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_FIELDS))
            values = {name: str(ds.get(name, "<missing>")) for name in HEADER_FIELDS}
    except Exception as exc:  # noqa: BLE001 - any failure to parse is a finding about this file
        return [f"{path}: not a readable DICOM file ({exc.__class__.__name__}: {exc})"]
    return [
        f"{path}: {name} is {values[name]!r}, manifest says {expected[name]!r}"
        for name in HEADER_FIELDS
        if values[name] != (expected[name] or "")
    ]


def _header_jobs(manifest: pa.Table, root: Path, sample_per_series: int) -> Iterator[tuple[Path, dict]]:
    columns = ["target_dir", *HEADER_FIELDS]
    for batch in manifest.select(columns).to_batches(10_000):
        for row in batch.to_pylist():
            try:
                names = sorted(e.name for e in os.scandir(root / row["target_dir"]) if e.name.endswith(".dcm"))
            except (FileNotFoundError, NotADirectoryError):
                continue  # missing series are check_files' business
            if sample_per_series:
                names = names[:sample_per_series]
            for name in names:
                yield root / row["target_dir"] / name, row


def check_headers(manifest: pa.Table, root: Path, *, sample_per_series: int = 0, workers: int = 8) -> CheckReport:
    """DICOM header UIDs and Modality of every (or a sample of every series') file."""
    report = CheckReport(notes={"sample_per_series": sample_per_series or "all files", "workers": workers})
    jobs = _header_jobs(manifest, root, sample_per_series)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while chunk := list(islice(jobs, 2_000)):  # bounded: never all files at once
            for (path, row), problems in zip(chunk, pool.map(lambda job: _header_problems(*job), chunk)):
                report.checked += 1
                for problem in problems:
                    report.add(row["SeriesInstanceUID"], problem)
    return report


def check_tree(manifest: pa.Table, root: Path) -> CheckReport:
    """No file in the collection's tree that the manifest does not account for."""
    report = CheckReport()
    dirs = manifest.column("target_dir").to_pylist()
    expected = {os.path.normpath(root / d) for d in dirs}
    tops = sorted({d.split("/", 1)[0] for d in dirs})
    for top in tops:
        for folder, subdirs, files in os.walk(root / top):
            subdirs[:] = [s for s in subdirs if s != CONTROL_DIR]
            inside_series = os.path.normpath(folder) in expected
            for name in files:
                report.checked += 1
                if inside_series and name.endswith(".dcm"):
                    continue
                kind = "partial (temporary) file" if inside_series and ".dcm" in name else "stray file"
                report.add(None, f"{kind}: {os.path.join(folder, name)}")
    report.notes["directories_walked"] = len(tops)
    return report
