"""The public surface: a plugin imports from ``harakapy`` and from nothing below it.

``harakapy.__all__`` is the API; the modules under ``harakapy.`` are the server's own and
change between releases. The shipped plugins are held to that (as datasette's
``default_*`` plugins and pytest's built-ins use only the public hook API), and so are the
examples in the docs, which operators copy. Those examples also use nothing that harakapy
does not install: the standard library and harakapy's own dependencies.

Imports are read with ``ast``, so an import inside a function, under ``TYPE_CHECKING`` or
through ``importlib.import_module("harakapy.x")`` counts as much as one at the top.
"""

from __future__ import annotations

import ast
import re
import sys
import textwrap
from pathlib import Path

import pytest

import harakapy
from harakapy import shipped

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# What `pip install harakapy` brings, by import name (pyproject.toml [project]
# dependencies): aiosmtpd, dnspython, pluggy, cryptography, platformdirs, argon2-cffi,
# aiohttp, uvloop.
DEPENDENCIES = frozenset({"harakapy", "aiosmtpd", "dns", "pluggy", "cryptography",
                          "platformdirs", "argon2", "aiohttp", "uvloop"})

_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
_IMPORTERS = {"import_module", "__import__"}


def inner_imports(source: str) -> list[str]:
    """Each way ``source`` reaches below ``harakapy``, as ``"line N: what"``: an import of
    ``harakapy.<module>``, a name that is not in ``harakapy.__all__`` (such as a module:
    ``from harakapy import hookspecs``), a star import, a relative import."""
    public = set(harakapy.__all__)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {alias.name}" for alias in node.names
                      if alias.name.startswith("harakapy.")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                found.append(f"line {node.lineno}: from {'.' * node.level}{module} import")
            elif module.startswith("harakapy."):
                found.append(f"line {node.lineno}: from {module} import")
            elif module == "harakapy":
                found += [f"line {node.lineno}: from harakapy import {alias.name}"
                          for alias in node.names if alias.name not in public]
        elif isinstance(node, ast.Call):
            function = node.func
            name = (function.attr if isinstance(function, ast.Attribute)
                    else function.id if isinstance(function, ast.Name) else "")
            target = node.args[0] if node.args else None
            if (name in _IMPORTERS and isinstance(target, ast.Constant)
                    and isinstance(target.value, str)
                    and target.value.startswith("harakapy.")):
                found.append(f"line {node.lineno}: {name}({target.value!r})")
    return found


def top_level_modules(source: str) -> set[str]:
    """The first component of every absolute import in ``source``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


# -- the checker itself ------------------------------------------------------------------


@pytest.mark.parametrize(("source", "expected"), [
    ("import harakapy\nfrom harakapy import Policy, hookimpl\n", []),
    ("from harakapy.tls.policy import Policy\n", ["line 1: from harakapy.tls.policy import"]),
    ("import harakapy.dns\n", ["line 1: import harakapy.dns"]),
    ("import harakapy.dns as dns\n", ["line 1: import harakapy.dns"]),
    ("from harakapy import hookspecs\n", ["line 1: from harakapy import hookspecs"]),
    ("from harakapy import *\n", ["line 1: from harakapy import *"]),
    ("from . import helper\n", ["line 1: from . import"]),
    ("def f():\n    from harakapy.spool import store\n",
     ["line 2: from harakapy.spool import"]),
    ("import importlib\nimportlib.import_module('harakapy.server')\n",
     ["line 2: import_module('harakapy.server')"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from harakapy.view import X\n",
     ["line 3: from harakapy.view import"]),
])
def test_the_check_sees_every_way_below_the_surface(source, expected):
    assert inner_imports(source) == expected


def test_every_public_name_is_importable():
    namespace: dict[str, object] = {}
    exec("from harakapy import *", namespace)  # what __all__ promises, nothing else
    assert sorted(set(namespace) - {"__builtins__"}) == sorted(harakapy.__all__)
    assert len(harakapy.__all__) == len(set(harakapy.__all__))


# -- the shipped plugins -----------------------------------------------------------------


def shipped_plugin_files() -> list[Path]:
    return sorted(path for path in shipped.PLUGINS_DIR.rglob("*.py")
                  if "__pycache__" not in path.parts)


def test_there_are_shipped_plugins_to_check():
    names = {path.stem for path in shipped_plugin_files()}
    assert {"tls", "relay", "smtp_forward", "flat_file"} <= names


@pytest.mark.parametrize("path", shipped_plugin_files(),
                         ids=lambda path: path.relative_to(shipped.PLUGINS_DIR).as_posix())
def test_shipped_plugin_imports_only_from_harakapy(path):
    found = inner_imports(path.read_text())
    assert found == [], (f"{path.relative_to(ROOT)} reaches below the public API "
                         f"(import from harakapy, names in harakapy.__all__): {found}")


@pytest.mark.parametrize("path", shipped_plugin_files(),
                         ids=lambda path: path.relative_to(shipped.PLUGINS_DIR).as_posix())
def test_shipped_plugin_needs_nothing_harakapy_does_not_install(path):
    extra = top_level_modules(path.read_text()) - DEPENDENCIES - sys.stdlib_module_names
    assert extra == set(), f"{path.relative_to(ROOT)} imports {sorted(extra)}"


# -- the examples in the docs --------------------------------------------------------------


def doc_python_blocks() -> list[tuple[str, int, str]]:
    """``(page, number, source)`` of every ```python block that imports something."""
    out = []
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        name = page.relative_to(ROOT).as_posix()
        blocks = [m.group(2) for m in _FENCE.finditer(page.read_text())
                  if m.group(1) == "python"]
        for number, source in enumerate(blocks):
            if re.search(r"^\s*(from|import) ", source, re.M):
                out.append((name, number, source))
    return out


def test_the_docs_have_examples_to_check():
    pages = {page for page, _, _ in doc_python_blocks()}
    assert {"docs/hooks.md", "docs/plugins.md", "docs/tls-policy.md"} <= pages


DOC_BLOCKS = doc_python_blocks()


def block_ids(blocks: list[tuple[str, int, str]]) -> list[str]:
    return [f"{page}-{number}" for page, number, _ in blocks]


@pytest.mark.parametrize(("page", "number", "source"), DOC_BLOCKS,
                         ids=block_ids(DOC_BLOCKS))
def test_doc_example_imports_only_from_harakapy(page, number, source):
    found = inner_imports(source)
    assert found == [], f"{page}, python block {number}, reaches below harakapy: {found}"


@pytest.mark.parametrize(("page", "number", "source"), DOC_BLOCKS, ids=block_ids(DOC_BLOCKS))
def test_doc_example_needs_nothing_harakapy_does_not_install(page, number, source):
    extra = top_level_modules(source) - DEPENDENCIES - sys.stdlib_module_names
    assert extra == set(), (f"{page}, python block {number}, imports {sorted(extra)}: "
                            f"not the standard library, nor a dependency of harakapy")


def test_plugin_sources_in_tests_import_only_from_harakapy():
    # The tests write plugins as an operator would (strings written into DIR/plugins):
    # they must stand on the public surface as well.
    offenders = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and "@hookimpl" in node.value and "import" in node.value):
                continue
            try:
                found = inner_imports(textwrap.dedent(node.value))
            except SyntaxError:
                continue  # a fragment, not a plugin
            offenders += [f"{path.name}:{node.lineno}: {name}" for name in found]
    assert offenders == []
