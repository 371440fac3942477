"""The import graph: every `qbert` module's imports of other qbert modules, at module level and inside functions
(where the heavy ones are deferred), read from the source. No cycles: a module deferring an import to a function
body still depends on it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"qbert": "qbert", "cli": "qbert.cli", "recipes": "qbert.recipes"}
"""Source folder -> the package it installs as."""


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(tree: ast.AST) -> list[str]:
    """Imported module names, skipping ``if TYPE_CHECKING:`` blocks (annotations only, never executed)."""
    names: list[str] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        names += _imports(node)
    return names


def import_graph(plugins: bool = False) -> dict[str, set[str]]:
    """``{module: the qbert modules it imports}``; ``plugins``: also the recipe registry's own imports of every
    recipe module (``qbert.recipes`` finds them with pkgutil, which the source does not name)."""
    found = modules()
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        targets = set()
        for imported in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            while imported and imported not in found:  # `from qbert.x import name`: the module qbert.x
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):  # a package's own init
                targets.add(imported)
        graph[name] = targets
    if plugins:
        graph["qbert.recipes"] |= {m for m in found if m.startswith("qbert.recipes.") and m != "qbert.recipes.base"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_finds_a_cycle_and_skips_type_checking_imports():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import qbert.x\n"
                     "def f():\n    from qbert.y import z\n")
    assert _imports(tree) == ["typing", "typing.TYPE_CHECKING", "qbert.y", "qbert.y.z"]


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert len(graph) > 80 and "qbert.quant.sites" in graph["qbert.quant.integer_model"]
    assert cycles(graph) == []


def test_config_and_the_quantization_core_do_not_reach_up():
    """Reading a config loads no pipeline, export or model code (``qbert.quant.spec``, the torch-free description
    of a quantizer that configs are made of, aside); the quantization core knows no configs, runs or pipeline."""
    graph = import_graph()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for w in graph[todo.pop()]:
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    above = ("qbert.pipeline", "qbert.quant.", "qbert.models", "qbert.runs")
    assert {m for m in reachable("qbert.config") if m.startswith(above)} == {"qbert.quant.spec"}
    for module in (m for m in graph if m.startswith("qbert.quant.")):
        assert not {m for m in graph[module] if m in ("qbert.config", "qbert.runs") or m.startswith("qbert.pipeline")}


def test_no_cycle_through_the_recipe_registry():
    """With the registry's own imports of every recipe module, still no cycle: recipes call the library below
    them (qbert.quant) and the pipeline calls recipes."""
    assert cycles(import_graph(plugins=True)) == []


def test_recipes_only_call_downward_and_no_stage_is_called_unbound():
    """No recipe module imports the pipeline (data comes through the stage context it is handed), and no recipe
    calls another class's stage unbound (``StaticQuantRecipe.calibrate(self, ...)``)."""
    graph = import_graph()
    recipes = {m: targets for m, targets in graph.items() if m.startswith("qbert.recipes")}
    assert {m: sorted(t for t in targets if t.startswith("qbert.pipeline")) for m, targets in recipes.items()
            if any(t.startswith("qbert.pipeline") for t in targets)} == {}
    unbound = []
    for path in (ROOT / "recipes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("prepare", "calibrate", "convert")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id[:1].isupper()):
                unbound.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
    assert unbound == []
