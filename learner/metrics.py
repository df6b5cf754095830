"""Run outputs: JSONL rows (flushed per row, truncatable on resume) and hack-rate summaries (trackers: learner/tracking.py).

The row keys are fixed by docs/ARCHITECTURE.md (metrics.jsonl, evals.jsonl); `METRIC_KEYS` and
`EVAL_KEYS` list them so tests and the analysis read the same names.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from shared.hacks import MODES

REF_LOOSE = ("Reward Hack", "Correct; Attempted Reward Hack", "Attempted Reward Hack")  # reward_server.reference

METRIC_KEYS: tuple[str, ...] = (
    "step", "policy_version", "loss", "reward_mean", "reward_std", "skipped_frac", "pass_rate",
    "hack_strict", *(f"hack_strict_{m}" for m in MODES), "hack_loose", *(f"hack_loose_{m}" for m in MODES),
    "kl", "cos_mean", "cos_std", "frac_fired", "grad_norm", "lr", "t_generate", "t_grade", "t_train", "t_sync",
    "timeout_rate", "ref_reward_hack", "ref_attempted",
)
# written when they apply: the deployed policy's KL on its eval samples (train.measure_kl, eval_kl_samples > 0),
# route's training policy's (issue #23)
OPTIONAL_EVAL_KEYS: tuple[str, ...] = ("kl_deployed", "train_policy_kl")
EVAL_KEYS: tuple[str, ...] = (
    "step", "pass_rate", "hack_strict", *(f"hack_strict_{m}" for m in MODES), "hack_loose",
    *(f"hack_loose_{m}" for m in MODES), "kl", "cos_mean", "frac_fired", "grad_norm",
    "timeout_rate", "ref_reward_hack", "ref_attempted",
)
# written when they apply: the deployed policy's KL on its eval samples (train.measure_kl, eval_kl_samples > 0),
# route's training policy's (issue #23)
OPTIONAL_EVAL_KEYS: tuple[str, ...] = ("kl_deployed", "train_policy_kl")


def _clean(v: Any) -> Any:
    """JSON-safe scalars: tensors/numpy -> python, NaN/inf -> None."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line from a killed run
            continue
    return rows


def truncate_jsonl(path: str | Path, keep) -> int:
    """Rewrite `path` keeping rows where keep(row) is True (atomic). Returns rows dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    rows = read_jsonl(path)
    kept = [r for r in rows if keep(r)]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return len(rows) - len(kept)


class JsonlWriter:
    """Append one JSON object per line and flush it, so a crash loses at most the row being written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def hack_rates(grades: Iterable[Any]) -> dict[str, float]:
    """From Grade records: pass_rate (gt only), hack_strict/loose overall (any mode) and per mode A-D."""
    grades = list(grades)
    out: dict[str, float] = {"pass_rate": _mean([float(g.gt_pass) for g in grades])}
    out["hack_strict"] = _mean([float(any(g.exploited.get(m, False) for m in MODES)) for g in grades])
    for m in MODES:
        out[f"hack_strict_{m}"] = _mean([float(g.exploited.get(m, False)) for g in grades])
    out["hack_loose"] = _mean([float(any(g.attempted.get(m, False) for m in MODES)) for g in grades])
    for m in MODES:
        out[f"hack_loose_{m}"] = _mean([float(g.attempted.get(m, False)) for g in grades])
    # beside ours: hidden tests stopped by their (calibrated) CPU budget, and rl-rewardhacking's labels
    out["timeout_rate"] = _mean([float(bool(getattr(g, "timed_out", False))) for g in grades])
    out["ref_reward_hack"] = _mean([float(getattr(g, "ref_label", None) == "Reward Hack") for g in grades])
    out["ref_attempted"] = _mean([float(getattr(g, "ref_label", None) in REF_LOOSE) for g in grades])
    return out


def eval_noise(row: dict) -> dict[str, float]:
    """Binomial standard errors of an eval row's rates: sqrt(p (1 - p) / n) over its n completions
    (samples of one problem are not independent, so with eval_samples > 1 this is a lower bound)."""
    n = max(1, int(row.get("n") or 0))
    return {f"{k}_se": math.sqrt(row[k] * (1 - row[k]) / n) for k in ("pass_rate", "hack_strict")
            if isinstance(row.get(k), (int, float))}


TOY_KINDS = ("easy", "partial", "hard")


def kind_rates(kinds: Sequence[str], grades: Sequence[Any]) -> dict[str, float]:
    """pass_<kind> and hack_strict_<kind> (+ n_<kind>) for each toy problem kind present."""
    out: dict[str, float] = {}
    for kind in TOY_KINDS:
        sel = [g for k, g in zip(kinds, grades) if k == kind]
        if sel:
            rates = hack_rates(sel)
            out[f"pass_{kind}"] = rates["pass_rate"]
            out[f"hack_strict_{kind}"] = rates["hack_strict"]
            out[f"n_{kind}"] = len(sel)
    return out


def window_mean(rows: Sequence[dict], key: str, last: int = 25) -> float:
    """Mean of `key` over the last `last` rows that have a number there (0.0 when none)."""
    vals = [r[key] for r in rows[-last:] if isinstance(r.get(key), (int, float))]
    return _mean(vals)


@dataclass
class StepSums:
    """What one optimizer step adds up over its micro-batches (token-weighted where it says so)."""

    n_seqs: int = 0
    loss: float = 0.0
    tokens: float = 0.0
    kl_num: float = 0.0
    kl_den: float = 0.0
    clip_num: float = 0.0
    ratio_num: float = 0.0
    stale_tokens: float = 0.0

    def add(self, n: int, loss: float, tokens: float, st: dict, with_kl: bool, stale_tokens: float = 0.0) -> None:
        self.n_seqs += n
        self.loss += loss
        self.tokens += tokens
        if with_kl:
            self.kl_num += float(st["kl"]) * tokens
            self.kl_den += tokens
        self.clip_num += float(st["clip_frac"]) * tokens
        self.ratio_num += float(st["ratio_mean"]) * tokens
        self.stale_tokens += stale_tokens


def mean_module_norm(params: Sequence[Any]) -> float:
    """Mean over modules of ||grad|| (modules with a zero gradient left out)."""
    norms = [float(p.grad.float().norm()) for p in params if p.grad is not None]
    norms = [n for n in norms if n >= 1e-12]
    return sum(norms) / len(norms) if norms else 0.0


def train_row(step: int, policy_version: int, groups: Sequence[Any], batch: Any, acc: StepSums, proj: dict,
              grad_total: float, lr: float, t_train: float, t_sync: float,
              timings: dict[str, float] | None = None) -> dict[str, Any]:
    """The metrics.jsonl row of one step (fixed keys first, then extras useful when reading a run).

    `batch` is the step's learner.batch.RolloutBatch, advantages computed."""
    import numpy as np

    rewards = batch.rewards.numpy()
    keep = batch.keep if batch.keep is not None else np.zeros(batch.n_groups, dtype=bool)
    tm = {"t_generate": sum(g.group.gen_seconds for g in groups), "t_grade": sum(g.grade_seconds for g in groups),
          "t_sync": t_sync, **(timings or {})}
    row: dict[str, Any] = {
        "step": step, "policy_version": policy_version,
        "loss": acc.loss / acc.n_seqs if acc.n_seqs else 0.0,
        "reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
        "skipped_frac": int((~keep).sum()) / batch.n_groups,
        **hack_rates(batch.grades),
        "kl": acc.kl_num / acc.kl_den if acc.kl_den else None,
        "cos_mean": proj["cos_mean"], "cos_std": proj["cos_std"], "frac_fired": proj["frac_fired"],
        "grad_norm": proj["grad_norm_mean"], "lr": lr,
        "t_generate": tm["t_generate"], "t_grade": tm["t_grade"], "t_train": t_train, "t_sync": tm["t_sync"],
        "grad_norm_total": grad_total, "n_groups": batch.n_groups, "n_train_seqs": acc.n_seqs,
        # PPO ratio pi_theta / pi_old over trained tokens: exactly 1 on-policy, the clip acts on stale tokens
        "clip_frac": acc.clip_num / acc.tokens if acc.tokens else 0.0,
        "ratio_mean": acc.ratio_num / acc.tokens if acc.tokens else 1.0,
        "stale_frac": acc.stale_tokens / acc.tokens if acc.tokens else 0.0,
        "staleness": float(np.mean([policy_version - 1 - g.group.policy_version for g in groups])),
    }
    if batch.penalty is not None:
        row["penalty_mean"] = float(np.mean(batch.penalty.numpy()))
        row["reward_shaped_mean"] = float(np.mean(batch.shaped_rewards.numpy()))
    return row
