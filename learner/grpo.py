"""GRPO pieces: group advantages and the clipped policy loss (simple_GRPO's GRPO_step, Dr.GRPO option).

loss_type "dr_grpo" (the default, Dr.GRPO): advantage r - mean(group), loss = sum over all completion
tokens divided by a constant (num_seqs x max_len), so neither long answers nor low-variance groups get
up-weighted. "grpo" (classic): advantage (r - mean) / (std + 1e-4), loss = per-sequence token mean,
then mean over sequences. Groups whose rewards are flat (max - min < eps) carry no signal and are skipped.

The ratio pi_theta / pi_old: the learner takes one optimizer step per batch, so for a completion the
current policy sampled (on-policy) pi_old = pi_theta and the ratio is exactly 1 (simple_GRPO without
gen_logps). For a stale completion (sampled by an older policy version, pipeline.max_staleness > 0)
pi_old is the behaviour policy: the engine's log-probs (simple_GRPO's gen_logps), so the ratio carries
the off-policy correction and the clip bounds it; with a negative advantage the ratio is further
bounded by the dual clip (Ye et al. 2020), which the PPO clip alone leaves open.
"""
from __future__ import annotations

from typing import Literal

import math

import torch
from torch import Tensor

STD_EPS = 1e-4
LossType = Literal["dr_grpo", "grpo"]
LOSS_TYPES: tuple[str, ...] = ("dr_grpo", "grpo")


def _check(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def group_advantages(rewards: Tensor, loss_type: LossType = "dr_grpo", eps: float = 1e-4,
                     use: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """rewards [P, G] -> (advantages [P, G], keep [P] bool). Skipped groups get advantage 0.
    use [P, G] bool (the screening baseline): only those rows enter their group's statistics, the
    others get advantage 0."""
    _check(loss_type)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group], got shape {tuple(rewards.shape)}")
    r = rewards.float()
    if use is not None:
        return _screened_advantages(r, use.bool(), loss_type, eps)
    mean = r.mean(dim=1, keepdim=True)
    adv = r - mean
    if loss_type == "grpo":
        std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(mean)
        adv = adv / (std + STD_EPS)
    keep = (r.max(dim=1).values - r.min(dim=1).values) >= eps
    return adv * keep[:, None], keep


def _screened_advantages(r: Tensor, use: Tensor, loss_type: LossType, eps: float) -> tuple[Tensor, Tensor]:
    """group_advantages over the `use` rows of each group only (masked mean, std and spread)."""
    u = use.to(r.dtype)
    n = u.sum(dim=1, keepdim=True)
    mean = (r * u).sum(dim=1, keepdim=True) / n.clamp(min=1)
    adv = r - mean
    if loss_type == "grpo":
        std = ((((r - mean) ** 2) * u).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        adv = adv / (std + STD_EPS)
    hi = torch.where(use, r, torch.full_like(r, -math.inf)).max(dim=1).values
    lo = torch.where(use, r, torch.full_like(r, math.inf)).min(dim=1).values
    keep = (n.squeeze(1) > 0) & ((hi - lo) >= eps)
    return adv * u * keep[:, None], keep


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, 0 iff equal)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    loss_type: LossType = "dr_grpo",
    max_len: int | None = None,
    num_seqs: int | None = None,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO loss over completion tokens.

    logp, old_logp, ref_logp, mask: [B, T] (token log-probs of the sampled tokens; mask 1 on completion
    tokens). adv: [B] (one advantage per sequence) or [B, T]. old_logp None = on-policy (ratio exactly 1,
    gradient of logp). ref_logp None or beta == 0 = no KL term. dual_clip c > 1: with a negative
    advantage the surrogate is at least c * adv (a stale token's ratio cannot blow up the loss).
    max_len: Dr.GRPO's constant token budget (default T); num_seqs: sequences in the whole optimizer
    batch (default B), so micro-batches summed give the same loss as one batch.
    Stats are detached 0-d tensors (no host sync): kl (mean per token), clip_frac (tokens whose
    surrogate took a clipped branch), ratio_mean.
    """
    _check(loss_type)
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (it bounds the ratio from above), got {dual_clip}")
    mask = mask.to(logp.dtype)
    if old_logp is None:
        old_logp = logp.detach()
    a = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    surrogate = torch.minimum(ratio * a, clipped * a)
    was_clipped = (ratio * a) > (clipped * a)  # min() picked the clipped branch
    if dual_clip is not None:
        floor = dual_clip * a
        dual = (a < 0) & (surrogate < floor)
        surrogate = torch.where(dual, floor, surrogate)
        was_clipped = was_clipped | dual
    per_token = -surrogate
    if beta and ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl
    else:
        kl = kl_k3(logp.detach(), ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    n = num_seqs if num_seqs is not None else logp.shape[0]
    if loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (n * (max_len if max_len is not None else logp.shape[1]))
    else:
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).sum() / n
    with torch.no_grad():
        tok = mask.sum().clamp_min(1)
        stats = {
            "kl": (kl.detach() * mask).sum() / tok,
            "clip_frac": (was_clipped.to(mask.dtype) * mask).sum() / tok,
            "ratio_mean": (ratio.detach() * mask).sum() / tok,
        }
    return loss, stats
