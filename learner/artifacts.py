"""Direction artifacts (v_hack, v_concept): extracted once per (model, pair set, modes), cached, reused.

Every arm and seed of an experiment reuses the same file, so seeds differ only in RL noise, never in
their detector. Files live in `artifacts/` (or $RANKGUARD_ARTIFACTS):

    vhack-<model-hash>-<pairset-hash>-<modes>.safetensors      one unit [r] direction per module
    vconcept2-<model-hash>-<pairset-hash>-L<layer>.safetensors  [2, d]: residual direction + centre

The model hash covers the model id, dtype, target set, rank and the frozen singular values, so a
rebuilt toy model (new weights, same name) never picks up a stale direction. Extraction runs on the
model as loaded (delta_S = 0), before any checkpoint is restored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from shared.adapter import adapter_modules

log = logging.getLogger("rankguard.artifacts")
ARTIFACTS_ENV = "RANKGUARD_ARTIFACTS"


def artifacts_dir(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get(ARTIFACTS_ENV) or "artifacts")


def model_hash(model: nn.Module, cfg) -> str:
    """Identity of the frozen base the directions live in (id, dtype, targets, rank, singular values)."""
    h = hashlib.sha256(json.dumps([cfg.model.name_or_path, cfg.model.revision, cfg.model.dtype,
                                   sorted(cfg.model.target_modules), cfg.model.rank]).encode())
    for name, m in adapter_modules(model).items():
        h.update(name.encode())
        h.update(m.S.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


@dataclass
class VHackArtifact:
    vhack: dict[str, Tensor]
    meta: dict[str, str]
    path: Path
    cos_heldout: dict[str, float] = field(default_factory=dict)  # per module, for the noise floor
    cached: bool = False

    def validation(self) -> dict[str, float | str]:
        keys = ("heldout_median", "heldout_frac_positive", "heldout_mean", "modes", "n_pairs", "pair_set_hash")
        return {k: self.meta[k] for k in keys if k in self.meta}


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _write(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # concurrent runs racing on the same key write identical content


def vhack_artifact(model: nn.Module, tokenizer, cfg, pairs: Sequence, modes: Sequence[str],
                   root: str | Path | None = None, progress: bool = False) -> VHackArtifact:
    """Load the cached v_hack for (model, pairs, modes) or extract + validate + cache it."""
    from learner.pairs import pair_set_hash
    from learner.vhack import extract_vhack, split_pairs, validate_vhack, vhack_meta

    modes = sorted(modes)
    tag = "".join(modes)
    path = Path(cfg.vhack_path) if cfg.vhack_path else (
        artifacts_dir(root) / f"vhack-{model_hash(model, cfg)}-{pair_set_hash(pairs)}-{tag}.safetensors")
    if path.exists():
        vh, meta = _read(path)
        cos = json.loads(meta.get("cos_heldout", "{}"))
        log.info("v_hack cache hit %s", path)
        return VHackArtifact(vh, meta, path, cos, cached=True)
    vh = extract_vhack(model, tokenizer, pairs, modes, progress=progress)
    held = split_pairs(pairs, "heldout", modes) or split_pairs(pairs, "heldout")
    report = validate_vhack(model, tokenizer, vh, held, progress=progress, gate=False)
    if not report.passed:
        log.warning("v_hack validation FAILED: %s", report.summary())
    model.zero_grad(set_to_none=True)
    dtype = str(next(iter(adapter_modules(model).values())).U.dtype)
    meta = vhack_meta(cfg.model.name_or_path, dtype, modes, pairs,
                      heldout_median=round(report.median, 4), heldout_frac_positive=round(report.frac_positive, 4),
                      heldout_mean=round(report.mean, 4), heldout_passed=report.passed,
                      cos_heldout={n: round(c, 5) for n, c in report.cos_by_module().items()})
    _write(path, vh, meta)
    return VHackArtifact(vh, meta, path, report.cos_by_module(), cached=False)


def vconcept_artifact(model: nn.Module, tokenizer, cfg, pairs: Sequence, layer: int,
                      root: str | Path | None = None) -> tuple[Tensor, dict[str, str], Path]:
    """Rebound's activation-side direction at `layer` (mean-diff over the pairs), cached like v_hack."""
    from learner.pairs import pair_set_hash
    from learner.rebound import concept_direction

    path = artifacts_dir(root) / f"vconcept2-{model_hash(model, cfg)}-{pair_set_hash(pairs)}-L{layer}.safetensors"
    if path.exists():
        t, meta = _read(path)
        return t["v_concept"], meta, path
    with torch.no_grad():
        v = concept_direction(model, tokenizer, pairs, layer, progress=False)
    meta = {"model_id": cfg.model.name_or_path, "layer": str(layer), "pair_set_hash": pair_set_hash(pairs)}
    _write(path, {"v_concept": v}, meta)
    return v.detach().float().cpu(), meta, path
