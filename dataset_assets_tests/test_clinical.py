"""Clinical tables: fetched with clinical_index (as idc-index fetches them) by our s5cmd runner
from the configured endpoint (a loopback S3 server here), checked against clinical_index, views
in `dataset idc query` and cohort SQL, listed by `dataset idc clinical`, and an asset."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataset_assets.core.index import extra_index as extra
from dataset_assets_tests.support.httpserver import FileServer
from dataset_assets_tests.support.s3server import LocalS3Server

BIN = Path(sys.executable).parent
VERSION = extra.package_version()
PREFIX = "idc-open-metadata/bigquery_export/idc_v25_clinical"
COLUMNS = {
    "qin_pet_phantom_clinical": ["dicom_patient_id", "age_at_diagnosis"],
    "other_clinical": ["dicom_patient_id", "stage"],
}


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _clinical_index() -> pa.Table:
    rows = [
        {"collection_id": t.removesuffix("_clinical"), "table_name": f"bigquery-public-data.idc_v25_clinical.{t}",
         "short_table_name": t, "column": c, "column_label": c.replace("_", " "),
         "values": [{"option_code": "x", "option_description": "y"}]}
        for t, columns in COLUMNS.items() for c in columns
    ]  # fmt: skip
    return pa.Table.from_pylist(rows)


@pytest.fixture
def clinical_env(idc_fixture, tmp_path):
    patients = sorted({r["PatientID"] for r in idc_fixture.rows})
    root = tmp_path / "s3"
    folder = root / PREFIX
    (folder / "qin_pet_phantom_clinical").mkdir(parents=True)
    pq.write_table(
        pa.table({"dicom_patient_id": patients, "age_at_diagnosis": [60 + i for i in range(len(patients))]}),
        folder / "qin_pet_phantom_clinical" / "000000000000.parquet",
    )
    pq.write_table(pa.table({"dicom_patient_id": ["p1"], "stage": ["II"]}), folder / "other_clinical.parquet")
    pq.write_table(pa.table({"note": ["undescribed"]}), folder / "notes_clinical.parquet")
    with FileServer(max_lifetime_s=300) as http, LocalS3Server(root, max_lifetime_s=300) as s3:
        http.files[f"/{VERSION}/clinical_index.parquet"] = _parquet(_clinical_index())
        env = {
            **os.environ,
            "IDC_INDEX_BASE_URL": http.url(""),
            "IDC_EXTRA_INDEX_DIR": str(tmp_path / "indices"),
            "IDC_INDEX_DIR": str(idc_fixture.index_dir),
            "IDC_S3_ENDPOINT_URL": s3.endpoint_url,
        }
        yield env, s3, folder, patients, http


def cli(env, *args):
    return subprocess.run([str(BIN / "dataset"), "idc", *args], capture_output=True, text=True, timeout=120, env=env)


def test_fetching_clinical_index_brings_its_tables_and_they_join_to_series(clinical_env, idc_fixture):
    env, s3, _folder, patients, _http = clinical_env
    done = cli(env, "fetch", "clinical_index")
    assert done.returncode == 0, done.stderr
    assert "clinical tables: 2 (" in done.stdout
    assert "left out 1 listed table(s) clinical_index does not describe: notes_clinical" in done.stderr
    listed = cli(env, "clinical")
    assert listed.returncode == 0 and "qin_pet_phantom_clinical" in listed.stdout and "other_clinical" in listed.stdout
    columns = json.loads(cli(env, "clinical", "qin_pet_phantom_clinical", "--json").stdout)
    assert [c["column"] for c in columns] == sorted(COLUMNS["qin_pet_phantom_clinical"]) and columns[0]["fetched"]
    joined = cli(
        env, "query",
        "SELECT c.age_at_diagnosis AS age, count(*) AS series FROM idc_index i "
        "JOIN qin_pet_phantom_clinical c ON c.dicom_patient_id = i.PatientID GROUP BY 1 ORDER BY 1",
        "--format", "json",
    )  # fmt: skip
    assert joined.returncode == 0, joined.stderr
    per_patient = {p: sum(r["PatientID"] == p for r in idc_fixture.rows) for p in patients}
    assert json.loads(joined.stdout) == [{"age": 60 + i, "series": per_patient[p]} for i, p in enumerate(patients)]
    # In cohort SQL too: the series of the youngest patient (the fixture may have just one).
    from dataset_assets import settings
    from dataset_assets.core.index.source import IndexSource
    from dataset_assets.core.select.cohort_file import cohorts_from_entries
    from dataset_assets.core.select.cohorts import build_cohort_manifest

    (cohort,) = cohorts_from_entries(
        [{"name": "older", "sql": "SELECT SeriesInstanceUID FROM idc_index i JOIN qin_pet_phantom_clinical c "
          "ON c.dicom_patient_id = i.PatientID WHERE c.age_at_diagnosis = 60"}], "test"
    ).values()  # fmt: skip
    os.environ.update({k: env[k] for k in ("IDC_EXTRA_INDEX_DIR", "IDC_INDEX_BASE_URL")})
    try:
        with extra.connect_all(IndexSource(idc_fixture.index_dir), settings.index_store()) as con:
            table = build_cohort_manifest(con, cohort)
    finally:
        for k in ("IDC_EXTRA_INDEX_DIR", "IDC_INDEX_BASE_URL"):
            os.environ.pop(k, None)
    assert table.num_rows == per_patient[patients[0]] and set(table.column("PatientID").to_pylist()) == {patients[0]}


@pytest.mark.parametrize("damage", ["missing table", "missing column", "listing lies", "hostile name"])
def test_tables_that_do_not_match_clinical_index_are_refused_in_one_line_and_nothing_is_kept(clinical_env, damage):
    env, s3, folder, _patients, _http = clinical_env
    if damage == "missing table":
        (folder / "other_clinical.parquet").unlink()
        expected = "clinical_index names 1 table(s) the endpoint does not list below bigquery_export/idc_v25_clinical/"
    elif damage == "missing column":
        pq.write_table(pa.table({"dicom_patient_id": ["p1"]}), folder / "other_clinical.parquet")
        expected = "clinical table other_clinical lacks 1 column(s) clinical_index gives it (e.g. stage)"
    elif damage == "listing lies":
        s3.faults.lie_size_keys(lambda key: key.endswith("other_clinical.parquet"), 7)
        expected = "clinical table other_clinical: other_clinical.parquet is "
    else:
        s3.plant("idc-open-metadata", "bigquery_export/idc_v25_clinical/../../escape.parquet", b"x")
        expected = "the endpoint lists '../../escape.parquet' below bigquery_export/idc_v25_clinical/, which is not"
    done = cli(env, "fetch", "clinical_index")
    assert done.returncode in (2, 3) and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    clinical = Path(env["IDC_EXTRA_INDEX_DIR"]) / VERSION / "clinical"
    assert not clinical.exists() and not list(clinical.parent.glob(".clinical-incoming-*"))
    assert not list(Path(env["IDC_EXTRA_INDEX_DIR"]).rglob("escape*"))


def test_the_clinical_tables_asset(clinical_env, monkeypatch):
    from dataset_assets.defs.catalog.extra_index_assets import idc_clinical_tables
    from dataset_assets.lib.resources import IdcResource, S5cmdResource

    env, s3, _folder, _patients, _http = clinical_env
    for key in ("IDC_INDEX_BASE_URL", "IDC_EXTRA_INDEX_DIR", "IDC_INDEX_DIR"):
        monkeypatch.setenv(key, env[key])
    result = dg.materialize(
        [idc_clinical_tables],
        resources={
            "idc": IdcResource(index_dir=env["IDC_INDEX_DIR"]),
            "s5cmd": S5cmdResource(endpoint_url=s3.endpoint_url),
        },
    )
    assert result.success
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["tables"].value == 2 and metadata["left_out"].value == "notes_clinical"
    assert {r.data["table"]: r.data["rows"] for r in metadata["rows_per_table"].value.records}["other_clinical"] == 1


@pytest.mark.parametrize("name", ["idc_index", "clinical_index", "select", "order"])
def test_a_clinical_table_never_replaces_an_index_and_a_keyword_stays_a_name(clinical_env, idc_fixture, name):
    env, _s3, folder, _patients, http = clinical_env
    described = _clinical_index().to_pylist()
    described += [{**described[-1], "short_table_name": name, "column": c} for c in ("dicom_patient_id", "stage")]
    http.files[f"/{VERSION}/clinical_index.parquet"] = _parquet(pa.Table.from_pylist(described))
    pq.write_table(pa.table({"dicom_patient_id": ["ATTACKER"], "stage": ["x"]}), folder / f"{name}.parquet")
    done = cli(env, "fetch", "clinical_index")
    assert done.returncode == 0, done.stderr
    series = cli(env, "query", "SELECT count(*) AS n FROM idc_index", "--format", "json")
    assert series.returncode == 0 and json.loads(series.stdout) == [{"n": len(idc_fixture.rows)}], series.stderr
    listed = cli(env, "clinical", "--json")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    if name in ("select", "order"):  # a keyword is still a table, under its quoted name
        quoted = cli(env, "query", f'SELECT dicom_patient_id FROM "{name}"', "--format", "csv")
        assert quoted.stdout.splitlines() == ["dicom_patient_id", "ATTACKER"], quoted.stderr


def test_a_table_name_that_is_not_lower_case_is_refused_at_the_listing(clinical_env):
    env, _s3, folder, _patients, _http = clinical_env
    pq.write_table(pa.table({"x": [1]}), folder / "IDC_INDEX.parquet")
    done = cli(env, "fetch", "clinical_index")
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert done.returncode == 3 and len(errors) == 1, done.stderr
    assert "lists 'IDC_INDEX.parquet' below bigquery_export/idc_v25_clinical/, which is not a table file" in errors[0]
