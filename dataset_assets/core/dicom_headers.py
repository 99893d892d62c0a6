"""Comparing DICOM headers with manifest rows: the worker side of ``verify.check_headers``.

Parsing headers is pure Python, so threads share one core; ``verify`` runs ``check_series``
in worker processes instead. This module imports only pydicom, so a worker starts quickly.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import warnings

import pydicom

HEADER_FIELDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")

# One unit of work: (series directory, SeriesInstanceUID, expected values in HEADER_FIELDS order).
Series = tuple[str, str, tuple[str, ...]]


def file_problems(path: str, expected: tuple[str, ...]) -> list[str]:
    """What is wrong with one file's header (empty: nothing). A file pydicom cannot parse is a finding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every oddity of a damaged file
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_FIELDS))
            values = [str(ds.get(name, "<missing>")) for name in HEADER_FIELDS]
    except Exception as exc:  # noqa: BLE001 - any failure to parse is a finding about this file
        return [f"{path}: not a readable DICOM file ({exc.__class__.__name__}: {exc})"]
    return [
        f"{path}: {name} is {value!r}, manifest says {want!r}"
        for name, value, want in zip(HEADER_FIELDS, values, expected)
        if value != want
    ]


def check_series(batch: list[Series], sample_per_series: int, max_listed: int) -> tuple[int, int, list[str], list[str]]:
    """Read the ``*.dcm`` headers of each series directory in ``batch`` (the first
    ``sample_per_series`` by name when > 0). Returns (files checked, problem count, the first
    ``max_listed`` problems, UIDs of series with problems). A missing directory is skipped:
    missing files are the file-count check's business."""
    checked = count = 0
    listed: list[str] = []
    culprits: list[str] = []
    for folder, series_uid, expected in batch:
        try:
            names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".dcm"))
        except (FileNotFoundError, NotADirectoryError):
            continue
        if sample_per_series:
            names = names[:sample_per_series]
        bad = False
        for name in names:
            checked += 1
            for problem in file_problems(os.path.join(folder, name), expected):
                count += 1
                bad = True
                if len(listed) < max_listed:
                    listed.append(problem)
        if bad:
            culprits.append(series_uid)
    return checked, count, listed, culprits


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(parent: int) -> None:
    """Worker initializer: the kernel kills this worker when the process that started it dies
    (a killed Dagster step leaves no header readers behind)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)
