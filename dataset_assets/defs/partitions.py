"""One partition per collection of the installed IDC index, known without any instance state."""


import dagster as dg

from dataset_assets.core.index import IndexSource, collection_ids


def collection_partition_keys() -> list[str]:
    with IndexSource.from_env().connect() as con:
        return collection_ids(con)


collection_partitions = dg.StaticPartitionsDefinition(collection_partition_keys())
