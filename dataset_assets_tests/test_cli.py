"""The `dataset` console script, run as a user would: a subprocess, the real index, loopback S3."""

import json
import os
import subprocess
import sys

import pytest

from dataset_assets_tests.support.s3server import free_port

DATASET = os.path.join(os.path.dirname(sys.executable), "dataset")


def run(*args, env=None, **kw):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("DISPLAY", None)
    return subprocess.run([DATASET, *args], capture_output=True, text=True, env=full_env, timeout=120, **kw)


def assert_one_line_error(proc, code, text):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert text in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("verb", ["indices", "columns", "collections", "download", "browse"])
def test_help(verb):
    proc = run("idc", verb, "--help")
    assert proc.returncode == 0 and "Usage: dataset idc" in proc.stdout
    if verb == "download":
        assert "--dry-run" in proc.stdout and "Exit codes" in proc.stdout and "--by" in proc.stdout


def test_indices_and_columns():
    proc = run("idc", "indices", "--json")
    rows = {r["index"]: r for r in json.loads(proc.stdout)}
    assert rows["idc_index"]["rows"] == 1_044_191 and rows["idc_index"]["availability"] == "bundled"
    assert (
        rows["sm_index"]["availability"] == "on demand: dataset idc fetch sm_index" and rows["sm_index"]["rows"] is None
    )
    columns = {c["column"]: c for c in json.loads(run("idc", "columns", "idc_index", "--json").stdout)}
    assert columns["instanceCount"]["type"] == "BIGINT" and "instances" in columns["instanceCount"]["description"]
    assert_one_line_error(
        run("idc", "columns", "nope"), 2, "unknown index 'nope'; known indices: analysis_results_index"
    )


def test_collections_table_and_json():
    rows = json.loads(run("idc", "collections", "--json").stdout)
    assert len(rows) == 179
    phantom = next(r for r in rows if r["collection_id"] == "qin_pet_phantom")
    assert phantom["series"] == 44 and phantom["licenses"] == "CC BY 3.0"
    table = run("idc", "collections").stdout.splitlines()
    assert table[0].split()[:3] == ["collection_id", "subjects", "series"]
    assert any(line.startswith("qin_pet_phantom ") and "246.3 MB" in line for line in table)


def test_browse_prints_url():
    proc = run("idc", "browse", "qin_pet_phantom", "--no-open")
    assert (
        proc.stdout.strip()
        == "https://portal.imaging.datacommons.cancer.gov/explore/filters/?collection_id=qin_pet_phantom"
    )
    assert run("idc", "browse").stdout.strip() == "https://portal.imaging.datacommons.cancer.gov/explore/"
    assert_one_line_error(run("idc", "browse", "nope"), 2, "unknown collection 'nope'")


@pytest.fixture
def fixture_env(idc_fixture, s3):
    return {"IDC_INDEX_DIR": str(idc_fixture.index_dir), "IDC_S3_ENDPOINT_URL": s3.endpoint_url}


def test_download_dry_run_download_and_resume(fixture_env, s3, tmp_path):
    dest = tmp_path / "out"
    dry = run("idc", "download", "qin_pet_phantom", str(dest), "--dry-run", env=fixture_env)
    assert dry.returncode == 0 and "would fetch 6 of 6 series (24 files" in dry.stdout
    assert s3.stats["get_object"] == 0 and not dest.exists()
    proc = run("idc", "download", "qin_pet_phantom", str(dest), "--retries", "1", env=fixture_env)
    assert proc.returncode == 0, proc.stderr
    assert "complete: 6 series, 24 files" in proc.stdout
    assert len(list(dest.rglob("*.dcm"))) == 24 and s3.stats["get_object"] == 24
    again = run("idc", "download", "qin_pet_phantom", str(dest), env=fixture_env)
    assert again.returncode == 0 and "(0 files / 0 B transferred" in again.stdout
    assert s3.stats["get_object"] == 24
    assert (
        "would fetch 0 of 6 series"
        in run("idc", "download", "qin_pet_phantom", str(dest), "--dry-run", env=fixture_env).stdout
    )


def test_download_by_series_with_layout(fixture_env, idc_fixture, tmp_path):
    rows = idc_fixture.rows[:2]
    uids = ",".join(r["SeriesInstanceUID"] for r in rows)
    proc = run(
        "idc",
        "download",
        uids,
        str(tmp_path / "o"),
        "--by",
        "series",
        "--layout",
        "%PatientID/%SeriesInstanceUID",
        env=fixture_env,
    )
    assert proc.returncode == 0, proc.stderr
    for row in rows:
        assert len(list((tmp_path / "o" / row["PatientID"] / row["SeriesInstanceUID"]).glob("*.dcm"))) == 4


def test_download_bad_input(fixture_env, tmp_path):
    dest = str(tmp_path / "o")
    assert_one_line_error(run("idc", "download", "nope", dest, env=fixture_env), 2, "unknown collection 'nope'")
    assert_one_line_error(
        run("idc", "download", "qin_pet_phantom", dest, "--modality", "MR", env=fixture_env),
        2,
        "modalities=MR matches no series",
    )
    assert_one_line_error(
        run("idc", "download", "qin_pet_phantom", dest, "--layout", "%Nope/x", env=fixture_env),
        2,
        "unknown placeholder '%Nope'",
    )
    assert_one_line_error(
        run("idc", "download", "1.2.3", dest, "--by", "series", env=fixture_env), 2, "not in the index: 1.2.3"
    )
    bad_option = run("idc", "download", "qin_pet_phantom", dest, "--workers", "0", env=fixture_env)
    assert bad_option.returncode == 2 and "Traceback" not in bad_option.stderr and "--workers" in bad_option.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(
        run("idc", "download", "qin_pet_phantom", str(blocker / "o"), env=fixture_env), 3, "is not writable"
    )
    refused = {**fixture_env, "IDC_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    assert_one_line_error(
        run("idc", "download", "qin_pet_phantom", dest, env=refused), 3, "cannot reach the S3 endpoint"
    )
    assert_one_line_error(
        run("idc", "download", "qin_pet_phantom", dest, env={**fixture_env, "IDC_INDEX_DIR": str(tmp_path)}),
        3,
        "idc_index.parquet does not exist",
    )


def test_file_system_refusal_is_one_line_exit_3_naming_the_path(fixture_env, idc_fixture, s3, tmp_path):
    """An OSError from the file system (here a symlink loop where a patient directory should be;
    a permission denied or an I/O error take the same path) is one line, never a traceback."""
    dest = tmp_path / "o"
    patient = dest / idc_fixture.collection_id / idc_fixture.rows[0]["PatientID"]
    patient.parent.mkdir(parents=True)
    patient.symlink_to(patient.name)
    proc = run("idc", "download", idc_fixture.collection_id, str(dest), env=fixture_env)
    assert_one_line_error(proc, 3, "Too many levels of symbolic links")
    assert str(patient) in proc.stderr and s3.stats["get_object"] == 0, proc.stderr


def test_download_with_failing_series_exits_1_listing_them(fixture_env, idc_fixture, s3, tmp_path):
    bad = idc_fixture.rows[3]
    s3.faults.fail_keys(lambda key: key.startswith(bad["crdc_series_uuid"]), status=500)
    proc = run("idc", "download", "qin_pet_phantom", str(tmp_path / "o"), "--retries", "0", env=fixture_env)
    assert proc.returncode == 1, proc.stderr
    assert "1 of 6 series incomplete" in proc.stderr and bad["SeriesInstanceUID"] in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unreadable_or_incomplete_index_is_one_line_exit_3(tmp_path, idc_fixture):
    import shutil

    broken = tmp_path / "index"
    shutil.copytree(idc_fixture.index_dir, broken)
    (broken / "prior_versions_index.parquet").write_bytes(b"garbage")
    env = {"IDC_INDEX_DIR": str(broken)}
    for verb in (
        ["collections"],
        ["indices"],
        ["columns", "prior_versions_index"],
        ["download", "qin_pet_phantom", str(tmp_path / "o")],
    ):
        assert_one_line_error(run("idc", *verb, env=env), 3, "prior_versions_index.parquet cannot be read")
    (broken / "prior_versions_index.parquet").unlink()
    (broken / "collections_index.parquet").unlink()
    assert_one_line_error(run("idc", "collections", env=env), 3, "collections_index does not exist")
    for verb in ("indices", "collections"):  # a folder without the index at all
        assert_one_line_error(
            run("idc", verb, env={"IDC_INDEX_DIR": str(tmp_path / "nowhere")}), 3, "idc_index.parquet does not exist"
        )


def test_an_empty_index_lists_no_collections_without_a_traceback(tmp_path, idc_fixture):
    import shutil

    import pyarrow.parquet as pq

    empty = tmp_path / "index"
    shutil.copytree(idc_fixture.index_dir, empty)
    table = pq.read_table(empty / "idc_index.parquet")
    pq.write_table(table.slice(0, 0), empty / "idc_index.parquet")
    proc = run("idc", "collections", env={"IDC_INDEX_DIR": str(empty)})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[0].split()[0] == "collection_id"


def test_bad_endpoint_is_a_usage_error(fixture_env, tmp_path):
    proc = run("idc", "download", "qin_pet_phantom", str(tmp_path / "o"), "--endpoint", "ftp://x", env=fixture_env)
    assert proc.returncode == 2 and "is not an http(s) URL" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_stops_s5cmd_removes_the_command_file_and_exits_130(fixture_env, s3, tmp_path):
    import signal

    from dataset_assets_tests.support.procs import cli_download_in_flight, processes_mentioning

    dest = tmp_path / "out"
    proc = cli_download_in_flight(dest, fixture_env, s3)
    try:
        assert processes_mentioning(str(dest)), "s5cmd should be running"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted; run the same command again to resume" in err
    assert processes_mentioning(str(dest)) == []
    assert list((dest / ".dataset_assets").glob("*.s5cmd")) == []


def test_a_missing_ca_bundle_is_named_in_one_line(fixture_env, tmp_path):
    proc = run(
        "idc", "download", "qin_pet_phantom", str(tmp_path / "d"),
        env={**fixture_env, "AWS_CA_BUNDLE": str(tmp_path / "corp.pem")},
    )  # fmt: skip
    assert_one_line_error(
        proc, 2, f"the CA bundle AWS_CA_BUNDLE='{tmp_path / 'corp.pem'}' cannot be read: no such file"
    )
    assert not (tmp_path / "d").exists()
