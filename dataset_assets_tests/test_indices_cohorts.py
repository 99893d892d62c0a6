"""On-demand indices, SQL over them, and cohorts as assets (issue 12), all on loopback servers."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster_duckdb import DuckDBResource

from dataset_assets import settings
from dataset_assets.core.errors import FilterError, IndexUnavailableError, UnknownIndexError
from dataset_assets.core.index import extra_index as extra
from dataset_assets.core.index.query import relation
from dataset_assets.core.index.source import IndexSource
from dataset_assets.core.select.cohort_file import CohortError, load_cohorts
from dataset_assets.core.select.cohorts import build_cohort_manifest, not_in_index
from dataset_assets_tests.support.fixture import build_fixture
from dataset_assets_tests.support.httpserver import FileServer
from dataset_assets_tests.support.s3server import LocalS3Server

BIN = Path(sys.executable).parent
VERSION = extra.package_version()
ARROW = {"STRING": pa.string(), "INTEGER": pa.int64(), "FLOAT": pa.float64(), "BOOLEAN": pa.bool_()}


def table_for(name: str, rows: int, series: list[str]) -> pa.Table:
    """A table with every column of the shipped schema of ``name`` (lists for REPEATED ones)."""
    columns = {}
    for column in extra.schema(name):
        kind = ARROW.get(column["type"].upper(), pa.string())
        if column["name"] == "SeriesInstanceUID":
            values = [series[i % len(series)] for i in range(rows)]
        elif kind == pa.string():
            values = [f"{column['name']}-{i}" for i in range(rows)]
        elif kind == pa.bool_():
            values = [i % 2 == 0 for i in range(rows)]
        else:
            values = [i * 1000 + 25_000 for i in range(rows)]
        if column.get("mode") == "REPEATED":
            columns[column["name"]] = pa.array([[v] for v in values], pa.list_(kind))
        else:
            columns[column["name"]] = pa.array(values, kind)
    return pa.table(columns)


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


@pytest.fixture
def index_server(idc_fixture, tmp_path, monkeypatch):
    series = [r["SeriesInstanceUID"] for r in idc_fixture.rows]
    with FileServer(max_lifetime_s=300) as server:
        for name, rows in (("sm_index", 6), ("sm_instance_index", 40)):
            server.files[f"/{VERSION}/{name}.parquet"] = parquet_bytes(table_for(name, rows, series))
        monkeypatch.setenv("IDC_INDEX_BASE_URL", server.url(""))
        monkeypatch.setenv("IDC_EXTRA_INDEX_DIR", str(tmp_path / "indices"))
        monkeypatch.setenv("IDC_INDEX_DIR", str(idc_fixture.index_dir))
        yield server


def cli(*args):
    return subprocess.run(
        [str(BIN / "dataset"), "idc", *args], capture_output=True, text=True, timeout=120, env={**os.environ}
    )


def test_fetch_survives_a_cut_body_and_a_503_and_query_joins_it(index_server):
    index_server.fail_next(1, 503)
    index_server.truncate_next(1, 0.4)
    fetched = cli("fetch", "sm_index", "sm_instance_index")
    assert fetched.returncode == 0, fetched.stderr
    assert "sm_index: 6 rows" in fetched.stdout and "sm_instance_index: 40 rows" in fetched.stdout
    assert extra.local_path(settings.index_store(), "sm_instance_index") is not None
    listed = cli("indices", "--json")
    rows = {r["index"]: r for r in json.loads(listed.stdout)}
    assert rows["sm_index"]["rows"] == 6 and rows["sm_index"]["availability"].startswith("fetched")
    joined = cli(
        "query",
        "SELECT i.collection_id, count(*) AS n FROM idc_index i JOIN sm_instance_index s "
        "USING (SeriesInstanceUID) GROUP BY 1",
        "--format",
        "json",
    )
    assert joined.returncode == 0, joined.stderr
    assert json.loads(joined.stdout) == [{"collection_id": "qin_pet_phantom", "n": 40}]
    again = cli("fetch", "sm_index")
    assert "already here" in again.stdout


def test_query_formats_and_errors(index_server, tmp_path):
    out = tmp_path / "q.parquet"
    done = cli(
        "query", "SELECT SeriesInstanceUID, instanceCount FROM idc_index", "--format", "parquet", "--output", str(out)
    )
    assert done.returncode == 0 and pq.read_table(out).num_rows == 6
    csv = cli("query", "SELECT collection_id FROM idc_index LIMIT 2", "--format", "csv")
    assert csv.stdout.splitlines() == ["collection_id", "qin_pet_phantom", "qin_pet_phantom"]
    missing = cli("query", "SELECT * FROM sm_index")
    assert missing.returncode == 2 and "dataset idc fetch sm_index" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    device = cli("query", "SELECT 1", "--format", "parquet", "--output", "/dev/null")
    assert device.returncode == 2 and "is not a regular file" in device.stderr
    assert Path("/dev/null").is_char_device()
    twice = cli("query", "SELECT collection_id, collection_id FROM idc_index", "--format", "csv")
    assert twice.returncode == 2 and "twice; give them aliases" in twice.stderr
    many = cli("query", "SELECT range AS n FROM range(200000)", "--format", "csv")
    assert many.returncode == 0 and len(many.stdout.splitlines()) == 200_001
    broken = cli("query", "SELEC 1")
    assert (
        broken.returncode == 2 and broken.stderr.startswith("Error: query failed") and "Traceback" not in broken.stderr
    )


def test_a_file_whose_schema_differs_is_refused_and_not_kept(index_server):
    bad = table_for("sm_index", 3, ["x"]).drop_columns(["ObjectiveLensPower"])
    index_server.files[f"/{VERSION}/sm_index.parquet"] = parquet_bytes(bad)
    with pytest.raises(IndexUnavailableError, match="ObjectiveLensPower missing"):
        extra.fetch(settings.index_store(), "sm_index")
    assert extra.local_path(settings.index_store(), "sm_index") is None
    wrong = table_for("sm_index", 3, ["x"]).set_column(
        [c["name"] for c in extra.schema("sm_index")].index("max_TotalPixelMatrixColumns"),
        "max_TotalPixelMatrixColumns",
        pa.array(["a", "b", "c"]),
    )
    index_server.files[f"/{VERSION}/sm_index.parquet"] = parquet_bytes(wrong)
    with pytest.raises(IndexUnavailableError, match="max_TotalPixelMatrixColumns is VARCHAR, expected INTEGER"):
        extra.fetch(settings.index_store(), "sm_index")
    with pytest.raises(UnknownIndexError, match="bundled with idc-index-data"):
        extra.fetch(settings.index_store(), "idc_index")


def test_the_extra_index_asset_loads_a_view_into_duckdb(index_server, idc_fixture, tmp_path):
    from dataset_assets.defs.catalog.extra_index_assets import idc_extra_index
    from dataset_assets.lib.resources import IdcResource

    database = tmp_path / "idc.duckdb"
    result = dg.materialize(
        [idc_extra_index],
        partition_key="sm_index",
        resources={
            "idc": IdcResource(index_dir=str(idc_fixture.index_dir)),
            "duckdb": DuckDBResource(database=str(database)),
        },
    )
    materialization = result.asset_materializations_for_node("idc_extra_index")[0]
    assert materialization.metadata["dagster/row_count"].value == 6
    with duckdb.connect(str(database), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM sm_index").fetchone() == (6,)


# -- Cohorts ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_collections(tmp_path_factory):
    """A fixture release with two real collections (4 + 3 series) and their S3 tree."""
    base = tmp_path_factory.mktemp("two")
    a = build_fixture(base / "a", "qin_pet_phantom", n_series=4, files_per_series=3)
    b = build_fixture(base / "b", "nsclc_radiomics_interobserver1", n_series=3, files_per_series=2)
    index = base / "index"
    shutil.copytree(a.index_dir, index)
    merged = pa.concat_tables(
        [pq.read_table(a.index_dir / "idc_index.parquet"), pq.read_table(b.index_dir / "idc_index.parquet")]
    )
    pq.write_table(merged, index / "idc_index.parquet")
    s3 = base / "s3"
    shutil.copytree(a.s3_root, s3)
    shutil.copytree(b.s3_root, s3, dirs_exist_ok=True)
    return index, s3, a.rows + b.rows


def write_cohorts(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_cohort_definitions_that_cannot_work_are_one_line(tmp_path, two_collections):
    index, _, _ = two_collections
    cases = {
        "cohorts: [{name: '../x', sql: 'SELECT 1'}]": "cannot be used as a file name",
        "cohorts: [{name: a, sql: 'SELECT 1'}, {name: a, sql: 'SELECT 2'}]": "used twice",
        "cohorts: [{name: a}]": "exactly one of `sql` or `collection_id`",
        "cohorts: [{name: a, collection_id: 123}]": "`collection_id` must be a collection id",
        "cohorts: [{name: a, sql: 'x', modalities: [CT]}]": "go with `collection_id`",
        "cohorts: {name: a": "not valid YAML",
        "nothing: 1": "top-level list `cohorts:`",
    }
    for text, message in cases.items():
        with pytest.raises(CohortError, match=message.replace("(", r"\(").replace("`", "`")):
            load_cohorts(write_cohorts(tmp_path / "c.yaml", text))
    cohorts = load_cohorts(
        write_cohorts(
            tmp_path / "c.yaml",
            """
cohorts:
  - {name: no_series, sql: "SELECT collection_id FROM idc_index"}
  - {name: syntax, sql: "SELEC x"}
  - {name: unknown, sql: "SELECT SeriesInstanceUID FROM sm_index"}
  - {name: nothing, sql: "SELECT SeriesInstanceUID FROM idc_index WHERE false"}
  - {name: number, sql: "SELECT 1 AS SeriesInstanceUID"}
  - name: commented
    sql: |
      SELECT SeriesInstanceUID FROM idc_index LIMIT 2 -- two series
  - {name: partly, sql: "SELECT '1.2.3.4' AS SeriesInstanceUID UNION ALL SELECT SeriesInstanceUID FROM idc_index"}
""",
        )
    )
    with IndexSource(index).connect() as con:
        with pytest.raises(CohortError, match="returns no series column .*it returns collection_id"):
            build_cohort_manifest(con, cohorts["no_series"])
        with pytest.raises(CohortError, match="cohort syntax: its SQL failed: Parser Error"):
            build_cohort_manifest(con, cohorts["syntax"])
        with pytest.raises(UnknownIndexError, match="dataset idc fetch sm_index"):
            build_cohort_manifest(con, cohorts["unknown"])
        with pytest.raises(FilterError, match="selects no series"):
            build_cohort_manifest(con, cohorts["nothing"])
        with pytest.raises(FilterError, match="selects no series"):
            build_cohort_manifest(con, cohorts["number"])  # a number is no series UID: one line, not a traceback
        assert build_cohort_manifest(con, cohorts["commented"]).num_rows == 2
        partly = build_cohort_manifest(con, cohorts["partly"])
        assert partly.num_rows == 7 and not_in_index(partly) == 1
        with pytest.raises(UnknownIndexError):
            relation(con, "SELECT * FROM nowhere")


def _env(tmp_path: Path, index: Path, endpoint: str, cohorts: Path, home: str) -> dict:
    (tmp_path / home).mkdir(exist_ok=True)
    return {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / home),
        "IDC_INDEX_DIR": str(index),
        "IDC_MANIFEST_DIR": str(tmp_path / "manifests"),
        "IDC_DOWNLOAD_DIR": str(tmp_path / "idc"),
        "IDC_S3_ENDPOINT_URL": endpoint,
        "IDC_DUCKDB_PATH": str(tmp_path / f"{home}.duckdb"),
        "IDC_COHORTS_FILE": str(cohorts),
        "IDC_EXTRA_INDEX_DIR": str(tmp_path / "indices"),
    }


def _materialize(env: dict, cohort: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            str(BIN / "dagster"),
            "asset",
            "materialize",
            "-m",
            "dataset_assets.definitions",
            "--select",
            "cohort_manifest,downloaded_cohort",
            "--partition",
            cohort,
        ],
        env=env,
        cwd=env["DAGSTER_HOME"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_cohort_across_two_collections_materializes_and_verifies(tmp_path, two_collections):
    index, s3_root, rows = two_collections
    cohorts = write_cohorts(
        tmp_path / "cohorts.yaml",
        """
cohorts:
  - name: mixed
    sql: >
      SELECT SeriesInstanceUID FROM idc_index
      WHERE collection_id = 'nsclc_radiomics_interobserver1' OR SeriesInstanceUID IN (
        SELECT min(SeriesInstanceUID) FROM idc_index WHERE collection_id = 'qin_pet_phantom')
""",
    )
    with LocalS3Server(s3_root, max_lifetime_s=300) as server:
        proc = _materialize(_env(tmp_path, index, server.endpoint_url, cohorts, "home"), "mixed")
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
        assert server.stats["get_object"] == 3 * 2 + 3
    for check in ("files_match_manifest", "dicom_headers_match_manifest", "no_stray_files"):
        assert f"Asset check '{check}' on 'downloaded_cohort' passed" in out
    # nsclc_radiomics_interobserver1 is CC BY-NC 3.0: the licence check warns, naming it.
    assert "Asset check 'licences_allow_any_use' on 'downloaded_cohort' did not pass" in out, out[-3000:]
    files = list((tmp_path / "idc").rglob("*.dcm"))
    assert len(files) == 9
    assert {p.relative_to(tmp_path / "idc").parts[0] for p in files} == {
        "qin_pet_phantom",
        "nsclc_radiomics_interobserver1",
    }


def test_a_bad_cohorts_file_fails_only_the_cohort_assets(tmp_path, two_collections):
    index, _, _ = two_collections
    cohorts = write_cohorts(tmp_path / "bad.yaml", "cohorts: [{name: a, sql: [1, 2]}]")
    env = _env(tmp_path, index, "http://127.0.0.1:9", cohorts, "home")
    probe = (
        "import dataset_assets.definitions as d; "
        "print(sorted(k.to_user_string() for k in d.defs.resolve_all_asset_keys()))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "downloaded_collection" in done.stdout and "cohort_manifest" in done.stdout
    assert (
        "cohort assets have no partitions: cohorts file" in done.stderr
        and "`sql` must be a non-empty query" in done.stderr
    )


def test_two_shards_in_parallel_processes_make_the_whole_collection(tmp_path, two_collections):
    index, s3_root, rows = two_collections
    cohorts = write_cohorts(
        tmp_path / "shards.yaml",
        """
cohorts:
  - name: shard_0
    sql: >
      SELECT crdc_series_uuid FROM idc_index
      WHERE collection_id = 'qin_pet_phantom' AND hash(crdc_series_uuid) % 2 = 0
  - name: shard_1
    sql: >
      SELECT crdc_series_uuid FROM idc_index
      WHERE collection_id = 'qin_pet_phantom' AND hash(crdc_series_uuid) % 2 = 1
  - {name: overlap, collection_id: qin_pet_phantom}
""",
    )
    with LocalS3Server(s3_root, max_lifetime_s=300) as server:
        server.faults.delay_s = 0.2  # both runs are in flight together
        procs = [
            _materialize(_env(tmp_path, index, server.endpoint_url, cohorts, f"home{i}"), f"shard_{i}")
            for i in range(2)
        ]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
        assert server.stats["get_object"] == 12  # every object once
        # An overlapping cohort (the whole collection) afterwards: nothing is fetched again.
        server.reset_stats()
        proc = _materialize(_env(tmp_path, index, server.endpoint_url, cohorts, "home2"), "overlap")
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        assert server.stats["get_object"] == 0
    qin = [r for r in rows if r["collection_id"] == "qin_pet_phantom"]
    got = {p.name: p.read_bytes() for p in (tmp_path / "idc").rglob("*.dcm")}
    want = {}
    for row in qin:
        for path in (s3_root / row["aws_bucket"] / row["crdc_series_uuid"]).iterdir():
            want[path.name] = path.read_bytes()
    assert got == want  # the union of the shards is the collection, byte for byte


def test_overlapping_cohorts_in_parallel_fetch_each_series_once(tmp_path, two_collections):
    index, s3_root, _ = two_collections
    cohorts = write_cohorts(
        tmp_path / "overlap.yaml",
        """
cohorts:
  - {name: all_qin, collection_id: qin_pet_phantom}
  - {name: some_qin, sql: "SELECT SeriesInstanceUID FROM idc_index WHERE collection_id = 'qin_pet_phantom' LIMIT 2"}
""",
    )
    with LocalS3Server(s3_root, max_lifetime_s=300) as server:
        server.faults.delay_s = 0.3
        procs = [
            _materialize(_env(tmp_path, index, server.endpoint_url, cohorts, f"h{i}"), name)
            for i, name in enumerate(("all_qin", "some_qin"))
        ]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
        assert any("being fetched by another download" in out for out in outs), "the runs did not overlap"
        keys = server.get_keys
        assert len(keys) == len(set(keys)) == 12  # no object fetched twice
