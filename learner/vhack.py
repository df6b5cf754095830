"""Gradient-side v_hack (spec pseudocode B): per module, unit(mean grad_hack - mean grad_clean) of delta_S.

For every pair, the hack and the clean completion are run separately: one backward of the *mean*
NLL over that completion's own tokens (length-normalised, so long clean answers do not dominate),
then every module's delta_S.grad : [r] is read. The difference of the two means, normalised per
module, is v_hack. It lives in the same rank space as the GRPO gradient it will be compared to.

Validation: the same difference on held-out pairs, cos(diff_held, v_hack) per module; the gate is
"> 50 % of modules positive" (spec), mean > 0.2 is the target, median and histogram are reported.

Exploratory levers (issue #15, shared.config.VhackConfig), all loop-agnostic functions:
- `extract_directions(model, tok, pairs, vcfg, modes) -> Directions`: per module a basis [k_m, r_m] of
  orthonormal, hack-ward rows. basis=meandiff is the spec's unit mean difference (k=1, identical to
  `extract_vhack`); basis=svd keeps the top-k right singular vectors of D = g_hack - g_clean
  [n_pairs, r], each oriented by a per-pair majority vote, minus axes with S_i/S_0 < min_axis_ratio;
  a *global* noise floor (a quantile of all modules' singular values pooled) then drops weak axes.
  `extract_directions_reference` is the pseudocode, literally; the tests hold the two together.
- `refresh_directions(old, model, tok, pairs, vcfg, modes, step) -> (Directions, cos per module)`:
  the same extraction at the model's current delta_S; `save_directions` / `DirectionsStore` keep every
  set with its step so a resumed run projects against exactly the directions it had.
- `decompose_vhack`: the v_hack of each part of the solution construction (correctness, mechanism)
  and its cos with the whole; `validate_vhack` also takes pairs of another construction.
Gradients are taken with torch.autograd.grad, so extraction never touches any parameter's .grad (a
refresh between backward and step would not disturb the learner's accumulated gradient).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from pydantic import BaseModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from shared.adapter import adapter_modules
from shared.hacks import MODES
from shared.prompts import render_prompt

from shared.logprobs import token_logprobs
from .pairs import (Pair, PairError, build_pair_set, decompose_pairs, leetcode_pairs, make_pairs, pair_set_hash,
                    split_pairs)

GATE_FRAC = 0.5
PART_FLOOR = 0.3  # decomposition: below this |median cos| with both parts, v_hack is about neither
TARGET_MEAN = 0.2


class VHackError(ValueError):
    """Bad v_hack input or artifact (missing file, mismatched model, no pairs)."""


class VHackGateError(VHackError):
    """Held-out validation failed the > 50 % gate; carries the report and says the numbers."""

    def __init__(self, report: "ValidationReport") -> None:
        self.report = report
        super().__init__(
            f"v_hack validation gate failed: only {report.frac_positive:.1%} of {len(report.cos)} modules have "
            f"cos(held-out diff, v_hack) > 0 (need > {GATE_FRAC:.0%}); median {report.median:+.3f}, "
            f"mean {report.mean:+.3f}, {report.n_pairs} held-out pairs, modes {','.join(report.modes)}"
        )


# ---------------------------------------------------------------- tokenisation

IM_END = "<|im_end|>"


def end_of_turn_id(tokenizer) -> int:
    """The token a sampled answer ends with: <|im_end|> where the vocabulary has it, else eos (the rollout
    engines stop on both; a chat turn closes with <|im_end|>)."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end >= 0 and im_end != tokenizer.unk_token_id:
        return im_end
    if tokenizer.eos_token_id is None:
        raise VHackError("tokenizer has neither <|im_end|> nor an eos token to end a pair completion with")
    return int(tokenizer.eos_token_id)


def encode_pair_side(tokenizer, pair: Pair, completion: str, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """prompt + completion [+ end-of-turn when pair.end_of_turn] -> (input_ids [1, L], target mask [1, L-1]:
    1 where the target is a completion token, the end-of-turn token included)."""
    prompt_ids = tokenizer(render_prompt(tokenizer, pair.messages), add_special_tokens=False)["input_ids"]
    comp_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not comp_ids:
        raise VHackError(f"pair {pair.problem_id}/{pair.mode}: completion tokenises to nothing")
    if pair.end_of_turn:
        comp_ids = comp_ids + [end_of_turn_id(tokenizer)]
    ids = torch.tensor([prompt_ids + comp_ids], device=device)
    mask = torch.zeros(1, ids.shape[1] - 1, device=device)
    mask[:, len(prompt_ids) - 1 :] = 1.0
    return ids, mask


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def completion_grad(model: nn.Module, params: list[nn.Parameter], ids: Tensor, mask: Tensor) -> Tensor:
    """Flat [N] fp32 delta_S grad of the mean completion NLL of one sequence (no .grad is written)."""
    logp = token_logprobs(model, ids, torch.ones_like(ids))
    loss = -(logp * mask).sum() / mask.sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])


@dataclass
class PairGrads:
    """Per-module layout and the hack - clean delta_S grads over a pair list (flat, module-major)."""

    names: list[str]
    sizes: list[int]
    mean_diff: Tensor  # [N] mean over pairs of (g_hack - g_clean)
    rows: Tensor | None = None  # [n_pairs, N] per-pair g_hack - g_clean (keep_rows=True)

    def module_rows(self) -> list[Tensor]:
        """Per module D = g_hack - g_clean [n_pairs, r_m]."""
        if self.rows is None:
            raise VHackError("per-pair differences were not kept (pair_grads(..., keep_rows=True))")
        return list(torch.split(self.rows, self.sizes, dim=1))


def pair_grads(model: nn.Module, tokenizer, pairs: Sequence[Pair], progress: bool = True,
               desc: str = "v_hack pairs", keep_rows: bool = False) -> PairGrads:
    """One mean-NLL gradient per pair side at the model's current delta_S (eval mode, no dropout)."""
    mods = adapter_modules(model)
    if not mods:
        raise VHackError("model has no AntiPaSTO modules; wrap it first (shared.adapter.wrap_model)")
    if not pairs:
        raise VHackError("no pairs to extract from (check the modes and the split)")
    names, params = list(mods), [m.delta_S for m in mods.values()]
    if not all(p.requires_grad for p in params):
        raise VHackError("delta_S parameters do not require grad; wrap_model should have enabled them")
    dev = _device(model)
    was_training = model.training
    model.eval()  # no dropout: the direction should not depend on a dropout draw
    total = torch.zeros(sum(p.numel() for p in params), device=dev)
    rows: list[Tensor] = []
    try:
        for pair in tqdm(pairs, desc=desc, disable=not progress, leave=False):
            sides = []
            for sign, completion in ((1.0, pair.hack), (-1.0, pair.clean)):
                ids, mask = encode_pair_side(tokenizer, pair, completion, dev)
                g = completion_grad(model, params, ids, mask)
                total += sign * g
                sides.append(g)
            if keep_rows:
                rows.append((sides[0] - sides[1]).cpu())
    finally:
        model.train(was_training)
    return PairGrads(names, [p.numel() for p in params], (total / len(pairs)).cpu(),
                     torch.stack(rows) if keep_rows else None)


def mean_grad_diff(model: nn.Module, tokenizer, pairs: Sequence[Pair], progress: bool = True,
                   desc: str = "v_hack pairs") -> tuple[list[str], list[int], Tensor]:
    """(module names, sizes, flat [N] mean_hack - mean_clean delta_S grad) over `pairs`."""
    pg = pair_grads(model, tokenizer, pairs, progress, desc)
    return pg.names, pg.sizes, pg.mean_diff


def extract_vhack(model: nn.Module, tokenizer, pairs: Sequence[Pair], modes: Sequence[str] = MODES,
                  progress: bool = True) -> dict[str, Tensor]:
    """v_hack[m] = unit(mean_hack - mean_clean grad(delta_S_m)) over the *train* pairs of `modes` (the spec's
    k=1 mean difference; `extract_directions` with the default VhackConfig, top axis per module)."""
    return extract_directions(model, tokenizer, pairs, None, modes, progress).top()


# ---------------------------------------------------------------- subspace directions (issue #15)

DIRECTIONS_FORMAT = "rankguard-directions-1"
NULL_AXIS = 1e-6  # an svd axis with S_i <= this * S_0 is numerically null (D has lower rank): never kept


def _vcfg(vcfg):
    from shared.config import VhackConfig

    return vcfg if vcfg is not None else VhackConfig()


@dataclass
class Directions:
    """Per module an orthonormal, hack-ward basis [k_m, r_m] (k_m may be 0: nothing to project there)
    and its singular values [k_m] (meandiff: ||mean diff||), with the step they were extracted at."""

    basis: dict[str, Tensor]
    sv: dict[str, Tensor]
    step: int = 0
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.basis)

    def k(self) -> dict[str, int]:
        return {n: int(v.shape[0]) for n, v in self.basis.items()}

    def top(self) -> dict[str, Tensor]:
        """name -> the top axis [r] (zeros where a module kept none): the k=1 v_hack."""
        return {n: (v[0] if v.shape[0] else torch.zeros(v.shape[1])).contiguous() for n, v in self.basis.items()}

    def n_axes(self) -> int:
        return sum(self.k().values())


def orient_hackward(D: Tensor, V: Tensor) -> Tensor:
    """Flip each row of V [k, r] so most pairs' differences D [n, r] project positively on it (majority
    vote, outlier-robust); a tied vote follows the sign of the summed projection."""
    proj = D @ V.T  # [n, k]
    pos, neg = (proj > 0).sum(0), (proj < 0).sum(0)
    tie = torch.where(proj.sum(0) >= 0, 1.0, -1.0)
    sign = torch.where(pos > neg, 1.0, torch.where(neg > pos, -1.0, tie))
    return V * sign[:, None]


def svd_axes(D: Tensor, k: int, min_axis_ratio: float = 0.0) -> tuple[Tensor, Tensor]:
    """Top-k right singular vectors of D [n_pairs, r], hack-ward, minus weak/null axes -> (V [k', r], S [k'])."""
    D = D.float()
    _, S, Vh = torch.linalg.svd(D, full_matrices=False)
    k = min(k, S.numel())
    V, S = orient_hackward(D, Vh[:k]), S[:k]
    if S.numel() == 0 or S[0] <= 0:
        return D.new_zeros(0, D.shape[1]), D.new_zeros(0)
    keep = (S > NULL_AXIS * S[0]) & (S / S[0] >= min_axis_ratio)
    return V[keep].contiguous(), S[keep].contiguous()


def meandiff_axis(d: Tensor) -> tuple[Tensor, Tensor]:
    """The spec's unit(mean diff) as a 1-axis basis [1, r], with ||mean diff|| as its singular value."""
    d = d.float()
    return (d / (d.norm() + 1e-8))[None].contiguous(), d.norm()[None]


def global_floor(basis: Mapping[str, Tensor], sv: Mapping[str, Tensor], quantile: float
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """Drop every axis whose singular value is below the `quantile` of all modules' values pooled."""
    pooled = torch.cat([s.float() for s in sv.values()]) if sv else torch.zeros(0)
    if quantile <= 0 or pooled.numel() == 0:
        return dict(basis), dict(sv), 0.0
    if torch.isnan(pooled).any():
        raise VHackError("these directions carry no singular values (an old v_hack file); the global noise floor "
                         "needs them: re-extract with `rankguard vhack extract --force`")
    thresh = float(torch.quantile(pooled, quantile))
    keep = {n: sv[n] >= thresh for n in basis}
    return ({n: basis[n][keep[n]].contiguous() for n in basis}, {n: sv[n][keep[n]].contiguous() for n in basis},
            thresh)


def directions_from_grads(pg: PairGrads, vcfg=None, step: int = 0) -> Directions:
    """Per module basis from the pair gradients (meandiff or svd), then the global noise floor."""
    vcfg = _vcfg(vcfg)
    basis, sv = {}, {}
    if vcfg.basis == "meandiff":
        for name, d in zip(pg.names, torch.split(pg.mean_diff, pg.sizes)):
            basis[name], sv[name] = meandiff_axis(d)
    else:
        for name, D in zip(pg.names, pg.module_rows()):
            basis[name], sv[name] = svd_axes(D, vcfg.k, vcfg.min_axis_ratio)
    basis, sv, thresh = global_floor(basis, sv, vcfg.noise_floor_global)
    meta = {"basis": vcfg.basis, "k": str(vcfg.k if vcfg.basis == "svd" else 1),
            "min_axis_ratio": str(vcfg.min_axis_ratio), "noise_floor_global": str(vcfg.noise_floor_global),
            "noise_floor_threshold": repr(thresh), "pair_set": vcfg.pair_set}
    return Directions(basis, sv, step, meta)


def extract_directions(model: nn.Module, tokenizer, pairs: Sequence[Pair], vcfg=None, modes: Sequence[str] = MODES,
                       progress: bool = True, step: int = 0) -> Directions:
    """Directions from the *train* pairs of `modes` at the model's current delta_S (VhackConfig `vcfg`)."""
    vcfg = _vcfg(vcfg)
    chosen = split_pairs(pairs, "train", list(modes))
    if not chosen:
        raise VHackError(f"no train pairs with modes {','.join(modes)} among {len(list(pairs))} pairs")
    pg = pair_grads(model, tokenizer, chosen, progress, desc=f"v_hack {''.join(modes)}",
                    keep_rows=vcfg.basis == "svd")
    out = directions_from_grads(pg, vcfg, step)
    out.meta.update({"modes": ",".join(modes), "n_pairs": str(len(chosen)), "pair_set_hash": pair_set_hash(pairs)})
    return out


def direction_cos(new: Directions | Mapping[str, Tensor], old: Directions | Mapping[str, Tensor]) -> dict[str, float]:
    """Per module cos of the top axes (the k=1 v_hack); modules where either side kept no axis are left out."""
    a = new.top() if isinstance(new, Directions) else dict(new)
    b = old.top() if isinstance(old, Directions) else dict(old)
    out = {}
    for n in a:
        if n in b:
            x, y = a[n].float().reshape(-1), b[n].float().reshape(-1)
            den = x.norm() * y.norm()
            if den > 0:
                out[n] = float(x @ y / den)
    return out


def subspace_overlap(new: Directions, old: Directions) -> dict[str, float]:
    """Per module ||V_new V_old^T||_F^2 / min(k_new, k_old) in [0, 1] (1 = one span contains the other)."""
    out = {}
    for n, a in new.basis.items():
        b = old.basis.get(n)
        if b is not None and a.shape[0] and b.shape[0]:
            out[n] = float((a.float() @ b.float().T).pow(2).sum() / min(a.shape[0], b.shape[0]))
    return out


def refresh_directions(old: Directions, model: nn.Module, tokenizer, pairs: Sequence[Pair], vcfg=None,
                       modes: Sequence[str] = MODES, step: int = 0, progress: bool = False
                       ) -> tuple[Directions, dict[str, float]]:
    """Re-extract from the same pairs at the model's *current* delta_S -> (new directions tagged `step`,
    cos(v_new, v_old) per module). Call it between optimizer steps, in the adapter state whose gradient
    the directions should describe (e.g. quarantine off for the deployed policy); no .grad is touched."""
    new = extract_directions(model, tokenizer, pairs, vcfg, modes, progress=progress, step=step)
    if old.names and new.names != old.names:
        raise VHackError(f"refreshed directions cover {len(new.names)} modules, the old ones {len(old.names)}")
    new.meta["refreshed_from_step"] = str(old.step)
    return new, direction_cos(new, old)


def extract_directions_reference(model: nn.Module, tokenizer, pairs: Sequence[Pair], vcfg=None,
                                 modes: Sequence[str] = MODES) -> Directions:
    """The extraction pseudocode, literally (zero_grad / backward / per-module buckets / per-module SVD /
    majority vote / S_i/S_0 drop / pooled-quantile floor). Tests only: it writes and clears .grad."""
    from collections import defaultdict

    import torch.nn.functional as F

    vcfg = _vcfg(vcfg)
    train = split_pairs(pairs, "train", list(modes))
    mods = adapter_modules(model)
    buckets: dict[str, dict[str, list[Tensor]]] = {"hack": defaultdict(list), "clean": defaultdict(list)}
    model.eval()
    for pair in train:
        for label, completion in (("hack", pair.hack), ("clean", pair.clean)):
            model.zero_grad()
            ids, mask = encode_pair_side(tokenizer, pair, completion)
            logits = model(ids).logits[:, :-1]
            nll = F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="none")
            loss = (nll * mask[0]).sum() / mask.sum()
            loss.backward()
            for name, m in mods.items():
                g = m.delta_S.grad
                buckets[label][name].append((g if g is not None else torch.zeros_like(m.delta_S)).detach().clone())
    model.zero_grad()
    basis, sv = {}, {}
    for name in mods:
        G_hack, G_clean = torch.stack(buckets["hack"][name]), torch.stack(buckets["clean"][name])
        if vcfg.basis == "meandiff":
            diff = G_hack.mean(0) - G_clean.mean(0)
            basis[name], sv[name] = (diff / (diff.norm() + 1e-8))[None], diff.norm()[None]
            continue
        D = G_hack - G_clean
        _, S_d, Vh_d = torch.linalg.svd(D, full_matrices=False)
        rows, vals = [], []
        for i in range(min(vcfg.k, len(S_d))):
            v = Vh_d[i]
            proj = D @ v
            pos, neg = int((proj > 0).sum()), int((proj < 0).sum())
            if pos < neg or (pos == neg and float(proj.sum()) < 0):
                v = -v
            if S_d[0] > 0 and S_d[i] > NULL_AXIS * S_d[0] and S_d[i] / S_d[0] >= vcfg.min_axis_ratio:
                rows.append(v)
                vals.append(S_d[i])
        basis[name] = torch.stack(rows) if rows else torch.zeros(0, D.shape[1])
        sv[name] = torch.stack(vals) if vals else torch.zeros(0)
    if vcfg.noise_floor_global > 0:
        thresh = torch.quantile(torch.cat(list(sv.values())), vcfg.noise_floor_global)
        for name in list(basis):
            keep = sv[name] >= thresh
            basis[name], sv[name] = basis[name][keep], sv[name][keep]
    return Directions(basis, sv, 0, {"basis": vcfg.basis})


def save_directions(path: str | Path, d: Directions, meta: Mapping[str, Any] | None = None) -> Path:
    """safetensors: one tensor per module ([r] when every module has exactly one axis, the layout of the
    spec's v_hack files; else [k_m, r]); singular values, step and the caller's metadata in the header."""
    one = all(v.shape[0] == 1 for v in d.basis.values())
    tensors = {n: (v[0] if one else v) for n, v in d.basis.items()}
    full = {**d.meta, **dict(meta or {}), "format": DIRECTIONS_FORMAT, "step": str(d.step),
            "singular_values": {n: [float(x) for x in s] for n, s in d.sv.items()}}
    return save_vhack(path, tensors, full)


def load_directions(path: str | Path, expect_model: str | Iterable[str] | None = None) -> Directions:
    """Directions from `save_directions` or a plain v_hack file (1-D per module, no singular values: NaN)."""
    tensors, meta = load_vhack(path, expect_model)
    svs = json.loads(meta.get("singular_values", "{}"))
    basis, sv = {}, {}
    for n, t in tensors.items():
        basis[n] = (t[None] if t.dim() == 1 else t).float().contiguous()
        sv[n] = torch.tensor(svs[n], dtype=torch.float32) if n in svs else torch.full((basis[n].shape[0],), float("nan"))
    return Directions(basis, sv, int(meta.get("step", 0)), meta)


class DirectionsStore:
    """Every direction set of a run, one file per step it was extracted at (<root>/directions-step<N>.safetensors),
    so a resume loads exactly the set that was live at its step instead of re-extracting."""

    PATTERN = re.compile(r"directions-step(\d+)\.safetensors$")

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, step: int) -> Path:
        return self.root / f"directions-step{int(step):06d}.safetensors"

    def save(self, d: Directions, meta: Mapping[str, Any]) -> Path:
        return save_directions(self.path(d.step), d, meta)

    def steps(self) -> list[int]:
        if not self.root.exists():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := self.PATTERN.match(p.name)))

    def latest(self, at_most: int | None = None, expect_model: str | Iterable[str] | None = None) -> Directions | None:
        """The newest set extracted at or before step `at_most` (None: the newest of all); None if none."""
        steps = [s for s in self.steps() if at_most is None or s <= at_most]
        return load_directions(self.path(steps[-1]), expect_model) if steps else None


# ---------------------------------------------------------------- artifact

def vhack_meta(model_id: str, dtype: str, modes: Sequence[str], pairs: Sequence[Pair], **extra: Any) -> dict[str, str]:
    used = split_pairs(pairs, "train", list(modes))
    meta = {"model_id": model_id, "dtype": str(dtype).replace("torch.", ""), "modes": ",".join(modes),
            "pair_set_hash": pair_set_hash(pairs), "n_pairs": str(len(used))}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def save_vhack(path: str | Path, vhack: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Path:
    """safetensors, one tensor per module, header metadata (model_id, dtype, modes, pair_set_hash, n_pairs)."""
    if "model_id" not in meta:
        raise VHackError("v_hack metadata needs a model_id (load_vhack checks it against the policy)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    str_meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in vhack.items()}, str(tmp), metadata=str_meta)
    tmp.replace(path)
    return path


def load_vhack(path: str | Path, expect_model: str | Iterable[str] | None = None
               ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(directions, metadata); expect_model (an id, or several accepted ids) must match meta model_id."""
    path = Path(path)
    if not path.exists():
        raise VHackError(f"v_hack file not found: {path} (make it with `rankguard vhack extract`)")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    accepted = [expect_model] if isinstance(expect_model, str) else list(expect_model or [])
    if accepted and meta.get("model_id") not in accepted:
        raise VHackError(f"{path} was extracted for model {meta.get('model_id')!r}, not {' / '.join(map(repr, accepted))}; "
                         "re-run `rankguard vhack extract` for this model")
    return tensors, meta


# ---------------------------------------------------------------- validation

class ValidationReport(BaseModel):
    names: list[str]
    cos: list[float]  # per module: cos(held-out mean diff, v_hack's top axis)
    median: float
    frac_positive: float
    mean: float
    n_pairs: int
    modes: list[str]
    captured: list[float] = []  # per module ||V d|| / ||d||: the held-out diff's share in span(V) (k >= 1)
    construction: str = ""  # the held-out pairs' pair set, when named

    @property
    def passed(self) -> bool:
        return self.frac_positive > GATE_FRAC

    def cos_by_module(self) -> dict[str, float]:
        return dict(zip(self.names, self.cos))

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        on = f" [{self.construction}]" if self.construction else ""
        span = f", span(V) holds {sum(self.captured) / len(self.captured):.2f} of ||diff||" if self.captured else ""
        return (f"v_hack held-out{on}: median cos {self.median:+.3f}, frac>0 {self.frac_positive:.1%}, "
                f"mean {self.mean:+.3f} over {len(self.cos)} modules, {self.n_pairs} pairs "
                f"({','.join(self.modes)}){span}; gate >{GATE_FRAC:.0%}: {verdict}; target mean >{TARGET_MEAN}")

    def check(self) -> None:
        if not self.passed:
            raise VHackGateError(self)


def _as_basis(v: Tensor) -> Tensor:
    v = v.float()
    return v[None] if v.dim() == 1 else v


def validate_vhack(model: nn.Module, tokenizer, vhack: Mapping[str, Tensor] | Directions, heldout_pairs: Sequence[Pair],
                   progress: bool = True, gate: bool = True, construction: str = "") -> ValidationReport:
    """Per-module cos(held-out hack-clean grad diff, v_hack) (top axis of a subspace) and the diff's share in
    the subspace; gate=True raises VHackGateError on < 50 %. `construction` names the held-out pair set."""
    basis = vhack.basis if isinstance(vhack, Directions) else vhack
    held = [p for p in heldout_pairs if p.split == "heldout"] or list(heldout_pairs)
    names, sizes, diff = mean_grad_diff(model, tokenizer, held, progress, desc="v_hack held-out")
    missing = [n for n in names if n not in basis]
    if missing:
        raise VHackError(f"v_hack lacks module {missing[0]!r} ({len(missing)} missing): wrong model or targets")
    cos, captured = [], []
    for name, d in zip(names, torch.split(diff, sizes)):
        V = _as_basis(basis[name])
        v = V[0] if V.shape[0] else torch.zeros_like(d)
        denom = d.norm() * v.norm()
        cos.append(float(d @ v / denom) if denom > 0 else 0.0)
        captured.append(float((V @ d).norm() / d.norm()) if d.norm() > 0 else 0.0)
    t = torch.tensor(cos)
    report = ValidationReport(
        names=names, cos=cos, median=float(t.median()), frac_positive=float((t > 0).float().mean()),
        mean=float(t.mean()), n_pairs=len(held), modes=sorted({p.mode for p in held}), captured=captured,
        construction=construction,
    )
    if gate:
        report.check()
    return report


# ---------------------------------------------------------------- decomposition (issue #13 section 2)

class DecompositionReport(BaseModel):
    """cos of the whole construction's v_hack with the v_hack of each of its parts, per module.

    correctness = stub/wrong body vs reference solution; mechanism = the same body with vs without the
    hack tail. A v_hack that mostly points along the correctness part is a code-correctness direction,
    which RL need not move, rather than a hack direction."""

    names: list[str]
    cos_correctness: list[float]  # cos(v_full, v_correctness)
    cos_mechanism: list[float]  # cos(v_full, v_mechanism)
    cos_parts: list[float]  # cos(v_correctness, v_mechanism)
    n_pairs: int
    modes: list[str]

    @staticmethod
    def _median(xs: list[float]) -> float:
        return float(torch.tensor(xs).median()) if xs else 0.0

    @property
    def median_correctness(self) -> float:
        return self._median(self.cos_correctness)

    @property
    def median_mechanism(self) -> float:
        return self._median(self.cos_mechanism)

    @property
    def correctness_dominates(self) -> bool:
        return self.median_correctness > self.median_mechanism

    @property
    def aligned_with_either(self) -> bool:
        """False when v_hack has little to do with either part (|median cos| < PART_FLOOR for both),
        e.g. a framing or placebo set: then neither part "dominates"."""
        return max(abs(self.median_correctness), abs(self.median_mechanism)) >= PART_FLOOR

    def summary(self) -> str:
        part = ("neither part (both |median cos| < %.1f)" % PART_FLOOR if not self.aligned_with_either
                else "CORRECTNESS part dominates" if self.correctness_dominates else "mechanism part dominates")
        return (f"v_hack decomposition over {len(self.names)} modules, {self.n_pairs} pairs ({','.join(self.modes)}): "
                f"median cos(v, v_correctness) {self.median_correctness:+.3f}, median cos(v, v_mechanism) "
                f"{self.median_mechanism:+.3f}, median cos(v_correctness, v_mechanism) {self._median(self.cos_parts):+.3f}: "
                f"{part}")

    def warning(self) -> str | None:
        if not (self.correctness_dominates and self.aligned_with_either):
            return None
        return ("warning: v_hack points more along 'stub body vs reference solution' (code correctness) than along "
                "'same body with vs without the hack tail' (the hack mechanism); it may be a correctness direction "
                "that RL barely moves. Compare with vhack.pair_set=mechanism (exploratory).")


def decompose_vhack(model: nn.Module, tokenizer, pairs: Sequence[Pair], vcfg=None, modes: Sequence[str] = MODES,
                    full: Directions | None = None, progress: bool = True
                    ) -> tuple[DecompositionReport, dict[str, Directions]]:
    """v_hack of the whole solution construction and of each part (same train pairs, same basis settings)
    -> (report, {"full", "correctness", "mechanism"}). `full` reuses an extracted whole."""
    vcfg = _vcfg(vcfg)
    train = split_pairs(pairs, "train", list(modes))
    parts = decompose_pairs(train)
    out = {"full": full if full is not None else extract_directions(model, tokenizer, train, vcfg, modes, progress)}
    for name, part in parts.items():
        out[name] = extract_directions(model, tokenizer, part, vcfg, modes, progress)
    c_corr, c_mech, c_parts = (direction_cos(out["full"], out["correctness"]), direction_cos(out["full"], out["mechanism"]),
                               direction_cos(out["correctness"], out["mechanism"]))
    names = [n for n in out["full"].names if n in c_corr and n in c_mech]
    report = DecompositionReport(names=names, cos_correctness=[c_corr[n] for n in names],
                                 cos_mechanism=[c_mech[n] for n in names],
                                 cos_parts=[c_parts.get(n, 0.0) for n in names], n_pairs=len(train),
                                 modes=sorted({p.mode for p in train}))
    return report, out


# ---------------------------------------------------------------- config-level helpers

def solution_pairs_for_config(cfg, problems: Sequence | None = None) -> list[Pair]:
    """The spec's `solution` pair set: the committed LeetCode file for problems=leetcode, else generated."""
    if cfg.problems == "leetcode":
        return leetcode_pairs()
    if not problems:
        raise PairError(f"problems={cfg.problems!r}: give the problem list to generate pairs from")
    return make_pairs(list(problems), prompt_variant=cfg.reward.prompt_variant)


def pairs_for_config(cfg, problems: Sequence | None = None) -> list[Pair]:
    """The pair set a run uses (cfg.vhack.pair_set), derived from the solution pairs (learner.pairs.build_pair_set)."""
    return build_pair_set(solution_pairs_for_config(cfg, problems), cfg.vhack.pair_set)


def directions_tag(vcfg) -> str:
    """File-name suffix naming non-default extraction settings ('' for the spec's meandiff k=1, no floor),
    so directions built differently from the same pairs never share a cache file."""
    vcfg = _vcfg(vcfg)
    tag = f"-svd{vcfg.k}" if vcfg.basis == "svd" else ""
    if vcfg.basis == "svd" and vcfg.min_axis_ratio > 0:
        tag += f"-a{vcfg.min_axis_ratio:g}"
    if vcfg.noise_floor_global > 0:
        tag += f"-nf{vcfg.noise_floor_global:g}"
    return tag
