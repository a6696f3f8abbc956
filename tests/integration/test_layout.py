"""The package's shape holds: dependencies run one way, and every path and name the docs give exists.

- No import cycle between kvlight's modules (every ``import`` counts, inside functions too, and importing a module
  imports its packages' ``__init__``).
- Nothing imports ``kvlight.cli`` (the command line sits on top); ``kvlight.serving`` loads neither Lightning nor
  ``datasets``; ``import kvlight`` loads no Lightning code.
- Every ``kvlight/...`` path and ``kvlight.x.y`` name in the README, the docs (docs/**/*.md), pyproject.toml and the
  package's docstrings and comments resolves, and so does every Sphinx role (``:func:`name```) in a docstring, from the module it is in.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "kvlight"
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {module_name(path): path for path in MODULES}


def imported(path: Path) -> set[str]:
    """The kvlight modules ``path`` imports, with the packages whose ``__init__`` each import runs."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for target in targets:
            if not target.startswith("kvlight"):
                continue
            parts = target.split(".")
            for end in range(1, len(parts) + 1):
                name = ".".join(parts[:end])
                if name in NAMES:
                    found.add(name)
    found.discard(module_name(path))
    return found


GRAPH = {module_name(path): imported(path) for path in MODULES}


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    # A package's __init__ importing its own modules is how a package is built, not a cycle through them.
    for name in list(GRAPH):
        GRAPH[name] = {dep for dep in GRAPH[name] if not name.startswith(dep + ".")}
    for node in GRAPH:
        if node not in index:
            visit(node)
    assert cycles == []


def test_nothing_imports_the_command_line():
    offenders = {name: deps for name, deps in GRAPH.items() if not name.startswith("kvlight.cli")}
    assert {name for name, deps in offenders.items() if any(d.startswith("kvlight.cli") for d in deps)} == set()


_PROBE = """
import importlib, json, pkgutil, sys
import kvlight
after_kvlight = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "datasets"))
import kvlight.serving
for info in pkgutil.walk_packages(kvlight.serving.__path__, "kvlight.serving."):
    importlib.import_module(info.name)
after_serving = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "datasets"))
print(json.dumps({"kvlight": after_kvlight, "serving": after_serving}))
"""


def test_import_kvlight_and_serving_load_no_lightning_and_no_datasets():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {"kvlight": [], "serving": []}


# ---------------------------------------------------------------------- docs that stay true
PATH = re.compile(r"(?<![\w.~/-])((?:kvlight|configs|bench|tests|notebooks)/[\w/.-]*\w)")
DOTTED = re.compile(r"(?<![\w/])(kvlight(?:\.\w+)+)")
ROLE = re.compile(r":(?:func|class|meth|data|attr|mod):`~?([\w.]+)`")


def resolve(dotted: str, namespace: dict | None = None) -> bool:
    """True when ``dotted`` names a module, or an attribute chain of one (or of ``namespace``)."""
    parts = dotted.split(".")
    if namespace is not None and parts[0] in namespace:
        value = namespace[parts[0]]
        for part in parts[1:]:
            if not hasattr(value, part):
                return False
            value = getattr(value, part)
        return True
    for end in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for part in parts[end:]:
            if not hasattr(value, part):
                return False
            value = getattr(value, part)
        return True
    return False


def doc_texts() -> list[tuple[str, str]]:
    texts = [("README.md", (ROOT / "README.md").read_text()), ("pyproject.toml", (ROOT / "pyproject.toml").read_text())]
    texts += [(str(path.relative_to(ROOT)), path.read_text()) for path in sorted((ROOT / "docs").rglob("*.md"))]
    texts += [(str(path.relative_to(ROOT)), path.read_text()) for path in MODULES]
    return texts


@pytest.mark.parametrize("where,text", doc_texts(), ids=[name for name, _ in doc_texts()])
def test_every_path_and_name_the_docs_give_exists(where, text):
    missing = []
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".")
        if "*" in path or "<" in path or path.endswith("_"):
            continue
        if not (ROOT / path).exists():
            missing.append(path)
    for match in DOTTED.finditer(text):
        name = match.group(1).rstrip(".")
        if not resolve(name):
            missing.append(name)
    assert missing == [], f"{where} names what does not exist: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_every_sphinx_role_in_a_docstring_resolves(path):
    module = importlib.import_module(module_name(path))
    namespace = vars(module)
    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node) or ""
            for match in ROLE.finditer(doc):
                name = match.group(1)
                if not (resolve(name, namespace) or resolve(name) or _member_of_class(name, namespace)):
                    missing.append(name)
    assert missing == [], f"{module_name(path)} docstrings name what does not exist: {missing}"


def _member_of_class(name: str, namespace: dict) -> bool:
    """``:meth:`update``` in a class's docstrings: a member of a class the module defines."""
    for cls in (value for value in namespace.values() if isinstance(value, type)):
        if cls.__module__ == namespace.get("__name__") and hasattr(cls, name.split(".")[0]):
            return True
    return False
