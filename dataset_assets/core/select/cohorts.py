"""Cohorts: named sets of series, across collections or a shard of a huge one, from a YAML file.

Each cohort has a ``name`` (a plain name: it is a partition key and a file name) and either
``sql`` (a query over the local indices, bundled and fetched, returning ``SeriesInstanceUID`` or
``crdc_series_uuid``) or ``collection_id`` with the filters of ``collection_manifest``
(``modalities``, ``body_parts``, ``patient_ids``, ``study_uids``, ``series_uids``); optionally a
``layout`` and a ``description``. The file is outside input: any problem is one line that names
the file and the cohort, and it only affects the cohort assets.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pyarrow as pa

from dataset_assets.core.errors import DatasetError
from dataset_assets.core.index.source import require_collection
from dataset_assets.core.select.cohort_file import Cohort, CohortError
from dataset_assets.core.select.layout import Layout, LongPaths
from dataset_assets.core.select.manifest import (
    WHOLE_COLLECTION_KEY,
    build_manifest,
    manifest_schema,
    option_clauses,
    read_manifest,
    render_manifest,
    write_manifest,
)
from dataset_assets.core.select.resolve import fill_prior_counts, prior_manifest
from dataset_assets.core.transfer import s5cmd

SERIES_COLUMNS = ("SeriesInstanceUID", "crdc_series_uuid")


def build_cohort_manifest(
    con: duckdb.DuckDBPyConnection,
    cohort: Cohort,
    *,
    root_length: int = 0,
    max_path: int | None = None,
    long_paths: LongPaths = "hash",
) -> pa.Table:
    """The manifest of ``cohort``: every series it selects, across collections, with target directories.
    ``con`` has the indices as views (``extra_index.connect_all``)."""
    render = {"root_length": root_length, "max_path": max_path, "long_paths": long_paths}
    if cohort.collection_id is not None:
        require_collection(con, cohort.collection_id)
        table = build_manifest(con, cohort.collection_id, cohort.filters, layout=cohort.layout, **render)
        return table.replace_schema_metadata({WHOLE_COLLECTION_KEY: b"false"})
    assert cohort.sql is not None
    cur = con.cursor()  # a connection of its own: an earlier failed statement leaves nothing behind
    inner = f"(\n{single_select(cur, cohort)}\n)"  # on lines of their own: a trailing -- comment ends there
    try:
        cur.execute(f"SELECT * FROM {inner} LIMIT 0")
        columns = [d[0] for d in cur.description]
        cur.fetchall()
    except duckdb.Error as exc:
        raise _one_line(cohort, exc) from None
    column = next((c for c in SERIES_COLUMNS if c in columns), None)
    if column is None:
        raise CohortError(
            f"cohort {cohort.name}: its SQL returns no series column ({' or '.join(SERIES_COLUMNS)}); "
            f"it returns {', '.join(columns) or 'no column'}"
        )
    index_columns = [r[0] for r in cur.execute("DESCRIBE idc_index").fetchall()]
    parsed = Layout.parse(cohort.layout, index_columns)
    selected = f'SELECT DISTINCT CAST("{column}" AS VARCHAR) AS v FROM {inner} WHERE "{column}" IS NOT NULL'
    known = f'SELECT "{column}" FROM idc_index WHERE "{column}" IS NOT NULL'
    absent = f"SELECT v FROM ({selected}) WHERE v NOT IN ({known})"
    empty = f"cohort {cohort.name}: its SQL selects no series of idc_index"
    try:
        ((missing,),) = cur.execute(f"SELECT count(*) FROM ({absent})").fetchall()
        prior: list[str] = []
        if column == "crdc_series_uuid" and missing and "prior_versions_index" in _tables(cur):
            # As the CLI: a crdc_series_uuid only an earlier release served downloads that version.
            prior = [
                v
                for (v,) in cur.execute(
                    f"SELECT v FROM ({absent}) WHERE v IN (SELECT crdc_series_uuid FROM prior_versions_index) "
                    "ORDER BY v"
                ).fetchall()
            ]
            empty += " or prior_versions_index"
        ((current,),) = cur.execute(f"SELECT count(*) FROM ({selected})").fetchall()
        tables = []
        if current > missing or not prior:
            where, params = series_set_clauses(cur, cohort)
            if where:
                empty = f"cohort {cohort.name}: the filters {cohort.filters.as_dict()} leave none of its SQL's series"
            where.insert(0, f'"{column}" IN (SELECT v FROM ({selected}))')
            tables.append(render_manifest(cur, " AND ".join(where), params, parsed, empty, **render))
        if prior:
            tables.append(prior_manifest(cur, prior, parsed))
    except duckdb.Error as exc:
        raise _one_line(cohort, exc) from None
    table = tables[0] if len(tables) == 1 else pa.concat_tables([t.cast(manifest_schema()) for t in tables])
    if prior:  # one directory per series across both parts, prior ones shortened like the others
        dirs = parsed.finish(table.column("target_dir"), **render)
        table = table.set_column(table.num_columns - 1, "target_dir", dirs)
    metadata = {WHOLE_COLLECTION_KEY: b"false", NOT_IN_INDEX_KEY: str(missing - len(prior)).encode()}
    if prior:
        metadata[PRIOR_KEY] = ",".join(prior).encode()
    return table.replace_schema_metadata(metadata)


def series_set_clauses(cur: duckdb.DuckDBPyConnection, cohort: Cohort) -> tuple[list[str], list[object]]:
    """The conditions the filters of a SQL cohort add (licences, analysis results, NonCommercial);
    a licence the index does not have is a ``CohortError`` naming those it has."""
    filters = cohort.filters
    where, params = option_clauses(filters), []
    if filters.licenses:
        known = [r[0] for r in cur.execute("SELECT DISTINCT license_short_name FROM idc_index ORDER BY 1").fetchall()]
        missing = [lic for lic in filters.licenses if lic not in known]
        if missing:
            raise CohortError(
                f"cohort {cohort.name}: the licence(s) {', '.join(missing)} are not in the index; "
                f"it has {', '.join(str(k) for k in known)}"
            )
        where.append("list_contains(?, license_short_name)")
        params.append(list(filters.licenses))
    return where, params


def single_select(cur: duckdb.DuckDBPyConnection, cohort: Cohort) -> str:
    """The cohort's SQL as exactly one SELECT statement (``WITH ... SELECT`` and DuckDB's
    ``FROM ...`` included) without its trailing ``;`` and comments, checked by DuckDB's own parser
    before anything runs; anything else (a second statement, a ``COPY``, an ``ATTACH``) is a
    ``CohortError`` naming the cohort."""
    assert cohort.sql is not None
    try:
        statements = cur.extract_statements(cohort.sql)
    except duckdb.Error as exc:
        raise _one_line(cohort, exc) from None
    kinds = [s.type for s in statements]
    if kinds != [duckdb.StatementType.SELECT]:
        found = ", ".join(k.name for k in kinds) if kinds else "no statement"
        raise CohortError(
            f"cohort {cohort.name}: its SQL must be exactly one SELECT statement; it has {len(kinds)} "
            f"({found}); nothing was run"
        )
    body = _without_trailing_semicolons(cohort.sql)
    # The text that runs is a subquery: it must still be that one SELECT (no way out of the parentheses).
    try:
        wrapped = cur.extract_statements(f"SELECT * FROM (\n{body}\n)")
    except duckdb.Error:
        wrapped = []
    if [s.type for s in wrapped] != [duckdb.StatementType.SELECT]:
        raise CohortError(
            f"cohort {cohort.name}: its SQL cannot be used as a subquery (one SELECT statement); nothing was run"
        )
    return body


def _without_trailing_semicolons(sql: str) -> str:
    """``sql`` up to its last token that is neither a ``;`` nor a comment (DuckDB's tokenizer, so
    a ``;`` or ``--`` inside a string or a comment is no end)."""
    end = len(sql)
    for position, kind in reversed(duckdb.tokenize(sql)):
        if kind == duckdb.token_type.comment or (kind == duckdb.token_type.operator and sql[position] == ";"):
            end = position
            continue
        break
    return sql[:end].rstrip()


def _tables(cur: duckdb.DuckDBPyConnection) -> set[str]:
    return {r[0] for r in cur.execute("SELECT table_name FROM information_schema.tables").fetchall()}


#: Schema metadata of a cohort manifest whose SQL selects series of earlier releases: their
#: crdc_series_uuids, comma-separated, until ``fill_prior_series`` has listed their files.
PRIOR_KEY = b"dataset_assets.prior_series"


def prior_series(manifest: pa.Table) -> set[str]:
    """The crdc_series_uuids of the manifest's prior-release series whose files are not listed yet."""
    text = (manifest.schema.metadata or {}).get(PRIOR_KEY, b"").decode()
    return set(text.split(",")) if text else set()


def fill_prior_series(
    manifest: pa.Table, options: s5cmd.S5cmdOptions, allowed_buckets: tuple[str, ...]
) -> tuple[pa.Table, list[str]]:
    """As the CLI does for a prior-release ``crdc_series_uuid``: the exact file count and bytes of
    each such series from one listing of its prefix (``resolve.fill_prior_counts``). Returns the
    manifest without the series that could not be listed, and one problem per such series."""
    prior = prior_series(manifest)
    if not prior:
        return manifest, []
    from dataset_assets.core.transfer.download import check_endpoint

    check_endpoint(options)
    table, problems = fill_prior_counts(manifest, prior, options, allowed_buckets)
    metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != PRIOR_KEY}
    return table.replace_schema_metadata(metadata), problems


def list_prior_series(path: Path, name: str, options: s5cmd.S5cmdOptions, allowed_buckets: tuple[str, ...]) -> Path:
    """Before a cohort's download: the manifest at ``path`` with the files and bytes of its
    prior-release series listed (``fill_prior_series``) and written back in place, so that the
    download and its checks see exact counts. A series that cannot be listed is a ``CohortError``
    before anything is downloaded (the manifest is left as it was)."""
    manifest = read_manifest(path)
    if not prior_series(manifest):
        return path
    table, problems = fill_prior_series(manifest, options, allowed_buckets)
    if problems:
        raise CohortError(
            f"cohort {name}: {len(problems)} series of an earlier release cannot be listed, nothing was downloaded: "
            + "; ".join(problems[:5])
            + ("; ..." if len(problems) > 5 else "")
        )
    write_manifest(table, path)
    return path


#: Schema metadata of a cohort manifest: how many series its SQL returned that idc_index does not have.
NOT_IN_INDEX_KEY = b"dataset_assets.not_in_index"


def not_in_index(manifest: pa.Table) -> int:
    return int((manifest.schema.metadata or {}).get(NOT_IN_INDEX_KEY, b"0"))


def _one_line(cohort: Cohort, exc: duckdb.Error) -> DatasetError:
    """The cohort's SQL error in one line; an unknown table says how to fetch an on-demand index."""
    from dataset_assets.core.errors import UnknownIndexError
    from dataset_assets.core.index import extra_index as extra

    message = " ".join(str(exc).split())[:400]
    missing = re.search(r"Table with name (\w+) does not exist", message)
    if missing:
        table = missing.group(1)
        hint = (
            f"; {table} is an on-demand index: {extra.fetch_hint(table)}" if table in extra.on_demand_indices() else ""
        )
        return UnknownIndexError(f"cohort {cohort.name}: no table {table!r}{hint}")
    return CohortError(f"cohort {cohort.name}: its SQL failed: {message}")
