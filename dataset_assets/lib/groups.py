"""Names the Dagster layer shares: owners and asset groups. Environment settings live in
``dataset_assets.settings`` (one module for the CLI, the core and the Dagster layer)."""

OWNERS = ["team:imaging-data"]
INDEX_GROUP = "idc_catalog"  # idc_index, idc_collections
DOWNLOADS_GROUP = "idc_downloads"  # collection_manifest, downloaded_collection
BUNDLES_GROUP = "http_bundles"  # http_datasets
