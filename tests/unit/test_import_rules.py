"""The package import rule (docs/ARCHITECTURE.md), read from the source with `ast`, and that doc's
module map kept complete:

    shared/                          imports none of the other packages
    learner/, rollout/, reward_server/  import only shared/ (and themselves), never each other
    services/, analysis/             compose the others: may import anything
    bench/, tests/, scripts/         exempt (tools around the packages)

Every import counts: module level, inside functions (lazy imports), under TYPE_CHECKING, relative
(`from ..config import`) and `importlib.import_module("...")` with a literal name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "learner", "rollout", "reward_server", "services", "analysis")
ALLOWED = {
    "shared": {"shared"},
    "learner": {"learner", "shared"},
    "rollout": {"rollout", "shared"},
    "reward_server": {"reward_server", "shared"},
    "services": set(PACKAGES),
    "analysis": set(PACKAGES),
}
EXEMPT = {"bench", "tests", "scripts"}

# Known violations the lead's refactor of issue #11 removes (learner/ stops driving the engine and the
# grader: the in-process driver moves to services/). Empty this as they go; never add to it.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def imported_modules(source: str, package: list[str]) -> list[tuple[int, str]]:
    """(line, absolute dotted module) for every import in `source`, a module of `package`."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . / from .. : relative to the module's package
                base = package[:len(package) - node.level + 1]
                out.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                out.append((node.lineno, node.module or ""))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append((node.lineno, node.args[0].value))
    return out


def violations() -> list[tuple[str, int, str]]:
    """(file, line, imported module) for every import that breaks the rule."""
    bad = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            package = list(path.relative_to(REPO).parts[:-1])  # a package's __init__ resolves in itself
            for line, mod in imported_modules(path.read_text(), package):
                top = mod.split(".")[0]
                if top in PACKAGES and top not in ALLOWED[pkg]:
                    bad.append((str(path.relative_to(REPO)), line, mod))
    return bad


def test_every_top_level_python_folder_is_classified():
    """A new top-level package must be given a rule here (and a line in docs/ARCHITECTURE.md)."""
    tops = {p.relative_to(REPO).parts[0] for p in REPO.rglob("*.py")
            if not any(part.startswith(".") for part in p.relative_to(REPO).parts)}
    tops = {t for t in tops if (REPO / t).is_dir()}
    assert tops <= set(PACKAGES) | EXEMPT, sorted(tops - set(PACKAGES) - EXEMPT)


def test_packages_import_only_what_the_rule_allows():
    found = violations()
    new = [v for v in found if (v[0], v[2].split(".")[0]) not in KNOWN_VIOLATIONS]
    assert not new, "imports that break the package rule (docs/ARCHITECTURE.md):\n" + "\n".join(
        f"  {f}:{line} imports {mod}" for f, line, mod in new)


def test_known_violations_are_still_real():
    """An allow-list entry whose import is gone must leave the list (so it only ever shrinks)."""
    found = {(f, mod.split(".")[0]) for f, _, mod in violations()}
    assert not KNOWN_VIOLATIONS - found, sorted(KNOWN_VIOLATIONS - found)


def test_module_map_has_one_line_per_module():
    """docs/ARCHITECTURE.md lists every .py file of the packages once; a row for a file that does not
    exist must say it is being added."""
    import re

    rows = re.findall(r"^\| `([\w/]+\.py)` \|(.*)\|$", (REPO / "docs" / "ARCHITECTURE.md").read_text(), re.M)
    listed = [f for f, _ in rows]
    assert len(listed) == len(set(listed)), sorted(f for f in listed if listed.count(f) > 1)
    files = {str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    assert not files - set(listed), f"missing from the module map: {sorted(files - set(listed))}"
    planned = [f for f, what in rows if f not in files]
    assert all("being added" in what for f, what in rows if f in planned), planned


@pytest.mark.parametrize("source,expected", [
    ("import rollout.hf_engine\n", ["rollout.hf_engine"]),
    ("def f():\n    from reward_server.grader import Grader\n", ["reward_server.grader"]),
    ("from ..config import ToyConfig\n", ["shared.config"]),
    ("from . import tasks\n", ["shared.toy"]),
    ("from .build import x\n", ["shared.toy.build"]),
    ("import importlib\nimportlib.import_module('learner.cli')\n", ["importlib", "learner.cli"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from services.queues import Queues\n",
     ["typing", "services.queues"]),
])
def test_the_scanner_sees_every_kind_of_import(source, expected):
    assert [m for _, m in imported_modules(source, ["shared", "toy"])] == expected


# ---------------------------------------------------------------------------------------- import cycles
# Known module cycles, to be removed by their owners (issue #19 item 6: the sandbox's package __init__
# and its modules import each other). Empty this as they go; never add to it.
KNOWN_CYCLES: list[set[str]] = [{"reward_server.sandbox", "reward_server.sandbox.forkserver",
                                 "reward_server.sandbox.harness", "reward_server.sandbox.pool"}]


def module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (any import, lazy ones included)."""
    files = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = list(path.relative_to(REPO).parts[:-1])
        source = path.read_text()
        targets = {t for _, t in imported_modules(source, package)}
        for node in ast.walk(ast.parse(source)):  # `from pkg import name` may name a submodule
            if isinstance(node, ast.ImportFrom):
                [(_, base)] = imported_modules(ast.unparse(node), package)
                targets |= {f"{base}.{a.name}" for a in node.names}
        graph[mod] = {t for t in targets if t in files} - {mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_import_cycles():
    """Two modules that import each other (even lazily) are one idea in two files, or a layer upside
    down; shared.config <-> shared.rundir was one (config-file reading now lives in shared.config)."""
    found = cycles(module_graph())
    assert [c for c in found if c not in KNOWN_CYCLES] == []
    assert all(c in found for c in KNOWN_CYCLES), "a known cycle is gone: remove it from KNOWN_CYCLES"


def test_cycle_finder_sees_a_lazy_cycle():
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": set()}) == [{"a", "b"}]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


# ---------------------------------------------------------------------------------- private names
# Private names one package still imports from another, to be made public by their owners (issue #19
# item 6). Empty this as they go; never add to it.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str]] = set()


def private_imports() -> set[tuple[str, str]]:
    """(file, module.name) for every `_name` a package (or bench/) imports from another package."""
    out = set()
    for pkg in (*PACKAGES, "bench"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    top = node.module.split(".")[0]
                    if top in PACKAGES and top != pkg:
                        out |= {(str(path.relative_to(REPO)), f"{node.module}.{a.name}") for a in node.names
                                if a.name.startswith("_") and not a.name.startswith("__")}
    return out


def test_no_private_names_cross_packages():
    """A `_name` is a module's own business; another package needing it means it should be public."""
    found = private_imports()
    assert found - KNOWN_PRIVATE_IMPORTS == set()
    assert KNOWN_PRIVATE_IMPORTS <= found, "a known private import is gone: remove it from KNOWN_PRIVATE_IMPORTS"
