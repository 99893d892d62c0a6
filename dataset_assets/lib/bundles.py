"""HTTP dataset bundles as the asset ``http_datasets``, built from declarations (the ``HttpBundles``
component, or the deprecated ``$DATASET_BUNDLES_FILE``): one partition per bundle.

Declarations are outside input: when they cannot be used, the code location still loads and only
``http_datasets`` is affected: it has no partitions, says why in its description and metadata, and
fails when materialized with that one line (naming the file and the problem).
"""

import logging
from pathlib import Path

import dagster as dg

from dataset_assets import settings
from dataset_assets.core.fmt import human_bytes
from dataset_assets.core.http.bundles import Bundle, download_bundle, redact_url, try_load_bundles
from dataset_assets.lib.groups import BUNDLES_GROUP, OWNERS
from dataset_assets.lib.metadata import failure

logger = logging.getLogger(__name__)


def _asset_args(path: Path, **metadata: object) -> dict:
    return {
        "name": "http_datasets",
        "group_name": BUNDLES_GROUP,
        "kinds": {"http"},
        "owners": OWNERS,
        "tags": {"domain": "datasets"},
        "metadata": {"bundles_file": dg.MetadataValue.path(str(path)), **metadata},
    }


def _unavailable(path: Path, problem: str) -> dg.AssetsDefinition:
    """`http_datasets` when the bundles file cannot be loaded: no partitions, fails with ``problem``."""

    @dg.asset(
        description=f"Dataset bundles behind HTTP(S) URLs: unavailable, {problem}. Fix "
        f"{path} and reload the code location.",
        **_asset_args(path, bundles_error=problem),
    )
    def http_datasets() -> dg.MaterializeResult:
        raise failure(problem, retry=False)

    return http_datasets


def _available(path: Path, bundles: dict[str, Bundle]) -> dg.AssetsDefinition:
    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(sorted(bundles)), **_asset_args(path))
    def http_datasets(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        """Dataset bundles published as single files behind HTTP(S) URLs (declared in
        `dataset_assets/defs/bundles/defs.yaml`), downloaded to `$DATASET_BUNDLES_DIR/<name>/` with retries and
        backoff on 429/5xx (a server-requested wait longer than
        `$DATASET_BUNDLES_MAX_RETRY_AFTER_S`, default 300 s, fails), resumed with Range requests,
        verified (size, sha256, Content-Type) and renamed into place atomically. Proxies and CA
        bundle come from the environment."""
        bundle = bundles[context.partition_key]
        root = Path(settings.DATASET_BUNDLES_DIR.require()).absolute() / bundle.name
        context.log.info(f"bundle start name={bundle.name} url={redact_url(bundle.url)}")
        result = download_bundle(bundle, root, limits=settings.http_limits(), log=context.log.info)
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
                "content_type": bundle.content_type or "not given (an HTML answer is refused)",
                "resumed": result.resumed,
                "already_complete": result.skipped,
                "path": dg.MetadataValue.path(str(result.path)),
                "url": redact_url(bundle.url),
            }
        )

    return http_datasets


def build_http_datasets(path: Path, bundles: dict[str, Bundle], problem: str | None = None) -> dg.AssetsDefinition:
    """The `http_datasets` asset for ``bundles`` declared in ``path``; ``problem``: why the
    declarations cannot be used (the asset then has no partitions and fails with the reason)."""
    if problem is not None:
        logger.warning("http_datasets is unavailable: %s", problem)
        return _unavailable(path, problem)
    return _available(path, bundles)


def build_http_datasets_from_file(path: Path) -> dg.AssetsDefinition:
    """The `http_datasets` asset for the bundles file ``path``; never raises because of the file."""
    bundles, problem = try_load_bundles(path)
    return build_http_datasets(path, bundles, problem)
