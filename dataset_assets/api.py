"""The Python API: what the ``dataset`` command does, for notebooks and scripts, returning objects
(paths, counts, Arrow tables) and raising the project's typed errors (``dataset_assets.errors``)
instead of printing and exiting. The CLI's ``download``, ``verify`` and ``citations`` are built on
it; ``query``, ``fetch``, ``indices`` and ``collections`` call the same core functions::

    from dataset_assets.api import IDC

    idc = IDC()                                      # the installed index; $IDC_S3_ENDPOINT_URL etc.
    done = idc.download("qin_pet_phantom", "data/idc", modalities=["PT"])
    done.series, done.files, done.card               # counts and the dataset card's path
    idc.query("SELECT collection_id, count(*) AS n FROM idc_index GROUP BY 1").to_pandas()
    idc.citations("qin_pet_phantom", format="bibtex")
    idc.viewer_urls("qin_pet_phantom")[0]["viewer_url"]
    idc.verify("qin_pet_phantom", "data/idc").complete

Like the CLI and the Dagster layer, this module reads settings; the core below it does not.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import settings
from .core.errors import FilterError, IncompleteDownloadError, OptionError
from .core.index import extra_index
from .core.index import source as idx
from .core.select.filters import ManifestFilters
from .core.select.flat import link_into
from .core.select.layout import DEFAULT_LAYOUT
from .core.select.portal_manifest import read_entries
from .core.select.resolve import (
    FLAT,
    Entry,
    Selection,
    entries_from_target,
    fill_prior_counts,
    require_resolved,
    resolve,
)
from .core.select.shards import shard_manifest
from .core.transfer.download import EngineOptions, check_endpoint, download, state_path_for
from .core.transfer.instances import download_instances, file_of, is_complete
from .core.transfer.s5cmd import S5cmdOptions
from .core.transfer.state import recorded_files, shard_state_path

if TYPE_CHECKING:
    import pyarrow as pa

INSTANCE_INDEX = "sm_instance_index"
#: The clinical tables and their columns (``dataset idc clinical``).
CLINICAL_SQL = (
    'SELECT short_table_name AS "table", collection_id, "column", column_label FROM clinical_index ORDER BY 1, 3'
)


def _ignore(_line: str) -> None:
    pass


@dataclass
class Request:
    target: str
    dest: Path
    kind: str = "auto"
    filters: ManifestFilters = ManifestFilters()
    layout: str = FLAT
    long_paths: str = "hash"
    max_path: int | None = None
    skip_unresolved: bool = False
    options: S5cmdOptions = S5cmdOptions()
    stall_timeout_s: float = 120.0
    shard: tuple[int, int] | None = None  # (index, count): only that shard of the series
    viewer: str = "auto"  # the viewer of the URLs shown (see core.index.viewer)


def entries_of(target: str, kind: str, note: Callable[[str], None] = _ignore) -> list[Entry]:
    """A TARGET that names an existing file is a manifest file; anything else is comma-separated IDs.

    A bare name (no ``/``) that is also a file here could be either: it is read as the file unless
    ``--by`` names a kind (then as IDs), and one line on stderr says which reading was taken (a
    path with a ``/``, such as ``./x``, is always the file, and ``--by`` applies to its bare IDs)."""
    if not os.path.isfile(target):
        return entries_from_target(target, kind)
    bare = "/" not in target and os.sep not in target
    if bare and kind != "auto":
        note(
            f"reading TARGET {target!r} as {kind} IDs, not as the manifest file ./{target} "
            f"(give ./{target} to read the file)",
        )
        return entries_from_target(target, kind)
    if bare:
        note(f"reading TARGET as the manifest file ./{target}; use --by <kind> to read {target!r} as IDs")
    return read_entries(Path(target), kind)


def select(source: idx.IndexSource, request: Request, note: Callable[[str], None] = _ignore) -> Selection:
    """Resolve the request's TARGET; unresolvable entries are an error unless ``skip_unresolved``
    (then each is handed to ``note``, and the rest goes on)."""
    entries = entries_of(request.target, request.kind, note)
    with source.connect() as con:
        selection = resolve(
            con,
            entries,
            request.filters,
            layout=request.layout,
            root_length=len(str(request.dest.absolute())),
            max_path=request.max_path,
            long_paths=request.long_paths,  # type: ignore[arg-type]
            instance_index=extra_index.local_path(settings.index_store(), INSTANCE_INDEX),
            instance_hint=extra_index.fetch_hint(INSTANCE_INDEX),
        )
    for why in selection.emptied:  # a collection of the selection the filters left nothing of
        note(f"note: {why}; the rest of the selection goes on")
    if selection.unresolved and request.skip_unresolved:
        for text in selection.unresolved:
            note(f"skipped: {text}")
        selection.unresolved = []
    return require_resolved(selection)


def with_prior_counts(selection: Selection, request: Request) -> list[str]:
    """List the prefixes of prior-release series (their file count and bytes); problems returned."""
    if not selection.prior or selection.manifest is None:
        return []
    check_endpoint(request.options)
    manifest, problems = fill_prior_counts(
        selection.manifest, selection.prior, request.options, settings.allowed_buckets()
    )
    selection.manifest = manifest if manifest.num_rows else None
    return problems


def state_and_shard(selection: Selection, request: Request) -> Path | None:
    """The state of the selection, or of its shard (``--shard I/N``: the selection narrowed to it)."""
    if selection.manifest is None:
        return None
    state = state_path_for(request.dest, selection.manifest)
    if request.shard is not None:
        index, count = request.shard
        selection.manifest = shard_manifest(selection.manifest, index, count)
        state = shard_state_path(state, index, count)
    return state


def link_flat(selection: Selection, root: Path) -> list[str]:
    """Hard-link every verified file of the staged series (and every complete instance) into ``root``."""
    files: list[str] = []
    if selection.manifest is not None:
        target_dirs = selection.manifest.column("target_dir").to_pylist()
        recorded = recorded_files(state_path_for(root, selection.manifest), target_dirs)
        for target_dir in target_dirs:
            files.extend(f"{target_dir}{name}" for name in sorted(recorded.get(target_dir, {})))
    files += [file_of(i) for i in selection.instances if is_complete(root, i)]
    _placed, problems = link_into(root, files)
    return problems


@dataclass
class Transfer:
    """What a download did: the engine's result for the series (``None`` without series), the
    single instances' (``None`` without instances), problems and incomplete parts (one line each:
    empty when everything is complete), and the dataset card written (``None`` unless complete)."""

    selection: Selection
    result: object | None = None
    instances: object | None = None
    problems: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    card: Path | None = None
    card_problem: str | None = None

    @property
    def complete(self) -> bool:
        return not (self.problems or self.incomplete)


def transfer(
    request: Request,
    source: idx.IndexSource,
    *,
    log: Callable[[str], None] = _ignore,
    note: Callable[[str], None] = _ignore,
    on_progress: Callable | None = None,
) -> Transfer:
    """Resolve, download and verify ``request`` (resuming), link a flat layout, and write the
    dataset card of a complete download (not of one shard). Raises the engine's errors for a
    download that cannot start or is stopped; an incomplete one is ``Transfer.incomplete``."""
    from .core.select.licences import licence_counts, restricted, restriction_text

    selection = select(source, request, note)
    outcome = Transfer(selection, problems=with_prior_counts(selection, request))
    # The card's citations are read now, while the process is small: DuckDB opened after a large
    # transfer would add its memory on top of everything the transfer held (measured at 200,000 files).
    cited = _citations(source, selection) if selection.manifest is not None and request.shard is None else []
    state = state_and_shard(selection, request)
    if selection.manifest is not None and restricted(counts := licence_counts(selection.manifest)):
        note(f"note: {restriction_text(counts)}")
    allowed = settings.allowed_buckets()
    if selection.manifest is not None:
        try:
            outcome.result = download(
                selection.manifest,
                request.dest,
                request.options,
                EngineOptions(
                    log=log,
                    progress_interval_s=0.5,
                    on_progress=on_progress,
                    state_path=state,
                    stall_timeout_s=request.stall_timeout_s,
                    allowed_buckets=allowed,
                ),
            )
        except IncompleteDownloadError as exc:
            outcome.incomplete.append(str(exc))
            outcome.result = exc.result
    if selection.instances:
        try:
            outcome.instances = download_instances(
                selection.instances,
                request.dest,
                request.options,
                allowed_buckets=allowed,
                log=log,
                stall_timeout_s=request.stall_timeout_s,
            )
        except IncompleteDownloadError as exc:
            outcome.incomplete.append(str(exc))
    if request.layout == FLAT:
        outcome.problems += link_flat(selection, request.dest.absolute())
    if outcome.complete and selection.manifest is not None and request.shard is None and state is not None:
        try:
            outcome.card = write_selection_card(request, selection, state.stem, cited)
        except OSError as exc:  # the data is verified: a card that cannot be written is said, not fatal
            outcome.card_problem = f"dataset card not written ({exc.strerror or exc})"
    return outcome


def _citations(source: idx.IndexSource, selection: Selection) -> list[dict]:
    from .core.index.citations import citations

    with source.connect() as con:
        return citations(con, selection.manifest, analysis_results=source.directory / "analysis_results_index.parquet")


def write_selection_card(request: Request, selection: Selection, name: str, cited: list[dict]) -> Path:
    """The dataset card of a verified download (see ``core.select.card``); its Markdown path."""
    from importlib.metadata import version

    from .core.select.card import dataset_card, write_card
    from .core.transfer.s5cmd import binary_version

    picked = {
        "target": request.target,
        "by": request.kind,
        "filters": request.filters.as_dict(),
        "layout": request.layout,
    }
    card = dataset_card(
        selection.manifest,
        name=name,
        kind="selection" if name.startswith("selection-") else "collection",
        release=selection.release,
        selection={**picked, "idc_release": f"v{selection.release}"},
        citations=cited,
        tool_version=version("dataset_assets"),
        s5cmd_version=binary_version(request.options.binary),
        root=request.dest.absolute(),
    )
    markdown, _ = write_card(request.dest.absolute(), card)
    return markdown


def verify_report(request: Request, source: idx.IndexSource, note: Callable[[str], None] = _ignore):
    """Every series of the selection complete in DEST, file by file against what its download (or
    its shards' downloads) recorded; no network. A ``core.verify.checks.CheckReport``."""
    from .core.transfer.download import check_root_shape
    from .core.verify.checks import check_files

    check_root_shape(request.dest.absolute())
    selection = select(source, request, note)
    if selection.manifest is None:
        raise FilterError("verify checks series; the selection holds single instances only")
    return check_files(selection.manifest, request.dest.absolute(), state_path_for(request.dest, selection.manifest))


def citation_records(source: idx.IndexSource, request: Request, note: Callable[[str], None] = _ignore) -> list[dict]:
    """The citations of a selection: one record per source DOI, the IDC paper last."""
    from .core.index.citations import citations

    selection = select(source, request, note)
    with source.connect() as con:
        records = citations(
            con,
            selection.manifest,
            selection.instances,
            analysis_results=source.directory / "analysis_results_index.parquet",
        )
    if not records:
        raise FilterError("the selection has no source DOI in the index")
    return records


def fetch_clinical(source: idx.IndexSource, options: S5cmdOptions, log: Callable[[str], None] = _ignore, force=False):
    """``clinical_index`` of the installed release (fetched when missing, or ``force``), then every
    clinical table it names, from ``options``' endpoint (see ``core.index.clinical``)."""
    from .core.index import clinical

    store = settings.index_store()
    described = extra_index.fetch(store, "clinical_index", log=log, force=force)
    return clinical.fetch(extra_index.clinical_folder(store), source.release(), options, described.path, log)


@dataclass(frozen=True)
class Downloaded:
    """A complete download: where, how much, and its dataset card."""

    dest: Path
    series: int
    files: int
    bytes: int
    instances: int
    transferred_files: int
    transferred_bytes: int
    card: Path | None


@dataclass(frozen=True)
class Verified:
    """``verify``: whether every series is complete, and the problems found (at most ten listed)."""

    complete: bool
    series: int
    problem_count: int
    problems: list[str]


class IDC:
    """The ``dataset`` command's verbs as methods. Arguments default to the settings the CLI reads
    (``$IDC_INDEX_DIR``, ``$IDC_S3_ENDPOINT_URL``, ...); errors are the project's typed errors
    (``FilterError`` for a selection that cannot be made, ``DownloadError`` and its kinds for a
    transfer, ``IncompleteDownloadError`` with ``.result`` for a download left incomplete)."""

    def __init__(
        self,
        index_dir: str | Path | None = None,
        endpoint: str | None = None,
        workers: int = 64,
        retries: int = 5,
        stall_timeout_s: float = 120.0,
    ) -> None:
        self.source = idx.IndexSource.at(str(index_dir) if index_dir is not None else settings.IDC_INDEX_DIR.get())
        self.options = S5cmdOptions(
            endpoint_url=endpoint or settings.IDC_S3_ENDPOINT_URL.require(),
            workers=workers,
            retry_count=retries,
            binary=settings.S5CMD_BINARY.get(),
            environment=settings.process_environment(),
        )
        self.stall_timeout_s = stall_timeout_s

    def _request(self, target: str, dest: str | Path = ".", *, by: str = "auto", layout: str = DEFAULT_LAYOUT,
                 skip_unresolved: bool = False, **filters) -> Request:  # fmt: skip
        from .core.select.resolve import BY_CHOICES

        if not isinstance(target, str) or not target.strip():
            raise OptionError(f"target is {target!r}; give collection ids, UIDs or a manifest file's path as text")
        if not isinstance(dest, (str, os.PathLike)):
            raise OptionError(f"dest is {dest!r}; give a folder's path")
        if by not in BY_CHOICES:
            raise OptionError(f"by is {by!r}; it is one of {', '.join(BY_CHOICES)}")
        if not isinstance(layout, str):
            raise OptionError(f"layout is {layout!r}; give a layout template or 'flat'")
        return Request(
            target=target,
            dest=Path(dest),
            kind=by,
            filters=ManifestFilters.from_mapping(filters),
            layout=layout,
            skip_unresolved=skip_unresolved,
            options=self.options,
            stall_timeout_s=self.stall_timeout_s,
        )

    def select(self, target: str, dest: str | Path = ".", **kwargs) -> pa.Table:
        """The manifest of ``target`` (a dry run): one row per series, with its ``target_dir``
        below ``dest``. ``kwargs``: ``by``, ``layout``, ``skip_unresolved`` and the filters
        (``modalities``, ``body_parts``, ``analysis_results``, ``licenses``, ``exclude_noncommercial``, ...)."""
        selection = select(self.source, self._request(target, dest, **kwargs))
        if selection.manifest is None:
            raise FilterError("the selection holds single instances only; download them")
        return selection.manifest

    def download(self, target: str, dest: str | Path, *, log: Callable[[str], None] = _ignore, **kwargs) -> Downloaded:
        """Download ``target`` into ``dest``, resuming; ``Downloaded`` when every file is verified,
        else ``IncompleteDownloadError`` (run it again to resume). ``kwargs`` as ``select``."""
        request = self._request(target, dest, **kwargs)
        outcome = transfer(request, self.source, log=log, note=log)
        if not outcome.complete:
            raise IncompleteDownloadError(" | ".join([*outcome.problems, *outcome.incomplete]), outcome.result)
        result, instances = outcome.result, outcome.instances
        return Downloaded(
            dest=Path(dest),
            series=getattr(result, "series", 0),
            files=getattr(result, "files", 0),
            bytes=getattr(result, "bytes", 0) + getattr(instances, "bytes", 0),
            instances=getattr(instances, "instances", 0),
            transferred_files=getattr(result, "transferred_files", 0) + getattr(instances, "transferred_files", 0),
            transferred_bytes=getattr(result, "transferred_bytes", 0) + getattr(instances, "transferred_bytes", 0),
            card=outcome.card,
        )

    def verify(self, target: str, dest: str | Path, **kwargs) -> Verified:
        """Whether ``target`` is complete in ``dest`` (no network); ``kwargs`` as ``select``."""
        report = verify_report(self._request(target, dest, **kwargs), self.source)
        return Verified(report.passed, report.checked, report.problem_count, list(report.problems[:10]))

    def citations(self, target: str, format: str = "json", by: str = "auto") -> list[dict] | str:
        """The citations of ``target``: records (``format="json"``) or APA / BibTeX text."""
        from .core.index.citations import FORMATS, render

        if format not in FORMATS:
            raise OptionError(f"format is {format!r}; it is one of {', '.join(FORMATS)}")
        records = citation_records(self.source, self._request(target, by=by, layout=FLAT))
        return records if format == "json" else render(records, format)

    def viewer_urls(self, target: str, viewer: str = "auto", by: str = "auto") -> list[dict]:
        """Per series of ``target``: its UIDs, its viewer URL and its study's (viewer chosen by the study)."""
        from .core.index.viewer import VIEWERS, viewer_url

        if viewer not in VIEWERS:
            raise OptionError(f"viewer is {viewer!r}; it is one of {', '.join(VIEWERS)}")
        selection = select(self.source, self._request(target, by=by, layout=FLAT))
        rows = (
            selection.manifest.select(["StudyInstanceUID", "SeriesInstanceUID", "Modality"]).to_pylist()
            if selection.manifest is not None
            else []
        )
        out = []
        for row in rows:
            slides = True if row["StudyInstanceUID"] in selection.slide_studies else None
            study, series, modality = row["StudyInstanceUID"], row["SeriesInstanceUID"], row["Modality"]
            out.append({
                **row,
                "viewer_url": viewer_url(study, series, modality, viewer=viewer, study_has_slides=slides),
                "viewer_study_url": viewer_url(study, None, modality, viewer=viewer, study_has_slides=slides),
            })  # fmt: skip
        return out

    def query(self, sql: str, limit: int | None = None) -> pa.Table:
        """The result of one reading SQL statement over the local indices (bundled and fetched)."""
        import pyarrow as pa

        from .core.index.query import relation

        if not isinstance(sql, str):
            raise OptionError(f"sql is {sql!r}; give one SQL statement as text")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise OptionError(f"limit is {limit!r}; give a whole number of rows (0 or more) or None")
        with extra_index.connect_all(self.source, settings.index_store()) as con:
            rel = relation(con, sql)
            if rel is None:
                return pa.table({})
            if limit is not None:
                rel = rel.limit(limit)
            return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()

    def fetch(self, *names: str, force: bool = False, log: Callable[[str], None] = _ignore) -> list:
        """Fetch on-demand indices of the installed release (checked against their shipped schema);
        one ``FetchResult`` (path, rows, bytes) each."""
        return [extra_index.fetch(settings.index_store(), name, force=force, log=log) for name in dict.fromkeys(names)]

    def fetch_clinical(self, force: bool = False, log: Callable[[str], None] = _ignore):
        """``clinical_index`` and every clinical table it names; a ``ClinicalFetch`` (tables and rows)."""
        if not isinstance(force, bool):
            raise OptionError(f"force is {force!r}; it is True or False")
        return fetch_clinical(self.source, self.options, log, force)

    def clinical(self) -> pa.Table:
        """One row per clinical table and column, as ``clinical_index`` describes them (fetch it first)."""
        return self.query(CLINICAL_SQL)

    def indices(self) -> list[dict]:
        """Bundled, fetched and on-demand indices with their row counts."""
        return idx.available_indices(self.source, extra_index.fetched(settings.index_store()))

    def collections(self):  # -> pandas.DataFrame
        """One row per collection: subjects, series, size, modalities, licences, DOI, citation."""
        with self.source.connect() as con:
            return idx.collections_table(con)
