"""The pure core on the real idc-index-data: index facts, manifests, filters, bad input."""

import shutil

import pytest

from dataset_assets.core.errors import FilterError, IndexUnavailableError, LayoutError, UnknownCollectionError
from dataset_assets.core.index import source as idx
from dataset_assets.core.select.filters import ManifestFilters
from dataset_assets.core.select.manifest import build_manifest, read_manifest, summarize, write_manifest


@pytest.fixture(scope="module")
def con():
    with idx.IndexSource.installed().connect() as c:
        yield c


def test_installed_index_facts(con):
    totals = idx.index_summary(con)
    assert totals["series"] == 1_044_191
    assert totals["collections"] == 179
    assert idx.release_of(con) == 25
    ids = idx.collection_ids(con)
    assert len(ids) == 179 and "qin_pet_phantom" in ids and "nlst" in ids and ids == sorted(ids)


def test_collections_table_joins_metadata(con):
    table = idx.collections_table(con)
    assert len(table) == 179
    row = table.set_index("collection_id").loc["qin_pet_phantom"]
    assert row["collection_name"] == "QIN PET Phantom"
    assert row["series"] == 44 and row["instances"] == 2816 and row["size_bytes"] == 246_305_000
    assert row["modalities"] == "PT" and row["licenses"] == "CC BY 3.0"
    assert row["doi"] == "10.7937/k9/tcia.2015.zpukhckb"


def test_manifest_of_small_collection(con):
    table = build_manifest(con, "qin_pet_phantom")
    stats = summarize(table)
    assert stats["series"] == 44 and stats["instances"] == 2816 and stats["bytes"] == 246_305_000
    row = table.slice(0, 1).to_pylist()[0]
    assert row["series_aws_url"] == f"s3://{row['aws_bucket']}/{row['crdc_series_uuid']}/*"
    assert row["series_bytes"] == round(row["series_size_MB"] * 1e6)
    assert row["target_dir"] == (
        f"qin_pet_phantom/{row['PatientID']}/{row['StudyInstanceUID']}/PT_{row['SeriesInstanceUID']}/"
    )


def test_manifest_filters_narrow_rows(con):
    full = build_manifest(con, "qin_pet_phantom")
    patient = full.column("PatientID")[0].as_py()
    one_series = full.column("SeriesInstanceUID")[0].as_py()
    by_patient = build_manifest(con, "qin_pet_phantom", ManifestFilters(patient_ids=(patient,)))
    assert 0 < by_patient.num_rows < full.num_rows
    assert set(by_patient.column("PatientID").to_pylist()) == {patient}
    by_series = build_manifest(con, "qin_pet_phantom", ManifestFilters(series_uids=(one_series,), modalities=("PT",)))
    assert by_series.column("SeriesInstanceUID").to_pylist() == [one_series]


def test_manifest_spans_several_buckets(con):
    (collection,) = con.execute(
        "SELECT collection_id FROM idc_index GROUP BY 1 HAVING count(DISTINCT aws_bucket) > 1 ORDER BY count(*) LIMIT 1"
    ).fetchone()
    table = build_manifest(con, collection)
    assert len(summarize(table)["buckets"]) > 1
    assert all(
        u.startswith(f"s3://{b}/")
        for u, b in zip(
            table.column("series_aws_url").to_pylist(), table.column("aws_bucket").to_pylist(), strict=False
        )
    )


def test_unknown_collection_suggests_close_ids(con):
    with pytest.raises(UnknownCollectionError, match=r"unknown collection 'qin_pet_phantm'.*qin_pet_phantom"):
        build_manifest(con, "qin_pet_phantm")


def test_filter_value_matching_nothing_names_value_and_valid_ones(con):
    with pytest.raises(
        FilterError,
        match=r"modalities=MR matches no series of collection 'qin_pet_phantom'; valid Modality values there: PT",
    ):
        build_manifest(con, "qin_pet_phantom", ManifestFilters(modalities=("MR",)))


def test_filters_each_valid_but_disjoint(con):
    full = build_manifest(con, "qin_pet_phantom").to_pylist()
    a = full[0]
    b = next(r for r in full if r["PatientID"] != a["PatientID"])
    with pytest.raises(FilterError, match="match no series .* together"):
        build_manifest(
            con,
            "qin_pet_phantom",
            ManifestFilters(patient_ids=(a["PatientID"],), series_uids=(b["SeriesInstanceUID"],)),
        )


def test_unknown_filter_field_lists_valid_fields():
    with pytest.raises(FilterError, match=r"unknown filter field\(s\) modality; valid fields: modalities, body_parts"):
        ManifestFilters.from_mapping({"modality": ["CT"]})
    with pytest.raises(FilterError, match="non-empty strings"):
        ManifestFilters.from_mapping({"modalities": [""]})
    assert ManifestFilters.from_mapping({"modalities": "CT"}).modalities == ("CT",)


def test_malformed_layout_is_clear_and_checked_before_querying(con):
    with pytest.raises(LayoutError, match=r"unknown placeholder '%Modalty'"):
        build_manifest(con, "qin_pet_phantom", layout="%collection_id/%Modalty/%SeriesInstanceUID")


def test_unreadable_index_file(tmp_path):
    for name in idx.BUNDLED:
        shutil.copy(idx.IndexSource.installed().path(name), tmp_path / f"{name}.parquet")
    (tmp_path / "idc_index.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(IndexUnavailableError, match=r"idc_index.parquet cannot be read as Parquet"):
        idx.IndexSource(tmp_path).connect()
    (tmp_path / "idc_index.parquet").unlink()
    with pytest.raises(IndexUnavailableError, match=r"idc_index.parquet does not exist"):
        idx.IndexSource(tmp_path).connect()


def test_index_missing_a_required_column(tmp_path):
    import duckdb

    src = idx.IndexSource.installed().path("idc_index")
    duckdb.sql(
        f"COPY (SELECT * EXCLUDE (series_aws_url) FROM read_parquet('{src}') LIMIT 10) "
        f"TO '{tmp_path / 'idc_index.parquet'}'"
    )
    with pytest.raises(IndexUnavailableError, match="lacks the column.* series_aws_url"):
        idx.IndexSource(tmp_path).connect()


def test_manifest_write_is_atomic_and_keeps_old_on_failure(con, tmp_path):
    table = build_manifest(con, "qin_pet_phantom")
    path = write_manifest(table, tmp_path / "m" / "qin_pet_phantom.parquet")
    assert read_manifest(path).equals(table)
    with pytest.raises((TypeError, AttributeError)):
        write_manifest("not a table", path)  # type: ignore[arg-type]
    assert read_manifest(path).equals(table)
    assert [p.name for p in path.parent.iterdir()] == ["qin_pet_phantom.parquet"]


def test_long_paths_are_checked_against_max_path_never_relaid_out(con):
    table = build_manifest(con, "qin_pet_phantom", root_length=150)
    assert table.equals(build_manifest(con, "qin_pet_phantom"))  # the root never changes the layout
    assert not any("/_long/" in d for d in table.column("target_dir").to_pylist())
    with pytest.raises(LayoutError, match="longer than 260 characters"):
        build_manifest(con, "qin_pet_phantom", root_length=150, max_path=260)
    assert build_manifest(con, "qin_pet_phantom", root_length=10, max_path=260).num_rows == 44
