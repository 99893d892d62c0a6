"""``dataset idc download`` and ``citations``: from a TARGET (IDs or a manifest file) to a
selection, a dry-run report (text or JSON) or a verified download. Kept apart from ``cli.py``
so that the command definitions there stay short."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import click

from . import settings
from .cli_errors import EXIT_INCOMPLETE, Failure
from .core.errors import DownloadError, FilterError, IncompleteDownloadError
from .core.fmt import human_bytes, human_duration
from .core.index import extra_index
from .core.index import source as idx
from .core.index.viewer import viewer_url
from .core.select.filters import ManifestFilters
from .core.select.flat import link_into
from .core.select.licences import licence_counts, restricted, restriction_text
from .core.select.manifest import summarize
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
from .core.transfer.disk import series_status
from .core.transfer.download import EngineOptions, check_endpoint, check_root_shape, download, state_path_for
from .core.transfer.instances import download_instances, file_of, is_complete, object_url
from .core.transfer.s5cmd import S5cmdOptions
from .core.transfer.state import load_state, recorded_files, shard_state_path

INSTANCE_INDEX = "sm_instance_index"


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


def entries_of(target: str, kind: str) -> list[Entry]:
    """A TARGET that names an existing file is a manifest file; anything else is comma-separated IDs.

    A bare name (no ``/``) that is also a file here could be either: it is read as the file unless
    ``--by`` names a kind (then as IDs), and one line on stderr says which reading was taken (a
    path with a ``/``, such as ``./x``, is always the file, and ``--by`` applies to its bare IDs)."""
    if not os.path.isfile(target):
        return entries_from_target(target, kind)
    bare = "/" not in target and os.sep not in target
    if bare and kind != "auto":
        click.echo(
            f"reading TARGET {target!r} as {kind} IDs, not as the manifest file ./{target} "
            f"(give ./{target} to read the file)",
            err=True,
        )
        return entries_from_target(target, kind)
    if bare:
        click.echo(
            f"reading TARGET as the manifest file ./{target}; use --by <kind> to read {target!r} as IDs", err=True
        )
    return read_entries(Path(target), kind)


def select(source: idx.IndexSource, request: Request) -> Selection:
    """Resolve the request's TARGET; unresolvable entries are an error unless ``skip_unresolved``
    (then each is listed on stderr, and the rest goes on)."""
    entries = entries_of(request.target, request.kind)
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
    if selection.unresolved and request.skip_unresolved:
        for text in selection.unresolved:
            click.echo(f"skipped: {text}", err=True)
        selection.unresolved = []
    return require_resolved(selection)


def _with_prior_counts(selection: Selection, request: Request) -> list[str]:
    """List the prefixes of prior-release series (their file count and bytes); problems returned."""
    if not selection.prior or selection.manifest is None:
        return []
    check_endpoint(request.options)
    manifest, problems = fill_prior_counts(
        selection.manifest, selection.prior, request.options, settings.allowed_buckets()
    )
    selection.manifest = manifest if manifest.num_rows else None
    return problems


def _state_and_shard(selection: Selection, request: Request) -> Path | None:
    """The state of the selection, or of its shard (``--shard I/N``: the selection narrowed to it)."""
    if selection.manifest is None:
        return None
    state = state_path_for(request.dest, selection.manifest)
    if request.shard is not None:
        index, count = request.shard
        selection.manifest = shard_manifest(selection.manifest, index, count)
        state = shard_state_path(state, index, count)
    return state


def run_download(request: Request, source: idx.IndexSource, *, dry_run: bool, as_json: bool, view=None) -> None:
    selection = select(source, request)
    problems = _with_prior_counts(selection, request)
    state = _state_and_shard(selection, request)
    if dry_run:
        dry_run_report(selection, request, problems, as_json=as_json)
        return
    dest, flat = request.dest, request.layout == FLAT
    if selection.manifest is not None and restricted(counts := licence_counts(selection.manifest)):
        click.echo(f"note: {restriction_text(counts)}", err=True)
    allowed = settings.allowed_buckets()
    incomplete: list[str] = []
    result = done = None
    try:
        if selection.manifest is not None:
            try:
                result = download(
                    selection.manifest,
                    dest,
                    request.options,
                    EngineOptions(
                        log=view.log if view else click.echo,
                        progress_interval_s=0.5,
                        on_progress=view,
                        state_path=state,
                        stall_timeout_s=request.stall_timeout_s,
                        allowed_buckets=allowed,
                    ),
                )
            except IncompleteDownloadError as exc:
                incomplete.append(str(exc))
                result = exc.result
        if selection.instances:
            try:
                done = download_instances(
                    selection.instances,
                    dest,
                    request.options,
                    allowed_buckets=allowed,
                    log=view.log if view else click.echo,
                    stall_timeout_s=request.stall_timeout_s,
                )
            except IncompleteDownloadError as exc:
                incomplete.append(str(exc))
    finally:
        if view is not None:
            view.end()
    if flat:
        problems += _link_flat(selection, dest.absolute())
    for line in summary_lines(result, done, len(selection.instances), dest, failed=bool(problems or incomplete)):
        click.echo(line)
    if problems or incomplete:
        raise Failure(" | ".join([*problems, *incomplete]), EXIT_INCOMPLETE)
    if selection.manifest is not None and request.shard is None and state is not None:
        _write_card(source, request, selection, state.stem)


def _write_card(source: idx.IndexSource, request: Request, selection: Selection, name: str) -> None:
    """The dataset card of a verified download (never of one shard: the selection is its shards')."""
    from importlib.metadata import version

    from .core.index.citations import citations
    from .core.select.card import dataset_card, write_card
    from .core.transfer.s5cmd import binary_version

    with source.connect() as con:
        cited = citations(con, selection.manifest, analysis_results=source.directory / "analysis_results_index.parquet")
    picked = {
        "target": request.target,
        "by": request.kind,
        "filters": request.filters.as_dict(),
        "layout": request.layout,
    }
    card = dataset_card(
        selection.manifest,
        name=name,
        kind="collection" if not name.startswith("selection-") else "selection",
        release=selection.release,
        selection={**picked, "idc_release": f"v{selection.release}"},
        citations=cited,
        tool_version=version("dataset_assets"),
        s5cmd_version=binary_version(request.options.binary),
        root=request.dest.absolute(),
    )
    try:
        markdown, _ = write_card(request.dest.absolute(), card)
    except OSError as exc:  # the data is verified: a card that cannot be written is said, not fatal
        click.echo(f"note: dataset card not written ({exc.strerror or exc})", err=True)
        return
    click.echo(f"dataset card: {markdown}")


def summary_lines(result, done, instances: int, dest: Path, *, failed: bool) -> list[str]:
    """The closing lines of a download: ``complete: ...`` only when the whole run is; a run that
    failed anywhere says ``incomplete:`` and how much of each part is complete."""
    lines = []
    if result is not None:
        transferred = (
            f"{result.transferred_files:,} files / {human_bytes(result.transferred_bytes)} "
            f"transferred in {human_duration(result.duration_s)}, {result.mb_per_s:.1f} MB/s"
        )
        if failed:  # result.files and result.bytes are the selection's, not what is complete
            lines.append(
                f"incomplete: {result.complete_series:,} of {result.series:,} series complete in {dest}; "
                f"the selection is {result.files:,} files, {human_bytes(result.bytes)} ({transferred})"
            )
        else:
            lines.append(
                f"complete: {result.complete_series:,} series, {result.files:,} files, "
                f"{human_bytes(result.bytes)} in {dest} ({transferred})"
            )
    if done is not None:
        count = f"{done.instances:,}" + (f" of {instances:,} instance(s) complete" if failed else " instance(s)")
        lines.append(
            f"{'incomplete' if failed else 'complete'}: {count}, {human_bytes(done.bytes)} "
            f"({done.transferred_files:,} files / {human_bytes(done.transferred_bytes)} transferred)"
        )
    return lines


def _link_flat(selection: Selection, root: Path) -> list[str]:
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


def verify_selection(request: Request, source: idx.IndexSource) -> int:
    """``dataset idc verify``: every series of the selection complete in DEST, file by file against
    what its download (or its shards' downloads) recorded; no network. Returns the exit code."""
    from .core.verify.checks import check_files

    check_root_shape(request.dest.absolute())
    selection = select(source, request)
    if selection.manifest is None:
        raise FilterError("verify checks series; the selection holds single instances only")
    state = state_path_for(request.dest, selection.manifest)
    report = check_files(selection.manifest, request.dest.absolute(), state)
    if report.passed:
        click.echo(f"complete: all {report.checked:,} series in {request.dest} verified file by file")
        return 0
    click.echo(
        f"incomplete: {report.problem_count:,} problem(s) in {len(report.culprit_series):,} of {report.checked:,} "
        f"series in {request.dest}" + (" (the first 10 listed)" if report.problem_count > 10 else "")
    )
    for problem in report.problems[:10]:
        click.echo(f"  {problem}")
    return 1


def _first(items, n: int) -> list:
    """The first ``n`` of ``items``, without running the rest."""
    out = []
    for item in items:
        out.append(item)
        if len(out) >= n:
            break
    return out


def dry_run_report(selection: Selection, request: Request, problems: list[str], *, as_json: bool) -> None:
    check_root_shape(request.dest.absolute())  # what the download would refuse, a dry run refuses too
    """What a download would fetch, streamed: the text form keeps the first ten series and counts the
    rest; the JSON form is one document whose ``series`` and ``instances`` are written one by one
    (its counts, ``would_fetch`` and ``selection``, come after them), so memory does not grow with
    the selection (``nlst``: 592,600 series)."""
    dest = request.dest
    root = dest.absolute()
    flat = request.layout == FLAT
    # files and bytes missing; "partial": series with files on disk that differ, whose files to fetch a
    # listing decides (one wrong-sized file counts there, not in "files"): the counts are then a floor
    todo = {"series": 0, "files": 0, "bytes": 0, "instances": 0, "partial": 0}
    manifest = selection.manifest
    out = click.get_text_stream("stdout")
    shown: list[dict] = []
    collections: set[str] = set()
    counted = {"series": 0, "instances": 0, "instance_bytes": 0}

    def series_items(whole: bool = True):
        """Each series as a dict (``whole``), or ``None`` past the ones shown (counted all the same)."""
        if manifest is None:
            return
        state = state_path_for(root, manifest)
        records = load_state(state, lambda _m: None, repair=False)
        for row, disk, problem in series_status(manifest, root, records, state_path=state):
            if problem:
                todo["series"] += 1
                todo["files"] += max(row["instanceCount"] - disk.count, 0)
                todo["bytes"] += max(row["series_bytes"] - disk.bytes, 0)
                todo["partial"] += 1 if disk.count else 0
            counted["series"] += 1
            collections.add(row["collection_id"])
            if not whole and counted["series"] > 10:
                yield None
                continue
            yield {
                "collection_id": row["collection_id"],
                "PatientID": row["PatientID"],
                "StudyInstanceUID": row["StudyInstanceUID"],
                "SeriesInstanceUID": row["SeriesInstanceUID"],
                "Modality": row["Modality"],
                "crdc_series_uuid": row["crdc_series_uuid"],
                "license": row["license_short_name"],
                "source_url": request.options.source_url(row["series_aws_url"], row["aws_bucket"]),
                "target_dir": "./" if flat else row["target_dir"],
                **({"staging_dir": row["target_dir"]} if flat else {}),
                "files": row["instanceCount"],
                "bytes": row["series_bytes"],
                "size": human_bytes(row["series_bytes"]),
                "idc_version": row["series_revised_idc_version"],
                "prior_release": row["crdc_series_uuid"] in selection.prior,
                "complete": problem is None,
                **urls(row),
            }

    def urls(row: dict) -> dict:
        slides = True if row["StudyInstanceUID"] in selection.slide_studies else None  # None: by its modality
        study, series, modality = row["StudyInstanceUID"], row["SeriesInstanceUID"], row["Modality"]
        return {
            "viewer_url": viewer_url(study, series, modality, viewer=request.viewer, study_has_slides=slides),
            "viewer_study_url": viewer_url(study, None, modality, viewer=request.viewer, study_has_slides=slides),
        }

    def instance_items():
        for row in selection.instances:
            complete = is_complete(root, row)
            if not complete:
                todo["instances"] += 1
                todo["bytes"] += row["instance_size"]
            counted["instances"] += 1
            counted["instance_bytes"] += row["instance_size"]
            collections.add(row["collection_id"])
            yield {
                "SOPInstanceUID": row["SOPInstanceUID"],
                "SeriesInstanceUID": row["SeriesInstanceUID"],
                "collection_id": row["collection_id"],
                "source_url": object_url(row, request.options),
                "file": os.path.basename(file_of(row)) if flat else file_of(row),
                "bytes": row["instance_size"],
                "complete": complete,
                **urls(row),
            }

    stats = summarize(manifest) if manifest is not None else None
    if as_json:
        out.write("{\n" + f'  "dest": {json.dumps(str(dest))},\n  "layout": {json.dumps(request.layout)},\n')
        for key, items in (("series", series_items()), ("instances", instance_items())):
            out.write(f'  "{key}": [')
            for n, item in enumerate(items):
                out.write(("\n    " if n == 0 else ",\n    ") + json.dumps(item))
            out.write("\n  ],\n" if (counted[key]) else "],\n")
        selection_doc = {
            "series": counted["series"],
            "instances": counted["instances"],
            "files": (stats["instances"] if stats else 0) + counted["instances"],
            "bytes": (stats["bytes"] if stats else 0) + counted["instance_bytes"],
            "modalities": stats["modalities"] if stats else [],
            "collections": sorted(collections),
            "licenses": licence_counts(manifest) if manifest is not None else {},
        }
        out.write(f'  "would_fetch": {json.dumps(todo)},\n  "selection": {json.dumps(selection_doc)},\n')
        out.write(f'  "problems": {json.dumps(problems)}\n}}\n')
        out.flush()
        return
    if manifest is not None and not os.path.lexists(root):  # nothing there yet: all of it, counted by Arrow
        import pyarrow.compute as pc

        shown = list(filter(None, _first(series_items(whole=False), 10)))
        todo["series"] = counted["series"] = manifest.num_rows
        todo["files"] = pc.sum(manifest.column("instanceCount")).as_py() or 0
        todo["bytes"] = pc.sum(manifest.column("series_bytes")).as_py() or 0
    else:
        shown = [item for item in series_items(whole=False) if item is not None]
    instances_shown = []
    for item in instance_items():
        if len(instances_shown) < 10:
            instances_shown.append(item)
    if stats is not None:
        click.echo(
            f"would fetch {todo['series']:,} of {stats['series']:,} series ({'at least ' if todo['partial'] else ''}"
            f"{todo['files']:,} files, {human_bytes(todo['bytes'])}) into {dest}; selection: {stats['instances']:,} "
            f"files, {human_bytes(stats['bytes'])}, modalities {', '.join(stats['modalities'])}"
        )
        held = restricted(licence_counts(manifest)) if manifest is not None else {}
        if held:
            click.echo(f"  licences: {restriction_text(licence_counts(manifest))}")
        if todo["partial"]:
            click.echo(
                f"  {todo['partial']:,} of these series are partly on disk: a listing of each decides which of their "
                "files differ (missing, or of another size) and only those are fetched"
            )
    for item in shown:
        prior = f", from IDC v{item['idc_version']}" if item["prior_release"] else ""
        click.echo(
            f"  {item['source_url']} -> {item['target_dir']} ({item['files']} files, {item['size']}{prior}) "
            f"{item['viewer_url']} (study: {item['viewer_study_url']})"
        )
    if counted["series"] > 10:
        click.echo(f"  ... and {counted['series'] - 10:,} more series")
    if counted["instances"]:
        click.echo(f"would fetch {todo['instances']:,} of {counted['instances']:,} single instance(s) into {dest}")
        for item in instances_shown:
            click.echo(f"  {item['source_url']} -> {item['file']} ({human_bytes(item['bytes'])}) {item['viewer_url']}")
    for problem in problems:
        click.echo(f"  cannot fetch: {problem}")


def citations_text(source: idx.IndexSource, target: str, kind: str, fmt: str, skip_unresolved: bool) -> str:
    from .core.index.citations import citations, render

    request = Request(target=target, dest=Path("."), kind=kind, skip_unresolved=skip_unresolved, layout=FLAT)
    selection = select(source, request)
    with source.connect() as con:
        records = citations(
            con,
            selection.manifest,
            selection.instances,
            analysis_results=source.directory / "analysis_results_index.parquet",
        )
    if not records:
        raise FilterError("the selection has no source DOI in the index")
    return render(records, fmt)


__all__ = ["Request", "run_download", "citations_text", "DownloadError"]
