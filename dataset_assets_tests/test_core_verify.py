"""Verification in the core: the DICOM header check in worker processes (same findings as in
one process, bounded work, no worker left behind when its caller is stopped) and the tree check
with series that other downloads recorded."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet
import pydicom
import pytest

from dataset_assets.core.index.source import IndexSource
from dataset_assets.core.select.filters import ManifestFilters
from dataset_assets.core.select.manifest import build_manifest
from dataset_assets.core.transfer.download import EngineOptions, download, state_path_for
from dataset_assets.core.transfer.s5cmd import S5cmdOptions
from dataset_assets.core.verify.checks import check_headers, check_tree
from dataset_assets.core.verify.dicom_headers import HEADER_FIELDS, header_watch
from dataset_assets_tests.support.fixture import write_dicom
from dataset_assets_tests.support.procs import live_processes

SERIES, FILES = 12, 5


def tree(root: Path, series: int = SERIES, files: int = FILES) -> pa.Table:
    rows = []
    for s in range(series):
        row = {
            "target_dir": f"c/P{s % 3}/1.2.{s % 3}/CT_1.2.{s % 3}.{s}",
            "instanceCount": files,
            "PatientID": f"P{s % 3}",
            "StudyInstanceUID": f"1.2.{s % 3}",
            "SeriesInstanceUID": f"1.2.{s % 3}.{s}",
            "Modality": "CT",
        }
        folder = root / row["target_dir"]
        folder.mkdir(parents=True)
        for i in range(files):
            write_dicom(folder / f"{i:04d}.dcm", row, i, 64)
        rows.append(row)
    return pa.Table.from_pylist(rows)


@pytest.fixture
def damaged(tmp_path):
    manifest = tree(tmp_path)
    rows = manifest.to_pylist()
    victim = tmp_path / rows[7]["target_dir"] / "0003.dcm"
    write_dicom(victim, {**rows[7], "PatientID": "SOMEONE-ELSE"}, 3, 64)
    junk = tmp_path / rows[10]["target_dir"] / "0000.dcm"
    junk.write_bytes(b"not dicom at all")
    return manifest, tmp_path, victim, junk


def test_worker_processes_find_what_one_process_finds(damaged):
    manifest, root, victim, junk = damaged
    inline = check_headers(manifest, root, processes=1, files_per_batch=7)
    pooled = check_headers(manifest, root, processes=2, files_per_batch=7)
    assert inline.notes["processes"] == 1 and pooled.notes["processes"] == 2
    for report in (inline, pooled):
        assert report.checked == SERIES * FILES
        assert report.problem_count == 2 and not report.passed
        assert report.culprit_series == {"1.2.1.7", "1.2.1.10"}
        text = " ".join(report.problems)
        assert f"{victim}: PatientID is 'SOMEONE-ELSE', manifest says 'P1'" in text
        assert f"{junk}: not a readable DICOM file" in text


def test_sampling_and_missing_series_in_workers(damaged):
    manifest, root, victim, _ = damaged
    sampled = check_headers(manifest, root, processes=2, files_per_batch=2, sample_per_series=2)
    assert sampled.checked == SERIES * 2
    assert str(victim) not in " ".join(sampled.problems)  # file 3 is outside a sample of 2
    assert sampled.notes["sample_per_series"] == 2
    gone = pa.concat_tables(
        [
            manifest,
            pa.Table.from_pylist(
                [{**manifest.to_pylist()[0], "target_dir": "c/nowhere", "SeriesInstanceUID": "9.9"}],
                schema=manifest.schema,
            ),
        ]
    )
    assert check_headers(gone, root, processes=2, files_per_batch=7).checked == SERIES * FILES


def test_listed_problems_are_capped_but_counted(tmp_path):
    manifest = tree(tmp_path, series=6, files=10)
    wrong = manifest.set_column(manifest.schema.get_field_index("Modality"), "Modality", pa.array(["MR"] * 6))
    report = check_headers(wrong, tmp_path, processes=2, files_per_batch=10)
    assert report.problem_count == 60 and len(report.problems) == 20 and len(report.culprit_series) == 6


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_stopping_the_caller_leaves_no_worker(tmp_path, how):
    """SIGKILL: the kernel ends the workers (parent-death signal). SIGINT (Ctrl-C, or Dagster
    interrupting a step): the caller stops them at once, in the middle of their reading."""
    manifest = tree(tmp_path, series=4, files=1)
    for folder in manifest.column("target_dir").to_pylist():  # 4 x 4,000 files: each worker reads for seconds
        first = tmp_path / folder / "0000.dcm"
        for i in range(1, 4000):
            os.link(first, first.with_name(f"{i:04d}.dcm"))
    held: list[int] = []
    pq_path = tmp_path / "manifest.parquet"
    pa.parquet.write_table(manifest, pq_path)
    script = textwrap.dedent(f"""
        import signal
        from pathlib import Path
        import pyarrow.parquet as pq
        from dataset_assets.core.verify.checks import check_headers
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIGINT ignored
        print('start', flush=True)
        check_headers(pq.read_table({str(pq_path)!r}), Path({str(tmp_path)!r}), processes=2, files_per_batch=1)
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    children: list[int] = []
    try:
        assert parent.stdout.readline().strip() == "start"
        deadline = time.monotonic() + 60
        reading: set[int] = set()
        while len(reading) < 2:
            assert time.monotonic() < deadline, "the check's two worker processes never reached the files"
            reading.update(pid for pid in children if _reads_files(pid))
            time.sleep(0.02)
            children = live_processes(lambda proc: f"PPid:\t{parent.pid}\n" in (proc / "status").read_text())
        parent.send_signal(getattr(signal, how))
        _, err = parent.communicate(timeout=15)
        if how == "SIGINT":
            assert "KeyboardInterrupt" in err, err
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "header workers outlived the killed caller"
    finally:  # whatever happened, nothing outlives the test
        for pid in [parent.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=30)
        for fd in held:
            os.close(fd)


def _reads_files(pid: int) -> bool:
    """Whether a worker has a ``.dcm`` file of the tree open right now (it is reading headers)."""
    try:
        return any(os.readlink(fd).endswith(".dcm") for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_tree_check_accounts_for_series_other_downloads_recorded(s3, manifest, idc_fixture, tmp_path):
    """After a whole collection, a manifest of one series: the other series are not stray; a
    file nobody downloaded still is."""
    root = tmp_path / "dl"
    download(
        manifest,
        root,
        S5cmdOptions(endpoint_url=s3.endpoint_url),
        EngineOptions(log=lambda m: None, state_path=state_path_for(root, manifest)),
    )
    with IndexSource(idc_fixture.index_dir).connect() as con:
        one = build_manifest(
            con, idc_fixture.collection_id, ManifestFilters(series_uids=[idc_fixture.rows[0]["SeriesInstanceUID"]])
        )
    assert check_tree(one, root).passed
    stray = root / manifest.to_pylist()[3]["target_dir"] / "notes.txt"
    stray.write_text("mine")
    report = check_tree(one, root)
    assert report.problem_count == 1 and f"stray file: {stray}" in report.problems[0]


def test_default_processes_are_capped(monkeypatch):
    """A container can see a whole node's CPUs: the default stops at MAX_DEFAULT_PROCESSES."""
    from dataset_assets.core.verify import checks as verify

    monkeypatch.setattr(verify.os, "sched_getaffinity", lambda pid: set(range(64)))
    assert verify.default_processes() == verify.MAX_DEFAULT_PROCESSES == 8
    monkeypatch.setattr(verify.os, "sched_getaffinity", lambda pid: {0})
    assert verify.default_processes() == 1


@pytest.mark.parametrize("columns", [None, HEADER_FIELDS], ids=["whole-rows", "header-fields-only"])
def test_header_check_reads_only_new_or_changed_files_with_its_cache(s3, manifest, tmp_path, columns):
    """Headers are read as files land, whether the watch gets whole rows or only the columns it
    declares (the Dagster step's slim rows once lost PatientID, and every header was read again)."""
    from dataset_assets.core.verify.checks import header_cache_path

    root = tmp_path / "dl"
    cache = header_cache_path(root, manifest)
    download(
        manifest,
        root,
        S5cmdOptions(endpoint_url=s3.endpoint_url, retry_count=1),
        EngineOptions(log=lambda m: None, watch_batch=header_watch(cache), watch_columns=columns),
    )
    first = check_headers(manifest, root, processes=1, cache_path=cache)
    assert first.passed and first.checked == 24 and first.notes["read"] == 0  # read as the files landed
    victim = sorted(root.rglob("*.dcm"))[5]
    ds = pydicom.dcmread(victim)
    ds.PatientID = "someone-else"
    ds.save_as(victim)  # a changed file (new mtime) is read again, and caught
    second = check_headers(manifest, root, processes=1, cache_path=cache)
    assert not second.passed and second.notes["read"] == 0 and "someone-else" in second.problems[0]
    third = check_headers(manifest, root, processes=1, cache_path=cache, reread=True)
    assert not third.passed and third.notes["read"] == 23  # everything read; the bad file is never cached


def test_watch_columns_are_checked_when_the_download_is_made(manifest, tmp_path):
    """A string or a misspelled column would hand the watch None for what it compares, and every
    header would be read again at the check: refused at once, in one line."""
    from dataset_assets.core.errors import OptionError
    from dataset_assets.core.transfer.download import Download

    with pytest.raises(OptionError, match="not a list of column names"):
        EngineOptions(watch_columns="PatientID")
    engine = EngineOptions(watch_batch=header_watch(tmp_path / "h.parquet"), watch_columns=("PatientId",))
    with pytest.raises(OptionError, match=r"\['PatientId'\] are not columns of the manifest"):
        Download(manifest, tmp_path / "dl", S5cmdOptions(endpoint_url="http://127.0.0.1:1"), engine)
