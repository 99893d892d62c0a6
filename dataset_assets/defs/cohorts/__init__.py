"""Cohorts: named series sets across collections, as partitioned manifests and downloads."""
