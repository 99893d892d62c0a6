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


def cli_download_in_flight(dest, env: dict, s3, fetched: int = 2):
    """``dataset idc download qin_pet_phantom DEST`` with one worker against a slowed loopback
    server, returned once it has fetched ``fetched`` objects (s5cmd is mid-download)."""
    import os
    import subprocess
    import sys
    import time

    s3.faults.delay_s = 0.5
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "dataset"),
            "idc",
            "download",
            "qin_pet_phantom",
            str(dest),
            "--workers",
            "1",
        ],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while len(s3.get_keys) < fetched and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    return proc
