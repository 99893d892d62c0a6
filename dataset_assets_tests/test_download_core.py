"""Downloads with the real s5cmd against the loopback S3 server: layout, resume, faults, bad input."""

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pydicom
import pytest

from dataset_assets.core.errors import DownloadError
from dataset_assets.core.fs import space_reservation
from dataset_assets.core.transfer import s5cmd
from dataset_assets.core.transfer.control import CONTROL_DIR
from dataset_assets.core.transfer.download import EngineOptions, download
from dataset_assets.core.transfer.s5cmd import S5cmdOptions
from dataset_assets_tests.support.procs import processes_mentioning
from dataset_assets_tests.support.s3server import free_port


def opts(server, **kw):
    return S5cmdOptions(endpoint_url=server.endpoint_url, retry_count=kw.pop("retry_count", 1), **kw)


def files_of(root: Path, row: dict) -> list[Path]:
    return sorted((root / row["target_dir"]).glob("*.dcm"))


def test_full_download_places_every_object_by_layout(s3, manifest, idc_fixture, tmp_path):
    root = tmp_path / "dl"
    result = download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    assert result.failed_series == [] and result.complete_series == 6
    assert result.transferred_files == 24 and result.transferred_bytes == result.bytes
    assert s3.stats["get_object"] == 24
    for row in manifest.to_pylist():
        assert row["target_dir"] == (
            f"qin_pet_phantom/{row['PatientID']}/{row['StudyInstanceUID']}/PT_{row['SeriesInstanceUID']}/"
        )
        got = files_of(root, row)
        assert [f"{row['crdc_series_uuid']}/{p.name}" for p in got] == idc_fixture.object_keys(row)
        for path in got:
            assert path.read_bytes() == (s3.root / row["aws_bucket"] / row["crdc_series_uuid"] / path.name).read_bytes()
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert (ds.PatientID, ds.SeriesInstanceUID) == (row["PatientID"], row["SeriesInstanceUID"])
    assert {r["aws_bucket"] for r in manifest.to_pylist()} == {"idc-open-data", "idc-open-data-two"}
    assert list((root / CONTROL_DIR).glob("*.s5cmd")) == []  # the command file is gone


def test_rerun_of_complete_collection_makes_no_request(s3, manifest, tmp_path):
    root = tmp_path / "dl"
    download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    s3.reset_stats()
    result = download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    assert result.skipped_series == 6 and result.transferred_files == 0
    assert s3.stats["get_object"] == 0 and s3.stats["list"] == 0


def test_resume_fetches_only_what_is_missing_and_removes_temp_files(s3, manifest, tmp_path):
    root = tmp_path / "dl"
    download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    rows = manifest.to_pylist()
    damaged = files_of(root, rows[1])[:2]
    for path in damaged:
        path.unlink()
    temp = damaged[0].with_name(damaged[0].name + "4242")  # what a SIGKILLed s5cmd leaves
    temp.write_bytes(b"")
    shutil.rmtree(root / rows[3]["target_dir"])
    s3.reset_stats()
    result = download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    assert result.failed_series == [] and result.skipped_series == 4
    assert sorted(s3.get_keys) == sorted(
        [f"{rows[1]['crdc_series_uuid']}/{p.name}" for p in damaged]
        + [f"{rows[3]['crdc_series_uuid']}/{p.name}" for p in files_of(root, rows[3])]
    )
    assert not temp.exists()


def test_503s_are_retried(s3, manifest, tmp_path):
    s3.faults.fail_next_gets(3, status=503)
    result = download(manifest, tmp_path / "dl", opts(s3, retry_count=3), EngineOptions(log=lambda m: None))
    assert result.failed_series == []
    assert s3.stats["get_object"] == 24 + 3


def test_truncated_bodies_are_retried_and_never_left_as_complete(s3, manifest, tmp_path):
    s3.faults.truncate_next_gets(2)
    result = download(manifest, tmp_path / "dl", opts(s3, retry_count=3), EngineOptions(log=lambda m: None))
    assert result.failed_series == []
    assert s3.stats["get_object"] == 24 + 2  # both cut bodies were fetched again
    for row in manifest.to_pylist():  # every final file is whole
        for path in files_of(tmp_path / "dl", row):
            assert path.read_bytes() == (s3.root / row["aws_bucket"] / row["crdc_series_uuid"] / path.name).read_bytes()


def test_persistent_failure_names_the_series_keeps_the_rest_and_rerun_completes(s3, manifest, tmp_path):
    root = tmp_path / "dl"
    rows = manifest.to_pylist()
    bad = rows[2]
    s3.faults.fail_keys(lambda key: key.startswith(bad["crdc_series_uuid"]), status=500)
    with pytest.raises(DownloadError) as info:
        download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    message = str(info.value)
    assert "1 of 6 series incomplete" in message and bad["SeriesInstanceUID"] in message
    assert "InternalError" in message and "run it again (materialize, or the same command)" in message
    assert info.value.result.complete_series == 5
    assert all(len(files_of(root, r)) == 4 for r in rows if r is not bad)
    s3.faults.clear()
    s3.reset_stats()
    result = download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    assert result.failed_series == [] and s3.stats["get_object"] == 4


def test_missing_series_on_the_server(s3, manifest, tmp_path):
    row = manifest.to_pylist()[0]
    shutil.rmtree(s3.root / row["aws_bucket"] / row["crdc_series_uuid"])
    with pytest.raises(
        DownloadError, match=rf"{row['SeriesInstanceUID']} in .*: not found on the server .*a re-run will not fix it"
    ):
        download(manifest, tmp_path / "dl", opts(s3), EngineOptions(log=lambda m: None))


def test_a_server_that_serves_other_bytes_than_the_manifest_fails_verification(s3, manifest, tmp_path):
    row = manifest.to_pylist()[4]
    obj = next((s3.root / row["aws_bucket"] / row["crdc_series_uuid"]).iterdir())
    obj.write_bytes(obj.read_bytes() + b"extra")
    with pytest.raises(
        DownloadError, match=rf"{row['SeriesInstanceUID']} in .*: 4/4 files, {row['series_bytes'] + 5:,}/"
    ):
        download(manifest, tmp_path / "dl", opts(s3), EngineOptions(log=lambda m: None))


def test_refusing_endpoint_fails_quickly_and_clearly(manifest, tmp_path):
    options = S5cmdOptions(endpoint_url=f"http://127.0.0.1:{free_port()}", retry_count=1)
    started = time.monotonic()
    with pytest.raises(DownloadError, match="cannot reach the S3 endpoint http://127.0.0.1:.*Connection"):
        download(manifest, tmp_path / "dl", options, EngineOptions(log=lambda m: None))
    assert time.monotonic() - started < 15


def test_exit_code_is_not_trusted_disk_is(manifest, tmp_path):
    """Without the reachability check, s5cmd's own failure is still caught by verification."""
    options = S5cmdOptions(endpoint_url=f"http://127.0.0.1:{free_port()}", retry_count=0)
    with pytest.raises(DownloadError, match="6 of 6 series incomplete"):
        download(manifest, tmp_path / "dl", options, EngineOptions(log=lambda m: None, check_endpoint_first=False))


def test_not_enough_disk_space_is_refused_before_any_transfer(s3, manifest, tmp_path):
    huge = manifest.set_column(
        manifest.column_names.index("series_bytes"),
        "series_bytes",
        pa.array([10**15] * manifest.num_rows, pa.int64()),
    )
    with pytest.raises(DownloadError, match="not enough free space in .* needs 6.0 PB"):
        download(huge, tmp_path / "dl", opts(s3), EngineOptions(log=lambda m: None))
    assert s3.stats["get_object"] == 0


def test_space_held_by_a_download_in_progress_is_counted(s3, manifest, tmp_path):
    """Two downloads starting at once into one file system: the second sees what the first has
    still to write, and is refused (naming it) when both would not fit; nothing is fetched."""
    root = tmp_path / "dl"
    ledger = root / CONTROL_DIR / "reservations"
    free = shutil.disk_usage(tmp_path).free
    with space_reservation(root, ledger, free // 2, "lidc_idri") as other:
        (held,) = ledger.glob("*.reservation")
        assert stat.S_IMODE(held.stat().st_mode) == 0o644  # other users downloading here must read it
        other.update(free)  # as its progress tick would: all the free space is still to be written
        with pytest.raises(DownloadError, match=r"not enough free space .* downloads in progress \(lidc_idri: "):
            download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
        assert s3.stats["get_object"] == 0
        other.update(0)  # that download is almost done: room again
        download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    assert s3.stats["get_object"] == 24
    assert list(ledger.glob("*.reservation")) == []  # both released


def test_reservation_of_a_killed_download_is_released(s3, manifest, tmp_path):
    root = tmp_path / "dl"
    ledger = root / CONTROL_DIR / "reservations"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from dataset_assets.core.fs import space_reservation as r; "
            f"c = r(Path({str(tmp_path)!r}), Path({str(ledger)!r}), 1, 'nlst'); c.__enter__().update(10**18); "
            "print('held', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DownloadError, match=r"downloads in progress \(nlst: 1000.0 PB\)"):
            download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    finally:
        holder.kill()
        holder.wait()
    assert len(list(ledger.glob("*.reservation"))) == 1  # SIGKILL: no clean-up ran, but the lock is gone
    download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    assert list(ledger.glob("*.reservation")) == []


@pytest.mark.parametrize(
    "name",
    [
        "back\\slash",
        "two\\\\slashes",
        "dol$lar",
        "esc\\$aped",
        "back`tick",
        'dq"uote',
        "sq'uote",
        "sp ace",
        "br[ack]et",
    ],
)
def test_roots_with_shell_characters_get_every_file_inside_them(s3, manifest, tmp_path, name):
    """s5cmd's command file unescapes backslash, $, ` and " inside quotes: each is escaped, so the
    files land in this root and nowhere else."""
    root = tmp_path / "roots" / name
    download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    files = list((tmp_path / "roots").rglob("*.dcm"))
    assert len(files) == 24 and all(str(p).startswith(f"{root}/") for p in files)


@pytest.mark.parametrize("name", ["st*r", "quest?ion", "new\nline"])
def test_roots_s5cmd_cannot_write_to_are_refused_up_front(s3, manifest, tmp_path, name):
    with pytest.raises(DownloadError, match="s5cmd cannot write to; choose a path without"):
        download(manifest, tmp_path / name, opts(s3), EngineOptions(log=lambda m: None))
    assert s3.stats["get_object"] == 0 and not (tmp_path / name).exists()


def test_unwritable_root_is_refused(s3, manifest, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(DownloadError, match="is not writable"):
        download(manifest, blocker / "dl", opts(s3), EngineOptions(log=lambda m: None))
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        with pytest.raises(DownloadError, match="is not writable"):
            download(manifest, ro, opts(s3), EngineOptions(log=lambda m: None))
    assert s3.stats["get_object"] == 0


def test_progress_is_logged_while_transferring(s3, manifest, tmp_path):
    s3.faults.delay_s = 0.1
    lines = []
    download(manifest, tmp_path / "dl", opts(s3, workers=2), EngineOptions(log=lines.append, progress_interval_s=0.2))
    progress = [line for line in lines if line.startswith("progress: ")]
    assert progress, lines
    assert "/24 files" in progress[-1] and "MB/s" in progress[-1] and "ETA" in progress[-1]
    assert "transfer ended: 24/24 files" in lines[-1]


def test_interrupt_stops_s5cmd_and_leaves_no_process(s3, manifest, tmp_path):
    """An exception in the calling thread (as Dagster raises on termination) stops s5cmd."""
    s3.faults.delay_s = 1.0
    root = tmp_path / "dl"
    seen = []

    def log(line):
        if line.startswith("progress: "):
            seen.extend(processes_mentioning(str(root)))
            mode = stat.S_IMODE(next((root / CONTROL_DIR).glob("run-*.s5cmd")).stat().st_mode)
            assert mode == 0o600
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(manifest, root, opts(s3, workers=2), EngineOptions(log=log, progress_interval_s=0.3))
    assert seen, "s5cmd should have been running"
    assert processes_mentioning(str(root)) == [] and s5cmd.live_processes() == []
    assert list((root / CONTROL_DIR).glob("*.s5cmd")) == []


def test_a_collection_being_downloaded_is_locked(s3, manifest, tmp_path):
    from dataset_assets.core.transfer.control import collection_locks

    root = tmp_path / "dl"
    root.mkdir()
    with (
        collection_locks(root, ["qin_pet_phantom"]),
        pytest.raises(
            DownloadError,
            match=rf"collection qin_pet_phantom is being downloaded into {root} by another download in this same "
            r"process \(pid \d+",
        ),
    ):
        download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    assert s3.stats["get_object"] == 0
    assert download(manifest, root, opts(s3), EngineOptions(log=lambda m: None)).failed_series == []  # free again


def test_extra_files_in_a_series_are_named_in_the_error(s3, manifest, tmp_path):
    root = tmp_path / "dl"
    download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
    row = manifest.to_pylist()[0]
    (root / row["target_dir"] / "not-from-this-series.dcm").write_bytes(b"x" * 10)
    with pytest.raises(
        DownloadError,
        match=r"1 .dcm file\(s\) that are not objects of this series \(e.g. not-from-this-series.dcm\): move them out",
    ):
        download(manifest, root, opts(s3), EngineOptions(log=lambda m: None))
