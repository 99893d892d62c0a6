"""Arrow arrays made from Python strings and integers without pyarrow's pandas probe.

pyarrow imports pandas the first time it converts any Python object (``pa.array``,
``pa.scalar``, ``pa.table`` from lists, a ``str`` passed to a compute function): about 0.2 s
of every process that builds a manifest, saves a download state or a header cache. Those only
need strings, 64-bit integers and lists of either, so they are built here from buffers; the
result is the same array ``pa.array(values, type)`` gives (a test compares them).
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Sequence
from itertools import accumulate

import pyarrow as pa

_LITTLE = sys.byteorder == "little"  # Arrow's buffers are little-endian


def _validity(values: Sequence[object]) -> tuple[pa.Buffer | None, int]:
    nulls = sum(v is None for v in values)
    if not nulls:
        return None, 0
    bits = bytearray((len(values) + 7) // 8)
    for i, v in enumerate(values):
        if v is not None:
            bits[i >> 3] |= 1 << (i & 7)
    return pa.py_buffer(bytes(bits)), nulls


def _offsets(lengths: Sequence[int]) -> pa.Buffer:
    return pa.py_buffer(array("q", accumulate(lengths, initial=0)).tobytes())


def strings(values: Sequence[str | None]) -> pa.Array:
    """``pa.array(values, pa.string())``."""
    if not _LITTLE:
        return pa.array(values, pa.string())
    encoded = [b"" if v is None else v.encode() for v in values]
    validity, nulls = _validity(values)
    data = pa.py_buffer(b"".join(encoded))
    large = pa.Array.from_buffers(
        pa.large_string(), len(values), [validity, _offsets([len(e) for e in encoded]), data], null_count=nulls
    )
    return large.cast(pa.string())


def int64s(values: Sequence[int | None]) -> pa.Array:
    """``pa.array(values, pa.int64())``."""
    if not _LITTLE:
        return pa.array(values, pa.int64())
    validity, nulls = _validity(values)
    data = pa.py_buffer(array("q", (0 if v is None else v for v in values)).tobytes())
    return pa.Array.from_buffers(pa.int64(), len(values), [validity, data], null_count=nulls)


def lists(values: Sequence[Sequence | None], item: pa.DataType) -> pa.Array:
    """``pa.array(values, pa.list_(item))`` for string or int64 items."""
    if not _LITTLE:
        return pa.array(values, pa.list_(item))
    flat = [x for v in values if v is not None for x in v]
    child = strings(flat) if item == pa.string() else int64s(flat)
    validity, nulls = _validity(values)
    lengths = [0 if v is None else len(v) for v in values]
    large = pa.Array.from_buffers(
        pa.large_list(item), len(values), [validity, _offsets(lengths)], null_count=nulls, children=[child]
    )
    return large.cast(pa.list_(item))


def column(values: Sequence, type_: pa.DataType) -> pa.Array:
    """One of the above by type: string, int64, list<string>, list<int64>."""
    if type_ == pa.string():
        return strings(values)
    if type_ == pa.int64():
        return int64s(values)
    if pa.types.is_list(type_) and type_.value_type in (pa.string(), pa.int64()):
        return lists(values, type_.value_type)
    raise TypeError(f"no builder for {type_}")


def table(columns: dict[str, Sequence], schema: pa.Schema) -> pa.Table:
    """``pa.table(columns, schema=schema)`` for a schema of the types ``column`` builds."""
    return pa.Table.from_arrays([column(columns[f.name], f.type) for f in schema], schema=schema)


def scalar(value: str | int) -> pa.Scalar:
    """``pa.scalar(value)`` for a str (string) or an int (int64)."""
    return int64s([value])[0] if isinstance(value, int) else strings([value])[0]


def read_parquet(path: str | os.PathLike) -> pa.Table:
    """``pq.read_table(path)`` for one file, without pyarrow.dataset (which imports pandas)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as file:
        return file.read()
