"""Shards of one collection: disjoint sets of its series that separate runs (on separate workers)
download into one root, each with its own state and lock.

A series belongs to shard ``int(crdc_series_uuid[:8], 16) % count``: IDC's crdc_series_uuids are
random (version 4), so shards are even, and a shard's series set depends only on the manifest,
so it is the same in every run of the same release. ``count`` is what the user asks for, capped
by the collection's size (``shard_count``): a small collection is one shard, and the shards past
its count are empty.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from dataset_assets.core.errors import OptionError

if TYPE_CHECKING:
    import pyarrow as pa

#: A shard holds at least this many files before a collection is split further.
MIN_FILES_PER_SHARD = 100_000
MAX_SHARDS = 256


def shard_count(files: int, requested: int, min_files: int = MIN_FILES_PER_SHARD) -> int:
    """The shards a collection of ``files`` files is split into when ``requested`` are asked for."""
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= MAX_SHARDS:
        raise OptionError(f"shard count {requested!r} is not a whole number from 1 to {MAX_SHARDS}")
    return max(1, min(requested, math.ceil(max(files, 0) / max(min_files, 1))))


def shard_of(crdc_series_uuid: str, count: int) -> int:
    return int(crdc_series_uuid[:8], 16) % count


def parse_shard(text: str) -> tuple[int, int]:
    """``"3/16"`` -> ``(3, 16)`` (shard 3 of 16, counted from 0); ``OptionError`` otherwise."""
    index, sep, count = str(text).partition("/")
    digits = sep and index.isascii() and count.isascii() and index.isdigit() and count.isdigit()
    if not digits or not 0 <= int(index) < int(count) <= MAX_SHARDS:
        raise OptionError(
            f"shard {text!r} is not INDEX/COUNT with 0 <= INDEX < COUNT <= {MAX_SHARDS} (e.g. 3/16: the fourth of 16)"
        )
    return int(index), int(count)


def shard_manifest(manifest: pa.Table, index: int, count: int) -> pa.Table:
    """The rows of ``manifest`` in shard ``index`` of ``count`` (rows without a UUID-shaped
    crdc_series_uuid stay in shard 0, where the download reports them)."""
    from dataset_assets.core.arrow_build import int64s

    rows = []
    for i, uuid in enumerate(manifest.column("crdc_series_uuid").to_pylist()):
        try:
            mine = shard_of(uuid, count) == index
        except (TypeError, ValueError):
            mine = index == 0
        if mine:
            rows.append(i)
    return manifest.take(int64s(rows))  # built from buffers: no pandas import for a list of ints
