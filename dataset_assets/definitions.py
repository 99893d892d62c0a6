"""The code location, ``dataset_assets.definitions:defs``: everything in ``dataset_assets/defs/``,
loaded as Dagster's component tree (each module declares its ``dg.Definitions``; component
folders hold a ``defs.yaml``); watched collections then give ``downloaded_collection`` its
freshness policy.

The tree is built from the ``defs`` package itself. ``dg.load_from_defs_folder``, which every
process that loads the definitions pays for (each run, each UI or daemon load), does two more
things: it finds and parses ``pyproject.toml`` with tomlkit (0.1 s to import) to learn the module
named here, and it adds the JSON schema of every installed component type for the UI's component
catalogue, and components made in the UI (0.1–0.4 s, measured by profiling a fresh-home run).
The assets, checks, jobs, schedules, sensors and resources are the same either way, and so are
``dg check defs|yaml`` and ``dg list defs|components``. ``DATASET_COMPONENT_CATALOGUE=1`` chooses
Dagster's loader, for a team that wants the catalogue in the UI.
"""

from pathlib import Path

import dagster as dg

import dataset_assets.defs as defs_package
from dataset_assets import settings
from dataset_assets.lib.watched import with_watched_freshness

_DEFS_FOLDER = Path(defs_package.__file__).resolve().parent


def _load() -> dg.Definitions:
    if settings.component_catalogue():
        return dg.load_from_defs_folder(path_within_project=_DEFS_FOLDER)
    tree = dg.ComponentTree.from_module(defs_module=defs_package, project_root=_DEFS_FOLDER.parents[1])
    return dg.Definitions.merge(tree.build_defs(_DEFS_FOLDER), dg.Definitions(component_tree=tree))


defs = with_watched_freshness(_load())
