"""SQL over the local IDC indices with DuckDB, and writing a result as a table, CSV, JSON or
Parquet, streamed in batches (memory stays flat whatever the number of rows)."""

from __future__ import annotations

import csv
import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from . import extra_index as extra
from .errors import FilterError, OptionError, UnknownIndexError

BATCH_ROWS = 50_000


def tables_of(con: duckdb.DuckDBPyConnection) -> list[str]:
    return sorted(r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall())


def _errors(con: duckdb.DuckDBPyConnection, exc: duckdb.Error) -> Exception:
    """One-line error for ``exc``: an unknown table names the tables there are and, for an
    on-demand index not fetched yet, how to fetch it."""
    message = str(exc).splitlines()[0]
    missing = re.search(r"Table with name (\w+) does not exist", message)
    if missing:
        name = missing.group(1)
        hint = f"; {name} is an on-demand index: {extra.fetch_hint(name)}" if name in extra.on_demand_indices() else ""
        return UnknownIndexError(f"no table {name!r}; tables here: {', '.join(tables_of(con))}{hint}")
    return FilterError(f"query failed: {' '.join(str(exc).split())[:400]}")


def relation(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation | None:
    """``sql`` as a relation (``None`` for a statement without a result); errors in one line."""
    if not sql.strip():
        raise FilterError("the query is empty")
    try:
        return con.sql(sql)
    except duckdb.Error as exc:
        raise _errors(con, exc) from None


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
    except duckdb.Error as exc:
        raise _errors(con, exc) from None


def check_output(output: Path) -> None:
    """``OptionError`` unless ``output`` is a new file or a regular file we may replace (never a
    device, a link or a folder: ``--output /dev/null`` must not replace the device)."""
    if not str(output) or output.name in ("", ".", ".."):
        raise OptionError(f"--output {str(output)!r} is not a file name")
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
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp") if output is not None else None
    rows = 0
    try:
        if fmt == "parquet":
            writer = None
            try:
                for batch in _batches(con, rel, limit):
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, batch.schema)
                    writer.write_batch(batch)
                    rows += batch.num_rows
            finally:
                if writer is not None:
                    writer.close()
            if writer is None:
                pq.write_table(pa.table({n: pa.array([], pa.null()) for n in names}), tmp)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") if tmp is not None else _keep(stdout) as out:
                rows = _write_text(con, rel, names, fmt, limit, out)
        if tmp is not None:
            os.replace(tmp, output)
    except (pa.ArrowException, OverflowError, ValueError) as exc:
        raise FilterError(
            f"the result cannot be written as {fmt} ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
            "CAST the column to VARCHAR or choose another --format"
        ) from None
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return rows


class _keep:
    """A context manager that leaves ``stream`` open (stdout is not ours to close)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __enter__(self) -> TextIO:
        return self.stream

    def __exit__(self, *exc) -> None:
        self.stream.flush()


def _write_text(con, rel, names: list[str], fmt: str, limit: int | None, out: TextIO) -> int:
    rows = 0
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(names)
        for batch in _batches(con, rel, limit):
            for row in zip(*(c.to_pylist() for c in batch.columns), strict=True):
                writer.writerow([_text(v) for v in row])
            rows += batch.num_rows
        return rows
    if fmt == "json":
        out.write("[")
        for batch in _batches(con, rel, limit):
            for row in zip(*(c.to_pylist() for c in batch.columns), strict=True):
                out.write(
                    ("\n  " if rows == 0 else ",\n  ") + json.dumps(dict(zip(names, row, strict=True)), default=str)
                )
                rows += 1
        out.write("\n]\n" if rows else "]\n")
        return rows
    shown = [
        [_text(v) for v in row]
        for b in _batches(con, rel, limit)
        for row in zip(*(c.to_pylist() for c in b.columns), strict=True)
    ]
    widths = [min(max([len(n), *(len(r[i]) for r in shown)]), 60) for i, n in enumerate(names)]
    out.write("  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for r in shown:
        out.write("  ".join(v[:60].ljust(w) for v, w in zip(r, widths, strict=True)) + "\n")
    if limit is not None and len(shown) == limit:
        out.write(f"(first {limit:,} rows; --limit N, or --format csv|json|parquet for all)\n")
    return len(shown)
