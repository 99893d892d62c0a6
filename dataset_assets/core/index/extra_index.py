"""IDC indices that ``idc-index-data`` describes but does not ship (``sm_index``,
``sm_instance_index``, ``clinical_index``, ...): fetched on demand, checked against the schema
the package ships, kept per release, and queryable with SQL beside the bundled ones.

A fetched index lives at ``$IDC_EXTRA_INDEX_DIR/<idc-index-data version>/<name>.parquet``; it is
downloaded from ``$IDC_INDEX_BASE_URL/<idc-index-data version>/<name>.parquet`` with the HTTP
engine of the bundles (retries, resume, proxies, CA bundles, atomic rename), into a staging
folder first, and only moved into place once its schema matches.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dataset_assets.core.errors import IndexUnavailableError, OptionError, UnknownIndexError
from dataset_assets.core.fmt import redact_url
from dataset_assets.core.http.bundles import HttpLimits
from dataset_assets.core.index.source import BUNDLED, IndexSource, installed_package, sql_str
from dataset_assets.core.safety import CONTROL
from dataset_assets.core.urls import INDEX_RELEASES_URL

if TYPE_CHECKING:  # DuckDB loads with the first query, not with the definitions
    import duckdb

Log = Callable[[str], None]

#: BigQuery types in the shipped schemas -> DuckDB type families that satisfy them.
_TYPE_FAMILIES = {
    "STRING": ("VARCHAR",),
    "INTEGER": ("BIGINT", "INTEGER", "SMALLINT", "TINYINT", "UBIGINT", "UINTEGER", "USMALLINT", "UTINYINT", "HUGEINT"),
    "INT64": ("BIGINT", "INTEGER", "SMALLINT", "TINYINT", "UBIGINT", "UINTEGER", "HUGEINT"),
    "FLOAT": ("DOUBLE", "FLOAT", "DECIMAL"),
    "FLOAT64": ("DOUBLE", "FLOAT", "DECIMAL"),
    "NUMERIC": ("DOUBLE", "FLOAT", "DECIMAL", "BIGINT", "INTEGER"),
    "BOOLEAN": ("BOOLEAN",),
    "BOOL": ("BOOLEAN",),
    "TIMESTAMP": ("TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP_NS", "TIMESTAMP_MS", "TIMESTAMP_S"),
    "DATE": ("DATE",),
    "DATETIME": ("TIMESTAMP", "TIMESTAMP_NS"),
}


def package_dir() -> Path:
    return installed_package()[0]


def package_version() -> str:
    return installed_package()[1]


def described_indices() -> list[str]:
    """Every index the installed idc-index-data describes (a ``<name>_schema.json``)."""
    return sorted(p.name[: -len("_schema.json")] for p in package_dir().glob("*_schema.json"))


def on_demand_indices() -> list[str]:
    """Indices described by idc-index-data whose data it does not ship."""
    return [n for n in described_indices() if not (package_dir() / f"{n}.parquet").is_file()]


def schema(name: str) -> list[dict]:
    path = package_dir() / f"{name}_schema.json"
    if not path.is_file():
        raise UnknownIndexError(f"unknown index {name!r}; idc-index-data describes: {', '.join(described_indices())}")
    return json.loads(path.read_text())["columns"]


def require_on_demand(name: str) -> str:
    known = on_demand_indices()
    if name not in known:
        shipped = name in described_indices()
        raise UnknownIndexError(
            f"{name!r} is bundled with idc-index-data, nothing to fetch"
            if shipped
            else f"unknown index {name!r}; indices fetched on demand: {', '.join(known)}"
        )
    return name


@dataclass(frozen=True)
class IndexStore:
    """Where on-demand indices live: fetched from ``base_url`` (``$IDC_INDEX_BASE_URL``; it may
    hold credentials, so it is shown only through ``redact_url``) into
    ``folder/<idc-index-data version>/`` (``$IDC_EXTRA_INDEX_DIR``)."""

    folder: Path
    base_url: str = field(default=INDEX_RELEASES_URL, repr=False)
    limits: HttpLimits = field(default_factory=HttpLimits)

    def local_dir(self) -> Path:
        return Path(self.folder).absolute() / package_version()


def local_path(store: IndexStore, name: str) -> Path | None:
    """The fetched ``<name>.parquet`` of the installed release, or ``None`` when not fetched."""
    path = store.local_dir() / f"{name}.parquet"
    return path if path.is_file() else None


def fetch_hint(name: str) -> str:
    return f"fetch it with `dataset idc fetch {name}` or by materializing idc_extra_index[{name}]"


def url_of(store: IndexStore, name: str) -> str:
    """``$IDC_INDEX_BASE_URL/<version>/<name>.parquet``: the path is appended to the base URL's
    path, so a query string (a signed mirror's token) stays a query string, after it. The URL may
    hold credentials: print, log or store it only through ``redact_url``."""
    from urllib.parse import urlsplit, urlunsplit

    raw = store.base_url
    try:
        base = urlsplit(raw)
        base.port  # noqa: B018 (parsing the port is the check)
    except ValueError:  # its message can quote a piece of a password: not shown
        raise OptionError(
            f"IDC_INDEX_BASE_URL {redact_url(raw)!r} is not a valid URL (a password holding '/', ':' or '@' must be "
            "percent-encoded: %2F, %3A, %40)"
        ) from None
    if base.scheme not in ("http", "https") or not base.hostname or "@" in base.path or CONTROL.search(raw):
        raise OptionError(
            f"IDC_INDEX_BASE_URL {redact_url(raw)!r} is not an http(s) URL with a host (a password holding "
            "'/' or '@' must be percent-encoded: %2F, %40)"
        )
    path = f"{base.path.rstrip('/')}/{package_version()}/{name}.parquet"
    return urlunsplit((base.scheme, base.netloc, path, base.query, ""))


def check_schema(path: Path, name: str) -> None:
    """``IndexUnavailableError`` unless the Parquet file at ``path`` has every column of the
    shipped schema of ``name``, each of a compatible type (lists for REPEATED columns)."""
    import duckdb

    try:
        with duckdb.connect() as con:  # a private connection, never duckdb's shared default one
            described = con.execute(f"DESCRIBE SELECT * FROM read_parquet({sql_str(str(path))})").fetchall()
    except duckdb.Error as exc:
        raise IndexUnavailableError(
            f"{name}: {path} is not a readable Parquet file ({str(exc).splitlines()[0]})"
        ) from None
    present = {row[0]: row[1] for row in described}
    problems = []
    for column in schema(name):
        have = present.get(column["name"])
        if have is None:
            problems.append(f"{column['name']} missing")
            continue
        repeated = column.get("mode") == "REPEATED"
        base = have[:-2] if have.endswith("[]") else have
        if repeated != have.endswith("[]"):
            problems.append(f"{column['name']} is {have}, expected {'a list' if repeated else 'a scalar'}")
            continue
        families = _TYPE_FAMILIES.get(column["type"].upper())
        if families and not any(base == f or base.startswith(f + "(") for f in families):
            problems.append(f"{column['name']} is {have}, expected {column['type']}")
    if problems:
        raise IndexUnavailableError(
            f"{name}: the fetched file does not match the schema shipped with idc-index-data "
            f"{package_version()}: " + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else "")
        )


@dataclass
class FetchResult:
    name: str
    path: Path
    rows: int
    bytes: int
    transferred_bytes: int
    skipped: bool


def row_count(path: Path) -> int:
    import duckdb

    with duckdb.connect() as con:
        (count,) = con.execute(
            "SELECT sum(num_rows) FROM (SELECT DISTINCT file_name, row_group_id, row_group_num_rows AS num_rows "
            f"FROM parquet_metadata({sql_str(str(path))}))"
        ).fetchone()
    return int(count or 0)


def fetch(store: IndexStore, name: str, *, log: Log = lambda _m: None, force: bool = False) -> FetchResult:
    """Fetch ``name`` of the installed release (unless already here and ``force`` is off),
    check its schema, and move it into place. Raises ``DownloadError`` / ``IndexUnavailableError``."""
    from dataset_assets.core.http.bundles import Bundle, download_bundle  # requests: imported by what fetches only

    require_on_demand(name)
    folder = store.local_dir()
    final = folder / f"{name}.parquet"
    if os.path.lexists(final) and not _regular(final):
        raise IndexUnavailableError(
            f"{final} is not a regular file (a link, FIFO or folder); remove it and fetch again"
        )
    if final.is_file() and not force:
        check_schema(final, name)
        return FetchResult(name, final, row_count(final), final.stat().st_size, 0, True)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_old_staging(folder)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".incoming-"))  # private to this fetch: nothing planted
    try:
        url = url_of(store, name)
        log(f"fetching {name} from {redact_url(url)}")
        bundle = Bundle(name=name, url=url, filename=f"{name}.parquet")
        result = download_bundle(bundle, staging, limits=store.limits, log=log)
        check_schema(result.path, name)
        check_readable(result.path, name)
        os.replace(result.path, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return FetchResult(name, final, row_count(final), final.stat().st_size, result.transferred_bytes, False)


def check_readable(path: Path, name: str) -> None:
    """Decode every row of the file once (a schema footer can sit on top of corrupt pages)."""
    import duckdb

    try:
        with duckdb.connect() as con:
            rel = con.sql(f"SELECT * FROM read_parquet({sql_str(str(path))})")
            reader = getattr(rel, "to_arrow_reader", None) or rel.record_batch
            for _batch in reader(100_000):
                pass
    except duckdb.Error as exc:
        raise IndexUnavailableError(
            f"{name}: the fetched file cannot be read to its end ({str(exc).splitlines()[0][:160]}); not kept"
        ) from None


def _remove_old_staging(folder: Path, older_than_s: float = 3600) -> None:
    """Staging folders a killed fetch left, of indices and of clinical tables (ours by their name; an
    hour old: no fetch still uses them)."""
    import time

    for path in [*folder.glob(".incoming-*"), *folder.glob(".clinical-incoming-*"), *folder.glob("clinical.old-*")]:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and time.time() - st.st_mtime > older_than_s:
            shutil.rmtree(path, ignore_errors=True)


def fetched(store: IndexStore) -> dict[str, Path]:
    """Fetched indices of the installed release: name -> path."""
    folder = store.local_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.parquet")) if _regular(p)}  # never a FIFO, link or folder


def connect_all(source: IndexSource, store: IndexStore, log: Log = lambda _m: None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view per bundled index and per fetched one. A file
    that is not a regular, readable Parquet file is skipped with one line through ``log``.
    The connection is locked for user SQL (``lock_for_user_sql``): it reads the index files and
    nothing else, and installs or loads no extension."""
    import duckdb

    con = source.connect()
    read = [source.directory / f"{n}.parquet" for n in BUNDLED if (source.directory / f"{n}.parquet").is_file()]
    shipped = {p.stem: p for p in sorted(source.directory.glob("*.parquet"))}  # analysis_results_index, ...
    for name, path in {**shipped, **fetched(store)}.items():
        if name in BUNDLED or not name.isidentifier():
            continue
        if not _regular(path):
            log(f"skipped {path}: not a regular file")
            continue
        try:
            con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({sql_str(str(path))})")
            con.execute(f"SELECT * FROM {name} LIMIT 0")
            read.append(path)
        except duckdb.Error as exc:
            con.execute(f"DROP VIEW IF EXISTS {name}")
            log(f"skipped {path}: not a readable Parquet file ({str(exc).splitlines()[0][:120]})")
    from dataset_assets.core.index import clinical

    # DuckDB's names are case-insensitive: a table is compared in lower case, never replaces a view
    # that is there, and is created under a quoted name (a keyword such as `select` stays a name).
    taken = {r[0].lower() for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    for table, files in clinical.tables(clinical_folder(store)).items():
        if not clinical.plain_table_name(table) or table in taken:
            log(f"skipped the clinical table {table}: its name is taken or not a plain lower-case name")
            continue
        parts = ", ".join(sql_str(str(f)) for f in files)
        try:
            con.execute(f'CREATE VIEW "{table}" AS SELECT * FROM read_parquet([{parts}])')
            con.execute(f'SELECT * FROM "{table}" LIMIT 0')
        except duckdb.Error as exc:
            con.execute(f'DROP VIEW IF EXISTS "{table}"')  # the name was free: only this view is dropped
            log(f"skipped the clinical table {table}: not readable ({str(exc).splitlines()[0][:120]})")
            continue
        taken.add(table)
        read.extend(files)
    lock_for_user_sql(con, read)
    return con


def clinical_folder(store: IndexStore) -> Path:
    """Where the clinical tables of the installed release are kept (fetched with ``clinical_index``)."""
    return store.local_dir() / "clinical"


def lock_for_user_sql(con: duckdb.DuckDBPyConnection, files: list[Path]) -> None:
    """Make ``con`` safe for SQL someone else wrote (``dataset idc query``, a cohort's ``sql``):
    no extension is installed or loaded (explicitly or automatically, from any repository), no
    file is read or written but ``files`` (the indices behind the views: no COPY TO, no ATTACH,
    no reading other files), and then the configuration is locked, so a ``SET`` in that SQL
    cannot undo any of it."""
    allowed = sorted({text for f in files for text in (str(f), str(Path(f).absolute()))})
    for statement in (
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        "SET allow_community_extensions = false",
        f"SET allowed_paths = [{', '.join(map(sql_str, allowed))}]",
        "SET enable_external_access = false",
        "SET lock_configuration = true",
    ):
        con.execute(statement)


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
