"""SQL over the local IDC indices with DuckDB, and writing a result as a table, CSV, JSON or
Parquet, streamed in batches (memory stays flat whatever the number of rows: a table's column
widths come from its first rows, and a longer value is cut with a visible ``…``)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import stat
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import TextIO

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from dataset_assets.core.errors import FilterError, OptionError, UnknownIndexError
from dataset_assets.core.fs import new_file
from dataset_assets.core.index import extra_index as extra

BATCH_ROWS = 50_000
TABLE_WIDTH_ROWS = 1_000  # a table's column widths come from its first rows
TABLE_MAX_WIDTH = 80  # no IDC identifier is longer (DICOM UIDs: 64): a longer value is cut with a marker
CUT = "…"


def tables_of(con: duckdb.DuckDBPyConnection) -> list[str]:
    return sorted(r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall())


def _errors(con: duckdb.DuckDBPyConnection, exc: Exception) -> Exception:
    """One-line error for ``exc``: an unknown table names the tables there are and, for an
    on-demand index not fetched yet, how to fetch it."""
    message = str(exc).splitlines()[0]
    missing = re.search(r"Table with name (\w+) does not exist", message)
    if missing:
        name = missing.group(1)
        hint = f"; {name} is an on-demand index: {extra.fetch_hint(name)}" if name in extra.on_demand_indices() else ""
        return UnknownIndexError(f"no table {name!r}; tables here: {', '.join(tables_of(con))}{hint}")
    text = " ".join(str(exc).split())
    hint = (
        "; queries read the indices only: no extension is installed or loaded, and no other file is read or written"
        if "disabled by configuration" in text or "the configuration has been locked" in text
        else ""
    )
    return FilterError(f"query failed: {text[:400]}{hint}")


#: What a query may be: it reads (``DESCRIBE``, ``SHOW``, ``SUMMARIZE``, ``FROM ...`` parse as SELECT).
READ_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)


def relation(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation | None:
    """``sql`` as a relation; errors in one line. It must be one statement that reads, checked
    by DuckDB's own parser before anything runs: the connection may read the index files, so a
    ``COPY ... TO`` one of them (or any other writing statement) is refused here."""
    if not sql.strip():
        raise FilterError("the query is empty")
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise _errors(con, exc) from None
    kinds = [s.type for s in statements]
    if len(kinds) != 1 or kinds[0] not in READ_STATEMENTS:
        found = ", ".join(_verb(s) for s in statements) or "no statement"
        raise FilterError(
            f"query refused: one statement that reads (SELECT, WITH ... SELECT, FROM, DESCRIBE, SHOW, SUMMARIZE, "
            f"EXPLAIN) is run, this is {len(kinds)} ({found}); nothing was run"
        )
    try:
        return con.sql(sql)
    except duckdb.Error as exc:
        raise _errors(con, exc) from None


def _verb(statement: duckdb.Statement) -> str:
    """The statement's own first word as written (DuckDB files INSTALL under LOAD, PRAGMA under SET)."""
    words = re.findall(r"[A-Za-z_]+", re.sub(r"--[^\n]*|/\*.*?\*/", " ", statement.query, flags=re.S))
    return words[0].upper() if words else statement.type.name


def _batches(con: duckdb.DuckDBPyConnection, rel: duckdb.DuckDBPyRelation, limit: int | None) -> Iterator:
    reader = getattr(rel, "to_arrow_reader", None) or rel.record_batch  # DuckDB 2 renamed it
    left = limit
    try:
        for batch in reader(BATCH_ROWS):
            if left is not None:
                if left <= 0:
                    return
                batch = batch.slice(0, left)
                left -= batch.num_rows
            yield batch
    except (duckdb.Error, OSError) as exc:  # an error found part-way through arrives as a plain OSError
        raise _errors(con, exc) from None


def check_output(output: Path) -> None:
    """``OptionError`` unless ``output`` is a new file or a regular file we may replace (never a
    device, a link or a folder: ``--output /dev/null`` must not replace the device)."""
    if not str(output) or output.name in ("", ".", ".."):
        raise OptionError(f"--output {str(output)!r} is not a file name")
    if not output.parent.is_dir():
        raise OptionError(f"--output {output}: the folder {output.parent} does not exist; create it first")
    try:
        st = os.lstat(output)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise OptionError(
            f"--output {output} exists and is not a regular file (a link, device or folder); "
            "leave --output out to write to stdout, or name a new file"
        )


def _text(value: object) -> str:
    return "" if value is None else str(value)


def write_query(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    fmt: str,
    output: Path | None,
    limit: int | None,
    stdout: TextIO = sys.stdout,
) -> int:
    """Run ``sql`` and write its result as ``fmt`` to ``output`` (a temporary file renamed into
    place) or ``stdout``, batch by batch; returns the number of rows written."""
    if output is not None:
        check_output(output)
    if fmt == "parquet" and output is None:
        raise OptionError("--format parquet needs --output FILE")
    rel = relation(con, sql)
    if rel is None:
        return 0
    names = rel.columns
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise FilterError(
            f"the query returns the column name(s) {', '.join(duplicated)} twice; give them aliases (AS ...)"
        )
    if fmt == "table" and limit is None:
        limit = 50
    rows = 0
    try:
        if output is None:
            with _keep(stdout) as out:
                return _write_text(con, rel, names, fmt, limit, out)
        if fmt == "parquet":
            with new_file(output) as handle:
                writer = None
                try:
                    for batch in _batches(con, rel, limit):
                        if writer is None:
                            writer = pq.ParquetWriter(handle, batch.schema)
                        writer.write_batch(batch)
                        rows += batch.num_rows
                finally:
                    if writer is not None:
                        writer.close()
                if writer is None:
                    pq.write_table(pa.table({n: pa.array([], pa.null()) for n in names}), handle)
            return rows
        with new_file(output, "w", encoding="utf-8", newline="") as out:
            return _write_text(con, rel, names, fmt, limit, out)
    except (pa.ArrowException, OverflowError, ValueError) as exc:
        raise FilterError(
            f"the result cannot be written as {fmt} ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
            "CAST the column to VARCHAR or choose another --format"
        ) from None


class _keep:
    """A context manager that leaves ``stream`` open (stdout is not ours to close)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __enter__(self) -> TextIO:
        return self.stream

    def __exit__(self, *exc) -> None:
        self.stream.flush()


def _json_value(value: object) -> object:
    """``value`` as JSON can hold it: NaN and infinities (which no JSON parser reads) become null,
    a DECIMAL a number (an integer when it is whole)."""
    if isinstance(value, Decimal):
        value = int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _rows(con, rel, limit: int | None) -> Iterator[tuple]:
    for batch in _batches(con, rel, limit):
        yield from zip(*(c.to_pylist() for c in batch.columns), strict=True)


def _write_text(con, rel, names: list[str], fmt: str, limit: int | None, out: TextIO) -> int:
    rows = 0
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(names)
        for row in _rows(con, rel, limit):
            writer.writerow([_text(v) for v in row])
            rows += 1
        return rows
    if fmt == "json":
        out.write("[")
        for row in _rows(con, rel, limit):
            record = {n: _json_value(v) for n, v in zip(names, row, strict=True)}
            out.write(("\n  " if rows == 0 else ",\n  ") + json.dumps(record, default=str, allow_nan=False))
            rows += 1
        out.write("\n]\n" if rows else "]\n")
        return rows
    return _write_table(_rows(con, rel, limit), names, limit, out)


#: What a terminal would act on (escape sequences, NUL, line breaks) and the backslash that
#: marks an escape: shown as ``\n``, ``\x1b``, ``\u2028``, ``\\``, never written raw.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\\\\]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def _cell(value: object) -> str:
    return _UNPRINTABLE.sub(_escape, _text(value))


def _write_table(rows: Iterator[tuple], names: list[str], limit: int | None, out: TextIO) -> int:
    """An aligned table, streamed: widths from the first ``TABLE_WIDTH_ROWS`` rows (at most
    ``TABLE_MAX_WIDTH``); a value wider than its column is cut and ends in ``…``, and a last
    line says so and how to get it whole."""
    first: list[list[str]] = []
    for row in rows:
        first.append([_cell(v) for v in row])
        if len(first) >= TABLE_WIDTH_ROWS:
            break
    widths = [min(max([len(_cell(n)), *(len(r[i]) for r in first)]), TABLE_MAX_WIDTH) for i, n in enumerate(names)]
    cut = False

    def line(values: list[str]) -> str:
        nonlocal cut
        shown = []
        for value, width in zip(values, widths, strict=True):
            if len(value) > width:
                value, cut = value[: width - 1] + CUT, True
            shown.append(value.ljust(width))
        return "  ".join(shown).rstrip() + "\n"

    out.write(line([_cell(n) for n in names]))
    out.write("  ".join("-" * w for w in widths) + "\n")
    count = 0
    for values in first:
        out.write(line(values))
        count += 1
    for row in rows:
        out.write(line([_cell(v) for v in row]))
        count += 1
    if cut:
        out.write(f"(values ending in {CUT} are cut to fit; --format csv or json prints every value whole)\n")
    if limit is not None and count == limit:
        out.write(f"(first {limit:,} rows; --limit N, or --format csv|json|parquet for all)\n")
    return count
