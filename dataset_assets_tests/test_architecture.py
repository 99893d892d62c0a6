"""The shape of the code, read from its imports (module level and inside functions alike): no
cycle, no reaching into another module's private names, and the core below everything else."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dataset_assets"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> our modules it imports; and every private name taken from another module."""
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    private = []
    for module, path in MODULES.items():
        aliases: dict[str, str] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES:
                        edges[module].add(alias.name)
                        aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.ImportFrom):
                target = _target(module, node)
                if not target or not target.startswith("dataset_assets"):
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    if full in MODULES:
                        edges[module].add(full)
                        aliases[alias.asname or alias.name] = full
                    else:
                        edges[module].add(target)
                        if alias.name.startswith("_"):
                            private.append(f"{module}: from {target} import {alias.name}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                private.append(f"{module}: {node.value.id}.{node.attr}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in MODULES or w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_even_through_imports_inside_functions():
    edges, _ = _imports()
    assert _cycles(edges) == []


def test_no_module_takes_another_modules_private_names():
    _, private = _imports()
    assert private == []


def test_the_core_imports_nothing_above_it():
    edges, _ = _imports()
    allowed = ("dataset_assets.core", "dataset_assets.settings")
    above = {
        m: sorted(t for t in targets if t != "dataset_assets" and not t.startswith(allowed))
        for m, targets in edges.items()
        if m.startswith("dataset_assets.core")
    }
    assert {m: t for m, t in above.items() if t} == {}


def test_the_transfer_engine_knows_nothing_of_dicom_or_the_index():
    """Header checks hook into a download through ``EngineOptions.watch_batch``; the engine imports
    neither the verify package (pydicom) nor the index package (DuckDB)."""
    edges, _ = _imports()
    reach = {
        m: sorted(t for t in targets if t.startswith(("dataset_assets.core.verify", "dataset_assets.core.index")))
        for m, targets in edges.items()
        if m.startswith("dataset_assets.core.transfer")
    }
    assert {m: t for m, t in reach.items() if t} == {}


def test_the_checks_above_find_what_they_look_for():
    """The detectors themselves: a cycle and a private import are seen (so the tests above can fail)."""
    cli, download = "dataset_assets.cli", "dataset_assets.cli_download"
    edges = {cli: {download}, download: {cli}}
    edges.update({m: set() for m in MODULES if m not in edges})
    assert _cycles(edges) == [[cli, download]]
    module = ast.parse("from .progress import _parse\n").body[0]
    assert _target("dataset_assets.core.transfer.download", module) == "dataset_assets.core.transfer.progress"
