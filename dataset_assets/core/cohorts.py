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
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from .errors import DatasetError, FilterError
from .index import require_collection
from .layout import DEFAULT_LAYOUT, Layout, LongPaths
from .manifest import FILTER_COLUMNS, WHOLE_COLLECTION_KEY, ManifestFilters, build_manifest, render_manifest
from .safety import name_problem

DEFAULT_COHORTS_FILE = Path(__file__).resolve().parents[1] / "cohorts.yaml"
SERIES_COLUMNS = ("SeriesInstanceUID", "crdc_series_uuid")
_KEYS = {"name", "sql", "collection_id", "layout", "description", *FILTER_COLUMNS}


class CohortError(DatasetError):
    """A cohorts file or a cohort that cannot be used as written."""


@dataclass(frozen=True)
class Cohort:
    name: str
    sql: str | None = None
    collection_id: str | None = None
    filters: ManifestFilters = field(default_factory=ManifestFilters)
    layout: str = DEFAULT_LAYOUT
    description: str = ""


def load_cohorts(path: Path) -> dict[str, Cohort]:
    """The cohorts of ``path``; ``CohortError`` (one line naming the file) when it cannot be used."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CohortError(f"cohorts file {path} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CohortError(f"cohorts file {path} is not valid YAML{where}") from None
    entries = (data or {}).get("cohorts") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CohortError(f"cohorts file {path} needs a top-level list `cohorts:`")
    cohorts: dict[str, Cohort] = {}
    for i, entry in enumerate(entries, 1):
        where = f"cohorts file {path}, cohort #{i}"
        if not isinstance(entry, dict):
            raise CohortError(f"{where} is not a mapping")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise CohortError(f"{where} has unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(_KEYS))}")
        problem = name_problem(entry.get("name"), "cohort name")
        if problem:
            raise CohortError(f"{where}: {problem}")
        name = entry["name"]
        if name in cohorts:
            raise CohortError(f"{where}: the name {name!r} is used twice")
        sql, collection_id = entry.get("sql"), entry.get("collection_id")
        if (sql is None) == (collection_id is None):
            raise CohortError(f"{where} ({name}) needs exactly one of `sql` or `collection_id` (with filters)")
        if sql is not None and (not isinstance(sql, str) or not sql.strip()):
            raise CohortError(f"{where} ({name}): `sql` must be a non-empty query")
        if collection_id is not None and not isinstance(collection_id, str):
            raise CohortError(f"{where} ({name}): `collection_id` must be a collection id (text)")
        if sql is not None and any(entry.get(f) for f in FILTER_COLUMNS):
            raise CohortError(f"{where} ({name}): filters go with `collection_id`; put them in the SQL instead")
        try:
            filters = ManifestFilters.from_mapping({f: entry[f] for f in FILTER_COLUMNS if f in entry})
        except FilterError as exc:
            raise CohortError(f"{where} ({name}): {exc}") from None
        layout = entry.get("layout", DEFAULT_LAYOUT)
        if not isinstance(layout, str):
            raise CohortError(f"{where} ({name}): `layout` must be a string")
        cohorts[name] = Cohort(
            name,
            sql.strip().rstrip(";") if sql else None,
            collection_id,
            filters,
            layout,
            str(entry.get("description") or ""),
        )
    return cohorts


def try_load_cohorts(path: Path) -> tuple[dict[str, Cohort], str | None]:
    """(cohorts, None), or ({}, one line saying why not): never raises."""
    try:
        return load_cohorts(path), None
    except CohortError as exc:
        return {}, str(exc)
    except Exception as exc:
        return {}, f"cohorts file {path} cannot be used: {exc.__class__.__name__}"


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
    inner = f"(\n{cohort.sql}\n)"  # on lines of their own: a trailing -- comment ends there
    cur = con.cursor()  # a connection of its own: an earlier failed statement leaves nothing behind
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
    try:
        ((missing,),) = cur.execute(
            f'SELECT count(*) FROM ({selected}) WHERE v NOT IN (SELECT "{column}" FROM idc_index)'
        ).fetchall()
        table = render_manifest(
            cur,
            f'"{column}" IN (SELECT v FROM ({selected}))',
            [],
            parsed,
            f"cohort {cohort.name}: its SQL selects no series of idc_index",
            **render,
        )
    except duckdb.Error as exc:
        raise _one_line(cohort, exc) from None
    return table.replace_schema_metadata({WHOLE_COLLECTION_KEY: b"false", NOT_IN_INDEX_KEY: str(missing).encode()})


#: Schema metadata of a cohort manifest: how many series its SQL returned that idc_index does not have.
NOT_IN_INDEX_KEY = b"dataset_assets.not_in_index"


def not_in_index(manifest: pa.Table) -> int:
    return int((manifest.schema.metadata or {}).get(NOT_IN_INDEX_KEY, b"0"))


def _one_line(cohort: Cohort, exc: duckdb.Error) -> DatasetError:
    """The cohort's SQL error in one line; an unknown table says how to fetch an on-demand index."""
    from . import extra_index as extra
    from .errors import UnknownIndexError

    message = " ".join(str(exc).split())[:400]
    missing = re.search(r"Table with name (\w+) does not exist", message)
    if missing:
        table = missing.group(1)
        hint = (
            f"; {table} is an on-demand index: {extra.fetch_hint(table)}" if table in extra.on_demand_indices() else ""
        )
        return UnknownIndexError(f"cohort {cohort.name}: no table {table!r}{hint}")
    return CohortError(f"cohort {cohort.name}: its SQL failed: {message}")
