"""Cohort declarations: the YAML file of named series sets, read and checked as plain values
(no index, no Arrow: the definitions load it). Each cohort has a ``name`` (a plain name: it is a
partition key and a file name) and either ``sql`` or ``collection_id`` with filters; see
``cohorts`` for how a cohort becomes a manifest. The file is outside input: any problem is one
line that names the file and the cohort, and it only affects the cohort assets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dataset_assets.core.errors import DatasetError, FilterError
from dataset_assets.core.fs import DECLARATION_LIMIT, read_small
from dataset_assets.core.safety import name_problem
from dataset_assets.core.select.filters import FILTER_FIELDS, SERIES_SET_FILTERS, ManifestFilters
from dataset_assets.core.select.layout import DEFAULT_LAYOUT

_KEYS = {"name", "sql", "collection_id", "layout", "description", *FILTER_FIELDS}


class CohortError(DatasetError):
    """A cohorts file or a cohort that cannot be used as written."""


@dataclass(frozen=True)
class Cohort:
    name: str
    sql: str | None = None
    collection_id: str | None = None
    filters: ManifestFilters = field(default_factory=ManifestFilters)
    layout: str = DEFAULT_LAYOUT
    description: str = ""


def load_cohorts(path: Path) -> dict[str, Cohort]:
    """The cohorts of ``path``; ``CohortError`` (one line naming the file) when it cannot be used."""
    import yaml

    try:
        data = yaml.safe_load(read_small(path, DECLARATION_LIMIT, follow_links=True).decode("utf-8"))
    except OSError as exc:
        raise CohortError(f"cohorts file {path} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CohortError(f"cohorts file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CohortError(f"cohorts file {path} is not valid YAML{where}") from None
    entries = (data or {}).get("cohorts") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CohortError(f"cohorts file {path} needs a top-level list `cohorts:`")
    return cohorts_from_entries(entries, f"cohorts file {path}")


def cohorts_from_entries(entries: list, source: str) -> dict[str, Cohort]:
    """Cohorts from declarations (mappings as a cohorts file or a ``defs.yaml`` holds them);
    ``CohortError`` naming ``source`` and the cohort when one cannot be used."""
    cohorts: dict[str, Cohort] = {}
    for i, entry in enumerate(entries, 1):
        where = f"{source}, cohort #{i}"
        if not isinstance(entry, dict):
            raise CohortError(f"{where} is not a mapping")
        unknown = sorted(set(entry) - _KEYS)
        if unknown:
            raise CohortError(f"{where} has unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(_KEYS))}")
        problem = name_problem(entry.get("name"), "cohort name")
        if problem:
            raise CohortError(f"{where}: {problem}")
        name = entry["name"]
        if name in cohorts:
            raise CohortError(f"{where}: the name {name!r} is used twice")
        sql, collection_id = entry.get("sql"), entry.get("collection_id")
        if (sql is None) == (collection_id is None):
            raise CohortError(f"{where} ({name}) needs exactly one of `sql` or `collection_id` (with filters)")
        if sql is not None and (not isinstance(sql, str) or not sql.strip()):
            raise CohortError(f"{where} ({name}): `sql` must be a non-empty query")
        if collection_id is not None and not isinstance(collection_id, str):
            raise CohortError(f"{where} ({name}): `collection_id` must be a collection id (text)")
        if sql is not None and any(entry.get(f) for f in FILTER_FIELDS if f not in SERIES_SET_FILTERS):
            raise CohortError(
                f"{where} ({name}): filters other than {', '.join(SERIES_SET_FILTERS)} go with `collection_id`; "
                "put them in the SQL instead"
            )
        try:
            filters = ManifestFilters.from_mapping({f: entry[f] for f in FILTER_FIELDS if f in entry})
        except FilterError as exc:
            raise CohortError(f"{where} ({name}): {exc}") from None
        layout = entry.get("layout", DEFAULT_LAYOUT)
        if not isinstance(layout, str):
            raise CohortError(f"{where} ({name}): `layout` must be a string")
        cohorts[name] = Cohort(
            name,
            sql.strip().rstrip(";") if sql else None,
            collection_id,
            filters,
            layout,
            str(entry.get("description") or ""),
        )
    return cohorts


def try_load_cohorts(path: Path) -> tuple[dict[str, Cohort], str | None]:
    """(cohorts, None), or ({}, one line saying why not): never raises."""
    try:
        return load_cohorts(path), None
    except CohortError as exc:
        return {}, str(exc)
    except Exception as exc:
        return {}, f"cohorts file {path} cannot be used: {exc.__class__.__name__}"
