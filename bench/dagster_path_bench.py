"""The paths users run, side by side on one loopback S3 server and one collection with files sized
as IDC's are (issue 10): raw s5cmd, `dataset idc download`, `dagster asset materialize` (index
already there; and from an empty DAGSTER_HOME with `idc_index`), the re-run on a complete
collection, and idc-index's `download_from_selection` when a venv with it is given.

    .venv/bin/python bench/dagster_path_bench.py [--collection qin_pet_phantom] [--repeats 3]
        [--idc-venv /tmp/idcidx]    # python3 -m venv /tmp/idcidx && /tmp/idcidx/bin/pip install idc-index

from the repository root. The fixture takes the collection's rows from the installed
idc-index-data and writes, per series, `instanceCount` DICOM files (pydicom; the row's UIDs and
Modality) whose sizes add up to the index's `series_size_MB` to the byte, under the real
`crdc_series_uuid` prefixes, so the real index drives every path. Each case downloads into a fresh
folder under --work-root (/dev/shm); cases of one repeat run in rotating order. Wall time and peak
RSS (the whole process tree) per case; medians; ratios with their targets:

* dagster (collection_manifest + downloaded_collection, checks included) <= 1.5 x the CLI;
* fresh home (idc_index + the two) <= 0.7 x idc-index (its index load included);
* our share of `--select idc_index` from an empty home <= 1.0 s beyond Dagster's floor measured
  the same way, and importing the definitions <= 0.5 s beyond importing Dagster (issue 21);
* re-run of a complete collection <= 0.3 x the first download by the same command, 0 GETs
  (measured with the same selection, and with `downloaded_collection` alone as issue 10's table);
* and Dagster's own floor beside every Dagster figure: the same command on an asset that does
  nothing (with a warm home, and with an empty one), interleaved with the cases.

`--busy N` keeps N CPU-bound processes running throughout: a slower host, where fixed costs weigh more.

Writes bench/results/dagster_path.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]
BIN = Path(sys.executable).parent

from download_bench import PROXY_VARS, RssSampler, Server, run_idc_index_runner  # noqa: E402


def dicom_bytes(row: dict, size: int) -> bytes:
    """A DICOM file of exactly ``size`` bytes (when it can hold its header) with the row's UIDs."""
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.128"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.StudyInstanceUID = row["PatientID"] or "", row["StudyInstanceUID"]
    ds.SeriesInstanceUID, ds.Modality = row["SeriesInstanceUID"], row["Modality"] or "OT"
    ds.PixelData = b""
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    header = len(buf.getvalue())
    room = size - header
    if room < 0:
        return os.urandom(size)
    ds.PixelData = b"\x5a" * (room - room % 2)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    data = buf.getvalue()
    return data + b"\0" * (size - len(data))  # an odd size: one byte after the pixel data


def build(work: Path, collection: str) -> tuple[Path, list[dict]]:
    """The S3 tree of ``collection`` under ``work/s3`` with sizes to the byte; returns it and the rows."""
    import duckdb

    from dataset_assets.core.index.source import IndexSource

    path = IndexSource.installed().path("idc_index")
    rows = (
        duckdb.sql(
            f"SELECT collection_id, PatientID, StudyInstanceUID, SeriesInstanceUID, Modality, aws_bucket, "
            f"crdc_series_uuid, instanceCount, CAST(round(series_size_MB * 1e6) AS BIGINT) AS bytes "
            f"FROM read_parquet('{path}') WHERE collection_id = ?",
            params=[collection],
        )
        .to_arrow_table()
        .to_pylist()
    )
    s3 = work / "s3"
    for row in rows:
        folder = s3 / row["aws_bucket"] / row["crdc_series_uuid"]
        folder.mkdir(parents=True)
        n, total = row["instanceCount"], row["bytes"]
        sizes = [total // n + (1 if i < total % n else 0) for i in range(n)]
        for size in sizes:
            (folder / f"{uuid.uuid4()}.dcm").write_bytes(dicom_bytes(row, size))
    return s3, rows


def timed_process(cmd: list[str], env: dict, cwd: Path, log: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS MB of the process tree, exit code)."""
    with open(log, "w") as out:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        sampler = RssSampler(proc.pid, tree=True, every=0.1)
        sampler.start()
        proc.wait(timeout=3600)
        elapsed = time.monotonic() - started
    procs = sampler.stop()
    # Peak of the tree: the processes alive at once are not known exactly; the sum of each
    # process's peak is an upper bound, the largest single one a lower bound. Report the sum.
    return elapsed, sum(p["hwm_mb"] for p in procs.values()), proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--collection", default="qin_pet_phantom")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--idc-venv", default="/tmp/idcidx")
    ap.add_argument("--work-root", default="/dev/shm")
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--no-ui", action="store_true", help="skip the runs launched through dagster dev's GraphQL API")
    ap.add_argument(
        "--busy", type=int, default=0, help="a slower host: keep this many CPU-bound processes running throughout"
    )
    a = ap.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) for _ in range(a.busy)]
    try:
        run(a)
    finally:
        for hog in hogs:
            hog.kill()


def run(a) -> None:
    for name in PROXY_VARS:
        os.environ.pop(name, None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    from dataset_assets.core.index.source import IndexSource
    from dataset_assets.core.select.manifest import build_manifest
    from dataset_assets.core.transfer import s5cmd

    work = Path(tempfile.mkdtemp(prefix="dagster-path-bench-", dir=a.work_root if os.path.isdir(a.work_root) else None))
    server = None
    results: dict[str, list[dict]] = {}
    notes: list[str] = []
    try:
        t = time.monotonic()
        s3_root, rows = build(work, a.collection)
        total = sum(r["bytes"] for r in rows)
        files = sum(r["instanceCount"] for r in rows)
        print(
            f"fixture: {a.collection}, {len(rows)} series, {files:,} files, {total / 1e6:.1f} MB "
            f"(built in {time.monotonic() - t:.1f} s)",
            flush=True,
        )
        server = Server(s3_root)
        endpoint = server.endpoint_url
        opts = s5cmd.S5cmdOptions(endpoint_url=endpoint, workers=a.workers)
        with IndexSource.installed().connect() as con:
            manifest = build_manifest(con, a.collection)
        base_env = {
            **os.environ,
            "IDC_S3_ENDPOINT_URL": endpoint,
            "DAGSTER_EXECUTOR": os.environ.get("DAGSTER_EXECUTOR", ""),
        }
        if not base_env["DAGSTER_EXECUTOR"]:
            base_env.pop("DAGSTER_EXECUTOR")
        warm_home = work / "home-warm"
        warm_home.mkdir()
        shutil.copy(REPO / "dagster.yaml", warm_home / "dagster.yaml")
        materialize = [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "dataset_assets.definitions",
            "--partition",
            a.collection,
            "--select",
        ]
        counter = iter(range(10_000))

        def record(case: str, seconds: float, rss: float, code: int, log: Path, **extra) -> None:
            if code != 0:
                raise SystemExit(f"{case} failed (exit {code}):\n{log.read_text()[-3000:]}")
            gets = server.ask("stats")["get_object"]
            results.setdefault(case, []).append({"seconds": seconds, "peak_rss_mb": rss, "gets": gets, **extra})
            print(f"  {case:<12} {seconds:7.2f} s  {rss:7.0f} MB  {gets:6,} GETs", flush=True)

        def raw() -> None:
            dest = work / f"raw{next(counter)}"
            cmds = work / "raw.s5cmd"
            with open(cmds, "w") as f:
                for row in manifest.select(["series_aws_url", "aws_bucket", "target_dir"]).to_pylist():
                    f.write(
                        s5cmd.command_line(
                            "cp",
                            opts.source_url(row["series_aws_url"], row["aws_bucket"]),
                            f"{dest / row['target_dir']}/",
                            opts.copy_flags(),
                        )
                    )
            server.ask("reset")
            seconds, rss, code = timed_process(
                [str(s5cmd.find_binary()), *opts.global_args(), "run", str(cmds)],
                s5cmd.s5cmd_env(os.environ),
                work,
                work / "raw.log",
            )
            record("raw_s5cmd", seconds, rss, code, work / "raw.log")
            shutil.rmtree(dest, ignore_errors=True)  # every copy sits in RAM (/dev/shm): one at a time

        def cli() -> None:
            dest = work / f"cli{next(counter)}"
            server.ask("reset")
            seconds, rss, code = timed_process(
                [str(BIN / "dataset"), "idc", "download", a.collection, str(dest)], base_env, work, work / "cli.log"
            )
            record("cli", seconds, rss, code, work / "cli.log")
            shutil.rmtree(dest, ignore_errors=True)

        def dagster() -> None:
            n = next(counter)
            env = {
                **base_env,
                "DAGSTER_HOME": str(warm_home),
                "IDC_DOWNLOAD_DIR": str(work / f"dg{n}"),
                "IDC_MANIFEST_DIR": str(work / "manifests"),
                "IDC_DUCKDB_PATH": str(work / "warm.duckdb"),
            }
            server.ask("reset")
            log = work / "dagster.log"
            seconds, rss, code = timed_process(
                [*materialize, "collection_manifest,downloaded_collection"], env, work, log
            )
            record("dagster", seconds, rss, code, log)
            server.ask("reset")  # the re-run: the same command on the complete collection
            seconds, rss, code = timed_process(
                [*materialize, "collection_manifest,downloaded_collection"], env, work, log
            )
            record("rerun", seconds, rss, code, log)
            server.ask("reset")  # the re-run as issue 10's table has it: the download asset alone
            seconds, rss, code = timed_process([*materialize, "downloaded_collection"], env, work, log)
            record("rerun_dl", seconds, rss, code, log)
            shutil.rmtree(work / f"dg{n}", ignore_errors=True)

        def floor() -> None:
            # Dagster's own fixed cost: the same command, instance and executor on an asset that
            # does nothing. No run of ours through `dagster asset materialize` can take less.
            log = work / "floor.log"
            server.ask("reset")
            seconds, rss, code = timed_process(
                [str(BIN / "dagster"), "asset", "materialize", "-f", str(noop), "--select", "noop"],
                {**base_env, "DAGSTER_HOME": str(warm_home)},
                work,
                log,
            )
            record("dagster_noop", seconds, rss, code, log)

        def fresh() -> None:
            n = next(counter)
            home = work / f"home{n}"
            home.mkdir()
            shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
            env = {
                **base_env,
                "DAGSTER_HOME": str(home),
                "IDC_DOWNLOAD_DIR": str(work / f"fresh{n}"),
                "IDC_MANIFEST_DIR": str(work / f"m{n}"),
                "IDC_DUCKDB_PATH": str(work / f"idc{n}.duckdb"),
            }
            server.ask("reset")
            log = work / "fresh.log"
            seconds, rss, code = timed_process(
                [*materialize, "idc_index,collection_manifest,downloaded_collection"], env, work, log
            )
            record("fresh_home", seconds, rss, code, log)
            shutil.rmtree(work / f"fresh{n}", ignore_errors=True)

        def fresh_index() -> None:
            # Issue 21: `--select idc_index` from an empty DAGSTER_HOME and database, beside the
            # floor measured the same way (an empty home too): the difference is our share.
            n = next(counter)
            home = work / f"ihome{n}"
            home.mkdir()
            shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
            env = {**base_env, "DAGSTER_HOME": str(home), "IDC_DUCKDB_PATH": str(work / f"i{n}" / "idc.duckdb")}
            log = work / "fresh_index.log"
            seconds, rss, code = timed_process(
                [str(BIN / "dagster"), "asset", "materialize", "-m", "dataset_assets.definitions", "--select",
                 "idc_index"], env, work, log,
            )  # fmt: skip
            record("index_fresh", seconds, rss, code, log)
            shutil.rmtree(work / f"i{n}", ignore_errors=True)
            # The same on a machine that never ran us: an empty user cache too (collection ids read
            # from the index, the release's totals and row checks counted).
            home = work / f"chome{n}"
            home.mkdir()
            shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
            env = {**env, "DAGSTER_HOME": str(home), "DATASET_CACHE_DIR": str(work / f"cache{n}"),
                   "IDC_DUCKDB_PATH": str(work / f"c{n}" / "idc.duckdb")}  # fmt: skip
            log = work / "cold_index.log"
            seconds, rss, code = timed_process(
                [str(BIN / "dagster"), "asset", "materialize", "-m", "dataset_assets.definitions", "--select",
                 "idc_index"], env, work, log,
            )  # fmt: skip
            record("index_cold", seconds, rss, code, log)
            shutil.rmtree(work / f"c{n}", ignore_errors=True)
            shutil.rmtree(work / f"cache{n}", ignore_errors=True)
            home = work / f"fhome{n}"
            home.mkdir()
            shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
            log = work / "floor_fresh.log"
            seconds, rss, code = timed_process(
                [str(BIN / "dagster"), "asset", "materialize", "-f", str(noop), "--select", "noop"],
                {**base_env, "DAGSTER_HOME": str(home)},
                work,
                log,
            )
            record("floor_fresh", seconds, rss, code, log)

        def imports() -> None:
            # Importing the definitions, beside importing Dagster alone: the difference is ours.
            for case, code in (
                ("import_dagster", "import dagster"),
                ("import_defs", "import dagster, dataset_assets.definitions"),
            ):
                log = work / f"{case}.log"
                seconds, rss, rc = timed_process([sys.executable, "-c", code], base_env, work, log)
                record(case, seconds, rss, rc, log)

        noop = work / "noop_defs.py"
        noop.write_text(
            "import dagster as dg\n\n\n@dg.asset\ndef noop():\n    return None\n\n\n"
            "defs = dg.Definitions(assets=[noop], executor=dg.in_process_executor)\n"
        )
        cases = [raw, cli, dagster, fresh, floor, fresh_index, imports]
        for repeat in range(a.repeats):
            print(f"repeat {repeat + 1}/{a.repeats}", flush=True)
            for case in cases[repeat % len(cases) :] + cases[: repeat % len(cases)]:
                case()
        idc = run_idc_index(a, work, endpoint, manifest, notes)
        if idc:
            results["idc_index"] = idc
        if not a.no_ui:
            results["ui_launch"] = run_ui(a, work, base_env, a.collection, a.repeats)
    finally:
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(results, notes)


LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
  }
}
"""
STATUS = """
query Status($id: ID!) { runOrError(runId: $id) { ... on Run { status startTime endTime } } }
"""
REPOS = """
query { repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }
"""


def run_ui(a, work: Path, base_env: dict, collection: str, repeats: int) -> list[dict]:
    """Runs launched as the UI launches them (GraphQL launchRun on `dagster dev`), each into a fresh
    folder: seconds from the launch request to the run's success, and the run's own duration."""
    from dataset_assets_tests.support.webserver import DagsterDev, dagster_home

    home = dagster_home(work / "home-ui")
    env = {
        **base_env,
        "DAGSTER_HOME": str(home),
        "IDC_MANIFEST_DIR": str(work / "m-ui"),
        "IDC_DUCKDB_PATH": str(work / "ui.duckdb"),
        "IDC_DOWNLOAD_DIR": str(work / "ui-0"),
    }
    out = []
    with DagsterDev(env, work, ready_asset="collection_manifest") as dev:
        repo = dev.graphql(REPOS)["repositoriesOrError"]["nodes"][0]
        for n in range(repeats):
            # A fresh folder per run: the run worker reads IDC_DOWNLOAD_DIR through the resource,
            # so each run gets it as resource config.
            config = {"resources": {"idc": {"config": {"download_dir": str(work / f"ui-{n}")}}}}
            params = {
                "selector": {
                    "repositoryLocationName": repo["location"]["name"],
                    "repositoryName": repo["name"],
                    "jobName": "__ASSET_JOB",
                    "assetSelection": [{"path": ["collection_manifest"]}, {"path": ["downloaded_collection"]}],
                    "assetCheckSelection": None,
                },
                "runConfigData": config,
                "executionMetadata": {"tags": [{"key": "dagster/partition", "value": collection}]},
            }
            started = time.monotonic()
            launched = dev.graphql(LAUNCH, {"params": params})["launchRun"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            run_id = launched["run"]["runId"]
            while True:
                status = dev.graphql(STATUS, {"id": run_id})["runOrError"]
                if status["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
                    break
                time.sleep(0.1)
            wall = time.monotonic() - started
            assert status["status"] == "SUCCESS", (status, dev.log_tail())
            run_s = status["endTime"] - status["startTime"]
            out.append({"seconds": wall, "run_seconds": run_s})
            shutil.rmtree(work / f"ui-{n}", ignore_errors=True)
            print(f"  {'ui_launch':<12} {wall:7.2f} s  (the run itself: {run_s:.2f} s)", flush=True)
    return out


def run_idc_index(a, work: Path, endpoint: str, manifest, notes: list[str]) -> list[dict] | None:
    """idc-index's IDCClient(): its index load, then download_from_selection of the collection's series."""
    from dataset_assets.core.index.source import IndexSource

    py = Path(a.idc_venv) / "bin" / "python"
    if not py.is_file():
        notes.append(
            f"idc-index skipped: no {py} (python3 -m venv {a.idc_venv} && {a.idc_venv}/bin/pip install idc-index)"
        )
        return None
    index = IndexSource.installed().path("idc_index")
    series = manifest.column("SeriesInstanceUID").to_pylist()
    out = []
    for n in range(a.repeats):
        started = time.monotonic()
        done, result = run_idc_index_runner(py, work, endpoint, index, [str(work / f"idc{n}")], series, a.workers, 3600)
        wall = time.monotonic() - started
        shutil.rmtree(work / f"idc{n}", ignore_errors=True)
        if result is None:
            notes.append(f"idc-index failed (exit {done.returncode}): {done.stderr[-1500:]}")
            return None
        out.append({"seconds": wall, "init_s": result["init_s"], "download_s": result["times"][0]})
        print(
            f"  {'idc_index':<12} {wall:7.2f} s  (index load {result['init_s']:.1f} s, "
            f"download {result['times'][0]:.1f} s)",
            flush=True,
        )
    return out


def report(results: dict[str, list[dict]], notes: list[str]) -> None:
    med = {case: statistics.median(r["seconds"] for r in runs) for case, runs in results.items()}
    rss = {case: statistics.median(r.get("peak_rss_mb", 0) for r in runs) for case, runs in results.items()}
    print("\ncase          median s   peak RSS MB (tree)")
    for case in med:
        print(f"{case:<12} {med[case]:9.2f}   {rss[case]:8.0f}")
    ratios = []
    if "dagster" in med and "cli" in med:
        ratios.append(("dagster / cli", med["dagster"] / med["cli"], 1.5))
    if "fresh_home" in med and "idc_index" in med:
        ratios.append(("fresh home / idc-index", med["fresh_home"] / med["idc_index"], 0.7))
    if "rerun" in med and "dagster" in med:
        ratios.append(("re-run / first (same selection)", med["rerun"] / med["dagster"], 0.3))
    if "rerun_dl" in med and "dagster" in med:
        ratios.append(("re-run downloaded_collection / first", med["rerun_dl"] / med["dagster"], 0.3))
    if "dagster_noop" in med and "dagster" in med and "cli" in med:
        # What the targets leave for our own work once Dagster's fixed cost is paid.
        ratios.append(("Dagster no-op run / CLI download", med["dagster_noop"] / med["cli"], None))
        ratios.append(("Dagster no-op run / first download", med["dagster_noop"] / med["dagster"], None))
    if "ui_launch" in med and "dagster" in med:
        ratios.append(("UI launch / dagster CLI", med["ui_launch"] / med["dagster"], None))
    if "cli" in med and "raw_s5cmd" in med:
        ratios.append(("cli / raw s5cmd", med["cli"] / med["raw_s5cmd"], None))
    # Dagster's floor beside every Dagster figure: what is left is ours, on any host.
    floors = {"dagster": "dagster_noop", "rerun": "dagster_noop", "rerun_dl": "dagster_noop",
              "fresh_home": "floor_fresh", "index_fresh": "floor_fresh", "index_cold": "floor_fresh",
              "import_defs": "import_dagster"}  # fmt: skip
    targets = {"index_fresh": 1.0, "import_defs": 0.5}
    print("\nDagster figure         median s   Dagster's floor s   ours s   target")
    for case, floor_case in floors.items():
        if case in med and floor_case in med:
            ours = med[case] - med[floor_case]
            target = targets.get(case)
            verdict = "" if target is None else f"<= {target}" + (" ok" if ours <= target else " MISSED")
            print(f"{case:<22} {med[case]:9.2f}   {med[floor_case]:9.2f} ({floor_case})   {ours:6.2f}   {verdict}")
    print()
    for name, value, target in ratios:
        verdict = "" if target is None else (" ok" if value <= target else " MISSED")
        print(f"{name:<32} {value:5.2f}" + (f"  (target <= {target}){verdict}" if target else ""))
    gets = [r["gets"] for r in results.get("rerun", []) + results.get("rerun_dl", [])]
    print(f"re-run GETs: {gets}")
    for note in notes:
        print("note:", note)
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "dagster_path.json").write_text(
        json.dumps(
            {"runs": results, "medians_s": med, "ratios": {n: v for n, v, _ in ratios}, "notes": notes}, indent=2
        )
    )


if __name__ == "__main__":
    main()
