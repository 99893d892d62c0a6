"""Checks of the index: every row safe to download, and every series with its uuid and URL.
Counted once per release snapshot (``index_facts``): re-materializing a release costs milliseconds.

They are evaluated in the ``idc_index`` step itself (``INDEX_CHECKS``, the asset's check
specs), from the facts the step has just read: two steps of their own cost each run two steps
of Dagster's bookkeeping and two more database connections, more than the checks themselves.
Selected alone (the UI's "Execute checks", ``AssetSelection.checks``) they run without
materializing the index, on the database as it is."""

import inspect

import dagster as dg

INDEX_KEY = dg.AssetKey("idc_index")


def rows_are_safe(facts: dict, allowed_buckets: tuple[str, ...]) -> dg.AssetCheckResult:
    """Every row can be downloaded as it is: its bucket is allowed, `crdc_series_uuid` is a UUID,
    `series_aws_url` is `s3://<aws_bucket>/<crdc_series_uuid>/*`, `collection_id` is a plain name
    and the counts are counts. Downloads refuse such rows one by one (naming them); this says
    ahead of time how many there are (a warning: every other series still downloads). Counted
    once per index snapshot (see `index_facts`), so re-materializing a release costs milliseconds."""
    allowed = set(allowed_buckets)
    others = [v for bucket, v in sorted(facts["buckets"].items()) if bucket not in allowed]
    problems = {"bucket_not_allowed": sum(v["count"] for v in others)}
    problems.update({kind: facts["problems"][kind]["count"] for kind in UNSAFE_ROW_KINDS[1:]})
    examples = sorted(
        {e for v in others for e in v["examples"]}
        | {e for kind in UNSAFE_ROW_KINDS[1:] for e in facts["problems"][kind]["examples"]}
    )[:3]
    total = sum(problems.values())
    return dg.AssetCheckResult(
        asset_key=INDEX_KEY,
        check_name="idc_index_rows_are_safe",
        passed=total == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{total} unsafe value(s): "
            + ", ".join(f"{n} {kind}" for kind, n in problems.items() if n)
            + f"; e.g. series {examples}"
            if total
            else "every row is safe to download"
        ),
        metadata={**problems, "examples": str(examples or [])},
    )


UNSAFE_ROW_KINDS = (
    "bucket_not_allowed",
    "uuid_not_a_uuid",
    "url_not_bucket_uuid",
    "collection_id_unsafe",
    "bad_counts",
)


def urls_present(facts: dict) -> dg.AssetCheckResult:
    """No series without `crdc_series_uuid` or `series_aws_url`, so every series can be fetched."""
    found = facts["problems"]["without_uuid_or_url"]
    nulls, examples = found["count"], found["examples"]
    return dg.AssetCheckResult(
        asset_key=INDEX_KEY,
        check_name="idc_index_urls_present",
        passed=nulls == 0,
        description=f"{nulls} series without uuid or URL, e.g. {examples}" if nulls else "every series has both",
        metadata={"series_without_uuid_or_url": nulls},
    )


#: The checks of ``idc_index``: a warning, and one that blocks what reads the index.
INDEX_CHECKS = [
    dg.AssetCheckSpec(
        "idc_index_rows_are_safe", asset=INDEX_KEY, blocking=False, description=inspect.getdoc(rows_are_safe)
    ),
    dg.AssetCheckSpec(
        "idc_index_urls_present", asset=INDEX_KEY, blocking=True, description=inspect.getdoc(urls_present)
    ),
]
INDEX_CHECK_KEYS = [spec.key for spec in INDEX_CHECKS]


def index_check_results(facts: dict, allowed_buckets: tuple[str, ...], selected) -> list[dg.AssetCheckResult]:
    """The results of the checks among ``selected`` (check keys), from one read of the facts."""
    results = []
    if INDEX_CHECK_KEYS[0] in selected:
        results.append(rows_are_safe(facts, allowed_buckets))
    if INDEX_CHECK_KEYS[1] in selected:
        results.append(urls_present(facts))
    return results
