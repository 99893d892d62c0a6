"""Single DICOM instances (a SOPInstanceUID of ``sm_instance_index``, e.g. one level of a slide
microscopy pyramid): one object each, ``s3://<bucket>/<crdc_series_uuid>/<crdc_instance_uuid>.dcm``.

The object goes into its series' directory (the same directory a whole-series download uses, so a
later download of the series finds it and fetches only the rest), as ``<crdc_instance_uuid>.dcm``.
One ``s5cmd run`` of ``cp`` lines (the same options, process handling and stall check as the
series engine) fetches what is missing; each file is verified by its size, ``instance_size`` of
the index. A file already there with that size is not fetched again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dataset_assets.core.errors import DownloadError, IncompleteDownloadError
from dataset_assets.core.fmt import human_bytes, redact_url
from dataset_assets.core.safety import is_uuid, location_problem, target_dir_problem
from dataset_assets.core.transfer import s5cmd
from dataset_assets.core.transfer.control import DownloadRoot, collection_locks, command_file
from dataset_assets.core.transfer.disk import TEMP_SUFFIX
from dataset_assets.core.transfer.download import check_endpoint, check_root
from dataset_assets.core.transfer.progress import Progress
from dataset_assets.core.transfer.s5cmd import quoted

Log = Callable[[str], None]


@dataclass
class InstanceResult:
    instances: int
    bytes: int
    transferred_files: int = 0
    transferred_bytes: int = 0
    failed: list[str] = field(default_factory=list)
    failed_count: int = 0
    series: int = 0  # for messages shared with the series engine
    errors: list[str] = field(default_factory=list)


def instance_problem(row: dict, allowed_buckets: tuple[str, ...]) -> str | None:
    problem = location_problem(row, allowed_buckets, url=False)  # an instance's URL is its own
    if problem is None and not is_uuid(row.get("crdc_instance_uuid")):
        problem = f"crdc_instance_uuid {row.get('crdc_instance_uuid')!r} is not a UUID"
    if problem is None:
        problem = target_dir_problem(row.get("target_dir"))
    size = row.get("instance_size")
    if problem is None and (not isinstance(size, int) or size < 0):
        problem = f"instance_size {size!r} is not a size in bytes"
    return f"instance {row.get('SOPInstanceUID')!r}: {problem}" if problem else None


def object_url(row: dict, options: s5cmd.S5cmdOptions) -> str:
    series_url = options.source_url(f"s3://{row['aws_bucket']}/{row['crdc_series_uuid']}/*", row["aws_bucket"])
    return series_url[:-1] + f"{row['crdc_instance_uuid']}.dcm"


def file_of(row: dict) -> str:
    """Path of the instance's file relative to the download root."""
    return f"{row['target_dir']}{row['crdc_instance_uuid']}.dcm"


def is_complete(root: Path, row: dict) -> bool:
    path = root / file_of(row)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return os.path.isfile(path) and not os.path.islink(path) and st.st_size == row["instance_size"]


def download_instances(
    rows: list[dict],
    root: Path,
    options: s5cmd.S5cmdOptions,
    *,
    allowed_buckets: tuple[str, ...],
    log: Log = print,
    stall_timeout_s: float = 120.0,
    check_endpoint_first: bool = True,
) -> InstanceResult:
    """Bring every instance of ``rows`` onto disk below ``root``; ``IncompleteDownloadError`` when
    some are still missing or of the wrong size afterwards."""
    root = root.absolute()
    check_root(root)
    result = InstanceResult(instances=len(rows), bytes=sum(int(r.get("instance_size") or 0) for r in rows))
    failed: dict[str, str] = {}
    todo = []
    for row in rows:
        problem = instance_problem(row, allowed_buckets)
        if problem:
            failed[row["SOPInstanceUID"]] = problem
        elif not is_complete(root, row):
            todo.append(row)
    collections = sorted({r["collection_id"] for r in rows})
    with collection_locks(root, collections):
        control = DownloadRoot(root).control
        control.mkdir(exist_ok=True)
        for row in todo:  # what a killed s5cmd left of these objects
            folder = root / row["target_dir"]
            if folder.is_dir():
                for entry in folder.iterdir():
                    match = TEMP_SUFFIX.fullmatch(entry.name)
                    if match and match.group(1) == f"{row['crdc_instance_uuid']}.dcm" and entry.is_file():
                        entry.unlink(missing_ok=True)
        if todo:
            if check_endpoint_first:
                check_endpoint(options)
            need = sum(r["instance_size"] for r in todo)
            progress = Progress(total_files=len(todo), total_bytes=need)
            log(
                f"downloading {len(todo)} of {len(rows)} instance(s) ({human_bytes(need)}) from "
                f"{redact_url(options.endpoint_url)}"
            )

            def check() -> None:
                if stall_timeout_s and progress.seconds_without_success() > stall_timeout_s:
                    raise DownloadError(
                        f"no file completed for {stall_timeout_s:g} s from {redact_url(options.endpoint_url)}"
                        + (f"; first error: {progress.first_error}" if progress.first_error else "")
                        + "; s5cmd stopped, run again to resume"
                    )

            with command_file(control, "run") as (path, handle):
                for row in todo:
                    dest = root / row["target_dir"]
                    dest.mkdir(parents=True, exist_ok=True)
                    handle.write(
                        f"cp {' '.join(options.copy_flags())} {quoted(object_url(row, options))} "
                        f"{quoted(str(root / file_of(row)))}\n"
                    )
                handle.close()
                s5cmd.run_commands(
                    options, path, on_stdout=progress.on_stdout, on_stderr=progress.on_stderr, check=check
                )
            result.transferred_files, result.transferred_bytes = progress.done_files, progress.done_bytes
            result.errors = list(progress.errors)
        for row in todo:
            if not is_complete(root, row):
                path = root / file_of(row)
                have = path.stat().st_size if path.is_file() else None
                failed[row["SOPInstanceUID"]] = f"instance {row['SOPInstanceUID']} ({object_url(row, options)}): " + (
                    "missing" if have is None else f"{have:,} bytes, expected {row['instance_size']:,}"
                )
    result.failed, result.failed_count = list(failed.values()), len(failed)
    if failed:
        errors = " | ".join(result.errors[:3])
        raise IncompleteDownloadError(
            f"{len(failed)} of {len(rows)} instance(s) incomplete: {'; '.join(result.failed[:10])}"
            + (f". s5cmd errors: {errors}" if errors else "")
            + ". Everything that completed is kept; run the same command again to fetch what is missing.",
            result,
        )
    return result
