"""Cohorts as assets, built from declarations (the ``IdcCohorts`` component, or the deprecated
``$IDC_COHORTS_FILE``): one partition per cohort (sets of series across collections, or shards of a
huge one), with the download engine, state, resume and checks of collections.

A declaration that cannot be used never takes the code location down: the cohort assets then have
no partitions, say why in their description, and fail in one line when run.
"""

import hashlib
from pathlib import Path

import dagster as dg

from dataset_assets import settings
from dataset_assets.core.errors import DatasetError
from dataset_assets.core.fmt import human_bytes
from dataset_assets.core.select.cohort_file import Cohort
from dataset_assets.core.select.layout import default_max_path
from dataset_assets.core.transfer.control import DownloadRoot
from dataset_assets.defs.automation.refresh import refresh_downloaded_condition
from dataset_assets.defs.catalog.index_assets import idc_index
from dataset_assets.defs.downloads.checks import build_download_checks
from dataset_assets.defs.downloads.download_assets import DOWNLOAD_ASSET, materialize_download
from dataset_assets.lib.groups import DOWNLOADS_GROUP, OWNERS
from dataset_assets.lib.metadata import failure
from dataset_assets.lib.resources import IdcResource, S5cmdResource


def cohort_manifest_path(idc: IdcResource, name: str) -> Path:
    return idc.cohort_manifest_path(name)


def cohort_state_path(root: Path, name: str) -> Path:
    return DownloadRoot(root).state_path(f"cohort-{name}")


def _fingerprint(cohort: Cohort) -> str:
    text = repr((cohort.sql, cohort.collection_id, cohort.filters.as_dict(), cohort.layout))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_cohort_defs(cohorts: dict[str, Cohort], problem: str | None = None) -> dg.Definitions:
    """``cohort_manifest`` and ``downloaded_cohort`` (partitioned by cohort name) with the three
    download checks; ``problem``: why the declarations could not be used (no partitions then)."""
    cohort_partitions = dg.StaticPartitionsDefinition(sorted(cohorts))
    note = f" Cohort declarations problem: {problem}" if problem else ""

    def _cohort(name: str) -> Cohort:
        if problem:
            raise failure(problem, retry=False)
        return cohorts[name]

    @dg.asset(
        deps=[idc_index],
        partitions_def=cohort_partitions,
        group_name=DOWNLOADS_GROUP,
        kinds={"parquet", "duckdb"},
        owners=OWNERS,
        tags={"domain": "idc"},
        description="The series of one declared cohort (a SQL query over the local indices, or a collection "
        "with filters; across collections, or one shard of a huge one), each with its URL, size and target "
        "directory: one Parquet file per cohort in `$IDC_MANIFEST_DIR/cohorts/`. A `crdc_series_uuid` only an "
        "earlier release served is selected as the CLI selects it (its file count and bytes are listed when "
        "`downloaded_cohort` runs)." + note,
    )
    def cohort_manifest(context: dg.AssetExecutionContext, idc: IdcResource) -> dg.MaterializeResult:
        from dataset_assets.core.index import extra_index as extra
        from dataset_assets.core.index.source import release_of
        from dataset_assets.core.select import manifest as mf
        from dataset_assets.core.select.card import selection_metadata
        from dataset_assets.core.select.cohorts import build_cohort_manifest, not_in_index, prior_series

        cohort = _cohort(context.partition_key)
        root = idc.download_root()
        try:
            with extra.connect_all(idc.source(), settings.index_store()) as con:
                release = release_of(con)
                table = build_cohort_manifest(con, cohort, root_length=len(str(root)), max_path=default_max_path())
        except DatasetError as exc:
            raise failure(exc) from None
        prior = len(prior_series(table))
        if prior:
            context.log.info(
                f"cohort {cohort.name}: {prior:,} series of earlier releases (prior_versions_index); as with the CLI, "
                "their files and bytes come from one listing each when downloaded_cohort runs"
            )
        missing = not_in_index(table)
        if missing:
            context.log.warning(
                f"cohort {cohort.name}: {missing:,} series its SQL returns are not in idc_index (release v{release}) "
                "nor, as crdc_series_uuid, in prior_versions_index; they are left out"
            )
        selection = {"cohort": cohort.name, "sql": cohort.sql, "collection_id": cohort.collection_id}
        selection.update(filters=cohort.filters.as_dict(), layout=cohort.layout, idc_release=f"v{release}")
        table = selection_metadata(table, {k: v for k, v in selection.items() if v is not None})
        path = mf.write_manifest(table, cohort_manifest_path(idc, cohort.name))
        stats = mf.summarize(table)
        collections = sorted(set(table.column("collection_id").to_pylist()))
        context.log.info(
            f"cohort {cohort.name}: {stats['series']:,} series of {len(collections)} collection(s), "
            f"{stats['instances']:,} instances, {human_bytes(stats['bytes'])} -> {path}"
        )
        return dg.MaterializeResult(
            data_version=dg.DataVersion(f"v{release}-{_fingerprint(cohort)}"),
            metadata={
                "series": stats["series"],
                "instances": stats["instances"],
                "bytes": stats["bytes"],
                "size": human_bytes(stats["bytes"]),
                "collections": ", ".join(collections),
                "modalities": ", ".join(stats["modalities"]),
                "dagster/row_count": stats["series"],
                "idc_release": f"v{release}",
                "series_not_in_index": missing,
                "prior_release_series": prior,
                "definition": dg.MetadataValue.md(f"```sql\n{cohort.sql}\n```" if cohort.sql else str(cohort)),
                "manifest_path": dg.MetadataValue.path(str(path)),
            },
        )

    @dg.asset(
        deps=[cohort_manifest],
        partitions_def=cohort_partitions,
        **DOWNLOAD_ASSET,
        automation_condition=refresh_downloaded_condition,
        description="Every DICOM file of the cohort's manifest under `$IDC_DOWNLOAD_DIR`, fetched with s5cmd and "
        "verified file by file, with the state, resume and checks of collections. Cohorts and collections share "
        "the root: a series two of them select is fetched once, by whichever comes first." + note,
    )
    def downloaded_cohort(
        context: dg.AssetExecutionContext, idc: IdcResource, s5cmd: S5cmdResource
    ) -> dg.MaterializeResult:
        from dataset_assets.core.select.cohorts import list_prior_series
        from dataset_assets.lib.cards import card_writer

        cohort = _cohort(context.partition_key)
        root = idc.download_root()
        path = cohort_manifest_path(idc, cohort.name)
        return materialize_download(
            context,
            s5cmd,
            root,
            lambda: list_prior_series(path, cohort.name, s5cmd.options(), s5cmd.buckets()),
            f"cohort={cohort.name}",
            cohort_state_path(root, cohort.name),
            card=card_writer(idc, f"cohort-{cohort.name}", "cohort"),
            preview_name=f"cohort-{cohort.name}",
        )

    checks = build_download_checks(
        downloaded_cohort, cohort_partitions, cohort_manifest_path, cohort_state_path, what="cohort"
    )
    return dg.Definitions(assets=[cohort_manifest, downloaded_cohort], asset_checks=checks)
