"""Downloaded collections: every DICOM file of a manifest on disk, verified against it.

The download engine, manifests and states (PyArrow) are imported by the steps that use them,
not when the definitions load."""

import warnings
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from dataset_assets import settings
from dataset_assets.core.errors import DatasetError, IncompleteDownloadError, TransferStoppedError
from dataset_assets.core.fmt import human_bytes, os_error_text, redact_url
from dataset_assets.core.select.shards import shard_count, shard_manifest
from dataset_assets.core.transfer.s5cmd import binary_version, die_with_launcher
from dataset_assets.defs.automation.refresh import refresh_downloaded_condition
from dataset_assets.defs.downloads.manifest_assets import collection_manifest
from dataset_assets.lib.groups import DOWNLOADS_GROUP, OWNERS
from dataset_assets.lib.metadata import failure
from dataset_assets.lib.partitions import collection_partitions, shard_partitions
from dataset_assets.lib.resources import IdcResource, S5cmdResource

DOWNLOAD_POOL = "idc_download"
#: What every downloaded asset (collections, their shards, cohorts) declares alike.
DOWNLOAD_ASSET = {
    "group_name": DOWNLOADS_GROUP,
    "kinds": {"s3", "dicom"},
    "owners": OWNERS,
    "pool": DOWNLOAD_POOL,
    "tags": {"domain": "idc"},
}

with warnings.catch_warnings():  # beta in Dagster 1.13, and the mapping shards need: no warning at every load
    warnings.simplefilter("ignore", dg.BetaWarning)
    #: ``<collection>|<shard>`` -> ``<collection>`` (and every shard of a collection -> the collection).
    BY_COLLECTION = dg.MultiToSingleDimensionPartitionMapping("collection_id")


def _metadata(result, collection_dir, version: str) -> dict:  # result: core.download.DownloadResult
    return {
        "series": result.series,
        "series_complete": result.complete_series,
        "series_failed": result.failed_count,
        "series_skipped_already_complete": result.skipped_series,
        "series_listed": result.listed_series,
        "files": result.files,
        "bytes": result.bytes,
        "size": human_bytes(result.bytes),
        "transferred_files": result.transferred_files,
        "transferred_bytes": result.transferred_bytes,
        "duration_s": round(result.duration_s, 3),
        "mb_per_s": round(result.mb_per_s, 2),
        "download_path": dg.MetadataValue.path(str(collection_dir)),
        "download_url": dg.MetadataValue.url(collection_dir.as_uri()),
        "s5cmd_version": version,
        "series_replaced": len(result.replaced_series),
        "series_removed_from_manifest": len(result.removed_series),
        "replaced_and_removed": dg.MetadataValue.md(
            "\n".join(
                [
                    *(f"- replaced: {s}" for s in result.replaced_series[:50]),
                    *(f"- no longer in manifest (kept on disk): {s}" for s in result.removed_series[:50]),
                ]
            )
            or "none"
        ),
    }


def _collection_dir(root, manifest):
    """The top directory shared by every series of the manifest (``root/<collection_id>`` with the
    default layout; the root itself when the series start in different top directories)."""
    tops = {d.split("/", 1)[0] for d in manifest.column("target_dir").to_pylist()}
    return root / tops.pop() if len(tops) == 1 else root


@dg.asset(
    deps=[dg.AssetDep(collection_manifest, partition_mapping=BY_COLLECTION)],
    partitions_def=shard_partitions,
    **DOWNLOAD_ASSET,
)
def downloaded_collection_shard(
    context: dg.AssetExecutionContext, idc: IdcResource, s5cmd: S5cmdResource
) -> dg.MaterializeResult:
    """One shard of a collection (partition `<collection_id>|<shard>`): the series whose
    crdc_series_uuid falls in it, downloaded into the collection's own root and layout with a
    state of its own, so the shards of one collection run at once on any workers. A collection is
    split into `$IDC_SHARDS` shards (16), or fewer when it is small (at least 100,000 files each);
    a shard past that count is empty. Launch every shard and `downloaded_collection` in one
    backfill: the collection then verifies what the shards recorded, with no request."""
    from dataset_assets.core.select.manifest import read_manifest
    from dataset_assets.core.transfer import download as dl
    from dataset_assets.core.transfer.state import shard_state_path

    keys = context.partition_key.keys_by_dimension
    collection_id, shard = keys["collection_id"], int(keys["shard"])
    root = idc.download_root()
    try:
        manifest = read_manifest(idc.manifest_path(collection_id))
    except (DatasetError, FileNotFoundError) as exc:
        raise failure(exc) from None
    files = sum(n for n in manifest.column("instanceCount").to_pylist() if isinstance(n, int))
    requested = len(shard_partitions.get_partitions_def_for_dimension("shard").get_partition_keys())
    try:
        count = shard_count(files, requested, int(settings.IDC_SHARD_MIN_FILES.require()))
    except (ValueError, DatasetError) as exc:
        raise failure(f"IDC_SHARD_MIN_FILES: {exc}", retry=False) from None
    if shard >= count:
        context.log.info(f"shard {shard} of {collection_id}: empty ({files:,} files make {count} shard(s))")
        return dg.MaterializeResult(metadata={"shard": shard, "shards": count, "series": 0, "empty": True})
    collection_state = dl.state_path_for(root, manifest)
    state = shard_state_path(collection_state, shard, count)
    return materialize_download(
        context,
        s5cmd,
        root,
        lambda: idc.manifest_path(collection_id),
        f"collection={collection_id} shard={shard}/{count}",
        state_path=state,
        select=lambda table: shard_manifest(table, shard, count),
        headers_of=collection_state,
        extra={"shard": shard, "shards": count},
    )


@dg.asset(
    deps=[
        collection_manifest,
        dg.AssetDep(downloaded_collection_shard, partition_mapping=BY_COLLECTION),
    ],
    partitions_def=collection_partitions,
    **DOWNLOAD_ASSET,
    automation_condition=refresh_downloaded_condition,
    # a freshness policy is added when collections are watched (lib/watched.py, applied in definitions.py)
)
def downloaded_collection(
    context: dg.AssetExecutionContext, idc: IdcResource, s5cmd: S5cmdResource
) -> dg.MaterializeResult:
    """Every DICOM file of the collection's manifest, in `$IDC_DOWNLOAD_DIR` under the layout of
    the manifest, fetched with s5cmd. Resumable: series already complete on disk cost no
    request. Succeeds only when every file of every series has its own size as listed on the
    server (recorded per file in the download state). A dataset card (`DATASET-<collection_id>.md`
    and its JSON twin) in the download root says what it holds, under which licences, how to cite it."""
    from dataset_assets.lib.cards import card_writer

    collection_id = context.partition_key
    return materialize_download(
        context,
        s5cmd,
        idc.download_root(),
        lambda: idc.manifest_path(collection_id),
        f"collection={collection_id}",
        card=card_writer(idc, collection_id, "collection"),
        preview_name=collection_id,
    )


def materialize_download(
    context: dg.AssetExecutionContext,
    s5cmd: S5cmdResource,
    root: Path,
    manifest_path: Callable[[], Path],
    label: str,
    state_path: Path | None = None,
    select: Callable | None = None,
    headers_of: Path | None = None,
    extra: dict | None = None,
    card: Callable | None = None,
    preview_name: str | None = None,
) -> dg.MaterializeResult:
    """The body of every downloaded asset (collections, cohorts): read the manifest, run the
    download engine, and turn its outcome into metadata or a one-line ``dg.Failure``, with a
    searchable start and end line in the run's log. ``state_path``: default, the collection's."""
    from dataset_assets.core.arrow_build import give_back_freed_memory
    from dataset_assets.core.select.manifest import read_manifest
    from dataset_assets.core.transfer import download as dl
    from dataset_assets.core.verify.checks import header_cache_path
    from dataset_assets.core.verify.dicom_headers import HEADER_FIELDS, header_watch

    die_with_launcher()  # a SIGKILLed `dagster asset materialize` takes this step and s5cmd along
    give_back_freed_memory(settings.arrow_pool_chosen())
    try:
        manifest = read_manifest(manifest_path())
        state = state_path or dl.state_path_for(root, manifest)
        manifest = select(manifest) if select is not None else manifest  # e.g. one shard's series
    except (DatasetError, FileNotFoundError) as exc:  # an unsafe partition key, a tampered manifest
        raise failure(exc) from None
    collection_dir = _collection_dir(root, manifest) if manifest.num_rows else root
    version = binary_version(settings.S5CMD_BINARY.get())
    context.log.info(
        f"download start {label} series={manifest.num_rows} root={root} "
        f"endpoint={redact_url(s5cmd.resolved_endpoint())} s5cmd={version}"
    )
    try:
        result = dl.download(
            manifest,
            root,
            s5cmd.options(),
            dl.EngineOptions(
                log=context.log.info,
                progress_interval_s=s5cmd.progress_interval_s,
                state_path=state,
                stall_timeout_s=s5cmd.stall_timeout_s,
                allowed_buckets=s5cmd.buckets(),
                # headers read as files land, for the check (a shard adds to its collection's cache)
                watch_batch=header_watch(header_cache_path(root, manifest, headers_of or state)),
                watch_columns=HEADER_FIELDS,
            ),
        )
    except (IncompleteDownloadError, TransferStoppedError) as exc:
        result = exc.result
        reason = "incomplete" if isinstance(exc, IncompleteDownloadError) else "stopped"
        context.log.error(
            f"download failed {label} reason={reason} failed_series={result.failed_count} "
            f"transferred_bytes={result.transferred_bytes} duration_s={result.duration_s:.1f}"
        )
        raise failure(exc, metadata=_metadata(result, collection_dir, version)) from None
    except DatasetError as exc:  # could not start: bad root, unsafe value, no space, endpoint, lock
        context.log.error(f"download failed {label} reason={str(exc)[:200]!r}")
        raise failure(exc) from None
    except OSError as exc:  # the file system said no (permissions, disk full, I/O): name the path, keep the rest
        context.log.error(f"download failed {label} reason=OSError errno={exc.errno}")
        raise failure(
            f"{os_error_text(exc)}; everything completed so far is kept, materialize again once that is fixed"
        ) from None
    except BaseException as exc:  # interrupted from the UI, or an unexpected error: still log the end
        context.log.error(f"download failed {label} reason={exc.__class__.__name__}")
        raise
    context.log.info(
        f"download end {label} files={result.files} bytes={result.bytes} "
        f"transferred_bytes={result.transferred_bytes} duration_s={result.duration_s:.1f} "
        f"mb_per_s={result.mb_per_s:.1f} failures=0"
    )
    metadata = {**_metadata(result, collection_dir, version), **(extra or {})}
    if card is not None:  # the dataset card beside the download, rewritten by every verified run
        try:
            markdown, written = card(manifest, root, version)
            metadata["dataset_card"] = dg.MetadataValue.md(markdown.read_text(encoding="utf-8"))
            metadata["dataset_card_path"] = dg.MetadataValue.path(str(markdown))
            metadata["licenses"] = dg.MetadataValue.json(written["licenses"])
        except (OSError, DatasetError) as exc:  # the data is verified: a card that cannot be written is said
            context.log.warning(f"dataset card not written: {os_error_text(exc) if isinstance(exc, OSError) else exc}")
    if preview_name is not None and manifest.num_rows:
        metadata.update(_previews(context, root, manifest, preview_name, changed=result.transferred_files > 0))
    return dg.MaterializeResult(metadata=metadata)


def _previews(context: dg.AssetExecutionContext, root: Path, manifest, name: str, changed: bool) -> dict:
    """Thumbnails of the first series (middle image, pydicom) as Markdown images, and as PNG files
    under the control folder; a series that cannot be shown is named, never a failed run. A run
    that fetched nothing shows the thumbnails it kept (no DICOM decoded, pydicom not imported)."""
    from dataset_assets.core.fs import new_file
    from dataset_assets.core.transfer.control import DownloadRoot
    from dataset_assets.core.verify.previews import kept_previews, previews, previews_markdown

    rows = manifest.slice(0, 4).to_pylist()
    folder = DownloadRoot(root).control / "previews" / name
    found = None if changed else kept_previews(folder, rows)
    if found is not None:
        return {
            "previews": dg.MetadataValue.md(previews_markdown(found)),
            "previews_shown": len(found),
            "previews_not_shown": dg.MetadataValue.md("none"),
            "previews_path": dg.MetadataValue.path(str(folder)),
        }
    found = previews(root, rows)
    try:
        folder = DownloadRoot(root).previews(name)
        for p in found:
            if p.png is not None:
                with new_file(folder / f"{p.series_uid}.png") as out:
                    out.write(p.png)
    except OSError as exc:
        context.log.warning(f"preview files not written: {os_error_text(exc)}")
    except DatasetError as exc:
        context.log.warning(f"preview files not written: {exc}")
    missing = [p for p in found if p.png is None]
    return {
        "previews": dg.MetadataValue.md(previews_markdown(found)),
        "previews_shown": len(found) - len(missing),
        "previews_not_shown": dg.MetadataValue.md(
            "\n".join(f"- `{p.series_uid}`: {p.problem}" for p in missing) or "none"
        ),
        "previews_path": dg.MetadataValue.path(str(folder)),
    }


defs = dg.Definitions(assets=[downloaded_collection, downloaded_collection_shard])
