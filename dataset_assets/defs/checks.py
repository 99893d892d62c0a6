"""Asset checks. Blocking checks stop downstream work in the same run when they fail:

* the index checks block, because manifests built from an index without its URLs or UIDs
  would send every download astray;
* file counts/bytes and DICOM headers block, because a collection with missing or foreign
  files must not feed training or analysis as if it were whole;
* stray files only warn: they are extra, not missing, and may be the user's own notes.
"""

import warnings
from collections.abc import Callable
from pathlib import Path

import dagster as dg
from pydantic import Field

from dataset_assets.core.errors import DatasetError

from .download_assets import downloaded_collection
from .index_assets import idc_index
from .metadata import failure
from .partitions import collection_partitions
from .resources import CheckedConfig, IdcResource, IndexDatabase, S5cmdResource


def _result(report, what: str, severity=dg.AssetCheckSeverity.ERROR) -> dg.AssetCheckResult:
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


@dg.asset_check(asset=idc_index, blocking=False)
def idc_index_rows_are_safe(duckdb: IndexDatabase, s5cmd: S5cmdResource) -> dg.AssetCheckResult:
    """Every row can be downloaded as it is: its bucket is allowed, `crdc_series_uuid` is a UUID,
    `series_aws_url` is `s3://<aws_bucket>/<crdc_series_uuid>/*`, `collection_id` is a plain name
    and the counts are counts. Downloads refuse such rows one by one (naming them); this says
    ahead of time how many there are (a warning: every other series still downloads). Counted
    once per index snapshot (see `index_facts`), so re-materializing a release costs milliseconds."""
    from dataset_assets.core.index.source import index_facts

    with duckdb.get_connection() as con:
        facts = index_facts(con)
    allowed = set(s5cmd.buckets())
    others = [v for bucket, v in sorted(facts["buckets"].items()) if bucket not in allowed]
    problems = {"bucket_not_allowed": sum(v["count"] for v in others)}
    problems.update({kind: facts["problems"][kind]["count"] for kind in UNSAFE_ROW_KINDS[1:]})
    examples = sorted(
        {e for v in others for e in v["examples"]}
        | {e for kind in UNSAFE_ROW_KINDS[1:] for e in facts["problems"][kind]["examples"]}
    )[:3]
    total = sum(problems.values())
    return dg.AssetCheckResult(
        passed=total == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{total} unsafe value(s): "
            + ", ".join(f"{n} {kind}" for kind, n in problems.items() if n)
            + f"; e.g. series {examples}"
            if total
            else "every row is safe to download"
        ),
        metadata={**problems, "examples": str(examples or [])},
    )


UNSAFE_ROW_KINDS = (
    "bucket_not_allowed",
    "uuid_not_a_uuid",
    "url_not_bucket_uuid",
    "collection_id_unsafe",
    "bad_counts",
)


@dg.asset_check(asset=idc_index, blocking=True)
def idc_index_urls_present(duckdb: IndexDatabase) -> dg.AssetCheckResult:
    """No series without `crdc_series_uuid` or `series_aws_url`, so every series can be fetched."""
    from dataset_assets.core.index.source import index_facts

    with duckdb.get_connection() as con:
        found = index_facts(con)["problems"]["without_uuid_or_url"]
    nulls, examples = found["count"], found["examples"]
    return dg.AssetCheckResult(
        passed=nulls == 0,
        description=f"{nulls} series without uuid or URL, e.g. {examples}" if nulls else "every series has both",
        metadata={"series_without_uuid_or_url": nulls},
    )


class HeaderCheckConfig(CheckedConfig):
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


def build_download_checks(
    asset: dg.AssetsDefinition,
    partitions_def: dg.PartitionsDefinition,
    manifest_path: Callable[[IdcResource, str], Path],
    state_path: Callable[[Path, str], Path | None] = lambda root, key: None,
    what: str = "collection",
) -> list[dg.AssetChecksDefinition]:
    """The three checks of a downloaded asset partitioned like ``partitions_def``: files, DICOM
    headers (both blocking) and stray files (a warning). ``manifest_path`` finds a partition's
    manifest; ``state_path`` its download state (default: the collection's)."""

    def check(**kwargs):
        def decorate(fn):
            # Partitioned asset checks are a preview feature in Dagster 1.13 that we rely on
            # knowingly: its warning is silenced here only, never process-wide.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")
                return dg.asset_check(asset=asset, partitions_def=partitions_def, **kwargs)(fn)

        return decorate

    def manifest_of(idc: IdcResource, key: str):
        from dataset_assets.core.select.manifest import read_manifest

        try:
            return read_manifest(manifest_path(idc, key))
        except (DatasetError, FileNotFoundError) as exc:  # one line naming what is wrong with it
            raise failure(exc) from None

    @check(blocking=True)
    def files_match_manifest(context: dg.AssetCheckExecutionContext, idc: IdcResource) -> dg.AssetCheckResult:
        """Every file of every series has its own size as recorded when it was listed or fetched,
        and each series its manifest's `instanceCount` files and bytes."""
        from dataset_assets.core.verify import checks as verify

        root = idc.download_root()
        manifest = manifest_of(idc, context.partition_key)
        report = verify.check_files(manifest, root, state_path(root, context.partition_key))
        return _result(report, "files and bytes per series")

    @check(blocking=True)
    def dicom_headers_match_manifest(
        context: dg.AssetCheckExecutionContext, config: HeaderCheckConfig, idc: IdcResource
    ) -> dg.AssetCheckResult:
        """Every file's DICOM header (read without pixel data) has the PatientID, StudyInstanceUID,
        SeriesInstanceUID and Modality of its manifest row."""
        from dataset_assets.core.verify import checks as verify

        root = idc.download_root()
        manifest = manifest_of(idc, context.partition_key)
        report = verify.check_headers(
            manifest,
            root,
            sample_per_series=config.sample_per_series,
            processes=config.processes,
            cache_path=verify.header_cache_path(root, manifest, state_path(root, context.partition_key)),
            reread=config.reread,
        )
        return _result(report, "DICOM headers")

    @check(blocking=False)
    def no_stray_files(context: dg.AssetCheckExecutionContext, idc: IdcResource) -> dg.AssetCheckResult:
        """No stray or partial file in the tree of the downloaded series (warning only)."""
        from dataset_assets.core.verify import checks as verify

        report = verify.check_tree(manifest_of(idc, context.partition_key), idc.download_root())
        return _result(report, f"files in the {what}'s tree", severity=dg.AssetCheckSeverity.WARN)

    return [files_match_manifest, dicom_headers_match_manifest, no_stray_files]


index_checks = [idc_index_rows_are_safe, idc_index_urls_present]
download_checks = build_download_checks(
    downloaded_collection, collection_partitions, lambda idc, collection_id: idc.manifest_path(collection_id)
)
