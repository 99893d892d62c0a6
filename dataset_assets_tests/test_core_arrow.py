"""Arrow columns built from Python values without pyarrow's pandas probe, and the paths that use
them: a manifest, a download state and a header cache are made without importing pandas (0.2 s
of every `dagster asset materialize` and `dataset idc download` before)."""

import subprocess
import sys
import textwrap

import pyarrow as pa
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dataset_assets.core import arrow_build
from dataset_assets.core.dicom_headers import HeaderCache, file_problems

CASES = [
    ([], pa.string()),
    (["a", None, "é€𝄞", "", "x" * 10_000], pa.string()),
    ([None, None], pa.string()),
    ([0, None, -5, 2**62, -(2**63)], pa.int64()),
    ([], pa.int64()),
    ([["a", "b"], None, [], ["", None]], pa.list_(pa.string())),
    ([[1], None, [], [2**40, -1]], pa.list_(pa.int64())),
    ([None], pa.list_(pa.int64())),
]


@pytest.mark.parametrize(("values", "type_"), CASES, ids=[f"{t}-{len(v)}" for v, t in CASES])
def test_columns_equal_what_pa_array_builds(values, type_):
    built = arrow_build.column(values, type_)
    built.validate(full=True)
    assert built.equals(pa.array(values, type_))
    assert built.null_count == sum(v is None for v in values)


def test_table_and_scalars():
    schema = pa.schema([("name", pa.string()), ("sizes", pa.list_(pa.int64()))])
    table = arrow_build.table({"name": ["a", None], "sizes": [[1, 2], None]}, schema)
    assert table.equals(pa.table({"name": ["a", None], "sizes": [[1, 2], None]}, schema=schema))
    assert arrow_build.scalar("x").equals(pa.scalar("x"))
    assert arrow_build.scalar(255).equals(pa.scalar(255, pa.int64()))
    with pytest.raises(TypeError):
        arrow_build.column([1.5], pa.float64())


def test_manifest_state_and_header_cache_never_import_pandas(tmp_path):
    """The manifest, the layout (sanitizing, long-component hashing), the state file and the header
    cache, written and read back in a fresh interpreter: pandas stays out of it."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from dataset_assets.core.index import IndexSource
        from dataset_assets.core.manifest import build_manifest, read_manifest, write_manifest
        from dataset_assets.core.state import SeriesRecord, load_state, save_state
        from dataset_assets.core.dicom_headers import HeaderCache
        from dataset_assets.core.layout import Layout
        from dataset_assets.core.viewer import viewer_urls
        from dataset_assets.core.fmt import markdown_table

        tmp = Path({str(tmp_path)!r})
        with IndexSource.installed().connect() as con:
            table = build_manifest(con, "qin_pet_phantom")
            long = build_manifest(con, "qin_pet_phantom", layout="%collection_id/" + "x" * 300 + "%SeriesInstanceUID")
        assert any("/_long/" in d for d in long.column("target_dir").to_pylist())
        write_manifest(table, tmp / "m.parquet")
        assert read_manifest(tmp / "m.parquet").num_rows == table.num_rows
        markdown_table(table.slice(0, 3).append_column("viewer_url", viewer_urls(table.slice(0, 3))))
        uuid = table.column("crdc_series_uuid")[0].as_py()
        save_state(tmp / "state.parquet", {{"a/b/": SeriesRecord("1.2", uuid, {{"f.dcm": 3}}, 7)}})
        assert load_state(tmp / "state.parquet")["a/b/"].files == {{"f.dcm": 3}}
        cache = HeaderCache(tmp / "h.parquet", tmp)
        cache.add(str(tmp / "a"), "f.dcm", 3, 4, "k")
        cache.save()
        assert HeaderCache(tmp / "h.parquet", tmp).load().entries == cache.entries
        print("pandas" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_header_cache_is_written_only_when_something_changed(tmp_path):
    cache = HeaderCache(tmp_path / "h.parquet", tmp_path)
    cache.add(str(tmp_path / "s"), "a.dcm", 1, 2, "k")
    cache.save()
    before = (tmp_path / "h.parquet").stat().st_mtime_ns
    again = HeaderCache(tmp_path / "h.parquet", tmp_path).load()
    again.add(str(tmp_path / "s"), "a.dcm", 1, 2, "k")  # the same entry: nothing to write
    again.save()
    assert (tmp_path / "h.parquet").stat().st_mtime_ns == before
    again.add(str(tmp_path / "s"), "a.dcm", 1, 3, "k")  # the file changed since
    again.save()
    assert HeaderCache(tmp_path / "h.parquet", tmp_path).load().entries[(str(tmp_path / "s"), "a.dcm")] == (1, 3, "k")


def test_a_real_ct_header_is_checked_up_to_the_series_uid(tmp_path):
    """A full CT header (pydicom's CT_small: elements before and after the four fields, pixel
    data after them): read only as far as SeriesInstanceUID, yet each of the four is compared."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected = tuple(str(ds.get(name)) for name in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"))
    good = tmp_path / "good.dcm"
    ds.save_as(good)
    assert file_problems(str(good), expected) == []
    for field, index in (("Modality", 3), ("PatientID", 0), ("StudyInstanceUID", 1), ("SeriesInstanceUID", 2)):
        wrong = list(expected)
        wrong[index] = "9.9.9"
        (problem,) = file_problems(str(good), tuple(wrong))
        assert f"{field} is {expected[index]!r}, manifest says '9.9.9'" in problem
    del ds.SeriesInstanceUID
    missing = tmp_path / "missing.dcm"
    ds.save_as(missing)
    (problem,) = file_problems(str(missing), expected)
    assert "SeriesInstanceUID is '<missing>'" in problem


def test_a_header_check_never_opens_a_fifo_or_follows_a_link(tmp_path):
    fifo = tmp_path / "x.dcm"
    import os

    os.mkfifo(fifo)
    assert file_problems(str(fifo), ("a", "b", "c", "d")) == [f"{fifo}: not a regular file"]
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    target = tmp_path / "real.dcm"
    ds.save_as(target)
    link = tmp_path / "link.dcm"
    link.symlink_to(target)
    (problem,) = file_problems(str(link), ("a", "b", "c", "d"))
    assert "not a readable DICOM file" in problem
