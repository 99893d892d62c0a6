"""Instance configurations a team copies, and the executor switch."""

from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config, dagster_instance_config_schema

import dataset_assets
from dataset_assets.lib.executors import executor_from_env

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "dagster.yaml", *sorted((Path(dataset_assets.__file__).parent / "deploy").glob("*.yaml"))]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_instance_configs_load_as_dagster_loads_them(path, monkeypatch):
    """The schema, and the cross-field rules Dagster applies when an instance starts (e.g. run
    queue limits belong in `concurrency > runs`, not in the run coordinator's config)."""
    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(name, "5432" if name.endswith("PORT") else "x")
    config = yaml.safe_load(path.read_text())
    result = validate_config(dagster_instance_config_schema(), config)
    assert result.success, [e.message for e in result.errors or []]
    dagster_instance_config(str(path.parent), path.name)  # raises DagsterInvalidConfigError
    limits = config.get("concurrency", {}).get("runs", {}).get("tag_concurrency_limits") or config.get(
        "run_coordinator", {}
    ).get("config", {}).get("tag_concurrency_limits")
    assert any(limit["key"] == "idc/download" for limit in limits), "downloads must be bounded"


def test_local_instance_is_sqlite_under_dagster_home(tmp_path):
    (tmp_path / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert instance.run_coordinator.__class__.__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 2


def test_executor_switch(monkeypatch):
    monkeypatch.delenv("DAGSTER_EXECUTOR", raising=False)
    assert executor_from_env() is dg.in_process_executor
    monkeypatch.setenv("DAGSTER_EXECUTOR", "multiprocess")
    assert executor_from_env() is dg.multiprocess_executor


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("slurm", "DAGSTER_EXECUTOR='slurm' is not one of in_process, multiprocess, celery, k8s, docker"),
        ("k8s", "DAGSTER_EXECUTOR=k8s needs the dagster-k8s package: pip install dagster-k8s"),
    ],
)
def test_an_executor_that_cannot_be_used_fails_runs_not_the_code_location(monkeypatch, caplog, value, line):
    """A typo or a missing package is said in one line at load; the definitions load (the UI shows
    every asset) and a run fails at its start with that line, instead of running elsewhere."""
    monkeypatch.setenv("DAGSTER_EXECUTOR", value)
    with caplog.at_level("WARNING"):
        executor = executor_from_env()
    assert [r.getMessage() for r in caplog.records] == [f"{line}; every run will fail until it is set right"]

    assert executor.name == "unusable_executor"


def test_the_code_location_loads_with_an_executor_that_cannot_be_used_and_its_runs_fail(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "DAGSTER_EXECUTOR": "bogus", "DAGSTER_HOME": str(tmp_path)}
    env["IDC_DUCKDB_PATH"] = str(tmp_path / "i.duckdb")
    dagster = str(Path(sys.executable).parent / "dagster")
    line = "DAGSTER_EXECUTOR='bogus' is not one of in_process, multiprocess, celery, k8s, docker"
    loaded = subprocess.run(
        [dagster, "definitions", "validate", "-m", "dataset_assets.definitions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert f"{line}; every run will fail until it is set right" in loaded.stderr
    assert "Traceback" not in loaded.stderr
    run = subprocess.run(
        [dagster, "asset", "materialize", "-m", "dataset_assets.definitions", "--select", "idc_index"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert run.stderr.rstrip().splitlines()[-1].endswith(f"ExecutorSettingError: {line}")
    assert "STEP_START" not in run.stderr and not (tmp_path / "i.duckdb").exists()  # no step ran


@pytest.mark.parametrize("name", ["dagster.k8s.yaml", "dagster.docker.yaml"])
def test_run_containers_share_everything_a_later_run_reads(name):
    """Each run (or step) starts in a fresh container: downloads, manifests and the DuckDB index
    must all be on the shared volume, or the next run cannot find them."""
    text = (Path(dataset_assets.__file__).parent / "deploy" / name).read_text()
    for variable in ("IDC_DOWNLOAD_DIR=/data/", "IDC_MANIFEST_DIR=/data/", "IDC_DUCKDB_PATH=/data/"):
        assert variable in text, variable


@pytest.mark.parametrize("name", ["dagster.k8s.yaml", "dagster.docker.yaml"])
def test_runs_whose_worker_was_lost_are_retried(name, tmp_path, monkeypatch):
    """An evicted pod or a lost container fails its run; Dagster retries the run (a download then
    resumes from its journal), while a failed check or bad input is not retried."""
    for env in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(env, "5432" if env.endswith("PORT") else "x")
    path = Path(dataset_assets.__file__).parent / "deploy" / name
    config = dagster_instance_config(str(path.parent), path.name)[0]
    assert config["run_retries"]["enabled"] is True and config["run_retries"]["max_retries"] >= 1
    assert config["run_retries"]["retry_on_asset_or_op_failure"] is False
    assert config["run_monitoring"]["enabled"] is True
