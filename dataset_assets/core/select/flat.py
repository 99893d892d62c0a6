"""The flat layout: every file of a selection in one folder (idc-index's ``dirTemplate=None``).

The engine verifies a series by comparing its directory's ``*.dcm`` files with the series'
objects, so series cannot share a directory there. A flat download therefore runs the engine on
a per-series staging layout (``<DEST>/.series/<crdc_series_uuid>/``, resumable and verified as
any other), then hard-links each verified file into ``<DEST>/`` (a copy where the file system
has no hard links). File names are ``<crdc_instance_uuid>.dcm``, unique across IDC, so no two
series' files can collide. A name already in ``<DEST>`` that is another file is left alone and
reported.
"""

from __future__ import annotations

import errno
import filecmp
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from dataset_assets.core.fs import new_file


def link_into(root: Path, relative_files: Iterable[str]) -> tuple[int, list[str]]:
    """Hard-link (or copy) each ``root/<relative file>`` to ``root/<its name>``; returns the number
    of files now in place and one problem per name that is taken by another file."""
    placed, problems = 0, []
    for relative in relative_files:
        source = root / relative
        target = root / source.name
        if os.path.lexists(target):
            regular = target.is_file() and not target.is_symlink()
            if regular and (os.path.samefile(source, target) or filecmp.cmp(source, target, shallow=False)):
                placed += 1  # this very file, or the same bytes (a folder another tool filled): taken over
                continue
            problems.append(f"{target} exists and is not the file of {relative}; left as it is")
            continue
        try:
            os.link(source, target)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            with open(source, "rb") as src, new_file(target) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        placed += 1
    return placed, problems
