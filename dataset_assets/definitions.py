"""The one place that wires the project: ``dataset_assets.definitions:defs``."""

import dagster as dg

from dataset_assets import settings
from dataset_assets.defs import automation
from dataset_assets.defs.checks import download_checks, index_checks
from dataset_assets.defs.cohort_assets import cohort_checks, cohort_manifest, downloaded_cohort
from dataset_assets.defs.download_assets import downloaded_collection, downloaded_collection_shard
from dataset_assets.defs.executors import executor_from_env
from dataset_assets.defs.extra_index_assets import idc_extra_index
from dataset_assets.defs.http_assets import http_datasets
from dataset_assets.defs.index_assets import idc_collections, idc_index
from dataset_assets.defs.jobs import download_collections_job, verify_downloads_job
from dataset_assets.defs.manifest_assets import collection_manifest
from dataset_assets.defs.resources import IdcResource, IndexDatabase, S5cmdResource

defs = dg.Definitions(
    assets=[
        idc_index,
        idc_collections,
        idc_extra_index,
        collection_manifest,
        downloaded_collection,
        downloaded_collection_shard,
        cohort_manifest,
        downloaded_cohort,
        http_datasets,
    ],
    asset_checks=[*index_checks, *download_checks, *cohort_checks],
    jobs=[download_collections_job, verify_downloads_job, *automation.jobs],
    schedules=automation.schedules,
    sensors=automation.sensors,
    executor=executor_from_env(),
    resources={
        "idc": IdcResource(),
        "duckdb": IndexDatabase(database=settings.IDC_DUCKDB_PATH.require()),
        "s5cmd": S5cmdResource(),
    },
)
