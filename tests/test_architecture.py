"""The shape of the code: which parts of harakapy may import which (what plugins may
import is tests/test_public_api.py's).

Every import counts, the ones under ``TYPE_CHECKING`` and inside functions too: a type
annotation that needs another package is a dependency on it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "harakapy"


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            names.add(target)
            # "from harakapy import hookspecs" imports a module, not a name
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _component(module: str) -> str | None:
    """The part of harakapy a module belongs to: ``harakapy.outbound`` for everything in
    that package, the module itself for a top-level module; ``None`` for the root."""
    parts = module.split(".")
    if parts[0] != "harakapy" or len(parts) < 2:
        return None
    candidate = PACKAGE / parts[1]
    if candidate.is_dir() or (PACKAGE / f"{parts[1]}.py").is_file():
        return f"harakapy.{parts[1]}"
    return None  # a name re-exported by harakapy/__init__.py


def import_graph() -> dict[str, set[str]]:
    """Each part of harakapy (subpackage or top-level module) and the parts it imports."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        is_package = relative.name == "__init__"
        module = ".".join(relative.parts[:-1] if is_package else relative.parts)
        source = _component(module)
        if source is None:
            continue  # harakapy/__init__.py: the public surface imports everything
        graph[source]
        for name in _imported(ast.parse(path.read_text()), module, is_package):
            target = _component(name)
            if target is not None and target != source:
                graph[source].add(target)
    return dict(graph)


def test_the_parts_of_harakapy_import_each_other_without_cycles():
    graph = import_graph()
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None
    assert "harakapy.server" in order


def test_the_inbound_and_outbound_halves_meet_only_in_the_spool_and_the_plugin_manager():
    graph = import_graph()
    assert "harakapy.inbound" not in graph["harakapy.outbound"]
    assert "harakapy.outbound" not in graph["harakapy.inbound"]
    for half in ("harakapy.inbound", "harakapy.outbound"):
        assert "harakapy.server" not in graph[half]
        assert "harakapy.plugins" not in graph[half]  # only dispatch.HookCaller
    assert graph["harakapy.spool"] <= set()
    assert "harakapy.outbound" not in graph["harakapy.tls"]


def test_the_checker_sees_a_cycle_when_there_is_one():
    graph = {"harakapy.a": {"harakapy.b"}, "harakapy.b": {"harakapy.a"}}
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError:
        return
    raise AssertionError("no cycle found")


if __name__ == "__main__":  # the graph for a reader: python -m tests.test_architecture
    for part, imports in sorted(import_graph().items()):
        print(f"{part:28} -> {', '.join(sorted(imports)) or '-'}")
