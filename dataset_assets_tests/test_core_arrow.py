"""Arrow columns built from Python values without pyarrow's pandas probe, and the paths that use
them: a manifest, a download state and a header cache are made without importing pandas (0.2 s
of every `dagster asset materialize` and `dataset idc download` before)."""

import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dataset_assets.core import arrow_build
from dataset_assets.core.verify.dicom_headers import HeaderCache, file_problems

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
    """The manifest, the layout (sanitizing, long-component hashing), the citations, the state file
    and the header cache, written and read back in a fresh interpreter: pandas stays out of it (it
    costs a download 30 MB and 0.2 s)."""
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from dataset_assets.core.index.source import IndexSource
        from dataset_assets.core.select.manifest import build_manifest, read_manifest, write_manifest
        from dataset_assets.core.transfer.state import SeriesRecord, load_state, save_state
        from dataset_assets.core.verify.dicom_headers import HeaderCache
        from dataset_assets.core.select.layout import Layout
        from dataset_assets.core.index.viewer import viewer_urls
        from dataset_assets.core.fmt import markdown_table
        from dataset_assets.core.index.citations import citations

        tmp = Path({str(tmp_path)!r})
        with IndexSource.installed().connect() as con:
            table = build_manifest(con, "qin_pet_phantom")
            long = build_manifest(con, "qin_pet_phantom", layout="%collection_id/" + "x" * 300 + "%SeriesInstanceUID")
            cited = citations(con, table)  # grouped with Arrow kernels: a str given to one probed pandas
        assert any("/_long/" in d for d in long.column("target_dir").to_pylist())
        assert cited and cited[-1]["source_type"] == "idc_publication"  # the IDC paper last
        write_manifest(table, tmp / "m.parquet")
        assert read_manifest(tmp / "m.parquet").num_rows == table.num_rows
        markdown_table(table.slice(0, 3).append_column("viewer_url", viewer_urls(table.slice(0, 3))))
        uuid = table.column("crdc_series_uuid")[0].as_py()
        save_state(tmp / "state.parquet", {{"a/b/": SeriesRecord("1.2", uuid, {{"f.dcm": 3}}, 7)}})
        assert load_state(tmp / "state.parquet")["a/b/"].holds({{"f.dcm": 3}})
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


def test_each_field_of_a_real_ct_header_is_compared(tmp_path):
    """A full CT header (pydicom's CT_small: elements before and after the four fields, pixel
    data after them): each of the four is compared, and a missing one is named."""
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


def test_a_column_past_the_32_bit_offsets_is_built_in_chunks(monkeypatch):
    """Arrow's string and list offsets are 32-bit: a column with more text than that (the header
    cache of all of NLST) comes out chunked, equal to what pa.array builds, and a table of it
    writes. The limit is lowered here so that the test does not need 2 GiB."""
    monkeypatch.setattr(arrow_build, "CHUNK_LIMIT", 10)
    texts = ["abcd", None, "efghij", "k", "", "lmnopqrstuvw", "xy"]
    built = arrow_build.strings(texts)
    assert isinstance(built, pa.ChunkedArray) and built.num_chunks > 1
    assert built.combine_chunks().equals(pa.array(texts, pa.string()))
    names = [["abc", "def"], None, ["ghijk", "l"], [], ["mnopqrstuvwx"]]
    listed = arrow_build.lists(names, pa.string())
    assert isinstance(listed, pa.ChunkedArray) and listed.num_chunks > 1
    assert listed.combine_chunks().equals(pa.array(names, pa.list_(pa.string())))
    schema = pa.schema([("t", pa.string()), ("n", pa.int64())])
    table = arrow_build.table({"t": texts, "n": list(range(len(texts)))}, schema)
    assert table.to_pydict() == {"t": texts, "n": list(range(len(texts)))}


def test_a_cache_file_that_is_a_fifo_is_not_waited_on(tmp_path):
    import os
    import threading

    fifo = tmp_path / "h.parquet"
    os.mkfifo(fifo)
    loaded = []
    reader = threading.Thread(target=lambda: loaded.append(HeaderCache(fifo, tmp_path).load()), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert loaded and loaded[0].entries == {} and not loaded[0].loaded
    with pytest.raises(OSError, match="not a regular file"):
        arrow_build.read_parquet(fifo)


def _swapped_after_a_check(tmp_path):
    """One series of one file whose header check passed and was cached; the file is then
    overwritten with zeros of the same size and given back its mtime (what the cache trusts).
    Returns (manifest, root, cache path)."""
    import os

    from dataset_assets.core.verify.checks import check_headers
    from dataset_assets_tests.support.fixture import write_dicom

    row = {
        "target_dir": "c/P/1.2/CT_1.2.3/",
        "instanceCount": 1,
        "PatientID": "P",
        "StudyInstanceUID": "1.2",
        "SeriesInstanceUID": "1.2.3",
        "Modality": "CT",
    }
    folder = tmp_path / "root" / row["target_dir"]
    folder.mkdir(parents=True)
    good = folder / "a.dcm"
    write_dicom(good, row, 0, 64)
    manifest, root, cache = pa.Table.from_pylist([row]), tmp_path / "root", tmp_path / "cache.parquet"
    assert check_headers(manifest, root, cache_path=cache, processes=1).passed
    st = good.stat()
    good.write_bytes(b"\0" * st.st_size)
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns))
    return manifest, root, cache


def test_a_reread_that_finds_a_bad_file_drops_it_from_the_cache(tmp_path):
    """A file swapped for bad bytes with the same size and mtime passes a normal check (size and
    mtime are what the cache trusts); `reread` reads it and fails it, and the next normal check
    must fail it too: the cache written by the reread no longer vouches for it."""
    from dataset_assets.core.verify.checks import check_headers

    manifest, root, cache = _swapped_after_a_check(tmp_path)
    assert check_headers(manifest, root, cache_path=cache, processes=1).passed  # trusted, as documented
    assert not check_headers(manifest, root, cache_path=cache, processes=1, reread=True).passed
    assert not check_headers(manifest, root, cache_path=cache, processes=1).passed


def test_a_reread_whose_cache_cannot_be_written_leaves_no_stale_cache(tmp_path, monkeypatch):
    """The reread fails the swapped file but cannot write its cache (a full disk): the old cache,
    which vouched for that file, must be gone, so the next check reads the file again."""
    import errno

    from dataset_assets.core.verify import dicom_headers
    from dataset_assets.core.verify.checks import check_headers

    manifest, root, cache = _swapped_after_a_check(tmp_path)

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(dicom_headers.HeaderCache, "save", full)
        report = check_headers(manifest, root, cache_path=cache, processes=1, reread=True)
    assert not report.passed and "cache_not_saved" in report.notes
    assert not check_headers(manifest, root, cache_path=cache, processes=1).passed


def _header(extra: bytes = b"", drop: str | None = None, tail: bytes | None = None) -> bytes:
    """A small CT file; ``extra`` elements inserted just before the pixel data, or the pixel data
    replaced by ``tail``."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, "1.2.3.4.5", "CT"
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = "PAT1", "1.2.3", "1.2.3.4", 1
    ds.BitsAllocated, ds.PixelData = 16, b"\0" * 8
    if drop:
        delattr(ds, drop)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, "1.2.3.4.5"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    at = data.rfind(b"\xe0\x7f\x10\x00")
    return data[:at] + extra + (data[at:] if tail is None else tail)


def _element(group: int, elem: int, vr: str, value: bytes) -> bytes:
    import struct

    value += b" " * (len(value) % 2)
    return struct.pack("<HH", group, elem) + vr.encode() + struct.pack("<H", len(value)) + value


@pytest.mark.parametrize(
    ("content", "passes"),
    [
        (lambda: _header(), True),
        (lambda: _header(_element(0x10, 0x20, "LO", b"PAT1"), drop="PatientID"), True),  # out of tag order
        (lambda: _header(_element(0x08, 0x60, "CS", b"CT"), drop="Modality"), True),
        (lambda: _header(_element(0x10, 0x20, "LO", b"EVIL")), False),  # a later, different PatientID
        (lambda: _header(tail=b"\xff" * 37), False),  # a damaged tail after SeriesInstanceUID
    ],
    ids=["good", "patient-id-late", "modality-late", "second-patient-id", "damaged-tail"],
)
def test_the_whole_header_before_the_pixel_data_is_parsed(tmp_path, content, passes):
    """As pydicom's dcmread(stop_before_pixels) parses it: elements out of order are read; a later,
    different copy of a field (the last copy counts) or a damaged tail anywhere before the pixel
    data is a finding."""
    path = tmp_path / "f.dcm"
    path.write_bytes(content())
    assert (file_problems(str(path), ("PAT1", "1.2.3", "1.2.3.4", "CT")) == []) is passes


def test_a_directory_given_as_a_file_leaks_no_descriptor(tmp_path):
    import os

    folder = tmp_path / "x.dcm"
    folder.mkdir()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        assert file_problems(str(folder), ("a", "b", "c", "d")) == [f"{folder}: not a regular file"]
    assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_the_definitions_load_without_pandas_requests_or_the_index_package():
    script = (
        "import sys, dagster, dataset_assets.definitions as d\n"
        "from dataset_assets.core.index.source import IndexSource\n"
        "s = IndexSource.installed()\n"
        "assert s.directory == s.directory.resolve(), s\n"
        "print(sorted(m for m in ('pandas', 'requests', 'urllib3', 'idc_index_data', 'pydicom') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    import idc_index_data

    from dataset_assets.core.index.source import IndexSource

    assert IndexSource.installed().package_version == idc_index_data.__version__


def test_arrow_gives_freed_memory_back_unless_the_user_chose_a_pool():
    """Entry points switch Arrow to the system allocator (mimalloc kept each thread's freed
    segments: planning 200,000 files held 12 MB more than 20,000); Arrow's own
    ARROW_DEFAULT_MEMORY_POOL, when set, is the user's choice and stays."""
    script = (
        "import pyarrow as pa\n"
        "from dataset_assets import settings\n"
        "from dataset_assets.core.arrow_build import give_back_freed_memory\n"
        "give_back_freed_memory(settings.arrow_pool_chosen())\n"
        "print(pa.default_memory_pool().backend_name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "system", done.stderr[-2000:]
    chosen = {**env, "ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=chosen, timeout=120)
    assert done.stdout.strip() == "mimalloc", done.stderr[-2000:]


def test_the_cli_switches_the_allocator_and_the_python_api_leaves_the_hosts(tmp_path):
    """A download or dry run from the command line runs in our process; a program calling the API
    keeps the Arrow pool it has (a library does not change a process-wide setting)."""
    script = textwrap.dedent(
        f"""
        import pyarrow as pa
        default = pa.default_memory_pool().backend_name
        from dataset_assets.api import IDC
        IDC().select("qin_pet_phantom", {str(tmp_path / "api")!r})
        api = pa.default_memory_pool().backend_name
        from dataset_assets.cli import main
        main(["idc", "download", "qin_pet_phantom", {str(tmp_path / "cli")!r}, "--dry-run"], standalone_mode=False)
        print(default, api, pa.default_memory_pool().backend_name)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    default, api, cli = done.stdout.split()[-3:]
    assert default != "system" and api == default and cli == "system", done.stderr[-2000:]
