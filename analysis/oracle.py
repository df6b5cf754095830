"""v_oracle: the direction of a run's own emergent hack, built post hoc from its rollouts (exploratory;
nothing here feeds a preregistered arm or verdict).

At one checkpoint of a run (`RunWorld.load_step`), `oracle_at` samples rollouts on *train* problems
with that policy (the run's HF engine and grader, in process) and builds v_oracle per module by two
recipes, each taken at delta_S = 0 (where v_hack is extracted):
  pooled: unit(mean grad NLL(strict hack) - mean grad NLL(honest pass)), each completion on its own prompt;
  paired: learner.vhack.pair_grads on learner.pairs.flagged_pairs(..., flag="exploited"), i.e. v_hack's
      own extraction on pairs from the policy's own hacks (an honest pass on the same prompt, else the
      problem's canonical solution).
`build_oracle` saves a run's v_oracle (its final checkpoint) in the v_hack safetensors format that
learner.artifacts reads through `vhack_path`: the exploratory, labelled-a-cheat `oracle` arm.
analysis/diagnose.py compares these directions with v_hack and the RL gradient.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from shared.config import HACK_MODES, RunConfig

MIN_PAIRS = 8  # strict-hack pairs needed to build v_oracle at a checkpoint
DIAG_STEP = 1_000_000  # pseudo-step ids for diagnostic batches: problem draws no training step used
ORACLE_KIND = "v_oracle"
RECIPES = ("pooled", "paired")


class DiagnoseError(ValueError):
    """A run that cannot be diagnosed (no config, no checkpoint, too few hacks for v_oracle); says why."""


# ---------------------------------------------------------------- direction geometry (tested on constructed vectors)

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


def nanmean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def median(xs: Sequence[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None and math.isfinite(x))
    if not xs:
        return None
    k = len(xs) // 2
    return xs[k] if len(xs) % 2 else 0.5 * (xs[k - 1] + xs[k])


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
    return median(list(direction_cosines(a, b).values()))



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
    from learner.vhack import completion_grad, encode_pair_side  # the extraction v_hack uses, per completion
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
            rows.append(completion_grad(world.model, params, ids, mask).cpu())
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
        coh = median(list(direction_cosines(a, b).values()))
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
