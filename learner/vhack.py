"""Gradient-side v_hack (spec pseudocode B): per module, unit(mean grad_hack - mean grad_clean) of delta_S.

For every pair, the hack and the clean completion are run separately: one backward of the *mean*
NLL over that completion's own tokens (length-normalised, so long clean answers do not dominate),
then every module's delta_S.grad : [r] is read. The difference of the two means, normalised per
module, is v_hack. It lives in the same rank space as the GRPO gradient it will be compared to.

Validation: the same difference on held-out pairs, cos(diff_held, v_hack) per module; the gate is
"> 50 % of modules positive" (spec), mean > 0.2 is the target, median and histogram are reported.
"""
from __future__ import annotations

import json
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
from .pairs import Pair, PairError, leetcode_pairs, make_pairs, pair_set_hash, split_pairs

GATE_FRAC = 0.5
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

def encode_pair_side(tokenizer, pair: Pair, completion: str, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """prompt + completion -> (input_ids [1, L], target mask [1, L-1]: 1 where the target is a completion token)."""
    prompt_ids = tokenizer(render_prompt(tokenizer, pair.messages), add_special_tokens=False)["input_ids"]
    comp_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if not comp_ids:
        raise VHackError(f"pair {pair.problem_id}/{pair.mode}: completion tokenises to nothing")
    ids = torch.tensor([prompt_ids + comp_ids], device=device)
    mask = torch.zeros(1, ids.shape[1] - 1, device=device)
    mask[:, len(prompt_ids) - 1 :] = 1.0
    return ids, mask


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _completion_grad(model: nn.Module, params: list[nn.Parameter], ids: Tensor, mask: Tensor) -> Tensor:
    """Flat [N] fp32 delta_S grad of the mean completion NLL of one sequence."""
    for p in params:
        p.grad = None
    logp = token_logprobs(model, ids, torch.ones_like(ids))
    loss = -(logp * mask).sum() / mask.sum()
    loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])


def mean_grad_diff(model: nn.Module, tokenizer, pairs: Sequence[Pair], progress: bool = True,
                   desc: str = "v_hack pairs") -> tuple[list[str], list[int], Tensor]:
    """(module names, sizes, flat [N] mean_hack - mean_clean delta_S grad) over `pairs`."""
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
    try:
        for pair in tqdm(pairs, desc=desc, disable=not progress, leave=False):
            for sign, completion in ((1.0, pair.hack), (-1.0, pair.clean)):
                ids, mask = encode_pair_side(tokenizer, pair, completion, dev)
                total += sign * _completion_grad(model, params, ids, mask)
    finally:
        for p in params:
            p.grad = None
        model.train(was_training)
    return names, [p.numel() for p in params], (total / len(pairs)).cpu()


def extract_vhack(model: nn.Module, tokenizer, pairs: Sequence[Pair], modes: Sequence[str] = MODES,
                  progress: bool = True) -> dict[str, Tensor]:
    """v_hack[m] = unit(mean_hack - mean_clean grad(delta_S_m)) over the *train* pairs of `modes`."""
    chosen = split_pairs(pairs, "train", list(modes))
    if not chosen:
        raise VHackError(f"no train pairs with modes {','.join(modes)} among {len(list(pairs))} pairs")
    names, sizes, diff = mean_grad_diff(model, tokenizer, chosen, progress, desc=f"v_hack {''.join(modes)}")
    out = {}
    for name, d in zip(names, torch.split(diff, sizes)):
        out[name] = (d / (d.norm() + 1e-8)).contiguous()
    return out


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
    cos: list[float]  # per module: cos(held-out mean diff, v_hack)
    median: float
    frac_positive: float
    mean: float
    n_pairs: int
    modes: list[str]

    @property
    def passed(self) -> bool:
        return self.frac_positive > GATE_FRAC

    def cos_by_module(self) -> dict[str, float]:
        return dict(zip(self.names, self.cos))

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"v_hack held-out: median cos {self.median:+.3f}, frac>0 {self.frac_positive:.1%}, "
                f"mean {self.mean:+.3f} over {len(self.cos)} modules, {self.n_pairs} pairs "
                f"({','.join(self.modes)}); gate >{GATE_FRAC:.0%}: {verdict}; target mean >{TARGET_MEAN}")

    def check(self) -> None:
        if not self.passed:
            raise VHackGateError(self)


def validate_vhack(model: nn.Module, tokenizer, vhack: Mapping[str, Tensor], heldout_pairs: Sequence[Pair],
                   progress: bool = True, gate: bool = True) -> ValidationReport:
    """Per-module cos(held-out hack-clean grad diff, v_hack); gate=True raises VHackGateError on < 50 %."""
    held = [p for p in heldout_pairs if p.split == "heldout"] or list(heldout_pairs)
    names, sizes, diff = mean_grad_diff(model, tokenizer, held, progress, desc="v_hack held-out")
    missing = [n for n in names if n not in vhack]
    if missing:
        raise VHackError(f"v_hack lacks module {missing[0]!r} ({len(missing)} missing): wrong model or targets")
    cos = []
    for name, d in zip(names, torch.split(diff, sizes)):
        v = vhack[name].float()
        denom = d.norm() * v.norm()
        cos.append(float(d @ v / denom) if denom > 0 else 0.0)
    t = torch.tensor(cos)
    report = ValidationReport(
        names=names, cos=cos, median=float(t.median()), frac_positive=float((t > 0).float().mean()),
        mean=float(t.mean()), n_pairs=len(held), modes=sorted({p.mode for p in held}),
    )
    if gate:
        report.check()
    return report


def plot_validation(report: ValidationReport, png_path: str | Path) -> Path:
    """Histogram of per-module held-out cos (healthy: unimodal, positive, median > 0.3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(report.cos, bins=40, range=(-1, 1),
            color="#3b75af", edgecolor="white")
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(report.median, color="#d62728", ls="--", lw=1.2, label=f"median {report.median:+.2f}")
    ax.set_xlabel("cos(held-out grad diff, v_hack) per module")
    ax.set_ylabel("modules")
    ax.set_title(f"v_hack validation: {report.frac_positive:.0%} > 0, mean {report.mean:+.2f} "
                 f"({'pass' if report.passed else 'FAIL'})", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


# ---------------------------------------------------------------- config-level helpers

def pairs_for_config(cfg, problems: Sequence | None = None) -> list[Pair]:
    """The pair set a run uses: the committed LeetCode file for problems=leetcode, else generated."""
    if cfg.problems == "leetcode":
        return leetcode_pairs()
    if not problems:
        raise PairError(f"problems={cfg.problems!r}: give the problem list to generate pairs from")
    return make_pairs(list(problems), prompt_variant=cfg.reward.prompt_variant)
