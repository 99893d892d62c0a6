"""Layout templates: parsing, safe values, nothing escapes the download root."""

import os

import pyarrow as pa
import pytest

from dataset_assets.core.errors import LayoutError
from dataset_assets.core.select.layout import DEFAULT_LAYOUT, Layout, sanitize_value

COLUMNS = [
    "collection_id",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Modality_x",
    "crdc_series_uuid",
]


def render(template, rows, **kw):
    table = pa.Table.from_pylist(rows)
    return Layout.parse(template, table.column_names).render(table, **kw).to_pylist()


def row(**kw):
    base = {c: f"v{i}" for i, c in enumerate(COLUMNS)}
    base.update(kw)
    return base


def test_default_layout_reads_longest_column_names():
    parsed = Layout.parse(DEFAULT_LAYOUT, COLUMNS)
    assert parsed.columns == ["collection_id", "PatientID", "StudyInstanceUID", "Modality", "SeriesInstanceUID"]
    parsed = Layout.parse("%collection_id/%Modality_x%%/%SeriesInstanceUID", COLUMNS)
    assert parsed.components[1] == (("col", "Modality_x"), ("lit", "%"))


@pytest.mark.parametrize(
    "value, expected",
    [
        ("..", "_"),
        (".", "_"),
        ("../../etc", ".._.._etc"),
        ("a/b\\c", "a_b_c"),
        ("nul\x00byte", "nul_byte"),
        ("tab\there\nline", "tab_here_line"),
        ("trailing. . ", "trailing"),
        ("CON", "_CON"),
        ("com1.txt", "_com1.txt"),
        ("console", "console"),
        ('a:b*c?d"e<f>g|h', "a_b_c_d_e_f_g_h"),
        ("", "_"),
        (None, "unknown"),
        ("1.2.840.113654", "1.2.840.113654"),
    ],
)
def test_values_become_safe_components(value, expected):
    assert sanitize_value(value) == expected


def test_hostile_values_never_escape_the_root(tmp_path):
    hostile = ["..", "../..", "/etc/passwd", "..\\..\\windows", "\x00", "a/../../b", " ", "...", "C:\\x"]
    rows = [row(PatientID=h, SeriesInstanceUID=f"s{i}") for i, h in enumerate(hostile)]
    for rel in render(DEFAULT_LAYOUT, rows):
        full = os.path.normpath(tmp_path / rel)
        assert os.path.commonpath([full, str(tmp_path)]) == str(tmp_path), rel
        assert all(part not in ("", ".", "..") for part in rel.rstrip("/").split("/"))


@pytest.mark.parametrize(
    "template, message",
    [
        ("", "empty"),
        ("/abs/%SeriesInstanceUID", "absolute"),
        ("C:%SeriesInstanceUID", "absolute"),
        ("../%SeriesInstanceUID", "leave the download root"),
        ("%collection_id//%SeriesInstanceUID", "empty path component"),
        ("%collection_id/%Foo/%SeriesInstanceUID", "unknown placeholder '%Foo'"),
        ("%collection_id/%/x", "unknown placeholder '%/'|unknown placeholder '%'"),
        ("fixed/dir", "no %column placeholder"),
        ("%collection_id/a:b/%SeriesInstanceUID", "not allowed"),
        ("%collection_id/x./%SeriesInstanceUID", "ends with a dot"),
    ],
)
def test_malformed_layouts(template, message):
    with pytest.raises(LayoutError, match=message):
        Layout.parse(template, COLUMNS)


def test_layout_sharing_a_directory_between_series_is_refused():
    rows = [row(SeriesInstanceUID="s1"), row(SeriesInstanceUID="s2")]
    with pytest.raises(LayoutError, match="in one directory.*include %SeriesInstanceUID"):
        render("%collection_id/%PatientID", rows)


def test_literal_only_component_and_escaped_percent():
    rows = [row(SeriesInstanceUID="s1")]
    assert render("dicom/%collection_id/100%%/%SeriesInstanceUID/", rows) == ["dicom/v0/100%/s1/"]


def test_long_component_hashing_is_deterministic_and_independent_of_the_root():
    rows = [row(PatientID="p" * 300, SeriesInstanceUID="s1"), row(SeriesInstanceUID="s2")]
    first = render(DEFAULT_LAYOUT, rows, root_length=100)
    assert first == render(DEFAULT_LAYOUT, rows) == render(DEFAULT_LAYOUT, rows, root_length=3000)
    assert first[0].startswith("v0/_long/") and first[1] == "v0/v1/v2/v4_s2/"
    assert render(DEFAULT_LAYOUT, [row(PatientID="p" * 200, SeriesInstanceUID="s1")], root_length=900)[0].startswith(
        "v0/ppp"
    )


def test_component_over_255_bytes_is_long_even_with_short_path():
    rows = [row(PatientID="é" * 130, SeriesInstanceUID="s1")]
    assert "/_long/" in render(DEFAULT_LAYOUT, rows, max_path=4096)[0]
    with pytest.raises(LayoutError, match="255 bytes"):
        render(DEFAULT_LAYOUT, rows, max_path=4096, long_paths="error")
