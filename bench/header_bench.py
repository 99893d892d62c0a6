"""Reading the four header fields the DICOM check compares, per file, on real headers: pydicom's
own CT, MR and JPEG 2000 test files copied N times (their headers are what real IDC files carry;
the loopback benches write minimal ones). The check's reader (``file_problems``: pydicom's
``read_partial`` stopping after SeriesInstanceUID) against ``dcmread`` with ``specific_tags``, as
the check read them before.

    .venv/bin/python bench/header_bench.py [--copies 500]
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _check(file_problems, path: str, expected: tuple[str, ...]) -> list[str]:
    return file_problems(path, expected)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=500)
    a = ap.parse_args()
    import pydicom
    from pydicom.data import get_testdata_file

    from dataset_assets.core.verify.dicom_headers import HEADER_FIELDS, file_problems

    def dcmread_specific(path: str) -> list[str]:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_FIELDS))
        return [str(ds.get(name, "<missing>")) for name in HEADER_FIELDS]

    print(f"{'file':<16} {'file B':>9} {'dcmread+specific_tags':>22} {'file_problems':>14} {'ratio':>6}")
    work = Path(tempfile.mkdtemp(prefix="header-bench-"))
    try:
        for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"):
            source = get_testdata_file(name)
            ds = pydicom.dcmread(source, stop_before_pixels=True)
            expected = tuple(str(ds.get(n, "<missing>")) for n in HEADER_FIELDS)
            files = []
            for i in range(a.copies):
                copy = work / f"{name}.{i}"
                shutil.copyfile(source, copy)
                files.append(str(copy))
            timings = {}
            check = functools.partial(_check, file_problems, expected=expected)
            for label, fn in (("old", dcmread_specific), ("new", check), ("old", dcmread_specific), ("new", check)):
                started = time.perf_counter()
                for path in files:
                    fn(path)
                ms = (time.perf_counter() - started) / len(files) * 1e3
                timings[label] = min(ms, timings.get(label, ms))
            assert all(not file_problems(p, expected) for p in files[:3])
            print(
                f"{name:<16} {Path(source).stat().st_size:>9,} {timings['old']:>19.3f} ms {timings['new']:>11.3f} ms "
                f"{timings['old'] / timings['new']:>5.1f}x"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
