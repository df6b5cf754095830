"""The CPU toy world: toy coding problems, an in-process BPE, a ~1M-param Qwen3 and its warm start.

    from shared.toy import build_toy, load_toy_problems
    art = build_toy(cfg.toy)                      # cached; minutes the first time
    model = AutoModelForCausalLM.from_pretrained(art.model_dir)
    train, evals = load_toy_problems(art.dir)

Names resolve lazily so `rankguard --help` does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_toy": "build", "ensure_toy_world": "build", "load_toy_problems": "build", "toy_status": "build",
    "ToyArtifacts": "build", "ToyBuildError": "build", "WarmStartConfig": "warmstart", "QUICK_WARM": "warmstart",
    "make_splits": "tasks", "generate_problems": "tasks", "FAMILIES": "tasks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
