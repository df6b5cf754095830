"""AntiPaSTO adapter (spec pseudocode A): each target nn.Linear becomes W = U diag(S + delta_S) Vh.

U, S, Vh are the frozen fp32 SVD of the original weight; only `delta_S : [r]` trains, so every
gradient lives on the fixed rank axis where v_hack is defined.

    y = ((x @ Vh.T) * (S + delta_S [+ delta_Q])) @ U.T + b   [+ x @ W_res.T when rank < full]

Dtypes (decided here, relied on elsewhere):
- U, Vh (and W_res) are stored in the *model dtype* (bf16 on GPU): the two matmuls run at the
  same precision and speed as the original Linear, and buffers cost no more memory than needed.
- S, delta_S, delta_Q are fp32. The scale S + delta_S is formed in fp32 and multiplied onto
  x @ Vh.T in fp32 before the cast back: casting the scale itself to bf16 would round away every
  delta smaller than S/256 (the lr is ~1e-4), freezing the policy between rounding jumps.
- S, delta_S, delta_Q stay fp32 even through a later model.to(dtype) / .half() (see `_apply`).
- Tolerance at delta_S = 0 vs the unwrapped model (tests/unit/test_adapter.py, tiny Qwen3, logits ~0.7):
  fp32 max |Δlogit| < 1e-3 (measured ~1e-6); bf16 max |Δlogit| vs the unwrapped bf16 model < 2e-2
  (measured ~7e-3) and no more than 2.5x the unwrapped bf16 model's own distance to fp32
  (measured 1.0-1.7x): rounding U and Vh to bf16 costs about what rounding W did.

Cost: two matmuls per Linear, r(d_in + d_out) vs d_in d_out MACs per token (1.26x for a
2560x9728 MLP weight, 1.63x for 2560->4096 q_proj), forward and backward alike; autograd keeps one
[tokens, r] tensor h = x Vh^T per module (the unwrapped frozen Linear keeps nothing). See
bench/adapter.py for whole-model ratios.

Route arm: `delta_Q : [r]` (zeros, frozen unless the learner opts in) is the quarantine delta;
it is added to the scale only while `module.quarantine_active` is True.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from shared.config import DEFAULT_TARGETS
from shared.svd import svd_factors

if TYPE_CHECKING:  # pragma: no cover
    from shared.svd_cache import SVDCache

__all__ = [
    "AdapterError", "AntiPaSTOLinear", "DEFAULT_TARGETS", "DeltaKind", "wrap_model", "adapter_modules",
    "get_delta", "set_delta", "delta_s_layout", "delta_s_parameters", "set_quarantine_active", "quarantine",
    "cap_quarantine_",
    "adapter_disabled", "merged_weight", "merged_state_dict", "merged_inference",
]


class AdapterError(ValueError):
    """Bad adapter input (module name, shape, layout); the message names the value and the options."""


class _ScaledSVDMatmul(torch.autograd.Function):
    """((x @ Vh.T) * scale) @ U.T + b with the scale applied in fp32, saving only h = x @ Vh.T.

    Backward (U, Vh, b frozen): gU = dL/dy @ U;  dL/dscale = sum_t h ⊙ gU;  dL/dx = (gU * scale) @ Vh.
    bf16 * fp32 promotes to an fp32 product that is cast back once; plain autograd on the same
    expression would keep that fp32 product alive for backward (2x the bytes of h in bf16).
    """

    @staticmethod
    def forward(ctx, x: Tensor, Vh: Tensor, U: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        h = F.linear(x, Vh)
        ctx.save_for_backward(h if ctx.needs_input_grad[3] else None, Vh, U, scale)
        return F.linear((h * scale).to(h.dtype), U, bias)

    @staticmethod
    def backward(ctx, gy: Tensor):
        h, Vh, U, scale = ctx.saved_tensors
        gU = gy @ U
        gx = gscale = None
        if ctx.needs_input_grad[0]:
            gx = (gU * scale).to(gU.dtype) @ Vh
        if ctx.needs_input_grad[3]:
            gscale = (h.float() * gU).reshape(-1, h.shape[-1]).sum(0)
        return gx, None, None, gscale, None


class AntiPaSTOLinear(nn.Module):
    """A Linear as frozen U [d_out,r], S [r], Vh [r,d_in] (+ W_res) with trainable delta_S [r] only."""

    def __init__(self, U: Tensor, S: Tensor, Vh: Tensor, bias: Tensor | None = None,
                 W_res: Tensor | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        d_out, r = U.shape
        if S.shape != (r,) or Vh.shape[0] != r:
            raise AdapterError(f"SVD factor shapes disagree: U {tuple(U.shape)}, S {tuple(S.shape)}, "
                               f"Vh {tuple(Vh.shape)}")
        d_in = Vh.shape[1]
        dtype = dtype or U.dtype
        dev = U.device
        self.in_features, self.out_features, self.rank = d_in, d_out, r
        self.full_rank = min(d_in, d_out)
        self.register_buffer("U", U.detach().to(dev, dtype).contiguous())
        self.register_buffer("S", S.detach().to(dev, torch.float32).contiguous())
        self.register_buffer("Vh", Vh.detach().to(dev, dtype).contiguous())
        self.register_buffer("W_res", None if W_res is None else W_res.detach().to(dev, dtype).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dev, dtype), requires_grad=False)
        self.delta_S = nn.Parameter(torch.zeros(r, device=dev, dtype=torch.float32))
        self.delta_Q = nn.Parameter(torch.zeros(r, device=dev, dtype=torch.float32), requires_grad=False)
        self.quarantine_active = False
        self.adapter_enabled = True
        self.merged: Tensor | None = None  # plain weight for no-grad inference; see merged_inference()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None,
                    svd: tuple[Tensor, Tensor, Tensor] | None = None) -> "AntiPaSTOLinear":
        """Wrap `linear`; `svd` = precomputed full fp32 (U, S, Vh) (e.g. from SVDCache), else computed.

        rank < min(d_in, d_out) keeps the top-`rank` triplets and adds W_res = W - U_r diag(S_r) Vh_r.
        """
        W = linear.weight
        full = min(W.shape)
        r = full if rank is None else int(rank)
        if not 1 <= r <= full:
            raise AdapterError(f"rank {rank} out of range for a {W.shape[0]}x{W.shape[1]} Linear (1..{full})")
        U, S, Vh = svd if svd is not None else svd_factors(W)
        if U.shape != (W.shape[0], full) or S.shape != (full,) or Vh.shape != (full, W.shape[1]):
            raise AdapterError(f"SVD factors U {tuple(U.shape)} S {tuple(S.shape)} Vh {tuple(Vh.shape)} "
                               f"do not fit weight {tuple(W.shape)}")
        dev = W.device
        U, S, Vh = U.to(dev, torch.float32), S.to(dev, torch.float32), Vh.to(dev, torch.float32)
        W_res = None
        if r < full:
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
            W_res = W.detach().float() - (U * S) @ Vh
        return cls(U, S, Vh, bias=linear.bias, W_res=W_res, dtype=W.dtype)

    _FP32 = ("S", "delta_S", "delta_Q")

    def _apply(self, fn, recurse=True):
        """model.to(dtype)/.half()/.cuda() move S, delta_S, delta_Q across devices but keep them fp32."""
        held = {}
        for n in self._FP32:
            store = self._buffers if n in self._buffers else self._parameters
            held[n] = (store, store[n])
            store[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for n, (store, t) in held.items():
                dev = fn(torch.empty(0, device=t.device)).device
                if dev != t.device:
                    if isinstance(t, nn.Parameter):
                        t.data = t.data.to(dev)
                        if t.grad is not None:
                            t.grad = t.grad.to(dev)
                    else:
                        t = t.to(dev)
                store[n] = t
        return self

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.U.dtype

    def scale(self) -> Tensor:
        """S + delta_S (+ delta_Q while quarantine is active); plain S when the adapter is disabled."""
        if not self.adapter_enabled:
            return self.S
        s = self.S + self.delta_S
        return s + self.delta_Q if self.quarantine_active else s

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.U.dtype)
        if self.merged is not None and not torch.is_grad_enabled():
            return F.linear(x, self.merged, self.bias)  # one matmul instead of two (sampling)
        y = _ScaledSVDMatmul.apply(x, self.Vh, self.U, self.scale(), self.bias)
        if self.W_res is not None:
            y = y + F.linear(x, self.W_res)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
                f"{'' if self.rank == self.full_rank else ' (+W_res)'}, dtype={self.U.dtype}, "
                f"bias={self.bias is not None}")


# ---------------------------------------------------------------- wrapping

def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def wrap_model(model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGETS, rank: int | None = None,
               cache: "SVDCache | None" = None, model_id: str | None = None,
               revision: str | None = None, progress: bool = True) -> list[str]:
    """Replace every nn.Linear whose name ends in a target with AntiPaSTOLinear; freeze all else.

    Returns the wrapped module names in model order (e.g. "model.layers.0.self_attn.q_proj").
    SVDs come from `cache` (built and saved there on a miss) or are computed in place.
    """
    targets = list(target_modules)
    if not targets:
        raise AdapterError("target_modules is empty; give names such as " + ", ".join(DEFAULT_TARGETS))
    named = list(model.named_modules())
    linears = [n for n, m in named if isinstance(m, nn.Linear)]
    chosen: list[tuple[str, nn.Module]] = []
    for t in targets:
        hits = [(n, m) for n, m in named if _matches(n, t) and isinstance(m, (nn.Linear, AntiPaSTOLinear))]
        if not hits:
            shown = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise AdapterError(f"module name {t!r} matches no nn.Linear; linear names in this model: "
                               f"{', '.join(shown) or '(none)'}")
        chosen += hits
    order = {n: i for i, (n, _) in enumerate(named)}
    chosen = sorted(dict(chosen).items(), key=lambda kv: order[kv[0]])
    names = [n for n, _ in chosen]
    todo = [n for n, m in chosen if isinstance(m, nn.Linear)]
    del named, chosen, hits  # hold names, not modules, so replaced weights can be freed as we go
    if model_id is None:
        model_id = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    bar = tqdm(todo, desc="AntiPaSTO wrap", unit="module", disable=not progress or len(todo) < 2,
               leave=False)
    for name in bar:  # one module at a time: the old weight is freed before the next SVD
        lin = model.get_submodule(name)
        svd = cache.factors(model_id, revision, name, lin.weight) if cache is not None else None
        new = AntiPaSTOLinear.from_linear(lin, rank=rank, svd=svd)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        del lin, svd, new
    for p_name, p in model.named_parameters():
        p.requires_grad_(p_name.endswith(".delta_S") or p_name == "delta_S")
    return names


def adapter_modules(model: nn.Module) -> "OrderedDict[str, AntiPaSTOLinear]":
    """Wrapped modules by name, in model order (the order of every flat vector here)."""
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, AntiPaSTOLinear))


def _mods(model: nn.Module) -> "OrderedDict[str, AntiPaSTOLinear]":
    mods = adapter_modules(model)
    if not mods:
        raise AdapterError("model has no AntiPaSTO modules; call wrap_model(model) first")
    return mods


def delta_s_layout(model: nn.Module) -> tuple[list[str], list[int]]:
    mods = _mods(model)
    return list(mods), [m.rank for m in mods.values()]


def delta_s_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable delta_S parameters in module order (what the optimizer gets)."""
    return [m.delta_S for m in _mods(model).values()]


# ---------------------------------------------------------------- get / set (delta_S, delta_Q, delta_S.grad)

DeltaKind = Literal["s", "q", "s_grad"]
_ATTRS = {"s": "delta_S", "q": "delta_Q"}  # the settable kinds; "s_grad" is read-only


def _attr(kind: str, settable: bool = False) -> str:
    kinds = tuple(_ATTRS) if settable else (*_ATTRS, "s_grad")
    if kind not in kinds:
        raise AdapterError(f"unknown delta kind {kind!r}; valid kinds: {', '.join(kinds)}")
    return _ATTRS.get(kind, "delta_S.grad")


def _value(m: AntiPaSTOLinear, kind: str) -> Tensor:
    """One module's vector as an fp32 CPU tensor (may alias the parameter; callers copy)."""
    if kind == "s_grad":
        g = m.delta_S.grad
        return g.detach().float().cpu() if g is not None else torch.zeros(m.rank)
    return getattr(m, _ATTRS[kind]).detach().float().cpu()


def get_delta(model: nn.Module, kind: DeltaKind = "s", flat: bool = False) -> dict[str, Tensor] | Tensor:
    """delta_S ("s"), delta_Q ("q", the route arm's quarantine) or delta_S.grad ("s_grad", zeros where
    a grad is None) as fp32 CPU copies: {module name: [r]}, or with flat=True one vector in module
    order (the layout of delta_s_layout; delta_Q and grads share it)."""
    _attr(kind)
    mods = _mods(model)
    if flat:
        return torch.cat([_value(m, kind).reshape(-1) for m in mods.values()])
    return {n: _value(m, kind).clone() for n, m in mods.items()}


@torch.no_grad()
def set_delta(model: nn.Module, values: Mapping[str, Tensor] | Tensor, kind: DeltaKind = "s",
              strict: bool = True) -> None:
    """Copy delta_S ("s") or delta_Q ("q") in: a {module name: [r]} dict (shape-checked; strict=True
    also requires every module), or one flat vector in module order (a Tensor, array or list)."""
    attr = _attr(kind, settable=True)
    mods = _mods(model)
    if not isinstance(values, Mapping):
        _set_flat(mods, values, attr)
        return
    unknown = sorted(set(values) - set(mods))
    if unknown:
        raise AdapterError(f"unknown adapter module {unknown[0]!r}; known modules include: "
                           f"{', '.join(list(mods)[:4])}, ... ({len(mods)} in all)")
    missing = [n for n in mods if n not in values]
    if strict and missing:
        raise AdapterError(f"{attr} for {len(missing)} module(s) missing, first: {missing[0]!r}")
    for n, v in values.items():
        p = getattr(mods[n], attr)
        v = torch.as_tensor(v)
        if tuple(v.shape) != tuple(p.shape):
            raise AdapterError(f"{attr} for {n!r} has shape {tuple(v.shape)}, expected {tuple(p.shape)}")
        p.copy_(v.to(p.device, p.dtype))


def _set_flat(mods: "OrderedDict[str, AntiPaSTOLinear]", flat, attr: str) -> None:
    flat = torch.as_tensor(flat).reshape(-1)
    total = sum(m.rank for m in mods.values())
    if flat.numel() != total:
        raise AdapterError(f"flat {attr} has {flat.numel()} values, the model's layout needs {total} "
                           f"({len(mods)} modules)")
    off = 0
    for m in mods.values():
        p = getattr(m, attr)
        p.copy_(flat[off:off + m.rank].to(p.device, p.dtype))
        off += m.rank


# ---------------------------------------------------------------- modes

def set_quarantine_active(model: nn.Module, active: bool) -> None:
    """Route arm: add delta_Q to every module's scale while active (train rollouts), not at eval."""
    for m in _mods(model).values():
        m.quarantine_active = bool(active)


@contextlib.contextmanager
def quarantine(model: nn.Module, active: bool = True) -> Iterator[nn.Module]:
    mods = _mods(model)
    before = {n: m.quarantine_active for n, m in mods.items()}
    set_quarantine_active(model, active)
    try:
        yield model
    finally:
        for n, m in mods.items():
            m.quarantine_active = before[n]


@torch.no_grad()
def cap_quarantine_(model: nn.Module, ratio: float) -> int:
    """Route arm's bound: pull each module's delta_Q back onto ||delta_Q|| <= ratio * ||S|| (0 = no cap).

    Why a norm cap (not weight decay, not matched rank): the gradient only ever pushes delta_Q along
    +v_hack, so unbounded it ratchets (||delta_Q|| reached 0.75 ||S|| in 200 toy steps), the training
    policy collapses and delta_S learns to cancel it. Under Adam, decay would bound each coordinate at
    ~1/decay whatever the module's scale, and matched rank bounds nothing about size. A per-module
    cap relative to the module's own spectrum is a trust region: the training policy (delta_S +
    delta_Q) stays within a fixed relative distance of the deployed one (delta_S), whatever the run
    length. Returns how many modules were pulled back."""
    if ratio <= 0:
        return 0
    capped = 0
    for m in _mods(model).values():
        limit = ratio * float(torch.linalg.vector_norm(m.S))
        norm = float(torch.linalg.vector_norm(m.delta_Q))
        if norm > limit:
            m.delta_Q.mul_(limit / norm)
            capped += 1
    return capped


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """delta_S and delta_Q count as 0 inside: the frozen reference policy without a second model."""
    mods = _mods(model)
    before = {n: m.adapter_enabled for n, m in mods.items()}
    for m in mods.values():
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for n, m in mods.items():
            m.adapter_enabled = before[n]


# ---------------------------------------------------------------- merging (rollout engines)

@contextlib.contextmanager
def merged_inference(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, no-grad forwards use one plain weight U diag(scale) Vh (+ W_res) per module.

    Why: sampling is many small decode steps, where the adapter's two matmuls and their glue cost
    ~2x a Linear; the weight is merged from the *current* scale (delta_S, quarantine, adapter
    switch as set on entry), so grad-enabled forwards inside still take the adapter path.
    """
    mods = _mods(model)
    with torch.no_grad():
        for m in mods.values():
            m.merged = _merge(m, m.scale().float(), m.U.dtype)
    try:
        yield model
    finally:
        for m in mods.values():
            m.merged = None


@torch.no_grad()
def merged_weight(module: AntiPaSTOLinear, delta: Tensor | None = None, include_quarantine: bool = False,
                  dtype: torch.dtype | None = None) -> Tensor:
    """U diag(S + delta) Vh (+ W_res) as a plain [d_out, d_in] weight (fp32 math, `dtype` out).

    delta defaults to the module's delta_S; include_quarantine adds delta_Q. dtype defaults to the
    module's weight dtype.
    """
    d = module.delta_S if delta is None else torch.as_tensor(delta)
    if tuple(d.shape) != (module.rank,):
        raise AdapterError(f"delta has shape {tuple(d.shape)}, expected ({module.rank},)")
    s = module.S + d.to(module.S.device, torch.float32)
    if include_quarantine:
        s = s + module.delta_Q
    return _merge(module, s, dtype or module.weight_dtype)


def _merge(module: AntiPaSTOLinear, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """U diag(scale) Vh (+ W_res) in fp32, cast to `dtype`."""
    W = (module.U.float() * scale) @ module.Vh.float()
    if module.W_res is not None:
        W = W + module.W_res.float()
    return W.to(dtype)


@torch.no_grad()
def merged_state_dict(model: nn.Module, include_quarantine: bool = False,
                      dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """{"<module>.weight": merged W} (+ ".bias") for every wrapped module: HF checkpoint names."""
    out: dict[str, Tensor] = {}
    for n, m in _mods(model).items():
        out[f"{n}.weight"] = merged_weight(m, include_quarantine=include_quarantine, dtype=dtype)
        if m.bias is not None:
            out[f"{n}.bias"] = m.bias.detach().to(dtype or m.bias.dtype)
    return out
