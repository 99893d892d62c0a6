"""Resources: where the index, manifests and downloads live."""


from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from dataset_assets.core.index import IndexSource

from .settings import DEFAULT_DOWNLOAD_DIR, DEFAULT_MANIFEST_DIR, env


class IdcResource(dg.ConfigurableResource):
    """The IDC index to read, and the folders for manifests and downloaded collections."""

    index_dir: Optional[str] = Field(
        default=None,
        description="Folder with the idc-index-data Parquet files; default: the installed package "
        "(or $IDC_INDEX_DIR).",
    )
    manifest_dir: str = Field(
        default=DEFAULT_MANIFEST_DIR,
        description="One Parquet manifest per collection is written here ($IDC_MANIFEST_DIR).",
    )
    download_dir: str = Field(
        default=DEFAULT_DOWNLOAD_DIR,
        description="Root of downloaded collections ($IDC_DOWNLOAD_DIR).",
    )

    @classmethod
    def from_env(cls) -> "IdcResource":
        """Folders from $IDC_MANIFEST_DIR and $IDC_DOWNLOAD_DIR (defaults under ``data/``)."""
        return cls(
            manifest_dir=env("IDC_MANIFEST_DIR", DEFAULT_MANIFEST_DIR),
            download_dir=env("IDC_DOWNLOAD_DIR", DEFAULT_DOWNLOAD_DIR),
        )

    def source(self) -> IndexSource:
        return IndexSource.from_env(self.index_dir)

    def manifest_path(self, collection_id: str) -> Path:
        return Path(self.manifest_dir) / f"{collection_id}.parquet"

    def download_root(self) -> Path:
        return Path(self.download_dir).absolute()
