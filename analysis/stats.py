"""Exploratory statistics (not preregistered): paired arm − vanilla differences, time-resolved hack
metrics, and how many seeds a difference needs.

Why paired: a seed fixes, for every arm alike, the training problem draws, the sampling seeds and the
held-out evaluation draws (learner.trainer: `derived_seed("problems" | "sample" | "eval", seed, ...)`),
so an arm and vanilla run with the same seed share that noise and their per-seed difference cancels
it. Only seeds both arms have are paired; the others are counted, never imputed.

Definitions (all in percentage points of the strict hack / pass rate, any mode):
- Δ at an evaluation: per seed, arm − vanilla at that evaluation step (the "last" one is each run's
  last evaluation, as in the headline table). ΔSafePass = (pass − hack)_arm − (pass − hack)_vanilla.
- 95 % CI: t interval mean ± t(0.975, n−1)·SD/√n (scipy.stats.t), and a percentile bootstrap of the
  mean over seeds (N_BOOT resamples, numpy RNG seeded with BOOT_SEED: the same numbers every time).
- Hack AUC: trapezoid area under a run's held-out strict hack % over its evaluation steps (step 0
  included when logged), divided by the step span: the run's mean hack % over training. A pair is
  compared over the evaluation steps both runs have.
- Crossing step: the first step (counted as steps completed: metrics.jsonl's 0-based row index + 1,
  the same scale as evaluation steps) at which the TRAINING strict hack rate, smoothed by a centred
  moving mean over SMOOTH_WINDOW steps (truncated at the ends), reaches a threshold: 50 %, and 80 %
  of vanilla's plateau (= vanilla's mean training strict hack over each run's last PLATEAU_STEPS
  logged steps, averaged over vanilla's seeds). A run that never reaches it is censored at its last
  step ("> last step"). Paired crossings: Δ over the pairs where both crossed; a censored pair counts
  only as a direction (arm later / earlier) when the censoring decides it, and a sign test runs over
  all pairs with a known direction.
- Direction-specific effect (issue #23): arm − its matched random-direction control (`route` − `route+random`,
  shared.arms.authored_twin), per seed, with the same intervals and seeds needed.
- Learning retained (issue #23): per seed (pass_arm − pass_step0) / (pass_control − pass_step0) at the last
  evaluation, where `control` is the no-loophole arm of the same seed and step 0 the seed's initial policy
  (every arm of a seed evaluates the same step-0 policy on the same draws). Seeds whose control gained less
  than MIN_HEADROOM_PP are left out (the ratio is undefined there) and listed; the ratio of the mean gains
  is given beside the per-seed mean.
- Seeds needed: the smallest n at which a two-sided paired t-test at α = 0.05 has 80 % power
  (noncentral t), assuming the true mean difference is the observed one, the true SD of the
  per-seed differences is the observed one (itself uncertain with few seeds), differences normal
  and seeds independent. Also given for a 5 pp difference with the same SD.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy import stats as sps

from analysis.rundata import RunRecord, arm_order, pct

LEVEL = 0.95
ALPHA = 0.05
POWER = 0.8
N_BOOT = 10_000
BOOT_SEED = 0
SMOOTH_WINDOW = 11
PLATEAU_STEPS = 50
CROSS_FIXED_PCT = 50.0
CROSS_PLATEAU_FRAC = 0.8
RESOLVE_PP = 5.0
REFERENCE = "vanilla"
CONTROL = "control"  # the honest frontier: every loophole closed (shared.arms.CONTROL)
MIN_HEADROOM_PP = 1.0  # learning retained is undefined for a seed whose control gained less than this

# metric key -> (label, value of one evaluation row in percent)
EVAL_METRICS: dict[str, tuple[str, Callable[[dict], float | None]]] = {
    "hack": ("Hack %", lambda row: pct(row, "hack_strict")),
    "pass": ("Pass %", lambda row: pct(row, "pass_rate")),
    "safepass": ("ΔSafePass", lambda row: _safepass(row)),
}


def _safepass(row: dict) -> float | None:
    h, p = pct(row, "hack_strict"), pct(row, "pass_rate")
    return None if h is None or p is None else p - h


# ------------------------------------------------------------------ intervals and power
def t_ci(d: Sequence[float], level: float = LEVEL) -> tuple[float | None, float | None]:
    """mean ± t(1 − (1 − level)/2, n − 1)·SD/√n; (None, None) for fewer than 2 values."""
    n = len(d)
    if n < 2:
        return None, None
    m, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    half = float(sps.t.ppf(1 - (1 - level) / 2, n - 1)) * sd / math.sqrt(n)
    return m - half, m + half


def bootstrap_ci(d: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                 seed: int = BOOT_SEED) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI of the mean (resampling seeds with replacement, fixed RNG seed)."""
    x = np.asarray(d, dtype=float)
    if len(x) < 2:
        return None, None
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def paired_t_power(n: int, delta: float, sd: float, alpha: float = ALPHA) -> float:
    """Power of a two-sided one-sample (paired) t-test with n pairs for a true mean delta, SD sd."""
    df, nc = n - 1, abs(delta) / sd * math.sqrt(n)
    crit = float(sps.t.ppf(1 - alpha / 2, df))
    return float(sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc))


def seeds_needed(delta: float | None, sd: float | None, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """Smallest n (>= 2) with paired_t_power >= power; inf when delta = 0, None when undefined (no SD)."""
    if delta is None or sd is None or not math.isfinite(sd):
        return None
    if delta == 0:
        return math.inf
    if sd == 0:
        return 2
    z = (sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) * sd / abs(delta)
    n = max(2, math.ceil(z * z) - 1)  # the t-test needs a little more than the normal approximation
    while paired_t_power(n, delta, sd, alpha) < power:
        n += 1
    return n


# ------------------------------------------------------------------ paired differences
@dataclass
class Paired:
    """arm − vanilla over the seeds both have, for one metric at one evaluation (or over training)."""

    arm: str
    metric: str
    at: str  # "last", an evaluation step, or "training" (AUC, crossings)
    diffs: dict[int, float]  # seed -> arm − vanilla
    only_arm: list[int] = field(default_factory=list)  # seeds vanilla lacks
    only_ref: list[int] = field(default_factory=list)  # seeds the arm lacks
    ref: str = REFERENCE  # what the arm is paired with (vanilla, or its random control)

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def values(self) -> list[float]:
        return [self.diffs[s] for s in sorted(self.diffs)]

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.diffs else None

    @property
    def sd(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if self.n >= 2 else None

    @cached_property
    def t_ci(self) -> tuple[float | None, float | None]:
        return t_ci(self.values)

    @cached_property
    def boot_ci(self) -> tuple[float | None, float | None]:
        return bootstrap_ci(self.values)

    @property
    def n_needed(self) -> float | None:
        return seeds_needed(self.mean, self.sd)

    @property
    def n_needed_resolve(self) -> float | None:
        return seeds_needed(RESOLVE_PP, self.sd)

    def to_dict(self) -> dict:
        """The numbers of one row of paired.csv."""
        (tl, th), (bl, bh) = self.t_ci, self.boot_ci
        return {"arm": self.arm, "metric": self.metric, "at": self.at, "n_pairs": self.n, "mean": self.mean,
                "sd": self.sd, "t_lo": tl, "t_hi": th, "boot_lo": bl, "boot_hi": bh, "n_needed": self.n_needed,
                f"n_needed_{RESOLVE_PP:g}pp": self.n_needed_resolve,
                "seeds": sorted(self.diffs), "seeds_only_arm": self.only_arm, "seeds_only_vanilla": self.only_ref,
                "ref": self.ref}


def pair(arm: str, metric: str, at: str, values: dict[int, float | None], ref: dict[int, float | None]) -> Paired:
    """Pair per-seed values with vanilla's; a None on either side leaves that seed unpaired."""
    have = {s for s, v in values.items() if v is not None}
    have_ref = {s for s, v in ref.items() if v is not None}
    return Paired(arm, metric, at, {s: float(values[s]) - float(ref[s]) for s in sorted(have & have_ref)},
                  sorted(have - have_ref), sorted(have_ref - have))


# ------------------------------------------------------------------ time-resolved metrics
def hack_auc(run: RunRecord, steps: Iterable[int] | None = None) -> float | None:
    """Mean strict hack % over training: trapezoid area under the eval curve / step span (None: < 2 evals)."""
    pts = []
    for s in sorted(set(run.eval_steps if steps is None else steps)):
        row = run.eval_at(s)
        v = None if row is None else pct(row, "hack_strict")
        if v is not None:
            pts.append((s, v))
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return None
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])


def train_hack_curve(run: RunRecord) -> tuple[list[int], list[float]]:
    """(steps completed, training strict hack %) per logged step, one row per step (the last written)."""
    by_step = {}
    for r in run.metrics:
        v = pct(r, "hack_strict") if "step" in r else None
        if v is not None:
            by_step[int(r["step"]) + 1] = v
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def centred_mean(values: Sequence[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """Moving mean over `window` points centred on each (odd window; truncated at the ends)."""
    x = np.asarray(values, dtype=float)
    half, idx = window // 2, np.arange(len(x))
    csum = np.concatenate([[0.0], np.cumsum(x)])
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(x))
    return ((csum[hi] - csum[lo]) / (hi - lo)).tolist()


@dataclass
class Crossing:
    step: int | None  # steps completed when the smoothed training hack first reached the threshold
    last_step: int  # steps completed in the run's log (the censoring point when step is None)
    threshold: float

    @property
    def censored(self) -> bool:
        return self.step is None

    def text(self) -> str:
        return f"> {self.last_step}" if self.step is None else str(self.step)


def crossing(run: RunRecord, threshold: float, window: int = SMOOTH_WINDOW) -> Crossing | None:
    """When the smoothed training strict hack % first reaches `threshold` (None: no training rows)."""
    steps, values = train_hack_curve(run)
    if not steps:
        return None
    for s, v in zip(steps, centred_mean(values, window)):
        if v >= threshold - 1e-9:
            return Crossing(s, steps[-1], threshold)
    return Crossing(None, steps[-1], threshold)


def plateau(runs: Sequence[RunRecord], last: int = PLATEAU_STEPS) -> float | None:
    """Mean over runs of each run's mean training strict hack % over its last `last` logged steps."""
    per_run = [float(np.mean(v[-last:])) for v in (train_hack_curve(r)[1] for r in runs) if v]
    return float(np.mean(per_run)) if per_run else None


@dataclass
class PairedCrossing:
    """Crossing-step differences (arm − vanilla, in steps) with censoring kept visible."""

    arm: str
    name: str  # "cross50" or "cross_plateau"
    threshold: float
    exact: Paired  # pairs where both runs crossed
    later: list[int] = field(default_factory=list)  # censored pairs where the arm is known to cross later
    earlier: list[int] = field(default_factory=list)  # ... known to cross earlier
    undetermined: list[int] = field(default_factory=list)  # both censored, or censored before the other crossed

    @property
    def n_later(self) -> int:
        return len(self.later) + sum(d > 0 for d in self.exact.values)

    @property
    def n_earlier(self) -> int:
        return len(self.earlier) + sum(d < 0 for d in self.exact.values)

    @property
    def sign_p(self) -> float | None:
        """Two-sided exact sign test over the pairs with a known, nonzero direction."""
        k, n = self.n_later, self.n_later + self.n_earlier
        return None if n == 0 else float(sps.binomtest(k, n, 0.5).pvalue)


def pair_crossings(arm: str, name: str, threshold: float, arm_x: dict[int, Crossing | None],
                   ref_x: dict[int, Crossing | None]) -> PairedCrossing:
    exact, later, earlier, undetermined = {}, [], [], []
    have = {s for s, c in arm_x.items() if c is not None}
    have_ref = {s for s, c in ref_x.items() if c is not None}
    for s in sorted(have & have_ref):
        a, v = arm_x[s], ref_x[s]
        if not a.censored and not v.censored:
            exact[s] = float(a.step - v.step)
        elif a.censored and not v.censored and a.last_step >= v.step:
            later.append(s)
        elif v.censored and not a.censored and v.last_step >= a.step:
            earlier.append(s)
        else:
            undetermined.append(s)
    return PairedCrossing(arm, name, threshold,
                          Paired(arm, name, "training", exact, sorted(have - have_ref), sorted(have_ref - have)),
                          later, earlier, undetermined)


# ------------------------------------------------------------------ the whole analysis
@dataclass
class SeedRow:
    """One run's numbers for the per-seed table."""

    arm: str
    seed: int
    run: RunRecord
    last_step: int | None
    n_eval: int | None  # samples in the last evaluation (32 problems × 4 on the toy)
    hack: float | None
    pass_: float | None
    dsafepass: float | None  # vs vanilla of the same seed
    auc: float | None
    cross50: Crossing | None
    cross_plateau: Crossing | None

    @property
    def safepass(self) -> float | None:
        return None if self.hack is None or self.pass_ is None else self.pass_ - self.hack

    def count(self, value: float | None) -> int | None:
        """Samples behind a last-eval percentage (rate × n), when the eval row says n."""
        return None if value is None or self.n_eval is None else round(value * self.n_eval / 100)


@dataclass
class Analysis:
    seeds: list[SeedRow]
    last: list[Paired]  # per arm × metric at the last evaluation, then hack AUC
    per_step: list[Paired]  # per arm × metric × evaluation step
    crossings: list[PairedCrossing]
    plateau: float | None
    thresholds: dict[str, float]
    duplicates: list[RunRecord]  # further runs of an (arm, seed) already seen: left out of the pairing
    step0: dict[int, bool]  # seed -> every arm's step-0 evaluation identical (pairing check)
    direction: list[Paired] = field(default_factory=list)  # arm − its random control, last eval (issue #23)
    retained: dict[str, "Retained"] = field(default_factory=dict)  # arm -> learning retained (needs `control`)
    step0_rates: dict[int, dict[str, float | None]] = field(default_factory=dict)  # seed -> {"hack", "pass"} at step 0


def by_arm_seed(runs: Sequence[RunRecord]) -> tuple[dict[str, dict[int, RunRecord]], list[RunRecord]]:
    """arm -> seed -> run (the first one in find_runs order), and the duplicates left out."""
    out: dict[str, dict[int, RunRecord]] = {}
    dup = []
    for r in runs:
        if r.seed in out.setdefault(r.arm, {}):
            dup.append(r)
        else:
            out[r.arm][r.seed] = r
    return out, dup


def _step0_check(grid: dict[str, dict[int, RunRecord]]) -> dict[int, bool]:
    """Seeds where >= 2 arms logged a step-0 evaluation -> whether those rows agree on every rate.

    Every arm starts from the same policy and evaluates the same draws, so step 0 must agree; a
    mismatch means the arms of a seed do not share their evaluation noise (pairing is weaker)."""
    rows: dict[int, list[dict]] = {}
    for seeds in grid.values():
        for s, r in seeds.items():
            if (row := r.eval_at(0)) is not None:
                rows.setdefault(s, []).append(row)
    keys = lambda row: {k: v for k, v in row.items() if k.startswith(("hack_", "pass_rate"))}  # noqa: E731
    return {s: all(keys(x) == keys(rs[0]) for x in rs) for s, rs in sorted(rows.items()) if len(rs) >= 2}


def analyze(runs: Sequence[RunRecord]) -> Analysis:
    """Paired and time-resolved numbers over the runs that have at least one evaluation."""
    grid, dup = by_arm_seed([r for r in runs if r.evals])
    ref = grid.get(REFERENCE, {})
    plat = plateau(list(ref.values()))
    thresholds = {"cross50": CROSS_FIXED_PCT}
    if plat is not None:
        thresholds["cross_plateau"] = CROSS_PLATEAU_FRAC * plat
    cross = {arm: {s: {name: crossing(r, th) for name, th in thresholds.items()} for s, r in seeds.items()}
             for arm, seeds in grid.items()}
    seeds_rows = []
    for arm in sorted(grid, key=arm_order):
        for s, r in sorted(grid[arm].items()):
            e = r.last_eval
            v = ref.get(s)
            dsp = None if v is None else _diff(_safepass(e), _safepass(v.last_eval))
            seeds_rows.append(SeedRow(arm, s, r, r.last_eval_step, e.get("n"), pct(e, "hack_strict"),
                                      pct(e, "pass_rate"), dsp, hack_auc(r), cross[arm][s].get("cross50"),
                                      cross[arm][s].get("cross_plateau")))
    last, per_step, crossings = [], [], []
    for arm in sorted(grid, key=arm_order):
        if arm == REFERENCE or not ref:
            continue
        seeds = grid[arm]
        for m, (_, fn) in EVAL_METRICS.items():
            last.append(pair(arm, m, "last", {s: fn(r.last_eval) for s, r in seeds.items()},
                             {s: fn(r.last_eval) for s, r in ref.items()}))
        last.append(_paired_auc(arm, seeds, ref))
        steps = sorted(set().union(*(r.eval_steps for r in seeds.values()))
                       & set().union(*(r.eval_steps for r in ref.values())))
        for m, (_, fn) in EVAL_METRICS.items():
            for st in steps:
                p = pair(arm, m, str(st), {s: _at(r, st, fn) for s, r in seeds.items()},
                         {s: _at(r, st, fn) for s, r in ref.items()})
                if p.n:
                    per_step.append(p)
        for name, th in thresholds.items():
            crossings.append(pair_crossings(arm, name, th, {s: cross[arm][s][name] for s in seeds},
                                            {s: cross[REFERENCE][s][name] for s in ref}))
    s0 = step0_rates(grid)
    return Analysis(seeds_rows, last, per_step, crossings, plat, thresholds, dup, _step0_check(grid),
                    direction_effects(grid), {a: learning_retained(grid, a, s0) for a in sorted(grid, key=arm_order)
                                              if CONTROL in grid}, s0)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _at(run: RunRecord, step: int, fn: Callable[[dict], float | None]) -> float | None:
    row = run.eval_at(step)
    return None if row is None else fn(row)


def _paired_auc(arm: str, seeds: dict[int, RunRecord], ref: dict[int, RunRecord]) -> Paired:
    """Hack AUC difference per seed, each pair over the evaluation steps both runs have."""
    diffs = {}
    for s in sorted(set(seeds) & set(ref)):
        common = set(seeds[s].eval_steps) & set(ref[s].eval_steps)
        a, v = hack_auc(seeds[s], common), hack_auc(ref[s], common)
        if a is not None and v is not None:
            diffs[s] = a - v
    return Paired(arm, "hack_auc", "training", diffs, sorted(set(seeds) - set(ref)), sorted(set(ref) - set(seeds)))


# ------------------------------------------------------------------ matched controls and the honest frontier
def direction_effects(grid: dict[str, dict[int, RunRecord]]) -> list[Paired]:
    """Per authored-direction arm with its random control in the grid: arm − control per seed at the last
    evaluation (hack, pass, safepass); `ref` names the control."""
    from shared.arms import authored_twin

    out = []
    for ctrl in sorted(grid, key=arm_order):
        arm = authored_twin(ctrl, list(grid))
        if arm is None:
            continue
        for m, (_, fn) in EVAL_METRICS.items():
            p = pair(arm, m, "last", {s: fn(r.last_eval) for s, r in grid[arm].items()},
                     {s: fn(r.last_eval) for s, r in grid[ctrl].items()})
            p.ref = ctrl
            out.append(p)
    return out


def step0_rates(grid: dict[str, dict[int, RunRecord]]) -> dict[int, dict[str, float | None]]:
    """Seed -> the step-0 policy's held-out hack % and pass % (the first arm, in arm order, that logged step 0)."""
    out: dict[int, dict[str, float | None]] = {}
    for arm in sorted(grid, key=arm_order):
        for s, r in grid[arm].items():
            row = r.eval_at(0)
            if s not in out and row is not None:
                out[s] = {"hack": pct(row, "hack_strict"), "pass": pct(row, "pass_rate")}
    return out


@dataclass
class Retained:
    """Learning retained by one arm: per seed (pass − pass@0) / (control pass − pass@0)."""

    arm: str
    values: dict[int, float]  # seed -> share of the control's honest gain the arm kept
    gains: dict[int, float]  # seed -> arm pass − step-0 pass (pp)
    control_gains: dict[int, float]  # seed -> control pass − step-0 pass (pp)
    no_headroom: list[int] = field(default_factory=list)  # seeds left out: control gained < MIN_HEADROOM_PP

    @property
    def paired(self) -> Paired:
        return Paired(self.arm, "retained", "last", dict(self.values), ref=CONTROL)

    @property
    def ratio_of_means(self) -> float | None:
        seeds = sorted(set(self.gains) & set(self.control_gains))
        den = sum(self.control_gains[s] for s in seeds)
        return None if not seeds or den <= 0 else sum(self.gains[s] for s in seeds) / den

    @property
    def control_gain_mean(self) -> float | None:
        return float(np.mean(list(self.control_gains.values()))) if self.control_gains else None


def learning_retained(grid: dict[str, dict[int, RunRecord]], arm: str,
                      step0: dict[int, dict[str, float | None]] | None = None,
                      min_headroom: float = MIN_HEADROOM_PP) -> Retained:
    """The arm's learning retained per seed against `control` of the same seed (see the module docstring)."""
    step0 = step0_rates(grid) if step0 is None else step0
    ctrl, mine = grid.get(CONTROL, {}), grid.get(arm, {})
    values, gains, cgains, none = {}, {}, {}, []
    for s in sorted(set(ctrl) & set(mine) & set(step0)):
        p0 = step0[s]["pass"]
        pa, pc = pct(mine[s].last_eval, "pass_rate"), pct(ctrl[s].last_eval, "pass_rate")
        if p0 is None or pa is None or pc is None:
            continue
        gains[s], cgains[s] = pa - p0, pc - p0
        if pc - p0 < min_headroom:
            none.append(s)
        else:
            values[s] = (pa - p0) / (pc - p0)
    return Retained(arm, values, gains, cgains, none)
