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
}


@dataclass(frozen=True)
class ManifestFilters:
    """Optional filters; within a field values are OR-ed, across fields AND-ed."""

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    patient_ids: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, values: Mapping[str, object] | None) -> ManifestFilters:
        """Build from a dict (run config, CLI); unknown fields and non-string values are errors."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(FILTER_COLUMNS))
        if unknown:
            raise FilterError(
                f"unknown filter field(s) {', '.join(unknown)}; valid fields: {', '.join(FILTER_COLUMNS)}"
            )
        clean: dict[str, tuple[str, ...]] = {}
        for name, raw in values.items():
            items = [raw] if isinstance(raw, str) else list(raw or [])  # type: ignore[call-overload]
            for item in items:
                if not isinstance(item, str) or not item.strip():
                    raise FilterError(f"filter {name} has the value {item!r}; values must be non-empty strings")
                if CONTROL.search(item):
                    raise FilterError(f"filter {name} has the value {item!r}; values hold no control characters")
            clean[name] = tuple(dict.fromkeys(i.strip() for i in items))
        return cls(**clean)

    def as_dict(self) -> dict[str, list[str]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name)}
