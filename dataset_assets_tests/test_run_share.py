"""Our share of every Dagster run: what the definitions import, and what is computed once per
release (the index's totals and row checks) instead of on every materialization."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataset_assets.defs.catalog.index_assets import idc_index
from dataset_assets.defs.catalog.index_checks import INDEX_CHECK_KEYS
from dataset_assets.lib.partitions import collection_ids_of
from dataset_assets.lib.resources import IdcResource, IndexDatabase, S5cmdResource

#: Packages a run of any asset must not pay for when the definitions load: the steps that need
#: them import them (Arrow, DuckDB, pandas, DICOM, HTTP, the index package's own import).
HEAVY = (
    "numpy", "pandas", "pyarrow", "duckdb", "dagster_duckdb", "pydicom", "requests", "urllib3", "idc_index_data",
    "tomlkit",  # Dagster's loader parses pyproject.toml with it; ours builds the tree from the defs package
)  # fmt: skip

#: The only modules of ours the definitions may load: declarations and light checks. The engine,
#: manifests, states, verification and the CLI load inside the steps that use them.
LIGHT = {
    "dataset_assets",
    "dataset_assets.settings",
    "dataset_assets.definitions",
    "dataset_assets.core",
    "dataset_assets.core.errors",
    "dataset_assets.core.fmt",
    "dataset_assets.core.fs",
    "dataset_assets.core.safety",
    "dataset_assets.core.urls",
    "dataset_assets.core.http",
    "dataset_assets.core.http.bundles",
    "dataset_assets.core.index",
    "dataset_assets.core.index.extra_index",
    "dataset_assets.core.index.source",
    "dataset_assets.core.select",
    "dataset_assets.core.select.cohort_file",
    "dataset_assets.core.select.filters",
    "dataset_assets.core.select.layout",
    "dataset_assets.core.select.shards",
    "dataset_assets.core.transfer",
    "dataset_assets.core.transfer.control",
    "dataset_assets.core.transfer.parent_death",
    "dataset_assets.core.transfer.progress",
    "dataset_assets.core.transfer.s5cmd",
}

LIST_MODULES = (
    "import json, sys\n"
    "import dataset_assets.definitions as d\n"
    "graph = d.defs.resolve_asset_graph()\n"
    "keys = graph.get(d.dg.AssetKey('downloaded_collection')).partitions_def.get_partition_keys()\n"
    "print(json.dumps({'modules': sorted(sys.modules), 'collections': len(keys)}))\n"
)


def load_definitions(env: dict) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", LIST_MODULES], capture_output=True, text=True, timeout=300, env=env, cwd=env["HOME"]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def clean_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDC_", "DATASET_", "DAGSTER_"))}
    env.update(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"))
    return env


def test_the_definitions_import_no_heavy_package_and_only_light_modules_of_ours(clean_env):
    cold = load_definitions(clean_env)  # the first load on a machine reads the index's collection ids once
    assert cold["collections"] == 179
    warm = load_definitions(clean_env)
    assert warm["collections"] == 179
    heavy = sorted(m for m in warm["modules"] if m.split(".")[0] in HEAVY)
    assert heavy == [], heavy
    ours = {m for m in warm["modules"] if m.split(".")[0] == "dataset_assets"}
    assert {
        m for m in ours if not m.startswith(("dataset_assets.defs", "dataset_assets.lib", "dataset_assets.components"))
    } <= LIGHT, sorted(ours - LIGHT)
    assert "pyarrow" in {m.split(".")[0] for m in cold["modules"]}  # the cold load did read the Parquet file


def test_collection_ids_are_cached_per_index_file_and_a_damaged_cache_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("DATASET_CACHE_DIR", str(tmp_path / "cache"))
    index = tmp_path / "idc_index.parquet"
    pq.write_table(pa.table({"collection_id": ["b", "a", "b", None]}), index)
    assert collection_ids_of(index) == ["a", "b"]
    (cache,) = (tmp_path / "cache").iterdir()
    cache.write_text('{"not": "a list"}')
    assert collection_ids_of(index) == ["a", "b"]  # damaged: read from the file again, and rewritten
    assert json.loads(cache.read_text()) == ["a", "b"]
    pq.write_table(pa.table({"collection_id": ["c"]}), index)  # another file (a new release): another entry
    assert collection_ids_of(index) == ["c"]
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_an_unwritable_cache_folder_costs_time_never_the_partitions(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("DATASET_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be created
    index = tmp_path / "idc_index.parquet"
    pq.write_table(pa.table({"collection_id": ["x"]}), index)
    assert collection_ids_of(index) == ["x"]


def _materialize(index_dir: Path, database: Path):
    resources = {
        "idc": IdcResource(index_dir=str(index_dir)),
        "duckdb": IndexDatabase(database=str(database)),
        "s5cmd": S5cmdResource(),
    }
    result = dg.materialize([idc_index], resources=resources, raise_on_error=False)
    return result, {e.check_name: e for e in result.get_asset_check_evaluations()}


def _facts_file(database: Path) -> Path:
    (found,) = (database.parent / f"{database.stem}_index_files").glob("*/idc_index.parquet.facts.json")
    return found


def _break_urls(path: Path) -> None:
    table = pq.read_table(path)
    urls = table.column("series_aws_url").to_pylist()
    urls[0] = None
    urls[1] = urls[1] + "\ncp s3://elsewhere/* /tmp/"
    column = table.column_names.index("series_aws_url")
    pq.write_table(table.set_column(column, "series_aws_url", pa.array(urls, pa.string())), path)


def test_the_release_facts_are_computed_once_and_a_tampered_result_or_snapshot_is_counted_again(idc_fixture, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(idc_fixture.index_dir, index)
    database = tmp_path / "db" / "idc.duckdb"
    result, checks = _materialize(index, database)
    assert result.success and all(c.passed for c in checks.values())
    facts = _facts_file(database)
    held = json.loads(facts.read_text())
    assert held["facts"]["summary"]["series"] == 6 and held["facts"]["problems"]["url_not_bucket_uuid"]["count"] == 0
    written = facts.stat().st_mtime_ns

    result, checks = _materialize(index, database)  # the same release again: the facts are read, not counted
    assert result.success and all(c.passed for c in checks.values())
    assert facts.stat().st_mtime_ns == written

    # The snapshot the views read is tampered with (two unsafe rows): counted again, the checks fail.
    snapshot = facts.parent / "idc_index.parquet"
    _break_urls(snapshot)
    with IndexDatabase(database=str(database)).get_connection() as con:
        from dataset_assets.core.index.source import index_facts

        assert index_facts(con)["problems"]["url_not_bucket_uuid"]["count"] == 2
    assert json.loads(facts.read_text())["facts"]["problems"]["url_not_bucket_uuid"]["count"] == 2

    # The cached result is edited to say all is well: its seal no longer matches, so it is counted again.
    held = json.loads(facts.read_text())
    held["facts"]["problems"]["url_not_bucket_uuid"] = {"count": 0, "examples": []}
    held["facts"]["problems"]["without_uuid_or_url"] = {"count": 0, "examples": []}
    facts.write_text(json.dumps(held))
    checks = _run_checks_only(index, database)
    assert not checks["idc_index_rows_are_safe"].passed
    assert checks["idc_index_rows_are_safe"].metadata["url_not_bucket_uuid"].value == 2
    assert not checks["idc_index_urls_present"].passed
    assert checks["idc_index_urls_present"].metadata["series_without_uuid_or_url"].value == 1

    facts.write_text("{not json")  # damaged: counted again, never a traceback
    checks = _run_checks_only(index, database)
    assert checks["idc_index_rows_are_safe"].metadata["url_not_bucket_uuid"].value == 2

    # Resealed by hand but of the wrong shape (the seal only catches accidents): counted again.
    from dataset_assets.core.index.source import _seal

    for damage in ({"problems": {}}, {"summary": {"series": "6"}}, {"buckets": {"idc-open-data": {"count": -1}}}):
        held = json.loads(facts.read_text())
        held["facts"].update(damage)
        held["seal"] = _seal(held["facts"], held["fingerprint"])
        facts.write_text(json.dumps(held))
        checks = _run_checks_only(index, database)
        assert checks["idc_index_rows_are_safe"].metadata["url_not_bucket_uuid"].value == 2, damage
        assert checks["idc_index_urls_present"].metadata["series_without_uuid_or_url"].value == 1, damage


def _run_checks_only(index: Path, database: Path) -> dict:
    resources = {
        "idc": IdcResource(index_dir=str(index)),
        "duckdb": IndexDatabase(database=str(database)),
        "s5cmd": S5cmdResource(),
    }
    result = dg.materialize(
        [idc_index],
        resources=resources,
        selection=dg.AssetSelection.checks(*INDEX_CHECK_KEYS),
        raise_on_error=False,
    )
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_a_new_index_file_is_a_new_snapshot_with_its_own_facts(idc_fixture, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(idc_fixture.index_dir, index)
    database = tmp_path / "db" / "idc.duckdb"
    _materialize(index, database)
    _break_urls(index / "idc_index.parquet")  # the package's file changes (an upgrade): a new snapshot
    result, checks = _materialize(index, database)
    assert not checks["idc_index_rows_are_safe"].passed and not checks["idc_index_urls_present"].passed
    assert len(list((database.parent / f"{database.stem}_index_files").glob("*/*.facts.json"))) == 2


def test_a_new_snapshot_of_the_same_file_takes_the_facts_counted_for_it_once(idc_fixture, tmp_path, monkeypatch):
    from dataset_assets.core.index import source as idx

    monkeypatch.setenv("DATASET_CACHE_DIR", str(tmp_path / "cache"))
    counted = []
    real = idx.index_summary  # the first count made: called whenever the facts are not taken from a cache
    monkeypatch.setattr(idx, "index_summary", lambda con: counted.append(1) or real(con))
    index = tmp_path / "index"
    shutil.copytree(idc_fixture.index_dir, index)
    result, checks = _materialize(index, tmp_path / "a" / "idc.duckdb")
    assert result.success and all(c.passed for c in checks.values()) and len(counted) == 1
    assert len(list((tmp_path / "cache").glob("idc_index-*.facts.json"))) == 1

    fresh = tmp_path / "b" / "idc.duckdb"  # another database (an empty home): a new snapshot, no count
    result, checks = _materialize(index, fresh)
    assert result.success and all(c.passed for c in checks.values()) and len(counted) == 1
    assert _facts_file(fresh).is_file()

    # A third snapshot whose bytes differ from the source's though its size and footer do not (an
    # edit inside a data page): the shared facts are not its own, so it is counted.
    third = tmp_path / "c" / "idc.duckdb"
    _materialize(index, third)
    assert len(counted) == 1
    snapshot = _facts_file(third).parent / "idc_index.parquet"
    _facts_file(third).unlink()
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 3] ^= 0x01
    snapshot.write_bytes(bytes(data))
    # (a flipped bit may make a page unreadable: what matters is that the shared facts were not trusted)
    with IndexDatabase(database=str(third)).get_connection() as con, contextlib.suppress(Exception):
        idx.index_facts(con, source=index / "idc_index.parquet", shared=tmp_path / "cache")
    assert len(counted) == 2


def test_a_fifo_or_link_planted_at_a_cache_file_is_never_waited_on_or_followed(idc_fixture, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("DATASET_CACHE_DIR", str(cache_dir))
    index = tmp_path / "idc_index.parquet"
    pq.write_table(pa.table({"collection_id": ["a"]}), index)
    assert collection_ids_of(index) == ["a"]
    (cache,) = cache_dir.iterdir()
    cache.unlink()
    os.mkfifo(cache)  # a read would wait for a writer forever: the code location would never load
    assert collection_ids_of(index) == ["a"]
    assert cache.is_file() and not cache.is_symlink()  # replaced by a regular file, not written through
    secret = tmp_path / "secret.json"
    secret.write_text('["planted"]')
    cache.unlink()
    cache.symlink_to(secret)
    assert collection_ids_of(index) == ["a"]  # a link is not read as the cache
    assert secret.read_text() == '["planted"]' and not cache.is_symlink()

    folder = tmp_path / "index"
    shutil.copytree(idc_fixture.index_dir, folder)
    database = tmp_path / "db" / "idc.duckdb"
    _materialize(folder, database)
    facts = _facts_file(database)
    facts.unlink()
    os.mkfifo(facts)
    result, checks = _materialize(folder, database)
    assert result.success and all(c.passed for c in checks.values())
    assert facts.is_file()


def test_checks_alone_on_a_database_that_never_held_the_index_say_so_in_one_line(idc_fixture, tmp_path):
    """The index's checks run alone (the UI's "Execute checks") read the database as it is: one that
    never held the index fails with one line naming it, and no empty database file is left."""
    database = tmp_path / "db" / "idc.duckdb"
    resources = {
        "idc": IdcResource(index_dir=str(idc_fixture.index_dir)),
        "duckdb": IndexDatabase(database=str(database)),
        "s5cmd": S5cmdResource(),
    }
    result = dg.materialize(
        [idc_index], resources=resources, selection=dg.AssetSelection.checks(*INDEX_CHECK_KEYS), raise_on_error=False
    )
    assert not result.success and not database.exists()
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.step_failure_data.error.message
    assert "never materialized" in message and str(database) in message and "Traceback" not in message
    database.parent.mkdir()
    import duckdb

    duckdb.connect(str(database)).close()  # a database of something else
    result = dg.materialize(
        [idc_index], resources=resources, selection=dg.AssetSelection.checks(*INDEX_CHECK_KEYS), raise_on_error=False
    )
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "never materialized" in failure.step_failure_data.error.message


def test_both_loaders_give_the_same_definitions_and_only_dagsters_adds_the_catalogue():
    """The defs package's own component tree (the default) and ``dg.load_from_defs_folder``
    (``DATASET_COMPONENT_CATALOGUE=1``) load the same assets, checks, jobs, schedules, sensors and
    resources; Dagster's adds the UI's catalogue of component types."""
    script = (
        "import json, dataset_assets.definitions as d\n"
        "r = d.defs.get_repository_def()\n"
        "print(json.dumps({'assets': sorted(k.to_user_string() for k in r.asset_graph.get_all_asset_keys()),\n"
        "  'checks': sorted(str(k) for k in r.asset_graph.asset_check_keys), 'jobs': sorted(r.job_names),\n"
        "  'schedules': sorted(s.name for s in r.schedule_defs), 'sensors': sorted(s.name for s in r.sensor_defs),\n"
        "  'resources': sorted(r.get_top_level_resources()), 'metadata': sorted((d.defs.metadata or {}))}))\n"
    )
    found = {}
    for value in ("", "1"):
        env = {**os.environ, "DATASET_COMPONENT_CATALOGUE": value}
        done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        found[value] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, dagsters = found[""], found["1"]
    assert ours.pop("metadata") == [] and dagsters.pop("metadata") == ["plugin_component_types_json"]
    assert ours == dagsters and "idc_index" in ours["assets"] and len(ours["checks"]) >= 10
