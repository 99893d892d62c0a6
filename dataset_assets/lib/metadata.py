"""What the Dagster layer shows and how it fails, said once: column schemas from the schema files
idc-index-data ships, table previews as ``MetadataValue.table``, and one-line failures."""

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import dagster as dg

from dataset_assets.core.fmt import scrub_text

#: Dagster's column type names for the types idc-index-data's schema files and Arrow use.
_TYPES = {"STRING": "string", "INTEGER": "int", "INT64": "int", "FLOAT": "float", "FLOAT64": "float",
          "BOOLEAN": "bool", "BOOL": "bool", "TIMESTAMP": "timestamp", "DATE": "date", "RECORD": "struct"}  # fmt: skip


def index_column_schema(schema_dir: Path, name: str) -> dg.TableSchema | None:
    """The columns of index ``name`` (``<name>_schema.json`` in ``schema_dir``, as idc-index-data
    ships it) with their types and descriptions; ``None`` when the file is not there or not readable."""
    try:
        described = json.loads((schema_dir / f"{name}_schema.json").read_text(encoding="utf-8"))["columns"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    columns = []
    for column in described:
        if not isinstance(column, dict) or not isinstance(column.get("name"), str):
            continue
        kind = _TYPES.get(str(column.get("type", "")).upper(), str(column.get("type", "")).lower() or "string")
        if column.get("mode") == "REPEATED":
            kind = f"list<{kind}>"
        description = " ".join(str(column.get("description") or "").split()) or None
        columns.append(dg.TableColumn(column["name"], kind, description))
    return dg.TableSchema(columns=columns)


def table_preview(rows: Iterable[Mapping], columns: Mapping[str, str]) -> dg.TableMetadataValue:
    """Rows as a table the UI renders (``columns``: name -> Dagster type); values of other types
    are shown as text."""
    records = []
    for row in rows:
        values = {}
        for name, kind in columns.items():
            value = row.get(name)
            if value is not None and kind == "int":
                value = int(value)
            elif value is not None and kind == "float":
                value = float(value)
            elif value is not None and not isinstance(value, (str, int, float, bool)):
                value = str(value)
            values[name] = value
        records.append(dg.TableRecord(values))
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in columns.items()])
    return dg.MetadataValue.table(records, schema)


def failure(problem: object, *, metadata: Mapping | None = None, retry: bool = True) -> dg.Failure:
    """The step's failure: one line (secrets scrubbed), ``metadata`` beside it; ``retry=False`` for
    what a retry cannot fix (a bad value, a bad declaration)."""
    text = " ".join(scrub_text(str(problem)).split())
    return dg.Failure(description=text, metadata=dict(metadata or {}), allow_retries=retry)
