"""Jobs: the manifest and download of chosen collections, bounded by the run queue."""

import dagster as dg

download_collections_job = dg.define_asset_job(
    name="download_collections",
    description="Build the manifest of each selected collection and download it. Runs carry the tag "
    "idc/download, which dagster.yaml limits to 2 at a time.",
    selection=dg.AssetSelection.assets("collection_manifest", "downloaded_collection"),
    tags={"idc/download": "true"},
)
