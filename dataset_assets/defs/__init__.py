"""Thin Dagster layer over ``dataset_assets.core``: assets, resources, checks, sensors, schedules."""
