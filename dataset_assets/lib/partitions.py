"""One partition per collection of the installed IDC index, known without any instance state.

The keys come from the index's Parquet file (its ``collection_id`` column) when the definitions
load. Reading it needs PyArrow (0.3 s to import, on every run and every code-location load), so
the keys are kept in a small cache per index file (``$DATASET_CACHE_DIR``, else the user's cache
folder), named by the file's path, size, modification time and inode: a new release or another
``IDC_INDEX_DIR`` is another file, read once. An index that cannot be read, a collection id that
is not a plain name, or a cache that cannot be read or written never takes the code location
down: the problem is logged in one line and the partitions are what could be read.
"""

import hashlib
import json
import logging
from pathlib import Path

import dagster as dg

from dataset_assets import settings
from dataset_assets.core.fs import new_file, read_small
from dataset_assets.core.index.source import IndexSource
from dataset_assets.core.safety import name_problem

logger = logging.getLogger(__name__)


def _read_collection_ids(index_path: Path) -> list[str]:
    """The distinct ``collection_id`` values of the index file, read as the column's dictionary
    (no database, and not ``pq.read_table``, which imports pandas for the file's pandas metadata)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    found: set[str] = set()
    with pq.ParquetFile(index_path, read_dictionary=["collection_id"]) as index:
        for batch in index.iter_batches(columns=["collection_id"], batch_size=1 << 20):
            column = batch.column(0)
            if not pa.types.is_dictionary(column.type):
                column = pc.dictionary_encode(column)
            found.update(v for v in column.dictionary.take(pc.unique(column.indices)).to_pylist() if v is not None)
    return sorted(found)


def _cache_path(index_path: Path) -> Path:
    st = index_path.stat()
    key = repr((str(index_path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))
    return settings.cache_dir() / f"collection_ids-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def collection_ids_of(index_path: Path) -> list[str]:
    """The collection ids of an index file: from the cache when it holds this very file, else
    read from the file (and the cache written, when it can be)."""
    cache = _cache_path(index_path)
    try:
        ids = json.loads(read_small(cache, 1 << 24))  # never a planted FIFO or link, never huge
        if isinstance(ids, list) and all(isinstance(v, str) for v in ids):
            return ids
    except (OSError, ValueError):
        pass  # absent, unreadable or damaged: read the index instead
    ids = _read_collection_ids(index_path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with new_file(cache, "w", encoding="utf-8") as out:
            json.dump(ids, out)
    except OSError as exc:  # a read-only home: read the index at every load, as before
        logger.info("collection ids not cached in %s (%s)", cache.parent, exc.strerror or exc)
    return ids


def collection_partition_keys() -> list[str]:
    try:
        ids = collection_ids_of(IndexSource.at(settings.IDC_INDEX_DIR.get()).path("idc_index"))
    except Exception as exc:
        logger.warning("no collection partitions: the IDC index cannot be read (%s)", str(exc).splitlines()[0])
        return []
    unsafe = [v for v in ids if name_problem(v, "collection_id")]
    if unsafe:
        logger.warning(
            "collection ids that are not plain names have no partition: %s", ", ".join(map(repr, unsafe[:5]))
        )
    return sorted(v for v in ids if v not in unsafe)


collection_partitions = dg.StaticPartitionsDefinition(collection_partition_keys())


def shard_keys() -> list[str]:
    """``00`` ... ``<IDC_SHARDS - 1>``: the shard dimension (a bad setting is logged, and 16 used)."""
    from dataset_assets.core.select.shards import MAX_SHARDS

    raw = (settings.IDC_SHARDS.get() or "16").strip()
    count = int(raw) if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_SHARDS else 0
    if not count:
        logger.warning("IDC_SHARDS %r is not a whole number from 1 to %d; using 16", raw, MAX_SHARDS)
        count = 16
    return [f"{i:02d}" for i in range(count)]


#: One partition per shard of each collection, e.g. ``nlst|03``: launched together as one backfill,
#: each a run any worker can take.
shard_partitions = dg.MultiPartitionsDefinition(
    {"collection_id": collection_partitions, "shard": dg.StaticPartitionsDefinition(shard_keys())}
)
