"""Issue 18: shards of one collection as partitions of `downloaded_collection_shard`, run by four
`dagster asset materialize` processes at once against one root, then `downloaded_collection`
verifies what they recorded with no request; the CLI's `--shard` and `verify` do the same outside
Dagster. Real Dagster, real s5cmd, a loopback S3 server, real DICOM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from dataset_assets.core.errors import OptionError
from dataset_assets.core.select.shards import parse_shard, shard_count, shard_manifest, shard_of
from dataset_assets_tests.support.envs import project_env
from dataset_assets_tests.support.fixture import build_fixture
from dataset_assets_tests.support.s3server import LocalS3Server

BIN = Path(sys.executable).parent
SHARDS = 4


@pytest.fixture(scope="module")
def twelve(tmp_path_factory):
    return build_fixture(tmp_path_factory.mktemp("twelve"), "qin_pet_phantom", n_series=12, files_per_series=3)


def env_for(tmp_path: Path, fx, server: LocalS3Server) -> dict:
    """The project's environment (``support/envs.py``), split into four shards: the twelve series make four."""
    return project_env(fx, server, tmp_path, IDC_SHARDS=str(SHARDS), IDC_SHARD_MIN_FILES="1")


def materialize(env: dict, select: str, partition: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "dataset_assets.definitions", "--select", select,
         "--partition", partition],
        env=env, cwd=env["DAGSTER_HOME"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_four_shards_in_parallel_then_the_collection_is_complete_with_no_request(twelve, tmp_path):
    fx = twelve
    with LocalS3Server(fx.s3_root, max_lifetime_s=600) as server:
        env = env_for(tmp_path, fx, server)
        first = materialize(env, "collection_manifest", "qin_pet_phantom")
        out = first.communicate(timeout=300)[0]
        assert first.returncode == 0, out[-3000:]
        server.faults.delay_s = 0.1  # the four are in flight together
        procs = [materialize(env, "downloaded_collection_shard", f"qin_pet_phantom|{i:02d}") for i in range(SHARDS)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * SHARDS, "\n".join(o[-2000:] for o in outs)
        assert server.stats["get_object"] == 12 * 3  # every object once, over the four
        state_dir = tmp_path / "idc" / ".dataset_assets" / "state"
        shard_states = sorted(p.name for p in state_dir.glob("qin_pet_phantom.shard-*"))
        assert shard_states == [f"qin_pet_phantom.shard-{i:02d}-of-{SHARDS:02d}.parquet" for i in range(SHARDS)]
        server.reset_stats()
        server.faults.delay_s = 0
        whole = materialize(env, "downloaded_collection", "qin_pet_phantom")
        out = whole.communicate(timeout=300)[0]
        assert whole.returncode == 0, out[-3000:]
        assert server.stats["get_object"] == 0 and server.stats["list"] == 0, server.stats
    for row in fx.rows:  # the union of the shards is the collection, byte for byte
        for obj in (fx.s3_root / row["aws_bucket"] / row["crdc_series_uuid"]).iterdir():
            found = list((tmp_path / "idc").rglob(obj.name))
            assert len(found) == 1 and found[0].read_bytes() == obj.read_bytes()
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:  # shown as downloaded, with lineage
        key = dg.AssetKey("downloaded_collection")
        assert instance.get_latest_materialization_event(key) is not None
        shards = instance.get_materialized_partitions(dg.AssetKey("downloaded_collection_shard"))
        assert len(shards) == SHARDS
    verified = subprocess.run(
        [str(BIN / "dataset"), "idc", "verify", "qin_pet_phantom", str(tmp_path / "idc")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert verified.returncode == 0 and "complete: all 12 series" in verified.stdout, verified.stderr


def test_cli_shards_and_verify(twelve, tmp_path):
    fx = twelve
    dest = tmp_path / "dl"
    with LocalS3Server(fx.s3_root, max_lifetime_s=600) as server:
        env = env_for(tmp_path, fx, server)

        def cli(*args):
            return subprocess.run([str(BIN / "dataset"), "idc", *args], capture_output=True, text=True, timeout=120,
                                  env=env)  # fmt: skip

        part = cli("verify", "qin_pet_phantom", str(dest))
        assert part.returncode == 1 and "incomplete" in part.stdout
        procs = [
            subprocess.Popen([str(BIN / "dataset"), "idc", "download", "qin_pet_phantom", str(dest), "--shard",
                              f"{i}/3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(3)
        ]  # fmt: skip
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outs
        assert server.stats["get_object"] == 36
        done = cli("verify", "qin_pet_phantom", str(dest))
        assert done.returncode == 0 and "complete: all 12 series" in done.stdout
        victim = next(dest.rglob("*.dcm"))
        victim.write_bytes(victim.read_bytes()[:-1])
        broken = cli("verify", "qin_pet_phantom", str(dest))
        assert broken.returncode == 1 and victim.name in broken.stdout and "wrong size" in broken.stdout
        bad = cli("download", "qin_pet_phantom", str(dest), "--shard", "3/3")
        assert bad.returncode == 2 and "INDEX/COUNT" in bad.stderr


def test_shard_membership_is_stable_disjoint_and_complete(twelve):
    from dataset_assets.core.index.source import IndexSource
    from dataset_assets.core.select.manifest import build_manifest

    with IndexSource(twelve.index_dir).connect() as con:
        manifest = build_manifest(con, "qin_pet_phantom")
    parts = [shard_manifest(manifest, i, 4) for i in range(4)]
    uuids = [u for part in parts for u in part.column("crdc_series_uuid").to_pylist()]
    assert sorted(uuids) == sorted(manifest.column("crdc_series_uuid").to_pylist())  # each exactly once
    assert shard_manifest(manifest, 2, 4).equals(parts[2])  # the same every time
    assert all(shard_of(u, 4) == i for i, part in enumerate(parts) for u in part.column("crdc_series_uuid").to_pylist())
    assert shard_count(21_480_654, 16) == 16 and shard_count(2_816, 16) == 1 and shard_count(250_000, 16) == 3
    assert parse_shard("3/16") == (3, 16)
    for bad in ("16/16", "-1/4", "a/b", "3", "0/0", "1/1000"):
        with pytest.raises(OptionError):
            parse_shard(bad)


def test_digits_that_are_not_ascii_are_bad_input_never_a_traceback(twelve, tmp_path):
    from dataset_assets.lib import partitions

    for bad in ("²/4", "1/²", "٣/4"):
        with pytest.raises(OptionError):
            parse_shard(bad)
    env = {**os.environ, "IDC_INDEX_DIR": str(twelve.index_dir)}
    done = subprocess.run(
        [str(BIN / "dataset"), "idc", "download", "qin_pet_phantom", str(tmp_path / "x"), "--shard", "²/4",
         "--dry-run"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr and "INDEX/COUNT" in done.stderr
    for raw in ("²", "٣", "0", "300", "x"):
        os.environ["IDC_SHARDS"] = raw
        try:
            assert partitions.shard_keys() == [f"{i:02d}" for i in range(16)], raw  # logged, and 16 used
        finally:
            del os.environ["IDC_SHARDS"]


def test_dry_run_and_verify_refuse_what_the_download_refuses(twelve, tmp_path):
    env = {**os.environ, "IDC_INDEX_DIR": str(twelve.index_dir)}
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for dest in (dangling, a_file):
        for args in (["download", "qin_pet_phantom", str(dest), "--dry-run"], ["verify", "qin_pet_phantom", str(dest)]):
            done = subprocess.run([str(BIN / "dataset"), "idc", *args], capture_output=True, text=True, timeout=120,
                                  env=env)  # fmt: skip
            errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
            assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, (args, done.stderr)
    assert not (tmp_path / "nowhere").exists()


def test_a_dry_run_says_when_its_counts_are_a_floor(twelve, tmp_path):
    from dataset_assets.core.index.source import IndexSource
    from dataset_assets.core.select.manifest import build_manifest
    from dataset_assets.core.transfer.download import EngineOptions, download
    from dataset_assets.core.transfer.s5cmd import S5cmdOptions

    dest = tmp_path / "dl"
    with IndexSource(twelve.index_dir).connect() as con:
        manifest = build_manifest(con, "qin_pet_phantom")
    with LocalS3Server(twelve.s3_root, max_lifetime_s=300) as server:
        download(
            manifest,
            dest,
            S5cmdOptions(endpoint_url=server.endpoint_url, retry_count=1),
            EngineOptions(log=lambda _m: None),
        )
    victim = next(dest.rglob("*.dcm"))
    victim.write_bytes(victim.read_bytes() + b"x")  # one file too long: no file missing, no byte missing
    env = {**os.environ, "IDC_INDEX_DIR": str(twelve.index_dir)}
    done = subprocess.run([str(BIN / "dataset"), "idc", "download", "qin_pet_phantom", str(dest), "--dry-run"],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 0 and "would fetch 1 of 12 series (at least 0 files" in done.stdout
    assert "1 of these series are partly on disk" in done.stdout


def test_shards_add_to_their_collections_header_cache(twelve, tmp_path):
    """The check of the collection reads nothing the shards' downloads read already."""
    from dataset_assets.core.select.manifest import read_manifest
    from dataset_assets.core.transfer.download import state_path_for
    from dataset_assets.core.verify.checks import check_headers, header_cache_path

    with LocalS3Server(twelve.s3_root, max_lifetime_s=600) as server:
        env = env_for(tmp_path, twelve, server)
        first = materialize(env, "collection_manifest", "qin_pet_phantom")
        assert first.wait(timeout=300) == 0
        procs = [materialize(env, "downloaded_collection_shard", f"qin_pet_phantom|{i:02d}") for i in range(SHARDS)]
        assert [p.wait(timeout=300) for p in procs] == [0] * SHARDS
    root = (tmp_path / "idc").absolute()
    manifest = read_manifest(tmp_path / "manifests" / "qin_pet_phantom.parquet")
    cache = header_cache_path(root, manifest, state_path_for(root, manifest))
    report = check_headers(manifest, root, processes=1, cache_path=cache)
    assert report.passed and report.checked == 36 and report.notes["read"] == 0
    assert not list(cache.parent.glob("*.part-*"))  # folded into the collection's cache
