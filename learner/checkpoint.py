"""Checkpoints: everything a resumed run needs so its next step equals the uninterrupted run's.

checkpoints/step-<N>/ (N = completed train steps) holds
  adapter.safetensors  delta_S (and delta_Q) per module, fp32
  optimizer.pt         optimizer + scheduler state dicts
  rng.pt               python, numpy and torch RNG states
  state.json           step, policy_version, the resolved config
Written into a temp folder and renamed into place (a crash never leaves a half checkpoint);
only the newest `keep` checkpoints stay.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from shared.adapter import get_delta, set_delta

CKPT_PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that does not fit this run (other model layout, missing file); names the path."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    policy_version: int
    state: dict[str, Any]


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoint_dir(run_dir)
    if not root.exists():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / "state.json").exists():
            try:
                out.append((int(p.name[len(CKPT_PREFIX):]), p))
            except ValueError:
                continue
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1][1] if cks else None


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: str | Path, step: int, policy_version: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, config: dict, extra: dict | None = None,
                    keep: int = 2) -> Path:
    """Atomically write checkpoints/step-<step>/ and prune to the newest `keep`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{CKPT_PREFIX}{step}-", dir=root))
    try:
        tensors = {f"delta_S.{n}": t.contiguous() for n, t in get_delta(model).items()}
        tensors.update({f"delta_Q.{n}": t.contiguous() for n, t in get_delta(model, kind="q").items()})
        save_file(tensors, str(tmp / "adapter.safetensors"), metadata={"step": str(step)})
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None}, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        state = {"step": step, "policy_version": policy_version, "config": config, **(extra or {})}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, restore_rng: bool = True) -> Checkpoint:
    """Load weights (and optimizer, scheduler, RNG) from a step folder into live objects."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise CheckpointError(f"{path} is not a checkpoint (no state.json)")
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "adapter.safetensors"))
    ds = {k[len("delta_S."):]: v for k, v in tensors.items() if k.startswith("delta_S.")}
    dq = {k[len("delta_Q."):]: v for k, v in tensors.items() if k.startswith("delta_Q.")}
    try:
        set_delta(model, ds)
        if dq:
            set_delta(model, dq, kind="q")
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if optimizer is not None or scheduler is not None:
        opt = torch.load(path / "optimizer.pt", weights_only=False)
        if optimizer is not None:
            optimizer.load_state_dict(opt["optimizer"])
        if scheduler is not None and opt.get("scheduler") is not None:
            scheduler.load_state_dict(opt["scheduler"])
    if restore_rng and (path / "rng.pt").exists():
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return Checkpoint(path=path, step=int(state["step"]), policy_version=int(state["policy_version"]), state=state)
