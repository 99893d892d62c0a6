"""Selection filters of a manifest (run config, cohorts, the CLI): which series of a collection,
checked as plain values, with no index or Arrow in sight (the definitions load this)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from dataset_assets.core.errors import FilterError
from dataset_assets.core.safety import CONTROL

#: Filter field -> index column.
FILTER_COLUMNS = {
    "modalities": "Modality",
    "body_parts": "BodyPartExamined",
    "patient_ids": "PatientID",
    "study_uids": "StudyInstanceUID",
    "series_uids": "SeriesInstanceUID",
    "analysis_result_ids": "analysis_result_id",
    "licenses": "license_short_name",
}
#: ``analysis_results``: series of analysis results (AI segmentations, annotations: a non-null
#: ``analysis_result_id``) kept with the original data, left out, or kept alone (as idc-index).
ANALYSIS_RESULTS = ("include", "exclude", "only")
#: Filters that are a choice rather than a list of values, with their defaults.
OPTION_DEFAULTS: dict[str, object] = {"analysis_results": "include", "exclude_noncommercial": False}
#: Every filter field.
FILTER_FIELDS = (*FILTER_COLUMNS, *OPTION_DEFAULTS)
#: Filters that apply to the series a cohort's SQL selects (the others belong in its SQL).
SERIES_SET_FILTERS = ("licenses", "analysis_results", "exclude_noncommercial")


def is_noncommercial(license_short_name: str | None) -> bool:
    """Whether a licence forbids commercial use: the Creative Commons NonCommercial family
    (``CC BY-NC 3.0``, ``CC BY-NC 4.0``, ``CC BY-NC-SA`` ...)."""
    return bool(license_short_name) and "-NC" in license_short_name.upper()


def is_restricted(license_short_name: str | None) -> bool:
    """Whether a licence asks more of a user than attribution: anything but plain ``CC BY x.y``
    (NonCommercial licences, the National Library of Medicine's terms, a missing licence)."""
    import re

    return not (license_short_name and re.fullmatch(r"CC BY \d+(\.\d+)?", license_short_name))


@dataclass(frozen=True)
class ManifestFilters:
    """Optional filters; within a field values are OR-ed, across fields AND-ed."""

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    analysis_result_ids: tuple[str, ...] = ()
    licenses: tuple[str, ...] = ()
    analysis_results: str = "include"
    exclude_noncommercial: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, object] | None) -> ManifestFilters:
        """Build from a dict (run config, CLI); unknown fields and non-string values are errors."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(FILTER_FIELDS))
        if unknown:
            raise FilterError(f"unknown filter field(s) {', '.join(unknown)}; valid fields: {', '.join(FILTER_FIELDS)}")
        clean: dict[str, object] = {}
        mode = values.pop("analysis_results", "include")
        if not isinstance(mode, str) or mode not in ANALYSIS_RESULTS:
            raise FilterError(f"filter analysis_results is {mode!r}; it is one of {', '.join(ANALYSIS_RESULTS)}")
        clean["analysis_results"] = mode
        flag = values.pop("exclude_noncommercial", False)
        if not isinstance(flag, bool):
            raise FilterError(f"filter exclude_noncommercial is {flag!r}; it is true or false")
        clean["exclude_noncommercial"] = flag
        for name, raw in values.items():
            if raw is not None and not isinstance(raw, (str, list, tuple, set, frozenset)):
                raise FilterError(f"filter {name} is {raw!r}; give a string or a list of strings")
            items = [raw] if isinstance(raw, str) else list(raw or [])
            for item in items:
                if not isinstance(item, str) or not item.strip():
                    raise FilterError(f"filter {name} has the value {item!r}; values must be non-empty strings")
                if CONTROL.search(item):
                    raise FilterError(f"filter {name} has the value {item!r}; values hold no control characters")
            clean[name] = tuple(dict.fromkeys(i.strip() for i in items))

        if clean["analysis_results"] == "exclude" and clean.get("analysis_result_ids"):
            raise FilterError(
                "analysis_result_ids select analysis results: they cannot go with analysis_results=exclude"
            )
        return cls(**clean)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        """The filters that select something (lists that are not empty, options not at their default)."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in OPTION_DEFAULTS:
                if value != OPTION_DEFAULTS[f.name]:
                    out[f.name] = value
            elif value:
                out[f.name] = list(value)
        return out
