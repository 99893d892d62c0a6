"""One partition per collection of the installed IDC index, known without any instance state.

The keys are read from the index's Parquet file (one column) when the definitions load: no
database is opened and nothing outside this module changes. An index that cannot be read, or a
collection id that is not a plain name, never takes the code location down: the problem is logged
in one line and the partitions are what could be read.
"""

import logging

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataset_assets.core.index import IndexSource
from dataset_assets.core.safety import name_problem

logger = logging.getLogger(__name__)


def collection_partition_keys() -> list[str]:
    try:
        # One column read as a dictionary (its distinct values without decoding a million strings):
        # no database, and not pq.read_table, which imports pandas for the file's pandas metadata.
        found: set[str] = set()
        index_path = IndexSource.from_env().path("idc_index")
        with pq.ParquetFile(index_path, read_dictionary=["collection_id"]) as index:
            for batch in index.iter_batches(columns=["collection_id"], batch_size=1 << 20):
                column = batch.column(0)
                if not pa.types.is_dictionary(column.type):
                    column = pc.dictionary_encode(column)
                found.update(v for v in column.dictionary.take(pc.unique(column.indices)).to_pylist() if v is not None)
        ids = sorted(found)
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
    from dataset_assets import settings
    from dataset_assets.core.shards import MAX_SHARDS

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
