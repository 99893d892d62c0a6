"""Finding processes by their command line (Linux /proc), to prove none is left behind."""

import os
from pathlib import Path


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live (not zombie) processes whose command line contains ``text``, except this one."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found
