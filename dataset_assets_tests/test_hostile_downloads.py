"""Hostile input and faults against series downloads: each test is one way an earlier version
broke its promise (a collection on disk that is verified, resumable and never damaged), or one a
hostile review found. Everything is real: the s5cmd binary, the loopback S3 server, DICOM files
written with pydicom, the `dataset` CLI and `dagster asset materialize` as subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataset_assets.core.errors import (
    BadDestinationError,
    DownloadError,
    IncompleteDownloadError,
    LayoutError,
    TransferStoppedError,
    UnsafeValueError,
)
from dataset_assets.core.index.source import IndexSource
from dataset_assets.core.select.manifest import build_manifest
from dataset_assets.core.transfer.control import CONTROL_DIR
from dataset_assets.core.transfer.download import EngineOptions, download, state_path_for
from dataset_assets.core.transfer.s5cmd import S5cmdOptions
from dataset_assets.core.transfer.state import load_state
from dataset_assets.core.verify import checks as verify
from dataset_assets_tests.support.envs import materialize_cmd, project_env
from dataset_assets_tests.support.procs import cli_download_in_flight, processes_mentioning, processes_with_env

BIN = os.path.dirname(sys.executable)
DATASET = os.path.join(BIN, "dataset")


def opts(server, **kw):
    return S5cmdOptions(endpoint_url=server.endpoint_url, retry_count=kw.pop("retry_count", 1), **kw)


def quiet(_line: str) -> None:
    pass


def cli(*args, env, timeout=120, **kw):
    full = {**os.environ, **env}
    full.pop("DISPLAY", None)
    return subprocess.run([DATASET, "idc", *args], capture_output=True, text=True, env=full, timeout=timeout, **kw)


def one_line(proc, code: int, *texts: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    for text in texts:
        assert text in errors[0], errors[0]


@pytest.fixture
def env(idc_fixture, s3):
    return {"IDC_INDEX_DIR": str(idc_fixture.index_dir), "IDC_S3_ENDPOINT_URL": s3.endpoint_url}


def index_with(idc_fixture, tmp_path: Path, change) -> Path:
    """A copy of the fixture index whose rows went through ``change(rows)`` (hostile values)."""
    folder = tmp_path / "hostile-index"
    shutil.copytree(idc_fixture.index_dir, folder)
    table = pq.read_table(folder / "idc_index.parquet")
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), folder / "idc_index.parquet")
    return folder


def manifest_of(index_dir: Path, collection_id: str = "qin_pet_phantom", **kw) -> pa.Table:
    with IndexSource(index_dir).connect() as con:
        return build_manifest(con, collection_id, **kw)


def every_file(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# -- State and verification -------------------------------------------------------------------


def test_a_run_where_every_request_fails_does_not_poison_later_runs(s3, manifest, tmp_path, env):
    root = tmp_path / "dl"
    s3.faults.fail_keys(lambda key: True, status=503)
    with pytest.raises(IncompleteDownloadError):
        download(manifest, root, opts(s3, retry_count=0), EngineOptions(log=quiet))
    assert load_state(state_path_for(root, manifest)) == {}  # an empty state, readable
    proc = cli("download", "qin_pet_phantom", str(root), "--retries", "0", env=env)
    one_line(proc, 1, "6 of 6 series incomplete")
    s3.faults.clear()
    assert download(manifest, root, opts(s3), EngineOptions(log=quiet)).complete_series == 6  # the core, healthy
    proc = cli("download", "qin_pet_phantom", str(root), env=env)
    assert proc.returncode == 0 and "complete: 6 series" in proc.stdout, proc.stderr


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "directory", "other-schema"])
def test_an_unreadable_state_file_is_set_aside_and_rebuilt_from_the_disk(s3, manifest, tmp_path, damage):
    root = tmp_path / "dl"
    download(manifest, root, opts(s3), EngineOptions(log=quiet))
    state = state_path_for(root, manifest)
    good = state.read_bytes()
    if damage == "empty":
        state.write_bytes(b"")
    elif damage == "truncated":
        state.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        state.write_bytes(os.urandom(3000))
    elif damage == "directory":
        state.unlink()
        state.mkdir()
        (state / "x").write_text("x")
    else:
        pq.write_table(pa.table({"a": [1, 2]}), state)
    leftover = state.with_name(f".{state.name}.999999.tmp")  # a writer killed mid-write
    leftover.write_bytes(b"half")
    s3.reset_stats()
    lines: list[str] = []
    result = download(manifest, root, opts(s3), EngineOptions(log=lines.append))
    assert result.complete_series == 6 and result.listed_series == 6
    assert s3.stats["get_object"] == 0  # the disk was complete: one listing per series, no GET
    assert sum("set aside" in line for line in lines) == 1, lines
    assert len(list(state.parent.glob(f"{state.name}.unreadable-*"))) == 1
    assert not leftover.exists()
    records = load_state(state)
    assert len(records) == 6 and all(r.count == 4 for r in records.values())
    s3.reset_stats()
    download(manifest, root, opts(s3), EngineOptions(log=quiet))  # rebuilt: no request at all now
    assert s3.stats["get_object"] == 0 and s3.stats["list"] == 0


def _shift_bytes(series_dir: Path, delta: int) -> tuple[Path, Path]:
    """One file ``delta`` bytes short and another ``delta`` bytes long: the series total unchanged."""
    short, long = sorted(series_dir.glob("*.dcm"))[:2]
    short.write_bytes(short.read_bytes()[:-delta])
    long.write_bytes(long.read_bytes() + b"\0" * delta)
    return short, long


@pytest.mark.parametrize("with_state", [True, False])
def test_per_file_sizes_are_checked_and_wrong_files_fetched_again(s3, manifest, tmp_path, with_state):
    root = tmp_path / "dl"
    download(manifest, root, opts(s3), EngineOptions(log=quiet))
    row = manifest.to_pylist()[2]
    if not with_state:  # data from before the state existed: one listing per series proves it
        state_path_for(root, manifest).unlink()
    short, long = _shift_bytes(root / row["target_dir"], 50)
    assert sum(p.stat().st_size for p in (root / row["target_dir"]).glob("*.dcm")) == row["series_bytes"]
    if with_state:
        report = verify.check_files(manifest, root)
        assert not report.passed and report.culprit_series == {row["SeriesInstanceUID"]}
        assert "2 file(s) of the wrong size" in report.problems[0]
    s3.reset_stats()
    result = download(manifest, root, opts(s3), EngineOptions(log=quiet))
    assert result.complete_series == 6 and s3.stats["get_object"] == 2
    source = s3.root / row["aws_bucket"] / row["crdc_series_uuid"]
    for path in (short, long):
        assert path.read_bytes() == (source / path.name).read_bytes()
    assert verify.check_files(manifest, root).passed


def test_the_files_check_of_the_asset_fails_on_two_compensating_files(idc_fixture, s3, tmp_path):
    import dagster as dg

    from dataset_assets.defs.downloads.checks import download_checks
    from dataset_assets.defs.downloads.download_assets import downloaded_collection
    from dataset_assets.defs.downloads.jobs import verify_downloads_job
    from dataset_assets.defs.downloads.manifest_assets import collection_manifest
    from dataset_assets.lib.resources import IdcResource, S5cmdResource

    resources = {
        "idc": IdcResource(
            index_dir=str(idc_fixture.index_dir), manifest_dir=str(tmp_path / "m"), download_dir=str(tmp_path / "idc")
        ),
        "s5cmd": S5cmdResource(endpoint_url=s3.endpoint_url, retry_count=1),
    }
    assets = [collection_manifest, downloaded_collection, *download_checks]
    assert dg.materialize(assets, partition_key="qin_pet_phantom", resources=resources).success
    row = manifest_of(idc_fixture.index_dir).to_pylist()[0]
    _shift_bytes(tmp_path / "idc" / row["target_dir"], 50)
    defs = dg.Definitions(
        assets=[downloaded_collection], asset_checks=download_checks, jobs=[verify_downloads_job], resources=resources
    )
    result = defs.resolve_job_def("verify_downloads").execute_in_process(
        tags={"dagster/partition": "qin_pet_phantom"}, raise_on_error=False, instance=dg.DagsterInstance.ephemeral()
    )
    files = {e.check_name: e for e in result.get_asset_check_evaluations()}["files_match_manifest"]
    assert not files.passed and "2 file(s) of the wrong size" in files.description


# -- Layout and paths -------------------------------------------------------------------------


def test_the_layout_does_not_depend_on_the_length_of_the_download_root(idc_fixture, s3, tmp_path, env):
    long_root = tmp_path / ("d" * 93) / ("e" * 60)
    short = tmp_path / "s"
    long_root.mkdir(parents=True)
    short.symlink_to(long_root)
    assert manifest_of(idc_fixture.index_dir, root_length=len(str(long_root))).equals(
        manifest_of(idc_fixture.index_dir)
    )
    first = cli("download", "qin_pet_phantom", str(long_root), env=env)
    assert first.returncode == 0, first.stderr
    assert not [p for p in long_root.rglob("_long")]
    s3.reset_stats()
    again = cli("download", "qin_pet_phantom", str(short), env=env)
    assert again.returncode == 0, again.stderr
    assert s3.stats["get_object"] == 0 and "no longer in the collection" not in again.stderr
    assert len(list(long_root.rglob("*.dcm"))) == 24
    with pytest.raises(LayoutError, match="longer than 260 characters"):  # asked for: checked, not re-laid out
        manifest_of(idc_fixture.index_dir, root_length=len(str(long_root)), max_path=260)
    over = cli("download", "qin_pet_phantom", str(long_root), "--max-path", "260", env=env)
    one_line(over, 2, "longer than 260 characters")


def test_a_component_over_255_bytes_is_hashed_the_same_under_any_root(idc_fixture, tmp_path):
    layout = "%collection_id/" + "x" * 250 + "%SeriesInstanceUID/"
    a = manifest_of(idc_fixture.index_dir, layout=layout)
    b = manifest_of(idc_fixture.index_dir, layout=layout, root_length=180)
    assert a.column("target_dir").equals(b.column("target_dir"))
    assert all("/_long/" in d for d in a.column("target_dir").to_pylist())


def test_a_collection_id_that_leaves_the_root_is_refused_naming_it(idc_fixture, s3, tmp_path):
    evil = "../../../../x"

    def change(rows):
        for row in rows:
            row["collection_id"] = evil

    index = index_with(idc_fixture, tmp_path, change)
    root = tmp_path / "a" / "b" / "c" / "dl"
    outside = tmp_path / "x.lock"
    outside.write_text("precious")
    before = every_file(tmp_path / "hostile-index")
    proc = cli("download", evil, str(root), env={"IDC_INDEX_DIR": str(index), "IDC_S3_ENDPOINT_URL": s3.endpoint_url})
    one_line(proc, 2, "collection_id '../../../../x' cannot be used as a file name")
    assert outside.read_text() == "precious" and not (tmp_path / "x").exists()
    assert every_file(tmp_path / "hostile-index") == before
    assert s3.stats["get_object"] == 0
    from dataset_assets.lib.resources import IdcResource

    with pytest.raises(UnsafeValueError):
        IdcResource(manifest_dir=str(tmp_path / "m")).manifest_path(evil)


def test_a_crdc_series_uuid_that_leaves_the_root_never_moves_files(idc_fixture, s3, tmp_path):
    evil = "../../../../adv/moved_here"
    good_manifest = manifest_of(idc_fixture.index_dir)
    root = tmp_path / "q" / "r" / "s" / "dl"

    def change(rows):
        rows[1]["crdc_series_uuid"] = evil  # the URL still points at real objects

    hostile = manifest_of(index_with(idc_fixture, tmp_path, change))
    with pytest.raises(
        IncompleteDownloadError, match=r"crdc_series_uuid '\.\./\.\./\.\./\.\./adv/moved_here' is not a UUID"
    ):
        download(hostile, root, opts(s3), EngineOptions(log=quiet))
    assert len(list(root.rglob("*.dcm"))) == 20  # the other five series are complete
    download(good_manifest, root, opts(s3), EngineOptions(log=quiet))
    # A state file edited by hand to hold the same value: ignored, never a destination.
    state = state_path_for(root, good_manifest)
    table = pq.read_table(state)
    uuids = table.column("crdc_series_uuid").to_pylist()
    uuids[1] = evil
    pq.write_table(table.set_column(2, "crdc_series_uuid", pa.array(uuids)), state)
    result = download(good_manifest, root, opts(s3), EngineOptions(log=quiet))
    assert result.replaced_series == [] and result.complete_series == 6
    assert not (tmp_path / "adv").exists() and not (tmp_path / "q" / "adv").exists()
    assert len(list(root.rglob("*.dcm"))) == 24


def test_a_line_break_in_a_url_fails_that_series_and_the_others_download(idc_fixture, s3, tmp_path):
    def change(rows):
        url = rows[0]["series_aws_url"]
        rows[0]["series_aws_url"] = f"{url}\ncp s3://idc-open-data/x/* {tmp_path}/injected/"

    manifest = manifest_of(index_with(idc_fixture, tmp_path, change))
    bad_uid = manifest.to_pylist()[0]["SeriesInstanceUID"]
    root = tmp_path / "dl"
    with pytest.raises(IncompleteDownloadError) as raised:
        download(manifest, root, opts(s3), EngineOptions(log=quiet))
    message = str(raised.value)
    assert message.startswith("1 of 6 series incomplete") and bad_uid in message and "series_aws_url" in message
    assert raised.value.result.complete_series == 5
    assert len(list(root.rglob("*.dcm"))) == 20 and not (tmp_path / "injected").exists()


def test_only_allow_listed_buckets_are_downloaded(idc_fixture, s3, tmp_path, monkeypatch):
    def change(rows):
        rows[0]["aws_bucket"] = "evil-bucket"
        rows[0]["series_aws_url"] = f"s3://evil-bucket/{rows[0]['crdc_series_uuid']}/*"

    row = idc_fixture.rows[0]
    shutil.copytree(
        s3.root / row["aws_bucket"] / row["crdc_series_uuid"], s3.root / "evil-bucket" / row["crdc_series_uuid"]
    )
    index = index_with(idc_fixture, tmp_path, change)
    root = tmp_path / "dl"
    proc = cli(
        "download",
        "qin_pet_phantom",
        str(root),
        env={"IDC_INDEX_DIR": str(index), "IDC_S3_ENDPOINT_URL": s3.endpoint_url},
    )
    one_line(proc, 1, "bucket 'evil-bucket' is not an allowed bucket", "IDC_ALLOWED_BUCKETS")
    assert not any(key.startswith(row["crdc_series_uuid"]) for key in s3.get_keys)
    assert len(list(root.rglob("*.dcm"))) == 20
    mirror = cli(
        "download",
        "qin_pet_phantom",
        str(root),  # a mirror the user vouches for
        env={
            "IDC_INDEX_DIR": str(index),
            "IDC_S3_ENDPOINT_URL": s3.endpoint_url,
            "IDC_ALLOWED_BUCKETS": "idc-open-data,idc-open-data-two,evil-bucket",
        },
    )
    assert mirror.returncode == 0, mirror.stderr


@pytest.mark.parametrize("bad", ["line\nbreak", "star*", "what?"])
def test_a_destination_with_a_line_break_or_wildcard_is_bad_input(env, tmp_path, bad):
    proc = cli("download", "qin_pet_phantom", str(tmp_path / bad), env=env)
    one_line(proc, 2, "which s5cmd cannot write to")


def test_a_dangling_symlink_as_destination_says_what_it_is(env, tmp_path):
    dest = tmp_path / "dest"
    dest.symlink_to(tmp_path / "gone")
    proc = cli("download", "qin_pet_phantom", str(dest), env=env)
    one_line(proc, 2, "is a dangling symbolic link")
    with pytest.raises(BadDestinationError, match="is a file, not a folder"):
        (tmp_path / "f").write_text("x")
        download(manifest_of(Path(env["IDC_INDEX_DIR"])), tmp_path / "f", S5cmdOptions(), EngineOptions(log=quiet))


# -- Faults during the transfer ---------------------------------------------------------------


def test_a_silent_endpoint_stops_after_the_stall_timeout(env, s3, tmp_path):
    s3.faults.delay_s = 3600  # headers, then nothing
    started = time.monotonic()
    proc = cli("download", "qin_pet_phantom", str(tmp_path / "dl"), "--stall-timeout", "3", env=env)
    one_line(proc, 3, "no file completed for 3 s from", "did not answer")
    assert time.monotonic() - started < 60
    assert processes_mentioning(str(tmp_path / "dl")) == []


def test_an_endpoint_answering_only_errors_stops_with_the_first_error(env, s3, tmp_path):
    s3.faults.fail_keys(lambda key: True, status=503)
    proc = cli(
        "download",
        "qin_pet_phantom",
        str(tmp_path / "dl"),
        "--stall-timeout",
        "3",
        "--retries",
        "50",
        "--workers",
        "2",
        env=env,
    )
    one_line(proc, 3, "no file completed for 3 s", "answered only errors", "first error:", "503")
    gets = s3.stats["get_object"]
    time.sleep(1.5)
    assert s3.stats["get_object"] == gets  # s5cmd is gone, nothing hammers the endpoint any more


def test_the_stall_timeout_is_a_resource_field(idc_fixture, s3, tmp_path):
    import dagster as dg

    from dataset_assets.defs.downloads.download_assets import downloaded_collection
    from dataset_assets.defs.downloads.manifest_assets import collection_manifest
    from dataset_assets.lib.resources import IdcResource, S5cmdResource

    s3.faults.delay_s = 3600
    result = dg.materialize(
        [collection_manifest, downloaded_collection],
        partition_key="qin_pet_phantom",
        raise_on_error=False,
        resources={
            "idc": IdcResource(
                index_dir=str(idc_fixture.index_dir),
                manifest_dir=str(tmp_path / "m"),
                download_dir=str(tmp_path / "idc"),
            ),
            "s5cmd": S5cmdResource(endpoint_url=s3.endpoint_url, retry_count=1, stall_timeout_s=2),
        },
    )
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "no file completed for 2 s" in str(failure.event_specific_data.error.message)


def _mount_small_disk(folder: Path) -> list[str]:
    """A command prefix that runs a script with a 72 MB tmpfs at ``folder`` (its own mount
    namespace, so nothing outside sees it), or skip when this machine allows neither."""
    probe = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {folder} && umount {folder}"]
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
        return ["unshare", "-rm"]
    pytest.skip("no mount namespace here (unshare -rm failed): cannot make a small disk to fill")


FILL_DISK = r"""
import os, subprocess, sys, time, pathlib
disk, dest, dataset = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=72m", "tmpfs", str(disk)], check=True)
proc = subprocess.Popen([dataset, "idc", "download", "qin_pet_phantom", str(dest), "--workers", "1"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
while not list(dest.rglob("*.dcm")) and proc.poll() is None:
    time.sleep(0.05)
with open(disk / "filler", "wb") as f:  # the disk fills up while the download runs
    try:
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    except OSError:
        pass
out, err = proc.communicate(timeout=120)
print(proc.returncode)
print(err)
"""


def test_a_disk_that_fills_during_the_transfer_stops_it_at_once(env, s3, tmp_path):
    disk = tmp_path / "disk"
    prefix = _mount_small_disk(disk)
    s3.faults.delay_s = 0.3
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", FILL_DISK, str(disk), str(disk / "dl"), DATASET],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr
    code, _, err = proc.stdout.partition("\n")
    assert code == "3", err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "is full (no space left on device" in errors[0] and "still to write" in errors[0], err
    assert "Traceback" not in err
    assert s3.stats["get_object"] < 24  # stopped: the rest was never fetched


@pytest.mark.parametrize("executor", ["multiprocess", "in_process"])
def test_sigkill_of_dagster_asset_materialize_leaves_no_download_running(idc_fixture, s3, tmp_path, executor):
    env = project_env(idc_fixture, s3, tmp_path, DAGSTER_EXECUTOR=executor)
    s3.faults.delay_s = 0.5
    proc = subprocess.Popen(
        materialize_cmd(
            "collection_manifest,downloaded_collection",
            "qin_pet_phantom",
            "--config-json",
            '{"resources": {"s5cmd": {"config": {"workers": 1}}}}',
        ),
        env=env,
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(s3.get_keys) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before s5cmd started"
            time.sleep(0.1)
        assert processes_mentioning(str(tmp_path / "idc")), "s5cmd should be running"
        os.kill(proc.pid, signal.SIGKILL)  # the launching process only
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while (
            processes_mentioning(str(tmp_path / "idc")) or processes_with_env("DAGSTER_HOME", env["DAGSTER_HOME"])
        ) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_mentioning(str(tmp_path / "idc")) == []
        assert processes_with_env("DAGSTER_HOME", env["DAGSTER_HOME"]) == []  # no step process either
        assert len(set(s3.get_keys)) < 24  # it did not run on to the end
    finally:
        for pid in processes_with_env("DAGSTER_HOME", env["DAGSTER_HOME"]):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_command_and_temporary_files_of_a_killed_cli_are_removed_by_the_next_run(env, s3, tmp_path, sig):
    dest = tmp_path / "dl"
    proc = cli_download_in_flight(dest, env, s3)
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGHUP:
        assert proc.returncode == 130 and "interrupted" in err
        assert list((dest / CONTROL_DIR).glob("*.s5cmd")) == []
    deadline = time.monotonic() + 15
    while processes_mentioning(str(dest)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(dest)) == []
    state = dest / CONTROL_DIR / "state"
    state.mkdir(parents=True, exist_ok=True)
    (state / ".qin_pet_phantom.parquet.424242.tmp").write_bytes(b"half-written")
    s3.faults.clear()
    rerun = cli("download", "qin_pet_phantom", str(dest), env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert list((dest / CONTROL_DIR).glob("*.s5cmd")) == []
    assert list(state.glob("*.tmp")) == []


def test_a_command_file_in_use_by_a_running_download_is_not_removed(tmp_path):
    from dataset_assets.core.transfer.control import command_file, remove_stale_command_files

    with command_file(tmp_path, "run") as (path, _handle):
        assert remove_stale_command_files(tmp_path) == [] and path.exists()
    stale = tmp_path / "run-1-abc.s5cmd"
    stale.write_text("cp a b\n")
    assert remove_stale_command_files(tmp_path) == [stale.name] and not stale.exists()


def test_only_what_s5cmd_left_is_removed_never_a_users_file(s3, manifest, tmp_path):
    root = tmp_path / "dl"
    download(manifest, root, opts(s3), EngineOptions(log=quiet))
    row = manifest.to_pylist()[0]
    series = root / row["target_dir"]
    victim = sorted(series.glob("*.dcm"))[0]
    victim.unlink()
    notes = series / "scan_notes.dcm2024"
    notes.write_text("my notes")
    temp = series / f"{victim.name}12345"  # what a SIGKILLed s5cmd leaves
    temp.write_bytes(b"")
    unrelated = series / f"{'0' * 8}-0000-0000-0000-{'0' * 12}.dcm777"  # IDC-shaped, not of this series
    unrelated.write_bytes(b"x")
    download(manifest, root, opts(s3), EngineOptions(log=quiet))
    assert notes.read_text() == "my notes" and unrelated.exists()
    assert not temp.exists() and victim.exists()
    # With no record, the listing names the series' objects: only their temporaries are removed,
    # even an IDC-shaped name of another series stays.
    shutil.rmtree(root / CONTROL_DIR / "state")
    victim.unlink()
    temp.write_bytes(b"")
    download(manifest, root, opts(s3), EngineOptions(log=quiet))
    assert notes.read_text() == "my notes" and unrelated.exists() and victim.exists() and not temp.exists()


# -- Smaller ----------------------------------------------------------------------------------


def test_an_object_missing_on_the_server_says_so_and_that_a_rerun_will_not_fix_it(s3, manifest, tmp_path):
    root = tmp_path / "dl"
    download(manifest, root, opts(s3), EngineOptions(log=quiet))
    row = manifest.to_pylist()[3]
    gone = sorted((s3.root / row["aws_bucket"] / row["crdc_series_uuid"]).iterdir())[0]
    gone.unlink()
    (root / row["target_dir"] / gone.name).unlink()
    shutil.rmtree(root / CONTROL_DIR / "state")  # no record: the listing is the truth
    with pytest.raises(
        IncompleteDownloadError, match="1 of 4 object.s. not found on the server; a re-run will not fix it"
    ):
        download(manifest, root, opts(s3), EngineOptions(log=quiet))


def test_more_objects_on_the_server_than_the_index_lists_is_named_as_such(s3, manifest, tmp_path):
    row = manifest.to_pylist()[0]
    folder = s3.root / row["aws_bucket"] / row["crdc_series_uuid"]
    shutil.copy(sorted(folder.iterdir())[0], folder / "00000000-0000-0000-0000-000000000000.dcm")
    with pytest.raises(
        IncompleteDownloadError, match=r"the server holds more objects \(5\) than the index lists \(4\)"
    ):
        download(manifest, tmp_path / "dl", opts(s3), EngineOptions(log=quiet))
    (tmp_path / "dl" / row["target_dir"] / "00000000-0000-0000-0000-000000000000.dcm").unlink()
    shutil.rmtree(tmp_path / "dl" / CONTROL_DIR / "state")
    with pytest.raises(IncompleteDownloadError, match="the server holds 5 objects but the index lists 4"):
        download(manifest, tmp_path / "dl", opts(s3), EngineOptions(log=quiet))


def test_the_layout_dot_is_refused_as_empty(idc_fixture):
    with pytest.raises(LayoutError, match="is empty"):
        manifest_of(idc_fixture.index_dir, layout=".")


def test_credentials_in_the_endpoint_url_are_never_echoed(env, tmp_path):
    from dataset_assets_tests.support.s3server import free_port

    endpoint = f"http://user:S3CRETPW@127.0.0.1:{free_port()}"
    proc = cli("download", "qin_pet_phantom", str(tmp_path / "dl"), "--endpoint", endpoint, env=env)
    # refused before anything runs: s5cmd signs nothing (--no-sign-request), and its command line is public
    one_line(proc, 2, "holds credentials (user:password@)")
    assert "S3CRETPW" not in proc.stderr + proc.stdout
    signed = cli("download", "qin_pet_phantom", str(tmp_path / "dl"), "--endpoint", endpoint + "/?sig=abc", env=env)
    assert signed.returncode == 2 and "holds credentials" in signed.stderr  # refused: credentials, then path
    assert "S3CRETPW" not in signed.stderr + signed.stdout and "sig=abc" not in signed.stderr + signed.stdout


def test_a_transfer_stopped_keeps_what_completed_and_records_it(s3, manifest, tmp_path):
    root = tmp_path / "dl"
    bad = manifest.to_pylist()[5]
    s3.faults.fail_keys(lambda key: key.startswith(bad["crdc_series_uuid"]), status=503)
    s3.faults.delay_s = 0.0
    with pytest.raises((TransferStoppedError, IncompleteDownloadError)):
        download(manifest, root, opts(s3, retry_count=30, workers=64), EngineOptions(log=quiet, stall_timeout_s=3))
    records = load_state(state_path_for(root, manifest))
    assert len(records) == 5 and bad["target_dir"] not in records


# -- Found by the hostile review of this version -----------------------------------------------


def test_a_state_record_with_wrong_names_is_settled_by_a_listing(s3, manifest, tmp_path):
    from dataset_assets.core.transfer.disk import scan_series
    from dataset_assets.core.transfer.state import files_digest

    root = tmp_path / "dl"
    download(manifest, root, opts(s3), EngineOptions(log=quiet))
    state = state_path_for(root, manifest)
    table = pq.read_table(state)
    digests = table.column("files_digest").to_pylist()
    digests[0] = "0" * 64  # count and bytes still match the index: only the names and sizes differ
    pq.write_table(
        table.set_column(table.column_names.index("files_digest"), "files_digest", pa.array(digests, pa.string())),
        state,
    )
    s3.reset_stats()
    result = download(manifest, root, opts(s3), EngineOptions(log=quiet))
    assert result.complete_series == 6 and result.listed_series == 1 and s3.stats["get_object"] == 0
    for target_dir, record in load_state(state).items():
        assert record.digest == files_digest(scan_series(root / target_dir).files)


def _bounded(fn, seconds: float = 60):
    """``fn()`` in a thread that must end within ``seconds`` (a hang fails the test, not the suite)."""
    import threading

    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} did not return within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_fifo_named_dcm_is_reported_never_read(s3, manifest, tmp_path):
    root = tmp_path / "dl"
    download(manifest, root, opts(s3), EngineOptions(log=quiet))
    fifo = root / manifest.to_pylist()[0]["target_dir"] / "notes.dcm"
    os.mkfifo(fifo)
    headers = _bounded(lambda: verify.check_headers(manifest, root, processes=1))
    assert not headers.passed and "not a regular file" in headers.problems[0]
    tree = verify.check_tree(manifest, root)
    assert not tree.passed and "not a regular file" in tree.problems[0]


def test_fifos_in_the_control_folder_never_hang_a_download(s3, manifest, tmp_path):
    root = tmp_path / "dl"
    download(manifest, root, opts(s3), EngineOptions(log=quiet))
    (next(root.rglob("*.dcm"))).unlink()
    control = root / CONTROL_DIR
    (control / "reservations").mkdir(exist_ok=True)
    os.mkfifo(control / "reservations" / "evil.reservation")
    os.mkfifo(control / "run-1-evil.s5cmd")
    result = _bounded(lambda: download(manifest, root, opts(s3), EngineOptions(log=quiet)))
    assert result.complete_series == 6
    assert (control / "run-1-evil.s5cmd").exists()  # not ours: left alone
    lock = control / "locks" / "qin_pet_phantom.lock"
    lock.unlink()
    os.mkfifo(lock)
    with pytest.raises(DownloadError, match=r"the lock file .*qin_pet_phantom.lock is not a regular file"):
        _bounded(lambda: download(manifest, root, opts(s3), EngineOptions(log=quiet)))


def test_another_series_in_a_directory_is_never_moved_as_a_revision(idc_fixture, s3, tmp_path):
    env = {"IDC_INDEX_DIR": str(idc_fixture.index_dir), "IDC_S3_ENDPOINT_URL": s3.endpoint_url}
    first, second = idc_fixture.rows[0]["SeriesInstanceUID"], idc_fixture.rows[1]["SeriesInstanceUID"]
    root = tmp_path / "r"
    layout = ["--by", "series", "--layout", "%collection_id/%PatientID/"]
    assert cli("download", first, str(root), *layout, env=env).returncode == 0
    before = sorted(p.name for p in root.rglob("*.dcm"))
    proc = cli("download", second, str(root), *layout, env=env)
    one_line(proc, 1, f"holds series {first}", "nothing was moved")
    assert sorted(p.name for p in root.rglob("*.dcm")) == before
    assert not (root / CONTROL_DIR / "replaced").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e20, 0.0])
def test_an_absurd_series_size_fails_that_series_only(idc_fixture, s3, tmp_path, value):
    def change(rows):
        rows[0]["series_size_MB"] = value

    index = index_with(idc_fixture, tmp_path, change)
    proc = cli(
        "download",
        "qin_pet_phantom",
        str(tmp_path / "dl"),
        env={"IDC_INDEX_DIR": str(index), "IDC_S3_ENDPOINT_URL": s3.endpoint_url},
    )
    one_line(proc, 1, "1 of 6 series incomplete", idc_fixture.rows[0]["SeriesInstanceUID"], "instanceCount")
    assert len(list((tmp_path / "dl").rglob("*.dcm"))) == 20


def test_a_count_stored_as_text_is_read_as_a_number(idc_fixture, s3, tmp_path):
    folder = tmp_path / "text-index"
    shutil.copytree(idc_fixture.index_dir, folder)
    table = pq.read_table(folder / "idc_index.parquet")
    i = table.column_names.index("instanceCount")
    table = table.set_column(i, "instanceCount", pa.array([str(v) for v in table.column(i).to_pylist()]))
    pq.write_table(table, folder / "idc_index.parquet")
    proc = cli(
        "download",
        "qin_pet_phantom",
        str(tmp_path / "dl"),
        env={"IDC_INDEX_DIR": str(folder), "IDC_S3_ENDPOINT_URL": s3.endpoint_url},
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("damage", ["drop-target_dir", "text-counts", "garbage", "empty"])
def test_a_tampered_manifest_fails_in_one_line_naming_it(manifest, tmp_path, damage):
    from dataset_assets.core.errors import ManifestError
    from dataset_assets.core.select.manifest import read_manifest, write_manifest

    path = write_manifest(manifest, tmp_path / "m" / "qin_pet_phantom.parquet")
    if damage == "drop-target_dir":
        pq.write_table(manifest.drop_columns(["target_dir"]), path)
    elif damage == "text-counts":
        i = manifest.column_names.index("instanceCount")
        pq.write_table(manifest.set_column(i, "instanceCount", pa.array(["four"] * manifest.num_rows)), path)
    elif damage == "garbage":
        path.write_bytes(b"PAR1" + os.urandom(500))
    else:
        pq.write_table(manifest.slice(0, 0), path)
    with pytest.raises(ManifestError, match=f"manifest {path}"):
        read_manifest(path)


def test_a_file_in_the_way_of_one_series_fails_that_series_only(s3, manifest, tmp_path):
    root = tmp_path / "dl"
    row = manifest.to_pylist()[0]
    (root / row["target_dir"]).parent.mkdir(parents=True)
    (root / row["target_dir"].rstrip("/")).write_text("notes")
    with pytest.raises(IncompleteDownloadError, match="cannot create its directory .*is a file in the way"):
        download(manifest, root, opts(s3), EngineOptions(log=quiet))
    assert len(list(root.rglob("*.dcm"))) == 20 and (root / row["target_dir"].rstrip("/")).read_text() == "notes"


@pytest.mark.parametrize(
    "args",
    [
        ["--endpoint", "http://127.0.0.1:99999"],
        ["--endpoint", "http://[::1"],
        ["--endpoint", "http://127.0.0.1:9/sub path"],
        ["--stall-timeout", "nan"],
    ],
)
def test_malformed_options_are_bad_input(env, tmp_path, args):
    proc = cli("download", "qin_pet_phantom", str(tmp_path / "dl"), *args, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_a_claim_held_by_a_process_that_writes_nothing_is_waited_for_only_so_long(s3, manifest, tmp_path):
    from dataset_assets.core.transfer.claims import SeriesClaims, process_identity

    root = tmp_path / "dl"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        row = manifest.to_pylist()[2]
        claims = SeriesClaims(root.absolute())
        claims.folder.mkdir(parents=True)
        claims.path_of(row["target_dir"]).write_text(process_identity(sleeper.pid))  # alive, never writes
        started = time.monotonic()
        with pytest.raises(
            DownloadError, match=rf"claimed by another download \(pid {sleeper.pid} on this host\) that "
        ):
            download(manifest, root, opts(s3), EngineOptions(log=quiet, stall_timeout_s=2))
        assert time.monotonic() - started < 30
        assert len(list(root.rglob("*.dcm"))) == 20  # the other five series are complete and recorded
        assert len(load_state(state_path_for(root, manifest))) == 5
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_claim_from_another_host_is_honoured_while_its_heartbeat_is_fresh(s3, manifest, tmp_path):
    import threading

    from dataset_assets.core.transfer.claims import SeriesClaims

    root = tmp_path / "dl"
    download(manifest, root, opts(s3), EngineOptions(log=quiet))
    row = manifest.to_pylist()[1]
    victim = sorted((root / row["target_dir"]).glob("*.dcm"))[0]
    victim.unlink()  # the series needs work, and another host claims it
    claims = SeriesClaims(root.absolute())
    holder = "4242 123456 another-host"
    heartbeat = claims.folder / "holders" / f"{holder.replace(' ', '-')}.alive"
    heartbeat.parent.mkdir(parents=True, exist_ok=True)
    heartbeat.touch()
    claims.path_of(row["target_dir"]).write_text(holder)
    done = threading.Event()

    def the_other_host():  # beats for 4 s (busy elsewhere), then finishes the series and lets go
        for _ in range(8):
            os.utime(heartbeat)
            time.sleep(0.5)
        shutil.copy(s3.root / row["aws_bucket"] / row["crdc_series_uuid"] / victim.name, victim)
        claims.path_of(row["target_dir"]).unlink()
        done.set()

    threading.Thread(target=the_other_host, daemon=True).start()
    s3.reset_stats()
    lines: list[str] = []
    result = download(manifest, root, opts(s3), EngineOptions(log=lines.append, stall_timeout_s=2))
    assert done.is_set() and result.complete_series == 6
    assert s3.stats["get_object"] == 0  # it waited, never fetched the claimed series itself
    assert any("another-host" in line for line in lines)
    # A claim whose heartbeat stopped long ago is stale, whichever host wrote it: taken over.
    claims.path_of(row["target_dir"]).write_text(holder)
    os.utime(heartbeat, (time.time() - 3600, time.time() - 3600))
    victim.unlink()
    assert download(manifest, root, opts(s3), EngineOptions(log=quiet)).complete_series == 6 and victim.exists()


def test_a_refused_series_is_never_downloaded_and_a_stale_revision_record_moves_nothing(s3, manifest, tmp_path):
    from dataset_assets.core.transfer.state import SeriesRecord, save_state

    root = tmp_path / "dl"
    download(manifest, root, opts(s3), EngineOptions(log=quiet))
    state = state_path_for(root, manifest)
    records = load_state(state)
    rows = manifest.to_pylist()
    first, second = rows[0]["target_dir"], rows[1]["target_dir"]
    kept = records[first]
    records[first] = SeriesRecord(
        "9.9.9", "00000000-0000-0000-0000-000000000000", None, None, kept.digest, kept.count, kept.bytes
    )
    records[second] = SeriesRecord(rows[1]["SeriesInstanceUID"], "11111111-1111-1111-1111-111111111111", {"x.dcm": 1})
    save_state(state, records)
    shutil.rmtree(root / first)
    s3.reset_stats()
    with pytest.raises(IncompleteDownloadError, match="holds series 9.9.9"):
        download(manifest, root, opts(s3), EngineOptions(log=quiet))
    assert not (root / first).exists()  # refused: not downloaded behind the message's back
    assert len(list((root / second).glob("*.dcm"))) == 4  # the files there are the current ones: not moved
    assert not (root / CONTROL_DIR / "replaced").exists() and s3.stats["get_object"] == 0


# -- A server that lists names outside the series --------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../../../../../../escape.dcm", "sub/../../elsewhere/escape.dcm", "sub/nested.dcm", "../" * 20 + "tmp/escape.dcm"],
)
def test_listed_names_that_leave_the_series_never_write_outside_it(idc_fixture, s3, tmp_path, env, name):
    """A first download copies each series with one wildcard, whose listing the server answers: a
    key such as <uuid>/../../x.dcm must land (flattened) in the series folder, never where its
    path points, and the series then fails as holding more than the index says."""
    row = idc_fixture.rows[0]
    s3.plant(row["aws_bucket"], f"{row['crdc_series_uuid']}/{name}", b"EVIL" * 10)
    dest = tmp_path / "a" / "b" / "c" / "dest"
    before = {p for p in Path("/tmp").glob("escape*")}
    proc = cli("download", idc_fixture.collection_id, str(dest), "--retries", "1", env=env, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, (proc.stdout[-2000:], proc.stderr[-2000:])
    outside = [p for p in (tmp_path / "a").rglob("*") if p.is_file() and dest not in p.parents]
    assert outside == [] and {p for p in Path("/tmp").glob("escape*")} == before
    assert row["SeriesInstanceUID"] in proc.stdout + proc.stderr  # the series with the planted name fails, named
    (series_dir,) = dest.rglob(f"*_{row['SeriesInstanceUID']}")
    assert len(list(series_dir.iterdir())) == row["instanceCount"] + 1  # the planted object, flattened, in the folder
    verified = cli("verify", idc_fixture.collection_id, str(dest), env=env)
    assert verified.returncode == 1, verified.stdout


def test_a_folder_planted_as_a_claim_fails_in_one_line_instead_of_waiting_forever(idc_fixture, s3, tmp_path, env):
    import hashlib

    dest = tmp_path / "dest"
    assert cli("download", idc_fixture.collection_id, str(dest), env=env).returncode == 0
    row = idc_fixture.rows[0]
    (series_dir,) = dest.rglob(f"*_{row['SeriesInstanceUID']}")
    shutil.rmtree(series_dir)
    target_dir = str(series_dir.relative_to(dest)) + "/"
    claim = dest / CONTROL_DIR / "claims" / (hashlib.sha1(target_dir.encode()).hexdigest() + ".claim")
    claim.mkdir()
    proc = cli("download", idc_fixture.collection_id, str(dest), "--stall-timeout", "5", env=env, timeout=60)
    one_line(proc, 3, f"the claim {claim} of series {row['SeriesInstanceUID']} is not a claim file", "remove it")
    assert proc.stdout.count("being fetched by another download") <= 1
    claim.rmdir()
    assert cli("download", idc_fixture.collection_id, str(dest), env=env).returncode == 0
    assert len(list(series_dir.iterdir())) == row["instanceCount"]


@pytest.mark.parametrize("level", ["series", "patient", "collection"])
def test_a_folder_below_the_root_that_is_a_link_is_never_written_through(idc_fixture, s3, tmp_path, env, level):
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    assert cli("download", idc_fixture.collection_id, str(dest), env=env).returncode == 0
    row = idc_fixture.rows[0]
    (series_dir,) = dest.rglob(f"*_{row['SeriesInstanceUID']}")
    folder = {"series": series_dir, "patient": series_dir.parent.parent, "collection": dest / row["collection_id"]}[
        level
    ]
    shutil.rmtree(folder)
    outside.mkdir()
    folder.symlink_to(outside)
    proc = cli("download", idc_fixture.collection_id, str(dest), env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert (
        f"{folder} is a link (to {outside}); downloads never write through links below {dest}"
        in proc.stdout + proc.stderr
    )
    assert list(outside.rglob("*")) == []  # nothing written there
    folder.unlink()
    assert cli("download", idc_fixture.collection_id, str(dest), env=env).returncode == 0
    # The root itself may be a link (data on another disk).
    linked = tmp_path / "linked-root"
    linked.symlink_to(dest)
    assert cli("download", idc_fixture.collection_id, str(linked), env=env).returncode == 0


def test_a_malformed_journal_line_never_drops_the_good_record_of_its_series(idc_fixture, s3, tmp_path, env):
    import json

    dest = tmp_path / "dest"
    assert cli("download", idc_fixture.collection_id, str(dest), env=env).returncode == 0
    (state,) = (dest / CONTROL_DIR / "state").glob("*.parquet")
    row = pq.read_table(state).to_pylist()[0]
    row.update(file_count=-1, file_names=None, file_sizes=None)
    state.with_name(state.name + ".journal").write_text(json.dumps(row) + "\n")
    proc = cli("download", idc_fixture.collection_id, str(dest), env=env)
    assert proc.returncode == 0 and "ignored 1 line(s)" in proc.stdout + proc.stderr, proc.stderr
    verified = cli("verify", idc_fixture.collection_id, str(dest), env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr  # the snapshot's record still stands
    s3.reset_stats()
    assert cli("download", idc_fixture.collection_id, str(dest), env=env).returncode == 0
    assert s3.stats["list"] == 0 and s3.stats["get_object"] == 0


def test_a_folder_where_a_file_belongs_is_named_not_filled(idc_fixture, s3, tmp_path, env):
    dest = tmp_path / "dest"
    assert cli("download", idc_fixture.collection_id, str(dest), env=env).returncode == 0
    row = idc_fixture.rows[0]
    (series_dir,) = dest.rglob(f"*_{row['SeriesInstanceUID']}")
    victim = sorted(series_dir.iterdir())[0]
    victim.unlink()
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    proc = cli("download", idc_fixture.collection_id, str(dest), env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{victim} is a folder where a file of the series belongs; move it away" in proc.stdout + proc.stderr
    assert [p.name for p in victim.iterdir()] == ["notes.txt"]  # nothing written into it
    shutil.rmtree(victim)
    assert cli("download", idc_fixture.collection_id, str(dest), env=env).returncode == 0 and victim.is_file()


def test_claims_and_heartbeats_of_killed_downloads_are_swept_and_live_ones_kept(idc_fixture, s3, tmp_path, env):
    import socket

    from dataset_assets.core.transfer.claims import process_identity

    dest = tmp_path / "dest"
    assert cli("download", idc_fixture.collection_id, str(dest), env=env).returncode == 0
    claims = dest / CONTROL_DIR / "claims"
    host = socket.gethostname()
    dead = f"4194302 12345 {host}"  # above any pid this host hands out: a download killed long ago
    live = f"{process_identity(os.getpid())} {host}"  # this test: alive
    for n, holder in enumerate((dead, dead, live)):
        (claims / f"{n:040x}.claim").write_text(holder)
        (claims / "holders" / f"{holder.replace(' ', '-')}.alive").touch()
    # A series is missing, so the next download claims (and sweeps) before it fetches.
    (series_dir,) = dest.rglob(f"*_{idc_fixture.rows[0]['SeriesInstanceUID']}")
    shutil.rmtree(series_dir)
    assert cli("download", idc_fixture.collection_id, str(dest), env=env).returncode == 0
    assert sorted(p.read_text() for p in claims.glob("*.claim")) == [live]
    assert [p.name for p in (claims / "holders").iterdir()] == [f"{live.replace(' ', '-')}.alive"]


def test_a_file_size_limit_is_explained_when_the_system_names_no_file(idc_fixture, s3, tmp_path, env):
    dest = tmp_path / "dest"
    full = {**os.environ, **env}
    full.pop("DISPLAY", None)
    proc = subprocess.run(
        ["bash", "-c", f'ulimit -f 1; exec "{DATASET}" idc download {idc_fixture.collection_id} "{dest}"'],
        capture_output=True, text=True, env=full, timeout=120,
    )  # fmt: skip
    one_line(
        proc,
        3,
        "File too large while writing (a file reached the largest size allowed: a process limit such as "
        "`ulimit -f`, or the file system's); everything completed so far is kept",
    )


def test_two_downloads_of_one_collection_in_one_process_name_the_thread_not_a_stranger(tmp_path):
    from dataset_assets.core.errors import DownloadError
    from dataset_assets.core.transfer.control import collection_locks

    held = collection_locks(tmp_path, ["qin_pet_phantom"])
    with held, pytest.raises(DownloadError) as caught, collection_locks(tmp_path, ["qin_pet_phantom"]):
        pass
    assert f"by another download in this same process (pid {os.getpid()}, another thread)" in str(caught.value)
