"""The production instance: PostgreSQL storage, several partitions materializing in parallel."""

import os
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import pytest

import dataset_assets
from dataset_assets_tests.support.envs import DAGSTER, materialize_cmd
from dataset_assets_tests.support.postgres import pg_bin, postgres_server

POSTGRES_YAML = Path(dataset_assets.__file__).parent / "deploy" / "dagster.postgres.yaml"
PARTITIONS = ["qin_pet_phantom", "lung_phantom", "qiba_ct_liver_phantom", "pancreas_ct", "rider_pilot"]

pytestmark = pytest.mark.skipif(
    pg_bin() is None and not os.environ.get("CI"), reason="PostgreSQL not installed (.ci/run installs it)"
)


def test_parallel_partitions_on_postgres_lose_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(POSTGRES_YAML, home / "dagster.yaml")
    with postgres_server() as pg_env:
        env = {
            **os.environ,
            **pg_env,
            "DAGSTER_HOME": str(home),
            "IDC_MANIFEST_DIR": str(tmp_path / "manifests"),
            "IDC_DUCKDB_PATH": str(tmp_path / "idc.duckdb"),
        }
        # The deployment step the README names: create the schema once. Dagster creates its tables on
        # first connect, and first connects racing each other fail on "relation already exists".
        migrate = subprocess.run(
            [DAGSTER, "instance", "migrate"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr
        procs = [
            subprocess.Popen(
                materialize_cmd("collection_manifest", pk),
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for pk in PARTITIONS
        ]
        try:
            outputs = [p.communicate(timeout=400)[0] for p in procs]
        finally:
            for p in procs:  # nothing outlives the test, whatever happened
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for pk, proc, out in zip(PARTITIONS, procs, outputs, strict=False):
            assert proc.returncode == 0, f"{pk}: {out[-3000:]}"
        saved = {k: os.environ.get(k) for k in pg_env}
        os.environ.update(pg_env)
        try:
            with dg.DagsterInstance.from_config(str(home)) as instance:
                assert type(instance.run_storage).__name__ == "PostgresRunStorage"
                materialized = instance.get_materialized_partitions(dg.AssetKey("collection_manifest"))
                runs = instance.get_runs()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        assert materialized == set(PARTITIONS)
        assert len(runs) == len(PARTITIONS) and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert sorted(p.name for p in (tmp_path / "manifests").iterdir()) == sorted(
            f"{pk}.parquet" for pk in PARTITIONS
        )
