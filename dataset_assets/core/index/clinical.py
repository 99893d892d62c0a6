"""IDC's clinical tables: the tabular data (age, stage, outcome, ...) that accompanies collections,
one table per collection and topic, described column by column by ``clinical_index``.

A release's tables are the Parquet objects under
``s3://idc-open-metadata/bigquery_export/idc_v<release>_clinical/`` (where idc-index fetches
them): either ``<table>.parquet`` or ``<table>/<part>.parquet``. They are fetched with the project's s5cmd
runner from the configured endpoint (a mirror, or the loopback server of the tests):

* the prefix is listed first and every name checked (a table name, a plain file name: never a
  path that could leave the folder), then each object is copied to a name made here;
* each file's size is checked against the listing, each table's columns against the columns
  ``clinical_index`` gives it (a table it names that is missing, or a column it lacks, fails
  the fetch in one line); tables the index does not name are left out, and said;
* everything lands in a private staging folder and replaces ``<folder>/`` only once complete.

``tables(folder)`` finds what was fetched; ``extra_index.connect_all`` makes each a view named by
its short table name, for ``dataset idc query`` and cohort SQL (join on ``dicom_patient_id`` /
``PatientID``).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dataset_assets.core.errors import DownloadError, IndexUnavailableError
from dataset_assets.core.fmt import redact_url
from dataset_assets.core.index.source import sql_str
from dataset_assets.core.transfer import s5cmd
from dataset_assets.core.transfer.progress import parse_line

BUCKET = "idc-open-metadata"
#: An object below the release's prefix: ``<table>.parquet`` or ``<table>/<part>.parquet``.
_OBJECT = re.compile(
    r"(?P<table>[a-z][a-z0-9_]{0,127})(?:\.parquet|/(?P<part>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\.parquet))"
)
#: Names DuckDB gives a meaning of its own in a FROM clause: never a clinical table's.
_RESERVED = frozenset({"information_schema", "main", "temp", "system", "pg_catalog"})


def plain_table_name(name: str) -> bool:
    """A clinical table name as BigQuery exports them: lower case, letters, digits and ``_``."""
    return re.fullmatch(r"[a-z][a-z0-9_]{0,127}", name) is not None and name not in _RESERVED


def prefix(release: int) -> str:
    return f"bigquery_export/idc_v{int(release)}_clinical/"


@dataclass(frozen=True)
class ClinicalFetch:
    folder: Path
    tables: dict[str, int]  # table -> rows
    bytes: int
    skipped: list[str]  # listed tables clinical_index does not name


def expected_columns(clinical_index: Path) -> dict[str, set[str]]:
    """Short table name -> its columns, as ``clinical_index`` describes them."""
    import duckdb

    with duckdb.connect() as con:
        rows = con.execute(
            f'SELECT short_table_name, list(DISTINCT "column") FROM read_parquet({sql_str(str(clinical_index))}) '
            "WHERE short_table_name IS NOT NULL GROUP BY 1"
        ).fetchall()
    return {table: {c for c in columns if c} for table, columns in rows}


def _listing(options: s5cmd.S5cmdOptions, release: int) -> dict[str, int]:
    """Object name below the release's prefix -> size."""
    base = f"s3://{BUCKET}/{prefix(release)}"
    listed: dict[str, int] = {}
    errors: list[str] = []

    def on_stdout(line: str) -> None:
        record = parse_line(line) or {}
        key, size = record.get("key"), record.get("size")
        if isinstance(key, str) and isinstance(size, int) and key.startswith(base):
            listed[key[len(base) :]] = size

    def on_stderr(line: str) -> None:
        record = parse_line(line) or {}
        if record.get("error"):
            errors.append(str(record["error"])[:200])

    fd, name = tempfile.mkstemp(prefix="dataset-clinical-ls-", suffix=".s5cmd")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(f'ls "{base}*"\n')
        s5cmd.run_commands(options, name, on_stdout=on_stdout, on_stderr=on_stderr)
    finally:
        os.unlink(name)
    if not listed:
        why = f": {errors[0]}" if errors else ""
        raise IndexUnavailableError(f"no clinical table is listed at {base} on {redact_url(options.endpoint_url)}{why}")
    return listed


def fetch(
    folder: Path, release: int, options: s5cmd.S5cmdOptions, clinical_index: Path, log=lambda _m: None
) -> ClinicalFetch:
    """Fetch every clinical table ``clinical_index`` names into ``folder`` (see the module)."""
    import duckdb

    from dataset_assets.core.transfer.s5cmd import command_line

    wanted = expected_columns(clinical_index)
    listed = _listing(options, release)
    by_table: dict[str, dict[str, int]] = {}
    for name, size in sorted(listed.items()):
        match = _OBJECT.fullmatch(name)
        if match is None or not plain_table_name(match["table"]):
            raise DownloadError(
                f"the endpoint lists {name!r} below {prefix(release)}, which is not a table file "
                "(<table>.parquet or <table>/<part>.parquet, the table's name in lower case); nothing was fetched"
            )
        by_table.setdefault(match["table"], {})[name] = size
    missing = sorted(set(wanted) - set(by_table))
    if missing:
        raise IndexUnavailableError(
            f"clinical_index names {len(missing)} table(s) the endpoint does not list below {prefix(release)} "
            f"(e.g. {', '.join(missing[:3])}); nothing was fetched"
        )
    skipped = sorted(set(by_table) - set(wanted))
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".clinical-incoming-"))
    try:
        fd, command_path = tempfile.mkstemp(dir=staging, prefix=".cp-", suffix=".s5cmd")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for table in wanted:
                for name in by_table[table]:
                    (staging / name).parent.mkdir(parents=True, exist_ok=True)
                    url = f"s3://{BUCKET}/{prefix(release)}{name}"
                    handle.write(command_line("cp", url, str(staging / name), options.copy_flags()))
        log(f"fetching {len(wanted)} clinical table(s) of IDC v{release} from {redact_url(options.endpoint_url)}")
        code = s5cmd.run_commands(options, command_path, on_stdout=lambda _l: None, on_stderr=lambda _l: None)
        os.unlink(command_path)
        rows: dict[str, int] = {}
        total = 0
        with duckdb.connect() as con:
            for table in sorted(wanted):
                files = sorted(by_table[table])
                for name in files:
                    path = staging / name
                    size = path.stat().st_size if _regular(path) else None
                    if size != by_table[table][name]:
                        raise DownloadError(
                            f"clinical table {table}: {name} is {size if size is not None else 'missing'} "
                            f"bytes, the listing says {by_table[table][name]} (s5cmd exit code {code}); "
                            "nothing was kept, fetch again"
                        )
                    total += size
                paths = "[" + ", ".join(sql_str(str(staging / n)) for n in files) + "]"
                try:
                    columns = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({paths})").fetchall()}
                    ((count,),) = con.execute(f"SELECT count(*) FROM read_parquet({paths})").fetchall()
                except duckdb.Error as exc:
                    raise IndexUnavailableError(
                        f"clinical table {table} cannot be read ({str(exc).splitlines()[0][:160]}); nothing was kept"
                    ) from None
                lacking = sorted(wanted[table] - columns)
                if lacking:
                    raise IndexUnavailableError(
                        f"clinical table {table} lacks {len(lacking)} column(s) clinical_index gives it "
                        f"(e.g. {', '.join(lacking[:3])}); nothing was kept"
                    )
                rows[table] = int(count)
        for table in skipped:  # listed but not described: not kept
            shutil.rmtree(staging / table, ignore_errors=True)
            with_suffix = staging / f"{table}.parquet"
            if _regular(with_suffix):
                with_suffix.unlink()
        old = None
        if os.path.lexists(folder):
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                raise IndexUnavailableError(f"{folder} is not a folder (a link or a file); remove it and fetch again")
            old = folder.with_name(folder.name + f".old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(staging, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if skipped:
        log(f"left out {len(skipped)} listed table(s) clinical_index does not describe: {', '.join(skipped[:5])}")
    return ClinicalFetch(folder, rows, total, skipped)


def tables(folder: Path) -> dict[str, list[Path]]:
    """The fetched clinical tables in ``folder``: short table name -> its Parquet files (regular
    files only, never through a link)."""
    found: dict[str, list[Path]] = {}
    if not folder.is_dir() or folder.is_symlink():
        return found
    for entry in sorted(folder.iterdir()):
        if _regular(entry) and entry.suffix == ".parquet" and _OBJECT.fullmatch(entry.name):
            found.setdefault(entry.stem, []).append(entry)
        elif entry.is_dir() and not entry.is_symlink() and _OBJECT.fullmatch(f"{entry.name}.parquet"):
            parts = [p for p in sorted(entry.glob("*.parquet")) if _regular(p)]
            if parts:
                found.setdefault(entry.name, []).extend(parts)
    return found


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
