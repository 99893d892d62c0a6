"""Scale benchmark (issue 18): `dataset idc download` against raw s5cmd at 20,000 and 200,000 files.

    .venv/bin/python bench/scale_bench.py [--sizes 20000,200000] [--files-per-series 50] [--servers 2]

from the repository root. For each size it builds a synthetic collection (`nlst` rows of the
installed index as templates: N series x K files, fresh UIDs and crdc_series_uuids) with its own
pinned index folder (IDC_INDEX_DIR) and objects on a loopback S3 server (objects are hard links of
a pool of K real DICOM files written with pydicom, so the tree costs no disk), then measures, each
into a fresh destination under --work-root (/dev/shm):

1. raw s5cmd: one `s5cmd run` of the `cp` lines the engine writes (same flags, 64 workers);
2. `dataset idc download nlst DEST`, --downloads times (default 3): wall time and peak RSS of the
   Python process (medians: the peak varies by several MB from run to run) and of its s5cmd;
3. the same command again on the complete destination (requests counted by the server);
4. `--dry-run` (text) and `--dry-run --json`: time and peak RSS;
5. a download killed with SIGKILL when half the files have been served, then the resume: its
   listings and GETs, and the series the state had recorded before the kill.

The server runs in --servers processes sharing one port (SO_REUSEPORT), so that it is not what
limits the measurement. Growth per file is (peak RSS at the largest size - at the smallest) /
(files difference). Prints a table; writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from statistics import median
from urllib.parse import parse_qs, urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
BIN = Path(sys.executable).parent
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def serve(root: str, port: int) -> None:
    """Child mode: serve ``root`` on ``port`` (shared); 'stats'/'reset' on stdin; stop at EOF."""
    from dataset_assets_tests.support.s3server import LocalS3Server

    with LocalS3Server(Path(root), port=port, max_lifetime_s=4 * 3600, reuse_port=True) as srv:
        print(srv.endpoint_url, flush=True)
        for line in sys.stdin:
            if line.strip() == "reset":
                srv.reset_stats()
            if line.strip() == "prefixes":  # the prefixes listed since the last reset
                listed = {parse_qs(urlsplit(path).query).get("prefix", [""])[0] for _m, path, _r in srv.requests}
                print(json.dumps(sorted(p for p in listed if p)), flush=True)
                continue
            print(json.dumps(srv.stats), flush=True)


class Servers:
    """``n`` server processes on one loopback port; stats are summed over them."""

    def __init__(self, root: Path, n: int):
        from dataset_assets_tests.support.s3server import free_port

        port = free_port()
        self.procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--serve", str(root), "--port", str(port)],
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # clients killed on purpose make the server print resets
            )
            for _ in range(n)
        ]
        urls = {p.stdout.readline().strip() for p in self.procs}
        assert len(urls) == 1 and next(iter(urls)).startswith("http://127.0.0.1:"), urls
        self.endpoint_url = urls.pop()

    def prefixes(self) -> set[str]:
        found: set[str] = set()
        for p in self.procs:
            p.stdin.write("prefixes\n")
            p.stdin.flush()
            found.update(json.loads(p.stdout.readline()))
        return found

    def ask(self, cmd: str = "stats") -> dict:
        total: dict[str, int] = {}
        for p in self.procs:
            p.stdin.write(cmd + "\n")
            p.stdin.flush()
            for k, v in json.loads(p.stdout.readline()).items():
                total[k] = total.get(k, 0) + v
        return total

    def stop(self) -> None:
        for p in self.procs:
            p.stdin.close()
        for p in self.procs:
            p.wait(timeout=30)


def build(base: Path, n_series: int, k: int, pool: list[Path]) -> tuple[Path, Path, int, int]:
    """Index folder and S3 tree of ``n_series`` x ``k`` files; returns (index, s3 root, files, bytes)."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataset_assets.core.index.source import BUNDLED, IndexSource

    installed = IndexSource.installed()
    index_dir, s3_root = base / "index", base / "s3"
    shutil.rmtree(base, ignore_errors=True)
    index_dir.mkdir(parents=True)
    for name in BUNDLED:
        if name != "idc_index":
            shutil.copy(installed.path(name), index_dir / f"{name}.parquet")
    with duckdb.connect() as con:
        result = con.execute(
            f"SELECT * FROM read_parquet('{installed.path('idc_index')}') WHERE collection_id = 'nlst' "
            "ORDER BY SeriesInstanceUID LIMIT 1"
        )
        names = [d[0] for d in result.description]
        template = dict(zip(names, result.fetchone(), strict=True))
    sizes = [p.stat().st_size for p in pool]
    series_bytes = sum(sizes[:k])
    rows = []
    bucket_dir = s3_root / "idc-open-data"
    for i in range(n_series):
        row = dict(template)
        crdc = str(uuid.uuid4())
        row.update(
            SeriesInstanceUID=f"1.2.826.0.1.3680043.10.1234.{i}",
            StudyInstanceUID=f"1.2.826.0.1.3680043.10.5678.{i // 3}",
            PatientID=f"bench-{i // 6:06d}",
            crdc_series_uuid=crdc,
            aws_bucket="idc-open-data",
            series_aws_url=f"s3://idc-open-data/{crdc}/*",
            instanceCount=k,
            series_size_MB=series_bytes / 1e6,
        )
        rows.append(row)
        folder = bucket_dir / crdc
        folder.mkdir(parents=True)
        for j in range(k):
            os.link(pool[j], folder / f"{uuid.uuid4()}.dcm")
    schema = pq.read_schema(installed.path("idc_index"))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), index_dir / "idc_index.parquet")
    return index_dir, s3_root, n_series * k, n_series * series_bytes


def write_pool(folder: Path, k: int, pixels: int) -> list[Path]:
    from dataset_assets_tests.support.fixture import write_dicom

    folder.mkdir(parents=True, exist_ok=True)
    row = {"PatientID": "bench", "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4", "Modality": "CT"}
    pool = []
    for j in range(k):
        path = folder / f"{j}.dcm"
        write_dicom(path, row, j, pixels + 13 * j)
        pool.append(path)
    return pool


def measure(cmd: list[str], env: dict, *, kill_when=None) -> dict:
    """Run ``cmd``: wall time, peak RSS (MB) of the process and of its s5cmd; ``kill_when()`` polled."""
    from download_bench import RssSampler

    t = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    (sampler := RssSampler(proc.pid, tree=True, every=0.2)).start()
    killed = False
    if kill_when is not None:
        while proc.poll() is None:
            if kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.2)
    err = proc.communicate()[1]
    elapsed = time.monotonic() - t
    procs = sampler.stop()
    own = procs.get(proc.pid, {}).get("hwm_mb", 0.0)
    s5 = max((v["hwm_mb"] for p, v in procs.items() if p != proc.pid and "s5cmd" in v["cmd"]), default=0.0)
    return {"s": round(elapsed, 2), "rss_mb": round(own, 1), "s5cmd_rss_mb": round(s5, 1), "rc": proc.returncode,
            "killed": killed, "stderr_tail": err.strip().splitlines()[-2:]}  # fmt: skip


def raw(index_dir: Path, dest: Path, work: Path, endpoint: str, workers: int) -> dict:
    from dataset_assets.core.index.source import IndexSource
    from dataset_assets.core.select.manifest import build_manifest
    from dataset_assets.core.transfer import s5cmd

    opts = s5cmd.S5cmdOptions(endpoint_url=endpoint, workers=workers)
    with IndexSource(index_dir).connect() as con:
        manifest = build_manifest(con, "nlst")
    with open(cmd_file := work / "raw.s5cmd", "w", encoding="utf-8") as f:
        for row in manifest.select(["series_aws_url", "aws_bucket", "target_dir"]).to_pylist():
            url = opts.source_url(row["series_aws_url"], row["aws_bucket"])
            f.write(s5cmd.command_line("cp", url, f"{dest / row['target_dir']}/", opts.copy_flags()))
    out = measure([str(s5cmd.find_binary()), *opts.global_args(), "run", str(cmd_file)], s5cmd.s5cmd_env(os.environ))
    out["s5cmd_rss_mb"] = out["rss_mb"]
    return out


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def recorded_uuids(dest: Path) -> set[str]:
    """crdc_series_uuids the state of ``dest`` holds (snapshot and journal)."""
    from dataset_assets.core.transfer.state import load_state

    folder = dest / ".dataset_assets" / "state"
    states = set(folder.glob("*.parquet")) | {p.with_suffix("") for p in folder.glob("*.parquet.journal")}
    return {r.crdc_series_uuid for p in states for r in load_state(p, lambda _m: None, repair=False).values()}


def one_size(a, files: int, work: Path, pool: list[Path]) -> dict:
    n_series = files // a.files_per_series
    base = work / f"data-{files}"
    t = time.monotonic()
    index_dir, s3_root, n_files, n_bytes = build(base, n_series, a.files_per_series, pool)
    print(f"{n_files:,} files ({n_series:,} series, {n_bytes / 1e6:,.0f} MB) built in {time.monotonic() - t:.0f} s",
          flush=True)  # fmt: skip
    servers = Servers(s3_root, a.servers)
    out: dict = {"files": n_files, "series": n_series, "bytes": n_bytes}
    try:
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
        env.update(IDC_INDEX_DIR=str(index_dir), IDC_S3_ENDPOINT_URL=servers.endpoint_url, NO_PROXY="127.0.0.1")
        cli = [str(BIN / "dataset"), "idc", "download", "nlst"]
        workers = ["--workers", str(a.workers)]

        servers.ask("reset")
        out["raw"] = raw(index_dir, fresh(work / "raw"), work, servers.endpoint_url, a.workers)
        out["raw"]["server"] = servers.ask()
        shutil.rmtree(work / "raw", ignore_errors=True)
        print(f"  raw s5cmd: {out['raw']['s']} s, {out['raw']['rss_mb']} MB", flush=True)

        runs = []  # peak RSS varies by several MB from run to run (the heap's history): the median of N
        for _ in range(a.downloads):
            servers.ask("reset")
            run = measure([*cli, str(fresh(work / "cli")), *workers], env)
            run["server"] = servers.ask()
            runs.append(run)
            print(f"  dataset idc download: {run['s']} s, {run['rss_mb']} MB "
                  f"(s5cmd {run['s5cmd_rss_mb']} MB), rc {run['rc']}", flush=True)  # fmt: skip
        out["cli"] = {**runs[-1], "s": median([r["s"] for r in runs]), "rss_mb": median([r["rss_mb"] for r in runs]),
                      "runs": [{k: r[k] for k in ("s", "rss_mb", "rc")} for r in runs]}  # fmt: skip

        servers.ask("reset")
        out["rerun"] = measure([*cli, str(work / "cli"), *workers], env)
        out["rerun"]["server"] = servers.ask()
        shutil.rmtree(work / "cli", ignore_errors=True)
        print(f"  re-run: {out['rerun']['s']} s, requests {out['rerun']['server']}", flush=True)

        out["dry_run"] = measure([*cli, str(work / "dry"), "--dry-run"], env)
        out["dry_run_json"] = measure([*cli, str(work / "dry"), "--dry-run", "--json"], env)
        print(f"  dry-run: {out['dry_run']['s']} s, {out['dry_run']['rss_mb']} MB; --json "
              f"{out['dry_run_json']['s']} s, {out['dry_run_json']['rss_mb']} MB", flush=True)  # fmt: skip

        if not a.no_kill:
            servers.ask("reset")
            dest = fresh(work / "kill")
            half = n_files // 2
            out["killed"] = measure([*cli, str(dest), *workers], env,
                                    kill_when=lambda: servers.ask()["get_object"] >= half)  # fmt: skip
            out["killed"]["served_gets"] = servers.ask()["get_object"]
            recorded = recorded_uuids(dest)
            out["killed"]["recorded_series"] = len(recorded)
            servers.ask("reset")
            out["resume"] = measure([*cli, str(dest), *workers], env)
            out["resume"]["server"] = servers.ask()
            listed = {p.rstrip("/") for p in servers.prefixes()}
            out["resume"]["listed_series"] = len(listed)
            out["resume"]["listed_recorded_before"] = len(listed & recorded)
            shutil.rmtree(dest, ignore_errors=True)
            print(f"  SIGKILL at {out['killed']['served_gets']:,} GETs ({out['killed']['recorded_series']:,} series "
                  f"recorded); resume: {out['resume']['s']} s, {out['resume']['listed_series']:,} series listed "
                  f"(series with files but no record: s5cmd lists each prefix it copies whole too), of them "
                  f"{out['resume']['listed_recorded_before']} recorded before the kill, "
                  f"{out['resume']['server']['get_object']:,} GETs, rc {out['resume']['rc']}", flush=True)  # fmt: skip
    finally:
        servers.stop()
        shutil.rmtree(base, ignore_errors=True)
    return out


def report(results: list[dict]) -> None:
    print("\nfiles     | raw s5cmd s / MB | dataset s / MB / s5cmd MB | ratio | re-run s, requests | dry-run s/MB | "
          "--json s/MB | resume: recorded series listed again / GETs")  # fmt: skip
    for r in results:
        req = sum(v for k, v in r["rerun"]["server"].items() if k not in ("bytes_sent", "errors"))
        resume = r.get("resume")
        listed = (
            f"{resume['listed_recorded_before']} of {r['killed']['recorded_series']:,} / "
            f"{resume['server']['get_object']:,}"
            if resume
            else "-"
        )
        print(f"{r['files']:>9,} | {r['raw']['s']:>6} / {r['raw']['rss_mb']:>5} | {r['cli']['s']:>6} / "
              f"{r['cli']['rss_mb']:>6} / {r['cli']['s5cmd_rss_mb']:>6} | {r['cli']['s'] / r['raw']['s']:.3f} | "
              f"{r['rerun']['s']:>5}, {req} | {r['dry_run']['s']}/{r['dry_run']['rss_mb']} | "
              f"{r['dry_run_json']['s']}/{r['dry_run_json']['rss_mb']} | {listed}")  # fmt: skip
    if len(results) > 1:
        small, large = results[0], results[-1]
        growth = (large["cli"]["rss_mb"] - small["cli"]["rss_mb"]) * 2**20 / (large["files"] - small["files"])
        s5 = (large["raw"]["rss_mb"] - small["raw"]["rss_mb"]) * 2**20 / (large["files"] - small["files"])
        print(f"\nRSS growth per file, {small['files']:,} -> {large['files']:,} files: dataset idc download "
              f"{growth:.1f} bytes (target <= 50), raw s5cmd {s5:.1f} bytes")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--sizes", default="20000,200000", help="comma-separated numbers of files")
    p.add_argument("--files-per-series", type=int, default=50)
    p.add_argument("--pixels", type=int, default=1024, help="pixels per file (file size ~2x this + header)")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--work-root", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--no-kill", action="store_true", help="skip the SIGKILL-and-resume case")
    p.add_argument("--downloads", type=int, default=3, help="CLI downloads per size (medians of time and peak RSS)")
    a = p.parse_args()
    if a.serve:
        return serve(a.serve, a.port)
    work = Path(__import__("tempfile").mkdtemp(prefix="scale-bench-", dir=a.work_root))
    try:
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and k != "IDC_INDEX_DIR"}
        nlst = {  # the real index: nlst's 592,600 series and 21.5 M files, into a folder that does not exist
            mode: measure(
                [str(BIN / "dataset"), "idc", "download", "nlst", str(work / "nlst"), "--dry-run", *extra], env
            )  # fmt: skip
            for mode, extra in (("text", []), ("json", ["--json"]))
        }
        print(f"nlst dry-run: text {nlst['text']['s']} s, {nlst['text']['rss_mb']} MB; --json {nlst['json']['s']} s, "
              f"{nlst['json']['rss_mb']} MB (targets: under 1 GiB, text under 10 s)", flush=True)  # fmt: skip
        pool = write_pool(work / "pool", a.files_per_series, a.pixels)
        results = [one_size(a, int(n), work, pool) for n in a.sizes.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(results)
    results.append({"nlst_dry_run": nlst})
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "scale.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
