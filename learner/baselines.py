"""The field's baselines as exploratory arms (issue #23); the preregistered arms never reach this module.

- Matched direction controls (`vhack.direction`): `controlled_basis` turns the extracted directions into a
  Haar-random basis of the same shape per module (seeded by the run seed and the module name, so every arm
  and resume of a seed draws the same one) or into -v_hack.
- Gradient projection ONTO the clean subspace (`vhack.project = onto_clean`): per module the top-k right
  singular vectors of the clean sides' per-pair gradients (`clean_subspace`); `OntoProjector` keeps only
  g's component in their span, g <- V^T V g (no magnitude rescale: Adam's step does not depend on the scale).
- Rebound's multiplicative penalty (`train.rebound_mode`): r' = r * (1 - alpha * s), s = max(0, cos(h - c,
  v_concept)), before the group advantage (Wu & Tang 2026's stronger setting, alpha = 2). Our reading of
  "multiplicative, applied before group normalisation"; the additive spec arm is r - alpha * s.
- rl-rewardhacking's ground-truth monitors (`train.oracle_monitor`), ORACLE baselines (they read the judge):
  penalty = GroundTruthMonitorPenalty (strict label: the reward loses rh_reward = the correctness reward);
  screen = GroundTruthMonitor screening (loose label, its default): the flagged rollout's score is dropped,
  the group's mean (and std) come from the rest, and its advantage is 0 (compute_modified_grpo_outcome_advantage).
"""
from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .grpo import STD_EPS
from .pairs import Pair
from .vhack import Directions, _completion_grad, encode_pair_side

DIRECTIONS = ("authored", "random", "negated")


# ---------------------------------------------------------------- matched direction controls
def module_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed from (run seed, module name): the same random direction in every process."""
    return int.from_bytes(hashlib.sha256(f"direction:{seed}:{name}".encode()).digest()[:8], "little") >> 1


def haar_basis(k: int, r: int, seed: int) -> Tensor:
    """[k, r] orthonormal rows, Haar-distributed (QR of a Gaussian with the signs of diag(R) fixed)."""
    if k == 0:
        return torch.zeros(0, r)
    g = torch.Generator().manual_seed(seed)
    q, rr = torch.linalg.qr(torch.randn(r, k, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(rr))[None]
    return q.T.float().contiguous()


def controlled_basis(basis: Mapping[str, Tensor], mode: str, seed: int) -> dict[str, Tensor]:
    """What the arm applies: the extracted basis (authored), a random one of the same [k, r] per module, or -basis."""
    if mode not in DIRECTIONS:
        raise ValueError(f"unknown vhack.direction {mode!r}; valid: {', '.join(DIRECTIONS)}")
    if mode == "authored":
        return dict(basis)
    out = {}
    for name, v in basis.items():
        V = v if v.dim() == 2 else v[None]
        out[name] = -V.clone() if mode == "negated" else haar_basis(V.shape[0], V.shape[1], module_seed(seed, name))
    return out


# ---------------------------------------------------------------- projection onto the clean subspace
def clean_subspace(model: nn.Module, tokenizer, pairs: Sequence[Pair], k: int) -> Directions:
    """Per module the top-k right singular vectors [k', r] of the clean completions' per-pair delta_S gradients
    (mean NLL, as v_hack's extraction; k' = min(k, n_pairs, r) minus numerically null axes)."""
    from shared.adapter import adapter_modules

    mods = adapter_modules(model)
    names, params = list(mods), [m.delta_S for m in mods.values()]
    sizes = [p.numel() for p in params]
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        rows = torch.stack([_completion_grad(model, params, *encode_pair_side(tokenizer, p, p.clean, dev)).cpu()
                            for p in pairs])
    finally:
        model.train(was)
    basis, sv = {}, {}
    for name, C in zip(names, torch.split(rows, sizes, dim=1)):
        _, S, Vh = torch.linalg.svd(C.double(), full_matrices=False)
        keep = S[:k] > 1e-6 * S[0] if S.numel() and S[0] > 0 else torch.zeros(0, dtype=torch.bool)
        basis[name], sv[name] = Vh[:k][keep].float().contiguous(), S[:k][keep].float()
    return Directions(basis, sv, 0, {"kind": "clean_subspace", "k": str(k), "n_pairs": str(len(pairs))})


class OntoProjector:
    """Pre-step hook like learner.projection.Projector, but keeping only span(V): g <- V^T (V g) per module.
    A module with no axis keeps nothing. Stats: cos_mean = mean ||V g|| / ||g|| (the share kept),
    removed_frac_mean = mean ||g - V^T V g|| / ||g||."""

    route = False

    def __init__(self, names: Sequence[str], basis: Mapping[str, Tensor], device=None):
        missing = [n for n in names if n not in basis]
        if missing:
            raise ValueError(f"clean subspace has no basis for module {missing[0]!r}")
        self.names = list(names)
        self.bases = [(basis[n] if basis[n].dim() == 2 else basis[n][None]).float().to(device) for n in self.names]
        self.n_kept = len(self.names)

    @torch.no_grad()
    def project_(self, params: Sequence[nn.Parameter], quarantine=None) -> dict[str, float]:
        if len(params) != len(self.names):
            raise ValueError(f"got {len(params)} params, the projector was built for {len(self.names)} modules")
        kept, removed, norms = [], [], []
        for p, V in zip(params, self.bases):
            if p.grad is None:
                continue
            g = p.grad.reshape(-1).float()
            n = g.norm()
            if n < 1e-12:
                continue
            V = V.to(g.device)
            new = V.T @ (V @ g) if V.shape[0] else torch.zeros_like(g)
            kept.append(float(new.norm() / n))
            removed.append(float((g - new).norm() / n))
            norms.append(float(n))
            p.grad.copy_(new.view_as(p.grad).to(p.grad.dtype))
        m = len(kept)
        t = torch.tensor(kept) if kept else torch.zeros(1)
        return {"cos_mean": float(t.mean()) if m else 0.0, "cos_std": float(t.std(unbiased=False)) if m else 0.0,
                "frac_fired": 1.0 if m else 0.0, "grad_norm_mean": sum(norms) / max(m, 1), "n_modules": m,
                "removed_frac_mean": sum(removed) / max(m, 1)}


# ---------------------------------------------------------------- advantage-side baselines
def rebound_penalty(reward: float, score: float, alpha: float, mode: str = "additive") -> float:
    """What Rebound takes off one rollout's reward: alpha*s (additive) or reward*alpha*s (multiplicative,
    r' = r(1 - alpha s)); s = max(0, cos) from learner.rebound.concept_penalty with alpha = 1."""
    if mode == "additive":
        return alpha * score
    if mode == "multiplicative":
        return reward * alpha * score
    raise ValueError(f"unknown rebound_mode {mode!r}; valid: additive, multiplicative")


def monitor_flags(grades: Sequence, monitor: str) -> list[bool]:
    """The ground-truth monitor's label per rollout: strict (any mode exploited) for the penalty, loose (any
    hack attempted) for screening, as rl-rewardhacking's GroundTruthMonitorPenalty / GroundTruthMonitor default."""
    if monitor == "penalty":
        return [any(g.exploited.values()) for g in grades]
    if monitor == "screen":
        return [any(g.attempted.values()) or any(g.exploited.values()) for g in grades]
    raise ValueError(f"unknown oracle_monitor {monitor!r}; valid: none, penalty, screen")


def monitored_advantages(rewards: Sequence[float], flags: Sequence[bool], monitor: str, rh_reward: float,
                         unbiased: bool = True, eps: float = 1e-4) -> tuple[list[float], bool]:
    """(advantage per rollout, group kept) under the oracle monitor. penalty: reward - rh_reward where flagged,
    then the ordinary group advantage. screen: flagged rollouts are left out of the group's mean/std and get
    advantage 0; the group is kept when the rest still differ by >= eps."""
    r = torch.tensor([float(x) for x in rewards], dtype=torch.float64)
    f = torch.tensor([bool(x) for x in flags])
    use = torch.ones_like(f)
    if monitor == "penalty":
        r = r - rh_reward * f.double()
    elif monitor == "screen":
        use = ~f
    else:
        raise ValueError(f"unknown oracle_monitor {monitor!r}; valid: penalty, screen")
    if int(use.sum()) == 0:
        return [0.0] * len(r), False
    ru = r[use]
    adv = r - ru.mean()
    if not unbiased:
        std = ru.std() if ru.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        adv = adv / (std + STD_EPS)
    keep = bool(ru.max() - ru.min() >= eps)
    adv = torch.where(use, adv, torch.zeros_like(adv)) * float(keep)
    return adv.tolist(), keep
