"""Issue 17, what a TARGET or a cohort selects: cohort SQL is one SELECT (item 6) and may end in
``; -- done`` (17), cohorts and citations take prior-release series like downloads do (7, 17),
a TARGET that is also a file says how it was read (14), UUIDs in any case and unknown values
named for what was tried (15), and a failed download never says ``complete:`` (18).
Real idc-index-data, real DuckDB, the loopback S3 server; no network beyond 127.0.0.1."""

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataset_assets.core.errors import FilterError
from dataset_assets.core.index.source import IndexSource
from dataset_assets.core.select.cohort_file import CohortError, load_cohorts
from dataset_assets.core.select.cohorts import build_cohort_manifest, fill_prior_series, not_in_index, prior_series
from dataset_assets.core.transfer.s5cmd import S5cmdOptions
from dataset_assets_tests.support.envs import materialize_cmd, project_env
from dataset_assets_tests.test_cli import assert_one_line_error, run


@pytest.fixture(scope="module")
def real_prior_uuid():
    """A crdc_series_uuid of the real prior_versions_index that idc_index no longer has."""
    with IndexSource.installed().connect() as con:
        ((value,),) = con.execute(
            "SELECT min(crdc_series_uuid) FROM prior_versions_index "
            "WHERE crdc_series_uuid NOT IN (SELECT crdc_series_uuid FROM idc_index) "
            "AND collection_id IN (SELECT collection_id FROM idc_index)"
        ).fetchall()
    assert value
    return value


def _cohorts(tmp_path: Path, text: str):
    path = tmp_path / "cohorts.yaml"
    path.write_text(text)
    return load_cohorts(path)


def _prior_copy(idc_fixture, s3, tmp_path, version=23):
    """A copy of the fixture index whose prior_versions_index has one more series: row 1's objects
    copied on the loopback server under a new crdc_series_uuid (sizes rounded as IDC rounds them)."""
    row = idc_fixture.rows[1]
    new_uuid = str(uuid.uuid4())
    dst = s3.root / row["aws_bucket"] / new_uuid
    shutil.copytree(s3.root / row["aws_bucket"] / row["crdc_series_uuid"], dst)
    index = tmp_path / "index-prior"
    shutil.copytree(idc_fixture.index_dir, index)
    prior = pq.read_table(index / "prior_versions_index.parquet")
    extra = {name: None for name in prior.schema.names}
    extra.update(
        {k: row[k] for k in ("collection_id", "PatientID", "SeriesInstanceUID", "StudyInstanceUID", "Modality")},
        crdc_series_uuid=new_uuid,
        series_size_MB=round(sum(p.stat().st_size for p in dst.iterdir()) / 1e6, 2),
        series_aws_url=f"s3://{row['aws_bucket']}/{new_uuid}/*",
        aws_bucket=row["aws_bucket"],
        min_idc_version=version - 2,
        max_idc_version=version,
    )
    pq.write_table(
        pa.concat_tables([prior, pa.Table.from_pylist([extra], schema=prior.schema)]),
        index / "prior_versions_index.parquet",
    )
    return index, new_uuid, sorted(p.name for p in dst.iterdir())


def _dry_json(*args, env, **kw):
    proc = run("idc", "download", *args, "--dry-run", "--json", env=env, **kw)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout), proc.stderr


# -- item 6: a cohort's SQL is exactly one SELECT, refused before anything runs ---------------------


def test_cohort_sql_with_more_than_one_select_statement_is_refused_before_anything_runs(idc_fixture, tmp_path):
    out = tmp_path / "out.csv"
    one = "SELECT SeriesInstanceUID FROM idc_index LIMIT 1"
    copy = f"COPY (SELECT 'pwned') TO '{out}'"
    cohorts = _cohorts(
        tmp_path,
        "cohorts:\n"
        + "".join(
            f"  - name: {name}\n    sql: {json.dumps(sql)}\n"
            for name, sql in {
                "three": f"{one}; {copy}; {one}",
                "escape": f"{one}); {copy}; SELECT * FROM (SELECT 1",  # out of the subquery's parentheses
                "copy_only": copy,
                "attach": f"ATTACH '{tmp_path / 'x.duckdb'}' AS x",
                "comment_only": "-- nothing here",
            }.items()
        ),
    )
    with IndexSource(idc_fixture.index_dir).connect() as con:  # a connection that may write files
        for name, found in {
            "escape": "its SQL failed: Parser Error",
            "three": "it has 3 (SELECT, COPY, SELECT)",
            "copy_only": "it has 1 (COPY)",
            "attach": "it has 1 (ATTACH)",
            "comment_only": "it has 0 (no statement)",
        }.items():
            with pytest.raises(CohortError) as caught:
                build_cohort_manifest(con, cohorts[name])
            assert not out.exists() and not (tmp_path / "x.duckdb").exists(), name
            message = str(caught.value)
            assert message.startswith(f"cohort {name}: ") and found in message and "\n" not in message, message


# -- item 17: a trailing `;` and comments; cohorts of prior-release series ---------------------------


def test_cohort_sql_ending_with_a_semicolon_and_comments_runs(idc_fixture, tmp_path):
    cohorts = _cohorts(
        tmp_path,
        """
cohorts:
  - {name: done, sql: "SELECT SeriesInstanceUID FROM idc_index ORDER BY 1 LIMIT 2; -- done"}
  - name: block
    sql: |
      WITH s AS (SELECT SeriesInstanceUID FROM idc_index WHERE Modality <> ';' ORDER BY 1 LIMIT 3)
      SELECT * FROM s -- three; no more
      ;  /* end; */ ;
      -- trailing
  - {name: twice, sql: "FROM idc_index SELECT crdc_series_uuid LIMIT 1;;"}
""",
    )
    with IndexSource(idc_fixture.index_dir).connect() as con:
        assert build_cohort_manifest(con, cohorts["done"]).num_rows == 2
        assert build_cohort_manifest(con, cohorts["block"]).num_rows == 3
        assert build_cohort_manifest(con, cohorts["twice"]).num_rows == 1


def test_a_cohort_of_prior_release_uuids_selects_them_as_the_cli_does(idc_fixture, s3, env, tmp_path, real_prior_uuid):
    index, new_uuid, names = _prior_copy(idc_fixture, s3, tmp_path)
    cli_doc, _ = _dry_json(new_uuid, str(tmp_path / "o"), env={**env, "IDC_INDEX_DIR": str(index)})
    (cli_series,) = cli_doc["series"]
    current = idc_fixture.rows[0]["crdc_series_uuid"]
    cohorts = _cohorts(
        tmp_path,
        f"""
cohorts:
  - {{name: prior_only, sql: "SELECT '{new_uuid}' AS crdc_series_uuid"}}
  - name: mixed
    sql: "SELECT * FROM (VALUES ('{new_uuid}'), ('{current}'), ('{real_prior_uuid}'), ('nope')) t(crdc_series_uuid)"
""",
    )
    with IndexSource(index).connect() as con:
        table = build_cohort_manifest(con, cohorts["prior_only"])
        mixed = build_cohort_manifest(con, cohorts["mixed"])
    assert table.column("target_dir").to_pylist() == [cli_series["target_dir"]]
    assert prior_series(table) == {new_uuid} and not_in_index(table) == 0
    assert sorted(mixed.column("crdc_series_uuid").to_pylist()) == sorted([new_uuid, current, real_prior_uuid])
    assert not_in_index(mixed) == 1 and prior_series(mixed) == {new_uuid, real_prior_uuid}
    # Files and bytes from one listing, as the CLI: exact, and the series that is not on the server is named.
    options = S5cmdOptions(endpoint_url=s3.endpoint_url, retry_count=0)
    buckets = ("idc-open-data", "idc-open-data-two")
    filled, problems = fill_prior_series(table, options, buckets)
    assert filled.column("instanceCount").to_pylist() == [cli_series["files"]] == [len(names)]
    assert filled.column("series_bytes").to_pylist() == [cli_series["bytes"]] and problems == []
    assert prior_series(filled) == set()
    filled, problems = fill_prior_series(mixed, options, buckets)
    assert filled.num_rows == 2 and len(problems) == 1 and real_prior_uuid in problems[0]
    # A cohort of a series no release has still selects nothing.
    nothing = _cohorts(tmp_path, "cohorts:\n  - {name: none, sql: \"SELECT 'x' AS crdc_series_uuid\"}\n")["none"]
    with IndexSource(index).connect() as con, pytest.raises(FilterError, match="selects no series"):
        build_cohort_manifest(con, nothing)


def test_a_prior_release_cohort_materializes_and_downloads_like_the_cli(idc_fixture, s3, tmp_path):
    index, new_uuid, names = _prior_copy(idc_fixture, s3, tmp_path)
    cohorts = tmp_path / "cohorts.yaml"
    sql = f"SELECT '{new_uuid}' AS crdc_series_uuid"
    cohorts.write_text(f"cohorts:\n  - {{name: prior_only, sql: {json.dumps(sql)}}}\n")
    process_env = project_env(idc_fixture, s3, tmp_path, IDC_INDEX_DIR=str(index), IDC_COHORTS_FILE=str(cohorts))
    proc = subprocess.run(
        materialize_cmd("cohort_manifest,downloaded_cohort", "prior_only"),
        env=process_env,
        cwd=tmp_path / "home",
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    row = idc_fixture.rows[1]
    folder = tmp_path / "idc" / row["collection_id"] / row["PatientID"] / row["StudyInstanceUID"] / f"v23_{new_uuid}"
    assert sorted(p.name for p in folder.iterdir()) == names
    assert "Asset check 'files_match_manifest' on 'downloaded_cohort' passed" in out


# -- item 7: prior-release series in citations and in layouts naming %crdc_series_uuid -----------------


def test_prior_release_uuid_in_citations_and_crdc_series_uuid_layouts(idc_fixture, s3, env, tmp_path, real_prior_uuid):
    proc = run("idc", "citations", real_prior_uuid, "--format", "json", env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    with IndexSource.installed().connect() as con:
        ((collection,),) = con.execute(
            "SELECT collection_id FROM prior_versions_index WHERE crdc_series_uuid = ? LIMIT 1", [real_prior_uuid]
        ).fetchall()
    *cited, paper = json.loads(proc.stdout)
    assert cited and all(c["collections"] == [collection] for c in cited) and paper["doi"] == "10.1148/rg.230180"
    # In a manifest file (an IDC portal s5cmd line) with a current series beside it.
    manifest = tmp_path / "manifest.s5cmd"
    row = idc_fixture.rows[0]
    manifest.write_text(f"cp s3://idc-open-data/{real_prior_uuid}/* .\ncp {row['series_aws_url']} .\n")
    proc = run("idc", "citations", str(manifest), "--format", "json", env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert {c for r in json.loads(proc.stdout) for c in r["collections"]} == {collection, row["collection_id"]}
    # Dry runs and a download with flat layouts and %crdc_series_uuid.
    index, new_uuid, names = _prior_copy(idc_fixture, s3, tmp_path)
    penv = {**env, "IDC_INDEX_DIR": str(index)}
    for layout in ("flat", "%crdc_series_uuid/", "%collection_id/%crdc_series_uuid_%Modality/"):
        doc, _ = _dry_json(new_uuid, str(tmp_path / "o"), "--layout", layout, env=penv)
        (series,) = doc["series"]
        assert series["prior_release"] and series["files"] == len(names), (layout, series)
        where = series["staging_dir"] if layout == "flat" else series["target_dir"]  # flat: staged, then moved
        assert where.endswith(f"v23_{new_uuid}/"), series
    dest = tmp_path / "flat"
    proc = run("idc", "download", new_uuid, str(dest), "--layout", "flat", "--retries", "0", env=penv)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in dest.glob("*.dcm")) == names


# -- item 14: a TARGET that is also a file here ------------------------------------------------------


def test_a_target_that_is_also_a_file_here_says_which_reading_was_taken(idc_fixture, env, tmp_path):
    collection, row = idc_fixture.collection_id, idc_fixture.rows[0]
    here = tmp_path / "here"
    here.mkdir()
    (here / collection).write_text(row["SeriesInstanceUID"] + "\n")  # a file named like the collection
    dest = str(tmp_path / "o")
    doc, err = _dry_json(collection, dest, env=env, cwd=here)
    assert [s["SeriesInstanceUID"] for s in doc["series"]] == [row["SeriesInstanceUID"]]
    assert err.strip() == (
        f"reading TARGET as the manifest file ./{collection}; use --by <kind> to read {collection!r} as IDs"
    )
    doc, err = _dry_json(collection, dest, "--by", "collection", env=env, cwd=here)
    assert len(doc["series"]) == len(idc_fixture.rows)
    assert f"reading TARGET {collection!r} as collection IDs, not as the manifest file ./{collection}" in err
    # A path is always the file; --by then applies to its bare IDs, and nothing is said.
    doc, err = _dry_json(f"./{collection}", dest, "--by", "series", env=env, cwd=here)
    assert [s["SeriesInstanceUID"] for s in doc["series"]] == [row["SeriesInstanceUID"]] and err == ""


# -- item 15: UUIDs in any case; unknown values named for what was tried -------------------------------


def test_uuids_match_in_any_case_and_unknown_values_say_what_was_tried(idc_fixture, env, tmp_path, real_prior_uuid):
    row = idc_fixture.rows[2]
    dest = str(tmp_path / "o")
    for args in ([row["crdc_series_uuid"].upper()], [row["crdc_series_uuid"].upper(), "--by", "crdc_series_uuid"]):
        doc, _ = _dry_json(*args, dest, env=env)
        assert [s["crdc_series_uuid"] for s in doc["series"]] == [row["crdc_series_uuid"]]
    proc = run("idc", "citations", real_prior_uuid.upper(), env=env)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    tried = (
        "is not a collection id, analysis_result_id, PatientID, StudyInstanceUID, SeriesInstanceUID or crdc_series_uuid"
    )
    for value in ("1.2.999.7", str(uuid.uuid4()).upper()):
        proc = run("idc", "download", value, dest, env=env)
        assert_one_line_error(proc, 2, f"{value!r} {tried} of this release or an earlier one")
        assert "unknown collection" not in proc.stderr and "nearest collection" not in proc.stderr
    proc = run("idc", "download", "QIN-PET-Phantm", dest, env=env)
    assert_one_line_error(proc, 2, f"unknown collection 'QIN-PET-Phantm': 'QIN-PET-Phantm' {tried}")
    assert "nearest collection ids: qin_pet_phantom" in proc.stderr


# -- item 18: a failed download never says complete ---------------------------------------------------


def test_a_failed_download_says_incomplete_not_complete(idc_fixture, s3, env, tmp_path):
    bad = idc_fixture.rows[3]
    s3.faults.fail_keys(lambda key: key.startswith(bad["crdc_series_uuid"]), status=500)
    proc = run("idc", "download", idc_fixture.collection_id, str(tmp_path / "o"), "--retries", "0", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not any(line.startswith("complete:") for line in proc.stdout.splitlines()), proc.stdout
    assert f"incomplete: 5 of 6 series complete in {tmp_path / 'o'}" in proc.stdout, proc.stdout
    # A run with nothing failing still ends with its complete line.
    s3.faults.clear()
    again = run("idc", "download", idc_fixture.collection_id, str(tmp_path / "o"), env=env)
    assert again.returncode == 0 and "complete: 6 series, 24 files" in again.stdout, again.stdout + again.stderr
