"""Release sensor, schedules and the automation condition, against real instances."""

import datetime
import shutil

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster_duckdb import DuckDBResource

from dataset_assets.definitions import defs
from dataset_assets.defs.automation.refresh import idc_release_sensor
from dataset_assets.defs.catalog.index_assets import idc_collections, idc_index
from dataset_assets.defs.downloads.download_assets import downloaded_collection
from dataset_assets.defs.downloads.manifest_assets import collection_manifest
from dataset_assets.lib.resources import IdcResource, S5cmdResource
from dataset_assets.lib.watched import build_watched_defs


@pytest.fixture
def release_24(idc_fixture, tmp_path):
    """The fixture index as IDC release v24."""
    folder = tmp_path / "index-v24"
    shutil.copytree(idc_fixture.index_dir, folder)
    versions = pq.read_table(folder / "version_metadata_index.parquet").to_pylist()
    pq.write_table(
        pa.Table.from_pylist([v for v in versions if v["idc_version"] <= 24]), folder / "version_metadata_index.parquet"
    )
    return folder


def test_defaults_users_expect():
    assert {s.name for s in defs.sensors} == {"idc_release_sensor", "idc_automation_sensor"}
    assert {s.name for s in defs.schedules} == {"weekly_index_refresh", "watched_collections_schedule"}
    assert all(s.default_status == dg.DefaultSensorStatus.RUNNING for s in defs.sensors)
    assert (
        defs.get_assets_def("downloaded_collection").automation_conditions_by_key[downloaded_collection.key] is not None
    )


def test_release_sensor_requests_refresh_of_older_release(release_24, idc_fixture, tmp_path, monkeypatch):
    resources = {
        "idc": IdcResource(
            index_dir=str(release_24), manifest_dir=str(tmp_path / "m"), download_dir=str(tmp_path / "d")
        ),
        "duckdb": DuckDBResource(database=str(tmp_path / "idc.duckdb")),
        "s5cmd": S5cmdResource(),
    }
    with dg.instance_for_test() as instance:
        assert dg.materialize([idc_index, idc_collections], resources=resources, instance=instance).success
        assert dg.materialize(
            [collection_manifest],
            resources=resources,
            instance=instance,
            partition_key="qin_pet_phantom",
            run_config={
                "ops": {
                    "collection_manifest": {
                        "config": {"modalities": ["PT"], "layout": "%collection_id/%SeriesInstanceUID"}
                    }
                }
            },
        ).success

        monkeypatch.setenv("IDC_INDEX_DIR", str(release_24))
        assert isinstance(idc_release_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason)

        monkeypatch.setenv("IDC_INDEX_DIR", str(idc_fixture.index_dir))  # release v25 installed
        today = lambda: datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")  # noqa: E731
        before = today()
        requests = idc_release_sensor(dg.build_sensor_context(instance=instance))
        days = {before, today()}  # a run that crosses midnight UTC sees either day
        assert any(
            [r.run_key for r in requests] == [f"idc-release-v25-{day}", f"idc-release-v25-{day}-qin_pet_phantom"]
            for day in days
        ), [r.run_key for r in requests]
        assert set(requests[0].asset_selection) == {idc_index.key, idc_collections.key}
        manifest_request = requests[1]
        assert manifest_request.partition_key == "qin_pet_phantom"
        config = manifest_request.run_config["ops"]["collection_manifest"]["config"]
        assert config["modalities"] == ["PT"] and config["layout"] == "%collection_id/%SeriesInstanceUID"


def _watched_schedule(collections: list[str], cron: str = "0 3 * * *") -> dg.ScheduleDefinition:
    (schedule,) = build_watched_defs(collections, cron, 48, "test").schedules
    return schedule


def test_watched_collections_schedule():
    with dg.instance_for_test() as instance:
        assert isinstance(_watched_schedule([])(dg.build_schedule_context(instance=instance)), dg.SkipReason)
        when = datetime.datetime(2026, 11, 24, 3, 0, tzinfo=datetime.timezone.utc)
        requests = _watched_schedule(["qin_pet_phantom", "nope", "nlst"])(
            dg.build_schedule_context(instance=instance, scheduled_execution_time=when)
        )
        assert [r.partition_key for r in requests] == ["qin_pet_phantom", "nlst"]
        assert requests[0].run_key == "watched-qin_pet_phantom-2026-11-24"
        assert all(r.tags["idc/download"] == "true" for r in requests)


@pytest.mark.parametrize(
    ("collections", "cron", "why"),
    [(["qin\npet"], "0 3 * * *", "watched collection"), (["nlst"], "every day", "is not a cron string")],
)
def test_a_watch_that_cannot_be_used_is_a_stopped_schedule_saying_why(collections, cron, why):
    schedule = _watched_schedule(collections, cron)
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED and why in schedule.description
    with dg.instance_for_test() as instance:
        skipped = schedule(dg.build_schedule_context(instance=instance))
    assert isinstance(skipped, dg.SkipReason) and why in skipped.skip_message


def test_automation_refreshes_only_collections_downloaded_before(idc_fixture, s3, tmp_path):
    resources = {
        "idc": IdcResource(
            index_dir=str(idc_fixture.index_dir), manifest_dir=str(tmp_path / "m"), download_dir=str(tmp_path / "d")
        ),
        "s5cmd": S5cmdResource(endpoint_url=s3.endpoint_url, retry_count=1),
    }
    assets = [collection_manifest, downloaded_collection]
    with dg.instance_for_test() as instance:
        dg.materialize(assets, resources=resources, instance=instance, partition_key="qin_pet_phantom")
        automation_defs = dg.Definitions(assets=assets, resources=resources)
        first = dg.evaluate_automation_conditions(defs=automation_defs, instance=instance)
        assert first.total_requested == 0  # nothing changed; never-downloaded collections stay missing
        # a new release rebuilt the manifest of the downloaded collection and of another one
        for pk in ("qin_pet_phantom", "nlst"):
            dg.materialize(
                [collection_manifest],
                resources={**resources, "idc": IdcResource(manifest_dir=str(tmp_path / "m"))},
                instance=instance,
                partition_key=pk,
            )
        second = dg.evaluate_automation_conditions(defs=automation_defs, instance=instance, cursor=first.cursor)
        requested = second.get_requested_partitions(downloaded_collection.key)
        assert requested == {"qin_pet_phantom"}


def test_release_sensor_refreshes_cohort_manifests_and_fetched_indices(release_24, idc_fixture, tmp_path, monkeypatch):
    from dataset_assets.definitions import defs

    cohort_manifest = defs.get_assets_def("cohort_manifest")  # declared by defs/cohorts/defs.yaml

    resources = {
        "idc": IdcResource(
            index_dir=str(release_24), manifest_dir=str(tmp_path / "m"), download_dir=str(tmp_path / "d")
        )
    }
    with dg.instance_for_test() as instance:
        monkeypatch.setenv("IDC_INDEX_DIR", str(release_24))
        assert dg.materialize(
            [cohort_manifest], resources=resources, instance=instance, partition_key="qin_pet_phantom_pt"
        ).success  # the shipped example cohort
        instance.report_runless_asset_event(
            dg.AssetMaterialization("idc_extra_index", partition="sm_index", metadata={"idc_release": "v24"})
        )
        instance.report_runless_asset_event(  # idc_index is current: only the stale partitions are asked for
            dg.AssetMaterialization("idc_index", metadata={"idc_release": "v25"})
        )
        monkeypatch.setenv("IDC_INDEX_DIR", str(idc_fixture.index_dir))  # release v25 installed
        requests = idc_release_sensor(dg.build_sensor_context(instance=instance))
        asked = {(r.asset_selection[0].to_user_string(), r.partition_key) for r in requests}
        assert asked == {("cohort_manifest", "qin_pet_phantom_pt"), ("idc_extra_index", "sm_index")}
        assert all(r.run_key.startswith("idc-release-v25-") for r in requests)
