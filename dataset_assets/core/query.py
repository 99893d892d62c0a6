"""SQL over the local IDC indices with DuckDB, and writing a result as a table, CSV, JSON or Parquet."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from . import extra_index as extra
from .errors import FilterError, UnknownIndexError


def tables_of(con: duckdb.DuckDBPyConnection) -> list[str]:
    return sorted(r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall())


def run_query(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """The result of ``sql`` as Arrow. An unknown table names the tables there are and, for an
    on-demand index not fetched yet, how to fetch it; any other error is one line."""
    try:
        relation = con.sql(sql)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except duckdb.CatalogException as exc:
        message = str(exc).splitlines()[0]
        missing = re.search(r"Table with name (\w+) does not exist", message)
        if missing:
            name = missing.group(1)
            hint = (
                f"; {name} is an on-demand index: {extra.fetch_hint(name)}" if name in extra.on_demand_indices() else ""
            )
            raise UnknownIndexError(f"no table {name!r}; tables here: {', '.join(tables_of(con))}{hint}") from None
        raise FilterError(f"query failed: {message}") from None
    except duckdb.Error as exc:
        raise FilterError(f"query failed: {' '.join(str(exc).split())[:400]}") from None


def _text(value: object) -> str:
    return "" if value is None else str(value)


def write_result(
    table: pa.Table, fmt: str, output: Path | None, limit: int | None, echo: Callable[[str], None] = print
) -> None:
    """Write ``table`` as ``fmt`` to ``output`` (atomically) or through ``echo``."""
    if fmt == "table" and limit is None:
        limit = 50
    shown = table.slice(0, limit) if limit is not None else table
    if fmt == "parquet":
        assert output is not None
        tmp = output.with_name(f".{output.name}.tmp")
        pq.write_table(shown, tmp)
        tmp.replace(output)
        echo(f"{shown.num_rows:,} rows written to {output}")
        return
    if fmt == "json":
        text = json.dumps(shown.to_pylist(), indent=2, default=str)
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(shown.column_names)
        for row in shown.to_pylist():
            writer.writerow([_text(row[c]) for c in shown.column_names])
        text = buffer.getvalue().rstrip("\n")
    else:
        rows = [[_text(v) for v in r.values()] for r in shown.to_pylist()]
        names = shown.column_names
        widths = [min(max([len(n), *(len(r[i]) for r in rows)]), 60) for i, n in enumerate(names)]
        lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v[:60].ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        if table.num_rows > shown.num_rows:
            lines.append(f"... {table.num_rows - shown.num_rows:,} more rows (--limit, or --format csv|json|parquet)")
        text = "\n".join(lines)
    if output is not None:
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(output)
        echo(f"{shown.num_rows:,} rows written to {output}")
    else:
        echo(text)
