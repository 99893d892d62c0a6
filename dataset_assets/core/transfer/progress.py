"""Progress of an s5cmd transfer, fed by its ``--json`` output one line at a time.

Success lines (stdout) look like
``{"operation":"cp","success":true,"source":"s3://b/k","destination":"d/k","object":{"type":"file","size":8}}``;
failures (stderr) like ``{"operation":"cp","command":"cp s3://b/k d/k","error":"SlowDown: ... 503 ..."}``.
Only counters and a bounded sample of errors are kept.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dataset_assets.core.fmt import human_bytes, human_duration

#: Seconds with no file completing before a transfer is stopped as stalled (0: wait forever).
DEFAULT_STALL_TIMEOUT_S = 120.0


@dataclass
class Progress:
    """Counters of a transfer of ``total_files`` / ``total_bytes``."""

    total_files: int
    total_bytes: int
    done_files: int = 0
    done_bytes: int = 0
    failures: int = 0
    errors: deque = field(default_factory=lambda: deque(maxlen=20))
    started: float = field(default_factory=time.monotonic)
    #: Destination folder -> {file name: size} of every object s5cmd reported as copied (the
    #: per-file truth of series fetched whole); the download drops a folder once it is verified.
    copied: dict[str, dict[str, int]] = field(default_factory=dict)
    first_error: str | None = None
    retried: int = 0  # requests s5cmd retried (each failed once)
    disk_full: str | None = None  # the first "no space left on device" error
    not_found: set = field(default_factory=set)  # source URLs s5cmd found no object for
    last_success: float = field(default_factory=time.monotonic)
    on_copied: Callable[[str], None] | None = (
        None  # called with the destination of each copied object (from the reader thread)
    )
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def on_stdout(self, line: str) -> None:
        # One line per copied object (s5cmd's own format, see the module docstring); with
        # ``--log debug``, one ``{"error":"retryable error: ..."}`` line per retried request.
        if '"success":true' not in line:
            if '"retryable error' in line:
                record = parse_line(line) or {}
                with self._lock:
                    self.retried += 1
                    if self.first_error is None:
                        self.first_error = " ".join(str(record.get("error", line)).split())[:300]
            return
        record = parse_line(line) or {}
        size = (record.get("object") or {}).get("size")
        size = size if isinstance(size, int) and size >= 0 else 0
        destination = record.get("destination")
        with self._lock:
            self.done_files += 1
            self.done_bytes += size
            self.last_success = time.monotonic()
            if isinstance(destination, str):
                folder, _, name = destination.rpartition("/")
                self.copied.setdefault(os.path.normpath(folder), {})[name] = size
        if self.on_copied is not None and isinstance(destination, str):
            self.on_copied(destination)

    def on_stderr(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        record = parse_line(line)
        message = record.get("error") if record else line
        command = record.get("command", "") if record else ""
        if record is not None and "error" not in record:
            return
        text = f"{command}: {message}" if command else str(message)
        with self._lock:
            self.failures += 1
            self.errors.append(text)
            if self.first_error is None:
                self.first_error = text
            if self.disk_full is None and "no space left on device" in text.lower():
                self.disk_full = text
            if "no object found" in text:
                self.not_found.update(_S3_URL.findall(command))

    def take_copied(self, folder: str) -> dict[str, int]:
        """What s5cmd reported copying into ``folder`` (name -> size), forgotten here once taken."""
        with self._lock:
            return self.copied.pop(os.path.normpath(folder), {})

    def seconds_without_success(self) -> float:
        return time.monotonic() - self.last_success

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    def rate(self) -> float:
        """Bytes per second since the start."""
        return self.done_bytes / self.elapsed

    def eta(self) -> float | None:
        rate = self.rate()
        remaining = max(self.total_bytes - self.done_bytes, 0)
        return remaining / rate if rate > 0 else None

    def line(self) -> str:
        """One line for a log: files and bytes of total, MB/s, ETA, failures so far."""
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        return (
            f"{self.done_files:,}/{self.total_files:,} files, {human_bytes(self.done_bytes)}/"
            f"{human_bytes(self.total_bytes)} ({pct:.1f}%), {self.rate() / 1e6:.1f} MB/s, "
            f"ETA {human_duration(self.eta())}, {self.failures} failure(s)"
        )


_S3_URL = re.compile(r"s3://\S+")


def parse_line(line: str) -> dict | None:
    """One line of s5cmd's ``--json`` output as a dict (``None`` for anything else)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
