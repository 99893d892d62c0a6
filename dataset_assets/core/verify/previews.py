"""Previews a person can look at: the middle image of a series on disk, decoded with pydicom,
windowed to 8 bits, shrunk to a thumbnail and encoded as PNG (with zlib: no imaging library).

A series that cannot be decoded (a compressed transfer syntax without its decoder, no pixel
data such as a structured report, a damaged file) is named with the reason, never an error: a
preview is a courtesy, the download is what was verified.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

THUMBNAIL_PX = 192
#: Files larger than this are not decoded for a preview (a whole-slide level, a 4D series).
MAX_DECODE_BYTES = 64 << 20
#: Nor is a frame whose pixels would take more than this once decoded (read from the header first:
#: a small compressed file can hold a huge image).
MAX_FRAME_BYTES = 128 << 20


@dataclass(frozen=True)
class Preview:
    series_uid: str
    modality: str
    file: str
    png: bytes | None
    problem: str | None = None


def png(pixels) -> bytes:
    """``pixels`` (a 2-D uint8 array, or H x W x 3) as a PNG file."""
    import numpy as np

    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    colour = 2 if pixels.ndim == 3 else 0
    raw = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def thumbnail(array, size: int = THUMBNAIL_PX):
    """A frame of pixel data as an 8-bit thumbnail: the middle frame of a multi-frame image,
    windowed between its 1st and 99th percentiles, shrunk by striding to at most ``size`` pixels."""
    import numpy as np

    a = np.asarray(array)
    if a.ndim == 4 or (a.ndim == 3 and a.shape[-1] not in (3, 4)):  # frames first
        a = a[a.shape[0] // 2]
    if a.ndim == 3:
        a = a[..., :3]
    step = max(1, -(-max(a.shape[0], a.shape[1]) // size))
    a = a[::step, ::step].astype(np.float64)
    low, high = np.percentile(a, 1), np.percentile(a, 99)
    if high <= low:
        high = low + 1
    return (np.clip((a - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def series_preview(folder: Path, series_uid: str, modality: str) -> Preview:
    """The preview of the series in ``folder``: its middle ``.dcm`` file (by name), decoded."""
    import pydicom

    names = sorted(p.name for p in folder.glob("*.dcm")) if folder.is_dir() else []
    if not names:
        return Preview(series_uid, modality, "", None, "no DICOM file on disk")
    name = names[len(names) // 2]
    path = folder / name
    try:
        if path.stat().st_size > MAX_DECODE_BYTES:
            return Preview(series_uid, modality, name, None, f"its middle file is over {MAX_DECODE_BYTES >> 20} MB")
        meta = pydicom.filereader.read_file_meta_info(path)
        if meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
            return Preview(
                series_uid, modality, name, None, "deflated datasets are not previewed (their size is unknown)"
            )
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if "Rows" not in header or "Columns" not in header:
            return Preview(series_uid, modality, name, None, f"no pixel data ({modality} holds none)")
        frame = int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel", 1) or 1)
        frame *= -(-int(header.get("BitsAllocated", 16) or 16) // 8)
        if frame > MAX_FRAME_BYTES:
            return Preview(series_uid, modality, name, None, f"a frame would be {frame >> 20:,} MB decoded")
        frames = int(header.get("NumberOfFrames", 1) or 1)
        from pydicom.pixels import pixel_array

        with open(path, "rb") as handle:  # one frame (the middle one) is decoded, not all of them
            pixels = pixel_array(handle, index=frames // 2 if frames > 1 else None)
        return Preview(series_uid, modality, name, png(thumbnail(pixels)))
    except Exception as exc:  # any reason a file cannot be shown is named, never raised
        reason = " ".join(str(exc).split())[:160] or exc.__class__.__name__
        return Preview(series_uid, modality, name, None, f"cannot be decoded: {reason}")


def previews(root: Path, rows: list[dict], limit: int = 4) -> list[Preview]:
    """Previews of the first ``limit`` series of ``rows`` (manifest rows) downloaded under ``root``."""
    return [
        series_preview(root / row["target_dir"], row["SeriesInstanceUID"], row.get("Modality") or "")
        for row in rows[:limit]
    ]


def kept_previews(folder: Path, rows: list[dict]) -> list[Preview] | None:
    """The previews of ``rows`` written before in ``folder`` (regular files, never through a link),
    or ``None`` unless every one of them is there."""
    from dataset_assets.core.fs import read_small

    if folder.is_symlink():
        return None
    found = []
    for row in rows:
        path = folder / f"{row['SeriesInstanceUID']}.png"
        try:
            data = read_small(path, 4 << 20)  # a regular file of ours: no link, no FIFO, nothing huge
        except OSError:
            return None
        found.append(Preview(row["SeriesInstanceUID"], row.get("Modality") or "", path.name, data))
    return found


def previews_markdown(found: list[Preview]) -> str:
    """The previews as Markdown: each thumbnail inline (a PNG data URI), the others named with why."""
    import base64

    lines = []
    for p in found:
        if p.png is not None:
            data = base64.b64encode(p.png).decode()
            lines.append(
                f"**{p.modality}** `{p.series_uid}` ({p.file})\n\n![{p.series_uid}](data:image/png;base64,{data})\n"
            )
        else:
            lines.append(f"- **{p.modality}** `{p.series_uid}`: no preview, {p.problem}")
    return "\n".join(lines)
