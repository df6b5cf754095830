"""The code that runs next to untrusted programs imports the standard library only."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import reward_server.sandbox as sandbox

PACKAGE = Path(sandbox.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_sandbox_package_imports_only_the_standard_library():
    files = sorted(PACKAGE.glob("*.py"))
    assert {f.name for f in files} == {"__init__.py", "pool.py", "forkserver.py", "harness.py", "plain.py", "wire.py",
                                      "isolation.py"}
    for f in files:
        for name in _imports(f):
            top = name.split(".")[0]
            inside = name == "reward_server.sandbox" or name.startswith("reward_server.sandbox.")
            assert inside or top in sys.stdlib_module_names or name == "plain", (f.name, name)


def test_old_import_paths_keep_working():
    from reward_server.sandbox import ExecJob, ExecResult, SandboxConfig, SandboxPool, make_executor  # noqa: F401
    from reward_server.sandbox import forkserver, harness, plain  # noqa: F401

    assert SandboxConfig().wall_for(3.0) == 11.0
