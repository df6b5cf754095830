"""Headline report of an experiment folder: the spec's table, per-mode hack table, H1/H3/H4 check, plots.

`build_report(runs_dir)` reads every run folder below `runs_dir` (a folder with `config.json`, see
docs/ARCHITECTURE.md), takes each run's LAST evaluation from `evals.jsonl`, and writes
`report.md`, `report.csv`, `hack_modes.csv`, `verdicts.json`, `pareto.png`, `trajectories.png`
and `diagnostics.png`. Unfinished runs are used as they stand and flagged.

Rates in evals.jsonl are fractions in [0, 1]; the report shows percentages. Cells are mean ± SEM
across seeds (SEM = std(ddof=1)/sqrt(n), "±—" for a single seed).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from analysis.hypotheses import (RULES_MARKDOWN, ArmRates, check_all, sem_of_difference,
                                 verdicts_markdown)
from analysis.rundata import (ARM_LABELS, HEADLINE, MODE_COLUMNS, ArmSummary, RunRecord, find_runs,
                              load_run, read_jsonl, summarize)
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


def headline_markdown(rows: list[dict]) -> str:
    header = ["Arm", "ΔSafePass↑"] + [h for _, _, h, _ in HEADLINE]
    body = []
    for r in rows:
        dsp = "0 (ref)" if r["arm"] == "vanilla" else fmt_cell(r["dsafepass_mean"], r["dsafepass_sem"], True)
        cells = [fmt_cell(r[f"{k}_mean"], r[f"{k}_sem"], pct) for k, _, _, pct in HEADLINE]
        label = r["label"] + (f" n={r['n']}" if r["n"] else "")
        body.append([label, dsp] + cells)
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
    "from the initial policy over the last 25 steps. mean·cos, frac·fired, ‖g‖ = projection diagnostics "
    "(meaningful for the projection arms; 'projection active' means mean·cos > 0.2 and frac·fired > 0.4)."
)


def _experiment_info(runs_dir: Path) -> dict:
    p = runs_dir / "experiment.json"
    if p.exists():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def _status_lines(runs: list[RunRecord], info: dict) -> list[str]:
    lines = []
    finished = [r for r in runs if r.finished]
    lines.append(f"Runs found: {len(runs)}, finished: {len(finished)}.")
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

    figures = {}
    if plots:
        from analysis.plots import plot_diagnostics, plot_pareto, plot_trajectories

        figures = {"pareto": plot_pareto(summaries, out / "pareto.png"),
                   "trajectories": plot_trajectories(summaries, out / "trajectories.png"),
                   "diagnostics": plot_diagnostics(summaries, out / "diagnostics.png")}

    md = [f"# rankguard report: `{runs_dir}`", ""]
    meta = [f"preset **{preset}**"]
    for k in ("mode", "steps", "git_commit"):
        if info.get(k) is not None:
            meta.append(f"{k.replace('_', ' ')} `{info[k]}`")
    md += [", ".join(meta) + ".", ""] + _status_lines(runs, info) + [""]
    md += ["## Headline table", "", headline_markdown(rows), "", CAPTION, ""]
    md += ["## Hack rate per mode (%)", "",
           "Strict = the mode's vulnerable check passed while gt failed; loose = static evidence of the "
           "attempt. The weak arm's v_hack is built from modes A, B only: its C, D columns show transfer.", "",
           modes_markdown(mrows), ""]
    md += ["## Preregistered check (spec §7)", "",
           "Decided on each run's last evaluation; Hack % = strict hack rate (any mode).", "",
           verdicts_markdown(verdicts), "", RULES_MARKDOWN, ""]
    if figures:
        md += ["## Figures", ""] + [f"![{k}]({Path(p).name})" for k, p in figures.items()] + [""]
    md += ["## Runs", "", _runs_table(runs), ""]
    (out / "report.md").write_text("\n".join(md))
    return {"report_md": out / "report.md", "report_csv": out / "report.csv", "hack_modes_csv": out / "hack_modes.csv",
            "verdicts_json": out / "verdicts.json", "figures": figures, "rows": rows,
            "verdicts": {k: v.to_dict() for k, v in verdicts.items()}}
