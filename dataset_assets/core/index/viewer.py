"""IDC viewer links, built as idc-index's ``get_viewer_URL`` builds them.

Slide microscopy (``Modality`` SM) opens in Slim, everything else in OHIF v3::

    <VIEWER_URL>/v3/viewer/?StudyInstanceUIDs=<study>&SeriesInstanceUIDs=<series>
    <VIEWER_URL>/slim/studies/<study>/series/<series>

Without a series, the study alone is opened. No request is made: the URLs are a function of
the UIDs (which are digits and dots, so nothing needs escaping; other values are percent-encoded).
"""

from __future__ import annotations

from urllib.parse import quote

import pyarrow as pa

from dataset_assets.core.arrow_build import strings
from dataset_assets.core.urls import VIEWER_URL


def _q(value: object) -> str:
    return quote(str(value), safe=".")


def viewer_url(study_uid: str | None, series_uid: str | None = None, modality: str | None = None) -> str | None:
    """The IDC viewer URL of a series (or of a study when ``series_uid`` is None); None without a study."""
    if not study_uid:
        return None
    if modality == "SM":
        url = f"{VIEWER_URL}/slim/studies/{_q(study_uid)}"
        return f"{url}/series/{_q(series_uid)}" if series_uid else url
    url = f"{VIEWER_URL}/v3/viewer/?StudyInstanceUIDs={_q(study_uid)}"
    return f"{url}&SeriesInstanceUIDs={_q(series_uid)}" if series_uid else url


def viewer_urls(table: pa.Table) -> pa.Array:
    """One viewer URL per row of a manifest (``StudyInstanceUID``, ``SeriesInstanceUID``, ``Modality``)."""
    columns = table.select(["StudyInstanceUID", "SeriesInstanceUID", "Modality"]).to_pydict()
    return strings(
        [
            viewer_url(study, series, modality)
            for study, series, modality in zip(
                columns["StudyInstanceUID"], columns["SeriesInstanceUID"], columns["Modality"], strict=True
            )
        ]
    )
