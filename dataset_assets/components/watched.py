"""``IdcWatchedCollections``: collections kept downloaded by a schedule, declared in a ``defs.yaml``."""

import dagster as dg
from pydantic import Field

from dataset_assets import settings
from dataset_assets.components.deprecation import legacy_value
from dataset_assets.lib.watched import DEFAULT_CRON, build_watched_defs


class IdcWatchedCollections(dg.Component, dg.Model, dg.Resolvable):
    """Collections kept downloaded: `watched_collections_schedule` runs manifest, download and checks of
    each (only what changed moves), and `downloaded_collection` gets a freshness policy, so a watched
    collection left behind shows as stale in the UI. Names unknown to the installed index are logged and
    skipped at each tick. A declaration that cannot be used (a name with a control character, a bad cron
    string) gives a stopped schedule saying why; the rest of the code location loads.
    `$IDC_WATCHED_COLLECTIONS`, when set, is read instead of `collections` (deprecated)."""

    collections: list[str] = Field(default=[], description="collection_id values, e.g. [qin_pet_phantom].")
    cron_schedule: str = Field(default=DEFAULT_CRON, description="When to refresh them (cron, UTC).")
    stale_after_hours: float = Field(
        default=48, description="Hours without a download after which a watched collection shows as stale."
    )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        source = str(context.path / "defs.yaml")
        collections = self.collections
        legacy = legacy_value(
            settings.IDC_WATCHED_COLLECTIONS, context.path / "defs.yaml", "IdcWatchedCollections", "collections"
        )
        if legacy is not None:
            collections, source = settings.listed(settings.IDC_WATCHED_COLLECTIONS), "$IDC_WATCHED_COLLECTIONS"
        return build_watched_defs(collections, self.cron_schedule, self.stale_after_hours, source)
