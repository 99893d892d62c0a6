"""Per-collection manifests: which series to download and where each goes."""

import hashlib
import json
from typing import Literal

import dagster as dg
from pydantic import Field

from dataset_assets import settings
from dataset_assets.core.errors import DatasetError
from dataset_assets.core.fmt import human_bytes, markdown_table
from dataset_assets.core.select.filters import FILTER_FIELDS, ManifestFilters
from dataset_assets.core.select.layout import DEFAULT_LAYOUT, MAX_PATH_RANGE, default_max_path, layout_problem
from dataset_assets.defs.catalog.index_assets import idc_index
from dataset_assets.lib.groups import DOWNLOADS_GROUP, OWNERS
from dataset_assets.lib.metadata import failure
from dataset_assets.lib.partitions import collection_partitions
from dataset_assets.lib.resources import CheckedConfig, IdcResource

#: Dagster's names for the Arrow types a manifest holds.
ARROW_TYPES = {"string": "string", "int64": "int", "double": "float", "bool": "bool"}

PREVIEW_COLUMNS = [
    "PatientID",
    "Modality",
    "SeriesInstanceUID",
    "instanceCount",
    "series_size_MB",
    "target_dir",
    "viewer_url",
]


class ManifestConfig(CheckedConfig):
    """Filters (values OR-ed within a field, fields AND-ed) and the layout of the download. A bad
    value fails the step in one line before anything is read or written (the layout's column
    names are checked against the index when the manifest is built, also before writing)."""

    modalities: list[str] = Field(default=[], description="Keep series of these Modality values, e.g. ['CT', 'SEG'].")
    body_parts: list[str] = Field(
        default=[], description="Keep series of these BodyPartExamined values, e.g. ['CHEST']."
    )
    patient_ids: list[str] = Field(default=[], description="Keep series of these PatientID values.")
    study_uids: list[str] = Field(default=[], description="Keep series of these StudyInstanceUID values.")
    series_uids: list[str] = Field(default=[], description="Keep only these SeriesInstanceUID values.")
    analysis_result_ids: list[str] = Field(
        default=[], description="Keep only series of these analysis results, e.g. ['qin_lungct_seg']."
    )
    analysis_results: Literal["include", "exclude", "only"] = Field(
        default="include",
        description="Series of analysis results (segmentations, annotations): 'include' keeps them with the "
        "original data, 'exclude' leaves them out, 'only' keeps them alone.",
    )
    licenses: list[str] = Field(default=[], description="Keep only series under these licences, e.g. ['CC BY 4.0'].")
    exclude_noncommercial: bool = Field(
        default=False, description="Leave out series whose licence forbids commercial use (CC BY-NC)."
    )
    layout: str = Field(
        default=DEFAULT_LAYOUT,
        description="Directory of each series below the download root; %column for any index column.",
    )
    viewer: Literal["auto", "ohif_v3", "ohif_v2", "slim"] = Field(
        default="auto",
        description="The viewer of the links in the metadata: 'auto' opens studies with slide microscopy in "
        "Slim and the others in OHIF v3.",
    )
    long_paths: Literal["hash", "error"] = Field(
        default="hash",
        description="Directories with a component over 255 bytes: 'hash' shortens them deterministically "
        "(the same under any download root), 'error' fails.",
    )
    max_path: int | None = Field(
        default=None,
        ge=MAX_PATH_RANGE[0],
        le=MAX_PATH_RANGE[1],
        description="Longest file path allowed, checked against the download root (never changes the layout); "
        "default: 260 on Windows, no limit elsewhere.",
    )

    field_checks = {"layout": layout_problem}

    def filters(self) -> ManifestFilters:
        return ManifestFilters.from_mapping({name: getattr(self, name) for name in FILTER_FIELDS})


@dg.asset(
    deps=[idc_index],
    partitions_def=collection_partitions,
    group_name=DOWNLOADS_GROUP,
    kinds={"parquet", "duckdb"},
    owners=OWNERS,
    tags={"domain": "idc"},
)
def collection_manifest(
    context: dg.AssetExecutionContext, config: ManifestConfig, idc: IdcResource
) -> dg.MaterializeResult:
    """The series of one IDC collection to download, after optional filters (modalities, body
    parts, patients, studies, series), each with its S3 URL, size, instance count, licence and
    target directory from the layout template. Stored as one Parquet file per collection in
    `$IDC_MANIFEST_DIR` (query all with DuckDB: `SELECT * FROM 'data/manifests/*.parquet'`)."""
    from dataset_assets.core.arrow_build import give_back_freed_memory
    from dataset_assets.core.index.citations import citations, license_summary
    from dataset_assets.core.index.source import release_of
    from dataset_assets.core.index.viewer import slide_studies, viewer_url, viewer_urls
    from dataset_assets.core.select import manifest as mf
    from dataset_assets.core.select.card import selection_metadata

    give_back_freed_memory(settings.arrow_pool_chosen())
    collection_id = context.partition_key
    source = idc.source()
    root = idc.download_root()
    try:
        with source.connect() as con:
            release = release_of(con)
            table = mf.build_manifest(
                con,
                collection_id,
                config.filters(),
                layout=config.layout,
                root_length=len(str(root)),
                max_path=config.max_path if config.max_path is not None else default_max_path(),
                long_paths=config.long_paths,
            )
            cited = citations(con, table, analysis_results=source.directory / "analysis_results_index.parquet")
            slides = slide_studies(con, table.slice(0, 10))
    except DatasetError as exc:  # a layout, filter or index problem: one line, the last manifest kept
        raise failure(exc, retry=False) from None
    selection = {"collection_id": collection_id, "filters": config.filters().as_dict(), "layout": config.layout}
    table = selection_metadata(table, {**selection, "idc_release": f"v{release}"})
    path = mf.write_manifest(table, idc.manifest_path(collection_id))
    stats = mf.summarize(table)
    context.log.info(
        "manifest %s: %s series, %s instances, %s -> %s",
        collection_id,
        f"{stats['series']:,}",
        f"{stats['instances']:,}",
        human_bytes(stats["bytes"]),
        path,
    )
    fingerprint = json.dumps(
        {"index": str(source.directory), "release": release, **config.model_dump(exclude={"viewer"})}, sort_keys=True
    )
    head = table.slice(0, 10)
    preview = head.append_column("viewer_url", viewer_urls(head, slides, config.viewer)).select(PREVIEW_COLUMNS)
    first = table.slice(0, 1).to_pylist()[0]
    shown = {"viewer": config.viewer, "study_has_slides": True if first["StudyInstanceUID"] in slides else None}
    return dg.MaterializeResult(
        data_version=dg.DataVersion(hashlib.sha256(fingerprint.encode()).hexdigest()[:16]),
        metadata={
            "series": stats["series"],
            "instances": stats["instances"],
            "bytes": stats["bytes"],
            "size": human_bytes(stats["bytes"]),
            "patients": stats["patients"],
            "studies": stats["studies"],
            "modalities": ", ".join(stats["modalities"]),
            "buckets": ", ".join(stats["buckets"]),
            "dagster/row_count": stats["series"],
            "filters": dg.MetadataValue.json(config.filters().as_dict()),
            "idc_release": f"v{release}",
            # Replayed by the release sensor and the watched-collections schedule.
            "manifest_config": dg.MetadataValue.json(config.model_dump()),
            "layout": config.layout,
            "manifest_path": dg.MetadataValue.path(str(path)),
            "dagster/uri": path.absolute().as_uri(),
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(f.name, ARROW_TYPES.get(str(f.type), str(f.type))) for f in table.schema]
            ),
            "download_root": dg.MetadataValue.path(str(root)),
            "preview": dg.MetadataValue.md(markdown_table(preview)),
            "idc_portal": dg.MetadataValue.url(
                f"https://portal.imaging.datacommons.cancer.gov/explore/filters/?collection_id={collection_id}"
            ),
            "viewer_first_study": dg.MetadataValue.url(
                viewer_url(first["StudyInstanceUID"], None, first["Modality"], **shown) or ""
            ),
            "viewer_first_series": dg.MetadataValue.url(
                viewer_url(first["StudyInstanceUID"], first["SeriesInstanceUID"], first["Modality"], **shown) or ""
            ),
            "licenses": license_summary(cited),
            "citations": dg.MetadataValue.json(cited),
            "citations_md": dg.MetadataValue.md(
                "\n\n".join(f"- {c['citation'] or c['doi_url']} — **{_licence_label(c)}**" for c in cited)
            ),
            **({"doi": dg.MetadataValue.url(f"https://doi.org/{first['source_DOI']}")} if first["source_DOI"] else {}),
        },
    )


defs = dg.Definitions(assets=[collection_manifest])


def _licence_label(record: dict) -> str:
    if record["source_type"] == "idc_publication":
        return "the IDC paper"
    return record["license"] or "licence unknown"
