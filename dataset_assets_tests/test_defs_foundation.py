"""The Dagster layer: definitions load, partitions, materializations in process and from the CLI."""

import os
import subprocess
import sys

import dagster as dg
import pyarrow.parquet as pq
import pytest
from dagster_duckdb import DuckDBResource

from dataset_assets.core.index import source as idx
from dataset_assets.definitions import defs
from dataset_assets.defs.catalog.index_assets import idc_collections, idc_index
from dataset_assets.defs.downloads.manifest_assets import collection_manifest
from dataset_assets.lib.resources import IdcResource, S5cmdResource


@pytest.fixture
def resources(tmp_path):
    return {
        "idc": IdcResource(manifest_dir=str(tmp_path / "manifests"), download_dir=str(tmp_path / "idc")),
        "duckdb": DuckDBResource(database=str(tmp_path / "db" / "idc.duckdb")),
        "s5cmd": S5cmdResource(),  # the index's row check reads the allowed buckets from it
    }


def test_definitions_load_and_partitions_equal_index_collections():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"idc_index", "idc_collections", "collection_manifest"} <= keys
    manifest = graph.get(dg.AssetKey("collection_manifest"))
    with idx.IndexSource.installed().connect() as con:
        assert manifest.partitions_def.get_partition_keys() == idx.collection_ids(con)
    assert dg.AssetKey("idc_index") in manifest.parent_keys
    spec = defs.get_assets_def("idc_index").specs_by_key[dg.AssetKey("idc_index")]
    assert spec.owners and "duckdb" in spec.kinds and spec.description


def test_index_and_manifest_materialize_in_process(resources, tmp_path):
    result = dg.materialize([idc_index, idc_collections], resources=resources)
    assert result.success
    index_mat = result.asset_materializations_for_node("idc_index")[0]
    assert index_mat.metadata["series"].value == 1_044_191
    assert index_mat.metadata["idc_release"].value == "v25"
    assert index_mat.tags["dagster/data_version"] == "v25"
    coll_mat = result.asset_materializations_for_node("idc_collections")[0]
    assert coll_mat.metadata["collections"].value == 179
    rows = {r.data["collection_id"]: r.data for r in coll_mat.metadata["collections_table"].records}
    assert len(rows) == 179 and rows["qin_pet_phantom"]["collection_name"] == "QIN PET Phantom"
    assert coll_mat.metadata["dagster/table_name"].value == "idc.main.idc_collections"
    columns = {c.name: c for c in index_mat.metadata["dagster/column_schema"].schema.columns}
    assert columns["SeriesInstanceUID"].type == "string" and columns["instanceCount"].type == "int"
    assert "series" in (columns["SeriesInstanceUID"].description or "").lower()
    assert index_mat.metadata["dagster/table_name"].value == "idc.main.idc_index"
    with resources["duckdb"].get_connection() as con:
        assert con.execute("SELECT count(*) FROM idc_collections").fetchone()[0] == 179

    result = dg.materialize(
        [collection_manifest],
        resources=resources,
        partition_key="qin_pet_phantom",
        run_config={"ops": {"collection_manifest": {"config": {"modalities": ["PT"]}}}},
        selection=[collection_manifest],
    )
    assert result.success
    meta = result.asset_materializations_for_node("collection_manifest")[0].metadata
    assert meta["series"].value == 44 and meta["instances"].value == 2816 and meta["bytes"].value == 246_305_000
    assert meta["dagster/row_count"].value == 44
    assert meta["doi"].value == "https://doi.org/10.7937/k9/tcia.2015.zpukhckb"
    assert meta["idc_release"].value == "v25" and meta["manifest_config"].value["modalities"] == ["PT"]
    table = pq.read_table(tmp_path / "manifests" / "qin_pet_phantom.parquet")
    assert table.num_rows == 44 and "target_dir" in table.column_names
    assert meta["dagster/uri"].value == (tmp_path / "manifests" / "qin_pet_phantom.parquet").as_uri()
    manifest_columns = {c.name: c.type for c in meta["dagster/column_schema"].schema.columns}
    assert manifest_columns["instanceCount"] == "int" and manifest_columns["target_dir"] == "string"


def test_the_index_is_fresh_for_a_week_and_watched_downloads_for_two_days():
    from dataset_assets.lib.watched import build_watched_defs, with_watched_freshness

    spec = defs.resolve_assets_def("idc_index").specs_by_key[dg.AssetKey("idc_index")]
    assert spec.freshness_policy is not None and spec.freshness_policy.fail_window.to_timedelta().days == 9
    key = dg.AssetKey("downloaded_collection")
    assert defs.resolve_assets_def(key).specs_by_key[key].freshness_policy is None  # on demand: never stale
    declared = build_watched_defs(["nlst"], "0 3 * * *", 48, "t")
    watched = with_watched_freshness(
        dg.Definitions(assets=defs.assets, resources=defs.resources, metadata=declared.metadata)
    )
    policy = watched.resolve_assets_def(key).specs_by_key[key].freshness_policy
    assert policy.fail_window.to_timedelta().days == 2
    assert watched.resolve_assets_def("idc_index").specs_by_key[dg.AssetKey("idc_index")].freshness_policy == (
        spec.freshness_policy
    )


def test_bad_filter_fails_the_run_and_keeps_the_previous_manifest(resources, tmp_path):
    ok = dg.materialize([collection_manifest], resources=resources, partition_key="qin_pet_phantom")
    assert ok.success
    path = tmp_path / "manifests" / "qin_pet_phantom.parquet"
    before = path.read_bytes()
    bad = dg.materialize(
        [collection_manifest],
        resources=resources,
        partition_key="qin_pet_phantom",
        run_config={"ops": {"collection_manifest": {"config": {"modalities": ["XX"]}}}},
        raise_on_error=False,
    )
    assert not bad.success
    (failure,) = [e for e in bad.all_events if e.is_step_failure]
    assert "modalities=XX matches no series" in str(failure.step_failure_data.error)
    assert path.read_bytes() == before

    layout = dg.materialize(
        [collection_manifest],
        resources=resources,
        partition_key="qin_pet_phantom",
        raise_on_error=False,
        run_config={"ops": {"collection_manifest": {"config": {"layout": "%collection_id/%Nope"}}}},
    )
    (failure,) = [e for e in layout.all_events if e.is_step_failure]
    assert "unknown placeholder '%Nope'" in str(failure.step_failure_data.error)
    assert path.read_bytes() == before

    broken = tmp_path / "broken-index"
    broken.mkdir()
    (broken / "idc_index.parquet").write_bytes(b"not parquet")
    unreadable = dg.materialize(
        [collection_manifest],
        partition_key="qin_pet_phantom",
        raise_on_error=False,
        resources={**resources, "idc": IdcResource(index_dir=str(broken), manifest_dir=str(tmp_path / "manifests"))},
    )
    (failure,) = [e for e in unreadable.all_events if e.is_step_failure]
    assert "idc_index.parquet cannot be read as Parquet" in str(failure.step_failure_data.error)
    assert path.read_bytes() == before


def test_unknown_config_field_is_rejected(resources):
    with pytest.raises(dg.DagsterInvalidConfigError, match="modality"):
        dg.materialize(
            [collection_manifest],
            resources=resources,
            partition_key="qin_pet_phantom",
            run_config={"ops": {"collection_manifest": {"config": {"modality": ["PT"]}}}},
        )


def test_cli_materialize_with_empty_dagster_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "IDC_DUCKDB_PATH": str(tmp_path / "idc.duckdb"),
        "IDC_MANIFEST_DIR": str(tmp_path / "manifests"),
        "IDC_DOWNLOAD_DIR": str(tmp_path / "idc"),
    }
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    proc = subprocess.run(
        [
            dagster,
            "asset",
            "materialize",
            "-m",
            "dataset_assets.definitions",
            "--select",
            "idc_index,collection_manifest",
            "--partition",
            "qin_pet_phantom",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RUN_SUCCESS" in proc.stdout + proc.stderr
    assert pq.read_table(tmp_path / "manifests" / "qin_pet_phantom.parquet").num_rows == 44
    with dg.DagsterInstance.from_config(str(home)) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("collection_manifest"))
        assert event is not None and event.dagster_event.partition == "qin_pet_phantom"
