"""Jobs: the manifest and download of chosen collections, bounded by the run queue."""

import dagster as dg

download_collections_job = dg.define_asset_job(
    name="download_collections",
    description="Build the manifest of each selected collection and download it. Runs carry the tag "
    "idc/download, which dagster.yaml limits to 2 at a time.",
    selection=dg.AssetSelection.assets("collection_manifest", "downloaded_collection"),
    tags={"idc/download": "true"},
)

verify_downloads_job = dg.define_asset_job(
    name="verify_downloads",
    description="Run the integrity checks of downloaded collections without downloading anything. Launch "
    'with the run tag dagster/partition=<collection_id>, e.g. `--tags \'{"dagster/partition": "qin_pet_phantom"}\'`.',
    selection=dg.AssetSelection.checks_for_assets("downloaded_collection"),
)

defs = dg.Definitions(jobs=[download_collections_job, verify_downloads_job])
