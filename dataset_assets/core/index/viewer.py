"""IDC viewer links: which viewer opens a study, and the URL of a study or of a series in it.

The viewer is chosen by the *study*, as idc-index chooses it: a study holding slide-microscopy
series (``SM``) opens in Slim, whose annotation (``ANN``) and segmentation (``SEG``) series it
draws over the slides; any other study in OHIF v3. A user may name the viewer instead
(``ohif_v2``, ``ohif_v3``, ``slim``)::

    ohif_v3  <VIEWER_URL>/v3/viewer/?StudyInstanceUIDs=<study>[&SeriesInstanceUIDs=<series>]
             (or &initialSeriesInstanceUID=<series>, see below)
    ohif_v2  <VIEWER_URL>/viewer/<study>[?SeriesInstanceUID=<series>]
    slim     <VIEWER_URL>/slim/studies/<study>[/series/<series>]

Which OHIF v3 parameter selects a series: ``SeriesInstanceUIDs`` loads *only* the series named,
so an image series of a large study opens at once; a segmentation, structure set, annotation,
report or presentation state (``SEG``, ``RTSTRUCT``, ``ANN``, ``SR``, ...) is drawn over the
images it references, which that filter would leave out, so those get ``initialSeriesInstanceUID``:
the whole study loads and the series is shown first (what idc-index gives every series).

No request is made: URLs are a function of the UIDs (digits and dots; anything else is
percent-encoded).
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import quote

import pyarrow as pa

from dataset_assets.core.arrow_build import strings
from dataset_assets.core.urls import VIEWER_URL

VIEWERS = ("auto", "ohif_v3", "ohif_v2", "slim")
#: Series drawn over the images they reference: OHIF must load the whole study for them.
DERIVED_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "SR", "ANN", "PR", "KO", "REG", "RWV"})


def _q(value: object) -> str:
    return quote(str(value), safe=".")


def choose_viewer(viewer: str, study_has_slides: bool) -> str:
    """The viewer that opens a study: ``viewer`` unless it is ``auto``, then Slim for a study with
    slide-microscopy series and OHIF v3 for any other."""
    if viewer not in VIEWERS:
        raise ValueError(f"viewer {viewer!r} is not one of {', '.join(VIEWERS)}")
    if viewer != "auto":
        return viewer
    return "slim" if study_has_slides else "ohif_v3"


def viewer_url(
    study_uid: str | None,
    series_uid: str | None = None,
    modality: str | None = None,
    *,
    viewer: str = "auto",
    study_has_slides: bool | None = None,
) -> str | None:
    """The IDC viewer URL of a series (or of its study when ``series_uid`` is None); None without
    a study. ``study_has_slides`` (whether the study holds SM series) chooses the viewer under
    ``auto``; unknown, the series' own modality stands in for it."""
    if not study_uid:
        return None
    slides = study_has_slides if study_has_slides is not None else modality == "SM"
    chosen = choose_viewer(viewer, slides)
    study = _q(study_uid)
    if chosen == "slim":
        url = f"{VIEWER_URL}/slim/studies/{study}"
        return f"{url}/series/{_q(series_uid)}" if series_uid else url
    if chosen == "ohif_v2":
        url = f"{VIEWER_URL}/viewer/{study}"
        return f"{url}?SeriesInstanceUID={_q(series_uid)}" if series_uid else url
    url = f"{VIEWER_URL}/v3/viewer/?StudyInstanceUIDs={study}"
    if not series_uid:
        return url
    parameter = "initialSeriesInstanceUID" if modality in DERIVED_MODALITIES else "SeriesInstanceUIDs"
    return f"{url}&{parameter}={_q(series_uid)}"


def viewer_urls(table: pa.Table, slide_studies: Collection[str] = (), viewer: str = "auto") -> pa.Array:
    """One viewer URL per row of a manifest (``StudyInstanceUID``, ``SeriesInstanceUID``,
    ``Modality``); ``slide_studies``: the studies of the table that hold SM series."""
    columns = table.select(["StudyInstanceUID", "SeriesInstanceUID", "Modality"]).to_pydict()
    return strings(
        [
            viewer_url(study, series, modality, viewer=viewer, study_has_slides=study in slide_studies)
            for study, series, modality in zip(
                columns["StudyInstanceUID"], columns["SeriesInstanceUID"], columns["Modality"], strict=True
            )
        ]
    )


def slide_studies(con, table: pa.Table) -> set[str]:
    """The studies of ``table`` (a manifest) that hold slide-microscopy series in ``idc_index``:
    the only ones ``auto`` opens in Slim. Read with one query; a small set even for ``nlst``."""
    studies = table.select(["StudyInstanceUID"])
    con.register("_viewer_studies", studies)
    try:
        rows = con.execute(
            "SELECT DISTINCT StudyInstanceUID FROM idc_index WHERE Modality = 'SM' "
            "AND StudyInstanceUID IN (SELECT StudyInstanceUID FROM _viewer_studies)"
        ).fetchall()
    finally:
        con.unregister("_viewer_studies")
    return {r[0] for r in rows}
