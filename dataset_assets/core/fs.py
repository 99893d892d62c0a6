"""Destination checks shared by every downloader: writable, and room for what is coming."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import DownloadError
from .fmt import human_bytes

DISK_MARGIN = 0.02  # fraction of the needed bytes kept free on top of them
DISK_MARGIN_MIN = 64 * 1024 * 1024


def check_writable(directory: Path, what: str = "download root") -> None:
    """Create ``directory`` if needed and prove a file can be written there; else ``DownloadError``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DownloadError(f"{what} {directory} is not writable: {exc.strerror or exc}") from None


def check_free_space(directory: Path, needed_bytes: int, what: str = "the download") -> None:
    """``DownloadError`` unless ``directory`` has room for ``needed_bytes`` plus a margin."""
    free = shutil.disk_usage(directory).free
    wanted = needed_bytes + max(int(needed_bytes * DISK_MARGIN), DISK_MARGIN_MIN)
    if needed_bytes and free < wanted:
        raise DownloadError(
            f"not enough free space in {directory}: {what} needs {human_bytes(needed_bytes)} "
            f"plus a margin of {human_bytes(wanted - needed_bytes)}, but only {human_bytes(free)} is free"
        )
