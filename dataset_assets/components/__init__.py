"""Dagster components of this project: declarations in ``defs.yaml`` files, scaffolded with
``dg scaffold defs dataset_assets.components.<Type> <folder>`` and checked with ``dg check yaml``."""

from dataset_assets.components.bundles import HttpBundles
from dataset_assets.components.cohorts import IdcCohorts
from dataset_assets.components.watched import IdcWatchedCollections

__all__ = ["HttpBundles", "IdcCohorts", "IdcWatchedCollections"]
