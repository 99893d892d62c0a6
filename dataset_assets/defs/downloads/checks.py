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
from dataset_assets.defs.downloads.download_assets import downloaded_collection
from dataset_assets.lib.metadata import failure
from dataset_assets.lib.partitions import collection_partitions
from dataset_assets.lib.resources import CheckedConfig, IdcResource


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
    """The four checks of a downloaded asset partitioned like ``partitions_def``: files, DICOM
    headers (both blocking), stray files and restricted licences (warnings). ``manifest_path`` finds a partition's
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

    @check(blocking=False)
    def licences_allow_any_use(context: dg.AssetCheckExecutionContext, idc: IdcResource) -> dg.AssetCheckResult:
        """Every series is under an attribution-only licence (CC BY); a warning names how many
        series are under licences that restrict their use (CC BY-NC: no commercial use; NLM's terms)."""
        from dataset_assets.core.select.licences import licence_counts, restricted, restriction_text

        counts = licence_counts(manifest_of(idc, context.partition_key))
        held = restricted(counts)
        return dg.AssetCheckResult(
            passed=not held,
            severity=dg.AssetCheckSeverity.WARN,
            description=restriction_text(counts),
            metadata={
                "restricted_series": sum(held.values()),
                "restricted_licences": ", ".join(held) or "none",
                "series_per_licence": dg.MetadataValue.json(counts),
            },
        )

    return [files_match_manifest, dicom_headers_match_manifest, no_stray_files, licences_allow_any_use]


download_checks = build_download_checks(
    downloaded_collection, collection_partitions, lambda idc, collection_id: idc.manifest_path(collection_id)
)

defs = dg.Definitions(asset_checks=download_checks)
