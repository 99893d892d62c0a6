"""Asset checks. Blocking checks stop downstream work in the same run when they fail:

* the index checks block, because manifests built from an index without its URLs or UIDs
  would send every download astray;
* file counts/bytes and DICOM headers block, because a collection with missing or foreign
  files must not feed training or analysis as if it were whole;
* stray files only warn: they are extra, not missing, and may be the user's own notes.
"""

import warnings

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from dataset_assets.core import verify
from dataset_assets.core.index import REQUIRED_COLUMNS
from dataset_assets.core.manifest import read_manifest

from .download_assets import downloaded_collection
from .index_assets import idc_index
from .partitions import collection_partitions
from .resources import IdcResource


def _partitioned_check(**kwargs):
    """``dg.asset_check`` on ``downloaded_collection`` with the collection partitions. Partitioned
    asset checks are a preview feature in Dagster 1.13 that we rely on knowingly: its warning is
    silenced here only, never process-wide."""

    def decorate(fn):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")
            return dg.asset_check(asset=downloaded_collection, partitions_def=collection_partitions, **kwargs)(fn)

    return decorate


def _result(report: verify.CheckReport, what: str, severity=dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=report.passed,
        severity=severity,
        description=report.summary(what),
        metadata={
            "checked": report.checked,
            "problems": report.problem_count,
            "culprit_series": len(report.culprit_series),
            "first_problems": (
                dg.MetadataValue.md("\n".join(f"- {p}" for p in report.problems))
                if report.problems
                else dg.MetadataValue.text("none")
            ),
            **{k: (v if isinstance(v, (int, float)) else str(v)) for k, v in report.notes.items()},
        },
    )


@dg.asset_check(asset=idc_index, blocking=True)
def idc_index_has_required_columns(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    """Every column the manifests, downloads and checks rely on is present in `idc_index`."""
    with duckdb.get_connection() as con:
        present = {r[0] for r in con.execute("DESCRIBE idc_index").fetchall()}
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    return dg.AssetCheckResult(
        passed=not missing,
        description=f"missing: {', '.join(missing)}" if missing else f"all {len(REQUIRED_COLUMNS)} present",
        metadata={"required": len(REQUIRED_COLUMNS), "missing": ", ".join(missing) or "none"},
    )


@dg.asset_check(asset=idc_index, blocking=True)
def idc_index_urls_present(duckdb: DuckDBResource) -> dg.AssetCheckResult:
    """No series without `crdc_series_uuid` or `series_aws_url`, so every series can be fetched."""
    with duckdb.get_connection() as con:
        nulls, examples = con.execute(
            "SELECT count(*), list(SeriesInstanceUID)[1:5] FROM idc_index "
            "WHERE crdc_series_uuid IS NULL OR series_aws_url IS NULL"
        ).fetchone()
    return dg.AssetCheckResult(
        passed=nulls == 0,
        description=f"{nulls} series without uuid or URL, e.g. {examples}" if nulls else "every series has both",
        metadata={"series_without_uuid_or_url": nulls},
    )


@_partitioned_check(blocking=True)
def files_match_manifest(context: dg.AssetCheckExecutionContext, idc: IdcResource) -> dg.AssetCheckResult:
    """Every series has exactly its manifest's `instanceCount` files and bytes on disk."""
    collection_id = context.partition_key
    report = verify.check_files(read_manifest(idc.manifest_path(collection_id)), idc.download_root())
    return _result(report, "files and bytes per series")


class HeaderCheckConfig(dg.Config):
    sample_per_series: int = Field(
        default=0, ge=0, description="Read only this many files per series (0: all). For very large collections."
    )
    processes: int = Field(
        default=0, ge=0, description="Worker processes reading headers (0: one per CPU of the step's machine)."
    )
    reread: bool = Field(
        default=False,
        description="Read every header again. By default a file whose header matched before (read by this "
        "check, or by the download as the file arrived) and whose size and mtime are unchanged is not re-read.",
    )


@_partitioned_check(blocking=True)
def dicom_headers_match_manifest(
    context: dg.AssetCheckExecutionContext, config: HeaderCheckConfig, idc: IdcResource
) -> dg.AssetCheckResult:
    """Every file's DICOM header (read without pixel data) has the PatientID, StudyInstanceUID,
    SeriesInstanceUID and Modality of its manifest row."""
    collection_id = context.partition_key
    manifest, root = read_manifest(idc.manifest_path(collection_id)), idc.download_root()
    report = verify.check_headers(
        manifest,
        root,
        sample_per_series=config.sample_per_series,
        processes=config.processes,
        cache_path=verify.header_cache_path(root, manifest),
        reread=config.reread,
    )
    return _result(report, "DICOM headers")


@_partitioned_check(blocking=False)
def no_stray_files(context: dg.AssetCheckExecutionContext, idc: IdcResource) -> dg.AssetCheckResult:
    """No stray or partial file in the collection's tree (warning only)."""
    collection_id = context.partition_key
    report = verify.check_tree(read_manifest(idc.manifest_path(collection_id)), idc.download_root())
    return _result(report, "files in the collection's tree", severity=dg.AssetCheckSeverity.WARN)


index_checks = [idc_index_has_required_columns, idc_index_urls_present]
download_checks = [files_match_manifest, dicom_headers_match_manifest, no_stray_files]
