"""Benchmark of manifest building (``dataset_assets.core.select.manifest.build_manifest``).

Run from the repository root:

    .venv/bin/python bench/manifest_bench.py

Each case runs in a fresh child process (this script re-invoked with ``--child CASE``), so the
peak RSS (``ru_maxrss`` of the child) belongs to that case alone. Cases: ``qin_pet_phantom``
(small reference), ``nlst`` (3 runs, median reported) and ``all`` (every collection of the
index in turn, one connection). "build" excludes interpreter start, imports and
``IndexSource.connect()``; "+connect" includes the connection. Results are printed and written
to ``bench/results/manifest.json``; the exit code is 0 even when a target is MISSED.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "manifest.json"
NLST_RUNS = 3
# case -> (max build seconds, max peak MiB or None)
TARGETS = {"nlst": (3.0, 1024.0), "all": (30.0, None)}


def child(case: str) -> None:
    import resource
    import time

    from dataset_assets.core.index.source import IndexSource, collection_ids
    from dataset_assets.core.select.manifest import build_manifest

    root_length = len(str(Path("data/idc").absolute()))
    t0 = time.perf_counter()
    con = IndexSource.installed().connect()
    t1 = time.perf_counter()
    ids = collection_ids(con) if case == "all" else [case]
    rows = 0
    for cid in ids:
        rows += build_manifest(con, cid, root_length=root_length).num_rows
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_mib = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    # The "all" timing includes the one collection_ids() query (a few ms).
    print(
        json.dumps(
            {
                "case": case,
                "collections": len(ids),
                "rows": rows,
                "build_s": t2 - t1,
                "with_connect_s": t2 - t0,
                "peak_rss_mib": peak_mib,
            }
        )
    )


def run_child(case: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if out.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import duckdb
    import idc_index_data
    import pyarrow

    results = {"qin_pet_phantom": run_child("qin_pet_phantom")}
    nlst_runs = [run_child("nlst") for _ in range(NLST_RUNS)]
    nlst = {k: statistics.median(r[k] for r in nlst_runs) for k in ("build_s", "with_connect_s", "peak_rss_mib")}
    results["nlst"] = {**nlst_runs[0], **nlst, "runs": nlst_runs}
    results["all"] = run_child("all")

    print(f"{'case':<20}{'colls':>6}{'rows':>10}{'build s':>9}{'+conn s':>9}{'peak MiB':>10}  target")
    missed = []
    for case, r in results.items():
        verdict = ""
        if case in TARGETS:
            max_s, max_mib = TARGETS[case]
            ok_s = r["build_s"] < max_s
            ok_m = max_mib is None or r["peak_rss_mib"] < max_mib
            want = f"< {max_s:g} s" + (f", < {max_mib / 1024:g} GiB" if max_mib else "")
            verdict = f"{want}: " + ("ok" if ok_s and ok_m else "MISSED")
            r["target"] = {"max_s": max_s, "max_peak_mib": max_mib, "met": ok_s and ok_m}
            if not (ok_s and ok_m):
                missed.append(case)
        label = case + (f" (median of {NLST_RUNS})" if case == "nlst" else "")
        print(
            f"{label:<20}{r['collections']:>6}{r['rows']:>10}{r['build_s']:>9.2f}{r['with_connect_s']:>9.2f}"
            f"{r['peak_rss_mib']:>10.0f}  {verdict}"
        )
    if "nlst" in results:
        print(
            "nlst runs (build s / peak MiB): "
            + ", ".join(f"{r['build_s']:.2f}/{r['peak_rss_mib']:.0f}" for r in nlst_runs)
        )
    print("MISSED: " + ", ".join(missed) if missed else "all targets met")

    machine = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "duckdb": duckdb.__version__,
        "pyarrow": pyarrow.__version__,
        "idc_index_data": idc_index_data.__version__,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "cases": results, "missed": missed}, indent=2) + "\n")
    print(f"machine: {machine}\nwrote {RESULTS}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main()
