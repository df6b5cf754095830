"""Rank-space gradient projection against v_hack (spec pseudocode C), vectorised over modules.

Per wrapped module m with gradient g = grad(delta_S_m) : [r_m] and unit direction v = v_hack[m]:

    cos = (g . v) / ||g||
    g  <- g - max(0, cos) * ||g|| * v          # one-sided: never *add* hack component
    g  <- g * ||g_old|| / ||g||                # magnitude-preserving (the "nomag" arm skips this)

(A grad parallel to v leaves only rounding residue, ||g_new|| <= 1e-5 ||g_old||: it is not rescaled,
which would blow noise up into a random direction of full norm; the spec's loop has this hole.)

All modules are handled at once: the grads are copied (one multi-tensor copy) into the rows of a
zero-padded fp32 buffer [M, r_max] beside the padded directions V [M, r_max]; per-module dot
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
    vhack: name -> unit direction [r]. keep_mask: name -> bool (absent names are kept).
    """

    def __init__(
        self,
        names: Sequence[str],
        vhack: Mapping[str, Tensor],
        magnitude_preserve: bool = True,
        keep_mask: Mapping[str, bool] | None = None,
        route: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        missing = [n for n in names if n not in vhack]
        if missing:
            raise ProjectionError(
                f"v_hack has no direction for {len(missing)} module(s), e.g. {missing[0]!r}; "
                f"it covers {len(vhack)} modules (extracted for another model or target set?)"
            )
        self.names = list(names)
        self.magnitude_preserve = magnitude_preserve
        self.route = route
        self.sizes = [int(vhack[n].numel()) for n in self.names]
        # Padded layout [M, r_max]: row i holds module i's r_i values, the rest stays zero. Grads are
        # copied into the rows (one multi-tensor copy), reductions are dense row sums (deterministic).
        m, r_max = len(self.names), max(self.sizes)
        v_pad = torch.zeros(m, r_max)
        for i, n in enumerate(self.names):
            v_pad[i, : self.sizes[i]] = vhack[n].detach().reshape(-1).float()
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
        """(V [M, r_max], keep [M], grad buffer [M, r_max], its row views) on `device`, made once."""
        if device not in self._dev:
            v_pad, keep = (t.to(device) for t in self._cpu)
            buf = torch.zeros_like(v_pad)
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
            return {"cos_mean": 0.0, "cos_std": 0.0, "frac_fired": 0.0, "grad_norm_mean": 0.0, "n_modules": 0}
        device = has_grad[0].grad.device
        v_pad, keep, g_pad, rows = self._on(device)
        _foreach_copy(rows, [p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(r)
                             for p, r in zip(params, rows)])

        dot = (g_pad * v_pad).sum(1)
        norm = torch.linalg.vector_norm(g_pad, dim=1)
        valid = (norm >= EPS_NORM).float()
        cos = dot / norm.clamp_min(EPS_NORM) * valid
        coef = cos.clamp_min(0.0) * keep * valid  # max(0, cos), gated by the noise floor
        fired = (coef > 0).float()
        removed = (coef * norm)[:, None] * v_pad
        new = g_pad - removed
        if self.magnitude_preserve:
            new_norm = torch.linalg.vector_norm(new, dim=1)
            ok = (fired > 0) & (new_norm > DEGENERATE * norm)
            new = new * torch.where(ok, norm / (new_norm + EPS_RESCALE), torch.ones_like(norm))[:, None]

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
        stats = torch.stack([cos_mean, cos_var.sqrt(), fired.sum() / denom, norm.sum() / denom, n])
        c_mean, c_std, frac, gnorm, n_mod = stats.tolist()
        return {"cos_mean": c_mean, "cos_std": c_std, "frac_fired": frac, "grad_norm_mean": gnorm,
                "n_modules": int(n_mod)}


def project_grads_reference(
    names: Sequence[str],
    params: Sequence[nn.Parameter],
    vhack: Mapping[str, Tensor],
    magnitude_preserve: bool = True,
    keep_mask: Mapping[str, bool] | None = None,
    quarantine: Sequence[nn.Parameter] | None = None,
) -> dict[str, float]:
    """The spec's per-module loop, literally (one host sync per module). Tests and the bench only."""
    cos_log, n_modules, n_fired, norms = [], 0, 0, []
    for i, (name, p) in enumerate(zip(names, params)):
        g = p.grad
        if g is None:
            continue
        v = vhack[name].to(g.device).float()
        g_norm = g.float().norm()
        if g_norm < EPS_NORM:
            continue
        n_modules += 1
        cos_a = (g.float() @ v) / g_norm
        cos_log.append(cos_a.item())
        norms.append(g_norm.item())
        if cos_a > 0 and (keep_mask is None or keep_mask.get(name, True)):
            n_fired += 1
            removed = cos_a * g_norm * v
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
    }
