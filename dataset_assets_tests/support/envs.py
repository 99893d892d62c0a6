"""Environments for the project's command-line tools in tests: one place that knows the settings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DAGSTER = os.path.join(os.path.dirname(sys.executable), "dagster")


def materialize_cmd(select: str, partition: str, *extra: str) -> list[str]:
    """``dagster asset materialize`` of ``select`` for one partition of the project's definitions."""
    return [DAGSTER, "asset", "materialize", "-m", "dataset_assets.definitions", "--select", select,
            "--partition", partition, *extra]  # fmt: skip


def project_env(idc_fixture, s3, tmp_path: Path, **extra: str) -> dict[str, str]:
    """``os.environ`` plus a fresh ``DAGSTER_HOME`` and every folder under ``tmp_path``, the fixture
    index and the loopback S3 endpoint (``extra`` on top, e.g. ``DAGSTER_EXECUTOR="multiprocess"``)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "IDC_INDEX_DIR": str(idc_fixture.index_dir),
        "IDC_MANIFEST_DIR": str(tmp_path / "manifests"),
        "IDC_DOWNLOAD_DIR": str(tmp_path / "idc"),
        "IDC_S3_ENDPOINT_URL": s3.endpoint_url,
        "IDC_DUCKDB_PATH": str(tmp_path / "idc.duckdb"),
        **extra,
    }
