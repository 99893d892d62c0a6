"""Checks of the index: every row safe to download, and every series with its uuid and URL.
Counted once per release snapshot (``index_facts``): re-materializing a release costs milliseconds."""

import dagster as dg

from dataset_assets.defs.catalog.index_assets import idc_index
from dataset_assets.lib.resources import IndexDatabase, S5cmdResource


@dg.asset_check(asset=idc_index, blocking=False)
def idc_index_rows_are_safe(duckdb: IndexDatabase, s5cmd: S5cmdResource) -> dg.AssetCheckResult:
    """Every row can be downloaded as it is: its bucket is allowed, `crdc_series_uuid` is a UUID,
    `series_aws_url` is `s3://<aws_bucket>/<crdc_series_uuid>/*`, `collection_id` is a plain name
    and the counts are counts. Downloads refuse such rows one by one (naming them); this says
    ahead of time how many there are (a warning: every other series still downloads). Counted
    once per index snapshot (see `index_facts`), so re-materializing a release costs milliseconds."""
    from dataset_assets.core.index.source import index_facts

    with duckdb.get_connection() as con:
        facts = index_facts(con)
    allowed = set(s5cmd.buckets())
    others = [v for bucket, v in sorted(facts["buckets"].items()) if bucket not in allowed]
    problems = {"bucket_not_allowed": sum(v["count"] for v in others)}
    problems.update({kind: facts["problems"][kind]["count"] for kind in UNSAFE_ROW_KINDS[1:]})
    examples = sorted(
        {e for v in others for e in v["examples"]}
        | {e for kind in UNSAFE_ROW_KINDS[1:] for e in facts["problems"][kind]["examples"]}
    )[:3]
    total = sum(problems.values())
    return dg.AssetCheckResult(
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


@dg.asset_check(asset=idc_index, blocking=True)
def idc_index_urls_present(duckdb: IndexDatabase) -> dg.AssetCheckResult:
    """No series without `crdc_series_uuid` or `series_aws_url`, so every series can be fetched."""
    from dataset_assets.core.index.source import index_facts

    with duckdb.get_connection() as con:
        found = index_facts(con)["problems"]["without_uuid_or_url"]
    nulls, examples = found["count"], found["examples"]
    return dg.AssetCheckResult(
        passed=nulls == 0,
        description=f"{nulls} series without uuid or URL, e.g. {examples}" if nulls else "every series has both",
        metadata={"series_without_uuid_or_url": nulls},
    )


index_checks = [idc_index_rows_are_safe, idc_index_urls_present]
defs = dg.Definitions(asset_checks=index_checks)
