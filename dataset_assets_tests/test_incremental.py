"""Incremental refresh between two fixture releases: only new and revised series move."""

from dataset_assets.core.download import CONTROL_DIR, download
from dataset_assets.core.index import IndexSource
from dataset_assets.core.manifest import build_manifest
from dataset_assets.core.s5cmd import S5cmdOptions
from dataset_assets_tests.support.fixture import next_release


def test_new_release_fetches_only_new_and_revised_series(idc_fixture, s3, manifest, tmp_path):
    root, state = tmp_path / "dl", tmp_path / "dl" / CONTROL_DIR / "state" / "qin_pet_phantom.parquet"
    options = S5cmdOptions(endpoint_url=s3.endpoint_url, retry_count=1)
    download(manifest, root, options, log=lambda m: None, state_path=state)
    old_dir = root / manifest.to_pylist()[1]["target_dir"]
    old_files = sorted(p.name for p in old_dir.glob("*.dcm"))

    release = next_release(idc_fixture, s3.root, tmp_path)
    with IndexSource(release.index_dir).connect() as con:
        assert con.execute("SELECT max(idc_version) FROM version_metadata_index").fetchone()[0] == 26
        new_manifest = build_manifest(con, "qin_pet_phantom")
    s3.reset_stats()
    log = []
    result = download(new_manifest, root, options, log=log.append, state_path=state)

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
    assert any("no longer in the manifest; kept on disk" in line for line in log)
