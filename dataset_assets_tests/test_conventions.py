"""Conventions the tools hold: one settings module, nothing done at import, dg and dagster CLIs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from dataset_assets import settings
from dataset_assets_tests.support.envs import project_env

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_the_readme_environment_table_lists_exactly_the_settings():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Environment", 1)[1].split("\n## ", 1)[0]
    table = re.findall(r"^\| `([A-Z0-9_]+)` \|", section, re.M)
    assert table == [s.name for s in settings.SETTINGS]


def _environment_reads(text: str) -> list[int]:
    """Lines of ``text`` that read the process environment in any form: ``os.environ`` (items,
    ``.get``, ``dict(os.environ)``, a copy), ``os.getenv``, ``os.environb``, ``from os import environ``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(text)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("os", "posix", "nt")
            and node.attr in ("environ", "environb", "getenv", "getenvb")
        ) or (
            isinstance(node, ast.ImportFrom)
            and node.module in ("os", "posix", "nt")
            and any(a.name in ("environ", "environb", "getenv", "getenvb", "*") for a in node.names)
        ):
            found.append(node.lineno)
    return found


def test_only_the_settings_module_reads_the_environment():
    offenders = []
    for path in (REPO / "dataset_assets").rglob("*.py"):
        if path.name == "settings.py" and path.parent.name == "dataset_assets":
            continue
        offenders += [f"{path.relative_to(REPO)}:{line}" for line in _environment_reads(path.read_text())]
    assert offenders == []
    # the detector sees every form
    probe = "import os\nfrom os import environ\na = os.environ.get('X')\nb = dict(os.environ)\nc = os.getenv('Y')\n"
    assert sorted(_environment_reads(probe)) == [2, 3, 4, 5]


def test_no_core_module_reads_settings():
    """Configuration enters at the top: the CLI, the Dagster layer and ``settings`` itself read
    settings; the core receives plain values."""
    import ast

    offenders = []
    for path in (REPO / "dataset_assets" / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and ((node.module or "").endswith("settings") or any(a.name == "settings" for a in node.names))
                or isinstance(node, ast.Import)
                and any(a.name.endswith("settings") for a in node.names)
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


IMPORT_PROBE = r"""
import duckdb, warnings, sys, logging
opened = []
real = duckdb.connect
duckdb.connect = lambda *a, **k: opened.append(a) or real(*a, **k)
# Third-party imports may add warnings filters of their own: load them first.
import dagster, dagster_duckdb, pyarrow.parquet, pydicom, requests, yaml, click
before = list(warnings.filters)
import dataset_assets.definitions as d
assert warnings.filters == before, "the definitions changed a warnings filter"
assert opened == [], f"the definitions opened DuckDB at import: {opened}"
keys = d.defs.resolve_assets_def("collection_manifest").partitions_def.get_partition_keys()
print(len(keys))
"""


def test_importing_the_definitions_opens_no_database_and_changes_no_process_state():
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "179"


def test_an_unreadable_index_leaves_the_code_location_loading(tmp_path):
    env = {**os.environ, "IDC_INDEX_DIR": str(tmp_path / "nothing-here")}
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "0"
    assert "no collection partitions: the IDC index cannot be read" in done.stderr


def dg(*args, env=None, cwd=REPO, timeout=300):
    return subprocess.run(
        [str(BIN / "dg"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_dg_check_defs_and_list_defs():
    check = dg("check", "defs")
    assert check.returncode == 0 and "All definitions loaded successfully" in check.stdout + check.stderr, check.stderr
    listed = dg("list", "defs", "--json")
    assert listed.returncode == 0, listed.stderr
    for key in ("idc_index", "idc_collections", "collection_manifest", "downloaded_collection", "http_datasets"):
        assert key in listed.stdout


def test_dg_launch_of_one_partition_against_the_loopback_server(idc_fixture, s3, tmp_path):
    env = project_env(idc_fixture, s3, tmp_path)
    launched = dg(
        "launch", "--assets", "collection_manifest,downloaded_collection", "--partition", "qin_pet_phantom", env=env
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "RUN_SUCCESS" in launched.stdout + launched.stderr
    assert len(list((tmp_path / "idc").rglob("*.dcm"))) == 24
    assert s3.stats["get_object"] == 24


def test_the_readme_design_picture_names_every_package_and_core_module():
    """The picture a newcomer reads is the tree: every folder of the package and every core
    module is named in it, and every name it gives exists."""
    design = (REPO / "README.md").read_text().split("## Design", 1)[1].split("\n## ", 1)[0]
    picture = design.split("```", 2)[1]
    package = REPO / "dataset_assets"
    folders = {p.name for p in package.iterdir() if p.is_dir() and p.name not in ("__pycache__", "deploy")}
    folders |= {p.name for p in (package / "core").iterdir() if p.is_dir() and p.name != "__pycache__"}
    missing_folders = sorted(f for f in folders if f"{f}/" not in picture)
    core_modules = {p.name for p in (package / "core").rglob("*.py") if p.name != "__init__.py"}
    missing_modules = sorted(m for m in core_modules if m not in picture)
    named = set(re.findall(r"\b([a-z_]+\.py)\b", picture))
    every_module = {p.name for p in package.rglob("*.py")}
    assert (missing_folders, missing_modules, sorted(named - every_module)) == ([], [], [])


def test_the_readme_and_docs_links_lead_somewhere():
    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []
