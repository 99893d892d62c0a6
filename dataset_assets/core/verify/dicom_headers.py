"""Comparing DICOM headers with manifest rows: the worker side of ``verify.check_headers``.

Parsing headers is pure Python, so threads share one core; ``verify`` runs ``check_series``
in worker processes instead. This module imports only pydicom, so a worker starts quickly.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import stat
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from dataset_assets.core.transfer.parent_death import on_parent_death

HEADER_FIELDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")

# One unit of work: (series directory, SeriesInstanceUID, expected values in HEADER_FIELDS order).
Series = tuple[str, str, tuple[str, ...]]


_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # a set: one hash, not three Tag.__eq__


def _at_pixels(tag: int, vr: str | None, length: int) -> bool:
    """Where ``stop_before_pixels`` stops: the header is every element before the pixel data, all
    of it parsed, as ``dcmread`` parses it (damage anywhere in it is a finding; of a repeated
    element, the last copy counts)."""
    return tag in _PIXEL_TAGS


@functools.lru_cache(maxsize=1)
def _field_tags(tag: Callable) -> list:
    return [tag(name) for name in HEADER_FIELDS]


def file_problems(path: str, expected: tuple[str, ...]) -> list[str]:
    """What is wrong with one file's header (empty: nothing). A file pydicom cannot parse is a
    finding; so is anything but a regular file (a FIFO is never opened for reading, a link never
    followed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every oddity of a damaged file
            # On first use: the definitions load without pydicom.
            from pydicom.filereader import read_partial
            from pydicom.tag import Tag

            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            try:
                fp = open(fd, "rb") if stat.S_ISREG(os.fstat(fd).st_mode) else None  # noqa: SIM115
            except BaseException:
                os.close(fd)
                raise
            if fp is None:
                os.close(fd)
                return [f"{path}: not a regular file"]
            with fp:
                ds = read_partial(fp, stop_when=_at_pixels, specific_tags=_field_tags(Tag))
            values = [str(ds.get(name, "<missing>")) for name in HEADER_FIELDS]
    except Exception as exc:
        return [f"{path}: not a readable DICOM file ({exc.__class__.__name__}: {exc})"]
    return [
        f"{path}: {name} is {value!r}, manifest says {want!r}"
        for name, value, want in zip(HEADER_FIELDS, values, expected, strict=False)
        if value != want
    ]


def check_series(
    batch: list[Series], sample_per_series: int, max_listed: int, known: dict | None = None
) -> tuple[int, int, list[str], list[str], list[tuple[str, str, int, int]]]:
    """Read the ``*.dcm`` headers of each series directory in ``batch`` (the first
    ``sample_per_series`` by name when > 0). ``known`` maps ``(folder, name)`` to the
    ``(size, mtime_ns, key)`` of a file whose header matched before: such a file, unchanged since,
    is not read again. Returns (files checked, problem count, the first ``max_listed`` problems,
    UIDs of series with problems, ``(folder, name, size, mtime_ns)`` of each file read that
    matched). A missing directory is skipped: missing files are the file-count check's business."""
    checked = count = 0
    listed: list[str] = []
    culprits: list[str] = []
    passed: list[tuple[str, str, int, int]] = []
    known = known or {}
    for folder, series_uid, expected in batch:
        try:
            entries = sorted(
                ((e.name, e.stat(follow_symlinks=False)) for e in os.scandir(folder) if e.name.endswith(".dcm")),
                key=lambda item: item[0],
            )
        except (FileNotFoundError, NotADirectoryError):
            continue
        if sample_per_series:
            entries = entries[:sample_per_series]
        key = header_key(expected)
        bad = False
        for name, st in entries:
            checked += 1
            if known.get((folder, name)) == (st.st_size, st.st_mtime_ns, key):
                continue
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader; a link or folder is not a file
                problems = [f"{os.path.join(folder, name)}: not a regular file"]
            else:
                problems = file_problems(os.path.join(folder, name), expected)
            if not problems:
                passed.append((folder, name, st.st_size, st.st_mtime_ns))
            for problem in problems:
                count += 1
                bad = True
                if len(listed) < max_listed:
                    listed.append(problem)
        if bad:
            culprits.append(series_uid)
    return checked, count, listed, culprits, passed


def header_key(expected: tuple[str, ...]) -> str:
    return "\x1f".join(expected)


class HeaderCache:
    """Files whose header matched their series, with the size and mtime they had then: a file
    unchanged since is not read again (as make and rsync trust size and mtime). One Parquet file
    per collection below the download root; unreadable means empty (it is only a cache)."""

    def __init__(self, path: Path, root: Path) -> None:
        self.path, self.root = path, root
        self.entries: dict[tuple[str, str], tuple[int, int, str]] = {}
        self.changed = False
        self.loaded = False  # True once the file on disk was read whole: it holds ``entries``

    def parts(self) -> list[Path]:
        """What downloads added since the cache was last written whole: one part per batch."""
        return sorted(self.path.parent.glob(f"{self.path.name}.part-*.parquet"))

    def load(self) -> HeaderCache:
        """The cache and every part downloads added (parts folded in when it is saved next)."""
        from dataset_assets.core import arrow_build

        absolute = _memo(lambda folder: os.path.normpath(os.path.join(self.root, folder)))
        self.entries, self.loaded, self._parts = {}, False, []
        try:
            self._read(arrow_build.read_parquet(self.path), absolute)
            self.loaded = True
        except Exception:
            self.entries = {}
        for part in self.parts():
            try:
                self._read(arrow_build.read_parquet(part), absolute)
                self._parts.append(part)
            except Exception:  # a part cut short by a kill: only a cache, the check reads those files
                continue
        self.changed = bool(self._parts)
        return self

    def _read(self, table, absolute) -> None:
        rows = zip(*(table.column(c).to_pylist() for c in ("folder", "name", "size", "mtime_ns", "key")), strict=False)
        self.entries.update({(absolute(f), n): (s, m, k) for f, n, s, m, k in rows})

    def add(self, folder: str, name: str, size: int, mtime_ns: int, key: str) -> None:
        value = (size, mtime_ns, key)
        if self.entries.get((folder, name)) != value:
            self.entries[(folder, name)] = value
            self.changed = True

    def save(self) -> None:
        """Write the cache (atomically), unless it was loaded from the file and nothing changed
        since (a cache never loaded, as after ``reread``, or unreadable, is always written)."""
        if self.loaded and not self.changed:
            return
        self._write(self.path)
        for part in getattr(self, "_parts", []):  # folded into the cache just written
            with contextlib.suppress(OSError):
                part.unlink()
        self._parts = []
        self.changed, self.loaded = False, True

    def save_part(self) -> None:
        """Write only the entries added here as a new part beside the cache (a download adds one
        per batch: it never loads nor rewrites the whole cache, so its memory holds one batch)."""
        if self.entries:
            self._write(self.path.with_name(f"{self.path.name}.part-{time.time_ns()}-{os.getpid()}.parquet"))
        self.entries, self.changed = {}, False

    def _write(self, path: Path) -> None:
        import pyarrow as pa  # here, not at the top: header workers import only pydicom
        import pyarrow.parquet as pq

        from dataset_assets.core import arrow_build
        from dataset_assets.core.fs import new_file

        schema = pa.schema(
            [
                ("folder", pa.string()),
                ("name", pa.string()),
                ("size", pa.int64()),
                ("mtime_ns", pa.int64()),
                ("key", pa.string()),
            ]
        )
        relative = _memo(lambda folder: os.path.relpath(folder, self.root))
        rows = [(relative(f), n, *v) for (f, n), v in self.entries.items()]
        columns = list(zip(*rows, strict=False)) if rows else [[], [], [], [], []]
        table = arrow_build.table(dict(zip(schema.names, columns, strict=True)), schema)
        path.parent.mkdir(parents=True, exist_ok=True)
        with new_file(path) as handle:
            pq.write_table(table, handle)


def _memo(fn: Callable[[str], str]) -> Callable[[str], str]:
    """``fn`` computed once per folder (a cache holds thousands of files in tens of folders)."""
    return functools.lru_cache(maxsize=None)(fn)


class StreamingHeaderCheck:
    """Reads the header of each file as soon as the transfer reports it copied (a thread, while
    s5cmd fetches the rest) and records the ones that match in a ``HeaderCache``; the blocking
    check then reads only files that are new or changed since."""

    def __init__(self, cache: HeaderCache, expected_by_folder: dict[str, tuple[str, ...]]) -> None:
        import queue
        import threading

        self.cache, self.expected = cache, expected_by_folder
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, daemon=True, name="header-check")
        self.thread.start()

    def file_copied(self, destination: str) -> None:
        self.queue.put(destination)

    stopping = False

    def _work(self) -> None:
        while (destination := self.queue.get()) is not None and not self.stopping:
            folder, _, name = destination.rpartition("/")
            folder = os.path.normpath(folder)
            expected = self.expected.get(folder)
            if expected is None or not name.endswith(".dcm"):
                continue
            try:
                st = os.stat(destination, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and not file_problems(destination, expected):
                self.cache.add(folder, name, st.st_size, st.st_mtime_ns, header_key(expected))

    def finish(self, drain: bool = True) -> None:
        """Wait for the files reported so far (``drain``; else stop at once) and write what was
        read as a part of the cache (the cache itself is neither loaded nor rewritten)."""
        self.stopping = not drain
        self.queue.put(None)
        self.thread.join()
        with contextlib.suppress(OSError):  # only a cache: the check reads these files itself
            self.cache.save_part()


def die_with_parent(parent: int) -> None:
    """Worker initializer: the kernel kills this worker when the process that started it dies
    (a killed Dagster step leaves no header readers behind)."""
    on_parent_death(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def header_watch(cache_path: Path) -> Callable[[Path, list[dict]], StreamingHeaderCheck]:
    """A ``watch_batch`` for the download engine: each batch's files have their header read as they
    land, and the matching ones recorded in a part of the cache at ``cache_path``."""

    def start(root: Path, rows: list[dict]) -> StreamingHeaderCheck:
        expected = {
            os.path.normpath(root / r["target_dir"]): tuple(r.get(f) or "" for f in HEADER_FIELDS) for r in rows
        }
        return StreamingHeaderCheck(HeaderCache(cache_path, root), expected)  # this batch's part only

    return start
