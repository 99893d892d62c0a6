"""The Python API (dataset_assets.api.IDC) on the fixture index and the loopback S3 server: objects
back, typed errors raised, the same selection, files and card as the CLI."""

import json

import pyarrow as pa
import pytest

from dataset_assets.api import IDC, Downloaded
from dataset_assets.core.errors import FilterError, IncompleteDownloadError
from dataset_assets_tests.test_cli import run


@pytest.fixture
def client(idc_fixture, s3):
    return IDC(index_dir=idc_fixture.index_dir, endpoint=s3.endpoint_url, retries=0)


def test_download_returns_what_it_did_and_verify_agrees(client, idc_fixture, s3, tmp_path):
    lines: list[str] = []
    done = client.download(idc_fixture.collection_id, tmp_path / "d", modalities=["PT"], log=lines.append)
    pt = [r for r in idc_fixture.rows if r["Modality"] == "PT"]
    assert isinstance(done, Downloaded)
    assert (done.series, done.files, done.transferred_files) == (len(pt), 4 * len(pt), 4 * len(pt))
    assert done.card == (tmp_path / "d").absolute() / "DATASET-qin_pet_phantom.md" and done.card.is_file()
    assert any(line.startswith("downloading ") for line in lines)
    verified = client.verify(idc_fixture.collection_id, tmp_path / "d", modalities=["PT"])
    assert verified.complete and verified.series == len(pt) and verified.problems == []
    s3.reset_stats()
    again = client.download(idc_fixture.collection_id, tmp_path / "d", modalities=["PT"])
    assert again.transferred_files == 0 and s3.stats["get_object"] == 0
    # The same files as the CLI writes for the same selection.
    env = {"IDC_INDEX_DIR": str(idc_fixture.index_dir), "IDC_S3_ENDPOINT_URL": s3.endpoint_url}
    cli = run("idc", "download", idc_fixture.collection_id, str(tmp_path / "c"), "--modality", "PT", env=env)
    assert cli.returncode == 0, cli.stderr
    ours = sorted(p.relative_to(tmp_path / "d") for p in (tmp_path / "d").rglob("*.dcm"))
    assert ours == sorted(p.relative_to(tmp_path / "c") for p in (tmp_path / "c").rglob("*.dcm")) and ours


def test_an_incomplete_download_raises_with_its_result_and_bad_input_raises_filter_errors(
    client, idc_fixture, s3, tmp_path
):
    s3.faults.fail_keys(lambda key: key.startswith(idc_fixture.rows[0]["crdc_series_uuid"]), 403)
    with pytest.raises(IncompleteDownloadError) as caught:
        client.download(idc_fixture.collection_id, tmp_path / "d")
    assert caught.value.result.complete_series == len(idc_fixture.rows) - 1
    assert not client.verify(idc_fixture.collection_id, tmp_path / "d").complete
    with pytest.raises(FilterError, match="unknown collection 'no_such'"):
        client.select("no_such")
    with pytest.raises(FilterError, match="filter analysis_results is 'some'"):
        client.select(idc_fixture.collection_id, analysis_results="some")


def test_select_query_citations_and_viewer_urls_return_objects(client, idc_fixture):
    manifest = client.select(idc_fixture.collection_id, "data", series_uids=[idc_fixture.rows[0]["SeriesInstanceUID"]])
    assert isinstance(manifest, pa.Table) and manifest.num_rows == 1
    table = client.query("SELECT Modality, count(*) AS n FROM idc_index GROUP BY 1 ORDER BY 1")
    assert isinstance(table, pa.Table) and sum(table.column("n").to_pylist()) == len(idc_fixture.rows)
    assert client.query("SELECT * FROM idc_index", limit=2).num_rows == 2
    records = client.citations(idc_fixture.collection_id)
    assert records[-1]["doi"] == "10.1148/rg.230180" and json.dumps(records)
    assert "@article{idc_radiographics_2023," in client.citations(idc_fixture.collection_id, format="bibtex")
    urls = client.viewer_urls(idc_fixture.collection_id)
    assert len(urls) == len(idc_fixture.rows)
    assert all(u["viewer_url"].startswith(u["viewer_study_url"]) for u in urls)
    assert {i["index"] for i in client.indices()} >= {"idc_index", "collections_index"}
    assert "qin_pet_phantom" in set(client.collections()["collection_id"])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda c: c.select("qin_pet_phantom", modalities=5),
            "filter modalities is 5; give a string or a list of strings",
        ),
        (lambda c: c.select(None), "target is None; give collection ids, UIDs or a manifest file's path as text"),
        (lambda c: c.download("qin_pet_phantom", 123), "dest is 123; give a folder's path"),
        (lambda c: c.select("qin_pet_phantom", by="patients"), "by is 'patients'; it is one of auto, collection"),
        (lambda c: c.query(5), "sql is 5; give one SQL statement as text"),
        (lambda c: c.query("SELECT 1", limit=-1), "limit is -1; give a whole number of rows (0 or more) or None"),
        (lambda c: c.query("SELECT 1", limit="x"), "limit is 'x'; give a whole number of rows"),
        (lambda c: c.viewer_urls("qin_pet_phantom", viewer="bogus"), "viewer is 'bogus'; it is one of auto, ohif_v3"),
        (lambda c: c.citations("qin_pet_phantom", format="xml"), "format is 'xml'; it is one of apa, bibtex, json"),
        (lambda c: c.fetch_clinical(force="x"), "force is 'x'; it is True or False"),
        (
            lambda c: c.select("qin_pet_phantom", analysis_results=["only"]),
            "filter analysis_results is ['only']; it is one",
        ),
    ],
)
def test_wrong_arguments_raise_the_projects_typed_errors(client, call, message):
    from dataset_assets.core.errors import DatasetError

    with pytest.raises(DatasetError) as caught:
        call(client)
    assert str(caught.value).startswith(message), str(caught.value)
