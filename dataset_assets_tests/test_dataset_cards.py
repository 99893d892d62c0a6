"""The dataset card beside every verified download: DATASET-<name>.md and dataset-<name>.json in
the download root, from the CLI and from the assets, rewritten by every verified run, never
written through a planted link, never taken for a stray file."""

import json
import os
import time
from pathlib import Path

import dagster as dg

from dataset_assets_tests.test_cli import run


def _download(idc_fixture, env, dest, *extra):
    proc = run("idc", "download", idc_fixture.collection_id, str(dest), *extra, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_a_verified_cli_download_writes_its_card_and_rewrites_it_each_verified_run(idc_fixture, env, tmp_path):
    dest = tmp_path / "dest"
    proc = _download(idc_fixture, env, dest, "--modality", "PT")
    markdown, twin = dest / "DATASET-qin_pet_phantom.md", dest / "dataset-qin_pet_phantom.json"
    assert f"dataset card: {markdown}" in proc.stdout
    card = json.loads(twin.read_text())
    rows = [r for r in idc_fixture.rows if r["Modality"] == "PT"]
    assert (card["name"], card["kind"], card["idc_release"]) == ("qin_pet_phantom", "collection", "v25")
    assert (card["series"], card["files"]) == (len(rows), 4 * len(rows))
    assert card["selection"]["filters"] == {"modalities": ["PT"]} and card["selection"]["target"] == "qin_pet_phantom"
    assert card["licenses"] == {rows[0]["license_short_name"]: len(rows)} and card["restricted_licenses"] == {}
    assert [c["doi"] for c in card["citations"]][-1] == "10.1148/rg.230180"
    assert card["tool"]["s5cmd"].startswith("v") and card["tool"]["version"]
    text = markdown.read_text()
    assert text.startswith("# qin_pet_phantom\n") and "| IDC release | v25 |" in text and "## How to cite" in text
    first = card["verified_at"]
    time.sleep(1.1)
    _download(idc_fixture, env, dest, "--modality", "PT")  # a verified re-run (no request): a new card
    assert json.loads(twin.read_text())["verified_at"] > first
    verified = run("idc", "verify", idc_fixture.collection_id, str(dest), "--modality", "PT", env=env)
    assert verified.returncode == 0, verified.stdout  # the cards are not stray files of the collection


def test_a_link_planted_at_the_card_is_replaced_not_written_through(idc_fixture, env, tmp_path):
    dest, victim = tmp_path / "dest", tmp_path / "victim.txt"
    dest.mkdir()
    victim.write_text("mine")
    (dest / "DATASET-qin_pet_phantom.md").symlink_to(victim)
    _download(idc_fixture, env, dest)
    assert victim.read_text() == "mine" and not (dest / "DATASET-qin_pet_phantom.md").is_symlink()


def test_an_incomplete_download_writes_no_card(idc_fixture, s3, env, tmp_path):
    s3.faults.fail_keys(lambda key: key.startswith(idc_fixture.rows[0]["crdc_series_uuid"]), 403)
    proc = run("idc", "download", idc_fixture.collection_id, str(tmp_path / "d"), "--retries", "0", env=env)
    assert proc.returncode == 1 and not list((tmp_path / "d").glob("DATASET-*"))


def test_the_downloaded_collection_asset_writes_the_card_and_shows_it(idc_fixture, s3, tmp_path):
    from dataset_assets.defs.downloads.checks import download_checks
    from dataset_assets.defs.downloads.download_assets import downloaded_collection
    from dataset_assets.defs.downloads.manifest_assets import collection_manifest
    from dataset_assets.lib.resources import IdcResource, S5cmdResource

    resources = {
        "idc": IdcResource(
            index_dir=str(idc_fixture.index_dir), manifest_dir=str(tmp_path / "m"), download_dir=str(tmp_path / "idc")
        ),
        "s5cmd": S5cmdResource(endpoint_url=s3.endpoint_url, retry_count=1),
    }
    result = dg.materialize(
        [collection_manifest, downloaded_collection, *download_checks],
        resources=resources,
        partition_key=idc_fixture.collection_id,
        run_config={
            "ops": {"collection_manifest": {"config": {"body_parts": [idc_fixture.rows[0]["BodyPartExamined"]]}}}
        },
    )
    assert result.success
    events = {e.asset_key.path[-1]: e for e in result.get_asset_materialization_events()}
    metadata = events["downloaded_collection"].materialization.metadata
    path = metadata["dataset_card_path"].value
    assert path == os.path.join(tmp_path, "idc", "DATASET-qin_pet_phantom.md")
    assert metadata["dataset_card"].value == Path(path).read_text()
    card = json.loads((tmp_path / "idc" / "dataset-qin_pet_phantom.json").read_text())
    assert card["selection"]["filters"] == {"body_parts": [idc_fixture.rows[0]["BodyPartExamined"]]}
    assert card["selection"]["idc_release"] == "v25" and card["series"] == metadata["series"].value
    assert all(e.passed for e in result.get_asset_check_evaluations())  # the card is no stray file


def test_the_card_keeps_hostile_text_as_text_and_is_written_whole_or_not_at_all(idc_fixture, env, tmp_path):
    from dataset_assets.core.select.card import card_markdown

    dest = tmp_path / "a`<img src=x onerror=alert(1)>` | x"
    _download(idc_fixture, env, dest)
    text = (dest / "DATASET-qin_pet_phantom.md").read_text()
    where = next(line for line in text.splitlines() if line.startswith("| where |"))
    assert "<img" not in where and "&lt;img" in where and where.count(" | ") == 1 and where.endswith("\\| x |")
    card = json.loads((dest / "dataset-qin_pet_phantom.json").read_text())
    card["collections"] = ["a\u2028b|c"]
    assert "| collections | a b\\|c |" in card_markdown(card)
    # A folder in the way of the Markdown card: neither file is written, the download still succeeds.
    other = tmp_path / "other"
    (other / "DATASET-qin_pet_phantom.md").mkdir(parents=True)
    proc = _download(idc_fixture, env, other)
    assert "dataset card not written" in proc.stderr and not (other / "dataset-qin_pet_phantom.json").exists()
