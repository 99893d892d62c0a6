"""Issue 18: downloads in bounded batches, checkpointed as each series verifies. A download is
killed with SIGKILL at random moments (one of them between two batches); each resume lists no
series that was verified before the kill, fetches no file that was complete, and the end is
byte-identical to the bucket. Real s5cmd, a loopback S3 server, real DICOM files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyarrow.parquet as pq
import pytest

from dataset_assets.core.errors import OptionError
from dataset_assets.core.index.source import IndexSource
from dataset_assets.core.select.manifest import build_manifest, write_manifest
from dataset_assets.core.transfer.control import CONTROL_DIR
from dataset_assets.core.transfer.download import Download, EngineOptions, download, state_path_for
from dataset_assets.core.transfer.s5cmd import S5cmdOptions
from dataset_assets.core.transfer.state import Journal, SeriesRecord, journal_path, load_state, recorded_files
from dataset_assets.core.verify import checks as verify
from dataset_assets.core.verify.dicom_headers import header_watch
from dataset_assets_tests.support.fixture import build_fixture
from dataset_assets_tests.support.s3server import LocalS3Server

N_SERIES, FILES = 16, 5
BATCH_FILES = 3 * FILES  # three series per batch: six batches

RUNNER = """
import json, sys
from pathlib import Path
from dataset_assets.core.transfer.download import EngineOptions, download
from dataset_assets.core.select.manifest import read_manifest
from dataset_assets.core.transfer.s5cmd import S5cmdOptions
manifest = read_manifest(Path(sys.argv[1]))
opts = S5cmdOptions(endpoint_url=sys.argv[3], workers=2, retry_count=1)
def log(line):
    print(line, flush=True)
engine = EngineOptions(log=log, batch_files=int(sys.argv[4]), progress_interval_s=0.05, check_endpoint_first=False)
download(manifest, Path(sys.argv[2]), opts, engine)
print("DONE", flush=True)
"""


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    base = tmp_path_factory.mktemp("many")
    fx = build_fixture(base, "qin_pet_phantom", n_series=N_SERIES, files_per_series=FILES, pixels=256)
    with IndexSource(fx.index_dir).connect() as con:
        manifest = build_manifest(con, fx.collection_id)
    path = base / "manifest.parquet"
    write_manifest(manifest, path)
    return fx, manifest, path


def listed_prefixes(server: LocalS3Server) -> set[str]:
    prefixes = set()
    for method, path, _range in server.requests:
        query = parse_qs(urlsplit(path).query)
        if method == "GET" and "prefix" in query:
            prefixes.add(query["prefix"][0])
    return prefixes


def got_keys(server: LocalS3Server) -> list[str]:
    return list(server.get_keys)


def start(manifest_path: Path, root: Path, server: LocalS3Server) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(manifest_path), str(root), server.endpoint_url, str(BATCH_FILES)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_when(proc: subprocess.Popen, ready, timeout: float = 60) -> str:
    """SIGKILL the runner (and its s5cmd) once ``ready(line)`` is true for a line of its log."""
    seen = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if ready(line) or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return "".join(seen)


def test_sigkill_at_random_moments_resumes_without_listing_or_refetching_what_was_verified(many, tmp_path):
    fx, manifest, manifest_path = many
    root = tmp_path / "dl"
    state = state_path_for(root.absolute(), manifest)
    rng = random.Random(18)
    buckets = sorted({r["aws_bucket"] for r in manifest.to_pylist()})
    files_seen = 0

    def after_files(n: int):
        def ready(line: str) -> bool:
            nonlocal files_seen
            if line.startswith("progress: "):
                files_seen = int(line.split()[1].split("/")[0].replace(",", ""))
            return files_seen >= n

        return ready

    with LocalS3Server(fx.s3_root) as server:
        server.faults.delay_s = 0.02  # slow enough to be caught mid-transfer
        moments = [
            after_files(rng.randint(3, 12)),  # inside the first batch
            lambda line: line.startswith("transfer ended"),  # at a batch boundary: s5cmd of the next not started
            after_files(rng.randint(2, 10)),  # inside a later batch
        ]
        for ready in moments:
            before = load_state(state, lambda _m: None)  # what was verified before this run
            sizes_before = {p.name: p.stat().st_size for p in root.rglob("*.dcm") if CONTROL_DIR not in p.parts}
            server.reset_stats()
            files_seen = 0
            log = kill_when(start(manifest_path, root, server), ready)
            assert "Traceback" not in log and "downloading " in log, log  # killed at work, not after a failure
            verified_before = {r.crdc_series_uuid for r in before.values()}
            listed = {p.rstrip("/") for p in listed_prefixes(server)}
            assert not listed & verified_before, (listed & verified_before, log)
            for key in got_keys(server):  # no file that was complete before this run is fetched again
                uuid, _, name = key.rpartition("/")
                size = next(
                    (fx.s3_root / b / uuid / name).stat().st_size
                    for b in buckets
                    if (fx.s3_root / b / uuid / name).exists()
                )
                assert sizes_before.get(name) != size, (key, log)
        recorded = load_state(state, lambda _m: None)
        assert 0 < len(recorded) < N_SERIES  # progress was kept, and work is left
        server.reset_stats()
        server.faults.delay_s = 0
        result = download(
            manifest,
            root,
            S5cmdOptions(endpoint_url=server.endpoint_url, workers=4, retry_count=1),
            EngineOptions(log=lambda _m: None, batch_files=BATCH_FILES),
        )
        listed = {p.rstrip("/") for p in listed_prefixes(server)}
        assert not listed & {r.crdc_series_uuid for r in recorded.values()}
        assert result.complete_series == N_SERIES and result.failed_count == 0
    for row in manifest.to_pylist():  # byte-identical to the bucket
        source = fx.s3_root / row["aws_bucket"] / row["crdc_series_uuid"]
        for obj in source.iterdir():
            assert (root / row["target_dir"] / obj.name).read_bytes() == obj.read_bytes()
    assert verify.check_files(manifest, root).passed
    assert not journal_path(state).exists()  # compacted at the end of the run: a small state
    assert len(load_state(state)) == N_SERIES


def test_batches_are_bounded_and_each_is_one_s5cmd_run(many, tmp_path):
    fx, manifest, _ = many
    lines: list[str] = []
    with LocalS3Server(fx.s3_root) as server:
        opts = S5cmdOptions(endpoint_url=server.endpoint_url, workers=4, retry_count=1)
        download(manifest, tmp_path / "dl", opts, EngineOptions(log=lines.append, batch_files=BATCH_FILES))
        runs = [line for line in lines if line.startswith("downloading ")]
        assert len(runs) == -(-N_SERIES // 3)  # ceil: 3 series of 5 files per batch
        sizes = [line.split(" series (")[1].split(" files")[0] for line in runs]
        assert sizes == ["15"] * (N_SERIES // 3) + ([str(FILES * (N_SERIES % 3))] if N_SERIES % 3 else []), runs
        server.reset_stats()
        again = download(manifest, tmp_path / "dl", opts, EngineOptions(log=lines.append, batch_files=BATCH_FILES))
        assert again.skipped_series == N_SERIES and server.stats["get_object"] == 0 and server.stats["list"] == 0


def test_a_series_is_journaled_as_soon_as_it_verifies(many, tmp_path):
    """While the transfer of a batch still runs, the series already complete are in the journal."""
    fx, manifest, manifest_path = many
    root = tmp_path / "dl"
    state = state_path_for(root.absolute(), manifest)
    with LocalS3Server(fx.s3_root) as server:
        server.faults.delay_s = 0.05
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(manifest_path), str(root), server.endpoint_url, str(10_000)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        journaled = 0
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if journal_path(state).exists():
                    journaled = sum(1 for _ in journal_path(state).open())
                    if journaled >= 2:
                        break
                time.sleep(0.02)
            running = proc.poll() is None
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert journaled >= 2 and running  # one batch (all 16 series), recorded as they land
    assert len(load_state(state, lambda _m: None)) >= 2


def test_old_and_broken_states_are_read_or_rebuilt(many, tmp_path):
    fx, manifest, _ = many
    root = tmp_path / "dl"
    with LocalS3Server(fx.s3_root) as server:
        opts = S5cmdOptions(endpoint_url=server.endpoint_url, workers=4, retry_count=1)
        download(manifest, root, opts, EngineOptions(log=lambda _m: None))
        state = state_path_for(root.absolute(), manifest)
        full = load_state(state, files=True)
        assert all(r.files is not None and len(r.files) == FILES for r in full.values())
        # the format of the previous version: names and sizes only
        old = pq.read_table(state).select(
            ["target_dir", "SeriesInstanceUID", "crdc_series_uuid", "series_revised_idc_version", "file_names",
             "file_sizes"]
        )  # fmt: skip
        pq.write_table(old, state)
        server.reset_stats()
        assert download(manifest, root, opts, EngineOptions(log=lambda _m: None)).skipped_series == N_SERIES
        assert server.stats["list"] == 0 and server.stats["get_object"] == 0
        # a journal with a torn last line, garbage and a link planted where it is written
        journal = journal_path(state)
        first = next(iter(full))
        Journal(state).record(first, full[first])
        with journal.open("a") as handle:
            handle.write('{"target_dir": "x/", "crdc')
        messages: list[str] = []
        assert len(load_state(state, messages.append)) == N_SERIES
        assert any("torn or malformed" in m for m in messages)
        writer = Journal(state)
        writer.record(first, full[first])  # appended on a line of its own after the torn one
        writer.close()
        assert len(load_state(state, lambda _m: None)) == N_SERIES
        journal.unlink()
        victim = tmp_path / "victim"
        victim.write_text("precious")
        journal.symlink_to(victim)
        with pytest.raises(OSError):
            Journal(state).record(first, full[first])
        assert victim.read_text() == "precious"
        lines: list[str] = []
        assert len(load_state(state, lines.append)) == N_SERIES and any("not a regular file" in m for m in lines)
        assert not journal.is_symlink() and victim.read_text() == "precious"


def test_recorded_names_name_the_file_that_differs(many, tmp_path):
    fx, manifest, _ = many
    root = tmp_path / "dl"
    with LocalS3Server(fx.s3_root) as server:
        download(
            manifest,
            root,
            S5cmdOptions(endpoint_url=server.endpoint_url, retry_count=1),
            EngineOptions(log=lambda _m: None),
        )
    state = state_path_for(root.absolute(), manifest)
    row = manifest.to_pylist()[5]
    names = recorded_files(state, [row["target_dir"]])[row["target_dir"]]
    assert len(names) == FILES and sum(names.values()) == row["series_bytes"]
    victim = root / row["target_dir"] / sorted(names)[0]
    victim.unlink()
    report = verify.check_files(manifest, root)
    assert not report.passed and f"1 of {FILES} file(s) missing (e.g. {victim.name})" in report.problems[0]


def test_slim_records_hold_no_names():
    record = SeriesRecord("1.2", "0" * 8 + "-0000-0000-0000-" + "0" * 12, {"a.dcm": 3, "b.dcm": 4})
    slim = record.slim()
    assert slim.files is None and slim.count == 2 and slim.bytes == 7
    assert slim.holds({"b.dcm": 4, "a.dcm": 3}) and not slim.holds({"a.dcm": 4, "b.dcm": 3})


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_batch_settings_are_checked(manifest, tmp_path, bad):
    with pytest.raises(OptionError, match="batch_files"):
        Download(manifest, tmp_path, S5cmdOptions(endpoint_url="http://127.0.0.1:9"), EngineOptions(batch_files=bad))


def test_the_journal_is_appended_not_rewritten(tmp_path):
    state = tmp_path / "s.parquet"
    journal = Journal(state)
    uuid = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    for i in range(3):
        journal.record(f"d{i}/", SeriesRecord("1", uuid, {"a.dcm": i + 1}))
    inode = journal_path(state).stat().st_ino
    journal.record("d3/", SeriesRecord("1", uuid, {"a.dcm": 9}))
    journal.close()
    assert journal_path(state).stat().st_ino == inode
    entries = [json.loads(line) for line in journal_path(state).read_text().splitlines()]
    assert [e["target_dir"] for e in entries] == ["d0/", "d1/", "d2/", "d3/"]
    assert entries[3]["file_names"] == ["a.dcm"] and entries[3]["file_sizes"] == [9]


def test_the_download_adds_one_header_cache_part_per_batch_and_the_check_folds_them(many, tmp_path):
    """The download never loads nor rewrites the whole header cache (memory: one batch); the
    check reads every part, finds every file already read, and folds the parts into the cache."""
    from dataset_assets.core.verify.checks import check_headers, header_cache_path
    from dataset_assets.core.verify.dicom_headers import HeaderCache

    fx, manifest, _ = many
    root = tmp_path / "dl"
    cache = header_cache_path(root.absolute(), manifest)
    with LocalS3Server(fx.s3_root) as server:
        opts = S5cmdOptions(endpoint_url=server.endpoint_url, workers=4, retry_count=1)
        download(
            manifest,
            root,
            opts,
            EngineOptions(log=lambda _m: None, batch_files=BATCH_FILES, watch_batch=header_watch(cache)),
        )
    parts = HeaderCache(cache, root.absolute()).parts()
    assert len(parts) == -(-N_SERIES // 3) and not cache.exists()  # a part per batch, no whole cache
    report = check_headers(manifest, root.absolute(), processes=1, cache_path=cache)
    assert report.passed and report.checked == N_SERIES * FILES and report.notes["read"] == 0
    assert cache.exists() and HeaderCache(cache, root.absolute()).parts() == []  # folded in
    assert len(HeaderCache(cache, root.absolute()).load().entries) == N_SERIES * FILES


def test_what_the_journal_wrote_reaches_the_disk_within_its_interval(tmp_path, monkeypatch):
    import time

    from dataset_assets.core.transfer import state as state_module

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(state_module.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    journal = Journal(tmp_path / "s.parquet", sync_s=0.2)
    uuid = "0" * 8 + "-0000-0000-0000-" + "0" * 12
    journal.record("a/", SeriesRecord("1", uuid, {"a.dcm": 1}))  # handed to the OS at once, fsync later
    journal.record("b/", SeriesRecord("1", uuid, {"a.dcm": 2}))
    journal.sync_if_due()
    assert synced == [] and len(journal_path(tmp_path / "s.parquet").read_text().splitlines()) == 2
    time.sleep(0.3)  # no more series verify, but the download keeps calling (twice a second)
    journal.sync_if_due()
    assert len(synced) == 1
    journal.sync_if_due()  # nothing new: no fsync
    assert len(synced) == 1
    journal.close()


@pytest.mark.parametrize(
    "names",
    [
        ["a.dcm", "b-1.dcm"],
        [],
        ["a/b"],
        ["a", "/b"],
        ["a", ""],
        ["."],
        [".."],
        ["a\n"],
        ["a", "b\nc"],
        ["x" * 251],
        ["x" * 252],
        ["ok", 3],
        ["é.dcm"],
        ["a", None],
        "abc",
        None,
    ],
)
def test_object_names_checked_at_once_agree_with_one_by_one(names):
    from dataset_assets.core.safety import object_name_problem, object_names_ok

    one_by_one = isinstance(names, list) and all(object_name_problem(n) is None for n in names)
    assert object_names_ok(names) is one_by_one
