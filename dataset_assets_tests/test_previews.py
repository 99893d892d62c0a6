"""Previews: the middle image of a series decoded with pydicom into a PNG thumbnail; series that
cannot be decoded named with why; shown on downloaded_collection's materialization."""

import struct
import zlib
from pathlib import Path

import dagster as dg
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from dataset_assets.core.verify.previews import png, previews_markdown, series_preview, thumbnail


def _decode_png(data: bytes) -> np.ndarray:
    """Our PNGs back to pixels (filter type 0 rows, as ``png`` writes them)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    chunks, at = {}, 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length : at + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = body
        at += 12 + length
    channels = 3 if colour == 2 else 1
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[r * (1 + width * channels) + 1 : (r + 1) * (1 + width * channels)] for r in range(height)]
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(height, width, channels).squeeze()


def _image(path: Path, pixels: np.ndarray | None, modality="CT", syntax=ExplicitVRLittleEndian) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
        modality,
    )
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        if syntax == ExplicitVRLittleEndian:
            ds.PixelData = pixels.astype("<u2").tobytes()
        else:  # a JPEG frame (not a valid one): decoding it needs a decoder this host lacks anyway
            ds.PixelData = encapsulate([b"\xff\xd8not a JPEG\xff\xd9"])
            ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.save_as(path, enforce_file_format=syntax == ExplicitVRLittleEndian)


def test_the_middle_image_becomes_a_thumbnail_that_keeps_its_picture(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    ramp = np.tile(np.arange(400, dtype=np.uint16) * 10, (300, 1))  # dark left, bright right
    for n in range(5):
        _image(series / f"{n}.dcm", ramp if n == 2 else np.zeros((300, 400), np.uint16))
    preview = series_preview(series, "1.2.3", "CT")
    assert preview.problem is None and preview.file == "2.dcm"  # the middle file, by name
    pixels = _decode_png(preview.png)
    assert pixels.shape == (100, 134) and pixels.dtype == np.uint8  # at most 192 px: every third pixel
    assert pixels[:, 0].max() < 10 and pixels[:, -1].min() > 245 and (np.diff(pixels[0].astype(int)) >= 0).all()
    colour = _decode_png(png(np.zeros((4, 5, 3), np.uint8) + [255, 0, 0]))
    assert colour.shape == (4, 5, 3) and (colour[..., 0] == 255).all() and thumbnail(np.ones((3, 8, 8))).shape == (8, 8)


def test_series_that_cannot_be_shown_are_named_with_why(tmp_path):
    report, compressed, damaged, empty = (tmp_path / n for n in ("sr", "jpeg", "bad", "none"))
    for folder in (report, compressed, damaged, empty):
        folder.mkdir()
    _image(report / "a.dcm", None, modality="SR")
    _image(compressed / "a.dcm", np.zeros((8, 8), np.uint16), syntax=JPEGBaseline8Bit)
    (damaged / "a.dcm").write_bytes(b"DICM" * 10)
    found = [
        series_preview(f, f.name, m) for f, m in ((report, "SR"), (compressed, "CT"), (damaged, "CT"), (empty, "CT"))
    ]
    assert [p.png for p in found] == [None] * 4
    assert found[0].problem == "no pixel data (SR holds none)"
    assert found[1].problem.startswith("cannot be decoded: ") and found[2].problem.startswith("cannot be decoded: ")
    assert found[3].problem == "no DICOM file on disk"
    text = previews_markdown(found)
    assert text.count("no preview") == 4 and "\n" not in found[1].problem


def test_downloaded_collection_shows_previews(idc_fixture, s3, tmp_path):
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
        [collection_manifest, downloaded_collection], resources=resources, partition_key=idc_fixture.collection_id
    )
    assert result.success
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path == ["downloaded_collection"]]
    metadata = event.materialization.metadata
    assert metadata["previews_shown"].value == 4 and metadata["previews_not_shown"].value == "none"
    assert metadata["previews"].value.count("](data:image/png;base64,") == 4
    files = sorted(Path(metadata["previews_path"].value).glob("*.png"))
    assert len(files) == 4 and all(_decode_png(f.read_bytes()).size for f in files)


def test_an_image_too_large_to_decode_or_deflated_is_named_not_decoded(tmp_path):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    huge, deflated = tmp_path / "huge", tmp_path / "deflated"
    huge.mkdir()
    deflated.mkdir()
    _image(huge / "a.dcm", np.zeros((4, 4), np.uint16))
    import pydicom

    ds = pydicom.dcmread(huge / "a.dcm")
    ds.Rows = ds.Columns = 20000  # 763 MB a frame, in a file of a few bytes of pixels
    ds.save_as(huge / "a.dcm")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.Rows = ds.Columns = 4
    ds.save_as(deflated / "a.dcm", enforce_file_format=True)
    assert series_preview(huge, "1", "CT").problem == "a frame would be 762 MB decoded"
    assert series_preview(deflated, "2", "CT").problem == "deflated datasets are not previewed (their size is unknown)"


def test_preview_files_are_never_written_through_a_link(idc_fixture, s3, tmp_path):
    from dataset_assets.defs.downloads.download_assets import downloaded_collection
    from dataset_assets.defs.downloads.manifest_assets import collection_manifest
    from dataset_assets.lib.resources import IdcResource, S5cmdResource

    root, elsewhere = tmp_path / "idc", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / ".dataset_assets" / "previews").mkdir(parents=True)
    (root / ".dataset_assets" / "previews" / idc_fixture.collection_id).symlink_to(elsewhere)
    resources = {
        "idc": IdcResource(
            index_dir=str(idc_fixture.index_dir), manifest_dir=str(tmp_path / "m"), download_dir=str(root)
        ),
        "s5cmd": S5cmdResource(endpoint_url=s3.endpoint_url, retry_count=1),
    }
    result = dg.materialize(
        [collection_manifest, downloaded_collection], resources=resources, partition_key=idc_fixture.collection_id
    )
    assert result.success  # the data is verified; only the preview files are not written
    assert list(elsewhere.iterdir()) == []
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path == ["downloaded_collection"]]
    assert event.materialization.metadata["previews_shown"].value == 4  # still shown inline


def test_a_run_that_fetched_nothing_shows_the_thumbnails_it_kept(idc_fixture, s3, tmp_path):
    import base64

    from dataset_assets.defs.downloads.download_assets import downloaded_collection
    from dataset_assets.defs.downloads.manifest_assets import collection_manifest
    from dataset_assets.lib.resources import IdcResource, S5cmdResource

    resources = {
        "idc": IdcResource(
            index_dir=str(idc_fixture.index_dir), manifest_dir=str(tmp_path / "m"), download_dir=str(tmp_path / "idc")
        ),
        "s5cmd": S5cmdResource(endpoint_url=s3.endpoint_url, retry_count=1),
    }

    def previews_of_a_run():
        result = dg.materialize(
            [collection_manifest, downloaded_collection], resources=resources, partition_key=idc_fixture.collection_id
        )
        (event,) = [
            e for e in result.get_asset_materialization_events() if e.asset_key.path == ["downloaded_collection"]
        ]
        return event.materialization.metadata

    first = previews_of_a_run()
    files = sorted(Path(first["previews_path"].value).glob("*.png"))
    marker = png(np.full((2, 3), 7, np.uint8))
    files[0].write_bytes(marker)  # what a re-run shows is what was kept, not decoded again
    again = previews_of_a_run()
    assert again["previews_shown"].value == 4 and base64.b64encode(marker).decode() in again["previews"].value
    files[0].unlink()  # one missing: decoded again, and kept again
    third = previews_of_a_run()
    assert third["previews_shown"].value == 4 and files[0].is_file() and files[0].read_bytes() != marker
