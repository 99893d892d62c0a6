"""Asset checks on real downloads: pass when whole, fail naming the culprit when damaged."""

import shutil

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from dagster_duckdb import DuckDBResource

from dataset_assets.defs.catalog.index_assets import idc_index
from dataset_assets.defs.downloads.checks import download_checks
from dataset_assets.defs.downloads.download_assets import downloaded_collection
from dataset_assets.defs.downloads.jobs import verify_downloads_job
from dataset_assets.defs.downloads.manifest_assets import collection_manifest
from dataset_assets.lib.resources import IdcResource, S5cmdResource

PK = "qin_pet_phantom"


@pytest.fixture
def env(idc_fixture, s3, tmp_path):
    resources = {
        "idc": IdcResource(
            index_dir=str(idc_fixture.index_dir), manifest_dir=str(tmp_path / "m"), download_dir=str(tmp_path / "idc")
        ),
        "s5cmd": S5cmdResource(endpoint_url=s3.endpoint_url, retry_count=1),
    }
    result = dg.materialize(
        [collection_manifest, downloaded_collection, *download_checks], resources=resources, partition_key=PK
    )
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {
        "files_match_manifest",
        "dicom_headers_match_manifest",
        "no_stray_files",
        "licences_allow_any_use",
    }
    assert all(e.passed for e in evaluations.values()), evaluations
    assert evaluations["dicom_headers_match_manifest"].metadata["checked"].value == 24
    return resources, tmp_path / "idc"


def run_checks(resources, run_config=None):
    """The project's verify_downloads job: the checks alone, no download."""
    defs = dg.Definitions(
        assets=[downloaded_collection], asset_checks=download_checks, jobs=[verify_downloads_job], resources=resources
    )
    result = defs.resolve_job_def("verify_downloads").execute_in_process(
        tags={"dagster/partition": PK},
        run_config=run_config,
        raise_on_error=False,
        instance=dg.DagsterInstance.ephemeral(),
    )
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def series_dirs(root):
    return sorted({p.parent for p in root.rglob("*.dcm")})


def test_deleted_file_fails_files_check_naming_the_series(env, idc_fixture):
    resources, root = env
    victim = sorted(series_dirs(root)[2].glob("*.dcm"))[0]
    victim.unlink()
    checks = run_checks(resources)
    files = checks["files_match_manifest"]
    assert not files.passed and files.metadata["problems"].value == 1
    assert victim.parent.name.split("_", 1)[1] in files.description and "1 of 4 file(s) missing" in files.description
    assert checks["dicom_headers_match_manifest"].passed  # the remaining files are fine


def test_corrupted_header_fails_header_check_naming_file_and_field(env):
    resources, root = env
    victim = sorted(series_dirs(root)[1].glob("*.dcm"))[1]
    ds = pydicom.dcmread(victim)
    ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(victim)
    checks = run_checks(resources)
    headers = checks["dicom_headers_match_manifest"]
    assert not headers.passed and headers.metadata["problems"].value == 1
    assert str(victim) in headers.description and "PatientID is 'SOMEONE-ELSE'" in headers.description
    victim.write_bytes(b"garbage" * 100)
    headers = run_checks(resources)["dicom_headers_match_manifest"]
    assert "not a readable DICOM file" in headers.description
    # damage inside the header (lengths and tags) is a finding about that file, never a crash
    other = sorted(series_dirs(root)[3].glob("*.dcm"))[0]
    data = bytearray(other.read_bytes())
    data[150:400] = bytes([0xFF]) * 250
    other.write_bytes(bytes(data))
    headers = run_checks(resources)["dicom_headers_match_manifest"]
    assert not headers.passed and str(other) in headers.description


def test_stray_and_partial_files_warn(env):
    resources, root = env
    stray = root / PK / "notes.txt"
    stray.write_text("mine")
    partial = series_dirs(root)[0] / "0a1b.dcm123456"
    partial.write_bytes(b"")
    checks = run_checks(resources)
    tree = checks["no_stray_files"]
    assert not tree.passed and tree.severity == dg.AssetCheckSeverity.WARN
    assert f"stray file: {stray}" in tree.description and f"partial (temporary) file: {partial}" in tree.description
    assert checks["files_match_manifest"].passed


def test_header_check_sampling_is_stated(env):
    resources, _ = env
    evaluation = run_checks(
        resources, {"ops": {"downloaded_collection_dicom_headers_match_manifest": {"config": {"sample_per_series": 1}}}}
    )["dicom_headers_match_manifest"]
    assert evaluation.passed and evaluation.metadata["checked"].value == 6
    assert evaluation.metadata["sample_per_series"].value == 1


def test_index_checks_pass_on_real_index_and_fail_on_null_urls(idc_fixture, tmp_path):
    db = DuckDBResource(database=str(tmp_path / "real.duckdb"))
    real = dg.materialize([idc_index], resources={"idc": IdcResource(), "duckdb": db, "s5cmd": S5cmdResource()})
    assert all(e.passed for e in real.get_asset_check_evaluations())  # 1,044,191 rows, every one safe

    broken = tmp_path / "broken"
    shutil.copytree(idc_fixture.index_dir, broken)
    table = pq.read_table(broken / "idc_index.parquet")
    urls = table.column("series_aws_url").to_pylist()
    urls[0] = None
    urls[1] = urls[1] + "\ncp s3://elsewhere/* /tmp/"
    table = table.set_column(table.column_names.index("series_aws_url"), "series_aws_url", pa.array(urls, pa.string()))
    pq.write_table(table, broken / "idc_index.parquet")
    resources = {
        "idc": IdcResource(index_dir=str(broken)),
        "duckdb": DuckDBResource(database=str(tmp_path / "b.duckdb")),
        "s5cmd": S5cmdResource(),
    }
    result = dg.materialize([idc_index], resources=resources, raise_on_error=False)
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    safe = evaluations["idc_index_rows_are_safe"]
    assert not safe.passed and safe.metadata["url_not_bucket_uuid"].value == 2, safe.description
    assert not evaluations["idc_index_urls_present"].passed
    assert evaluations["idc_index_urls_present"].metadata["series_without_uuid_or_url"].value == 1
