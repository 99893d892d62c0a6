"""dataset_assets: NCI Imaging Data Commons as Dagster software-defined assets.

``dataset_assets.core`` holds the pure logic (no Dagster imports); ``dataset_assets.defs``
is the thin Dagster layer; ``dataset_assets.definitions:defs`` wires it together.
"""
