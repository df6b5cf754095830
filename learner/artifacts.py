"""Direction artifacts (v_hack, v_concept): extracted once per (model, pair set, modes), cached, reused.

Every arm and seed of an experiment reuses the same file, so seeds differ only in RL noise, never in
their detector. Files live in `artifacts/` (or $RANKGUARD_ARTIFACTS):

    vhack-<model-hash>-<pairset-hash>-<modes><tag>.safetensors  per module a unit [r] direction (or a basis
                                                                [k, r]); <tag> names non-default extraction
                                                                settings (learner.vhack.directions_tag: '' for
                                                                the spec's meandiff, so its file never moved)
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
from typing import TYPE_CHECKING, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from shared.adapter import adapter_modules

if TYPE_CHECKING:
    from learner.vhack import Directions

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
    directions: "Directions"  # learner.vhack.Directions: per module a basis [k, r] (k = 1 for meandiff)
    meta: dict[str, str]
    path: Path
    cos_heldout: dict[str, float] = field(default_factory=dict)  # per module, for the noise floor
    cached: bool = False

    @property
    def vhack(self) -> dict[str, Tensor]:
        """name -> the top axis [r] (the spec's k = 1 v_hack)."""
        return self.directions.top()

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


def vhack_path(model: nn.Module, cfg, pairs: Sequence, modes: Sequence[str], root: str | Path | None = None) -> Path:
    """Where the v_hack of (model, pair set, modes, extraction settings) is cached (cfg.vhack_path wins)."""
    from learner.pairs import pair_set_hash
    from learner.vhack import directions_tag

    if cfg.vhack_path:
        return Path(cfg.vhack_path)
    return artifacts_dir(root) / (f"vhack-{model_hash(model, cfg)}-{pair_set_hash(pairs)}-{''.join(sorted(modes))}"
                                  f"{directions_tag(cfg.vhack)}.safetensors")


def vhack_artifact(model: nn.Module, tokenizer, cfg, pairs: Sequence, modes: Sequence[str],
                   root: str | Path | None = None, progress: bool = False) -> VHackArtifact:
    """Load the cached v_hack for (model, pairs, modes, cfg.vhack's extraction settings) or extract it
    (learner.vhack.extract_directions: basis, k, axis ratio, global noise floor), score it on the
    held-out pairs and cache it."""
    from learner.vhack import extract_directions, load_directions, save_directions, split_pairs, validate_vhack, vhack_meta

    modes = sorted(modes)
    path = vhack_path(model, cfg, pairs, modes, root)
    if path.exists():
        d = load_directions(path)
        log.info("v_hack cache hit %s", path)
        return VHackArtifact(d, dict(d.meta), path, json.loads(d.meta.get("cos_heldout", "{}")), cached=True)
    d = extract_directions(model, tokenizer, pairs, cfg.vhack, modes, progress=progress)
    held = split_pairs(pairs, "heldout", modes) or split_pairs(pairs, "heldout")
    report = validate_vhack(model, tokenizer, d, held, progress=progress, gate=False,
                            construction=cfg.vhack.pair_set)
    if not report.passed:
        log.warning("v_hack validation FAILED: %s", report.summary())
    model.zero_grad(set_to_none=True)
    dtype = str(next(iter(adapter_modules(model).values())).U.dtype)
    meta = vhack_meta(cfg.model.name_or_path, dtype, modes, pairs,
                      heldout_median=round(report.median, 4), heldout_frac_positive=round(report.frac_positive, 4),
                      heldout_mean=round(report.mean, 4), heldout_passed=report.passed,
                      cos_heldout={n: round(c, 5) for n, c in report.cos_by_module().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.safetensors")
    save_directions(tmp, d, meta)
    os.replace(tmp, path)  # concurrent runs racing on the same key write identical content
    d.meta.update(meta)  # as a cache hit would read it back
    return VHackArtifact(d, dict(d.meta), path, report.cos_by_module(), cached=False)


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
