"""Claims on series directories below one download root, so that downloads sharing the root (two
cohorts, overlapping shards, a cohort and its collection, on one host or several) never fetch one
series at the same time."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import time
from pathlib import Path

from dataset_assets.core.errors import DownloadError
from dataset_assets.core.transfer.control import DownloadRoot


class SeriesClaims:
    """Claims on series directories below one root, so that two downloads into it (two cohorts,
    two shards that overlap, a cohort and its collection, on one host or on several sharing the
    root) never fetch one series at the same time.

    A claim is a file ``claims/<sha1 of the directory>.claim`` made with O_EXCL, naming its
    holder: ``<pid> <process start time> <host>``. Each holder keeps a heartbeat file
    (``claims/holders/<host>-<pid>-<start>.alive``) whose mtime it refreshes while it works. A
    claim is live when its process is alive (same host: checked in /proc) or, for another host,
    when its heartbeat is younger than ``remote_stale_s``; a claim that is not live is taken over."""

    def __init__(self, root: Path, remote_stale_s: float = 600.0) -> None:
        self.folder = DownloadRoot(root).claims
        self.host = socket.gethostname() or "localhost"
        self.me = f"{process_identity(os.getpid())} {self.host}"
        self.heartbeat = self.folder / "holders" / f"{self.me.replace(' ', '-')}.alive"
        self.remote_stale_s = remote_stale_s
        self.held: list[Path] = []
        self._last_beat = 0.0

    def path_of(self, target_dir: str) -> Path:
        """The claim file of ``target_dir``."""
        return self.folder / (hashlib.sha1(target_dir.encode()).hexdigest() + ".claim")

    def _read(self, path: Path) -> str | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            return os.read(fd, 300).decode(errors="replace").strip() if stat.S_ISREG(os.fstat(fd).st_mode) else None
        finally:
            os.close(fd)

    def heartbeat_age(self, holder: str) -> float | None:
        """Seconds since ``holder`` last showed it is working (``None``: no heartbeat)."""
        try:
            return time.time() - os.stat(self.folder / "holders" / f"{holder.replace(' ', '-')}.alive").st_mtime
        except OSError:
            return None

    def holder(self, target_dir: str) -> str | None:
        """Who holds the claim on ``target_dir`` (``None``: nobody alive, or this download)."""
        text = self._read(self.path_of(target_dir))
        if not text or text == self.me:
            return None
        return text if self._alive(text) else None  # another host: its heartbeat says whether it still works

    def beat(self, every_s: float = 2.0) -> None:
        """Show that this download is working (called while it lists and transfers)."""
        now = time.monotonic()
        if now - self._last_beat >= every_s and self.held:
            self._last_beat = now
            with contextlib.suppress(OSError):
                os.utime(self.heartbeat)

    def claim(self, rows: list[dict]) -> dict[str, dict]:
        """Claim every series of ``rows``; returns ``target_dir -> row`` of those held by another
        live download (or that could not be claimed: they wait, never go unclaimed)."""
        if not rows:
            return {}
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.folder.is_symlink() or not self.folder.is_dir():
            raise DownloadError(f"the claims folder {self.folder} is a link or not a folder; remove it and run again")
        self.heartbeat.parent.mkdir(exist_ok=True)
        if not self.held:
            self.sweep()
        self.heartbeat.touch()
        deferred: dict[str, dict] = {}
        for row in rows:
            path = self.path_of(row["target_dir"])
            for _attempt in range(2):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                except FileExistsError:
                    if self.holder(row["target_dir"]) is None:  # stale: its holder is gone
                        try:
                            path.unlink()
                        except FileNotFoundError:  # another download took it over first
                            pass
                        except OSError as exc:  # a folder, or not ours to remove: never a wait without end
                            raise DownloadError(
                                f"the claim {path} of series {row.get('SeriesInstanceUID', row['target_dir'])} "
                                f"is not a claim file a download wrote and cannot be removed ({exc.strerror or exc}); "
                                "remove it and run again"
                            ) from None
                        continue
                    break
                except OSError as exc:
                    raise DownloadError(
                        f"cannot claim series in {self.folder} ({exc.strerror or exc}); every download into "
                        f"{self.folder.parent.parent} must be able to write there"
                    ) from None
                with os.fdopen(fd, "w") as handle:
                    handle.write(self.me)
                self.held.append(path)
                break
            if not self.held or self.held[-1] != path:
                deferred[row["target_dir"]] = row
        return deferred

    def sweep(self) -> int:
        """Remove the claims and heartbeats of downloads that are gone (killed with SIGKILL, an
        evicted pod): they were harmless (a dead holder's claim is taken over) but would pile up.
        Returns how many files were removed."""
        removed = 0
        for path in self.folder.glob("*.claim"):
            text = self._read(path)
            if text and text != self.me and not self._alive(text):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
        for path in (self.folder / "holders").glob("*.alive"):
            holder = _holder_of_heartbeat(path.name)
            if holder is not None and holder != self.me and not self._alive(holder):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
        return removed

    def _alive(self, text: str) -> bool:
        pid, _, rest = text.partition(" ")
        start, _, host = rest.partition(" ")
        if host == self.host or not host:
            return pid.isascii() and pid.isdigit() and process_identity(int(pid)) == f"{pid} {start}"
        age = self.heartbeat_age(text)
        return age is not None and age < self.remote_stale_s

    def release(self) -> None:
        for path in self.held:
            with contextlib.suppress(OSError):
                path.unlink()
        self.held = []
        with contextlib.suppress(OSError):
            self.heartbeat.unlink()


def _holder_of_heartbeat(name: str) -> str | None:
    """``"<pid> <start> <host>"`` from a heartbeat file name ``<pid>-<start>-<host>.alive``."""
    pid, _, rest = name.removesuffix(".alive").partition("-")
    start, _, host = rest.partition("-")
    return f"{pid} {start} {host}" if pid.isdigit() and start.isdigit() and host else None


def process_identity(pid: int) -> str | None:
    """``"<pid> <start time>"`` of a live process (the start time tells a reused pid apart)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return f"{pid} {fields[19]}" if fields[0] != "Z" else None
    except (OSError, IndexError):
        return None
