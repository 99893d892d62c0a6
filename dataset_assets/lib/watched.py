"""Watched collections: kept downloaded by a schedule, and stale in the UI when left behind.

``build_watched_defs`` makes ``watched_collections_schedule`` (manifest, download and checks of
each watched collection) and records the watch in the definitions' metadata; ``with_watched_freshness``
(applied by ``definitions.py`` to the loaded code location) then gives ``downloaded_collection`` a
freshness policy. Without watched collections downloads are on demand and never stale.
"""

import logging
import warnings
from datetime import timedelta

import dagster as dg

from dataset_assets.core.safety import name_problem
from dataset_assets.defs.automation.refresh import manifest_run_config
from dataset_assets.defs.downloads.jobs import download_collections_job
from dataset_assets.lib.partitions import collection_partitions

WATCHED_METADATA = "idc/watched_collections"
DEFAULT_CRON = "0 3 * * *"
logger = logging.getLogger(__name__)


def watched_problem(collections: list[str], cron_schedule: str, stale_after_hours: float) -> str | None:
    """What makes a watch declaration unusable, in one line, or ``None``."""
    for name in collections:
        problem = name_problem(name, "watched collection")
        if problem:
            return problem
    if not isinstance(cron_schedule, str) or "\n" in cron_schedule:
        return f"cron_schedule {cron_schedule!r} is not a cron string"
    try:
        dg.ScheduleDefinition(name="probe", cron_schedule=cron_schedule, target=dg.AssetSelection.all())
    except Exception:
        return f"cron_schedule {cron_schedule!r} is not a cron string Dagster accepts (e.g. '0 3 * * *')"
    if not 1 <= stale_after_hours <= 24 * 366:
        return f"stale_after_hours {stale_after_hours!r} is not between 1 and 8784"
    return None


def build_watched_defs(
    collections: list[str], cron_schedule: str, stale_after_hours: float, source: str
) -> dg.Definitions:
    """``watched_collections_schedule`` for ``collections`` (never raises: a declaration that
    cannot be used gives a stopped schedule that says why, and no freshness policy)."""
    problem = watched_problem(collections, cron_schedule, stale_after_hours)
    if problem:
        logger.warning("watched collections are not watched: %s: %s", source, problem)
        collections, cron_schedule = [], DEFAULT_CRON
    watched = list(dict.fromkeys(collections))

    @dg.schedule(
        name="watched_collections_schedule",
        job_name=download_collections_job.name,  # the job is declared in defs/downloads/jobs.py
        cron_schedule=cron_schedule,
        description=(
            f"Manifest, download and checks of each watched collection ({', '.join(watched) or 'none yet'}), "
            f"declared in {source}." + (f" Not watching: {problem}." if problem else "")
        ),
        default_status=dg.DefaultScheduleStatus.STOPPED if problem else dg.DefaultScheduleStatus.RUNNING,
    )
    def watched_collections_schedule(context: dg.ScheduleEvaluationContext):
        if problem:
            return dg.SkipReason(f"{source}: {problem}")
        known = set(collection_partitions.get_partition_keys())
        unknown = [c for c in watched if c not in known]
        if unknown:
            context.log.warning(f"watched collections unknown to the index, ignored: {', '.join(unknown)}")
        valid = [c for c in watched if c in known]
        if not valid:
            return dg.SkipReason(
                "no known collection is watched" + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            )
        day = context.scheduled_execution_time.strftime("%Y-%m-%d")
        return [
            dg.RunRequest(
                run_key=f"watched-{pk}-{day}",
                partition_key=pk,
                run_config=manifest_run_config(context.instance, pk),
                tags={"idc/watched": "true", "idc/download": "true"},
            )
            for pk in valid
        ]

    metadata = {WATCHED_METADATA: {"collections": watched, "stale_after_hours": stale_after_hours}} if watched else {}
    return dg.Definitions(schedules=[watched_collections_schedule], metadata=metadata)


def watched_freshness(stale_after_hours: float) -> dg.FreshnessPolicy:
    """Stale (failing) after ``stale_after_hours`` without a download, warned at five eighths of it."""
    fail = timedelta(hours=stale_after_hours)
    return dg.FreshnessPolicy.time_window(fail_window=fail, warn_window=fail * 5 / 8)


def with_watched_freshness(defs: dg.Definitions) -> dg.Definitions:
    """``defs`` with a freshness policy on ``downloaded_collection`` when collections are watched."""
    watch = (defs.metadata or {}).get(WATCHED_METADATA)
    value = getattr(watch, "value", watch)
    if not value or not value.get("collections"):
        return defs
    policy = watched_freshness(float(value["stale_after_hours"]))
    target = dg.AssetKey("downloaded_collection")
    with warnings.catch_warnings():  # a preview API of Dagster 1.13: no warning at every load
        warnings.simplefilter("ignore", dg.PreviewWarning)
        warnings.simplefilter("ignore", dg.BetaWarning)
        return defs.map_asset_specs(
            func=lambda spec: spec.replace_attributes(freshness_policy=policy) if spec.key == target else spec
        )
