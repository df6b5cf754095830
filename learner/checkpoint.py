"""Checkpoints: everything a resumed run needs so its next step equals the uninterrupted run's.

checkpoints/step-<N>/ (N = completed train steps) holds
  adapter.safetensors  delta_S (and delta_Q) per module, fp32
  optimizer.pt         optimizer + scheduler state dicts
  rng.pt               python, numpy and torch RNG states
  state.json           step, policy_version, the resolved config, the run's identity
  manifest.json        size and sha256 of each file above, the run's identity
  complete             written last: the checkpoint is whole
Written (and fsynced) into a temp folder, then renamed into place, so a crash never leaves a half
checkpoint under a step-<N> name. On resume the newest checkpoint that verifies (marker, manifest,
sizes, hashes) is used; a newer incomplete or corrupt one is skipped with a warning naming it.
Pruning keeps the newest `keep` complete checkpoints and removes only folders older than those.

Identity: each checkpoint carries {"run_id", "config_fingerprint"} (shared.rundir.run_identity). A
resume that finds another run's checkpoint stops with one line naming it (two runs must never share a
checkpoints folder), and pruning never removes a checkpoint of another run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from shared.adapter import get_delta, set_delta
from shared.rundir import RESUME_MUTABLE, check_config_drift

CKPT_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
COMPLETE = "complete"
DEFAULT_KEEP = 3
log = logging.getLogger("rankguard.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt, other model layout); names the file."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    policy_version: int
    state: dict[str, Any]


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every checkpoints/step-<N>/ folder, complete or not, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.exists():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(CKPT_PREFIX):
            try:
                out.append((int(p.name[len(CKPT_PREFIX):]), p))
            except ValueError:
                continue
    return sorted(out)


# -------------------------------------------------------------------------------- verification

def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_legacy(path: Path) -> bool:
    """Written before manifests existed (state.json, no manifest, no marker): usable, unverified."""
    return (path / "state.json").exists() and not (path / MANIFEST).exists() and not (path / COMPLETE).exists()


def checkpoint_problem(path: str | Path, deep: bool = True) -> str | None:
    """None when the checkpoint is whole, else what is wrong, naming the file. deep: also compare
    every file's sha256 with the manifest (resume); shallow: marker, manifest and sizes (pruning)."""
    path = Path(path)
    if is_legacy(path):
        return None
    if not (path / COMPLETE).exists():
        return f"{path} is incomplete (no '{COMPLETE}' marker)"
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{path / MANIFEST} is missing"
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"{path / MANIFEST} is unreadable ({e})"
    for name, meta in files.items():
        f = path / name
        if not f.exists():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != meta["size"]:
            return f"{f} has {size} bytes, the manifest says {meta['size']} (truncated?)"
        if deep and _sha256(f) != meta["sha256"]:
            return f"{f} does not match its sha256 in the manifest (corrupt)"
    return None


def checkpoint_identity(path: str | Path) -> dict | None:
    """The identity a checkpoint was written with (from its manifest), None when it has none."""
    path = Path(path)
    try:
        ident = json.loads((path / MANIFEST).read_text()).get("identity")
    except (OSError, ValueError, AttributeError):
        return None
    return ident if isinstance(ident, dict) else None


def foreign_reason(path: str | Path, identity: dict | None, config: dict | None = None) -> str | None:
    """Why the checkpoint belongs to another run than `identity`, else None. A checkpoint without an
    identity (written before identities existed) is this run's. A fingerprint that differs only
    because of keys added since at their defaults is the same config (shared.rundir's drift rule)."""
    theirs = checkpoint_identity(path)
    if identity is None or theirs is None:
        return None
    drift = ""
    if config is not None and theirs.get("config_fingerprint") != identity.get("config_fingerprint"):
        try:
            saved = json.loads((Path(path) / "state.json").read_text()).get("config") or {}
        except (OSError, ValueError, AttributeError):
            saved = {}
        drift = check_config_drift(saved, config, RESUME_MUTABLE).describe(3)
    if theirs.get("run_id") != identity.get("run_id"):
        return f"run id {theirs.get('run_id')}, not this run's {identity.get('run_id')}" + (f"; {drift}" if drift else "")
    if drift:
        return f"config fingerprint {theirs.get('config_fingerprint')} != {identity.get('config_fingerprint')}: {drift}"
    return None


def latest_checkpoint(run_dir: str | Path, identity: dict | None = None, config: dict | None = None) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is skipped with a warning.
    With `identity`: a checkpoint of another run stops the resume (CheckpointError, one line)."""
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            if is_legacy(path):
                log.warning("checkpoint %s has no manifest (written by an older version); using it unverified", path)
            reason = foreign_reason(path, identity, config)
            if reason is not None:
                raise CheckpointError(
                    f"{path} belongs to another run ({reason}); refusing to resume from it. Each run needs its "
                    "own checkpoints folder: give this run its own run dir (compose: its own RUN_NAME under "
                    "/runs), or move that folder away")
            return path
        log.warning("skipping checkpoint %s: %s", path.name, problem)
    return None


def resume_point(run_dir: str | Path) -> str:
    """Where a resume of this run dir would start, in words (for stop/resume log lines)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return "no checkpoint yet: a resume starts over at step 0"
    return f"a resume continues from {path}"


# -------------------------------------------------------------------------------- writing

def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path, step: int, identity: dict | None = None) -> None:
    files = {}
    for f in sorted(folder.iterdir()):
        _fsync(f)
        files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    manifest = {"step": step, "files": files, **({"identity": identity} if identity else {})}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(folder / MANIFEST)
    (folder / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    _fsync(folder / COMPLETE)
    _fsync(folder)


def save_checkpoint(run_dir: str | Path, step: int, policy_version: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, config: dict, extra: dict | None = None,
                    keep: int = DEFAULT_KEEP, identity: dict | None = None) -> Path:
    """Atomically write checkpoints/step-<step>/ (with manifest, marker and the run's identity), then
    prune this run's checkpoints to `keep`."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # a writer that died mid-checkpoint (one learner per run dir)
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{CKPT_PREFIX}{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{CKPT_PREFIX}{step}-", dir=root))
    try:
        tensors = {f"delta_S.{n}": t.contiguous() for n, t in get_delta(model).items()}
        tensors.update({f"delta_Q.{n}": t.contiguous() for n, t in get_delta(model, kind="q").items()})
        save_file(tensors, str(tmp / "adapter.safetensors"), metadata={"step": str(step)})
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None}, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        state = {"step": step, "policy_version": policy_version, "config": config, **(extra or {}),
                 **({"identity": identity} if identity else {})}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        _write_manifest(tmp, step, identity)
        replaced = None
        if final.exists():  # the same step again: keep the old one until the new one is in place
            replaced = root / f"{TMP_PREFIX}replaced-{final.name}"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        _fsync(root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep, identity)
    return final


def prune_checkpoints(run_dir: str | Path, keep: int, identity: dict | None = None) -> list[Path]:
    """Remove checkpoint folders older than the newest `keep` complete ones; returns what went.
    Nothing newer than those is touched (an incomplete newest one stays, to be looked at). With
    `identity`, another run's checkpoints are neither counted nor removed."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    cks = [(s, p) for s, p in list_checkpoints(run_dir) if foreign_reason(p, identity) is None]
    complete = [s for s, p in cks if checkpoint_problem(p, deep=False) is None]
    if len(complete) <= keep:
        return []
    cutoff = complete[-keep]
    gone = [p for s, p in cks if s < cutoff]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# -------------------------------------------------------------------------------- loading

def _read(path: Path, reader, what: str):
    try:
        return reader(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # noqa: BLE001 - safetensors / torch / json raise many types; name the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read {what} ({type(e).__name__}: {first})") from None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, restore_rng: bool = True) -> Checkpoint:
    """Load weights (and optimizer, scheduler, RNG) from a step folder into live objects."""
    path = Path(path)
    if not (path / "state.json").exists() and not (path / COMPLETE).exists():
        raise CheckpointError(f"{path} is not a checkpoint (no state.json)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(problem)
    state = _read(path / "state.json", lambda p: json.loads(p.read_text()), "the checkpoint state")
    tensors = _read(path / "adapter.safetensors", lambda p: load_file(str(p)), "the adapter weights")
    ds = {k[len("delta_S."):]: v for k, v in tensors.items() if k.startswith("delta_S.")}
    dq = {k[len("delta_Q."):]: v for k, v in tensors.items() if k.startswith("delta_Q.")}
    try:
        set_delta(model, ds)
        if dq:
            set_delta(model, dq, kind="q")
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if optimizer is not None or scheduler is not None:
        opt = _read(path / "optimizer.pt", lambda p: torch.load(p, weights_only=False), "the optimizer state")
        if optimizer is not None:
            optimizer.load_state_dict(opt["optimizer"])
        if scheduler is not None and opt.get("scheduler") is not None:
            scheduler.load_state_dict(opt["scheduler"])
    if restore_rng and (path / "rng.pt").exists():
        set_rng_state(_read(path / "rng.pt", lambda p: torch.load(p, weights_only=False), "the RNG state"))
    return Checkpoint(path=path, step=int(state["step"]), policy_version=int(state["policy_version"]), state=state)
