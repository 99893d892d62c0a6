"""Analysis results (an ``analysis_result_id`` as an identifier; ``analysis_results`` include,
exclude or only) and licence-aware selection (``licenses``, ``exclude_noncommercial``, the
licence of each series, the warning check), on the real idc-index-data, side by side with
idc-index 0.13.4 (in ``.venv-idc-index``, installed by ``.ci/setup``) for the series selected."""

import json
import os
import subprocess
from pathlib import Path

import dagster as dg
import duckdb
import idc_index_data
import pytest

from dataset_assets.core.errors import FilterError
from dataset_assets.core.index.source import IndexSource
from dataset_assets.core.select.cohort_file import Cohort, CohortError, cohorts_from_entries
from dataset_assets.core.select.cohorts import build_cohort_manifest
from dataset_assets.core.select.filters import ManifestFilters
from dataset_assets_tests.test_cli import assert_one_line_error, run

REPO = Path(__file__).resolve().parents[1]
IDC_INDEX_PYTHON = REPO / ".venv-idc-index" / "bin" / "python"
INDEX = idc_index_data.IDC_INDEX_PARQUET_FILEPATH


def _sql(query: str, params=()) -> list:
    return duckdb.connect().execute(query.replace("IDX", f"read_parquet('{INDEX}')"), list(params)).fetchall()


def _uuids(*args: str) -> list[str]:
    """The crdc_series_uuids our dry run selects for ``dataset idc download ARGS --dry-run --json``."""
    proc = run("idc", "download", *args, "--dry-run", "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return sorted(s["crdc_series_uuid"] for s in json.loads(proc.stdout)["series"])


def _idc_index(selections: list[dict]) -> list:
    """What idc-index 0.13.4 would download for each selection (see support/idc_index_select.py)."""
    if not IDC_INDEX_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(".venv-idc-index is missing: `bash .ci/setup` installs idc-index there")
        pytest.skip("idc-index is not installed in .venv-idc-index (bash .ci/setup)")
    done = subprocess.run(
        [str(IDC_INDEX_PYTHON), str(REPO / "dataset_assets_tests" / "support" / "idc_index_select.py"),
         json.dumps(selections)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_analysis_result_id_selects_the_same_series_as_idc_index(tmp_path):
    ours = _uuids("qin_lungct_seg", str(tmp_path / "d"))
    expected = [
        r[0]
        for r in _sql("SELECT crdc_series_uuid FROM IDX WHERE analysis_result_id = ? ORDER BY 1", ["qin_lungct_seg"])
    ]
    assert len(ours) == 378 and ours == expected  # across its four collections
    # `--by analysis_result` says what it is; a mix with a collection is the union of both.
    assert _uuids("qin_lungct_seg", str(tmp_path / "d"), "--by", "analysis_result") == ours
    (theirs,) = _idc_index([{"analysis_result_id": "qin_lungct_seg"}])
    assert theirs == ours


def test_analysis_results_include_exclude_only_select_as_idc_index_does(tmp_path):
    modes = ("include", "exclude", "only")
    ours = {m: _uuids("qin_lung_ct", str(tmp_path / "d"), "--analysis-results", m) for m in modes}
    assert len(ours["exclude"]) + len(ours["only"]) == len(ours["include"]) and ours["exclude"] and ours["only"]
    theirs = _idc_index([{"collection_id": "qin_lung_ct", "analysis_results": m} for m in modes])
    assert dict(zip(modes, theirs, strict=True)) == ours
    # An analysis result narrowed to one of its collections, as idc-index's analysis_result_id filter.
    selection = {"collection_id": "qin_lung_ct", "analysis_result_id": "qin_lungct_seg"}
    (theirs,) = _idc_index([selection])
    with IndexSource.installed().connect() as con:
        from dataset_assets.core.select.manifest import build_manifest

        table = build_manifest(con, "qin_lung_ct", ManifestFilters(analysis_result_ids=("qin_lungct_seg",)))
    assert sorted(table.column("crdc_series_uuid").to_pylist()) == theirs and len(theirs) == 90


def test_licence_filters_keep_what_they_name_and_the_dry_run_shows_each_licence(tmp_path):
    dest = str(tmp_path / "d")
    by_licence = dict(
        _sql("SELECT license_short_name, count(*) FROM IDX WHERE collection_id = 'nsclc_radiomics' GROUP BY 1")
    )
    assert set(by_licence) == {"CC BY-NC 3.0", "CC BY 4.0"}
    kept = _uuids("nsclc_radiomics", dest, "--exclude-noncommercial")
    assert len(kept) == by_licence["CC BY 4.0"]
    named = _uuids("nsclc_radiomics", dest, "--license", "CC BY-NC 3.0")
    assert len(named) == by_licence["CC BY-NC 3.0"] and not set(kept) & set(named)
    proc = run("idc", "download", "nsclc_radiomics", dest, "--dry-run", "--json")
    doc = json.loads(proc.stdout)
    assert {s["license"] for s in doc["series"]} == set(by_licence)
    assert doc["selection"]["licenses"] == dict(sorted(by_licence.items(), key=lambda p: -p[1]))
    text = run("idc", "download", "nsclc_radiomics", dest, "--dry-run").stdout
    nc = by_licence["CC BY-NC 3.0"]
    assert (
        f"licences: {nc:,} of {sum(by_licence.values()):,} series are under licences that restrict their use " in text
    )
    assert "CC BY-NC 3.0: " in text and "(no commercial use)" in text
    # A selection of two collections keeps what passes in each; one that nothing passes says so.
    mixed = _uuids("nsclc_radiomics_interobserver1,qin_pet_phantom", dest, "--exclude-noncommercial")
    assert len(mixed) == _sql("SELECT count(*) FROM IDX WHERE collection_id = 'qin_pet_phantom'")[0][0]
    proc = run("idc", "download", "nsclc_radiomics_interobserver1", dest, "--dry-run", "--exclude-noncommercial")
    assert_one_line_error(proc, 2, "the filters {'exclude_noncommercial': True} match no series of collection")
    proc = run("idc", "download", "qin_pet_phantom", dest, "--dry-run", "--license", "CC BY 9.9")
    assert_one_line_error(proc, 2, "filter licenses=CC BY 9.9 matches no series of collection 'qin_pet_phantom'; valid")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"analysis_results": "sometimes"},
            "filter analysis_results is 'sometimes'; it is one of include, exclude, only",
        ),
        ({"exclude_noncommercial": "yes"}, "filter exclude_noncommercial is 'yes'; it is true or false"),
        (
            {"analysis_result_ids": ["x"], "analysis_results": "exclude"},
            "analysis_result_ids select analysis results: they cannot go with analysis_results=exclude",
        ),
        (
            {"licenses": ["CC BY\n4.0"]},
            "filter licenses has the value 'CC BY\\n4.0'; values hold no control characters",
        ),
    ],
)
def test_bad_selection_filters_are_refused_in_one_line(values, message):
    with pytest.raises(FilterError) as caught:
        ManifestFilters.from_mapping(values)
    assert str(caught.value) == message


def test_cohorts_take_licence_and_analysis_filters_with_sql_too():
    with IndexSource.installed().connect() as con:
        cohorts = cohorts_from_entries(
            [
                {"name": "nc_free", "sql": "SELECT SeriesInstanceUID FROM idc_index WHERE collection_id IN "
                 "('nsclc_radiomics', 'qin_pet_phantom')", "exclude_noncommercial": True},
                {"name": "segs", "collection_id": "qin_lung_ct", "analysis_results": "only"},
                {"name": "nothing", "sql": "SELECT SeriesInstanceUID FROM idc_index WHERE collection_id = "
                 "'nsclc_radiomics_interobserver1'", "exclude_noncommercial": True},
                {"name": "bad_licence", "sql": "SELECT SeriesInstanceUID FROM idc_index", "licenses": ["CC0"]},
            ],
            "test",
        )  # fmt: skip
        nc_free = build_cohort_manifest(con, cohorts["nc_free"])
        assert set(nc_free.column("license_short_name").to_pylist()) == {"CC BY 4.0", "CC BY 3.0"}
        expected = _sql(
            "SELECT count(*) FROM IDX WHERE collection_id IN ('nsclc_radiomics', 'qin_pet_phantom') "
            "AND license_short_name NOT LIKE '%-NC%'"
        )[0][0]
        assert nc_free.num_rows == expected
        assert build_cohort_manifest(con, cohorts["segs"]).num_rows == 143
        with pytest.raises(
            FilterError, match=r"cohort nothing: the filters \{'exclude_noncommercial': True\} leave none"
        ):
            build_cohort_manifest(con, cohorts["nothing"])
        with pytest.raises(
            CohortError, match="cohort bad_licence: the licence.s. CC0 are not in the index; it has CC BY 3.0"
        ):
            build_cohort_manifest(con, cohorts["bad_licence"])
    assert isinstance(cohorts["segs"], Cohort)


def test_the_licence_check_warns_with_counts_and_names(tmp_path):
    from dataset_assets.defs.downloads.checks import download_checks
    from dataset_assets.defs.downloads.download_assets import downloaded_collection
    from dataset_assets.defs.downloads.jobs import verify_downloads_job
    from dataset_assets.defs.downloads.manifest_assets import collection_manifest
    from dataset_assets.lib.resources import IdcResource, S5cmdResource

    idc = IdcResource(
        index_dir=str(Path(INDEX).parent), manifest_dir=str(tmp_path / "m"), download_dir=str(tmp_path / "d")
    )
    defs = dg.Definitions(
        assets=[downloaded_collection],
        asset_checks=download_checks,
        jobs=[verify_downloads_job],
        resources={"idc": idc, "s5cmd": S5cmdResource()},
    )
    evaluations = {}
    for collection in ("nsclc_radiomics", "qin_pet_phantom"):
        with dg.instance_for_test() as instance:
            assert dg.materialize(
                [collection_manifest], resources={"idc": idc}, instance=instance, partition_key=collection
            ).success
        result = defs.resolve_job_def("verify_downloads").execute_in_process(
            tags={"dagster/partition": collection}, raise_on_error=False, instance=dg.DagsterInstance.ephemeral()
        )  # the files are not there (the other checks fail): the licence check reads the manifest alone
        evaluations[collection] = next(
            e for e in result.get_asset_check_evaluations() if e.check_name == "licences_allow_any_use"
        )
    warned = evaluations["nsclc_radiomics"]
    nc = _sql(
        "SELECT count(*) FROM IDX WHERE collection_id = 'nsclc_radiomics' AND license_short_name = 'CC BY-NC 3.0'"
    )[0][0]
    assert not warned.passed and warned.severity == dg.AssetCheckSeverity.WARN
    assert (
        warned.metadata["restricted_series"].value == nc
        and warned.metadata["restricted_licences"].value == "CC BY-NC 3.0"
    )
    assert (
        f"{nc:,} of 4,926 series are under licences that restrict their use (CC BY-NC 3.0: {nc:,} series"
        in warned.description
    )
    assert evaluations["qin_pet_phantom"].passed


# -- viewers: chosen by the study, named by the user, a study URL beside each series URL ----------

BASE = "https://viewer.imaging.datacommons.cancer.gov"
SM_STUDY = "1.2.826.0.1.3680043.8.498.72426040555675237648887893204163818289"


def test_series_of_a_slide_study_open_in_slim_with_a_study_url_as_idc_index_opens_them(tmp_path):
    proc = run("idc", "download", SM_STUDY, str(tmp_path / "d"), "--by", "study", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    series = {s["Modality"]: s for s in json.loads(proc.stdout)["series"]}
    assert set(series) == {"ANN", "SM"}  # the annotation is drawn over the slide: Slim, not OHIF
    for item in series.values():
        assert item["viewer_url"] == f"{BASE}/slim/studies/{SM_STUDY}/series/{item['SeriesInstanceUID']}"
        assert item["viewer_study_url"] == f"{BASE}/slim/studies/{SM_STUDY}"
    theirs = _idc_index(
        [{"get_viewer_URL": {"seriesInstanceUID": s["SeriesInstanceUID"]}} for s in series.values()]
        + [{"get_viewer_URL": {"studyInstanceUID": SM_STUDY}}]
    )
    assert theirs == [s["viewer_url"] for s in series.values()] + [f"{BASE}/slim/studies/{SM_STUDY}"]
    # Named by the user: OHIF v2 links, as idc-index's viewer_selector="ohif_v2" gives them.
    proc = run("idc", "download", SM_STUDY, str(tmp_path / "d"), "--by", "study", "--dry-run", "--json",
               "--viewer", "ohif_v2")  # fmt: skip
    v2 = {s["SeriesInstanceUID"]: s["viewer_url"] for s in json.loads(proc.stdout)["series"]}
    theirs = _idc_index([{"get_viewer_URL": {"seriesInstanceUID": uid, "viewer_selector": "ohif_v2"}} for uid in v2])
    assert theirs == list(v2.values()) and all(
        u.startswith(f"{BASE}/viewer/{SM_STUDY}?SeriesInstanceUID=") for u in theirs
    )


def test_ohif_selects_an_image_series_alone_and_shows_a_segmentation_over_its_study(tmp_path):
    (seg_series, study) = _sql("SELECT SeriesInstanceUID, StudyInstanceUID FROM IDX WHERE analysis_result_id = "
                               "'qin_lungct_seg' AND collection_id = 'qin_lung_ct' ORDER BY 1 LIMIT 1")[0]  # fmt: skip
    (ct_series,) = _sql(
        "SELECT SeriesInstanceUID FROM IDX WHERE StudyInstanceUID = ? AND Modality = 'CT' LIMIT 1", [study]
    )[0]
    proc = run("idc", "download", study, str(tmp_path / "d"), "--by", "study", "--dry-run", "--json")
    urls = {s["SeriesInstanceUID"]: s["viewer_url"] for s in json.loads(proc.stdout)["series"]}
    study_url = f"{BASE}/v3/viewer/?StudyInstanceUIDs={study}"
    assert urls[ct_series] == f"{study_url}&SeriesInstanceUIDs={ct_series}"  # only the CT loads
    assert urls[seg_series] == f"{study_url}&initialSeriesInstanceUID={seg_series}"  # with the CT it is drawn on
    (theirs,) = _idc_index([{"get_viewer_URL": {"seriesInstanceUID": seg_series}}])
    assert theirs == urls[seg_series]
    proc = run("idc", "download", study, str(tmp_path / "d"), "--by", "study", "--dry-run", "--viewer", "bogus")
    assert proc.returncode == 2 and "'bogus' is not one of 'auto', 'ohif_v3', 'ohif_v2', 'slim'" in proc.stderr


def test_a_collection_a_filter_empties_is_said_and_the_rest_goes_on(tmp_path):
    proc = run("idc", "download", "nsclc_radiomics,qin_pet_phantom", str(tmp_path / "d"), "--dry-run", "--json",
               "--license", "CC BY-NC 3.0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["selection"]["collections"] == ["nsclc_radiomics"]
    (why,) = doc["selection"]["emptied_by_filters"]
    assert why.startswith("filter licenses=CC BY-NC 3.0 matches no series of collection 'qin_pet_phantom'")
    assert f"note: {why}; the rest of the selection goes on" in proc.stderr
    many = run("idc", "download", "qin_pet_phantom", str(tmp_path / "d"), "--dry-run",
               *[a for n in range(300) for a in ("--license", f"L{n}")])  # fmt: skip
    assert many.returncode == 2
    assert "L0, L1, L2, L3, L4, L5, L6, L7, L8, L9, ... (290 more) matches no series" in many.stderr
    assert len(many.stderr) < 1000
