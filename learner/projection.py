"""Rank-space gradient projection against v_hack (spec pseudocode C), vectorised over modules.

Per wrapped module m with gradient g = grad(delta_S_m) : [r_m] and unit direction v = v_hack[m]:

    cos = (g . v) / ||g||
    g  <- g - max(0, cos) * ||g|| * v          # one-sided: never *add* hack component
    g  <- g * ||g_old|| / ||g||                # magnitude-preserving (the "nomag" arm skips this)

(A grad parallel to v leaves only rounding residue, ||g_new|| <= 1e-5 ||g_old||: it is not rescaled,
which would blow noise up into a random direction of full norm; the spec's loop has this hole.)

Subspace (issue #15): a direction may be a basis V [k, r] of orthonormal, hack-ward rows. Per axis i,
cos_i = (g . v_i) / ||g||, and the gate picks what is removed:

    onesided (spec):  g <- g - sum_i max(0, cos_i) ||g|| v_i      # only hack-ward components
    twosided:         g <- g - sum_i cos_i ||g|| v_i               # the whole component in span(V)

then the same magnitude rescale. k = 1 onesided is exactly the spec's rule. A module with k = 0 axes
(dropped by a noise floor) is left alone. The logged `cos` is the signed cos with the top axis (the
spec's statistic for k = 1); `removed_frac_mean` is the mean ||removed|| / ||g|| (for k = 1 onesided:
mean max(0, cos)).

All modules are handled at once: the grads are copied (one multi-tensor copy) into the rows of a
zero-padded fp32 buffer [M, r_max] beside the padded directions V [M, K, r_max]; per-module dot
products and norms are dense row sums (deterministic, no atomics), and the new gradients go back
with one multi-tensor copy. No per-module host sync; the
statistics come back with one `.tolist()` at the end.

Noise floor (`keep_mask`): a *global* threshold on each module's held-out cos(diff_held, v_hack);
modules below it are not projected (their v_hack is judged noise). Route (`route=True`): the same
one-sided gate; the identical removed vector max(0,cos)*||g||*v is written to the module's
quarantine parameter's grad (delta_Q.grad), so the hack-aligned update lands in a parameter that
is dropped at deployment, instead of being thrown away.

Where gradient clipping sits: **project first (on raw grads), then `clip_grad_norm_` over the
delta_S parameters, then `optimizer.step()`.** Clipping multiplies every module's gradient by the
same scalar, so it never changes a direction and commutes with the direction test; projecting
*after* clipping would let the magnitude-preserving rescale restore each module's pre-projection
norm and undo part of the clip (the clipped total norm would no longer hold).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

GATES = ("onesided", "twosided")
EPS_NORM = 1e-12  # a module whose grad norm is below this is skipped (counted nowhere)
EPS_RESCALE = 1e-8
# A grad (almost) parallel to v leaves only rounding residue after removal; rescaling that residue to
# ||g|| would inject a random direction, so it stays (near) zero instead.
DEGENERATE = 1e-5


class ProjectionError(ValueError):
    """v_hack and the parameters disagree (missing module, wrong size); names the module."""


def _foreach_copy(dst: list[Tensor], src: Sequence[Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, list(src))
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src):
            d.copy_(s)


def noise_floor_mask(cos_by_module: Mapping[str, float], threshold: float) -> dict[str, bool]:
    """Global noise floor: keep (project) a module iff its held-out cos >= threshold."""
    return {name: float(c) >= threshold for name, c in cos_by_module.items()}


class Projector:
    """Pre-optimizer-step hook: `stats = projector.project_(params)` between backward and step.

    names: module names in adapter order; params passed to `project_` must follow the same order.
    vhack: name -> unit direction [r], or an orthonormal basis [k, r] (learner.vhack.Directions.basis;
    k may differ per module, 0 included). keep_mask: name -> bool (absent names are kept).
    gate: "onesided" (spec) or "twosided". Directions changed (a refresh)? Build a new Projector: cheap.
    """

    def __init__(
        self,
        names: Sequence[str],
        vhack: Mapping[str, Tensor],
        magnitude_preserve: bool = True,
        keep_mask: Mapping[str, bool] | None = None,
        route: bool = False,
        device: torch.device | str | None = None,
        gate: str = "onesided",
    ) -> None:
        if gate not in GATES:
            raise ProjectionError(f"unknown gate {gate!r}; valid: {', '.join(GATES)}")
        missing = [n for n in names if n not in vhack]
        if missing:
            raise ProjectionError(
                f"v_hack has no direction for {len(missing)} module(s), e.g. {missing[0]!r}; "
                f"it covers {len(vhack)} modules (extracted for another model or target set?)"
            )
        self.names = list(names)
        self.magnitude_preserve = magnitude_preserve
        self.route = route
        self.gate = gate
        bases = [_as_basis(vhack[n]) for n in self.names]
        self.sizes = [int(b.shape[1]) for b in bases]
        self.ks = [int(b.shape[0]) for b in bases]
        # Padded layout V [M, K, r_max]: module i's k_i axes in its first rows, each axis's r_i values first;
        # the rest stays zero (a zero axis contributes nothing). Grads are copied into the rows of a
        # [M, r_max] buffer (one multi-tensor copy); reductions are dense sums (deterministic).
        m, r_max, k_max = len(self.names), max(self.sizes), max(1, max(self.ks))
        v_pad = torch.zeros(m, k_max, r_max)
        for i, b in enumerate(bases):
            v_pad[i, : b.shape[0], : b.shape[1]] = b
        keep = torch.tensor([bool(keep_mask.get(n, True)) if keep_mask else True for n in self.names])
        self.n_kept = int(keep.sum())
        self._cpu = (v_pad, keep.float())
        self._dev: dict[torch.device, tuple[Tensor, Tensor, Tensor, list[Tensor]]] = {}
        if device is not None:
            self._on(torch.device(device))
        self.last_cos: Tensor | None = None  # per-module cos of the last call (device, no sync)

    @classmethod
    def for_model(cls, model: nn.Module, vhack: Mapping[str, Tensor], **kwargs) -> "Projector":
        """Projector over the model's AntiPaSTO modules in adapter order (shared.adapter.adapter_modules)."""
        from shared.adapter import adapter_modules

        return cls(list(adapter_modules(model)), vhack, **kwargs)

    def project_model_(self, model: nn.Module) -> dict[str, float]:
        """project_ on the model's delta_S grads (and delta_Q as quarantine when route=True)."""
        from shared.adapter import adapter_modules

        mods = adapter_modules(model)
        if list(mods) != self.names:
            raise ProjectionError(f"model's adapter modules ({len(mods)}) differ from the projector's ({len(self.names)})")
        quarantine = [m.delta_Q for m in mods.values()] if self.route else None
        return self.project_([m.delta_S for m in mods.values()], quarantine)

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """(V [M, K, r_max], keep [M], grad buffer [M, r_max], its row views) on `device`, made once."""
        if device not in self._dev:
            v_pad, keep = (t.to(device) for t in self._cpu)
            buf = torch.zeros(v_pad.shape[0], v_pad.shape[2], device=device)
            rows = [buf[i, :r] for i, r in enumerate(self.sizes)]
            self._dev[device] = (v_pad, keep, buf, rows)
        return self._dev[device]

    def _check(self, params: Sequence[nn.Parameter], what: str = "params") -> None:
        if len(params) != len(self.names):
            raise ProjectionError(f"got {len(params)} {what}, the projector was built for {len(self.names)} modules")
        for name, size, p in zip(self.names, self.sizes, params):
            if p.numel() != size:
                raise ProjectionError(f"module {name!r}: {what} has {p.numel()} values, v_hack has {size}")

    @torch.no_grad()
    def alignment(self, values: Sequence[Tensor]) -> float:
        """cos between `values` (delta_S or delta_Q, adapter order) and v_hack's top axes, all modules
        concatenated: how far the update itself (not its gradient) points hack-ward."""
        self._check(values, "values")
        v_pad = self._on(values[0].device)[0]
        x = torch.zeros(v_pad.shape[0], v_pad.shape[2], device=v_pad.device)
        for i, (p, r) in enumerate(zip(values, self.sizes)):
            x[i, :r] = p.detach().reshape(-1).float()
        v = v_pad[:, 0, :]
        den = float(torch.linalg.vector_norm(x) * torch.linalg.vector_norm(v))
        return float((x * v).sum()) / den if den > 0 else 0.0

    @torch.no_grad()
    def project_(
        self, params: Sequence[nn.Parameter], quarantine: Sequence[nn.Parameter] | None = None
    ) -> dict[str, float]:
        """Project the grads of `params` (delta_S, adapter order) in place; returns the step's stats.

        With route=True, `quarantine` (the delta_Q parameters, same order) receive the removed
        component as their grad. Parameters without a grad count as zero and are left alone.
        """
        self._check(params)
        if self.route:
            if quarantine is None:
                raise ProjectionError("route=True needs the quarantine (delta_Q) parameters")
            self._check(quarantine, "quarantine params")
        has_grad = [p for p in params if p.grad is not None]
        if not has_grad:
            return {"cos_mean": 0.0, "cos_std": 0.0, "frac_fired": 0.0, "grad_norm_mean": 0.0, "n_modules": 0,
                    "removed_frac_mean": 0.0}
        device = has_grad[0].grad.device
        v_pad, keep, g_pad, rows = self._on(device)
        _foreach_copy(rows, [p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(r)
                             for p, r in zip(params, rows)])

        dot = (v_pad * g_pad[:, None, :]).sum(2)  # [M, K]: g . v_i
        norm = torch.linalg.vector_norm(g_pad, dim=1)
        valid = (norm >= EPS_NORM).float()
        cos_k = dot / norm.clamp_min(EPS_NORM)[:, None] * valid[:, None]
        gated = cos_k.clamp_min(0.0) if self.gate == "onesided" else cos_k
        coef = gated * (keep * valid)[:, None]  # per axis, gated by the noise floor
        fired = (coef != 0).any(1).float()
        removed = ((coef * norm[:, None])[:, :, None] * v_pad).sum(1)
        new = g_pad - removed
        if self.magnitude_preserve:
            new_norm = torch.linalg.vector_norm(new, dim=1)
            ok = (fired > 0) & (new_norm > DEGENERATE * norm)
            new = new * torch.where(ok, norm / (new_norm + EPS_RESCALE), torch.ones_like(norm))[:, None]
        cos = cos_k[:, 0]
        removed_frac = torch.linalg.vector_norm(coef, dim=1)

        idx = [i for i, p in enumerate(params) if p.grad is not None]
        _foreach_copy([params[i].grad for i in idx], [new[i, : self.sizes[i]].view_as(params[i].grad) for i in idx])
        if self.route:
            for q in quarantine:  # type: ignore[union-attr]
                if q.grad is None:
                    q.grad = torch.zeros_like(q)
            _foreach_copy([q.grad for q in quarantine],  # type: ignore[union-attr]
                          [removed[i, :r].view_as(q) for i, (r, q) in enumerate(zip(self.sizes, quarantine))])

        self.last_cos = cos
        n = valid.sum()
        denom = n.clamp_min(1.0)
        cos_mean = cos.sum() / denom
        cos_var = ((cos - cos_mean) ** 2 * valid).sum() / denom
        stats = torch.stack([cos_mean, cos_var.sqrt(), fired.sum() / denom, norm.sum() / denom, n,
                             removed_frac.sum() / denom])
        c_mean, c_std, frac, gnorm, n_mod, rfrac = stats.tolist()
        return {"cos_mean": c_mean, "cos_std": c_std, "frac_fired": frac, "grad_norm_mean": gnorm,
                "n_modules": int(n_mod), "removed_frac_mean": rfrac}


def project_grads_reference(
    names: Sequence[str],
    params: Sequence[nn.Parameter],
    vhack: Mapping[str, Tensor],
    magnitude_preserve: bool = True,
    keep_mask: Mapping[str, bool] | None = None,
    quarantine: Sequence[nn.Parameter] | None = None,
    gate: str = "onesided",
) -> dict[str, float]:
    """The spec's per-module loop, literally (one host sync per module), extended per axis to a basis
    [k, r] and the two-sided gate. Tests and the bench only."""
    cos_log, n_modules, n_fired, norms, removed_fracs = [], 0, 0, [], []
    for i, (name, p) in enumerate(zip(names, params)):
        g = p.grad
        if g is None:
            continue
        V = _as_basis(vhack[name]).to(g.device)
        g_norm = g.float().norm()
        if g_norm < EPS_NORM:
            continue
        n_modules += 1
        norms.append(g_norm.item())
        removed = torch.zeros_like(g, dtype=torch.float32)
        fired, coefs = False, []
        for j in range(V.shape[0]):
            v = V[j]
            cos_a = (g.float() @ v) / g_norm
            if j == 0:
                cos_log.append(cos_a.item())
            if keep_mask is not None and not keep_mask.get(name, True):
                continue
            if cos_a > 0 or (gate == "twosided" and cos_a != 0):
                fired = True
                coefs.append(cos_a.item())
                removed = removed + cos_a * g_norm * v
        if V.shape[0] == 0:
            cos_log.append(0.0)
        removed_fracs.append(sum(c * c for c in coefs) ** 0.5)
        if fired:
            n_fired += 1
            g_new = g.float() - removed
            if magnitude_preserve and g_new.norm() > DEGENERATE * g_norm:
                g_new = g_new * (g_norm / (g_new.norm() + EPS_RESCALE))
            p.grad.copy_(g_new)
            if quarantine is not None:
                q = quarantine[i]
                q.grad = removed.to(q.dtype).clone()
        elif quarantine is not None:
            quarantine[i].grad = torch.zeros_like(quarantine[i])
    t = torch.tensor(cos_log) if cos_log else torch.zeros(0)
    return {
        "cos_mean": float(t.mean()) if len(t) else 0.0,
        "cos_std": float(t.std(unbiased=False)) if len(t) else 0.0,
        "frac_fired": n_fired / max(n_modules, 1),
        "grad_norm_mean": sum(norms) / max(len(norms), 1),
        "n_modules": n_modules,
        "removed_frac_mean": sum(removed_fracs) / max(len(removed_fracs), 1),
    }


def _as_basis(v: Tensor) -> Tensor:
    """A direction [r] or a basis [k, r] -> fp32 [k, r]."""
    v = v.detach().float()
    if v.dim() == 1:
        return v[None]
    if v.dim() != 2:
        raise ProjectionError(f"a direction must be [r] or [k, r], got shape {tuple(v.shape)}")
    return v
