"""Incremental refresh between two fixture releases: only new and revised series move."""

import pytest

from dataset_assets.core.index.source import IndexSource
from dataset_assets.core.select.filters import ManifestFilters
from dataset_assets.core.select.manifest import build_manifest, is_whole_collection
from dataset_assets.core.transfer.control import CONTROL_DIR
from dataset_assets.core.transfer.download import EngineOptions, download, load_state
from dataset_assets.core.transfer.s5cmd import S5cmdOptions
from dataset_assets_tests.support.fixture import next_release


def test_new_release_fetches_only_new_and_revised_series(idc_fixture, s3, manifest, tmp_path):
    root, state = tmp_path / "dl", tmp_path / "dl" / CONTROL_DIR / "state" / "qin_pet_phantom.parquet"
    options = S5cmdOptions(endpoint_url=s3.endpoint_url, retry_count=1)
    download(manifest, root, options, EngineOptions(log=lambda m: None, state_path=state))
    old_dir = root / manifest.to_pylist()[1]["target_dir"]
    old_files = sorted(p.name for p in old_dir.glob("*.dcm"))

    release = next_release(idc_fixture, s3.root, tmp_path)
    with IndexSource(release.index_dir).connect() as con:
        assert con.execute("SELECT max(idc_version) FROM version_metadata_index").fetchone()[0] == 26
        new_manifest = build_manifest(con, "qin_pet_phantom")
    s3.reset_stats()
    log = []
    result = download(new_manifest, root, options, EngineOptions(log=log.append, state_path=state))

    expected = {f"{r['crdc_series_uuid']}/" for r in (release.revised, release.added)}
    assert s3.stats["get_object"] == 6 and {k.split("/")[0] + "/" for k in s3.get_keys} == expected
    assert result.failed_series == [] and result.skipped_series == 4
    assert len(result.replaced_series) == 1 and release.revised["SeriesInstanceUID"] in result.replaced_series[0]
    assert len(result.removed_series) == 1 and release.removed["SeriesInstanceUID"] in result.removed_series[0]
    # revised series: new files in place, the previous ones kept aside, never deleted silently
    assert len(list(old_dir.glob("*.dcm"))) == 3
    kept = root / CONTROL_DIR / "replaced" / idc_fixture.rows[1]["crdc_series_uuid"]
    assert sorted(p.name for p in kept.glob("*.dcm")) == old_files
    # removed series: still on disk, reported
    assert len(list((root / manifest.to_pylist()[4]["target_dir"]).glob("*.dcm"))) == 4
    assert any("no longer in the collection; kept on disk" in line for line in log)


def test_interrupted_refresh_does_not_set_the_new_revision_aside_again(idc_fixture, s3, manifest, tmp_path):
    """Stopped after the revised series was set aside: the next run resumes it in place,
    without moving the new files aside as if they were the old revision."""
    root, state = tmp_path / "dl", tmp_path / "dl" / CONTROL_DIR / "state" / "qin_pet_phantom.parquet"
    options = S5cmdOptions(endpoint_url=s3.endpoint_url, retry_count=1)
    download(manifest, root, options, EngineOptions(log=lambda m: None, state_path=state))
    release = next_release(idc_fixture, s3.root, tmp_path)
    with IndexSource(release.index_dir).connect() as con:
        new_manifest = build_manifest(con, "qin_pet_phantom")

    revised_dir = root / next(
        r["target_dir"]
        for r in new_manifest.to_pylist()
        if r["crdc_series_uuid"] == release.revised["crdc_series_uuid"]
    )

    def stop_once_new_files_land(line):
        if line.startswith("progress: ") and any(revised_dir.glob("*.dcm")):
            raise KeyboardInterrupt  # as Ctrl-C or a terminated run: new files in place, no state saved

    s3.faults.delay_s = 0.4
    slow = S5cmdOptions(endpoint_url=s3.endpoint_url, retry_count=1, workers=1)
    with pytest.raises(KeyboardInterrupt):
        download(
            new_manifest,
            root,
            slow,
            EngineOptions(log=stop_once_new_files_land, state_path=state, progress_interval_s=0.1),
        )
    replaced = root / CONTROL_DIR / "replaced"
    assert [p.name for p in replaced.iterdir()] == [idc_fixture.rows[1]["crdc_series_uuid"]]
    landed = {p.name for p in revised_dir.glob("*.dcm")}
    s3.faults.delay_s = 0
    log = []
    result = download(new_manifest, root, options, EngineOptions(log=log.append, state_path=state))
    assert [p.name for p in replaced.iterdir()] == [idc_fixture.rows[1]["crdc_series_uuid"]]  # no ".1" copy
    assert result.failed_series == [] and not any("was revised" in line for line in log)
    now = {p.name for p in revised_dir.glob("*.dcm")}
    assert landed and landed <= now and len(now) == 3  # the new files stayed where they were


def test_a_filtered_selection_reports_nothing_removed(idc_fixture, s3, manifest, tmp_path):
    """The series a filter leaves out were not removed from IDC: no such report."""
    root, state = tmp_path / "dl", tmp_path / "dl" / CONTROL_DIR / "state" / "qin_pet_phantom.parquet"
    options = S5cmdOptions(endpoint_url=s3.endpoint_url, retry_count=1)
    download(manifest, root, options, EngineOptions(log=lambda m: None, state_path=state))
    with IndexSource(idc_fixture.index_dir).connect() as con:
        one = build_manifest(
            con, "qin_pet_phantom", ManifestFilters(series_uids=[idc_fixture.rows[0]["SeriesInstanceUID"]])
        )
    assert not is_whole_collection(one) and is_whole_collection(manifest)
    log = []
    result = download(one, root, options, EngineOptions(log=log.append, state_path=state))
    assert result.removed_series == [] and not any("no longer" in line for line in log)
    assert len(load_state(state)) == 6  # the other series stay recorded


def test_incremental_refresh_through_the_assets(idc_fixture, s3, tmp_path):
    import dagster as dg

    from dataset_assets.defs.downloads.download_assets import downloaded_collection
    from dataset_assets.defs.downloads.manifest_assets import collection_manifest
    from dataset_assets.lib.resources import IdcResource, S5cmdResource

    def resources(index_dir):
        return {
            "idc": IdcResource(
                index_dir=str(index_dir), manifest_dir=str(tmp_path / "m"), download_dir=str(tmp_path / "d")
            ),
            "s5cmd": S5cmdResource(endpoint_url=s3.endpoint_url, retry_count=1),
        }

    assets = [collection_manifest, downloaded_collection]
    assert dg.materialize(assets, resources=resources(idc_fixture.index_dir), partition_key="qin_pet_phantom").success
    release = next_release(idc_fixture, s3.root, tmp_path)
    s3.reset_stats()
    result = dg.materialize(assets, resources=resources(release.index_dir), partition_key="qin_pet_phantom")
    meta = result.asset_materializations_for_node("downloaded_collection")[0].metadata
    assert s3.stats["get_object"] == 6 and meta["transferred_files"].value == 6
    assert meta["series_replaced"].value == 1 and meta["series_removed_from_manifest"].value == 1
    assert release.revised["SeriesInstanceUID"] in meta["replaced_and_removed"].value
    assert release.removed["SeriesInstanceUID"] in meta["replaced_and_removed"].value


def test_cli_refresh_of_a_revised_series(idc_fixture, s3, tmp_path):
    import os
    import subprocess
    import sys

    dataset = os.path.join(os.path.dirname(sys.executable), "dataset")
    dest = tmp_path / "out"
    env = {**os.environ, "IDC_INDEX_DIR": str(idc_fixture.index_dir), "IDC_S3_ENDPOINT_URL": s3.endpoint_url}
    assert (
        subprocess.run(
            [dataset, "idc", "download", "qin_pet_phantom", str(dest)], env=env, capture_output=True
        ).returncode
        == 0
    )
    release = next_release(idc_fixture, s3.root, tmp_path)
    env["IDC_INDEX_DIR"] = str(release.index_dir)
    s3.reset_stats()
    proc = subprocess.run(
        [dataset, "idc", "download", "qin_pet_phantom", str(dest)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert s3.stats["get_object"] == 6 and "was revised" in proc.stderr
