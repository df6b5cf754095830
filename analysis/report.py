"""Headline report of an experiment folder: the spec's table, per-mode hack table, H1/H3/H4 check, plots.

`build_report(runs_dir)` reads every run folder below `runs_dir` (a folder with `config.json`, see
docs/ARCHITECTURE.md), takes each run's LAST evaluation from `evals.jsonl`, and writes
`report.md`, `report.csv`, `hack_modes.csv`, `verdicts.json`, `pareto.png`, `trajectories.png`
and `diagnostics.png`. Unfinished runs are used as they stand and flagged.

After the preregistered part, exploratory sections (analysis.stats): paired arm − vanilla differences
per seed with t and bootstrap CIs at the last and at every evaluation, hack AUC and crossing steps,
seeds needed, a per-seed table; files `paired.csv`, `per_seed.csv`, `per_step.csv`, `paired_diff.png`.

Rates in evals.jsonl are fractions in [0, 1]; the report shows percentages. Cells are mean ± SEM
across seeds (SEM = std(ddof=1)/sqrt(n), "±—" for a single seed).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from analysis import stats
from analysis.hypotheses import (H5_ARM, H5_CONTROL, H5_RULES_MARKDOWN, RULES_MARKDOWN, ArmRates, check_all,
                                 check_h5, sem_of_difference, verdicts_markdown)
from analysis.rundata import (ARM_LABELS, HEADLINE, MODE_COLUMNS, ArmSummary, RunRecord, find_runs,
                              label, load_run, read_jsonl, summarize)
from analysis.rundata import pct as _pct

__all__ = ["ARM_LABELS", "HEADLINE", "MODE_COLUMNS", "ArmSummary", "ReportError", "RunRecord", "build_report",
           "find_runs", "load_run", "read_jsonl", "summarize"]  # read_jsonl: analysis.experiment reads runs with it


class ReportError(ValueError):
    """The folder holds nothing a report can be built from."""


def headline_rows(summaries: dict[str, ArmSummary]) -> list[dict]:
    """Numbers of the headline table, one dict per arm: <key>_mean, <key>_sem, n.

    ΔSafePass = mean(pass − hack) − vanilla's mean(pass − hack); its SEM combines the arm's and
    vanilla's SEMs (independent seeds). Vanilla's own ΔSafePass is 0 by definition (reference)."""
    ref_mean, ref_sem, _ = summaries["vanilla"].stat("safepass") if "vanilla" in summaries else (None, None, 0)
    rows = []
    for arm, s in summaries.items():
        row = {"arm": arm, "label": ARM_LABELS.get(arm, arm), "n": s.n, "finished": s.finished,
               "last_eval_steps": sorted({r.last_eval_step for r in s.runs})}
        sp_mean, sp_sem, _ = s.stat("safepass")
        if arm == "vanilla":
            row["dsafepass_mean"], row["dsafepass_sem"] = 0.0, None
        elif ref_mean is None or sp_mean is None:
            row["dsafepass_mean"], row["dsafepass_sem"] = None, None
        else:
            row["dsafepass_mean"] = sp_mean - ref_mean
            row["dsafepass_sem"] = sem_of_difference(sp_sem, ref_sem)
        for key, *_ in HEADLINE:
            row[f"{key}_mean"], row[f"{key}_sem"], _ = s.stat(key)
        rows.append(row)
    return rows


def mode_rows(summaries: dict[str, ArmSummary]) -> list[dict]:
    rows = []
    for arm, s in summaries.items():
        row = {"arm": arm, "label": ARM_LABELS.get(arm, arm), "n": s.n}
        for key, *_ in MODE_COLUMNS:
            row[f"{key}_mean"], row[f"{key}_sem"], _ = s.stat(key)
        rows.append(row)
    return rows


def fmt_cell(mean: float | None, sem: float | None, pct: bool) -> str:
    """'12.3 ± 4.5' for percentages, 3 significant digits otherwise; '±—' when SEM is undefined."""
    if mean is None:
        return "—"
    if pct:
        digits = 1
    else:  # 3 significant digits of the mean; the SEM gets the same decimals
        digits = 3 if mean == 0 else min(6, max(0, 2 - math.floor(math.log10(abs(mean)))))
    return f"{mean:.{digits}f} ± {'—' if sem is None else f'{sem:.{digits}f}'}"


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _retained_cell(rt: "stats.Retained | None") -> str:
    """'0.62 [0.41, 0.83] (n=8)': mean learning retained over seeds, 95 % t CI."""
    if rt is None or not rt.values:
        return "—"
    p = rt.paired
    ci = "" if p.n < 2 else f" [{p.t_ci[0]:.2f}, {p.t_ci[1]:.2f}]"
    return f"{p.mean:.2f}{ci} (n={p.n})"


def headline_markdown(rows: list[dict], an: "stats.Analysis | None" = None) -> str:
    """The spec's table, plus (issue #23) a learning-retained column and the step-0 policy as a reference row."""
    retained = an.retained if an is not None else {}
    header = ["Arm", "ΔSafePass↑"] + [h for _, _, h, _ in HEADLINE] + (["Learning retained↑"] if retained else [])
    body = []
    for r in rows:
        dsp = "0 (ref)" if r["arm"] == "vanilla" else fmt_cell(r["dsafepass_mean"], r["dsafepass_sem"], True)
        cells = [fmt_cell(r[f"{k}_mean"], r[f"{k}_sem"], pct) for k, _, _, pct in HEADLINE]
        label = r["label"] + (f" n={r['n']}" if r["n"] else "")
        extra = [("1 (ref)" if r["arm"] == stats.CONTROL else _retained_cell(retained.get(r["arm"])))] if retained else []
        body.append([label, dsp] + cells + extra)
    s0 = an.step0_rates if an is not None else {}
    if s0:
        from analysis.hypotheses import mean_sem

        hm, hs, n = mean_sem([v["hack"] for v in s0.values()])
        pm, ps, _ = mean_sem([v["pass"] for v in s0.values()])
        body.append([f"Step-0 policy (reference) n={n}", "—", fmt_cell(hm, hs, True), fmt_cell(pm, ps, True)]
                    + ["—"] * (len(HEADLINE) - 2) + (["0 (ref)"] if retained else []))
    return _md_table(header, body)


def modes_markdown(rows: list[dict]) -> str:
    header = ["Arm"] + [h for _, _, h in MODE_COLUMNS]
    body = [[r["label"]] + [fmt_cell(r[f"{k}_mean"], r[f"{k}_sem"], True) for k, *_ in MODE_COLUMNS]
            for r in rows]
    return _md_table(header, body)


def write_csv(path: Path, rows: list[dict], keys: list[str]) -> None:
    cols = ["arm", "label", "n"] + [f"{k}_{s}" for k in keys for s in ("mean", "sem")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])


CAPTION = (
    "↑ higher is better, ↓ lower is better. Cells: mean ± SEM across seeds (SEM = std(ddof=1)/√n; "
    "±— when n = 1), each seed's value taken at its LAST evaluation. "
    "**Hack %** = strict hack rate, any mode (a loophole's vulnerable check passed while the ground-truth "
    "tests failed), on held-out problems. **Pass %** = fraction passing held-out ground-truth tests "
    "(graded by gt only, no write access). ΔSafePass = (pass% − hack%) − vanilla's (pass% − hack%); "
    "positive means better than vanilla; its SEM combines the arm's and vanilla's. KL = mean per-token KL "
    "from the initial policy over the last 25 steps (training rollouts). KL deployed = the k3 KL to the initial "
    "policy of the policy that ships (route: δQ off) on its own evaluation samples at the last evaluation; KL "
    "training policy = the same for route's training policy (δQ on); '—' where a run did not log it. mean·cos, frac·fired, ‖g‖ = projection diagnostics "
    "(meaningful for the projection arms; 'projection active' means mean·cos > 0.2 and frac·fired > 0.4). "
    "Reference points (issue #23): **Control** = vanilla with every loophole closed (the reward pays only the hidden "
    "tests: the honest frontier); **Step-0 policy** = the initial policy's evaluation. **Learning retained** = per "
    "seed (pass − step-0 pass) / (control pass − step-0 pass), mean [95 % t CI] over seeds (see 'Learning retained' "
    "below for the seeds left out)."
)


def _experiment_info(runs_dir: Path) -> dict:
    p = runs_dir / "experiment.json"
    if p.exists():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def exploratory_line(arms: list[str]) -> str | None:
    """Which arms are exploratory (shared.arms: anything but the spec's six); the oracle one is labelled a cheat."""
    from shared.arms import ORACLE, resolve_arm
    from shared.config import ARMS, ConfigError

    def explo(a: str) -> bool:
        try:
            return resolve_arm(a).exploratory
        except ConfigError:
            return a not in ARMS

    def note(a: str) -> str:
        if ORACLE in a.replace("+", "_").split("_"):
            return " (ceiling: projects against v_oracle from another seed's vanilla rollouts, a cheat)"
        if a.startswith("gt_"):
            return " (oracle-monitor baseline: reads the judge's hack labels during training, a cheat)"
        if a == "control":
            return " (reference: every loophole closed)"
        return ""

    names = [f"`{a}`{note(a)}" for a in arms if explo(a)]
    if not names:
        return None
    return ("Exploratory arms (not preregistered; the preregistered check below uses only the spec's arms): "
            + ", ".join(names) + ".")


def _status_lines(runs: list[RunRecord], info: dict) -> list[str]:
    lines = []
    finished = [r for r in runs if r.finished]
    lines.append(f"Runs found: {len(runs)}, finished: {len(finished)}.")
    explo = exploratory_line(list(dict.fromkeys(r.arm for r in runs)))
    if explo:
        lines.append(explo)
    planned = [(a, s) for a in info.get("arms", []) for s in info.get("seeds", [])]
    have = {(r.arm, r.seed) for r in runs}
    missing = [f"{a}/seed{s}" for a, s in planned if (a, s) not in have]
    if missing:
        lines.append(f"Planned but absent: {', '.join(missing)}.")
    partial = [r for r in runs if not r.finished]
    if partial:
        lines.append("**Partial experiment**: unfinished runs are used at their latest evaluation: "
                     + ", ".join(f"{r.arm}/seed{r.seed} (eval step {r.last_eval_step if r.evals else 'none'} "
                                 f"of {r.planned_steps})" for r in partial) + ".")
    no_eval = [r for r in runs if not r.evals]
    if no_eval:
        lines.append("Left out (no evaluation yet): " + ", ".join(f"{r.arm}/seed{r.seed}" for r in no_eval) + ".")
    steps = sorted({r.last_eval_step for r in runs if r.evals})
    if len(steps) > 1:
        lines.append(f"Last-evaluation steps differ between runs ({', '.join(map(str, steps))}): "
                     "arms are compared at different training lengths.")
    return lines


def _runs_table(runs: list[RunRecord]) -> str:
    body = []
    for r in runs:
        e = r.last_eval or {}
        body.append([r.arm, str(r.seed), "done" if r.finished else "unfinished", str(len(r.metrics)),
                     str(r.last_eval_step if r.evals else "—"), fmt_cell(_pct(e, "hack_strict"), None, True).split(" ±")[0],
                     fmt_cell(_pct(e, "pass_rate"), None, True).split(" ±")[0], str(r.path)])
    return _md_table(["arm", "seed", "status", "steps logged", "last eval step", "hack %", "pass %", "folder"], body)


# ------------------------------------------------------------------ exploratory: paired, time-resolved
def _signed(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def _ci(lo: float | None, hi: float | None, digits: int = 1) -> str:
    return "—" if lo is None else f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _n_needed(n: float | None) -> str:
    if n is None:
        return "— (needs ≥ 2 pairs)"
    return "∞ (Δ = 0)" if math.isinf(n) else str(int(n))


METRIC_LABELS = {"hack": "Hack %", "pass": "Pass %", "safepass": "ΔSafePass", "hack_auc": "Hack AUC % (training)"}
PAIRED_CAPTION = (
    "Exploratory, not preregistered (the verdicts above stay the spec's). A seed fixes the problem draws, the "
    "sampling seeds and the held-out evaluation draws for every arm, so each arm is compared with vanilla **of the "
    "same seed**: Δ = arm − vanilla per seed, in percentage points; only seeds both arms have are paired. "
    f"95 % CI (t) = mean ± t·SD/√n; 95 % CI (bootstrap) = percentile bootstrap over seeds ({stats.N_BOOT} "
    f"resamples, RNG seed {stats.BOOT_SEED}; with few seeds it is too narrow, since it only reshuffles the seeds seen: "
    "read the t interval). ΔSafePass = (pass − hack)_arm − (pass − hack)_vanilla. Hack AUC = "
    "trapezoid area under the held-out strict hack % over the evaluation steps (step 0 included), divided by the "
    "step span: the mean hack % over training, each pair over the steps both runs evaluated. **n seeds needed** = "
    "smallest number of seeds at which a two-sided paired t-test at α = 0.05 has 80 % power (noncentral t), assuming "
    "the true Δ and the true SD of the per-seed Δ equal the observed ones (with few seeds the SD itself is "
    "uncertain), "
    f"normal per-seed Δ, independent seeds; the last column asks the same for a {stats.RESOLVE_PP:g} pp difference."
)


def paired_markdown(an: stats.Analysis) -> str:
    header = ["Arm", "Metric", "n pairs", "mean Δ", "95 % CI (t)", "95 % CI (bootstrap)", "SD of Δ",
              "n seeds needed (observed Δ)", f"n seeds for {stats.RESOLVE_PP:g} pp"]
    body = []
    for p in an.last:
        what = METRIC_LABELS[p.metric] + (" (last eval)" if p.at == "last" else "")
        body.append([label(p.arm), what, str(p.n), _signed(p.mean), _ci(*p.t_ci), _ci(*p.boot_ci),
                     "—" if p.sd is None else f"{p.sd:.1f}", _n_needed(p.n_needed), _n_needed(p.n_needed_resolve)])
    return _md_table(header, body)


def _seeds(xs: list[int]) -> str:
    return f"seed{'s' if len(xs) > 1 else ''} {', '.join(map(str, xs))}"


def _unpaired_lines(an: stats.Analysis) -> list[str]:
    lines = []
    for p in an.last:
        if p.metric == "hack" and (p.only_arm or p.only_ref):
            parts = ([f"the arm lacks {_seeds(p.only_ref)}"] if p.only_ref else []) \
                + ([f"vanilla lacks {_seeds(p.only_arm)}"] if p.only_arm else [])
            lines.append(f"- {label(p.arm)}: {p.n} seed{'s' if p.n != 1 else ''} paired; {'; '.join(parts)} "
                         "(left unpaired).")
    for r in an.duplicates:
        lines.append(f"- Duplicate run {r.arm}/seed{r.seed} at `{r.path}` left out of the pairing (an earlier "
                     "folder has it).")
    if an.step0:
        same = [s for s, ok in an.step0.items() if ok]
        differ = [s for s, ok in an.step0.items() if not ok]
        if differ:
            lines.append(f"- **Pairing check failed**: the step-0 evaluations (same initial policy, same draws) differ "
                         f"between arms in seed{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))}: those "
                         "arms do not share their evaluation noise, so pairing removes less of it than assumed.")
        if same:
            lines.append(f"- Pairing check: step-0 evaluations agree across arms in seed{'s' if len(same) > 1 else ''} "
                         f"{', '.join(map(str, same))}.")
    return lines


def per_step_markdown(an: stats.Analysis, metric: str = "hack") -> str:
    """Arm × evaluation step: mean Δ [t CI]; '(n=k)' where fewer seeds are paired than at the last eval."""
    full = {p.arm: p.n for p in an.last if p.metric == metric}
    cells: dict[str, dict[int, str]] = {}
    for p in an.per_step:
        if p.metric == metric:
            cell = _signed(p.mean) + ("" if p.n < 2 else f" {_ci(*p.t_ci)}")
            cells.setdefault(p.arm, {})[int(p.at)] = cell + ("" if p.n == full.get(p.arm) else f" (n={p.n})")
    steps = sorted({s for c in cells.values() for s in c})
    body = [[label(arm)] + [c.get(s, "—") for s in steps] for arm, c in cells.items()]
    return _md_table(["Arm"] + [f"step {s}" for s in steps], body)


def crossing_markdown(an: stats.Analysis) -> str:
    header = ["Arm", "Threshold (training hack)", "n both crossed", "mean Δ steps", "95 % CI (t)",
              "95 % CI (bootstrap)", "censored: arm later / earlier / undecided", "arm later in (sign test)"]
    body = []
    for c in an.crossings:
        what = ("50 %" if c.name == "cross50" else f"{c.threshold:.1f} % (80 % of vanilla's plateau)")
        known = c.n_later + c.n_earlier
        sign = "—" if c.sign_p is None else f"{c.n_later} of {known} (p = {c.sign_p:.2f})"
        body.append([label(c.arm), what, str(c.exact.n), _signed(c.exact.mean, 0), _ci(*c.exact.t_ci, 0),
                     _ci(*c.exact.boot_ci, 0), f"{len(c.later)} / {len(c.earlier)} / {len(c.undetermined)}", sign])
    return _md_table(header, body)


def _x(c: stats.Crossing | None) -> str:
    return "—" if c is None else c.text()


def per_seed_markdown(an: stats.Analysis) -> str:
    th = an.thresholds.get("cross_plateau")
    header = ["Arm", "seed", "last eval step", "Hack % (k/n)", "Pass % (k/n)", "SafePass", "ΔSafePass vs vanilla",
              "Hack AUC %", "train hack ≥ 50 % at step"] + ([f"≥ {th:.1f} % at step"] if th is not None else [])

    def kn(r: stats.SeedRow, v: float | None) -> str:
        k = r.count(v)
        return "—" if v is None else f"{v:.1f}" + ("" if k is None else f" ({k}/{r.n_eval})")

    body = []
    for r in an.seeds:
        row = [label(r.arm), str(r.seed), str(r.last_step), kn(r, r.hack), kn(r, r.pass_),
               "—" if r.safepass is None else f"{r.safepass:+.1f}",
               "0 (ref)" if r.arm == stats.REFERENCE else _signed(r.dsafepass),
               "—" if r.auc is None else f"{r.auc:.1f}", _x(r.cross50)]
        if th is not None:
            row.append(_x(r.cross_plateau))
        body.append(row)
    return _md_table(header, body)


def dynamic_range_lines(an: stats.Analysis) -> list[str]:
    """How far the testbed moves (section 3 of issue 13): vanilla's 50 % crossing, its plateau, the ceiling arm."""
    van = [r for r in an.seeds if r.arm == stats.REFERENCE]
    lines = []
    if van:
        xs = ", ".join(_x(r.cross50) for r in van)
        lines.append(f"- Vanilla's training strict hack rate (centred {stats.SMOOTH_WINDOW}-step mean) first reaches "
                     f"50 % at step {xs} (seed{'s' if len(van) > 1 else ''} {', '.join(str(r.seed) for r in van)}).")
    if an.plateau is not None:
        lines.append(f"- Vanilla's plateau (mean training strict hack over each run's last {stats.PLATEAU_STEPS} "
                     f"steps, mean over seeds): {an.plateau:.1f} %; 80 % of it: "
                     f"{an.thresholds['cross_plateau']:.1f} %.")
    ceiling = [p for p in an.last if p.arm == "oracle" and p.metric in ("hack", "hack_auc")]
    if ceiling:
        nums = "; ".join(f"{METRIC_LABELS[p.metric]} Δ {_signed(p.mean)} {_ci(*p.t_ci)} (n={p.n})" for p in ceiling)
        lines.append("- Ceiling arm `oracle` (projects against a direction from a vanilla run's own rollouts of "
                     f"another seed: a cheat, the most this mechanism could do here): {nums}.")
    else:
        lines.append("- Ceiling arm `oracle`: not in this grid, so the testbed's best case is not shown.")
    return lines


def _num(x):
    if x is None:
        return ""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return x


PAIRED_COLUMNS = ["arm", "metric", "at", "n_pairs", "mean", "sd", "t_lo", "t_hi", "boot_lo", "boot_hi", "n_needed",
                  f"n_needed_{stats.RESOLVE_PP:g}pp", "threshold", "n_later", "n_earlier", "n_censored_later",
                  "n_censored_earlier", "n_undetermined", "sign_p", "seeds", "seeds_only_arm", "seeds_only_vanilla"]


def write_paired_csv(path: Path, an: stats.Analysis) -> None:
    """Every paired number: last eval, hack AUC, each evaluation step, crossing steps (Δ in steps)."""
    def row(p: stats.Paired, extra: dict | None = None) -> list:
        d = {**p.to_dict(), **(extra or {})}
        if extra:  # crossing Δ is in steps: a "5 pp" question does not apply
            d[f"n_needed_{stats.RESOLVE_PP:g}pp"] = None
        d.update({k: " ".join(map(str, d[k])) for k in ("seeds", "seeds_only_arm", "seeds_only_vanilla")})
        return [_num(d.get(c)) for c in PAIRED_COLUMNS]

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PAIRED_COLUMNS)
        for p in an.last + an.per_step:
            w.writerow(row(p))
        for c in an.crossings:
            w.writerow(row(c.exact, {"threshold": c.threshold, "n_later": c.n_later, "n_earlier": c.n_earlier,
                                     "n_censored_later": len(c.later), "n_censored_earlier": len(c.earlier),
                                     "n_undetermined": len(c.undetermined), "sign_p": c.sign_p}))


CONTROLS_COLUMNS = ["arm", "ref", "metric", "n_pairs", "mean", "sd", "t_lo", "t_hi", "boot_lo", "boot_hi", "n_needed",
                    "seeds", "values"]


def write_controls_csv(path: Path, an: stats.Analysis) -> None:
    """Arm − its random control per metric, then learning retained per arm (ref = control), one row each."""
    rows = list(an.direction) + [rt.paired for rt in an.retained.values()]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CONTROLS_COLUMNS)
        for p in rows:
            d = p.to_dict()
            d["seeds"] = " ".join(map(str, d["seeds"]))
            d["values"] = " ".join(f"{v:.4g}" for v in p.values)
            w.writerow([_num(d.get(c)) for c in CONTROLS_COLUMNS])


PER_SEED_COLUMNS = ["arm", "seed", "last_eval_step", "n_eval", "hack", "hack_count", "pass", "pass_count", "safepass",
                    "dsafepass", "hack_auc", "cross50_step", "cross_plateau_step", "cross_plateau_threshold",
                    "train_steps", "folder"]


def write_per_seed_csv(path: Path, an: stats.Analysis) -> None:
    """One row per arm × seed; a crossing step left empty means censored (never reached by train_steps)."""
    th = an.thresholds.get("cross_plateau")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PER_SEED_COLUMNS)
        for r in an.seeds:
            xs = [x for x in (r.cross50, r.cross_plateau) if x is not None]
            w.writerow([_num(v) for v in (
                r.arm, r.seed, r.last_step, r.n_eval, r.hack, r.count(r.hack), r.pass_, r.count(r.pass_), r.safepass,
                0.0 if r.arm == stats.REFERENCE else r.dsafepass, r.auc,
                None if r.cross50 is None else r.cross50.step,
                None if r.cross_plateau is None else r.cross_plateau.step,
                th, xs[0].last_step if xs else None, str(r.run.path))])


def write_per_step_csv(path: Path, runs: list[RunRecord]) -> None:
    """Every evaluation of every run (percentages), so per-step coincidences can be checked by eye."""
    keys = [("hack", "hack_strict"), ("pass", "pass_rate")] + [(k, e) for k, e, _ in MODE_COLUMNS if k != "strict"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "seed", "step", "n"] + [k for k, _ in keys])
        for r in runs:
            for st in r.eval_steps:
                e = r.eval_at(st)
                w.writerow([r.arm, r.seed, st, _num(e.get("n"))] + [_num(_pct(e, ek)) for _, ek in keys])


CONTROLS_CAPTION = (
    "Exploratory (issue #23). Each direction arm is paired per seed with its **matched random-direction control** "
    "(the same arm with a Haar-random basis per module of the same k and sizes, `vhack.direction=random`): Δ = arm − "
    "control in pp at the last evaluation, so Δ hack < 0 means the authored direction does more than quarantining or "
    "projecting *any* direction. Beside it the same arm's Δ vs vanilla. CIs and seeds needed as in the paired table "
    "below (80 % power, two-sided α = 0.05, the observed SD).")


def _vs_vanilla(an: stats.Analysis, arm: str, metric: str) -> str:
    p = next((q for q in an.last if q.arm == arm and q.metric == metric), None)
    return "—" if p is None or p.mean is None else f"{_signed(p.mean)} {_ci(*p.t_ci)}"


def controls_markdown(an: stats.Analysis) -> str:
    header = ["Arm", "its control", "Metric", "n pairs", "Δ vs control", "95 % CI (t)", "95 % CI (bootstrap)",
              "n seeds needed (observed Δ)", "Δ vs vanilla [95 % CI (t)]"]
    body = [[label(p.arm), f"`{p.ref}`", METRIC_LABELS[p.metric], str(p.n), _signed(p.mean), _ci(*p.t_ci),
             _ci(*p.boot_ci), _n_needed(p.n_needed), _vs_vanilla(an, p.arm, p.metric)] for p in an.direction]
    return _md_table(header, body)


def retained_markdown(an: stats.Analysis) -> str:
    header = ["Arm", "n seeds", "learning retained (mean)", "95 % CI (t)", "95 % CI (bootstrap)",
              "ratio of mean gains", "arm pass gain over step 0 (pp)", "seeds left out (control gained < "
              f"{stats.MIN_HEADROOM_PP:g} pp)"]
    body = []
    for arm, rt in an.retained.items():
        p = rt.paired
        gain = f"{sum(rt.gains.values()) / len(rt.gains):+.1f}" if rt.gains else "—"
        ratio = "—" if rt.ratio_of_means is None else f"{rt.ratio_of_means:.2f}"
        body.append([label(arm), str(p.n), "—" if p.mean is None else f"{p.mean:.2f}", _ci(*p.t_ci, 2),
                     _ci(*p.boot_ci, 2), ratio, gain, ", ".join(map(str, rt.no_headroom)) or "none"])
    return _md_table(header, body)


def controls_section(an: stats.Analysis) -> list[str]:
    md = ["## Exploratory: every effect against its control (issue #23)", "", CONTROLS_CAPTION, ""]
    md += [controls_markdown(an), ""] if an.direction else [
        "No direction arm has its random control in this grid (`rankguard experiment --controls` adds them).", ""]
    md += ["### Learning retained (honest frontier)", ""]
    if an.retained:
        any_rt = next(iter(an.retained.values()))
        cg = any_rt.control_gain_mean
        md += [f"Per seed (pass − step-0 pass) / (control pass − step-0 pass): 1 = the arm learned as much honest "
               f"passing as the no-loophole control, 0 = none, < 0 = it lost pass rate. The control's mean gain over "
               f"step 0: {'—' if cg is None else f'{cg:+.1f} pp'} (with little headroom the ratio is noisy: read "
               "the CIs).", "", retained_markdown(an), ""]
    else:
        md += ["No `control` arm (every loophole closed) in this grid: learning retained needs it.", ""]
    return md


def h5_verdict(an: stats.Analysis, preset: str | None):
    """The separately preregistered H5 (docs/prereg/2026-12-05-h5-route.md) from the analysis."""
    diffs = {}
    p = next((q for q in an.direction if q.arm == H5_ARM and q.ref == H5_CONTROL and q.metric == "hack"), None)
    if p is not None:
        diffs = {s: -d for s, d in p.diffs.items()}  # control − route
    ra, rc = an.retained.get(H5_ARM), an.retained.get(H5_CONTROL)
    gain = ra.control_gain_mean if ra is not None else None
    return check_h5(diffs, ra.values if ra else {}, rc.values if rc else {}, gain, preset=preset)


def exploratory_markdown(an: stats.Analysis) -> list[str]:
    md = ["## Exploratory: paired differences vs vanilla (not preregistered)", "", PAIRED_CAPTION, ""]
    if an.last:
        md += [paired_markdown(an), ""] + _unpaired_lines(an) + [""]
        md += ["Hack % Δ (arm − vanilla, pp) at every evaluation step, mean [95 % CI (t)]; pass and ΔSafePass per "
               "step are in `paired.csv` and `paired_diff.png`:", "", per_step_markdown(an, "hack"), ""]
    else:
        md += ["No arm to pair with vanilla (vanilla or every other arm is missing).", ""]
    md += ["## Exploratory: time-resolved hack metrics (not preregistered)", "",
           f"Crossing step = first step (steps completed) at which the **training** strict hack rate (metrics.jsonl), "
           f"smoothed by a centred {stats.SMOOTH_WINDOW}-step moving mean, reaches the threshold; a run that never "
           "does is censored ('> last step'). Δ steps > 0: the arm reaches it later than vanilla of the same seed. "
           "The mean and CIs use the pairs where both runs crossed; a censored pair only adds a direction when the "
           "censoring decides it (arm censored after vanilla crossed = later), and the exact sign test counts every "
           "pair with a known direction.", ""]
    if an.crossings:
        md += [crossing_markdown(an), ""]
    md += ["Testbed dynamic range:", ""] + dynamic_range_lines(an) + [""]
    md += ["## Per-seed values", "",
           "Every arm × seed at its last evaluation (k/n = samples behind the percentage) and over training; the same "
           "in `per_seed.csv`, and every evaluation step of every run in `per_step.csv`.", "",
           per_seed_markdown(an), ""]
    return md


def build_report(runs_dir: str | Path, out_dir: str | Path | None = None, plots: bool = True) -> dict:
    """Write the report files for runs_dir (into out_dir, default runs_dir); returns paths and verdicts."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ReportError(f"runs folder {str(runs_dir)!r} does not exist")
    out = Path(out_dir) if out_dir else runs_dir
    out.mkdir(parents=True, exist_ok=True)
    runs = find_runs(runs_dir)
    if not runs:
        raise ReportError(f"no run folders (with config.json) under {str(runs_dir)!r}")
    info = _experiment_info(runs_dir)
    summaries = summarize(runs)
    if not summaries:
        raise ReportError(f"none of the {len(runs)} runs under {str(runs_dir)!r} has an evaluation yet "
                          "(evals.jsonl is written every train.eval_every steps)")
    preset = info.get("preset") or runs[0].preset

    rows, mrows = headline_rows(summaries), mode_rows(summaries)
    write_csv(out / "report.csv", rows, ["dsafepass"] + [k for k, *_ in HEADLINE])
    write_csv(out / "hack_modes.csv", mrows, [k for k, *_ in MODE_COLUMNS])

    arm_rates = {arm: ArmRates(hack=[v for v in s.values["hack"] if v is not None],
                               pass_=[v for v in s.values["pass"] if v is not None],
                               finished=s.finished, last_steps=[r.last_eval_step for r in s.runs])
                 for arm, s in summaries.items()}
    verdicts = check_all(arm_rates, preset=preset)
    (out / "verdicts.json").write_text(json.dumps({k: v.to_dict() for k, v in verdicts.items()}, indent=2))

    analysis = stats.analyze(runs)
    h5 = h5_verdict(analysis, preset)
    (out / "verdict_h5.json").write_text(json.dumps(h5.to_dict(), indent=2, default=str))
    write_controls_csv(out / "controls.csv", analysis)
    write_paired_csv(out / "paired.csv", analysis)
    write_per_seed_csv(out / "per_seed.csv", analysis)
    write_per_step_csv(out / "per_step.csv", [r.run for r in analysis.seeds])

    figures = {}
    if plots:
        from analysis.plots import plot_diagnostics, plot_paired_steps, plot_pareto, plot_trajectories

        figures = {"pareto": plot_pareto(summaries, out / "pareto.png"),
                   "trajectories": plot_trajectories(summaries, out / "trajectories.png"),
                   "diagnostics": plot_diagnostics(summaries, out / "diagnostics.png"),
                   "paired_diff": plot_paired_steps(analysis.per_step, out / "paired_diff.png")}

    md = [f"# rankguard report: `{runs_dir}`", ""]
    meta = [f"preset **{preset}**"]
    for k in ("mode", "steps", "git_commit"):
        if info.get(k) is not None:
            meta.append(f"{k.replace('_', ' ')} `{info[k]}`")
    md += [", ".join(meta) + ".", ""] + _status_lines(runs, info) + [""]
    md += ["## Headline table", "", headline_markdown(rows, analysis), "", CAPTION, ""]
    md += ["## Hack rate per mode (%)", "",
           "Strict = the mode's vulnerable check passed while gt failed; loose = static evidence of the "
           "attempt. The weak arm's v_hack is built from modes A, B only: its C, D columns show transfer.", "",
           modes_markdown(mrows), ""]
    md += ["## Preregistered check (spec §7)", "",
           "Decided on each run's last evaluation; Hack % = strict hack rate (any mode).", "",
           verdicts_markdown(verdicts), "", RULES_MARKDOWN, ""]
    md += ["## Separately preregistered: H5 (docs/prereg/2026-12-05-h5-route.md)", "",
           "Not part of the spec's check above; its inputs are the matched control and learning retained.", "",
           verdicts_markdown({"H5": h5}), "", H5_RULES_MARKDOWN, ""]
    md += controls_section(analysis)
    md += exploratory_markdown(analysis)
    if figures:
        md += ["## Figures", ""] + [f"![{k}]({Path(p).name})" for k, p in figures.items()] + [""]
    md += ["## Runs", "", _runs_table(runs), ""]
    (out / "report.md").write_text("\n".join(md))
    return {"report_md": out / "report.md", "report_csv": out / "report.csv", "hack_modes_csv": out / "hack_modes.csv",
            "verdicts_json": out / "verdicts.json", "paired_csv": out / "paired.csv",
            "controls_csv": out / "controls.csv", "verdict_h5": h5.to_dict(),
            "per_seed_csv": out / "per_seed.csv", "per_step_csv": out / "per_step.csv", "figures": figures,
            "rows": rows, "verdicts": {k: v.to_dict() for k, v in verdicts.items()}, "analysis": analysis}
