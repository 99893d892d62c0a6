"""``dataset idc download`` and ``citations``: from a TARGET (IDs or a manifest file) to a
selection, a dry-run report (text or JSON) or a verified download. Kept apart from ``cli.py``
so that the command definitions there stay short."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from . import settings
from .api import Request, citation_records, select, state_and_shard, transfer, verify_report, with_prior_counts
from .cli_errors import EXIT_INCOMPLETE, Failure
from .core.fmt import human_bytes, human_duration
from .core.index import source as idx
from .core.index.viewer import viewer_url
from .core.select.licences import licence_counts, restricted, restriction_text
from .core.select.manifest import summarize
from .core.select.resolve import (
    FLAT,
    Selection,
)
from .core.transfer.disk import series_status
from .core.transfer.download import check_root_shape, state_path_for
from .core.transfer.instances import file_of, is_complete, object_url
from .core.transfer.state import load_state

INSTANCE_INDEX = "sm_instance_index"


def our_process_allocates_for_scale() -> None:
    """The command's process is ours: Arrow gives freed memory back (``arrow_build.give_back_freed_memory``)
    unless the user chose Arrow's pool with ``ARROW_DEFAULT_MEMORY_POOL``. The Python API leaves the
    host program's allocator alone."""
    from .core.arrow_build import give_back_freed_memory

    give_back_freed_memory(settings.arrow_pool_chosen())


def run_download(request: Request, source: idx.IndexSource, *, dry_run: bool, as_json: bool, view=None) -> None:
    """``dataset idc download``: a dry-run report, or the API's ``transfer`` with its progress
    shown and its outcome said in closing lines and the exit code."""
    our_process_allocates_for_scale()
    if dry_run:
        selection = select(source, request, _stderr)
        problems = with_prior_counts(selection, request)
        state_and_shard(selection, request)
        dry_run_report(selection, request, problems, as_json=as_json)
        return
    try:
        outcome = transfer(request, source, log=view.log if view else click.echo, note=_stderr, on_progress=view)
    finally:
        if view is not None:
            view.end()
    selection = outcome.selection
    for line in summary_lines(
        outcome.result, outcome.instances, len(selection.instances), request.dest, failed=not outcome.complete
    ):
        click.echo(line)
    if not outcome.complete:
        raise Failure(" | ".join([*outcome.problems, *outcome.incomplete]), EXIT_INCOMPLETE)
    if outcome.card is not None:
        click.echo(f"dataset card: {outcome.card}")
    if outcome.card_problem:
        click.echo(f"note: {outcome.card_problem}", err=True)


def _stderr(line: str) -> None:
    click.echo(line, err=True)


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


def verify_selection(request: Request, source: idx.IndexSource) -> int:
    """``dataset idc verify`` (the API's ``verify_report``), said in lines; returns the exit code."""
    our_process_allocates_for_scale()
    report = verify_report(request, source, _stderr)
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
            "emptied_by_filters": selection.emptied,
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
    from .core.index.citations import render

    request = Request(target=target, dest=Path("."), kind=kind, skip_unresolved=skip_unresolved, layout=FLAT)
    return render(citation_records(source, request, _stderr), fmt)


__all__ = ["Request", "run_download", "citations_text", "verify_selection"]
