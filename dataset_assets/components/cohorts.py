"""``IdcCohorts``: named sets of series declared in a ``defs.yaml``, materialized as the assets
``cohort_manifest`` and ``downloaded_cohort`` (one partition per cohort)."""

import logging
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from dataset_assets import settings
from dataset_assets.components.deprecation import legacy_value
from dataset_assets.core.select.cohort_file import CohortError, cohorts_from_entries, try_load_cohorts
from dataset_assets.core.select.layout import DEFAULT_LAYOUT
from dataset_assets.lib.cohorts import build_cohort_defs

logger = logging.getLogger(__name__)


class CohortDeclaration(dg.Model):
    """One cohort: ``sql``, or ``collection_id`` with filters."""

    name: str = Field(description="A plain name (letters, digits, `.`, `_`, `-`): the partition key and file name.")
    description: str = Field(default="", description="What the cohort is, shown in the UI.")
    sql: str | None = Field(
        default=None,
        description="One SELECT over the local indices (idc_index, collections_index, prior_versions_index and "
        "any fetched with `dataset idc fetch`) returning SeriesInstanceUID or crdc_series_uuid.",
    )
    collection_id: str | None = Field(default=None, description="A collection, with the filters below.")
    modalities: list[str] = Field(default=[], description="Keep series of these Modality values.")
    body_parts: list[str] = Field(default=[], description="Keep series of these BodyPartExamined values.")
    patient_ids: list[str] = Field(default=[], description="Keep series of these PatientID values.")
    study_uids: list[str] = Field(default=[], description="Keep series of these StudyInstanceUID values.")
    series_uids: list[str] = Field(default=[], description="Keep only these SeriesInstanceUID values.")
    analysis_result_ids: list[str] = Field(default=[], description="Keep only series of these analysis results.")
    analysis_results: Literal["include", "exclude", "only"] = Field(
        default="include",
        description="Series of analysis results: kept with the original data, left out, or kept alone "
        "(with `sql` too).",
    )
    licenses: list[str] = Field(default=[], description="Keep only series under these licences (with `sql` too).")
    exclude_noncommercial: bool = Field(
        default=False, description="Leave out series whose licence forbids commercial use (with `sql` too)."
    )
    layout: str = Field(default=DEFAULT_LAYOUT, description="Directory of each series below the download root.")


class IdcCohorts(dg.Component, dg.Model, dg.Resolvable):
    """Cohorts of IDC series as partitioned assets (`cohort_manifest`, `downloaded_cohort` and their
    checks). Types and unknown keys are checked by `dg check yaml` (file, line and column); the
    rest (names, exactly one of `sql` or `collection_id`, filter values, layouts) when the code
    location loads: a cohort that cannot be used leaves the cohort assets without partitions,
    saying why, and every other asset loads. `$IDC_COHORTS_FILE`, when set, is read instead of
    these declarations (deprecated: move its cohorts here)."""

    cohorts: list[CohortDeclaration] = Field(default=[], description="The cohorts, each a partition.")

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        legacy = legacy_value(settings.IDC_COHORTS_FILE, context.path / "defs.yaml", "IdcCohorts", "cohorts")
        if legacy:
            cohorts, problem = try_load_cohorts(Path(legacy))
        else:
            entries = [c.model_dump(exclude_none=True) for c in self.cohorts]
            try:
                cohorts, problem = cohorts_from_entries(entries, f"{context.path / 'defs.yaml'}"), None
            except CohortError as exc:
                cohorts, problem = {}, str(exc)
        if problem:
            logger.warning("cohort assets have no partitions: %s", problem)
        return build_cohort_defs(cohorts, problem)
