"""Engine-side delta_S merge: W = U diag(S + delta) Vh (+ W_res), many modules per batched matmul.

A rollout engine that holds plain weights (vLLM, bench/sync.py) turns a policy version's flat
delta_S back into HF-named weights here. The frozen factors live on the engine's device once;
each update only ships the delta (a few thousand floats on the toy model, ~0.5M on 4B models).

Math and dtypes mirror `shared.adapter.merged_weight` (the learner's effective weight): factors stay
in their stored dtype, the scale S + delta and both products are fp32, the result is cast to
`out_dtype` at the end. Modules with equal factor shapes inside a window of consecutive modules
are stacked once; on a GPU each such group is merged with one `bmm`/`baddbmm` (on CPU, where bmm
is just a slower loop, one gemm per module). The output keeps the merger's order (model order),
so a loader that processes layer by layer (vLLM's layerwise reload) sees each layer together.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from shared.codec import decode_floats

Factors = tuple  # (U [d_out,r], S [r], Vh [r,d_in]) or (U, S, Vh, W_res [d_out,d_in] | None)

__all__ = ["MergeError", "DeltaMerger", "as_flat_delta", "factors_from_weight", "factors_from_wrapped"]


class MergeError(ValueError):
    """Update layout does not fit the merger's modules; the message names the bad value."""


def as_flat_delta(delta: Tensor | bytes | bytearray | memoryview | np.ndarray | Sequence[float]) -> Tensor:
    """Flat fp32 CPU tensor from a tensor, little-endian float32 bytes (DeltaSUpdate.data) or a list."""
    if isinstance(delta, (bytes, bytearray, memoryview)):
        return decode_floats(delta)
    return torch.as_tensor(delta, dtype=torch.float32).reshape(-1)


@dataclass
class _Group:
    """Modules of one window sharing (U, Vh, W_res) shapes and dtype, stacked along dim 0."""

    idx: list[int]  # positions in merger.names
    U: Tensor  # [k, d_out, r]
    S: Tensor  # [k, r] fp32
    Vh: Tensor  # [k, r, d_in]
    W_res: Tensor | None  # [k, d_out, d_in] or None


class DeltaMerger:
    """Frozen per-module SVD factors on `device`; `merged(delta)` yields ("<module>.weight", W).

    factors: {module name: (U, S, Vh) or (U, S, Vh, W_res)} in model order (names as in
    `shared.adapter.delta_s_layout`). window_bytes bounds the fp32 scratch of one batched merge
    (the peak extra memory of an update is about that, plus one window of outputs).
    """

    def __init__(self, factors: Mapping[str, Factors], device: str | torch.device = "cpu",
                 out_dtype: torch.dtype | None = None, window_bytes: int = 1 << 30, batched: bool | None = None):
        if not factors:
            raise MergeError("no modules to merge (factors is empty)")
        self.device = torch.device(device)
        # one bmm per group pays off on GPUs (fewer launches); CPU bmm is a slower loop of gemms
        self.batched = (self.device.type != "cpu") if batched is None else bool(batched)
        self.names: list[str] = list(factors)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.ranks: list[int] = []
        self.shapes: list[tuple[int, int]] = []
        dtypes = set()
        entries = []
        for name, f in factors.items():
            if len(f) not in (3, 4):
                raise MergeError(f"factors for {name!r} must be (U, S, Vh) or (U, S, Vh, W_res), got {len(f)} items")
            U, S, Vh = f[0], f[1], f[2]
            W_res = f[3] if len(f) == 4 else None
            r = S.shape[0]
            if U.dim() != 2 or Vh.dim() != 2 or U.shape[1] != r or Vh.shape[0] != r:
                raise MergeError(f"factor shapes for {name!r} disagree: U {tuple(U.shape)}, S {tuple(S.shape)}, "
                                 f"Vh {tuple(Vh.shape)}")
            shape = (U.shape[0], Vh.shape[1])
            if W_res is not None and tuple(W_res.shape) != shape:
                raise MergeError(f"W_res for {name!r} has shape {tuple(W_res.shape)}, expected {shape}")
            self.ranks.append(r)
            self.shapes.append(shape)
            dtypes.add(U.dtype)
            entries.append((U, S, Vh, W_res))
        self.offsets = np.concatenate([[0], np.cumsum(self.ranks)]).tolist()
        self.total = int(self.offsets[-1])
        self.out_dtype = out_dtype or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
        self.windows: list[list[_Group]] = self._plan(entries, window_bytes)

    # ------------------------------------------------------------------ setup
    def _plan(self, entries: list, window_bytes: int) -> list[list[_Group]]:
        """Cut model order into windows of <= window_bytes fp32 output; stack equal shapes inside each."""
        windows: list[list[int]] = [[]]
        used = 0
        for i, (d_out, d_in) in enumerate(self.shapes):
            need = 4 * d_out * d_in
            if windows[-1] and used + need > window_bytes:
                windows.append([])
                used = 0
            windows[-1].append(i)
            used += need
        plan = []
        for win in windows:
            buckets: "OrderedDict[tuple, list[int]]" = OrderedDict()
            for i in win:
                U, S, Vh, W_res = entries[i]
                key = (tuple(U.shape), tuple(Vh.shape), U.dtype, Vh.dtype, W_res is not None,
                       None if W_res is None else W_res.dtype)
                buckets.setdefault(key, []).append(i)
            groups = []
            for idx in buckets.values():
                def stack(j: int, dtype=None) -> Tensor:
                    return torch.stack([entries[i][j].to(self.device, dtype) for i in idx]).contiguous()
                has_res = entries[idx[0]][3] is not None
                groups.append(_Group(idx=idx, U=stack(0), S=stack(1, torch.float32), Vh=stack(2),
                                     W_res=stack(3) if has_res else None))
            plan.append(groups)
        return plan

    # ------------------------------------------------------------------ use
    def check_layout(self, names: Sequence[str] | None, sizes: Sequence[int] | None) -> list[int]:
        """Start of each merger module's slice in a delta laid out as (names, sizes); MergeError if it
        does not fit. names may be any permutation of the merger's modules (learner order vs the
        engine's checkpoint order); None means the merger's own layout."""
        if names is None and sizes is None:
            return self.offsets[:-1]
        names, sizes = list(names or []), [int(s) for s in (sizes or [])]
        if len(sizes) != len(names):
            raise MergeError(f"delta layout has {len(names)} names but {len(sizes)} sizes")
        given = set(names)
        extra = [n for n in names if n not in self.index]
        missing = [n for n in self.names if n not in given]
        if extra or missing or len(given) != len(names):
            what = (f"unknown module {extra[0]!r}" if extra else f"missing module {missing[0]!r}" if missing
                    else "duplicate module names")
            raise MergeError(f"delta layout does not match the engine's modules: {what} "
                             f"({len(names)} names given, {len(self.names)} expected, e.g. {self.names[0]!r})")
        starts = [0] * len(self.names)
        off = 0
        for n, size in zip(names, sizes):
            i = self.index[n]
            if size != self.ranks[i]:
                raise MergeError(f"delta size for {n!r} is {size}, the engine's rank there is {self.ranks[i]}")
            starts[i] = off
            off += size
        return starts

    @torch.no_grad()
    def merged(self, delta_flat, names: Sequence[str] | None = None, sizes: Sequence[int] | None = None,
               suffix: str = ".weight") -> Iterator[tuple[str, Tensor]]:
        """Yield ("<module>.weight", W [d_out,d_in] in out_dtype on device) in model order.

        delta_flat: fp32 values (tensor, list, or float32 bytes) laid out as (names, sizes) — any order
        of exactly the merger's modules and ranks (checked, so a learner/engine mismatch fails
        loudly) — or in the merger's own order when names/sizes are None.
        """
        starts = self.check_layout(names, sizes)
        delta = as_flat_delta(delta_flat)
        if delta.numel() != self.total:
            raise MergeError(f"delta has {delta.numel()} values, the engine's {len(self.names)} modules need "
                             f"{self.total}")
        if not bool(torch.isfinite(delta).all()):
            raise MergeError("delta contains NaN or inf values")
        delta = delta.to(self.device, non_blocking=True)
        for groups in self.windows:
            out: dict[int, Tensor] = {}
            for g in groups:
                d = torch.stack([delta[starts[i]:starts[i] + self.ranks[i]] for i in g.idx])
                scale = g.S + d  # [k, r] fp32
                if self.batched:
                    scaled = g.U.float() * scale[:, None, :]  # [k, d_out, r]
                    if g.W_res is not None:
                        W = torch.baddbmm(g.W_res.float(), scaled, g.Vh.float())
                    else:
                        W = torch.bmm(scaled, g.Vh.float())
                    W = W.to(self.out_dtype)
                    for j, i in enumerate(g.idx):
                        out[i] = W[j]
                    continue
                for j, i in enumerate(g.idx):
                    Wj = (g.U[j].float() * scale[j]) @ g.Vh[j].float()
                    if g.W_res is not None:
                        Wj += g.W_res[j].float()
                    out[i] = Wj.to(self.out_dtype)
            for i in sorted(out):
                yield self.names[i] + suffix, out.pop(i)

    def merged_dict(self, delta_flat, names=None, sizes=None) -> dict[str, Tensor]:
        return dict(self.merged(delta_flat, names, sizes))

    def nbytes(self) -> int:
        """Device bytes held by the stacked factors."""
        return sum(t.numel() * t.element_size() for w in self.windows for g in w
                   for t in (g.U, g.S, g.Vh, g.W_res) if t is not None)

    def __repr__(self) -> str:
        groups = sum(len(w) for w in self.windows)
        return (f"DeltaMerger({len(self.names)} modules, {self.total} deltas, {len(self.windows)} window(s), "
                f"{groups} group(s){' batched' if self.batched else ''}, {self.nbytes() / 2**20:.1f} MiB on {self.device}, "
                f"out {self.out_dtype})")


def factors_from_weight(weight: Tensor, svd: tuple[Tensor, Tensor, Tensor], rank: int | None = None) -> Factors:
    """Full (U, S, Vh) of `weight` -> merger factors, truncated to `rank` with the fp32 residual in W's dtype.

    Same rule as `AntiPaSTOLinear.from_linear`: W_res = W - U_r diag(S_r) Vh_r, computed in fp32.
    """
    U, S, Vh = svd
    full = S.shape[0]
    r = full if rank is None else int(rank)
    if not 1 <= r <= full:
        raise MergeError(f"rank {rank} out of range for a {weight.shape[0]}x{weight.shape[1]} weight (1..{full})")
    if r == full:
        return U.to(weight.dtype), S.float(), Vh.to(weight.dtype)
    Uf, Sf, Vf = U[:, :r].float(), S[:r].float(), Vh[:r].float()
    W_res = weight.float() - (Uf * Sf) @ Vf
    return Uf.to(weight.dtype), Sf, Vf.to(weight.dtype), W_res.to(weight.dtype)



def factors_from_wrapped(model: torch.nn.Module) -> "OrderedDict[str, Factors]":
    """{module: (U, S, Vh[, W_res])} straight from an AntiPaSTO-wrapped model's buffers (model order)."""
    from shared.adapter import adapter_modules

    out: "OrderedDict[str, Factors]" = OrderedDict()
    for name, m in adapter_modules(model).items():
        f = (m.U.detach(), m.S.detach(), m.Vh.detach())
        out[name] = f + (m.W_res.detach(),) if m.W_res is not None else f
    if not out:
        raise MergeError("model has no AntiPaSTO modules; call shared.adapter.wrap_model(model) first")
    return out
