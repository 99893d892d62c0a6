"""Keeping data current: the release sensor, schedules, and declarative automation.

* ``idc_release_sensor`` (on by default): when the installed index carries another IDC release
  than the last materialized ``idc_index``, or than a materialized manifest, it requests their
  refresh. Manifests are rebuilt with the config they were last built with (filters, layout);
  on-demand indices fetched before (``idc_extra_index``) are fetched again for the new release.
* ``downloaded_collection`` has an automation condition: a collection that was downloaded
  before is brought up to date when its manifest changes (only new or revised series move;
  revised ones are set aside, removed ones reported). Collections never downloaded are never
  downloaded by automation: 100 TB is not a default.
* ``weekly_index_refresh`` (on): re-materializes ``idc_index`` and ``idc_collections`` weekly.
* ``watched_collections_schedule`` comes from the ``IdcWatchedCollections`` declaration in
  ``watched/defs.yaml`` (see ``lib/watched.py``).
"""

import datetime

import dagster as dg

from dataset_assets import settings
from dataset_assets.core.index.source import IndexSource
from dataset_assets.defs.catalog.index_assets import idc_collections, idc_index
from dataset_assets.lib.partitions import collection_partitions

MANIFEST = dg.AssetKey("collection_manifest")
EXTRA_INDEX = dg.AssetKey("idc_extra_index")
COHORT_MANIFEST = dg.AssetKey("cohort_manifest")

refresh_index_job = dg.define_asset_job(
    name="refresh_idc_index",
    description="Reload the IDC index into DuckDB and rebuild the table of collections.",
    selection=dg.AssetSelection.assets(idc_index, idc_collections),
)

refresh_downloaded_condition = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.missing()
    # shards are a way to download a collection, not a part every download needs
    & ~dg.AutomationCondition.any_deps_missing().ignore(dg.AssetSelection.assets("downloaded_collection_shard"))
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("manifest changed, downloaded before")


def _latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1
    ).records
    if not records:
        return {}
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def manifest_run_config(instance: dg.DagsterInstance, collection_id: str) -> dict:
    """Run config that rebuilds a manifest with the config of its last materialization."""
    config = _latest_metadata(instance, MANIFEST, collection_id).get("manifest_config")
    return {"ops": {"collection_manifest": {"config": config}}} if config else {}


def _stale(context: dg.SensorEvaluationContext, key: dg.AssetKey, release: str) -> list[str]:
    """Materialized partitions of ``key`` whose last materialization was of another IDC release."""
    return [
        pk
        for pk in sorted(context.instance.get_materialized_partitions(key))
        if _latest_metadata(context.instance, key, pk).get("idc_release") != release
    ]


@dg.sensor(
    name="idc_release_sensor",
    description="Refreshes idc_index, idc_collections and materialized manifests when the installed "
    "idc-index-data carries a different IDC release than they were built from.",
    asset_selection=dg.AssetSelection.assets(idc_index, idc_collections, MANIFEST, EXTRA_INDEX, COHORT_MANIFEST),
    minimum_interval_seconds=600,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def idc_release_sensor(context: dg.SensorEvaluationContext):
    release = f"v{IndexSource.at(settings.IDC_INDEX_DIR.get()).release()}"
    # The day in the run key: a refresh that failed (say, DuckDB held by someone) is asked again
    # the next day instead of never.
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    requests = []
    if _latest_metadata(context.instance, idc_index.key).get("idc_release") != release:
        requests.append(
            dg.RunRequest(
                run_key=f"idc-release-{release}-{day}",
                asset_selection=[idc_index.key, idc_collections.key],
                tags={"idc/release": release},
            )
        )
    known = set(collection_partitions.get_partition_keys())
    stale = [  # (asset, partition, run config, run key suffix) of each partition built from another release
        *(
            (MANIFEST, pk, manifest_run_config(context.instance, pk), pk)
            for pk in _stale(context, MANIFEST, release)
            if pk in known
        ),  # a collection the new release no longer has: nothing to rebuild
        *((COHORT_MANIFEST, name, {}, f"cohort-{name}") for name in _stale(context, COHORT_MANIFEST, release)),
        *((EXTRA_INDEX, name, {}, f"index-{name}") for name in _stale(context, EXTRA_INDEX, release)),
    ]
    for key, partition, run_config, suffix in stale:
        requests.append(
            dg.RunRequest(
                run_key=f"idc-release-{release}-{day}-{suffix}",
                asset_selection=[key],
                partition_key=partition,
                run_config=run_config,
                tags={"idc/release": release},
            )
        )
    if not requests:
        return dg.SkipReason(f"everything materialized is from IDC {release}")
    return requests


weekly_index_refresh = dg.ScheduleDefinition(
    name="weekly_index_refresh",
    job=refresh_index_job,
    cron_schedule="0 5 * * 1",
    description="Every Monday 05:00: reload the IDC index and the table of collections.",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)


idc_automation_sensor = dg.AutomationConditionSensorDefinition(
    "idc_automation_sensor",
    target=dg.AssetSelection.assets("downloaded_collection"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Evaluates automation conditions: re-downloads collections whose manifest changed.",
)

defs = dg.Definitions(
    jobs=[refresh_index_job],
    schedules=[weekly_index_refresh],
    sensors=[idc_release_sensor, idc_automation_sensor],
)
