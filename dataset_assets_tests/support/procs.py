"""Finding processes (Linux /proc), to prove none is left behind."""

import os
from collections.abc import Callable
from pathlib import Path


def live_processes(matches: Callable[[Path], bool]) -> list[int]:
    """PIDs of live (not zombie) processes, other than this one, for which ``matches(/proc/PID)``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and matches(entry):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    needle = text.encode()
    return live_processes(lambda proc: needle in (proc / "cmdline").read_bytes().replace(b"\0", b" "))


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has ``name=value``."""
    needle = f"{name}={value}".encode()
    return live_processes(lambda proc: needle in (proc / "environ").read_bytes().split(b"\0"))
