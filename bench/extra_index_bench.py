"""On-demand index at real scale: fetch and load a synthetic `sm_instance_index` of --rows rows
(the shipped schema, SeriesInstanceUIDs of real SM series) from a loopback HTTP server with
`dataset idc fetch`, then a cohort query joining it with `idc_index` with `dataset idc query`.
Wall time and peak RSS of each command (as users run them).

    .venv/bin/python bench/extra_index_bench.py [--rows 1000000]

Writes bench/results/extra_index.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent


def build(rows: int, path: Path) -> None:
    import duckdb

    from dataset_assets.core.index import extra_index as extra
    from dataset_assets.core.index.source import IndexSource

    columns = []
    for c in extra.schema("sm_instance_index"):
        kind = {"STRING": "VARCHAR", "INTEGER": "BIGINT", "FLOAT": "DOUBLE"}.get(c["type"], "VARCHAR")
        if c["name"] == "SeriesInstanceUID":
            expr = "s.SeriesInstanceUID"
        elif c["name"] in ("SOPInstanceUID", "crdc_instance_uuid"):
            expr = "'1.2.3.' || i::VARCHAR" if c["name"] == "SOPInstanceUID" else "uuid()::VARCHAR"
        elif kind == "VARCHAR":
            expr = f"'{c['name']}-' || (i % 97)::VARCHAR"
        else:
            expr = f"CAST(i % 100000 AS {kind})"
        if c.get("mode") == "REPEATED":
            expr = f"[{expr}]"
        columns.append(f"{expr} AS {c['name']}")
    index = IndexSource.installed().path("idc_index")
    duckdb.sql(
        f"""COPY (
            WITH s AS (SELECT SeriesInstanceUID, row_number() OVER () - 1 AS k FROM read_parquet('{index}')
                       WHERE Modality = 'SM'),
                 n AS (SELECT count(*) AS c FROM s)
            SELECT {", ".join(columns)}
            FROM range({rows}) t(i), n JOIN s ON s.k = i % n.c
        ) TO '{path}' (FORMAT parquet)"""
    )


def timed(cmd: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    started = time.monotonic()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, timeout=3600)
    wall = time.monotonic() - started
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return wall, int(peak.group(1)) / 1024 if peak else float("nan"), done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    a = ap.parse_args()
    from dataset_assets.core.index import extra_index as extra
    from dataset_assets_tests.support.httpserver import FileServer

    work = Path(tempfile.mkdtemp(prefix="extra-index-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    source = work / "sm_instance_index.parquet"
    t = time.monotonic()
    build(a.rows, source)
    print(f"built {a.rows:,} rows, {source.stat().st_size / 1e6:.1f} MB in {time.monotonic() - t:.1f} s", flush=True)
    results = {}
    with FileServer(max_lifetime_s=3600) as server:
        server.files[f"/{extra.package_version()}/sm_instance_index.parquet"] = source.read_bytes()
        env = {
            **os.environ,
            "IDC_INDEX_BASE_URL": server.url(""),
            "IDC_EXTRA_INDEX_DIR": str(work / "indices"),
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
        }
        env.pop("IDC_INDEX_DIR", None)
        wall, rss, done = timed([str(BIN / "dataset"), "idc", "fetch", "sm_instance_index"], env)
        assert done.returncode == 0, done.stderr[-2000:]
        results["fetch"] = {"seconds": wall, "peak_rss_mb": rss}
        sql = (
            "SELECT i.collection_id, count(DISTINCT i.SeriesInstanceUID) AS series, count(*) AS instances, "
            "max(s.TotalPixelMatrixColumns) AS widest FROM idc_index i JOIN sm_instance_index s "
            "USING (SeriesInstanceUID) WHERE s.TotalPixelMatrixColumns > 25000 GROUP BY 1 ORDER BY 3 DESC"
        )
        wall, rss, done = timed([str(BIN / "dataset"), "idc", "query", sql, "--format", "json"], env)
        assert done.returncode == 0, done.stderr[-2000:]
        results["cohort_query"] = {"seconds": wall, "peak_rss_mb": rss, "groups": len(json.loads(done.stdout))}
    for name, r in results.items():
        print(f"{name:<14} {r['seconds']:6.2f} s  {r['peak_rss_mb']:7.0f} MB peak RSS")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "extra_index.json").write_text(json.dumps({"rows": a.rows, **results}, indent=2))
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
