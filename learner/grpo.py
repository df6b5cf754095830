"""GRPO pieces: group advantages and the clipped policy loss (simple_GRPO's GRPO_step, Dr.GRPO option).

Dr.GRPO ("unbiased", the default): advantage r - mean(group), loss = sum over all completion tokens
divided by a constant (num_seqs x max_len), so neither long answers nor low-variance groups get
up-weighted. Classic: advantage (r - mean) / (std + 1e-4), loss = per-sequence token mean, then mean
over sequences. Groups whose rewards are flat (max - min < eps) carry no signal and are skipped.
"""
from __future__ import annotations

import torch
from torch import Tensor

STD_EPS = 1e-4


def group_advantages(rewards: Tensor, unbiased: bool = True, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """rewards [P, G] -> (advantages [P, G], keep [P] bool). Skipped groups get advantage 0."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, group], got shape {tuple(rewards.shape)}")
    r = rewards.float()
    mean = r.mean(dim=1, keepdim=True)
    adv = r - mean
    if not unbiased:
        std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(mean)
        adv = adv / (std + STD_EPS)
    keep = (r.max(dim=1).values - r.min(dim=1).values) >= eps
    return adv * keep[:, None], keep


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, 0 iff equal)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def truncated_is_weight(learner_old_logp: Tensor, behaviour_logp: Tensor, cap: float = 2.0) -> Tensor:
    """Per-token truncated importance weight min(pi_old / pi_behaviour, cap) for stale/async rollouts."""
    return torch.exp(learner_old_logp - behaviour_logp).clamp(max=cap).detach()


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    unbiased: bool = True,
    max_len: int | None = None,
    is_weight: Tensor | None = None,
    num_seqs: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO loss over completion tokens.

    logp, old_logp, ref_logp, mask, is_weight: [B, T] (token log-probs of the sampled tokens; mask 1
    on completion tokens). adv: [B] (one advantage per sequence) or [B, T]. old_logp None = on-policy
    (ratio 1, gradient of logp). ref_logp None or beta == 0 = no KL term.
    max_len: Dr.GRPO's constant token budget (default T); num_seqs: sequences in the whole optimizer
    batch (default B), so micro-batches summed give the same loss as one batch.
    Stats are detached 0-d tensors (no host sync): kl (mean per token), clip_frac, ratio_mean.
    """
    mask = mask.to(logp.dtype)
    if old_logp is None:
        old_logp = logp.detach()
    a = adv[:, None] if adv.dim() == 1 else adv
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    surrogate = torch.minimum(ratio * a, clipped * a)
    if is_weight is not None:
        surrogate = surrogate * is_weight
    per_token = -surrogate
    if beta and ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl
    else:
        kl = kl_k3(logp.detach(), ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    n = num_seqs if num_seqs is not None else logp.shape[0]
    if unbiased:
        loss = (per_token * mask).sum() / (n * (max_len if max_len is not None else logp.shape[1]))
    else:
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).sum() / n
    with torch.no_grad():
        tok = mask.sum().clamp_min(1)
        was_clipped = ((ratio * a) > (clipped * a)).to(mask.dtype)  # min() picked the clipped branch
        stats = {
            "kl": (kl.detach() * mask).sum() / tok,
            "clip_frac": (was_clipped * mask).sum() / tok,
            "ratio_mean": (ratio.detach() * mask).sum() / tok,
        }
    return loss, stats
