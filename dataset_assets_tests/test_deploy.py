"""Instance configurations a team copies, and the executor switch."""

from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config_schema

import dataset_assets
from dataset_assets.defs.executors import executor_from_env

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "dagster.yaml", *sorted((Path(dataset_assets.__file__).parent / "deploy").glob("*.yaml"))]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_instance_configs_match_dagsters_schema(path):
    config = yaml.safe_load(path.read_text())
    result = validate_config(dagster_instance_config_schema(), config)
    assert result.success, [e.message for e in result.errors or []]
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
    assert executor_from_env() is dg.multiprocess_executor
    monkeypatch.setenv("DAGSTER_EXECUTOR", "in_process")
    assert executor_from_env() is dg.in_process_executor
    monkeypatch.setenv("DAGSTER_EXECUTOR", "slurm")
    with pytest.raises(ValueError, match="'slurm' is not one of multiprocess, in_process, celery, k8s, docker"):
        executor_from_env()
    monkeypatch.setenv("DAGSTER_EXECUTOR", "k8s")
    with pytest.raises(ImportError, match="needs the dagster-k8s package"):
        executor_from_env()
