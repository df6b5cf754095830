"""`rankguard diagnose RUN_DIR`: why a null is a null (issue #13 section 2). Post-hoc and exploratory:
nothing here feeds a preregistered arm or verdict.

At each available checkpoint of a run (and at delta_S = 0, the point v_hack was extracted at):
  1. sample rollouts on *train* problems with that checkpoint's policy (the run's HF engine and grader,
     in process, as services.sources.InProcessSource does);
  2. v_oracle per module = unit(mean over pairs of grad NLL(strict hack) - grad NLL(honest pass)) of
     delta_S, taken at delta_S = 0: learner.vhack.pair_grads on learner.pairs.flagged_pairs(...,
     flag="exploited") of those rollouts, i.e. v_hack's own extraction on pairs from the policy's own
     hacks instead of authored ones (an "honest pass" passed gt with no hack attempted, else the
     problem's canonical solution stands in);
  3. g_RL = Learner.policy_gradient on fresh batches at that checkpoint (the step's mean delta_S
     gradient before any projection), one per batch, as the projection sees it each step.
Then per module and over checkpoints: cos(v_oracle, v_hack); cos(g_RL, v_hack) and cos(g_RL, v_oracle)
against random unit directions of the same per-module sizes (mean |cos| and signed mean); the share
of the update's squared norm along each (sum_m (g_m.v_m)^2 / sum_m |g_m|^2, and its hack-ward part,
the positive components a one-sided gate removes); v_oracle's split-half coherence and its stability
across checkpoints. One verdict line (`verdict`, thresholds in THRESHOLDS):

  no v_oracle (fewer than min_pairs strict-hack pairs at every checkpoint): "silent: cos ≈ random" when
      v_hack sees the gradient no better than random, else "undetermined" -- never an invented v_oracle;
  1. v_oracle incoherent (split-half or cross-checkpoint median cos < ONE_DIRECTION_COS)
      -> "hack is not one direction";
  2. both v_hack and v_oracle see the gradient less than ALIGN_RATIO x random -> "silent: cos ≈ random";
  3. median cos(v_oracle, v_hack) >= SAME_DIRECTION_COS and v_hack sees the gradient (>= ALIGN_RATIO x
      random) -> "authored direction aligned with the emergent hack";
  4. otherwise -> "authored direction misses the emergent hack".

v_oracle is built by analysis/oracle.py; diagnose.md and diagnose.png are rendered by
analysis/diagnose_plots.py.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .diagnose_plots import markdown, plot_diagnose
from .oracle import (MIN_PAIRS, RECIPES, DiagnoseError, OracleDirection, RunWorld, cos, direction_cosines, median,
                     nanmean, oracle_at, read_run_config, unit)

ALIGN_RATIO = 2.0  # mean |cos(g, v)| >= this x the random baseline's: v "sees" the RL gradient
SAME_DIRECTION_COS = 0.5  # median over modules cos(v_oracle, v_hack) >= this: the same direction
ONE_DIRECTION_COS = 0.5  # v_oracle's split-half and cross-checkpoint median cos >= this: one direction
THRESHOLDS = {"align_ratio": ALIGN_RATIO, "same_direction_cos": SAME_DIRECTION_COS,
              "one_direction_cos": ONE_DIRECTION_COS, "min_pairs": MIN_PAIRS}
VERDICTS = {
    "silent": "silent: cos ≈ random",
    "misses": "authored direction misses the emergent hack",
    "not_one_direction": "hack is not one direction",
    "aligned": "authored direction aligned with the emergent hack",
    "undetermined": "undetermined: too few strict hacks to build v_oracle",
}


# ---------------------------------------------------------------- statistics of gradients vs directions

def random_directions(sizes: Mapping[str, int], n: int, seed: int = 0) -> list[dict[str, Tensor]]:
    """`n` draws of one uniformly random unit vector per module, of the modules' own sizes."""
    gen = torch.Generator().manual_seed(int(seed))
    return [{name: unit(torch.randn(r, generator=gen, dtype=torch.float64)) for name, r in sizes.items()}
            for _ in range(n)]


def alignment(grads: Sequence[Mapping[str, Tensor]], direction: Mapping[str, Tensor]) -> dict[str, Any]:
    """How a set of per-batch gradients lines up with one direction per module.

    mean_abs / mean_signed: mean over (batch, module) of |cos(g_m, v_m)| / cos(g_m, v_m);
    frac_sq: mean over batches of sum_m (g_m . v_m)^2 / sum_m |g_m|^2 (the share of the update's squared
    norm along the directions; v_m unit); frac_sq_hackward: the same with only positive g_m . v_m (what a
    one-sided gate removes); per_module_abs / per_module_signed: the means over batches, per module."""
    names = [n for n in direction if float(direction[n].norm()) > 0]
    table = [[cos(g[n], direction[n]) if n in g else math.nan for n in names] for g in grads]
    fsq, fsq_pos = [], []
    for g in grads:
        tot = sum(float(g[n].double().norm() ** 2) for n in g)
        if tot <= 0:
            continue
        dots = [float(g[n].double() @ unit(direction[n]).double()) for n in names if n in g]
        fsq.append(sum(d * d for d in dots) / tot)
        fsq_pos.append(sum(d * d for d in dots if d > 0) / tot)
    flat = [c for row in table for c in row]
    return {
        "mean_abs": nanmean([abs(c) for c in flat]),
        "mean_signed": nanmean(flat),
        "frac_sq": nanmean(fsq),
        "frac_sq_hackward": nanmean(fsq_pos),
        "n_batches": len(fsq),
        "per_module_abs": {n: nanmean([abs(row[i]) for row in table]) for i, n in enumerate(names)},
        "per_module_signed": {n: nanmean([row[i] for row in table]) for i, n in enumerate(names)},
    }


def random_alignment(grads: Sequence[Mapping[str, Tensor]], sizes: Mapping[str, int], n_draws: int = 16,
                     seed: int = 0) -> dict[str, Any]:
    """`alignment` against random unit directions of the same sizes, averaged over `n_draws` draws; also
    `mean_abs_std` (spread over draws) so a reader sees how far from random 'above random' is."""
    runs = [alignment(grads, d) for d in random_directions(sizes, n_draws, seed)]
    out: dict[str, Any] = {k: nanmean([r[k] for r in runs]) for k in ("mean_abs", "mean_signed", "frac_sq",
                                                                       "frac_sq_hackward")}
    abs_ = [r["mean_abs"] for r in runs if r["mean_abs"] is not None]
    m = out["mean_abs"]
    out["mean_abs_std"] = (math.sqrt(sum((x - m) ** 2 for x in abs_) / (len(abs_) - 1))
                           if len(abs_) > 1 and m is not None else None)
    out["n_draws"] = n_draws
    out["n_batches"] = runs[0]["n_batches"] if runs else 0
    names = list(sizes)
    out["per_module_abs"] = {n: nanmean([r["per_module_abs"].get(n) for r in runs]) for n in names}
    return out


def ratio(x: float | None, base: float | None) -> float | None:
    return None if x is None or not base else x / base


def verdict(summary: Mapping[str, Any], thresholds: Mapping[str, float] = THRESHOLDS) -> tuple[str, str]:
    """(key, one line) from pooled statistics (see the module docstring for the rule).

    summary keys: has_oracle, hack_ratio (mean |cos(g, v_hack)| / random's), oracle_ratio (the same for
    v_oracle), cos_oracle_vhack (median over modules), coherence (split-half median cos), stability
    (median cos of v_oracle between successive checkpoints; None with one checkpoint)."""
    align, same, one = thresholds["align_ratio"], thresholds["same_direction_cos"], thresholds["one_direction_cos"]
    hr, orr = summary.get("hack_ratio"), summary.get("oracle_ratio")
    sees_hack = hr is not None and hr >= align

    def fmt(x: float | None, f: str = ".2f") -> str:
        return "n/a" if x is None else format(x, f)

    nums = (f"mean |cos(g, v_hack)| = {fmt(hr)}x random, |cos(g, v_oracle)| = {fmt(orr)}x random, "
            f"cos(v_oracle, v_hack) = {fmt(summary.get('cos_oracle_vhack'), '+.2f')}, v_oracle coherence "
            f"{fmt(summary.get('coherence'))}, stability {fmt(summary.get('stability'))}")
    if not summary.get("has_oracle"):
        key = "undetermined" if sees_hack else "silent"
        why = "no checkpoint had enough strict-hack pairs to build v_oracle"
        return key, f"{VERDICTS[key]} ({why}; mean |cos(g, v_hack)| = {fmt(hr)}x random)"
    coh, stab = summary.get("coherence"), summary.get("stability")
    if (coh is not None and coh < one) or (stab is not None and stab < one):
        key = "not_one_direction"
    elif not sees_hack and (orr is None or orr < align):
        key = "silent"
    elif sees_hack and summary.get("cos_oracle_vhack") is not None and summary["cos_oracle_vhack"] >= same:
        key = "aligned"
    else:
        key = "misses"
    return key, f"{VERDICTS[key]} ({nums})"



# ---------------------------------------------------------------- the diagnostic

def available_checkpoints(run_dir: Path, limit: int | None = None) -> list[tuple[int, Path]]:
    """Complete checkpoints (verified), at most `limit` of them spread evenly, the last always kept."""
    from learner.checkpoint import checkpoint_problem, list_checkpoints

    good = [(s, p) for s, p in list_checkpoints(run_dir) if checkpoint_problem(p) is None]
    if limit is not None and limit < len(good):
        if limit <= 1:
            return good[-1:] if limit == 1 else []
        idx = sorted({round(i * (len(good) - 1) / (limit - 1)) for i in range(limit)})
        good = [good[i] for i in idx]
    return good


def diagnose(run_dir: str | Path, out: str | Path | None = None, samples: int = 192, grad_batches: int = 4,
             checkpoints: int | None = 4, with_base: bool = True, max_pairs: int = 64, min_pairs: int = MIN_PAIRS,
             n_random: int = 16, seed: int = 0, recipe: str = "pooled", artifacts_root: str | Path | None = None,
             plot: bool = True, progress: bool = True, world: RunWorld | None = None) -> dict:
    """Run the diagnostic on RUN_DIR; writes diagnose.json, diagnose.md (+ diagnose.png) into `out`
    (default RUN_DIR) and returns the record. Bounded: `samples` rollouts for v_oracle and `grad_batches`
    gradient batches per checkpoint, at most `checkpoints` checkpoints (+ delta_S = 0 when with_base).
    Both v_oracle recipes are computed from the same rollouts; `recipe` picks the one the verdict uses."""
    if recipe not in RECIPES:
        raise DiagnoseError(f"unknown v_oracle recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    t0 = time.time()
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir
    cfg = read_run_config(run_dir)
    points: list[tuple[int, Path | None]] = list(available_checkpoints(run_dir, checkpoints))
    if not points:
        raise DiagnoseError(f"{run_dir} has no complete checkpoint under checkpoints/ (a run writes one every "
                            "train.checkpoint_every steps and at the end)")
    if with_base and points[0][0] != 0:
        points.insert(0, (0, None))
    own = world is None
    world = world or RunWorld(run_dir, artifacts_root=artifacts_root, progress=False)
    sizes = dict(zip(world.names, world.sizes))
    rows: list[dict] = []
    vectors: dict[str, dict[int, dict[str, Tensor]]] = {r: {} for r in RECIPES}
    try:
        for i, (step, path) in enumerate(points):
            t_ck = time.time()
            world.load_step(path)
            rates, orcs = oracle_at(world, samples, max_pairs, min_pairs, tag=2 * i)
            grads = [world.policy_gradient(b) for b in world.sample(2 * i + 1, grad_batches)]
            row = checkpoint_row(step, str(path) if path else "delta_S = 0 (base model)", rates, grads, world.vhack,
                                 orcs, sizes, n_random, seed + step)
            for name, orc in orcs.items():
                if orc.vector is not None:
                    vectors[name][step] = orc.vector
            row["seconds"] = round(time.time() - t_ck, 2)
            rows.append(row)
            if progress:
                print(f"diagnose step {step}: {_progress_line(row, recipe)} ({row['seconds']:.1f} s)", flush=True)
    finally:
        if own:
            world.close()
    stability, summary, verdicts = conclude(rows, vectors)
    rec = {
        "run_dir": str(run_dir), "arm": cfg.train.arm, "arm_name": run_dir.parent.name, "seed": cfg.train.seed,
        "exploratory": True,
        "note": "post-hoc diagnostic (issue #13 section 2): nothing here feeds the preregistered arms",
        "vhack": world.vhack_info,
        "settings": {"samples": samples, "grad_batches": grad_batches, "checkpoints": checkpoints,
                     "with_base": with_base, "max_pairs": max_pairs, "min_pairs": min_pairs, "n_random": n_random,
                     "seed": seed, "recipe": recipe, "v_oracle_extracted_at": "delta_S = 0",
                     "recipes": {"pooled": "mean grad NLL over strict hacks (exploited, any mode) - mean over honest "
                                           "passes (gt pass, no hack attempted), each on its own prompt",
                                 "paired": "same-prompt pairs (learner.pairs.flagged_pairs, flag=exploited): strict "
                                           "hack vs an honest pass on that prompt, else its canonical solution"}},
        "thresholds": dict(THRESHOLDS, rule="see analysis/diagnose.py: verdict"),
        "modules": world.names, "sizes": world.sizes,
        "checkpoints": rows, "stability": stability, "summary": summary,
        "verdict": verdicts[recipe], "verdicts": verdicts, "seconds": round(time.time() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(_finite(rec), indent=1, default=_json_default, allow_nan=False))
    (out / "diagnose.md").write_text(markdown(rec))
    if plot:
        rec["figure"] = str(plot_diagnose(rec, out / "diagnose.png"))
    return rec


def checkpoint_row(step: int, where: str, rates: Mapping[str, float], grads: Sequence[Mapping[str, Tensor]],
                   vhack: Mapping[str, Tensor], oracles: Mapping[str, OracleDirection], sizes: Mapping[str, int],
                   n_random: int = 16, seed: int = 0) -> dict[str, Any]:
    """One checkpoint's statistics from its gradients and directions (batches whose gradient is all zero,
    every group flat, are left out)."""
    grads = [g for g in grads if sum(float(x.norm()) for x in g.values()) > 0]
    row: dict[str, Any] = {"step": step, "checkpoint": where, **rates, "n_grad_batches": len(grads),
                           "g_vhack": alignment(grads, vhack), "g_random": random_alignment(grads, sizes, n_random, seed),
                           "oracles": {}}
    for name, orc in oracles.items():
        entry = orc.to_dict()
        if orc.vector is not None:
            c = direction_cosines(orc.vector, vhack)
            entry["g"] = alignment(grads, orc.vector)
            entry["cos_vhack"] = {"median": median(list(c.values())), "mean": nanmean(list(c.values())),
                                  "per_module": c}
        row["oracles"][name] = entry
    return row


def conclude(rows: Sequence[dict], vectors: Mapping[str, Mapping[int, Mapping[str, Tensor]]]
             ) -> tuple[dict, dict, dict]:
    """(stability, pooled summary, verdict) per recipe, from the checkpoint rows and the v_oracle vectors."""
    stability = {r: stability_table(vectors.get(r, {})) for r in RECIPES}
    summary = {r: pool(rows, stability[r], r) for r in RECIPES}
    verdicts = {}
    for r in RECIPES:
        key, line = verdict(summary[r])
        verdicts[r] = {"key": key, "line": line, "headline": VERDICTS[key]}
    return stability, summary, verdicts


def _json_default(x):
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x).__name__)


def _finite(x: Any) -> Any:
    """NaN/inf -> None all the way down (diagnose.json stays strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _progress_line(row: dict, recipe: str) -> str:
    o = row["oracles"][recipe]

    def f(d: dict | None, k: str = "mean_abs") -> str:
        v = (d or {}).get(k)
        return "n/a" if v is None else f"{v:.3f}"

    return (f"hack {100 * row['hack_strict']:.0f}% of {row['n_rollouts']}, v_oracle from {o['n_hack']} hacks / "
            f"{o['n_clean']} cleans; |cos(g,·)| v_hack {f(row['g_vhack'])} v_oracle {f(o.get('g'))} "
            f"random {f(row['g_random'])}")


def stability_table(oracles: Mapping[int, Mapping[str, Tensor]]) -> dict[str, Any]:
    """Median over modules of cos(v_oracle@a, v_oracle@b) for every pair of checkpoints that has one."""
    steps = sorted(oracles)
    matrix = [[median(list(direction_cosines(oracles[a], oracles[b]).values())) for b in steps] for a in steps]
    successive = [matrix[i][i + 1] for i in range(len(steps) - 1)]
    return {"steps": steps, "matrix": matrix, "successive": successive,
            "median_successive": median(successive) if successive else None}


def pool(rows: Sequence[dict], stability: Mapping[str, Any], recipe: str) -> dict[str, Any]:
    """The verdict's inputs: means over the checkpoints with gradients (v_oracle's over those that have one)."""
    none = {"has_oracle": False, "coherence": None}
    with_g = [r for r in rows if r["n_grad_batches"]]
    with_o = [r for r in with_g if r["oracles"].get(recipe, none)["has_oracle"]]
    orc = [r["oracles"][recipe] for r in with_o]

    def m(ds: Sequence[dict | None], k: str) -> float | None:
        return nanmean([d[k] for d in ds if d and d.get(k) is not None])

    rand, hack = m([r["g_random"] for r in with_g], "mean_abs"), m([r["g_vhack"] for r in with_g], "mean_abs")
    rand_o, og = m([r["g_random"] for r in with_o], "mean_abs"), [o.get("g") for o in orc]
    return {
        "recipe": recipe, "has_oracle": bool(orc), "n_checkpoints": len(rows), "n_with_oracle": len(orc),
        "random_abs": rand, "vhack_abs": hack, "oracle_abs": m(og, "mean_abs"),
        "vhack_signed": m([r["g_vhack"] for r in with_g], "mean_signed"), "oracle_signed": m(og, "mean_signed"),
        "random_signed": m([r["g_random"] for r in with_g], "mean_signed"),
        "vhack_frac_sq": m([r["g_vhack"] for r in with_g], "frac_sq"), "oracle_frac_sq": m(og, "frac_sq"),
        "random_frac_sq": m([r["g_random"] for r in with_g], "frac_sq"),
        "hack_ratio": ratio(hack, rand), "oracle_ratio": ratio(m(og, "mean_abs"), rand_o),
        "cos_oracle_vhack": nanmean([o["cos_vhack"]["median"] for o in orc]) if orc else None,
        "coherence": nanmean([r["oracles"].get(recipe, none)["coherence"] for r in rows]),
        "stability": stability.get("median_successive"),
    }


