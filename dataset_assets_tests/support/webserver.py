"""`dagster dev` (webserver + daemon + code server) on 127.0.0.1 for UI tests, torn down completely.

    home = dagster_home(tmp_path / "home")            # a fresh instance with the repo's dagster.yaml
    with DagsterDev(env={**os.environ, "DAGSTER_HOME": str(home)}, cwd=tmp_path) as ui:
        page.goto(ui.url + "/assets/idc_index")

* The server picks a free port, answers ``/server_info`` and has loaded the code location
  (``idc_index`` is in the asset graph) before ``__enter__`` returns; a start that takes longer
  than ``start_timeout_s`` or a code location that fails to load raises with the log's tail.
* ``dagster dev`` runs in its own session and process group. On exit the group gets SIGTERM,
  then SIGKILL after ``grace_s``; processes that left the group (run workers) are found by the
  unique ``DAGSTER_HOME`` in their environment and killed by pid. ``__exit__`` raises if any
  process of this server survives.
* It stops itself: after ``max_lifetime_s`` (a timer thread), and when the test process dies
  (``PR_SET_PDEATHSIG``), so a hung or killed test never leaves a server behind. SIGINT is reset
  to its default in the child: ``dagster dev`` maps SIGTERM to the SIGINT handler, and a test
  started from a background job inherits SIGINT ignored (then ``dagster dev`` ignores SIGTERM).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from dataset_assets_tests.support.envs import DAGSTER
from dataset_assets_tests.support.procs import processes_with_env
from dataset_assets_tests.support.s3server import free_port

REPO = Path(__file__).resolve().parents[2]
MODULE = "dataset_assets.definitions"

_READY_QUERY = """
query Ready($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) { __typename }
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
  }
}
"""


def dagster_home(path: Path) -> Path:
    """A fresh ``DAGSTER_HOME`` at ``path`` with the repository's ``dagster.yaml``."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", path / "dagster.yaml")
    return path


def graphql(url: str, query: str, variables: dict | None = None, timeout: float = 10) -> dict:
    """POST a GraphQL query to ``url`` (the server root) and return ``data``; raise on errors."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(url + "/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = json.loads(response.read())
    if payload.get("errors"):
        raise RuntimeError(f"GraphQL errors: {payload['errors']}")
    return payload["data"]


_LIBC = ctypes.CDLL(None, use_errno=True)
_PRCTL, _SIGNAL = _LIBC.prctl, _LIBC.signal  # looked up now: the child must not dlopen after fork
_SIGNAL.argtypes, _SIGNAL.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """Runs in the child between fork and exec (plain libc calls only).

    * SIGINT back to its default: a test run from a background job (``cmd &`` in a script, as CI
      runners and agents do) inherits SIGINT ignored, and ``dagster dev`` maps SIGTERM to the
      SIGINT handler, so it would ignore SIGTERM too.
    * ``PR_SET_PDEATHSIG``: if the test process dies (even by SIGKILL), ``dagster dev`` gets
      SIGTERM and shuts its webserver, daemon and code server down.
    """
    _SIGNAL(int(signal.SIGINT), 0)  # SIG_DFL
    _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class DagsterDev:
    """``dagster dev -m dataset_assets.definitions -h 127.0.0.1 -p <free port>`` as a context manager."""

    def __init__(
        self,
        env: dict,
        cwd: Path,
        *,
        module: str = MODULE,
        ready_asset: str = "idc_index",
        start_timeout_s: float = 150,
        grace_s: float = 8,
        max_lifetime_s: float = 900,
    ):
        if not env.get("DAGSTER_HOME"):
            raise ValueError("env must set DAGSTER_HOME (use dagster_home())")
        self.env, self.cwd, self.module, self.ready_asset = dict(env), Path(cwd), module, ready_asset
        self.home = self.env["DAGSTER_HOME"]
        self.start_timeout_s, self.grace_s, self.max_lifetime_s = start_timeout_s, grace_s, max_lifetime_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(self.home) / "dagster-dev.log"
        self.proc: subprocess.Popen | None = None
        self._timer: threading.Timer | None = None
        self._stop_lock = threading.Lock()
        self.startup_s: float | None = None
        self.stop_s: float | None = None  # set when stopped: seconds the teardown took

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> DagsterDev:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [DAGSTER, "dev", "-m", self.module, "-h", "127.0.0.1", "-p", str(self.port)],
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        try:
            self._wait_ready(started + self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        last = "nothing yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dagster dev exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/server_info", timeout=5) as response:
                    response.read()
                data = graphql(self.url, _READY_QUERY, {"key": {"path": [self.ready_asset]}})
            except (OSError, urllib.error.URLError, RuntimeError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.5)
                continue
            entries = data["workspaceOrError"].get("locationEntries") or []
            for entry in entries:
                error = entry.get("locationOrLoadError") or {}
                if error.get("__typename") == "PythonError":
                    raise RuntimeError(f"code location {entry['name']} failed to load: {error['message']}")
            if data["assetNodeOrError"]["__typename"] == "AssetNode":
                return
            last = f"asset {self.ready_asset}: {data['assetNodeOrError']['__typename']}, locations: " + ", ".join(
                f"{e['name']}={e['loadStatus']}" for e in entries
            )
            time.sleep(0.5)
        raise TimeoutError(
            f"dagster dev at {self.url} not ready after {self.start_timeout_s:.0f} s ({last})\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``, then kill stragglers by pid.
        Idempotent; raises ``RuntimeError`` if a process of this server is still alive."""
        with self._stop_lock:
            if self._timer is not None and self._timer is not threading.current_thread():
                self._timer.cancel()
            proc = self.proc
            if proc is None or self.stop_s is not None:
                return
            stopping = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.grace_s)
            # Children may still be shutting down after dagster dev itself has exited.
            deadline = time.monotonic() + self.grace_s
            while self._leftovers() and time.monotonic() < deadline:
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            for pid in processes_with_env("DAGSTER_HOME", self.home):  # e.g. run workers in their own group
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(timeout=10)
            deadline = time.monotonic() + 10
            while self._leftovers() and time.monotonic() < deadline:
                time.sleep(0.2)
            survivors = self._leftovers()
            self.stop_s = time.monotonic() - stopping
            if survivors:
                raise RuntimeError(f"processes of dagster dev survived: {survivors}")

    def _leftovers(self) -> list[int]:
        group = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == self.proc.pid:  # fields[2]: process group id
                group.append(int(entry.name))
        return sorted(set(group) | set(processes_with_env("DAGSTER_HOME", self.home)))

    # -- helpers -----------------------------------------------------------------------------
    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        return graphql(self.url, query, variables)
