"""The environment variables that declared what components now declare, read for one more release."""

import warnings
from pathlib import Path

from dataset_assets.settings import Setting


def legacy_value(setting: Setting, declared: Path, component: str, what: str) -> str | None:
    """``setting``'s value when set (and a ``DeprecationWarning`` pointing at ``declared``), else ``None``."""
    value = setting.given()
    if value is not None:
        warnings.warn(
            f"{setting.name} ({value}) is deprecated and will be removed in the next release: declare the "
            f"{what} in {declared} (type dataset_assets.components.{component})",
            DeprecationWarning,
            stacklevel=3,
        )
    return value
