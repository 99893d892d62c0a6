"""A small IDC release for download tests: real index rows, real DICOM files, a loopback S3 tree.

``build_fixture`` takes real series of a real collection from the installed ``idc-index-data``,
writes ``files_per_series`` DICOM files per series with pydicom (PatientID, StudyInstanceUID,
SeriesInstanceUID and Modality of the row; each file a different size), places them as S3
objects ``<bucket>/<crdc_series_uuid>/<uuid>.dcm`` under ``s3_root``, and writes a fixture index
folder whose ``idc_index.parquet`` holds those rows with ``instanceCount`` and
``series_size_MB`` set to what is really in the bucket. One series is moved to the
``idc-open-data-two`` bucket so that several buckets are exercised.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dataset_assets.core.index.source import BUNDLED, IndexSource

SOP_CLASSES = {
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
}


@dataclass
class Fixture:
    index_dir: Path
    s3_root: Path
    collection_id: str
    rows: list[dict]

    def object_keys(self, row: dict) -> list[str]:
        folder = self.s3_root / row["aws_bucket"] / row["crdc_series_uuid"]
        return sorted(f"{row['crdc_series_uuid']}/{p.name}" for p in folder.iterdir())


def write_dicom(path: Path, row: dict, index: int, pixels: int) -> None:
    """One small but valid DICOM file (explicit VR little endian, 16-bit pixels)."""
    meta = FileMetaDataset()
    sop_class = SOP_CLASSES.get(row["Modality"], "1.2.840.10008.5.1.4.1.1.7")
    sop_instance = generate_uid()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.PatientID = row["PatientID"]
    ds.StudyInstanceUID = row["StudyInstanceUID"]
    ds.SeriesInstanceUID = row["SeriesInstanceUID"]
    ds.Modality = row["Modality"]
    ds.InstanceNumber = index + 1
    ds.Rows, ds.Columns = 1, pixels
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256)) * (pixels * 2 // 256) + bytes(pixels * 2 % 256)
    ds.save_as(path, enforce_file_format=True)


def build_fixture(
    base: Path,
    collection_id: str = "qin_pet_phantom",
    n_series: int = 6,
    files_per_series: int = 4,
    pixels: int = 512,
) -> Fixture:
    """Write the fixture under ``base`` (``index/`` and ``s3/``) and return it."""
    installed = IndexSource.installed()
    index_dir, s3_root = base / "index", base / "s3"
    index_dir.mkdir(parents=True)
    for name in BUNDLED:
        if name != "idc_index":
            shutil.copy(installed.path(name), index_dir / f"{name}.parquet")
    con = duckdb.connect()
    result = con.execute(
        f"SELECT * FROM read_parquet('{installed.path('idc_index')}') WHERE collection_id = ? "
        "ORDER BY SeriesInstanceUID LIMIT ?",
        [collection_id, n_series],
    )
    names = [d[0] for d in result.description]
    rows = [dict(zip(names, values, strict=False)) for values in result.fetchall()]
    for i, row in enumerate(rows):
        if i == len(rows) - 1 and len(rows) > 1:  # one series in another bucket
            row["aws_bucket"] = "idc-open-data-two"
            row["series_aws_url"] = f"s3://idc-open-data-two/{row['crdc_series_uuid']}/*"
        folder = s3_root / row["aws_bucket"] / row["crdc_series_uuid"]
        folder.mkdir(parents=True)
        size = 0
        for j in range(files_per_series):
            path = folder / f"{uuid.uuid4()}.dcm"
            write_dicom(path, row, j, pixels + 37 * j + i)
            size += path.stat().st_size
        row["instanceCount"] = files_per_series
        row["series_size_MB"] = size / 1e6
    schema = pq.read_schema(installed.path("idc_index"))
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, index_dir / "idc_index.parquet")
    return Fixture(index_dir, s3_root, collection_id, rows)


@dataclass
class NextRelease:
    index_dir: Path
    revised: dict  # the revised row (new crdc_series_uuid, same SeriesInstanceUID)
    added: dict
    removed: dict


def next_release(fixture: Fixture, s3_root: Path, base: Path) -> NextRelease:
    """IDC release 26 of the fixture: one series revised (new crdc_series_uuid and objects, 3 files),
    one series added, one removed. New objects are written under ``s3_root``."""
    installed = IndexSource.installed()
    rows = [dict(r) for r in fixture.rows]
    revised, removed = rows[1], rows[4]
    rows.remove(removed)
    con = duckdb.connect()
    result = con.execute(
        f"SELECT * FROM read_parquet('{installed.path('idc_index')}') WHERE collection_id = ? "
        "ORDER BY SeriesInstanceUID LIMIT 1 OFFSET ?",
        [fixture.collection_id, len(fixture.rows)],
    )
    names = [d[0] for d in result.description]
    added = dict(zip(names, result.fetchone(), strict=False))
    rows.append(added)
    revised["crdc_series_uuid"] = str(uuid.uuid4())
    revised["series_aws_url"] = f"s3://{revised['aws_bucket']}/{revised['crdc_series_uuid']}/*"
    for i, row in enumerate((revised, added)):
        row["series_revised_idc_version"] = 26
        folder = s3_root / row["aws_bucket"] / row["crdc_series_uuid"]
        folder.mkdir(parents=True)
        size = 0
        for j in range(3):
            path = folder / f"{uuid.uuid4()}.dcm"
            write_dicom(path, row, j, 700 + 11 * j + i)
            size += path.stat().st_size
        row["instanceCount"], row["series_size_MB"] = 3, size / 1e6
    index_dir = base / "index-v26"
    shutil.copytree(fixture.index_dir, index_dir)
    schema = pq.read_schema(installed.path("idc_index"))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), index_dir / "idc_index.parquet")
    versions = pq.read_table(index_dir / "version_metadata_index.parquet").to_pylist()
    versions.append({"idc_version": 26, "version_timestamp": "2027-01-15"})
    pq.write_table(pa.Table.from_pylist(versions), index_dir / "version_metadata_index.parquet")
    return NextRelease(index_dir, revised, added, removed)
