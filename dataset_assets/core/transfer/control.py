"""The download root's control folder, ``<root>/.dataset_assets/``: the one place that knows its
layout and keeps it safe. Downloads, checks and the Dagster layer ask ``DownloadRoot`` for every
path in it (states, header caches, locks, claims, the space ledger, set-aside series), and use
its locks and command files; nothing else spells a path below the control folder.

    state/<collection | cohort-<name> | selection-<hash>>.parquet (+ .journal, shards)
    headers/<state file name>       what the DICOM header check already read
    locks/<name>.lock               one download per state at a time
    claims/, claims/holders/        which download fetches which series (see SeriesClaims)
    reservations/                   the space ledger of downloads running into the root
    replaced/                       series a new release revised, set aside
    run-*.s5cmd, list-*.s5cmd       command files of running downloads (locked while in use)
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from dataset_assets.core.errors import BadDestinationError, DownloadError
from dataset_assets.core.safety import CONTROL_DIR, require_name

#: The folders of a root's control folder; each is made by a download, and never a link.
CONTROL_FOLDERS = (
    "",
    "state",
    "locks",
    "claims",
    "claims/holders",
    "reservations",
    "headers",
    "replaced",
    "previews",
)


def check_control(root: Path) -> None:
    """``BadDestinationError`` when the control folder, or a folder in it, is a link or not a
    folder: states, locks, claims and the space ledger are written there, never through a link."""
    for name in CONTROL_FOLDERS:
        path = root / CONTROL_DIR / name if name else root / CONTROL_DIR
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise BadDestinationError(f"{path} cannot be checked ({exc.strerror or exc})") from None
        if not stat.S_ISDIR(st.st_mode):
            raise BadDestinationError(
                f"{path} is a link or not a folder; the control folder holds only folders downloads make "
                "(nothing is written through a link): remove it and run again"
            )


@dataclass(frozen=True)
class DownloadRoot:
    """A download root and the paths of its control folder."""

    root: Path

    @property
    def control(self) -> Path:
        return self.root / CONTROL_DIR

    @property
    def state_dir(self) -> Path:
        return self.control / "state"

    def state_path(self, name: str) -> Path:
        """The state of a collection (its id), a cohort (``cohort-<name>``) or a selection."""
        return self.state_dir / f"{name}.parquet"

    def states(self) -> list[Path]:
        """Every state file below the root (shards' included), sorted."""
        return sorted(self.state_dir.glob("*.parquet"))

    @staticmethod
    def header_cache(state_path: Path) -> Path:
        """Where the header check remembers the files whose header matched, for a state."""
        return state_path.parent.parent / "headers" / state_path.name

    @property
    def locks(self) -> Path:
        return self.control / "locks"

    @property
    def claims(self) -> Path:
        return self.control / "claims"

    @property
    def reservations(self) -> Path:
        return self.control / "reservations"

    @property
    def replaced(self) -> Path:
        return self.control / "replaced"

    def previews(self, name: str) -> Path:
        """The preview thumbnails of a download named ``name``, made here as plain folders:
        ``BadDestinationError`` when one on the way is a link or not a folder."""
        folder = self.control
        for part in ("", "previews", name):  # one level at a time: never a folder made through a link
            folder = folder / part if part else folder
            with suppress(FileExistsError):
                folder.mkdir()
            if folder.is_symlink() or not folder.is_dir():
                raise BadDestinationError(
                    f"{folder} is a link or not a folder; previews are never written through a link"
                )
        return folder

    def check(self) -> None:
        check_control(self.root)


@contextmanager
def collection_locks(root: Path, collections: list[str]) -> Iterator[None]:
    """Hold an exclusive lock per name (a collection, or a cohort's state) below ``root`` for the
    whole download, so two runs (UI and schedule, CLI and Dagster) never write one at once; the
    second fails."""
    folder = DownloadRoot(root).locks
    folder.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        for collection_id in collections:
            path = folder / f"{require_name(collection_id, 'collection_id')}.lock"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
            except OSError as exc:
                raise DownloadError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise DownloadError(f"the lock file {path} is not a regular file; remove it and run again")
            handle = stack.enter_context(os.fdopen(fd, "r+"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = handle.read(200).strip() or "another process"
                if holder == f"pid {os.getpid()}":
                    holder = f"another download in this same process (pid {os.getpid()}, another thread)"
                raise DownloadError(
                    f"{_lock_label(collection_id)} is being downloaded into {root} by {holder}; "
                    "wait for it to finish (or stop it) and run again"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
        yield


def _lock_label(name: str) -> str:
    return name if name.startswith(("cohort-", "selection-")) else f"collection {name}"


def remove_stale_command_files(control: Path) -> list[str]:
    """Remove command files of downloads that died (a live one holds a lock on its file)."""
    removed = []
    unnamed = [  # made by a process killed before it named them: an hour old at least
        p for p in control.glob(".new-*.s5cmd") if p.is_file() and time.time() - p.stat().st_mtime > 3600
    ]
    for path in list(control.glob("run-*.s5cmd")) + list(control.glob("list-*.s5cmd")) + unnamed:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # not a command file we could have written
            os.close(fd)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # in use by a download that is running
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


@contextmanager
def command_file(control: Path, prefix: str) -> Iterator[tuple[Path, object]]:
    """A private command file (mode 0600) locked for as long as it exists (through a descriptor of
    its own: closing the written handle must not release the lock); removed afterwards."""
    # Made under a name the cleaner does not look at, locked, then renamed: it is never seen unlocked.
    fd, name = tempfile.mkstemp(dir=control, prefix=f".new-{prefix}-{os.getpid()}-", suffix=".s5cmd")
    lock = os.open(name, os.O_RDONLY | os.O_NOFOLLOW)
    path = Path(name).with_name(Path(name).name[len(".new-") :])
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.replace(name, path)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield path, handle
    finally:
        path.unlink(missing_ok=True)
        os.close(lock)
