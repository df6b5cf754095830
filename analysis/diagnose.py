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

`build_oracle` saves a run's v_oracle (its final checkpoint) in the v_hack safetensors format that
learner.artifacts reads through `vhack_path`: the exploratory, labelled-a-cheat `oracle` arm.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from shared.config import HACK_MODES, RunConfig

ALIGN_RATIO = 2.0  # mean |cos(g, v)| >= this x the random baseline's: v "sees" the RL gradient
SAME_DIRECTION_COS = 0.5  # median over modules cos(v_oracle, v_hack) >= this: the same direction
ONE_DIRECTION_COS = 0.5  # v_oracle's split-half and cross-checkpoint median cos >= this: one direction
MIN_PAIRS = 8  # strict-hack pairs needed to build v_oracle at a checkpoint
THRESHOLDS = {"align_ratio": ALIGN_RATIO, "same_direction_cos": SAME_DIRECTION_COS,
              "one_direction_cos": ONE_DIRECTION_COS, "min_pairs": MIN_PAIRS}
VERDICTS = {
    "silent": "silent: cos ≈ random",
    "misses": "authored direction misses the emergent hack",
    "not_one_direction": "hack is not one direction",
    "aligned": "authored direction aligned with the emergent hack",
    "undetermined": "undetermined: too few strict hacks to build v_oracle",
}
DIAG_STEP = 1_000_000  # pseudo-step ids for diagnostic batches: problem draws no training step used
ORACLE_KIND = "v_oracle"


class DiagnoseError(ValueError):
    """A run that cannot be diagnosed (no config, no checkpoint, too few hacks for v_oracle); says why."""


# ---------------------------------------------------------------- pure statistics (tested on constructed vectors)

def cos(a: Tensor, b: Tensor) -> float:
    """cos of two vectors; NaN when either is zero (no direction to compare)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    den = a.norm() * b.norm()
    return float(a @ b / den) if den > 0 else math.nan


def unit(v: Tensor) -> Tensor:
    v = v.float()
    n = v.norm()
    return v / n if n > 0 else v.clone()


def units(flat: Tensor, names: Sequence[str], sizes: Sequence[int]) -> dict[str, Tensor]:
    """Flat module-major [N] -> per-module unit vectors (zeros stay zeros)."""
    return {n: unit(x) for n, x in zip(names, torch.split(flat.float(), list(sizes)))}


def random_directions(sizes: Mapping[str, int], n: int, seed: int = 0) -> list[dict[str, Tensor]]:
    """`n` draws of one uniformly random unit vector per module, of the modules' own sizes."""
    gen = torch.Generator().manual_seed(int(seed))
    return [{name: unit(torch.randn(r, generator=gen, dtype=torch.float64)) for name, r in sizes.items()}
            for _ in range(n)]


def _nanmean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _median(xs: Sequence[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None and math.isfinite(x))
    if not xs:
        return None
    k = len(xs) // 2
    return xs[k] if len(xs) % 2 else 0.5 * (xs[k - 1] + xs[k])


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
        "mean_abs": _nanmean([abs(c) for c in flat]),
        "mean_signed": _nanmean(flat),
        "frac_sq": _nanmean(fsq),
        "frac_sq_hackward": _nanmean(fsq_pos),
        "n_batches": len(fsq),
        "per_module_abs": {n: _nanmean([abs(row[i]) for row in table]) for i, n in enumerate(names)},
        "per_module_signed": {n: _nanmean([row[i] for row in table]) for i, n in enumerate(names)},
    }


def random_alignment(grads: Sequence[Mapping[str, Tensor]], sizes: Mapping[str, int], n_draws: int = 16,
                     seed: int = 0) -> dict[str, Any]:
    """`alignment` against random unit directions of the same sizes, averaged over `n_draws` draws; also
    `mean_abs_std` (spread over draws) so a reader sees how far from random 'above random' is."""
    runs = [alignment(grads, d) for d in random_directions(sizes, n_draws, seed)]
    out: dict[str, Any] = {k: _nanmean([r[k] for r in runs]) for k in ("mean_abs", "mean_signed", "frac_sq",
                                                                       "frac_sq_hackward")}
    abs_ = [r["mean_abs"] for r in runs if r["mean_abs"] is not None]
    m = out["mean_abs"]
    out["mean_abs_std"] = (math.sqrt(sum((x - m) ** 2 for x in abs_) / (len(abs_) - 1))
                           if len(abs_) > 1 and m is not None else None)
    out["n_draws"] = n_draws
    out["n_batches"] = runs[0]["n_batches"] if runs else 0
    names = list(sizes)
    out["per_module_abs"] = {n: _nanmean([r["per_module_abs"].get(n) for r in runs]) for n in names}
    return out


def direction_cosines(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, float]:
    """Per module cos(a_m, b_m) over the modules both have a nonzero direction for."""
    out = {}
    for n in a:
        if n in b:
            c = cos(a[n], b[n])
            if math.isfinite(c):
                out[n] = c
    return out


def split_half_coherence(rows: Tensor, names: Sequence[str], sizes: Sequence[int]) -> float | None:
    """Median over modules of cos(mean of the even pairs' differences, mean of the odd pairs'): does the
    hack - clean difference point one way across pairs? None with fewer than 4 pairs."""
    if rows is None or rows.shape[0] < 4:
        return None
    a = units(rows[0::2].mean(0), names, sizes)
    b = units(rows[1::2].mean(0), names, sizes)
    return _median(list(direction_cosines(a, b).values()))


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


# ---------------------------------------------------------------- the run's world, in process

def read_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise DiagnoseError(f"{run_dir} holds no config.json: not a run folder")
    return RunConfig.load(path)


@contextmanager
def delta_s_zero(model) -> Iterator[None]:
    """delta_S = 0 (the base model, where v_hack is extracted) inside the block; restored after."""
    from shared.adapter import adapter_modules

    params = [m.delta_S for m in adapter_modules(model).values()]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.zero_()
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def is_oracle_file(path: str | Path | None) -> bool:
    """A directions file written by build_oracle (its header says kind=v_oracle)."""
    if not path or not Path(path).exists():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("kind") == ORACLE_KIND


class RunWorld:
    """The run's model, problems, engine and grader, and a scratch Learner on a temporary folder (a
    Learner on the run's own folder would resume it and remove its DONE marker)."""

    def __init__(self, run_dir: str | Path, artifacts_root: str | Path | None = None, grader_workers: int = 1,
                 progress: bool = False, cfg: RunConfig | None = None, policy=None, problems=None, grader=None):
        """policy / problems / grader: injected (tests); by default the run's own, from its config."""
        from learner.trainer import Learner

        self.run_dir = Path(run_dir)
        self.cfg = cfg or read_run_config(self.run_dir)
        torch.set_num_threads(self.cfg.train.torch_threads)
        self.scratch = Path(tempfile.mkdtemp(prefix="rankguard-diagnose-"))
        scratch_cfg = self.cfg.model_copy(update={"run_dir": str(self.scratch)})
        self.artifacts_root = artifacts_root
        # built at delta_S = 0: the arm's directions are extracted (or read) before any checkpoint loads
        self.learner = Learner(scratch_cfg, resume=False, policy=policy, problems=problems,
                               artifacts_root=artifacts_root, tensorboard=False, progress=progress)
        self.model, self.tokenizer = self.learner.model, self.learner.tokenizer
        self.names, self.sizes = list(self.learner.names), list(self.learner.sizes)
        self.vhack, self.vhack_info = self._reference_vhack()
        from reward_server.grader import Grader
        from rollout.hf_engine import HFEngine

        self.engine = HFEngine(self.model, self.tokenizer, device=self.learner.device)
        self.own_grader = grader is None
        self.grader = grader if grader is not None else Grader(self.cfg.reward, workers=grader_workers)
        self._zero = {n: m.detach().clone() for n, m in self._deltas().items()}

    def _deltas(self) -> dict[str, Tensor]:
        from shared.adapter import adapter_modules

        out = {}
        for name, m in adapter_modules(self.model).items():
            out[f"S.{name}"] = m.delta_S
            out[f"Q.{name}"] = m.delta_Q
        return out

    def _reference_vhack(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The authored direction to compare with: the one the run projects against; for an arm that does
        not project (or the oracle arm) the preregistered `projected` arm's v_hack of the same pair set."""
        from learner.artifacts import vhack_artifact
        from learner.directions import vhack_modes_for
        from learner.vhack import pairs_for_config

        ref = self.cfg.model_copy(deep=True)
        source = "the direction this run projects against"
        if vhack_modes_for(ref) is None or is_oracle_file(ref.vhack_path):
            ref.train.arm = "projected"
            ref.vhack_path = None
            source = "the preregistered projected arm's v_hack (this run does not project against an authored one)"
        modes = vhack_modes_for(ref)
        pairs = pairs_for_config(ref, self.learner.train_problems)
        with delta_s_zero(self.model):
            art = vhack_artifact(self.model, self.tokenizer, ref, pairs, modes, root=self.artifacts_root)
        vh = {n: unit(t[0] if t.dim() == 2 else t) for n, t in art.vhack.items()}
        missing = [n for n in self.names if n not in vh]
        if missing:
            raise DiagnoseError(f"v_hack {art.path} lacks module {missing[0]!r}: another model?")
        return vh, {"path": str(art.path), "modes": modes, "pair_set": ref.vhack.pair_set, "source": source}

    def load_step(self, path: Path | None) -> None:
        """delta_S (and delta_Q) of checkpoint `path`; None = the base model (all zero)."""
        from learner.checkpoint import load_checkpoint

        with torch.no_grad():
            for name, p in self._deltas().items():
                p.copy_(self._zero[name])
        if path is not None:
            load_checkpoint(path, self.model, restore_rng=False)

    def sample(self, tag: int, n_batches: int) -> list[list]:
        """n_batches fresh train batches (the run's P prompts x G samples each), graded; one engine call."""
        from reward_server.grader import grade_groups

        jobs = [self.learner.make_jobs(DIAG_STEP + tag * 1000 + b) for b in range(n_batches)]
        flat = [j for js in jobs for j in js]
        graded, _ = grade_groups(self.grader, self.learner.problems, self.engine.generate(flat))
        out, i = [], 0
        for js in jobs:
            out.append(graded[i:i + len(js)])
            i += len(js)
        return out

    def policy_gradient(self, groups) -> dict[str, Tensor]:
        return dict(zip(self.names, (g.detach().float().cpu() for g in self.learner.policy_gradient(groups))))

    def close(self) -> None:
        try:
            self.learner.close()
            if self.own_grader and hasattr(self.grader, "close"):
                self.grader.close()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)


def honest_only(graded_group):
    """The group without completions that passed gt *and* attempted a hack (correct code + a hack tail):
    flagged_pairs would take those as honest passes; they are neither side of strict hack vs honest pass."""
    keep = [not (g.gt_pass and any(g.attempted.values())) for g in graded_group.grades]
    if all(keep):
        return graded_group
    by_id = {c.rollout_id: c for c in graded_group.group.completions}
    grades = [g for g, k in zip(graded_group.grades, keep) if k]
    comps = [by_id[g.rollout_id] for g in grades if g.rollout_id in by_id]
    if len(comps) != len(grades):  # grades without rollout ids: keep order alignment
        comps = [c for c, k in zip(graded_group.group.completions, keep) if k]
    group = graded_group.group.model_copy(update={"completions": comps})
    return graded_group.model_copy(update={"group": group, "grades": grades})


def rollout_rates(groups: Sequence) -> dict[str, float]:
    grades = [g for gg in groups for g in gg.grades]
    n = max(1, len(grades))
    return {"n_rollouts": len(grades), "hack_strict": sum(any(g.exploited.values()) for g in grades) / n,
            "pass_rate": sum(bool(g.gt_pass) for g in grades) / n}


RECIPES = ("pooled", "paired")


@dataclass
class OracleDirection:
    """v_oracle by one recipe at one checkpoint, or why there is none."""

    recipe: str
    vector: dict[str, Tensor] | None
    coherence: float | None
    n_hack: int
    n_clean: int
    n_sampled_clean: int  # clean sides that are honest passes the policy sampled (not the canonical stand-in)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "has_oracle": self.vector is not None, "coherence": self.coherence,
                "n_hack": self.n_hack, "n_clean": self.n_clean, "n_sampled_clean": self.n_sampled_clean,
                "reason": self.reason}


def _round_robin(per_group: Sequence[Sequence[Any]], limit: int) -> list[Any]:
    """Take the k-th item of every group in turn (one prompt cannot fill the set), up to `limit`."""
    out: list[Any] = []
    for k in range(max((len(g) for g in per_group), default=0)):
        out += [g[k] for g in per_group if k < len(g)]
    return out[:limit]


def _strict_hack(g) -> bool:
    return any(g.exploited.values())


def _honest_pass(g) -> bool:
    return bool(g.gt_pass) and not any(g.attempted.values())


def pooled_oracle(world: "RunWorld", groups: Sequence, max_items: int, min_pairs: int) -> OracleDirection:
    """The audit's recipe: mean grad NLL over strict hacks - mean over honest passes, each on its own
    prompt (hard prompts rarely have an honest pass of their own), at the model's current delta_S."""
    from learner.pairs import Pair
    from learner.vhack import _completion_grad, encode_pair_side  # the extraction v_hack uses, per completion
    from shared.adapter import adapter_modules
    from shared.prompts import build_messages

    hacks, cleans = [], []
    for gg in groups:
        prob = world.learner.problems[gg.group.problem_id]
        msgs = build_messages(prob, world.cfg.reward.prompt_variant)
        side_h, side_c = [], []
        for c, g in zip(gg.group.completions, gg.grades):
            if _strict_hack(g):
                side_h.append((prob, msgs, c.text))
            elif _honest_pass(g):
                side_c.append((prob, msgs, c.text))
        hacks.append(side_h)
        cleans.append(side_c)
    hacks, cleans = _round_robin(hacks, max_items), _round_robin(cleans, max_items)
    if len(hacks) < min_pairs or len(cleans) < min_pairs:
        return OracleDirection("pooled", None, None, len(hacks), len(cleans), len(cleans),
                               f"only {len(hacks)} strict hacks and {len(cleans)} honest passes (need {min_pairs} of "
                               "each): no pooled v_oracle at this checkpoint")
    mods = adapter_modules(world.model)
    params = [m.delta_S for m in mods.values()]
    names, sizes = list(mods), [p.numel() for p in params]

    def grads(items) -> Tensor:
        rows = []
        for prob, msgs, text in items:
            pair = Pair(problem_id=prob.key, mode="A", messages=msgs, hack=text, clean=text, split="train",
                        end_of_turn=True)
            ids, mask = encode_pair_side(world.tokenizer, pair, text, world.learner.device)
            rows.append(_completion_grad(world.model, params, ids, mask).cpu())
        return torch.stack(rows)

    was = world.model.training
    world.model.eval()
    try:
        with delta_s_zero(world.model):
            gh, gc = grads(hacks), grads(cleans)
    finally:
        world.model.train(was)
    coh = None
    if len(hacks) >= 4 and len(cleans) >= 4:
        a = units(gh[0::2].mean(0) - gc[0::2].mean(0), names, sizes)
        b = units(gh[1::2].mean(0) - gc[1::2].mean(0), names, sizes)
        coh = _median(list(direction_cosines(a, b).values()))
    return OracleDirection("pooled", units(gh.mean(0) - gc.mean(0), names, sizes), coh, len(hacks), len(cleans),
                           len(cleans))


def paired_oracle(world: "RunWorld", groups: Sequence, max_pairs: int, min_pairs: int) -> OracleDirection:
    """Same-prompt pairs (learner.pairs.flagged_pairs, flag=exploited, all modes): strict hack vs an honest
    pass on the same prompt, else the canonical solution; v_hack's pair extraction (pair_grads)."""
    from learner.pairs import flagged_pairs
    from learner.vhack import pair_grads

    groups = [honest_only(g) for g in groups]
    pairs = flagged_pairs(groups, world.learner.problems, modes=HACK_MODES,
                          prompt_variant=world.cfg.reward.prompt_variant, max_pairs=max_pairs, flag="exploited")
    honest: dict[str, set[str]] = {}
    for gg in groups:
        honest.setdefault(gg.group.problem_id, set()).update(
            c.text for c, g in zip(gg.group.completions, gg.grades) if _honest_pass(g))
    sampled = sum(p.clean in honest.get(p.problem_id, ()) for p in pairs)
    if len(pairs) < min_pairs:
        return OracleDirection("paired", None, None, len(pairs), len(pairs), sampled,
                               f"only {len(pairs)} strict-hack pairs (need {min_pairs}): no paired v_oracle at this "
                               "checkpoint")
    with delta_s_zero(world.model):
        pg = pair_grads(world.model, world.tokenizer, pairs, progress=False, desc="v_oracle pairs", keep_rows=True)
    return OracleDirection("paired", units(pg.mean_diff, pg.names, pg.sizes),
                           split_half_coherence(pg.rows, pg.names, pg.sizes), len(pairs), len(pairs), sampled)


def oracle_at(world: "RunWorld", samples: int, max_pairs: int, min_pairs: int, tag: int,
              recipes: Sequence[str] = RECIPES) -> tuple[dict[str, float], dict[str, OracleDirection]]:
    """Sample ~`samples` rollouts with the loaded policy; v_oracle by each recipe, gradients at delta_S = 0."""
    per_batch = world.cfg.train.prompts_per_step * world.cfg.sampling.group_size
    groups = [g for b in world.sample(tag, max(1, math.ceil(samples / per_batch))) for g in b]
    makers = {"pooled": pooled_oracle, "paired": paired_oracle}
    return rollout_rates(groups), {r: makers[r](world, groups, max_pairs, min_pairs) for r in recipes}


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


# ---------------------------------------------------------------- the diagnostic

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
            entry["cos_vhack"] = {"median": _median(list(c.values())), "mean": _nanmean(list(c.values())),
                                  "per_module": c}
        row["oracles"][name] = entry
    return row


def conclude(rows: Sequence[dict], vectors: Mapping[str, Mapping[int, Mapping[str, Tensor]]]
             ) -> tuple[dict, dict, dict]:
    """(stability, pooled summary, verdict) per recipe, from the checkpoint rows and the v_oracle vectors."""
    stability = {r: stability_table(vectors.get(r, {})) for r in RECIPES}
    summary = {r: pool(rows, stability[r], r) for r in RECIPES}
    verdicts = {r: dict(zip(("key", "line"), verdict(summary[r]))) for r in RECIPES}
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
    matrix = [[_median(list(direction_cosines(oracles[a], oracles[b]).values())) for b in steps] for a in steps]
    successive = [matrix[i][i + 1] for i in range(len(steps) - 1)]
    return {"steps": steps, "matrix": matrix, "successive": successive,
            "median_successive": _median(successive) if successive else None}


def pool(rows: Sequence[dict], stability: Mapping[str, Any], recipe: str) -> dict[str, Any]:
    """The verdict's inputs: means over the checkpoints with gradients (v_oracle's over those that have one)."""
    none = {"has_oracle": False, "coherence": None}
    with_g = [r for r in rows if r["n_grad_batches"]]
    with_o = [r for r in with_g if r["oracles"].get(recipe, none)["has_oracle"]]
    orc = [r["oracles"][recipe] for r in with_o]

    def m(ds: Sequence[dict | None], k: str) -> float | None:
        return _nanmean([d[k] for d in ds if d and d.get(k) is not None])

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
        "cos_oracle_vhack": _nanmean([o["cos_vhack"]["median"] for o in orc]) if orc else None,
        "coherence": _nanmean([r["oracles"].get(recipe, none)["coherence"] for r in rows]),
        "stability": stability.get("median_successive"),
    }


# ---------------------------------------------------------------- outputs

def _f(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def module_kind(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'q_proj' (the markdown groups modules by kind)."""
    return name.rsplit(".", 1)[-1]


def _checkpoint_table(rec: dict, recipe: str) -> list[str]:
    md = ["| step | rollouts | strict hack % | v_oracle from hacks / cleans (sampled) | coherence | "
          "cos(v_oracle, v_hack) | \\|cos(g, v_hack)\\| | \\|cos(g, v_oracle)\\| | \\|cos(g, random)\\| | "
          "signed cos(g, ·) v_hack / v_oracle / random | ‖g‖² share v_hack / v_oracle / random |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["checkpoints"]:
        o = r["oracles"][recipe]
        gh, go, gr = r["g_vhack"], o.get("g") or {}, r["g_random"]
        co = (o.get("cos_vhack") or {}).get("median")
        md.append(f"| {r['step']} | {r['n_rollouts']} | {100 * r['hack_strict']:.1f} | {o['n_hack']} / {o['n_clean']} "
                  f"({o['n_sampled_clean']}) | {_f(o.get('coherence'), '.2f')} | {_f(co, '+.3f')} | "
                  f"{_f(gh.get('mean_abs'))} | {_f(go.get('mean_abs'))} | {_f(gr.get('mean_abs'))} ± "
                  f"{_f(gr.get('mean_abs_std'))} | {_f(gh.get('mean_signed'), '+.3f')} / "
                  f"{_f(go.get('mean_signed'), '+.3f')} / {_f(gr.get('mean_signed'), '+.3f')} | "
                  f"{_f(gh.get('frac_sq'))} / {_f(go.get('frac_sq'))} / {_f(gr.get('frac_sq'))} |")
    reasons = [f"step {r['step']}: {r['oracles'][recipe]['reason']}" for r in rec["checkpoints"]
               if r["oracles"][recipe]["reason"]]
    return md + ([""] + ["; ".join(reasons) + "."] if reasons else [])


def _stability_md(st: dict) -> list[str]:
    if len(st["steps"]) < 2:
        return []
    md = ["| | " + " | ".join(str(x) for x in st["steps"]) + " |", "|---" * (len(st["steps"]) + 1) + "|"]
    md += [f"| {a} | " + " | ".join(_f(x, '.2f') for x in row) + " |" for a, row in zip(st["steps"], st["matrix"])]
    return md


def recipe_line(rec: dict) -> str:
    """Which v_oracle recipe the verdict used, and both recipes' cos(v_oracle, v_hack) side by side (issue #23:
    they can disagree, e.g. +0.05 pooled vs +0.46 paired on one seed)."""
    main = rec["settings"]["recipe"]
    cos = {r: rec["summary"][r].get("cos_oracle_vhack") for r in RECIPES}
    keys = {r: rec["verdicts"][r]["key"] for r in RECIPES}
    both = ", ".join(f"{r} {_f(cos[r], '+.3f')}" for r in RECIPES)
    agree = ("the two recipes reach the same verdict" if len(set(keys.values())) == 1
             else "**the two recipes disagree**: read both before concluding")
    return (f"Oracle recipe used for the verdict: **{main}** (`--recipe`; both are computed from the same rollouts). "
            f"cos(v_oracle, v_hack) pooled over checkpoints: {both}; {agree}.")


def markdown(rec: dict) -> str:
    main = rec["settings"]["recipe"]
    other = [r for r in RECIPES if r != main]
    s = rec["summary"][main]
    md = [f"# rankguard diagnose: `{rec['run_dir']}`", "",
          "**Exploratory, post-hoc** (issue #13 section 2): nothing here feeds the preregistered arms.", "",
          f"**Verdict ({main} v_oracle): {rec['verdict']['line']}**", ""]
    md += [f"With the {r} v_oracle: {rec['verdicts'][r]['line']}." for r in other] + [""]
    md += [recipe_line(rec), ""]
    md += [f"Rule (analysis/diagnose.py `verdict`): a direction sees the RL gradient when its mean |cos| is >= "
           f"{ALIGN_RATIO:g}x a random unit direction's of the same per-module size; v_hack and v_oracle are the same "
           f"direction when their median per-module cos >= {SAME_DIRECTION_COS:g}; v_oracle is one direction when its "
           f"split-half and cross-checkpoint median cos >= {ONE_DIRECTION_COS:g}; v_oracle needs >= "
           f"{rec['settings']['min_pairs']} strict hacks (and honest passes).", "",
           f"v_hack: {rec['vhack']['source']} (`{rec['vhack']['path']}`, modes {','.join(rec['vhack']['modes'])}, "
           f"pair set {rec['vhack']['pair_set']}). v_oracle ({main}): {rec['settings']['recipes'][main]}; gradients "
           f"at delta_S = 0, from {rec['settings']['samples']} rollouts per checkpoint. g_RL: Learner.policy_gradient "
           f"(before projection) on {rec['settings']['grad_batches']} fresh batches per checkpoint; random baseline: "
           f"{rec['settings']['n_random']} draws (± = their spread).", ""]
    md += _checkpoint_table(rec, main) + [""]
    md += ["Cosines are per module, averaged over modules and batches; ‖g‖² share = Σ_m (g_m·v_m)² / Σ_m ‖g_m‖² per "
           "batch (hack-ward part, what a one-sided gate removes, in diagnose.json).", "",
           f"Pooled over checkpoints: mean |cos(g, v_hack)| {_f(s['vhack_abs'])} ({_f(s['hack_ratio'], '.2f')}x random "
           f"{_f(s['random_abs'])}), mean |cos(g, v_oracle)| {_f(s['oracle_abs'])} ({_f(s['oracle_ratio'], '.2f')}x "
           f"random), cos(v_oracle, v_hack) {_f(s['cos_oracle_vhack'], '+.3f')}.", ""]
    if _stability_md(rec["stability"][main]):
        md += ["v_oracle stability (median over modules of cos between checkpoints):", ""]
        md += _stability_md(rec["stability"][main]) + [""]
    last = next((r for r in reversed(rec["checkpoints"]) if r["oracles"][main].get("g")), None)
    if last is not None:
        o = last["oracles"][main]
        md += [f"Per module kind at step {last['step']} (mean over the kind's modules):", "",
               "| module kind | modules | cos(v_oracle, v_hack) | \\|cos(g, v_hack)\\| | \\|cos(g, v_oracle)\\| | "
               "\\|cos(g, random)\\| |", "|---|---|---|---|---|---|"]
        kinds: dict[str, list[str]] = {}
        for n in rec["modules"]:
            kinds.setdefault(module_kind(n), []).append(n)
        for k, ns in kinds.items():
            def avg(d: Mapping[str, float]) -> float | None:
                return _nanmean([d.get(n) for n in ns])
            md.append(f"| {k} | {len(ns)} | {_f(avg(o['cos_vhack']['per_module']), '+.3f')} | "
                      f"{_f(avg(last['g_vhack']['per_module_abs']))} | {_f(avg(o['g']['per_module_abs']))} | "
                      f"{_f(avg(last['g_random']['per_module_abs']))} |")
        md.append("")
    for r in other:
        md += [f"### The {r} v_oracle ({rec['settings']['recipes'][r]})", ""] + _checkpoint_table(rec, r) + [""]
        if _stability_md(rec["stability"][r]):
            md += _stability_md(rec["stability"][r]) + [""]
    md += [f"Per-module values for every checkpoint: `diagnose.json`. {rec['seconds']:.0f} s.", ""]
    return "\n".join(md)


def plot_diagnose(rec: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = rec["settings"]["recipe"]
    rows = rec["checkpoints"]
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)

    def series(get, stat: str) -> list[float]:
        vals = [(get(r) or {}).get(stat) for r in rows]
        return [math.nan if v is None else v for v in vals]

    getters = (("v_hack", "#1f77b4", lambda r: r["g_vhack"]),
               (f"v_oracle ({main})", "#d62728", lambda r: r["oracles"][main].get("g")),
               ("random", "#7f7f7f", lambda r: r["g_random"]))
    ax = axes[0]
    for lab, c, get in getters:
        ax.plot(steps, series(get, "mean_abs"), "o-", color=c, label=f"|cos(g, {lab})|")
        ax.plot(steps, series(get, "mean_signed"), "x--", color=c, alpha=0.7, label=f"signed cos(g, {lab})")
    ax.axhline(0, color="k", lw=0.6)
    ax.set(xlabel="checkpoint step", ylabel="cos (mean over modules, batches)", title="RL gradient vs directions")
    ax.legend(fontsize=7)
    ax = axes[1]
    for lab, c, get in getters:
        ax.plot(steps, series(get, "frac_sq"), "o-", color=c, label=lab)
    ax.set(xlabel="checkpoint step", ylabel="share of ‖g‖² along the direction", title="update's squared norm")
    ax.legend(fontsize=7)
    ax = axes[2]
    for r, c in zip(RECIPES, ("#9467bd", "#8c564b")):
        ax.plot(steps, series(lambda x: x["oracles"][r].get("cos_vhack"), "median"), "o-", color=c,
                label=f"cos(v_oracle {r}, v_hack), median")
        st = rec["stability"][r]
        if st["successive"]:
            ax.plot(st["steps"][1:], st["successive"], "d:", color=c, label=f"v_oracle {r} vs previous ckpt")
    ax.plot(steps, [math.nan if r["oracles"][main]["coherence"] is None else r["oracles"][main]["coherence"]
                    for r in rows], "s--", color="#2ca02c", label=f"v_oracle {main} split-half coherence")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylim(-1.05, 1.05)
    ax.set(xlabel="checkpoint step", title="is the emergent hack one direction?")
    ax.legend(fontsize=7)
    fig.suptitle(f"diagnose {rec['run_dir']} ({main} v_oracle): {VERDICTS[rec['verdict']['key']]}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the oracle ceiling arm's direction

def build_oracle(run_dir: str | Path, out_path: str | Path, samples: int = 256, max_pairs: int = 128,
                 min_pairs: int = MIN_PAIRS, recipe: str = "pooled", artifacts_root: str | Path | None = None,
                 world: RunWorld | None = None) -> Path:
    """v_oracle of a run's final checkpoint, saved as a v_hack file (one unit [r] tensor per module,
    header kind=v_oracle) for `vhack_path`: the exploratory `oracle` ceiling arm, a cheat by design."""
    from learner.checkpoint import latest_checkpoint
    from learner.vhack import save_vhack

    run_dir = Path(run_dir)
    last = latest_checkpoint(run_dir)
    if last is None:
        raise DiagnoseError(f"{run_dir} has no complete checkpoint to build v_oracle from")
    own = world is None
    world = world or RunWorld(run_dir, artifacts_root=artifacts_root)
    try:
        step = int(json.loads((last / "state.json").read_text())["step"])
        world.load_step(last)
        rates, orcs = oracle_at(world, samples, max_pairs, min_pairs, tag=999, recipes=(recipe,))
        orc = orcs[recipe]
        if orc.vector is None:
            raise DiagnoseError(f"{run_dir}: {orc.reason}; the oracle arm needs a vanilla run that hacks")
        meta = {"model_id": world.cfg.model.name_or_path, "dtype": world.cfg.model.dtype,
                "modes": ",".join(HACK_MODES), "n_pairs": str(orc.n_hack), "kind": ORACLE_KIND, "recipe": recipe,
                "cheat": "built post hoc from a training run's own strict hacks: an exploratory ceiling, never a defence",
                "source_run": str(run_dir), "source_step": str(step), "source_seed": str(world.cfg.train.seed),
                "n_hack": str(orc.n_hack), "n_clean": str(orc.n_clean), "coherence": repr(orc.coherence),
                "source_hack_strict": repr(rates["hack_strict"]), "samples": str(rates["n_rollouts"]),
                "extracted_at": "delta_S = 0"}
        return save_vhack(out_path, orc.vector, meta)
    finally:
        if own:
            world.close()
