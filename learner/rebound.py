"""Rebound baseline (Wu & Tang 2026, H3): an advantage-side concept penalty, not a gradient constraint.

v_concept = mean residual activation (one layer at 60-75 % depth, averaged over completion tokens)
of hack completions minus that of clean ones, from the same pairs as v_hack. Each rollout pays
alpha * max(0, cos(h_mean - c, v_concept)) off its scalar reward (alpha = 0.5, their published value).

c is the midpoint of the hack and clean means. Raw residual activations share a large common
component, so uncentred cos(h_mean, v_concept) came out negative for nearly every rollout on the toy
world (penalty ~0.002, a silent no-op); centring on the pairs' midpoint makes the sign say
"closer to the hack side than to the clean side". The concept tensor is [2, d]: row 0 the
direction, row 1 the centre (a bare [d] direction is still accepted, uncentred).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from shared.logprobs import decoder_layers, hidden_at_layer
from .pairs import Pair
from .vhack import VHackError, encode_pair_side


def layer_for(model: nn.Module, frac: float = 0.67) -> int:
    """Decoder layer index at `frac` of the depth (Rebound reads one layer at 60-75 % depth)."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"layer fraction {frac} must lie in (0, 1]")
    n = len(decoder_layers(model))
    return min(n - 1, max(0, int(frac * n)))


def _token_mask(hidden: Tensor, completion_mask: Tensor) -> Tensor:
    """Accept a token-level [B, L] mask or a target-aligned [B, L-1] one (target t+1 = token t+1)."""
    L = hidden.shape[1]
    if completion_mask.shape[1] == L:
        return completion_mask.float()
    if completion_mask.shape[1] == L - 1:
        return F.pad(completion_mask.float(), (1, 0))
    raise ValueError(f"completion_mask length {completion_mask.shape[1]} fits neither L={L} nor L-1")


def mean_completion_activation(hidden: Tensor, completion_mask: Tensor) -> Tensor:
    """[B, L, d] residual stream -> [B, d] mean over completion tokens (fp32)."""
    m = _token_mask(hidden, completion_mask).to(hidden.device)
    return (hidden.float() * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)


@torch.no_grad()
def concept_direction(model: nn.Module, tokenizer, pairs: Sequence[Pair], layer: int,
                      progress: bool = True) -> Tensor:
    """[2, d]: row 0 v_concept = mean h_mean(hack) - mean h_mean(clean) at decoder layer `layer`
    (train pairs); row 1 the centre c = midpoint of the two means."""
    use = [p for p in pairs if p.split == "train"] or list(pairs)
    if not use:
        raise VHackError("no pairs for the Rebound concept direction")
    dev = next(model.parameters()).device
    total = None
    both = None
    was_training = model.training
    model.eval()
    try:
        for pair in tqdm(use, desc=f"v_concept L{layer}", disable=not progress, leave=False):
            for sign, completion in ((1.0, pair.hack), (-1.0, pair.clean)):
                ids, tmask = encode_pair_side(tokenizer, pair, completion, dev)
                h = hidden_at_layer(model, ids, None, layer)
                act = mean_completion_activation(h, tmask)[0]
                total = sign * act if total is None else total + sign * act
                both = act if both is None else both + act
    finally:
        model.train(was_training)
    return torch.stack([total / len(use), both / (2 * len(use))]).cpu()


def concept_penalty(hidden: Tensor, completion_mask: Tensor, v_concept: Tensor, alpha: float = 0.5) -> Tensor:
    """Per-rollout penalty [B] = alpha * max(0, cos(h_mean - c, v_concept)); subtract it from the reward.

    `v_concept` is [2, d] (direction, centre) from concept_direction, or a bare [d] direction."""
    h_mean = mean_completion_activation(hidden, completion_mask)
    v = v_concept.to(h_mean.device, torch.float32)
    if v.dim() == 2:
        h_mean, v = h_mean - v[1][None], v[0]
    cos = F.cosine_similarity(h_mean, v[None], dim=-1)
    return alpha * cos.clamp_min(0.0)


def save_concept(path: str | Path, v_concept: Tensor, meta: Mapping[str, Any]) -> Path:
    """safetensors {"v_concept": [2, d] or [d]} with metadata (model_id, layer, pair_set_hash, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"v_concept": v_concept.detach().float().cpu().contiguous()}, str(path),
              metadata={k: str(v) for k, v in meta.items()})
    return path


def load_concept(path: str | Path, expect_model: str | None = None) -> tuple[Tensor, dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise VHackError(f"concept direction file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        v = f.get_tensor("v_concept")
    if expect_model is not None and meta.get("model_id") != expect_model:
        raise VHackError(f"{path} was extracted for model {meta.get('model_id')!r}, not {expect_model!r}")
    return v, meta
