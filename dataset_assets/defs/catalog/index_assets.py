"""The IDC index in DuckDB, and the table of collections."""

from datetime import timedelta
from pathlib import Path

import dagster as dg

from dataset_assets import settings
from dataset_assets.core.fmt import human_bytes
from dataset_assets.core.index import source as idx
from dataset_assets.defs.catalog.index_checks import INDEX_CHECKS, INDEX_KEY, index_check_results
from dataset_assets.lib.groups import INDEX_GROUP, OWNERS
from dataset_assets.lib.metadata import index_column_schema, table_preview
from dataset_assets.lib.resources import IdcResource, IndexDatabase, S5cmdResource

IDC_PORTAL = "https://portal.imaging.datacommons.cancer.gov/explore/"


#: The index is reloaded every Monday (``weekly_index_refresh``): older than that, it shows as stale.
INDEX_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=timedelta(days=9), warn_window=timedelta(days=8))

INDEX_DESCRIPTION = """The series-level index of NCI Imaging Data Commons (one row per DICOM series), from the
installed `idc-index-data` package, in the project's DuckDB database (`$IDC_DUCKDB_PATH`)
with `collections_index`, `prior_versions_index` and `version_metadata_index`: views over a
snapshot of the package's Parquet files beside the database (`<name>_index_files/`), so a
package upgrade changes nothing until the asset is materialized again. Its data version is the
IDC release (e.g. `v25`), so an unchanged release shows as unchanged. Its two checks are
evaluated in the same step (see `index_checks`)."""


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            INDEX_KEY,
            group_name=INDEX_GROUP,
            kinds={"duckdb", "parquet"},
            owners=OWNERS,
            tags={"domain": "idc"},
            freshness_policy=INDEX_FRESHNESS,
            description=INDEX_DESCRIPTION,
        )
    ],
    check_specs=INDEX_CHECKS,
    can_subset=True,
    name="idc_index",
)
def idc_index(context: dg.AssetExecutionContext, idc: IdcResource, duckdb: IndexDatabase, s5cmd: S5cmdResource):
    source = idc.source()
    database = Path(duckdb.database)
    if INDEX_KEY not in context.selected_asset_keys:  # the checks alone, on the database as it is
        facts = _facts_of_materialized(duckdb)
        yield from index_check_results(facts, s5cmd.buckets(), context.selected_asset_check_keys)
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.get_connection() as con:
        idx.load_into(con, source, snapshot_dir=database.parent / f"{database.stem}_index_files")
        release = idx.release_of(con)
        # Counted once per release with the row checks: beside the snapshot, and in the user's cache
        # for the next snapshot of the same file (another database, an empty DAGSTER_HOME).
        facts = idx.index_facts(con, source=source.path("idc_index"), shared=settings.cache_dir())
        totals = facts["summary"]
    context.log.info(
        "idc_index loaded: IDC v%s, %s series, %s collections, %s",
        release,
        f"{totals['series']:,}",
        totals["collections"],
        human_bytes(totals["bytes"]),
    )
    columns = index_column_schema(schema_dir(source), "idc_index")
    yield dg.MaterializeResult(
        asset_key=INDEX_KEY,
        data_version=dg.DataVersion(f"v{release}"),
        metadata={
            "idc_release": f"v{release}",
            "idc_index_data_version": source.package_version or "custom ($IDC_INDEX_DIR)",
            "series": totals["series"],
            "instances": totals["instances"],
            "collections": totals["collections"],
            "patients": totals["patients"],
            "studies": totals["studies"],
            "total_bytes": totals["bytes"],
            "total_size": human_bytes(totals["bytes"]),
            "dagster/row_count": totals["series"],
            "duckdb_path": dg.MetadataValue.path(str(duckdb.database)),
            "dagster/table_name": f"{database.stem}.main.idc_index",
            **({"dagster/column_schema": columns} if columns else {}),
            "source_dir": dg.MetadataValue.path(str(source.directory)),
            "idc_portal": dg.MetadataValue.url(IDC_PORTAL),
        },
    )
    yield from index_check_results(facts, s5cmd.buckets(), context.selected_asset_check_keys)


@dg.asset(
    deps=[idc_index],
    group_name=INDEX_GROUP,
    kinds={"duckdb"},
    owners=OWNERS,
    tags={"domain": "idc"},
    freshness_policy=INDEX_FRESHNESS,
)
def idc_collections(context: dg.AssetExecutionContext, duckdb: IndexDatabase) -> dg.MaterializeResult:
    """One row per IDC collection: name, subjects, patients, studies, series, instances, size,
    modalities, licences, DOI and citation, cancer types; `idc_index` joined with
    `collections_index`, stored as the DuckDB table `idc_collections`."""
    with duckdb.get_connection() as con:
        table = idx.collections_table(con)
        con.register("collections_df", table)
        con.execute("CREATE OR REPLACE TABLE idc_collections AS SELECT * FROM collections_df")
        con.unregister("collections_df")
        release = idx.release_of(con)
    view = table.assign(
        size=table["size_bytes"].map(human_bytes),
        doi=table["doi"].map(lambda d: f"https://doi.org/{d}" if d else ""),
    )[
        [
            "collection_id",
            "collection_name",
            "subjects",
            "series",
            "instances",
            "size",
            "modalities",
            "licenses",
            "doi",
            "cancer_types",
        ]
    ]
    context.log.info("idc_collections: %d collections", len(table))
    return dg.MaterializeResult(
        data_version=dg.DataVersion(f"v{release}"),
        metadata={
            "collections": len(table),
            "dagster/row_count": len(table),
            "total_bytes": int(table["size_bytes"].sum()),
            "dagster/table_name": f"{Path(duckdb.database).stem}.main.idc_collections",
            "collections_table": table_preview(
                view.to_dict("records"),
                {
                    "collection_id": "string",
                    "collection_name": "string",
                    "subjects": "int",
                    "series": "int",
                    "instances": "int",
                    "size": "string",
                    "modalities": "string",
                    "licenses": "string",
                    "doi": "string",
                    "cancer_types": "string",
                },
            ),  # fmt: skip
        },
    )


def _facts_of_materialized(duckdb: IndexDatabase) -> dict:
    """The facts of the index in the database, for the checks run alone; a database that never
    held it is said in one line (and no empty database file is left behind)."""
    import duckdb as duckdb_module

    never = dg.Failure(
        f"the index was never materialized into {duckdb.database}: materialize idc_index first "
        "(its checks run in the same step)"
    )
    if duckdb.database != ":memory:" and not Path(duckdb.database).is_file():
        raise never
    with duckdb.get_connection() as con:
        try:
            return idx.index_facts(con)
        except duckdb_module.CatalogException:
            raise never from None


def schema_dir(source: idx.IndexSource) -> Path:
    """Where the index's ``*_schema.json`` files are: beside its Parquet files, else in the
    installed idc-index-data (a pinned ``IDC_INDEX_DIR`` may hold the Parquet files only)."""
    if (source.directory / "idc_index_schema.json").is_file():
        return source.directory
    return idx.installed_package()[0]


defs = dg.Definitions(assets=[idc_index, idc_collections])
