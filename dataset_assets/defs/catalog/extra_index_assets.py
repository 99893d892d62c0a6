"""On-demand IDC indices (sm_index, sm_instance_index, clinical_index, ...), one partition each."""

from pathlib import Path

import dagster as dg

from dataset_assets import settings
from dataset_assets.core.errors import DatasetError
from dataset_assets.core.fmt import human_bytes, redact_url, scrub_text
from dataset_assets.core.index import extra_index as extra
from dataset_assets.core.index.source import replace_relation
from dataset_assets.defs.catalog.index_assets import idc_index
from dataset_assets.lib.groups import INDEX_GROUP, OWNERS
from dataset_assets.lib.metadata import failure
from dataset_assets.lib.resources import IdcResource, IndexDatabase, S5cmdResource

extra_index_partitions = dg.StaticPartitionsDefinition(extra.on_demand_indices())


@dg.asset(
    deps=[idc_index],
    partitions_def=extra_index_partitions,
    group_name=INDEX_GROUP,
    kinds={"duckdb", "parquet"},
    owners=OWNERS,
    tags={"domain": "idc"},
)
def idc_extra_index(context: dg.AssetExecutionContext, idc: IdcResource, duckdb: IndexDatabase) -> dg.MaterializeResult:
    """An IDC index that `idc-index-data` describes but does not ship (`sm_index`, `sm_instance_index`,
    `clinical_index`, ...): `<name>.parquet` of the installed release fetched from
    `$IDC_INDEX_BASE_URL/<idc-index-data version>/` (retries, resume, proxies, CA bundles, atomic
    rename), checked against the `<name>_schema.json` shipped in the package, kept in
    `$IDC_EXTRA_INDEX_DIR/<version>/`, and queryable in DuckDB as the view `<name>`. Its data
    version is the IDC release."""
    name = context.partition_key
    try:
        result = extra.fetch(settings.index_store(), name, log=lambda line: context.log.info(scrub_text(line)))
    except DatasetError as exc:
        raise failure(exc) from None
    release = idc.source().release()
    database = Path(duckdb.database)
    database.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.get_connection() as con:
        replace_relation(con, name, result.path)
    context.log.info(f"{name}: {result.rows:,} rows, {human_bytes(result.bytes)} at {result.path}")
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"v{release}"),
        metadata={
            "idc_release": f"v{release}",
            "idc_index_data_version": extra.package_version(),
            "dagster/row_count": result.rows,
            "bytes": result.bytes,
            "transferred_bytes": result.transferred_bytes,
            "already_here": result.skipped,
            "path": dg.MetadataValue.path(str(result.path)),
            "source_url": redact_url(extra.url_of(settings.index_store(), name)),
        },
    )


@dg.asset(
    deps=[idc_index],
    group_name=INDEX_GROUP,
    kinds={"parquet", "s3"},
    owners=OWNERS,
    tags={"domain": "idc"},
)
def idc_clinical_tables(
    context: dg.AssetExecutionContext, idc: IdcResource, s5cmd: S5cmdResource
) -> dg.MaterializeResult:
    """IDC's clinical tables of the installed release (age, stage, outcome, ... per collection):
    `clinical_index` (fetched when missing) and every table it names, fetched with s5cmd from
    `s3://idc-open-metadata/bigquery_export/idc_v<release>_clinical/` on the configured endpoint,
    each file's size and each table's columns checked against `clinical_index`. Every table is
    then a view of its own name in `dataset idc query` and cohort SQL (join on
    `dicom_patient_id = PatientID`)."""
    from dataset_assets.core.index import clinical

    store = settings.index_store()
    log = lambda line: context.log.info(scrub_text(line))  # noqa: E731
    try:
        described = extra.fetch(store, "clinical_index", log=log)
        release = idc.source().release()
        done = clinical.fetch(extra.clinical_folder(store), release, s5cmd.options(), described.path, log)
    except DatasetError as exc:
        raise failure(exc) from None
    rows = [{"table": t, "rows": n} for t, n in sorted(done.tables.items())]
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"v{release}"),
        metadata={
            "idc_release": f"v{release}",
            "tables": len(done.tables),
            "dagster/row_count": sum(done.tables.values()),
            "bytes": done.bytes,
            "size": human_bytes(done.bytes),
            "path": dg.MetadataValue.path(str(done.folder)),
            "rows_per_table": dg.MetadataValue.table(
                records=[dg.TableRecord(r) for r in rows],
                schema=dg.TableSchema(columns=[dg.TableColumn("table", "string"), dg.TableColumn("rows", "int")]),
            ),
            "left_out": ", ".join(done.skipped) or "none",
        },
    )


defs = dg.Definitions(assets=[idc_extra_index, idc_clinical_tables])
