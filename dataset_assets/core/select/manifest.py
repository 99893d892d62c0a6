"""Per-collection manifests: the series to download, after filters, each with its target directory.

A manifest is an Arrow table (one row per series) stored as one Parquet file per collection,
written to a temporary name and renamed into place, so that any number of partitions can
materialize in parallel without a database lock and a failed build never replaces a good
manifest.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq

from dataset_assets.core import arrow_build
from dataset_assets.core.errors import EmptySelectionError, ManifestError
from dataset_assets.core.fs import new_file
from dataset_assets.core.index.source import require_collection
from dataset_assets.core.select.filters import FILTER_COLUMNS, ManifestFilters
from dataset_assets.core.select.layout import DEFAULT_LAYOUT, Layout, LongPaths

#: Columns of a manifest, in order (``target_dir`` is added by the layout).
MANIFEST_COLUMNS = (
    "collection_id",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "crdc_series_uuid",
    "aws_bucket",
    "series_aws_url",
    "instanceCount",
    "series_size_MB",
    "series_bytes",
    "license_short_name",
    "source_DOI",
    "series_revised_idc_version",
)


def _check_filter_values(con: duckdb.DuckDBPyConnection, collection_id: str, filters: ManifestFilters) -> None:
    for name, column in FILTER_COLUMNS.items():
        wanted = getattr(filters, name)
        if not wanted:
            continue
        found = {
            r[0]
            for r in con.execute(
                f"SELECT DISTINCT {column} FROM idc_index WHERE collection_id = ? AND list_contains(?, {column})",
                [collection_id, list(wanted)],
            ).fetchall()
        }
        missing = [w for w in wanted if w not in found]
        if missing:
            valid = [
                r[0]
                for r in con.execute(
                    f"SELECT DISTINCT {column} FROM idc_index WHERE collection_id = ? AND {column} IS NOT NULL "
                    f"ORDER BY 1 LIMIT 21",
                    [collection_id],
                ).fetchall()
            ]
            more = ", ..." if len(valid) > 20 else ""
            shown = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10:,} more)" if len(missing) > 10 else "")
            raise EmptySelectionError(
                f"filter {name}={shown} matches no series of collection {collection_id!r}; "
                f"valid {column} values there: {', '.join(valid[:20])}{more}"
            )


def build_manifest(
    con: duckdb.DuckDBPyConnection,
    collection_id: str,
    filters: ManifestFilters | None = None,
    *,
    layout: str = DEFAULT_LAYOUT,
    root_length: int = 0,
    max_path: int | None = None,
    long_paths: LongPaths = "hash",
) -> pa.Table:
    """The manifest of ``collection_id``: one row per matching series, with ``target_dir``.

    ``con`` is a connection with an ``idc_index`` view or table (see ``IndexSource.connect``).
    """
    filters = filters or ManifestFilters()
    require_collection(con, collection_id)
    index_columns = [r[0] for r in con.execute("DESCRIBE idc_index").fetchall()]
    parsed = Layout.parse(layout, index_columns)
    _check_filter_values(con, collection_id, filters)

    where = ["collection_id = ?"]
    params: list[object] = [collection_id]
    for name, column in FILTER_COLUMNS.items():
        wanted = getattr(filters, name)
        if wanted:
            where.append(f"list_contains(?, {column})")
            params.append(list(wanted))
    where += option_clauses(filters)
    empty = (
        f"the filters {filters.as_dict()} match no series of collection {collection_id!r} together; "
        "each value exists, but no series has all of them"
    )
    table = render_manifest(
        con,
        " AND ".join(where),
        params,
        parsed,
        empty,
        root_length=root_length,
        max_path=max_path,
        long_paths=long_paths,
    )
    whole = not any(filters.as_dict().values())
    return table.replace_schema_metadata({WHOLE_COLLECTION_KEY: b"true" if whole else b"false"})


#: SQL of a series under a licence that forbids commercial use (see ``filters.is_noncommercial``).
NONCOMMERCIAL_SQL = "upper(coalesce(license_short_name, '')) LIKE '%-NC%'"


def option_clauses(filters: ManifestFilters) -> list[str]:
    """The SQL conditions (over ``idc_index``) of the filters that are choices, not value lists:
    analysis results kept, left out or kept alone; NonCommercial licences left out."""
    clauses = []
    if filters.analysis_results == "exclude":
        clauses.append("analysis_result_id IS NULL")
    elif filters.analysis_results == "only":
        clauses.append("analysis_result_id IS NOT NULL")
    if filters.exclude_noncommercial:
        clauses.append(f"NOT ({NONCOMMERCIAL_SQL})")
    return clauses


def render_manifest(
    con: duckdb.DuckDBPyConnection,
    where: str,
    params: list[object],
    parsed: Layout,
    empty_message: str,
    *,
    root_length: int = 0,
    max_path: int | None = None,
    long_paths: LongPaths = "hash",
) -> pa.Table:
    """The manifest rows of ``idc_index`` matching ``where``, each with its target directory."""
    extra = [c for c in parsed.columns if c not in MANIFEST_COLUMNS]
    # Index values are outside input: a count that is not a number, a NaN or absurd size becomes
    # NULL here and fails its own series at download time (named), never the whole manifest.
    select = [_column_sql(c) for c in MANIFEST_COLUMNS] + [f'"{c}"' for c in extra]
    # No ORDER BY: index order is deterministic, and sorting 600k rows doubles peak memory.
    sql = f"SELECT {', '.join(select)} FROM idc_index WHERE {where}"
    # Stream Arrow batches out of DuckDB and render each: peak memory stays near the result size.
    relation = con.sql(sql, params=params)
    # DuckDB 2 renamed Relation.record_batch to to_arrow_reader.
    reader = getattr(relation, "to_arrow_reader", None) or relation.record_batch
    batches = []
    for batch in reader(100_000):
        dirs = parsed.render_unchecked(batch)
        batches.append(batch.select(list(MANIFEST_COLUMNS)).append_column("target_dir", dirs))
    if not batches or sum(b.num_rows for b in batches) == 0:
        raise EmptySelectionError(empty_message)
    table = pa.Table.from_batches(batches)
    del batches
    dirs = parsed.finish(table.column("target_dir"), root_length=root_length, max_path=max_path, long_paths=long_paths)
    return table.set_column(table.num_columns - 1, "target_dir", dirs)


#: Manifest columns that are numbers (the others are text).
_INTEGER_COLUMNS = ("instanceCount", "series_bytes", "series_revised_idc_version")


def _column_sql(column: str) -> str:
    if column == "series_bytes":
        return "TRY_CAST(round(TRY_CAST(series_size_MB AS DOUBLE) * 1e6) AS BIGINT) AS series_bytes"
    if column == "series_size_MB":
        return 'TRY_CAST("series_size_MB" AS DOUBLE) AS "series_size_MB"'
    if column in _INTEGER_COLUMNS:
        return f'TRY_CAST("{column}" AS BIGINT) AS "{column}"'
    return f'CAST("{column}" AS VARCHAR) AS "{column}"'


def manifest_schema() -> pa.Schema:
    """The types every manifest has (``target_dir`` last)."""

    def kind(c: str) -> pa.DataType:
        return pa.int64() if c in _INTEGER_COLUMNS else pa.float64() if c == "series_size_MB" else pa.string()

    return pa.schema([(c, kind(c)) for c in (*MANIFEST_COLUMNS, "target_dir")])


#: Schema metadata of a manifest: "true" when it holds every series of its collection (no filter).
WHOLE_COLLECTION_KEY = b"dataset_assets.whole_collection"


def is_whole_collection(manifest: pa.Table) -> bool:
    """Whether ``manifest`` is a whole collection, not a filtered selection of it."""
    return (manifest.schema.metadata or {}).get(WHOLE_COLLECTION_KEY) == b"true"


def summarize(table: pa.Table) -> dict[str, object]:
    """Counts a person wants to see about a manifest."""
    import pyarrow.compute as pc

    return {
        "series": table.num_rows,
        "instances": int(pc.sum(table.column("instanceCount")).as_py() or 0),
        "bytes": int(pc.sum(table.column("series_bytes")).as_py() or 0),
        "patients": pc.count_distinct(table.column("PatientID")).as_py(),
        "studies": pc.count_distinct(table.column("StudyInstanceUID")).as_py(),
        "modalities": sorted(m for m in pc.unique(table.column("Modality")).to_pylist() if m),
        "buckets": sorted(b for b in pc.unique(table.column("aws_bucket")).to_pylist() if b),
    }


def write_manifest(table: pa.Table, path: Path) -> Path:
    """Write ``table`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with new_file(path) as handle:
        pq.write_table(table, handle, compression="zstd")
    return path


def read_manifest(path: Path) -> pa.Table:
    """Read a manifest written by ``write_manifest``; ``ManifestError`` (one line naming the file
    and what is wrong) when it is unreadable, lacks a column, has one of another type, or is empty."""
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}; materialize collection_manifest for this collection first")
    try:
        table = arrow_build.read_parquet(path)
    except (OSError, pa.ArrowException) as exc:
        raise ManifestError(
            f"manifest {path} cannot be read ({str(exc).splitlines()[0][:160]}); materialize collection_manifest again"
        ) from None
    expected = manifest_schema()
    missing = [f.name for f in expected if f.name not in table.column_names]
    if missing:
        raise ManifestError(
            f"manifest {path} lacks the column(s) {', '.join(missing)}; materialize collection_manifest again"
        )
    columns = []
    for field in expected:
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type)
            except (pa.ArrowException, ValueError):
                raise ManifestError(
                    f"manifest {path}: column {field.name} is {column.type}, not {field.type}; "
                    "materialize collection_manifest again"
                ) from None
        columns.append(column)
    if table.num_rows == 0:
        raise ManifestError(f"manifest {path} has no series; materialize collection_manifest again")
    extra = [c for c in table.column_names if c not in expected.names]
    result = pa.Table.from_arrays(columns + [table.column(c) for c in extra], names=expected.names + extra)
    return result.replace_schema_metadata(table.schema.metadata)
