"""`dataset idc download` of any mix of IDs, prior releases, manifest files and SOP instances;
citations, viewer links, JSON output, quiet pipes; `dataset http download`. Loopback only."""

import hashlib
import json
import os
import shutil
import subprocess
import uuid

import duckdb
import idc_index_data
import pyarrow as pa
import pyarrow.parquet as pq

from dataset_assets.core.index import extra_index
from dataset_assets.core.index.citations import bibtex, citations
from dataset_assets.core.index.source import IndexSource
from dataset_assets.core.index.viewer import viewer_url
from dataset_assets_tests.support.httpserver import FileServer
from dataset_assets_tests.test_cli import DATASET, assert_one_line_error, run


def _dry_json(*args, env):
    proc = run("idc", "download", *args, "--dry-run", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_mixed_ids_resolve_by_kind_and_unknown_or_ambiguous_ones_are_refused(idc_fixture, env, tmp_path):
    rows = idc_fixture.rows
    ids = [rows[0]["SeriesInstanceUID"], rows[1]["StudyInstanceUID"], rows[2]["crdc_series_uuid"], rows[3]["PatientID"]]
    doc = _dry_json(",".join(ids), str(tmp_path / "o"), env=env)
    expected = {
        r["SeriesInstanceUID"]
        for r in rows
        if r["SeriesInstanceUID"] == ids[0]
        or r["StudyInstanceUID"] == ids[1]
        or r["crdc_series_uuid"] == ids[2]
        or r["PatientID"] == ids[3]
    }
    assert {s["SeriesInstanceUID"] for s in doc["series"]} == expected
    assert all(s["target_dir"].startswith(idc_fixture.collection_id + "/") for s in doc["series"])

    # An ID that is two kinds at once: a copy of the index where a PatientID is a StudyInstanceUID.
    index = tmp_path / "index"
    shutil.copytree(idc_fixture.index_dir, index)
    table = pq.read_table(index / "idc_index.parquet").to_pylist()
    table[5]["PatientID"] = rows[0]["StudyInstanceUID"]
    pq.write_table(
        pa.Table.from_pylist(table, schema=pq.read_schema(index / "idc_index.parquet")), index / "idc_index.parquet"
    )
    both = {**env, "IDC_INDEX_DIR": str(index)}
    proc = run(
        "idc",
        "download",
        f"{rows[0]['StudyInstanceUID']},{rows[1]['SeriesInstanceUID']},1.2.999",
        str(tmp_path / "o"),
        "--dry-run",
        env=both,
    )
    assert_one_line_error(proc, 2, f"'{rows[0]['StudyInstanceUID']}' is both a PatientID and StudyInstanceUID")
    assert "'1.2.999'" in proc.stderr and "searched the collection_id, analysis_result_id, PatientID" in proc.stderr
    assert "sm_instance_index is not fetched" in proc.stderr
    # --by settles the ambiguity.
    doc = _dry_json(rows[0]["StudyInstanceUID"], str(tmp_path / "o"), "--by", "study", env=both)
    assert {s["StudyInstanceUID"] for s in doc["series"]} == {rows[0]["StudyInstanceUID"]}
    assert not (tmp_path / "o").exists()


def _add_prior_series(idc_fixture, s3, tmp_path, version=23):
    """A copy of the fixture index whose prior_versions_index has one more series (a copy of
    row 1's objects under a new crdc_series_uuid on the test server)."""
    row = idc_fixture.rows[1]
    new_uuid = str(uuid.uuid4())
    src = s3.root / row["aws_bucket"] / row["crdc_series_uuid"]
    dst = s3.root / row["aws_bucket"] / new_uuid
    shutil.copytree(src, dst)
    size = sum(p.stat().st_size for p in dst.iterdir())
    index = tmp_path / "index-prior"
    shutil.copytree(idc_fixture.index_dir, index)
    prior = pq.read_table(index / "prior_versions_index.parquet")
    extra = {name: None for name in prior.schema.names}
    extra.update(
        collection_id=row["collection_id"],
        PatientID=row["PatientID"],
        SeriesInstanceUID=row["SeriesInstanceUID"],
        StudyInstanceUID=row["StudyInstanceUID"],
        Modality=row["Modality"],
        crdc_series_uuid=new_uuid,
        series_size_MB=round(size / 1e6, 2),
        series_aws_url=f"s3://{row['aws_bucket']}/{new_uuid}/*",
        aws_bucket=row["aws_bucket"],
        min_idc_version=version - 2,
        max_idc_version=version,
    )
    table = pa.concat_tables([prior, pa.Table.from_pylist([extra], schema=prior.schema)])
    pq.write_table(table, index / "prior_versions_index.parquet")
    return index, new_uuid, sorted(p.name for p in dst.iterdir())


def test_prior_release_uuid_downloads_that_version_into_a_versioned_directory(idc_fixture, s3, env, tmp_path):
    index, new_uuid, names = _add_prior_series(idc_fixture, s3, tmp_path)
    penv = {**env, "IDC_INDEX_DIR": str(index)}
    dest = tmp_path / "o"
    doc = _dry_json(new_uuid, str(dest), env=penv)
    (series,) = doc["series"]
    assert series["prior_release"] is True and series["idc_version"] == 23 and series["files"] == len(names)
    assert series["target_dir"].endswith(f"/v23_{new_uuid}/") and s3.stats["get_object"] == 0
    proc = run("idc", "download", new_uuid, str(dest), "--retries", "1", env=penv)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (dest / series["target_dir"]).iterdir()) == names
    again = run("idc", "download", new_uuid, str(dest), env=penv)
    assert again.returncode == 0 and "(0 files / 0 B transferred" in again.stdout, again.stdout + again.stderr


def test_portal_manifest_with_aws_gcs_and_bad_lines(idc_fixture, s3, env, tmp_path):
    rows = idc_fixture.rows
    gcs_row = next(r for r in rows if r["aws_bucket"] == "idc-open-data-two")
    manifest = tmp_path / "manifest.s5cmd"
    manifest.write_text(
        "# IDC portal manifest\n"
        f"cp s3://{rows[0]['aws_bucket']}/{rows[0]['crdc_series_uuid']}/* .\n"
        f"cp gs://idc-open-idc1/{gcs_row['crdc_series_uuid']}/* .\n"
        "cp s3://idc-open-data/not-a-uuid/* .\n"
        f"cp 's3://idc-open-data/{uuid.uuid4()}/*' .\n"
    )
    dest = tmp_path / "o"
    proc = run("idc", "download", str(manifest), str(dest), env=env)
    assert_one_line_error(proc, 2, "line 4")
    assert "line 5" in proc.stderr and not dest.exists()
    proc = run("idc", "download", str(manifest), str(dest), "--skip-unresolved", "--retries", "1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("skipped: ") == 2 and "complete: 2 series" in proc.stdout
    for row in (rows[0], gcs_row):
        assert len(list(dest.rglob(f"*{row['SeriesInstanceUID']}/*.dcm"))) == row["instanceCount"]
    ids = tmp_path / "ids.csv"
    ids.write_text(f"SeriesInstanceUID,note\n{rows[2]['SeriesInstanceUID']},x\n")
    assert [s["SeriesInstanceUID"] for s in _dry_json(str(ids), str(dest), env=env)["series"]] == [
        rows[2]["SeriesInstanceUID"]
    ]


def _write_sm_instance_index(folder, rows: list[dict]) -> None:
    types = {"STRING": pa.string(), "FLOAT": pa.float64(), "INTEGER": pa.int64()}
    fields = []
    for column in extra_index.schema("sm_instance_index"):
        base = types[column["type"].upper()]
        fields.append(pa.field(column["name"], pa.list_(base) if column.get("mode") == "REPEATED" else base))
    schema = pa.schema(fields)
    full = [{f.name: r.get(f.name) for f in schema} for r in rows]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(full, schema=schema), folder / "sm_instance_index.parquet")


def test_one_sop_instance_downloads_one_file(idc_fixture, s3, env, tmp_path):
    row = idc_fixture.rows[2]
    key = idc_fixture.object_keys(row)[1]
    path = s3.root / row["aws_bucket"] / key
    sop = "1.2.826.0.1.999." + str(uuid.uuid4().int)[:12]
    dest = tmp_path / "o"
    missing = run("idc", "download", sop, str(dest), "--by", "instance", env=env)
    assert_one_line_error(missing, 3, "dataset idc fetch sm_instance_index")
    folder = tmp_path / "indices" / idc_index_data.__version__
    _write_sm_instance_index(
        folder,
        [
            {
                "SOPInstanceUID": sop,
                "SeriesInstanceUID": row["SeriesInstanceUID"],
                "crdc_instance_uuid": path.stem,
                "instance_size": path.stat().st_size,
            }
        ],
    )
    doc = _dry_json(sop, str(dest), env=env)
    assert doc["series"] == [] and len(doc["instances"]) == 1 and doc["would_fetch"]["instances"] == 1
    proc = run("idc", "download", sop, str(dest), "--retries", "1", env=env)
    assert proc.returncode == 0, proc.stderr
    files = list(dest.rglob("*.dcm"))
    assert [f.name for f in files] == [path.name] and files[0].read_bytes() == path.read_bytes()
    assert files[0].parent.name.endswith(row["SeriesInstanceUID"]) and s3.stats["get_object"] == 1
    assert run("idc", "download", sop, str(dest), env=env).returncode == 0 and s3.stats["get_object"] == 1


def test_citations_of_two_collections_list_each_doi_with_its_licence():
    source = IndexSource.installed()
    con = duckdb.connect()
    path = source.path("idc_index")
    pair = [
        r[0]
        for r in con.execute(
            f"SELECT collection_id FROM read_parquet('{path}') GROUP BY 1 HAVING count(DISTINCT source_DOI) = 1 "
            "ORDER BY count(*) LIMIT 2"
        ).fetchall()
    ]
    expected = {
        d.lower(): lic
        for d, lic in con.execute(
            f"SELECT DISTINCT source_DOI, license_short_name FROM read_parquet('{path}') "
            "WHERE list_contains(?, collection_id)",
            [pair],
        ).fetchall()
    }
    proc = run("idc", "citations", ",".join(pair), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    *records, paper = json.loads(proc.stdout)
    assert {r["doi"].lower(): r["license"] for r in records} == expected
    assert all(r["citation"] and r["license_url"] for r in records)
    # The IDC paper closes every selection's citations, offline, as idc-index adds it.
    assert (paper["doi"], paper["source_type"], paper["series"]) == (
        "10.1148/rg.230180", "idc_publication", sum(r["series"] for r in records)
    )  # fmt: skip
    assert (
        paper["citation"].startswith("Fedorov, A., Longabaugh, W. J. R.,")
        and "RadioGraphics, 43(12)" in paper["citation"]
    )
    bib = run("idc", "citations", ",".join(pair), "--format", "bibtex").stdout
    assert bib.count("@misc{") == 2 and "needs the network" in bib
    assert bib.count("@article{idc_radiographics_2023,") == 1 and "doi = {10.1148/rg.230180}" in bib
    apa_text = run("idc", "citations", ",".join(pair)).stdout
    assert apa_text.count("https://doi.org/10.1148/rg.230180") == 1
    # A DOI the index does not describe is said to be so, not invented.
    with source.connect() as con2:
        table = pa.table({"collection_id": ["x"], "source_DOI": ["10.0000/nothing"], "license_short_name": ["CC0"]})
        (record, paper) = citations(con2, table)
    assert record["citation"] is None and "no citation shipped" in record["note"] and "doi.org" in bibtex(record)
    assert paper["doi"] == "10.1148/rg.230180"


def test_viewer_urls_for_ct_and_sm_series(tmp_path):
    path = IndexSource.installed().path("idc_index")
    rows = {
        m: duckdb.connect()
        .execute(
            f"SELECT SeriesInstanceUID, StudyInstanceUID FROM read_parquet('{path}') WHERE Modality = ? LIMIT 1", [m]
        )
        .fetchone()
        for m in ("CT", "SM")
    }
    doc = _dry_json(",".join(r[0] for r in rows.values()), str(tmp_path / "o"), env={})
    urls = {s["Modality"]: s["viewer_url"] for s in doc["series"]}
    ct_series, ct_study = rows["CT"]
    sm_series, sm_study = rows["SM"]
    base = "https://viewer.imaging.datacommons.cancer.gov"
    assert urls["CT"] == f"{base}/v3/viewer/?StudyInstanceUIDs={ct_study}&SeriesInstanceUIDs={ct_series}"
    assert urls["SM"] == f"{base}/slim/studies/{sm_study}/series/{sm_series}"
    assert viewer_url(ct_study) == f"{base}/v3/viewer/?StudyInstanceUIDs={ct_study}"


def test_collections_json_counts_are_integers():
    rows = json.loads(run("idc", "collections", "--json").stdout)
    assert all(isinstance(r[k], int) for r in rows for k in ("series", "size_bytes", "instances"))
    assert all(r["subjects"] is None or isinstance(r["subjects"], int) for r in rows)


def test_output_piped_into_head_ends_quietly(tmp_path):
    path = IndexSource.installed().path("idc_index")
    (collection,) = (
        duckdb.connect()
        .execute(
            f"SELECT collection_id FROM read_parquet('{path}') GROUP BY 1 HAVING count(*) BETWEEN 400 AND 3000 "
            "ORDER BY count(*) LIMIT 1"
        )
        .fetchone()
    )
    dry = ["download", collection, str(tmp_path / "o"), "--dry-run", "--json"]
    for args in (["collections", "--json"], dry):
        full = run("idc", *args).stdout
        assert len(full) > 1 << 17  # more than a pipe holds, so the reader really goes away first
        for _ in range(3):
            proc = subprocess.run(
                f"set -o pipefail; {DATASET} idc {' '.join(args)} | head -1",
                shell=True,
                executable="/bin/bash",
                capture_output=True,
                text=True,
                timeout=120,
                env={k: v for k, v in os.environ.items() if k != "DISPLAY"},
            )
            assert proc.stdout.strip() in ("[", "{") and proc.stderr == "", proc.stderr
            assert proc.returncode in (0, 141), proc.returncode


def test_http_download_resumes_after_a_cut_body(tmp_path):
    body = os.urandom(3_000_000)
    digest = hashlib.sha256(body).hexdigest()
    with FileServer(max_lifetime_s=120) as srv:
        srv.files["/data/sample.bin"] = body
        srv.truncate_next(5, fraction=0.2)  # every attempt of the first run is cut short
        url = srv.url("/data/sample.bin") + "?X-Amz-Signature=secret123"
        first = run("http", "download", url, str(tmp_path), "--sha256", digest)
        assert first.returncode == 3 and "Traceback" not in first.stderr, first.stderr
        errors = [line for line in first.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and first.stderr.strip().splitlines()[-1] == errors[0]
        assert "run again to resume" in errors[0] and "progress: " in first.stderr
        assert "secret123" not in first.stdout + first.stderr
        part = tmp_path / ".sample.bin.part"
        assert 0 < part.stat().st_size < len(body)
        had = part.stat().st_size
        second = run("http", "download", url, str(tmp_path), "--sha256", digest)
        assert second.returncode == 0, second.stderr
        assert "secret123" not in second.stdout + second.stderr
        assert (tmp_path / "sample.bin").read_bytes() == body and not part.exists()
        assert f"bytes={had}-" in srv.stats["ranges"]
    assert_one_line_error(run("http", "download", "nope", str(tmp_path)), 2, "neither an http(s) URL nor a bundle")


def test_collection_manifest_metadata_has_citations_licences_and_viewer_links(idc_fixture, tmp_path):
    import dagster as dg

    from dataset_assets.defs.downloads.manifest_assets import collection_manifest
    from dataset_assets.lib.resources import IdcResource

    idc = IdcResource(
        index_dir=str(idc_fixture.index_dir), manifest_dir=str(tmp_path / "m"), download_dir=str(tmp_path / "d")
    )
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [collection_manifest], resources={"idc": idc}, instance=instance, partition_key=idc_fixture.collection_id
        )
        assert result.success
        (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    cited = metadata["citations"].value
    assert {c["doi"] for c in cited} == {r["source_DOI"] for r in idc_fixture.rows} | {"10.1148/rg.230180"}
    assert metadata["licenses"].value.startswith(idc_fixture.rows[0]["license_short_name"])
    assert "viewer.imaging.datacommons.cancer.gov/v3/viewer/?StudyInstanceUIDs=" in metadata["preview"].value
    series_url = metadata["viewer_first_series"].value
    assert any(series_url.endswith(f"SeriesInstanceUIDs={r['SeriesInstanceUID']}") for r in idc_fixture.rows)


def test_flat_layout_puts_every_file_in_dest(idc_fixture, s3, env, tmp_path):
    dest = tmp_path / "o"
    rows = idc_fixture.rows[:2]
    ids = ",".join(r["SeriesInstanceUID"] for r in rows)
    proc = run("idc", "download", ids, str(dest), "--layout", "flat", "--retries", "1", env=env)
    assert proc.returncode == 0, proc.stderr
    expected = sorted(key.rsplit("/", 1)[1] for r in rows for key in idc_fixture.object_keys(r))
    assert sorted(p.name for p in dest.glob("*.dcm")) == expected
    again = run("idc", "download", ids, str(dest), "--layout", "flat", env=env)
    assert again.returncode == 0 and "(0 files / 0 B transferred" in again.stdout
    # A folder another tool filled flat (idc-index's dirTemplate=None) is taken over, not refused.
    other = tmp_path / "filled-by-idc-index"
    other.mkdir()
    for r in rows:
        for key in idc_fixture.object_keys(r):
            shutil.copy(s3.root / r["aws_bucket"] / key, other / key.rsplit("/", 1)[1])
    taken = run("idc", "download", ids, str(other), "--layout", "flat", env=env)
    assert taken.returncode == 0, taken.stderr
    assert sorted(p.name for p in other.glob("*.dcm")) == expected


def test_repeated_flat_downloads_all_exit_cleanly(idc_fixture, s3, env, tmp_path):
    """Reading a Parquet file through a Python file object let Arrow's I/O threads call back into
    Python and aborted about one CLI run in three at exit ('terminate called without an active
    exception', exit -6). Each of these runs must end with 0."""
    ids = ",".join(r["SeriesInstanceUID"] for r in idc_fixture.rows[:2])
    codes = [
        run("idc", "download", ids, str(tmp_path / f"o{i}"), "--layout", "flat", "--retries", "1", env=env)
        for i in range(15)
    ]
    assert [p.returncode for p in codes] == [0] * 15, [p.stderr[-300:] for p in codes if p.returncode]


def test_http_download_never_takes_another_urls_file_for_its_own(tmp_path):
    with FileServer(max_lifetime_s=120) as srv:
        srv.files["/v1/data.zip"] = b"A" * 5000
        srv.files["/v2/data.zip"] = b"B" * 7000
        assert run("http", "download", srv.url("/v1/data.zip"), str(tmp_path)).returncode == 0
        again = run("http", "download", srv.url("/v1/data.zip") + "?sig=new", str(tmp_path))
        assert again.returncode == 0 and "already complete" in again.stdout  # same file, a new signature
        srv.reset_stats()
        other = run("http", "download", srv.url("/v2/data.zip"), str(tmp_path))
        assert_one_line_error(other, 2, "already exists and was not downloaded from")
        assert (tmp_path / "data.zip").read_bytes() == b"A" * 5000 and srv.stats["bytes_sent"] == 0
    assert_one_line_error(run("http", "download", "http://[::1", str(tmp_path)), 2, "Invalid IPv6 URL")
