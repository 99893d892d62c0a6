"""The Dagster layer's shared parts (not definitions): resources, partitions, the executor,
owners and groups, metadata and failures. The definitions live in ``dataset_assets/defs/``.
"""
