"""The shape of the export package (docs/export.md): no import cycle among its modules, counting the imports inside
functions too; the options and recipe types import no other export module; no module is over the size limit.

These tests read the source with ``ast`` and import nothing from the package (the pipeline registry comes from the
runtime).
"""

import ast
from pathlib import Path

import pytest

from helpers import find_cycle

EXPORT = Path(__file__).resolve().parent.parent / "export"
PACKAGE = "framegraph.export"
LEAVES = ("options", "recipe")  # the types every other export module may import
MAX_LINES = 400


def _submodule(dotted):
    """``x`` for ``framegraph.export.x`` (or ``framegraph.export.x.y``); None outside the package."""
    if dotted.startswith(PACKAGE + "."):
        return dotted[len(PACKAGE) + 1:].split(".")[0]
    return None


def imported_modules(path):
    """Names (relative to framegraph.export) of the export modules ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_submodule(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                module = f"{PACKAGE}.{module}" if module else PACKAGE
            if module == PACKAGE:  # from framegraph.export import x
                found.update(alias.name for alias in node.names)
            else:
                found.add(_submodule(module))
    return {name for name in found if name and (path.parent / f"{name}.py").is_file()} - {path.stem}


def import_graph(folder=EXPORT):
    """{module: the export modules it imports}; the registry also imports, by name, the recipe module of every
    pipeline kind registered in ``framegraph.runtime.pipelines.PIPELINES``."""
    graph = {path.stem: imported_modules(path) for path in sorted(Path(folder).glob("*.py"))}
    if "registry" in graph and folder == EXPORT:
        graph["registry"] |= registered_recipe_modules()
    return graph


def registered_recipe_modules():
    from framegraph.runtime.pipelines import PIPELINES

    return {_submodule(entry.export_module) for entry in PIPELINES.values()}


def test_export_modules_have_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle in framegraph.export: {' -> '.join(cycle)}; move what both sides need " \
                          "into a module that neither imports (see docs/export.md)"


def test_cycle_finder_sees_function_level_and_package_imports(tmp_path):
    (tmp_path / "a.py").write_text("from framegraph.export import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from framegraph.export.c import g\n")
    (tmp_path / "c.py").write_text("def g():\n    import framegraph.export.a\n")
    (tmp_path / "d.py").write_text("from .a import x\nimport framegraph.models.layers\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("leaf", LEAVES)
def test_options_and_recipe_types_are_leaves(leaf):
    assert import_graph()[leaf] == set(), f"export/{leaf}.py must import no other framegraph.export module"


def test_only_the_registry_imports_by_a_computed_name_and_only_registered_recipes():
    """The import graph above is the whole graph: the one ``importlib.import_module`` of an export module is the
    registry's, of the recipe modules registered for the pipeline kinds, each of which exists and has a ``recipe``."""
    for path in sorted(EXPORT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
                text = ast.unparse(node.args[0]) if node.args else ""
                assert path.stem == "registry" or "framegraph.export" not in text, \
                    f"{path.name}: import {text} directly instead"
    for module in registered_recipe_modules():
        tree = ast.parse((EXPORT / f"{module}.py").read_text(encoding="utf-8"))
        assert "recipe" in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, module


def test_export_modules_stay_small():
    for path in sorted(EXPORT.glob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= MAX_LINES, f"export/{path.name} has {lines} lines; split it (at most {MAX_LINES})"
