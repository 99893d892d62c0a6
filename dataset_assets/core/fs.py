"""Destination checks shared by every downloader: writable, and room for what is coming."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from dataset_assets.core.errors import DownloadError
from dataset_assets.core.fmt import human_bytes

DISK_MARGIN = 0.02  # fraction of the needed bytes kept free on top of them
DISK_MARGIN_MIN = 64 * 1024 * 1024


@contextmanager
def new_file(path: Path, mode: str = "wb", encoding: str | None = None, newline: str | None = None) -> Iterator:
    """Write ``path`` through a temporary file beside it that this call creates (``mkstemp``:
    ``O_CREAT | O_EXCL | O_NOFOLLOW``, a random name no one can guess or have planted), renamed
    over ``path`` when the block ends; removed when it fails. A link planted at ``path`` is
    replaced, never written through. Every file the project writes for output goes through here."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # as an ordinary new file: readable by the others sharing the root
        with os.fdopen(fd, mode, encoding=encoding, newline=newline) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def check_writable(directory: Path, what: str = "download root") -> None:
    """Create ``directory`` if needed and prove a file can be written there; else ``DownloadError``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DownloadError(f"{what} {directory} is not writable: {exc.strerror or exc}") from None


def check_free_space(
    directory: Path, needed_bytes: int, what: str = "the download", reserved: dict[str, int] | None = None
) -> None:
    """``DownloadError`` unless ``directory`` has room for ``needed_bytes`` plus a margin, once
    the bytes ``reserved`` by other downloads in progress (label -> bytes) are set aside."""
    free = shutil.disk_usage(directory).free
    others = sum((reserved or {}).values())
    wanted = needed_bytes + max(int(needed_bytes * DISK_MARGIN), DISK_MARGIN_MIN)
    if needed_bytes and free - others < wanted:
        held = (
            f", of which {human_bytes(others)} is still to be written by downloads in progress ("
            + ", ".join(f"{label}: {human_bytes(n)}" for label, n in sorted((reserved or {}).items()))
            + ")"
            if others
            else ""
        )
        raise DownloadError(
            f"not enough free space in {directory}: {what} needs {human_bytes(needed_bytes)} "
            f"plus a margin of {human_bytes(wanted - needed_bytes)}, but only {human_bytes(free)} is free{held}"
        )


class Reservation:
    """Bytes a download in progress has still to write; kept current with ``update``."""

    def __init__(self, handle, label: str) -> None:
        self._handle, self.label = handle, label
        self._width = len(json.dumps(label)) + 80  # room for the rest of the entry at its longest

    def update(self, remaining_bytes: int) -> None:
        entry = json.dumps({"label": self.label, "bytes": max(int(remaining_bytes), 0), "pid": os.getpid()})
        self._handle.seek(0)
        self._handle.write(entry.ljust(self._width))  # one same-length write: a reader never sees it half done
        self._handle.flush()


DECLARATION_LIMIT = 4 << 20
"""The largest declarations file (cohorts, bundles) read: far beyond any real one, far below harm."""


def read_small(path: Path, limit: int, *, follow_links: bool = False) -> bytes:
    """The bytes of a small regular file, read without waiting on a FIFO or a device at ``path``
    and, unless ``follow_links`` (a declarations file a user or a Kubernetes ConfigMap links in),
    without following a link planted there: ``OSError`` when it is anything else, or larger than
    ``limit`` bytes."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", str(path))
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # grew while read
                raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


def _reservations(ledger: Path) -> dict[str, int]:
    """Live reservations in ``ledger`` (label -> bytes); removes those whose holder has died.
    Files are opened read-only (``flock`` needs no more), so other users' reservations count."""
    live: dict[str, int] = {}
    for path in ledger.glob("*.reservation"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # not an entry a download writes: ignored
                os.close(fd)
                continue
            with os.fdopen(fd, encoding="utf-8") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # its holder is alive
                    entry = json.loads(handle.read() or "{}")
                    label = entry.get("label", path.stem)
                    live[label] = live.get(label, 0) + int(entry.get("bytes", 0))
                    continue
                path.unlink(missing_ok=True)  # a holder that died without cleaning up
        except (OSError, ValueError):
            continue
    return live


@contextmanager
def space_reservation(directory: Path, ledger: Path, needed_bytes: int, label: str) -> Iterator[Reservation]:
    """Check free space in ``directory`` for ``needed_bytes``, counting what other downloads
    registered in ``ledger`` have still to write, and register this one until the block ends.

    Two downloads starting at once into one root would each see room for itself alone; the
    ledger (a folder of flocked files under the root, one per download in progress, shared by
    Dagster runs and CLI runs, and by hosts mounting the root) makes the second see the first.
    Downloads into another root on the same disk keep their own ledger and do not see these.
    A holder that dies releases its lock, and its file is cleaned up by the next."""
    try:
        ledger.mkdir(parents=True, exist_ok=True)
        guard = os.open(ledger / ".lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o664)
    except OSError as exc:
        raise DownloadError(f"cannot use the space ledger {ledger}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(guard).st_mode):  # a FIFO or a device planted there: never waited on
        os.close(guard)
        raise DownloadError(f"cannot use the space ledger {ledger}: its .lock is not a regular file; remove it")
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)  # one check-and-register at a time
        check_free_space(directory, needed_bytes, reserved=_reservations(ledger))
        try:
            fd, path = tempfile.mkstemp(dir=ledger, suffix=".reservation")
        except OSError as exc:
            raise DownloadError(f"cannot write to the space ledger {ledger}: {exc.strerror or exc}") from None
        os.fchmod(fd, 0o644)  # readable by every user downloading into this root (mkstemp makes 0600)
        handle = os.fdopen(fd, "w", encoding="utf-8")
        fcntl.flock(handle, fcntl.LOCK_EX)
        reservation = Reservation(handle, label)
        reservation.update(needed_bytes)
    finally:
        os.close(guard)
    try:
        yield reservation
    finally:
        os.unlink(path)
        handle.close()
