"""``dataset``: the command line for people outside Dagster, on the same core as the assets.

Exit codes a script can rely on:

* 0: success (for ``download``: every series complete on disk)
* 1: the download ran but some series are still incomplete (they are listed; re-run to resume)
* 2: bad input (unknown collection, index, UID, filter value, malformed layout, bad option)
* 3: the environment refused (destination not writable, not enough space, endpoint unreachable,
  index unreadable, the collection already being downloaded into DEST)
* 130: interrupted (Ctrl-C or SIGTERM); s5cmd is stopped, what completed is kept
* 141: the reader of the output went away (``| head``): the command stops quietly, as a tool
  ended by SIGPIPE does
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import webbrowser
from pathlib import Path

import click

from . import settings
from .cli_errors import EXIT_ENVIRONMENT, EXIT_INPUT, EXIT_INTERRUPTED, Failure, failure_of
from .core.errors import DatasetError, FilterError, IndexUnavailableError, OptionError
from .core.fmt import human_bytes, human_duration, os_error_text
from .core.index import extra_index as extra
from .core.index import source as idx
from .core.index.viewer import VIEWERS
from .core.safety import endpoint_problem
from .core.select.filters import ANALYSIS_RESULTS, ManifestFilters
from .core.select.layout import DEFAULT_LAYOUT, default_max_path
from .core.select.resolve import BY_CHOICES
from .core.select.shards import parse_shard
from .core.transfer.progress import DEFAULT_STALL_TIMEOUT_S, Progress
from .core.transfer.s5cmd import S5cmdOptions
from .core.urls import PORTAL_URL

PORTAL = PORTAL_URL


class _Group(click.Group):
    """Turns every ``DatasetError`` (and ``OSError``) a command raises into a one-line error with its exit code."""

    def invoke(self, ctx: click.Context):
        # SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C, so s5cmd is stopped and the
        # command file removed.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        for arg in [*getattr(ctx, "protected_args", ()), *ctx.args]:
            if isinstance(arg, str) and any("\ud800" <= c <= "\udfff" for c in arg):  # bytes that are not UTF-8
                shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                raise Failure(f"argument {shown!r} is not valid UTF-8 text; give names and paths in UTF-8", EXIT_INPUT)
        try:
            return super().invoke(ctx)
        except DatasetError as exc:
            raise failure_of(exc) from None
        except BrokenPipeError:  # before OSError, of which it is one
            _quiet_broken_pipe()
        except OSError as exc:  # the file system said no (permissions, disk full, I/O): name the path
            kept = ctx.meta.get(KEPT, "everything completed so far is kept, run the same command again")
            raise Failure(f"{os_error_text(exc)}; {kept} once that is fixed", EXIT_ENVIRONMENT) from None
        except KeyboardInterrupt:
            kept = ctx.meta.get(KEPT, "run the same command again to resume")
            click.echo(f"interrupted; {kept}", err=True)
            ctx.exit(EXIT_INTERRUPTED)


#: What a command that stops early keeps, said when it is interrupted or the file system fails
#: (``ctx.meta[KEPT]``, set by commands that keep nothing; the default suits resumable downloads).
KEPT = "dataset_assets.kept"


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a tool the signal ends exits with


def _quiet_broken_pipe() -> None:
    """The reader of stdout went away (``| head -1``): no message and no traceback. As Python's
    documentation recommends, stdout (and stderr) point at devnull from here on, so the flush at
    interpreter exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, stream.fileno())
    sys.exit(EXIT_BROKEN_PIPE)


def _s5cmd_options() -> S5cmdOptions:
    return S5cmdOptions(
        endpoint_url=settings.IDC_S3_ENDPOINT_URL.require(),
        binary=settings.S5CMD_BINARY.get(),
        environment=settings.process_environment(),
    )


def _source() -> idx.IndexSource:
    return idx.IndexSource.at(settings.IDC_INDEX_DIR.get())


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c), *(len(str(r.get(c) if r.get(c) is not None else "")) for r in rows)]) for c in columns}

    def line(r: dict) -> str:
        return "  ".join(str(r.get(c) if r.get(c) is not None else "").ljust(widths[c]) for c in columns)

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
    rows = idx.available_indices(_source(), extra.fetched(settings.index_store()))
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
    click.get_current_context().meta[KEPT] = (
        "an index not yet complete is not kept (the indices already fetched are), run the same command again"
    )
    for name in dict.fromkeys(names):
        result = extra.fetch(settings.index_store(), name, force=force, log=lambda line: click.echo(line, err=True))
        state = "already here" if result.skipped else f"fetched {human_bytes(result.transferred_bytes)}"
        click.echo(f"{name}: {result.rows:,} rows, {human_bytes(result.bytes)} ({state}) at {result.path}")
    if "clinical_index" in names:  # as idc-index: the tables it describes come with it
        from .api import fetch_clinical

        done = fetch_clinical(_source(), _s5cmd_options(), lambda line: click.echo(line, err=True))
        rows = sum(done.tables.values())
        click.echo(f"clinical tables: {len(done.tables)} ({rows:,} rows, {human_bytes(done.bytes)}) at {done.folder}")


@idc.command()
@click.argument("sql")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True
)
@click.option(
    "--output", "output_text", metavar="FILE", help="Write to FILE instead of stdout ('-': stdout), replaced whole."
)
@click.option("--limit", type=click.IntRange(0), default=None, help="Show at most N rows (table format: 50).")
def query(sql: str, fmt: str, output_text: str | None, limit: int | None) -> None:
    """Run SQL over every local index: the bundled ones (idc_index, collections_index, ...) and the
    ones fetched with `dataset idc fetch` (sm_index, sm_instance_index, ...), with DuckDB. The SQL
    reads the indices only: it cannot install or load extensions, read or write other files, or
    change DuckDB's settings.

    Exit codes: 0 done, 2 the query or an option is wrong (also when the query fails part-way
    through: --output is then left as it was), 3 the index or the output cannot be read or written."""
    from .core.index.query import write_query

    output = _output_path(output_text)
    click.get_current_context().meta[KEPT] = (
        f"{output} is left as it was, run the same command again" if output else "run the same command again"
    )
    with extra.connect_all(_source(), settings.index_store(), log=lambda line: click.echo(line, err=True)) as con:
        rows = write_query(con, sql, fmt, output, limit, stdout=click.get_text_stream("stdout"))
    if output is not None:
        click.echo(f"{rows:,} rows written to {output}", err=True)


def _output_path(text: str | None) -> Path | None:
    """``--output``: ``None`` (stdout) for nothing or ``-``; a folder (``out/``, an existing folder) is refused."""
    if text is None or text == "-":
        return None
    if not text or text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise OptionError(f"--output {text!r} names a folder; give a file name, e.g. {text.rstrip('/')}/result.csv")
    return Path(text)


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
@click.argument("table", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def clinical(table: str | None, as_json: bool) -> None:
    """List the clinical tables (from clinical_index) with their columns, or TABLE's columns.
    `dataset idc fetch clinical_index` fetches the index and the tables; each is then a view of
    its own name in `query` and cohort SQL (join on dicom_patient_id = PatientID)."""
    from .api import CLINICAL_SQL
    from .core.index.query import relation

    with extra.connect_all(_source(), settings.index_store()) as con:
        views = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "clinical_index" not in views:
            raise IndexUnavailableError(f"clinical_index is not fetched; {extra.fetch_hint('clinical_index')}")
        rows = relation(con, CLINICAL_SQL).fetchall()
    if table is not None:
        rows = [r for r in rows if r[0] == table]
        if not rows:
            raise FilterError(f"clinical_index has no table {table!r}; `dataset idc clinical` lists them")
    records = [
        {"table": t, "collection_id": c, "column": col, "label": label, "fetched": t in views}
        for t, c, col, label in rows
    ]
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    if table is None:
        tables: dict[str, dict] = {}
        for r in records:
            fetched = "yes" if r["fetched"] else "no"
            entry = tables.setdefault(
                r["table"], {"table": r["table"], "collection_id": r["collection_id"], "columns": 0, "fetched": fetched}
            )
            entry["columns"] += 1
        click.echo(_table(list(tables.values()), ["table", "collection_id", "columns", "fetched"]))
        return
    click.echo(_table([{k: r[k] or "" for k in ("column", "label")} for r in records], ["column", "label"]))


@idc.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (all fields) instead of a table.")
def collections(as_json: bool) -> None:
    """List the collections with subjects, series, size, modalities and licence."""
    with _source().connect() as con:
        table = idx.collections_table(con)
    records = json.loads(table.to_json(orient="records"))
    for record in records:  # pandas makes a count with a missing value a float: counts are integers
        for key in ("subjects", "patients", "studies", "series", "instances", "size_bytes"):
            if isinstance(record.get(key), float) and record[key].is_integer():
                record[key] = int(record[key])
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
            total=progress.total_bytes or None,  # grows as the download plans each batch
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


def selection_filters(command):
    """The filter options of every verb that selects series (download, verify)."""
    for option in reversed(
        [
            click.option("--modality", "modalities", multiple=True, help="Keep only this Modality (repeatable)."),
            click.option(
                "--body-part", "body_parts", multiple=True, help="Keep only this BodyPartExamined (repeatable)."
            ),
            click.option(
                "--analysis-results",
                type=click.Choice(list(ANALYSIS_RESULTS)),
                default="include",
                show_default=True,
                help="Series of analysis results (segmentations, annotations): keep them with the original "
                "data, leave them out, or keep only them.",
            ),
            click.option(
                "--license",
                "licenses",
                multiple=True,
                help="Keep only series under this licence, e.g. 'CC BY 4.0' (repeatable; `dataset idc collections` "
                "lists them).",
            ),
            click.option(
                "--exclude-noncommercial",
                is_flag=True,
                help="Leave out series whose licence forbids commercial use (CC BY-NC).",
            ),
        ]
    ):
        command = option(command)
    return command


def _filters(values: dict) -> ManifestFilters:
    """The filters of ``selection_filters``, taken out of a command's keyword arguments."""
    names = ("modalities", "body_parts", "analysis_results", "licenses", "exclude_noncommercial")
    return ManifestFilters.from_mapping({name: values.pop(name) for name in names})


@idc.command(name="download")
@click.argument("target")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--by",
    "kind",
    type=click.Choice(list(BY_CHOICES)),
    default="auto",
    show_default=True,
    help="What the values of TARGET are (auto: each is looked up in the index; an ID that is two kinds "
    "is refused): collection ids, analysis_result_ids, PatientIDs, StudyInstanceUIDs, SeriesInstanceUIDs, "
    "crdc_series_uuids or SOPInstanceUIDs (instance).",
)
@selection_filters
@click.option(
    "--layout",
    default=DEFAULT_LAYOUT,
    show_default=True,
    help="Directory of each series; %column for any index column; 'flat': every file in DEST itself.",
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
@click.option(
    "--viewer",
    type=click.Choice(list(VIEWERS)),
    default="auto",
    show_default=True,
    help="The viewer of the URLs shown (auto: Slim for studies with slide microscopy, OHIF v3 for the others).",
)
@click.option("--dry-run", is_flag=True, help="Print what would be fetched and its size; download nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: one JSON document, every series.")
@click.option(
    "--skip-unresolved",
    is_flag=True,
    help="Download what resolves and list the rest (default: any unresolvable ID or line is an error, exit 2).",
)
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
    "--shard",
    metavar="I/N",
    default=None,
    help="Only shard I of N (0 <= I < N): a series belongs to int(crdc_series_uuid[:8], 16) % N. Shards of one "
    "selection run at once (other machines, one DEST) with states of their own; `verify` sees them all.",
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
    layout: str,
    long_paths: str,
    max_path: int | None,
    dry_run: bool,
    as_json: bool,
    skip_unresolved: bool,
    workers: int,
    retries: int,
    stall_timeout: float,
    shard: str | None,
    endpoint: str,
    viewer: str,
    **filters,
) -> None:
    """Download TARGET into DEST, resuming: files already complete are not fetched again.

    TARGET: comma-separated collection ids, analysis_result_ids, PatientIDs, StudyInstanceUIDs, SeriesInstanceUIDs,
    crdc_series_uuids (also of earlier releases) and SOPInstanceUIDs, in any mix; or a file: an
    IDC portal / BigQuery s5cmd manifest, a CSV with an ID column, or a list of IDs.

    Exit codes: 0 complete, 1 some series incomplete (re-run to resume), 2 bad input (also an
    unresolvable ID or line, unless --skip-unresolved), 3 destination, space, endpoint or index
    problem, 130 interrupted."""
    from .cli_download import Request, run_download

    request = Request(
        target=target,
        dest=dest,
        kind=kind,
        filters=_filters(filters),
        layout=layout,
        long_paths=long_paths,
        max_path=max_path if max_path is not None else default_max_path(),
        skip_unresolved=skip_unresolved,
        options=S5cmdOptions(
            endpoint_url=endpoint,
            workers=workers,
            retry_count=retries,
            binary=settings.S5CMD_BINARY.get(),
            environment=settings.process_environment(),
        ),
        stall_timeout_s=stall_timeout,
        shard=parse_shard(shard) if shard is not None else None,
        viewer=viewer,
    )
    if as_json and not dry_run:
        raise click.UsageError("--json goes with --dry-run (a download prints its progress and one summary line)")
    run_download(request, _source(), dry_run=dry_run, as_json=as_json, view=None if dry_run else _ProgressView())


@idc.command()
@click.argument("target")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--by", "kind", type=click.Choice(list(BY_CHOICES)), default="auto", show_default=True, help="As download."
)
@selection_filters
@click.option("--layout", default=DEFAULT_LAYOUT, show_default=True, help="As download.")
def verify(target: str, dest: Path, kind: str, layout: str, **filters):
    """Check that TARGET (as for download) is complete in DEST: every file of every series has the
    name and size its download recorded (downloads of its shards included), and no other .dcm file
    is there. No network. Exit codes: 0 complete, 1 incomplete (the problems are listed), 2 bad input."""
    from .cli_download import Request, verify_selection

    request = Request(
        target=target,
        dest=dest,
        kind=kind,
        filters=_filters(filters),
        layout=layout,
    )
    code = verify_selection(request, _source())
    if code:
        raise Failure("the selection is not complete in DEST (listed above); download it again to finish it", code)


@idc.command()
@click.argument("target")
@click.option(
    "--format", "fmt", type=click.Choice(["apa", "bibtex", "json"]), default="apa", show_default=True, help="Output."
)
@click.option(
    "--by", "kind", type=click.Choice(list(BY_CHOICES)), default="auto", show_default=True, help="As download."
)
@click.option("--skip-unresolved", is_flag=True, help="Cite what resolves; list the rest on stderr.")
def citations(target: str, fmt: str, kind: str, skip_unresolved: bool) -> None:
    """Cite TARGET (as for download: IDs, collections or a manifest file): every source DOI of its
    series with its licence, from the index alone (no network; where a complete reference needs
    doi.org, the output says so)."""
    from .cli_download import citations_text

    click.echo(citations_text(_source(), target, kind, fmt, skip_unresolved))


@main.group(cls=_Group)
def http() -> None:
    """Datasets published as single files behind HTTP(S) URLs."""


@http.command(name="download")
@click.argument("source", metavar="URL|BUNDLE_NAME")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--sha256", help="Expected SHA-256 (64 hex digits); the file is refused when it differs.")
@click.option("--size", type=click.IntRange(0), help="Expected size in bytes.")
@click.option("--filename", help="File name in DEST (default: the URL's last path segment).")
@click.option(
    "--bundles-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Bundles YAML for BUNDLE_NAME (default: $DATASET_BUNDLES_FILE or dataset_assets/defs/bundles/defs.yaml).",
)
def http_download(
    source: str, dest: Path, sha256: str | None, size: int | None, filename: str | None, bundles_file: Path | None
) -> None:
    """Download URL (or the bundle BUNDLE_NAME of the bundles file) into DEST: resumed where a
    previous run stopped, verified (size, sha256, Content-Type), renamed into place when complete.
    Signed URLs never appear in the output (query strings are shown as ?…).

    Exit codes: 0 complete, 2 bad input (URL, name, sha256), 3 transfer or verification failed
    (a partial file is kept and resumed by the same command), 130 interrupted."""
    from .cli_http import http_download as run

    run(source, dest, sha256=sha256, size=size, filename=filename, bundles_file=bundles_file)


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
