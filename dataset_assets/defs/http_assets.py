"""HTTP dataset bundles: single files behind public or signed URLs, one partition per bundle."""

from pathlib import Path

import dagster as dg

from dataset_assets.core.fmt import human_bytes
from dataset_assets.core.http_bundles import download_bundle, load_bundles, redact_url

from .settings import BUNDLES_GROUP, OWNERS, env

DEFAULT_BUNDLES_FILE = Path(__file__).resolve().parents[1] / "bundles.yaml"


def bundles_file() -> Path:
    return Path(env("DATASET_BUNDLES_FILE", str(DEFAULT_BUNDLES_FILE)))


def build_http_datasets(path: Path) -> dg.AssetsDefinition:
    """The `http_datasets` asset for the bundles listed in ``path``."""
    bundles = load_bundles(path)

    @dg.asset(
        name="http_datasets",
        partitions_def=dg.StaticPartitionsDefinition(sorted(bundles)),
        group_name=BUNDLES_GROUP,
        kinds={"http"},
        owners=OWNERS,
        tags={"domain": "datasets"},
        metadata={"bundles_file": dg.MetadataValue.path(str(path))},
    )
    def http_datasets(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Dataset bundles published as single files behind HTTP(S) URLs (listed in
        `$DATASET_BUNDLES_FILE`), downloaded to `$DATASET_BUNDLES_DIR/<name>/` with retries and
        backoff on 429/5xx, resumed with Range requests, verified (size, sha256) and renamed into
        place atomically. Proxies and CA bundle come from the environment."""
        bundle = bundles[context.partition_key]
        root = Path(env("DATASET_BUNDLES_DIR", "data/bundles")).absolute() / bundle.name
        context.log.info(f"bundle start name={bundle.name} url={redact_url(bundle.url)}")
        result = download_bundle(bundle, root, log=context.log.info)
        context.log.info(
            f"bundle end name={bundle.name} bytes={result.bytes} transferred_bytes={result.transferred_bytes} "
            f"duration_s={result.duration_s:.1f} skipped={result.skipped}"
        )
        return dg.MaterializeResult(
            metadata={
                "bytes": result.bytes,
                "size": human_bytes(result.bytes),
                "transferred_bytes": result.transferred_bytes,
                "duration_s": round(result.duration_s, 3),
                "mb_per_s": round(result.mb_per_s, 2),
                "sha256": result.sha256 or "not given",
                "sha256_verified": bool(bundle.sha256),
                "resumed": result.resumed,
                "already_complete": result.skipped,
                "path": dg.MetadataValue.path(str(result.path)),
                "url": redact_url(bundle.url),
            }
        )

    return http_datasets


http_datasets = build_http_datasets(bundles_file())
