"""Environment settings shared by the Dagster layer (read when definitions load)."""


import os

DEFAULT_DOWNLOAD_DIR = "data/idc"
DEFAULT_DUCKDB_PATH = "data/idc.duckdb"
DEFAULT_MANIFEST_DIR = "data/manifests"
DEFAULT_ENDPOINT = "https://s3.amazonaws.com"

OWNERS = ["team:imaging-data"]
INDEX_GROUP = "idc_catalog"  # idc_index, idc_collections
DOWNLOADS_GROUP = "idc_downloads"  # collection_manifest, downloaded_collection
BUNDLES_GROUP = "http_bundles"  # http_datasets


def env(name: str, default: str) -> str:
    """``$name`` when set and not empty, else ``default``."""
    return os.environ.get(name) or default

