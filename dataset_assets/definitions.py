"""The code location, ``dataset_assets.definitions:defs``: everything in ``dataset_assets/defs/``,
loaded by Dagster's own loader (each module declares its ``dg.Definitions``; component folders
hold a ``defs.yaml``); watched collections then give ``downloaded_collection`` its freshness policy."""

from pathlib import Path

import dagster as dg

from dataset_assets.lib.watched import with_watched_freshness

defs = with_watched_freshness(dg.load_from_defs_folder(path_within_project=Path(__file__).resolve().parent))
