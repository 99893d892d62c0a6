"""The IDC index shipped by ``idc-index-data``: where it is, which release it is, and queries on it.

Everything is read lazily from the package's Parquet files with DuckDB; nothing loads the
whole index into memory. ``IndexSource`` can point at another folder with the same files
(``IDC_INDEX_DIR``), which is how tests use a small fixture index and how a team can pin
a release it has copied somewhere.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dataset_assets.core.errors import IndexUnavailableError, UnknownCollectionError, UnknownIndexError

if TYPE_CHECKING:  # DuckDB loads with the first query, not with the definitions (0.3 s of every run)
    import duckdb

#: Bundled indices this project reads. Others (sm_index, clinical_index, ...) are fetched
#: on demand from the internet by idc-index; see ``available_indices``.
BUNDLED = ("idc_index", "collections_index", "prior_versions_index", "version_metadata_index")

#: Columns of ``idc_index`` the project relies on (manifests, downloads, checks).
REQUIRED_COLUMNS = (
    "collection_id",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "instanceCount",
    "series_size_MB",
    "crdc_series_uuid",
    "series_aws_url",
    "aws_bucket",
    "license_short_name",
    "source_DOI",
    "series_revised_idc_version",
)


@contextmanager
def _readable(what: str) -> Iterator[None]:
    """Turn DuckDB's errors while reading index files into ``IndexUnavailableError``."""
    import duckdb

    try:
        yield
    except duckdb.Error as exc:
        raise IndexUnavailableError(f"{what}: {str(exc).splitlines()[0]}") from None


def sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@functools.lru_cache(maxsize=1)
def installed_package() -> tuple[Path, str]:
    """Folder (resolved) and version of the installed ``idc-index-data``, found without importing
    it: its import walks the whole distribution record (60 ms of every process that loads the
    definitions). Imported only when the files are not in the package's folder (an unusual
    install), as it knows where they are then."""
    spec = importlib.util.find_spec("idc_index_data")
    if spec is None or not spec.submodule_search_locations:
        raise IndexUnavailableError("idc-index-data is not installed; install it with `pip install idc-index-data`")
    folder = Path(next(iter(spec.submodule_search_locations))).resolve()
    if (folder / "idc_index.parquet").is_file():
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return folder, importlib.metadata.version("idc-index-data")
    import idc_index_data

    return Path(idc_index_data.IDC_INDEX_PARQUET_FILEPATH).resolve().parent, str(idc_index_data.__version__)


@dataclass(frozen=True)
class IndexSource:
    """A folder holding the index Parquet files, and the package version it came from."""

    directory: Path
    package_version: str | None = None

    @classmethod
    def installed(cls) -> IndexSource:
        """The index bundled with the installed ``idc-index-data`` package."""
        return cls(*installed_package())

    @classmethod
    def at(cls, directory: str | os.PathLike[str] | None = None) -> IndexSource:
        """The index files in ``directory`` (e.g. ``$IDC_INDEX_DIR``), else the installed package's."""
        if directory:
            return cls(Path(directory), None)
        return cls.installed()

    def path(self, name: str) -> Path:
        """Path of a bundled index's Parquet file; a clear error when it is not there."""
        path = self.directory / f"{name}.parquet"
        if not path.is_file():
            raise IndexUnavailableError(
                f"index file {path} does not exist; expected the idc-index-data Parquet files "
                f"({', '.join(n + '.parquet' for n in BUNDLED)}) in {self.directory}"
            )
        if not os.access(path, os.R_OK):
            raise IndexUnavailableError(f"index file {path} is not readable (check its permissions)")
        return path

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with one view per bundled index found in the folder."""
        import duckdb

        con = duckdb.connect()
        for name in BUNDLED:
            if name != "idc_index" and not (self.directory / f"{name}.parquet").is_file():
                continue
            path = self.path(name)
            try:
                con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({sql_str(str(path))})")
                con.execute(f"SELECT * FROM {name} LIMIT 0")
            except duckdb.Error as exc:
                con.close()
                raise IndexUnavailableError(
                    f"index file {path} cannot be read as Parquet: {str(exc).splitlines()[0]}"
                ) from None
        check_columns(con)
        return con

    def release(self) -> int:
        """The IDC data release (e.g. 25 for v25) this index describes."""
        with self.connect() as con:
            return release_of(con)


def check_columns(con: duckdb.DuckDBPyConnection, table: str = "idc_index") -> None:
    """Raise if ``table`` lacks a column the project relies on."""
    present = {row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()}
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise IndexUnavailableError(
            f"{table} lacks the column(s) {', '.join(missing)}; present: {', '.join(sorted(present))}"
        )


def release_of(con: duckdb.DuckDBPyConnection) -> int:
    """IDC release of the index behind ``con``: the newest version in ``version_metadata_index``,
    else the newest ``series_revised_idc_version`` of ``idc_index``."""
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "version_metadata_index" in tables:
        (release,) = con.execute("SELECT max(idc_version) FROM version_metadata_index").fetchone()
    else:
        (release,) = con.execute("SELECT max(series_revised_idc_version) FROM idc_index").fetchone()
    return int(release)


def collection_ids(con: duckdb.DuckDBPyConnection) -> list[str]:
    """All collection ids of the index, sorted."""
    rows = con.execute(
        "SELECT DISTINCT collection_id FROM idc_index WHERE collection_id IS NOT NULL ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


def require_collection(con: duckdb.DuckDBPyConnection, collection_id: str) -> None:
    """Raise ``UnknownCollectionError`` with close matches when the id is not in the index."""
    known = collection_ids(con)
    if collection_id in known:
        return
    import difflib

    close = difflib.get_close_matches(collection_id, known, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownCollectionError(
        f"unknown collection {collection_id!r}: the index has {len(known)} collections "
        f"(list them with `dataset idc collections`){hint}"
    )


def index_summary(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Totals of the index: series, instances, collections, patients, studies, bytes."""
    series, instances, collections, patients, studies, size_bytes = con.execute(
        """
        SELECT count(*), sum(instanceCount), count(DISTINCT collection_id),
               count(DISTINCT PatientID), count(DISTINCT StudyInstanceUID),
               CAST(round(sum(round(series_size_MB * 1e6))) AS BIGINT)
        FROM idc_index
        """
    ).fetchone()
    return {
        "series": int(series),
        "instances": int(instances or 0),
        "collections": int(collections),
        "patients": int(patients),
        "studies": int(studies),
        "bytes": int(size_bytes or 0),
    }


#: What ``index_facts`` counts per row of ``idc_index``: the row-safety problems (the allowed
#: bucket is counted per bucket instead, as the allowed set is a setting) and missing URLs.
ROW_PROBLEMS = {
    "uuid_not_a_uuid": "NOT regexp_full_match(coalesce(crdc_series_uuid, ''), "
    "'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}')",
    "url_not_bucket_uuid": "series_aws_url IS DISTINCT FROM concat('s3://', aws_bucket, '/', crdc_series_uuid, '/*')",
    "collection_id_unsafe": "NOT regexp_full_match(coalesce(collection_id, ''), '[A-Za-z0-9][A-Za-z0-9._-]{0,199}')",
    "bad_counts": "coalesce(instanceCount, 0) <= 0 OR coalesce(series_size_MB, -1) < 0",
    "without_uuid_or_url": "crdc_series_uuid IS NULL OR series_aws_url IS NULL",
}
FACTS_VERSION = 1
_FOOTER_BYTES = 1 << 16


def index_facts(con: duckdb.DuckDBPyConnection, source: Path | None = None, shared: Path | None = None) -> dict:
    """What depends only on the index's data, computed once per snapshot: the totals of
    ``index_summary`` and, per kind of unsafe row, its count and first examples (with series per
    bucket). Kept in ``<file>.facts.json`` beside the Parquet file the ``idc_index`` view reads
    (the per-release snapshot), named by that file's size, modification time, inode and a hash of
    its footer (where Parquet keeps every row group's statistics), and sealed with a hash of the
    values: a changed snapshot, or a damaged or edited result, is computed again. Without such a
    file (a table, an in-memory index) it is computed every time.

    ``source`` (the file the snapshot was copied from) and ``shared`` (a folder): the facts are
    also kept there under the source file's own fingerprint, so a new snapshot of the same file
    (another database, an empty DAGSTER_HOME) takes them when it holds the source's very bytes,
    instead of counting a million rows again."""
    path = view_file(con, "idc_index")
    fingerprint = _file_fingerprint(path) if path is not None else None
    local = path.with_name(path.name + ".facts.json") if path is not None else None
    facts = _read_facts(local, fingerprint) if local is not None else None
    if facts is not None:
        return facts
    entry = _shared_entry(path, fingerprint, source, shared)
    if entry is not None:
        facts = _read_facts(*entry)
    if facts is None:
        facts = {"summary": index_summary(con), **_row_problems(con)}
        if entry is not None:
            _write_facts(*entry, facts)
    if local is not None:
        _write_facts(local, fingerprint, facts)
    return facts


def _shared_entry(
    path: Path | None, fingerprint: list | None, source: Path | None, shared: Path | None
) -> tuple[Path, list] | None:
    """Where the shared facts of ``source`` are kept, when the snapshot ``path`` is a byte copy of
    it (compared whole: 0.1 s against a second of counting); ``None`` otherwise."""
    if path is None or fingerprint is None or source is None or shared is None or not source.is_file():
        return None
    source_print = _file_fingerprint(source)
    if (source_print[0], source_print[3]) != (fingerprint[0], fingerprint[3]) or not _same_bytes(path, source):
        return None
    return shared / f"idc_index-{_seal(None, source_print)[:24]}.facts.json", source_print


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def _read_facts(path: Path, fingerprint: object) -> dict | None:
    import json

    from dataset_assets.core.fs import read_small

    try:
        held = json.loads(read_small(path, 1 << 24))  # never a planted FIFO or link, never huge
    except (OSError, ValueError):
        return None  # none yet, unreadable or damaged: compute
    if (
        isinstance(held, dict)
        and held.get("fingerprint") == fingerprint
        and held.get("seal") == _seal(held.get("facts"), fingerprint)
        and _facts_shape_ok(held.get("facts"))
    ):
        return held["facts"]
    return None


_SUMMARY_KEYS = ("series", "instances", "collections", "patients", "studies", "bytes")


def _facts_shape_ok(facts: object) -> bool:
    """Whether ``facts`` holds what ``index_facts`` writes: the summary's counts, each row problem
    and each bucket as a count with examples. The seal only catches accidents (anyone who can
    write the file can seal it again), so a file of the right seal but the wrong shape is counted
    again rather than trusted into a ``KeyError``."""

    def counted(entry: object) -> bool:
        return (
            isinstance(entry, dict)
            and type(entry.get("count")) is int
            and entry["count"] >= 0
            and isinstance(entry.get("examples"), list)
            and all(isinstance(e, str) for e in entry["examples"])
        )

    if not isinstance(facts, dict):
        return False
    summary, problems, buckets = facts.get("summary"), facts.get("problems"), facts.get("buckets")
    return (
        isinstance(summary, dict)
        and all(type(summary.get(k)) is int and summary[k] >= 0 for k in _SUMMARY_KEYS)
        and isinstance(problems, dict)
        and all(counted(problems.get(kind)) for kind in ROW_PROBLEMS)
        and isinstance(buckets, dict)
        and all(isinstance(b, str) and counted(v) for b, v in buckets.items())
    )


def _write_facts(path: Path, fingerprint: object, facts: dict) -> None:
    import json

    from dataset_assets.core.fs import new_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with new_file(path, "w", encoding="utf-8") as out:
            json.dump({"version": FACTS_VERSION, "fingerprint": fingerprint, "facts": facts,
                       "seal": _seal(facts, fingerprint)}, out)  # fmt: skip
    except OSError:
        pass  # a read-only folder: computed again next time


def _seal(facts: object, fingerprint: object) -> str:
    import hashlib
    import json

    text = json.dumps([FACTS_VERSION, facts, fingerprint], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_fingerprint(path: Path) -> list:
    import hashlib

    st = path.stat()
    with open(path, "rb") as f:
        f.seek(max(0, st.st_size - _FOOTER_BYTES))
        footer = hashlib.sha256(f.read()).hexdigest()
    return [st.st_size, st.st_mtime_ns, st.st_ino, footer]


def view_file(con: duckdb.DuckDBPyConnection, name: str) -> Path | None:
    """The one Parquet file the view ``name`` reads (as ``replace_relation`` makes it), or ``None``."""
    import re

    row = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = ? AND NOT internal", [name]).fetchone()
    found = re.findall(r"read_parquet\('((?:[^']|'')*)'\)", row[0]) if row and row[0] else []
    return Path(found[0].replace("''", "'")) if len(found) == 1 and Path(found[0]).is_absolute() else None


def _row_problems(con: duckdb.DuckDBPyConnection) -> dict:
    checked = ", ".join(f"({condition}) AS {kind}" for kind, condition in ROW_PROBLEMS.items())
    wanted = ", ".join(
        f"count(*) FILTER (WHERE {kind}), min(SeriesInstanceUID, 5) FILTER (WHERE {kind})" for kind in ROW_PROBLEMS
    )
    values = con.execute(f"SELECT {wanted} FROM (SELECT SeriesInstanceUID, {checked} FROM idc_index)").fetchone()
    problems = {
        kind: {"count": int(values[2 * i]), "examples": list(values[2 * i + 1] or [])}
        for i, kind in enumerate(ROW_PROBLEMS)
    }
    buckets = {
        (bucket if bucket is not None else ""): {"count": int(n), "examples": list(examples or [])}
        for bucket, n, examples in con.execute(
            "SELECT aws_bucket, count(*), min(SeriesInstanceUID, 5) FROM idc_index GROUP BY aws_bucket"
        ).fetchall()
    }
    return {"problems": problems, "buckets": buckets}


COLLECTIONS_SQL = """
WITH stats AS (
    SELECT collection_id,
           count(DISTINCT PatientID)        AS patients,
           count(DISTINCT StudyInstanceUID) AS studies,
           count(*)                         AS series,
           sum(instanceCount)               AS instances,
           CAST(sum(round(series_size_MB * 1e6)) AS BIGINT) AS size_bytes,
           string_agg(DISTINCT Modality, ',' ORDER BY Modality) AS modalities,
           string_agg(DISTINCT license_short_name, ', ' ORDER BY license_short_name) AS licenses
    FROM idc_index GROUP BY collection_id
), meta AS (
    SELECT collection_id, collection_name, subjects, cancer_types, tumor_locations, species,
           status, updated,
           list_transform(list_filter(sources, lambda s: s.source_type = 'original_data'),
                          lambda s: s.source_doi)[1]  AS doi,
           list_transform(sources, lambda s: s.citation)[1] AS citation
    FROM collections_index
)
SELECT s.collection_id, coalesce(m.collection_name, s.collection_id) AS collection_name,
       m.subjects, s.patients, s.studies, s.series, s.instances, s.size_bytes,
       s.modalities, s.licenses, m.doi, m.citation, m.cancer_types, m.tumor_locations,
       m.species, m.status, m.updated
FROM stats s LEFT JOIN meta m USING (collection_id)
ORDER BY s.collection_id
"""


def collections_table(con: duckdb.DuckDBPyConnection):  # -> pandas.DataFrame (imported by DuckDB on demand)
    """One row per collection: counts and size from ``idc_index``, names/licence/DOI from
    ``collections_index`` (left join: a collection without metadata still appears)."""
    with _readable("the table of collections needs idc_index and collections_index"):
        return con.execute(COLLECTIONS_SQL).df()


def snapshot(source: IndexSource, folder: Path) -> Path:
    """Copy the bundled index files of ``source`` into ``folder/<fingerprint>/`` once (a temporary
    folder renamed into place) and return it: the DuckDB views keep reading the release they were
    made from even after the package is upgraded. Older snapshots are kept (one per release)."""
    import hashlib
    import shutil
    import tempfile

    names = [n for n in BUNDLED if n == "idc_index" or (source.directory / f"{n}.parquet").is_file()]
    stats = [(n, source.path(n).stat()) for n in names]
    key = hashlib.sha256(
        repr(
            [
                str(source.directory.resolve()),
                source.package_version,
                *((n, st.st_size, st.st_mtime_ns) for n, st in stats),
            ]
        ).encode()
    ).hexdigest()[:16]
    target = folder / key
    if all((target / f"{n}.parquet").is_file() for n in names):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{key}-"))
    try:
        for name in names:
            shutil.copyfile(source.path(name), tmp / f"{name}.parquet")
        try:
            os.replace(tmp, target)
        except OSError:  # another run made the same snapshot first
            if not all((target / f"{n}.parquet").is_file() for n in names):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def replace_relation(con: duckdb.DuckDBPyConnection, name: str, path: Path, *, view: bool = True) -> None:
    """(Re)create ``name`` in ``con`` over the Parquet file ``path`` (a view, or a copied table),
    replacing what an earlier run made there, table or view."""
    kinds = con.execute(
        "SELECT table_type FROM information_schema.tables WHERE table_name = ? AND table_schema = 'main'", [name]
    ).fetchall()
    if kinds:
        con.execute(f"DROP {'VIEW' if kinds[0][0] == 'VIEW' else 'TABLE'} {name}")
    read = f"SELECT * FROM read_parquet({sql_str(str(path.absolute()))})"
    con.execute(f"CREATE {'VIEW' if view else 'TABLE'} {name} AS {read}")


def load_into(con: duckdb.DuckDBPyConnection, source: IndexSource, snapshot_dir: Path | None = None) -> None:
    """(Re)create the bundled indices in ``con`` (a DuckDB database file), atomically: views over
    a snapshot of the Parquet files in ``snapshot_dir`` (a copy of 100 MB instead of 1,044,191 rows
    written into DuckDB), or tables copied from ``source`` without one."""
    import duckdb

    folder = snapshot(source, snapshot_dir) if snapshot_dir is not None else None
    con.execute("BEGIN TRANSACTION")
    try:
        for name in BUNDLED:
            if name != "idc_index" and not (source.directory / f"{name}.parquet").is_file():
                continue
            path = folder / f"{name}.parquet" if folder is not None else source.path(name)
            replace_relation(con, name, path, view=folder is not None)
        check_columns(con)
        con.execute("COMMIT")
    except duckdb.Error as exc:
        con.execute("ROLLBACK")
        raise IndexUnavailableError(
            f"loading the index from {source.directory} failed: {str(exc).splitlines()[0]}"
        ) from None
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _shipped(name: str) -> bool:
    """Whether the installed idc-index-data ships ``name``'s data (not only its schema)."""
    return (installed_package()[0] / f"{name}.parquet").is_file()


def _package_metadata() -> dict:
    import idc_index_data

    return getattr(idc_index_data, "INDEX_METADATA", {})


def available_indices(source: IndexSource, fetched: dict[str, Path] | None = None) -> list[dict[str, object]]:
    """Every index idc-index-data describes: bundled ones with their row counts, and the ones
    that idc-index fetches on demand from the internet (not available offline). A folder
    without the main ``idc_index`` is an ``IndexUnavailableError``, not a list of absences."""
    import duckdb

    source.path("idc_index")
    rows = []
    for name, meta in sorted(_package_metadata().items()):
        path = source.directory / f"{name}.parquet"
        bundled = path.is_file()
        here = bundled or name in (fetched or {})
        if not bundled and here:
            path = (fetched or {})[name]
        count = None
        if here:
            with _readable(f"index file {path} cannot be read"), duckdb.connect() as con:  # never the shared default
                (count,) = con.execute(
                    "SELECT sum(num_rows) FROM "
                    f"(SELECT DISTINCT file_name, row_group_id, row_group_num_rows AS num_rows "
                    f"FROM parquet_metadata({sql_str(str(path))}))"
                ).fetchone()
        description = ((meta.get("schema") or {}).get("table_description") or "").strip()
        rows.append(
            {
                "index": name,
                "availability": "bundled"
                if bundled
                else f"fetched ({path.parent.name})"
                if here
                else f"bundled with idc-index-data, not in {source.directory}"
                if _shipped(name)
                else "on demand: dataset idc fetch " + name,
                "rows": int(count) if count is not None else None,
                "description": " ".join(description.split()),
            }
        )
    return rows


def index_columns(source: IndexSource, name: str) -> list[dict[str, str]]:
    """Columns of an index: name, type and description (from the package's schema)."""
    import duckdb

    metadata = _package_metadata()
    if name not in metadata:
        raise UnknownIndexError(f"unknown index {name!r}; known indices: {', '.join(sorted(metadata))}")
    described = {c["name"]: c for c in ((metadata[name].get("schema") or {}).get("columns") or [])}
    path = source.directory / f"{name}.parquet"
    if path.is_file():
        with _readable(f"index file {path} cannot be read"), duckdb.connect() as con:
            types = con.execute(f"DESCRIBE SELECT * FROM read_parquet({sql_str(str(path))})").fetchall()
        names = [(n, t) for n, t, *_ in types]
    else:
        names = [(n, c.get("type", "")) for n, c in described.items()]
    return [
        {"column": n, "type": t, "description": " ".join((described.get(n, {}).get("description") or "").split())}
        for n, t in names
    ]
