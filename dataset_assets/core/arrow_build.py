"""Arrow arrays made from Python strings and integers without pyarrow's pandas probe.

pyarrow imports pandas the first time it converts any Python object (``pa.array``,
``pa.scalar``, ``pa.table`` from lists, a ``str`` passed to a compute function): about 0.2 s
of every process that builds a manifest, saves a download state or a header cache. Those only
need strings, 64-bit integers and lists of either, so they are built here from buffers; the
result is the same array ``pa.array(values, type)`` gives (a test compares them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from array import array
from collections.abc import Sequence
from itertools import accumulate

import pyarrow as pa

_LITTLE = sys.byteorder == "little" and array("i").itemsize == 4  # Arrow's offsets: little-endian int32
#: Bytes of text (or list items) per chunk: Arrow's ``string`` and ``list`` offsets are 32-bit, so
#: a column holding more (the header cache of all of NLST: 21.5 M files) is built in chunks.
CHUNK_LIMIT = 2**31 - 1


def give_back_freed_memory(user_chose: bool = False) -> None:
    """Make Arrow allocate with the system allocator instead of its default mimalloc pool.

    mimalloc keeps the segments each thread freed for reuse, so the short-lived arrays of a large
    selection (layout rendering, series per batch) stay in the process: measured at 200,000 files,
    planning held 12 MB more than at 20,000 with mimalloc and 4 MB with the system allocator.
    Our arrays are small and few, so the allocator's speed does not show. Called where the
    process is ours (the CLI's download and verify, the Dagster download steps), never by the
    Python API, with ``user_chose`` from ``settings.arrow_pool_chosen()``: a user's
    ``ARROW_DEFAULT_MEMORY_POOL`` is left alone.
    """
    if not user_chose and pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


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
    return pa.py_buffer(array("i", accumulate(lengths, initial=0)).tobytes())


def _ranges(weights: Sequence[int]) -> list[tuple[int, int]]:
    """Row ranges whose weights add up to at most ``CHUNK_LIMIT`` each (at least one row each)."""
    ranges, start, total = [], 0, 0
    for i, weight in enumerate(weights):
        if total + weight > CHUNK_LIMIT and i > start:
            ranges.append((start, i))
            start, total = i, 0
        total += weight
    ranges.append((start, len(weights)))
    return ranges


def _chunked(parts: list[pa.Array], type_: pa.DataType) -> pa.Array | pa.ChunkedArray:
    return parts[0] if len(parts) == 1 else pa.chunked_array(parts, type_)


def _string_chunk(values: Sequence[str | None], encoded: Sequence[bytes]) -> pa.Array:
    validity, nulls = _validity(values)
    buffers = [validity, _offsets([len(e) for e in encoded]), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), len(values), buffers, null_count=nulls)


def strings(values: Sequence[str | None]) -> pa.Array | pa.ChunkedArray:
    """``pa.array(values, pa.string())`` (chunked beyond ``CHUNK_LIMIT`` bytes of text)."""
    if not _LITTLE:
        return pa.array(values, pa.string())
    encoded = [b"" if v is None else v.encode() for v in values]
    parts = [_string_chunk(values[a:b], encoded[a:b]) for a, b in _ranges([len(e) for e in encoded])]
    return _chunked(parts, pa.string())


def int64s(values: Sequence[int | None]) -> pa.Array:
    """``pa.array(values, pa.int64())``."""
    if not _LITTLE:
        return pa.array(values, pa.int64())
    validity, nulls = _validity(values)
    data = pa.py_buffer(array("q", (0 if v is None else v for v in values)).tobytes())
    return pa.Array.from_buffers(pa.int64(), len(values), [validity, data], null_count=nulls)


def _list_chunk(values: Sequence[Sequence | None], item: pa.DataType) -> pa.Array:
    flat = [x for v in values if v is not None for x in v]
    child = strings(flat) if item == pa.string() else int64s(flat)
    if isinstance(child, pa.ChunkedArray):  # cannot happen: chunks are cut by text size too
        child = child.combine_chunks()
    validity, nulls = _validity(values)
    lengths = [0 if v is None else len(v) for v in values]
    return pa.Array.from_buffers(
        pa.list_(item), len(values), [validity, _offsets(lengths)], null_count=nulls, children=[child]
    )


def lists(values: Sequence[Sequence | None], item: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """``pa.array(values, pa.list_(item))`` for string or int64 items (chunked like ``strings``)."""
    if not _LITTLE:
        return pa.array(values, pa.list_(item))

    def weight(v: Sequence | None) -> int:
        if v is None:
            return 0
        text = sum(len(x.encode()) for x in v if x is not None) if item == pa.string() else 0
        return max(len(v), text)

    parts = [_list_chunk(values[a:b], item) for a, b in _ranges([weight(v) for v in values])]
    return _chunked(parts, pa.list_(item))


def column(values: Sequence, type_: pa.DataType) -> pa.Array | pa.ChunkedArray:
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


@contextlib.contextmanager
def _checked_parquet(path: str | os.PathLike):
    """A ``ParquetFile`` of one regular file; anything else (a FIFO, a device, a folder) is an
    ``OSError`` at once, never a read that waits for a writer. Arrow opens the file itself (a
    Python file object would have Arrow's I/O threads call back into Python, which can abort the
    interpreter at exit); through the descriptor's /proc link where there is one, so it reads the
    very file checked here. Without pyarrow.dataset (which imports pandas)."""
    import pyarrow.parquet as pq

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        proc_link = f"/proc/self/fd/{fd}"
        with pq.ParquetFile(proc_link if os.path.exists(proc_link) else os.fspath(path)) as file:
            yield file
    finally:
        os.close(fd)


def iter_parquet(path: str | os.PathLike, columns: list[str] | None = None, batch_rows: int = 1_000):
    """The column names of one regular Parquet file, then its record batches, ``batch_rows`` at a
    time (only ``columns`` that exist, when given): memory holds a batch, never the file."""
    with _checked_parquet(path) as file:
        names = file.schema_arrow.names
        wanted = [c for c in columns if c in names] if columns is not None else None
        yield names
        yield from file.iter_batches(batch_size=batch_rows, columns=wanted, use_threads=False)


def read_parquet(path: str | os.PathLike) -> pa.Table:
    """``pq.read_table(path)`` for one regular file (see ``_checked_parquet``)."""
    with _checked_parquet(path) as file:
        return file.read()
