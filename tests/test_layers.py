"""The import graph keeps the data flow one-way: source -> decode -> classify -> tally -> readers."""
from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exporter", "compat_api")
# The hot path: pure functions and arrays, upstream of everything that holds state or does I/O.
# tcpflows, like clients' ClientIndex, keeps arrays the capture thread alone owns: no lock, no I/O.
HOT_PATH = {"exporter.decode", "exporter.classify", "exporter.headers", "exporter.clients", "exporter.engine",
            "exporter.frames", "exporter.walk", "exporter.tcpflows"}
# What reads the counters, and what wires the process together: nothing upstream may import them.
READERS_AND_WIRING = {"exporter.collector", "exporter.capture", "exporter.summarize", "exporter.serve",
                      "exporter.startup", "exporter.cli", "exporter.config", "compat_api.app", "compat_api.history"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, dict[str, bool]]:
    """module -> {imported project module: imported at module level (not inside a function)}."""
    graph: dict[str, dict[str, bool]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = module_name(path)
            tree = ast.parse(path.read_text(encoding="utf-8"))
            top_level = {id(node) for node in tree.body}
            imports: dict[str, bool] = {}
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        base = ".".join(name.split(".")[:len(name.split(".")) - node.level] + ([base] if base else []))
                    targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
                elif isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                else:
                    continue
                for target in targets:
                    if target.split(".")[0] in PACKAGES and (ROOT / (target.replace(".", "/") + ".py")).exists():
                        imports[target] = imports.get(target, False) or id(node) in top_level
            imports.pop(name, None)
            graph[name] = imports
    return graph


def test_the_import_graph_has_no_cycle():
    graph = project_imports()
    try:
        list(TopologicalSorter({module: set(imports) for module, imports in graph.items()}).static_order())
    except CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from None


def test_only_the_composition_root_wires_the_exporter_and_the_rest_api_together():
    importers = {module for module, imports in project_imports().items()
                 if module.startswith("exporter") and any(target.startswith("compat_api") for target in imports)}
    assert importers == {"exporter.serve"}


def test_the_hot_path_imports_nothing_that_holds_state_or_does_io():
    for module in HOT_PATH:
        assert set(project_imports()[module]) <= HOT_PATH, module


def test_nothing_upstream_imports_the_readers_or_the_wiring():
    downstream = READERS_AND_WIRING | {"exporter.httpserver", "exporter.webauth", "exporter.__main__"}
    for module, imports in project_imports().items():
        if module in downstream:
            continue
        assert not set(imports) & READERS_AND_WIRING, (module, set(imports) & READERS_AND_WIRING)


def test_scapy_is_imported_only_where_live_capture_needs_it():
    """Replays and summarize run without Scapy's import cost: no module imports it at its top level."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in tree.body:
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(name.split(".")[0] == "scapy" for name in names), path
