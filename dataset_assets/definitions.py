"""The code location, ``dataset_assets.definitions:defs``: everything in ``dataset_assets/defs/``,
loaded by Dagster's own component tree (each module declares its ``dg.Definitions``; component
folders hold a ``defs.yaml``); watched collections then give ``downloaded_collection`` its
freshness policy.

The tree is built from the ``defs`` package itself rather than with ``dg.load_from_defs_folder``,
which every process that loads the definitions (each run, each UI or daemon load) paid for twice
over: it finds and parses ``pyproject.toml`` with tomlkit (0.1 s to import) to learn the module
named here, and it adds to the root the JSON schema of every installed component type, for
the UI's component catalogue (0.1–0.4 s, measured by profiling a fresh-home run). The
definitions, the component tree and `dg check defs|yaml` are the same; `dg list components`
still lists the component types (it reads them itself).
"""

from pathlib import Path

import dagster as dg

import dataset_assets.defs as defs_package
from dataset_assets.lib.watched import with_watched_freshness

_DEFS_FOLDER = Path(defs_package.__file__).resolve().parent
_tree = dg.ComponentTree.from_module(defs_module=defs_package, project_root=_DEFS_FOLDER.parents[1])
defs = with_watched_freshness(
    dg.Definitions.merge(_tree.build_defs(_DEFS_FOLDER), dg.Definitions(component_tree=_tree))
)
