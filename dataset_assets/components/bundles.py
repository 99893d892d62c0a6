"""``HttpBundles``: single files behind public or signed HTTP(S) URLs declared in a ``defs.yaml``,
materialized as the asset ``http_datasets`` (one partition per bundle)."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from dataset_assets import settings
from dataset_assets.components.deprecation import legacy_value
from dataset_assets.core.errors import DatasetError
from dataset_assets.core.fmt import scrub_text
from dataset_assets.core.http.bundles import bundles_from_entries, try_load_bundles
from dataset_assets.lib.bundles import build_http_datasets


class BundleDeclaration(dg.Model, dg.Resolvable):
    """One file behind a URL."""

    name: str = Field(description="Partition key and directory name: letters, digits, `_`, `.`, `-`.")
    url: str = Field(description="A public or signed http(s) URL (query strings are never logged or stored).")
    sha256: str | None = Field(default=None, description="64 hexadecimal digits, verified after the download.")
    size: int | None = Field(default=None, description="Bytes, checked before and after the download.")
    filename: str | None = Field(default=None, description="Default: the URL's last path segment.")
    content_type: str | None = Field(
        default=None,
        description="The media type the server must answer with (type/subtype, e.g. application/zip); without "
        "it only an HTML answer is refused, unless the file name ends in .html/.htm.",
    )


class HttpBundles(dg.Component, dg.Model, dg.Resolvable):
    """Dataset bundles behind HTTP(S) URLs as the partitioned asset `http_datasets`, downloaded to
    `$DATASET_BUNDLES_DIR/<name>/` with retries, resume and verification. Types and unknown keys are
    checked by `dg check yaml`; the rest (names, URLs, digests) when the code location loads: a bundle
    that cannot be used leaves `http_datasets` without partitions, saying why, and every other asset
    loads. `$DATASET_BUNDLES_FILE`, when set, is read instead (deprecated: move its bundles here)."""

    bundles: list[BundleDeclaration] = Field(default=[], description="The bundles, each a partition.")

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        declared = context.path / "defs.yaml"
        legacy = legacy_value(settings.DATASET_BUNDLES_FILE, declared, "HttpBundles", "bundles")
        if legacy:
            bundles, problem = try_load_bundles(Path(legacy))
            return dg.Definitions(assets=[build_http_datasets(Path(legacy), bundles, problem)])
        entries = [b.model_dump(exclude_none=True) for b in self.bundles]
        try:
            bundles, problem = bundles_from_entries(entries, f"bundles of {declared}"), None
        except DatasetError as exc:
            bundles, problem = {}, scrub_text(" ".join(str(exc).split()))
        return dg.Definitions(assets=[build_http_datasets(declared, bundles, problem)])
