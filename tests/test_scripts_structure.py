"""The benchmark scripts' imports, read with ``ast`` (nothing is run, so no torch): each file of scripts/ is a
top-level module (scripts/ is on pytest's pythonpath, and beside the script that runs), no chain of imports between
them comes back to where it started (so no two import each other), at module level or inside a function; what one
script takes from another is public; the tests reach them without editing ``sys.path``; and every engine of the
registry runs on an export the registry has."""

import ast
from pathlib import Path

import bench_variants

from helpers import find_cycle

ROOT = Path(__file__).resolve().parents[1]


def script_names(folder):
    """The module names of the scripts in ``folder``: one per ``*.py`` file."""
    return {path.stem for path in folder.glob("*.py")}


def script_imports(source, names):
    """{script imported: {names taken from it}} of every import of a module in ``names`` anywhere in ``source``
    (module level, functions, conditionals); ``import x`` takes the attributes read as ``x.attr``."""
    taken = {}
    aliases = {}
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in names:
                    taken.setdefault(alias.name, set())
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in names:
            taken.setdefault(node.module, set()).update(alias.name for alias in node.names)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            taken[aliases[node.value.id]].add(node.attr)
    return taken


def import_graph(folder):
    """{script: {script: {names}}} of the scripts in ``folder``."""
    names = script_names(folder)
    return {path.stem: script_imports(path.read_text(), names - {path.stem}) for path in sorted(folder.glob("*.py"))}


def _is_sys_path(node):
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


def edits_sys_path(source):
    """Whether ``source`` calls a method of ``sys.path`` (insert, append, extend, ...) or assigns to it."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_sys_path(node.func.value):
            return True
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_is_sys_path(t.value if isinstance(t, ast.Subscript) else t) for t in targets):
                return True
    return False


def test_no_two_scripts_import_each_other():
    cycle = find_cycle({module: set(taken) for module, taken in import_graph(ROOT / "scripts").items()})
    assert cycle is None, f"scripts import each other: {' -> '.join(cycle + cycle[:1])}"


def test_what_a_script_takes_from_another_is_public():
    private = [f"{module} takes {imported}.{name}" for module, taken in import_graph(ROOT / "scripts").items()
               for imported, names in taken.items() for name in sorted(names) if name.startswith("_")]
    assert not private


def test_the_tests_reach_the_scripts_without_editing_sys_path():
    names = script_names(ROOT / "scripts")
    users = [path for path in sorted((ROOT / "tests").glob("test_*.py")) if script_imports(path.read_text(), names)]
    assert Path(__file__).resolve() in users
    assert [path.name for path in users if edits_sys_path(path.read_text())] == []


def test_the_checks_find_a_mutual_import_a_private_name_and_a_sys_path_edit():
    graph = {"a": script_imports("def f():\n    from b import _helper\n", {"b"}),
             "b": script_imports("import a\nx = a.y\n", {"a"})}
    assert graph == {"a": {"b": {"_helper"}}, "b": {"a": {"y"}}}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b": set()}, "b": {}}) is None
    assert edits_sys_path("import sys\nsys.path.insert(0, 'scripts')\n")
    assert edits_sys_path("import sys\nsys.path[:0] = ['scripts']\n")
    assert not edits_sys_path("import sys\nprint(sys.path)\n")


def test_every_engine_runs_on_an_export_of_the_registry():
    for name, engine in bench_variants.ENGINES.items():
        assert engine.name == name
        assert (engine.backend is None) == (engine.export is None), name
        assert engine.export is None or engine.export in bench_variants.EXPORTS, name
    assert {engine.export for engine in bench_variants.ENGINES.values()} - {None} == set(bench_variants.EXPORTS)
