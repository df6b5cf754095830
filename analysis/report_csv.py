"""Run records rebuilt from a written report's CSVs, so its figures can be redrawn without the run folders.

A report writes every evaluation of every run to `per_step.csv` (percentages, exact: rates over n
samples) and one row per run to `per_seed.csv`; docs/results/* commit those, not the runs. The records
here carry those evaluations (no training rows), so `summarize` and `stats.analyze` give the same
last-evaluation and per-step paired numbers as the report did, and `redraw_figures` draws pareto.png,
trajectories.png and paired_diff.png with today's plotting code (`rankguard figures REPORT_DIR`).
"""
from __future__ import annotations

import csv
from pathlib import Path

from analysis.rundata import MODE_COLUMNS, RunRecord, arm_order

PER_STEP = "per_step.csv"
PER_SEED = "per_seed.csv"


class ReportCsvError(ValueError):
    """The folder has no usable per_step.csv (not a report folder, or one written before it existed)."""


def _rate(text: str) -> float | None:
    return None if text in ("", None) else float(text) / 100.0


def runs_from_report(report_dir: str | Path) -> list[RunRecord]:
    """One RunRecord per (arm, seed) of per_step.csv, its evaluations as the run's evals.jsonl had them."""
    report_dir = Path(report_dir)
    path = report_dir / PER_STEP
    if not path.is_file():
        raise ReportCsvError(f"{path} not found: the figures need a report's per_step.csv (written by "
                             "`rankguard report` since the paired analysis); redraw from the run folders instead")
    cols = {"hack": "hack_strict", "pass": "pass_rate", **{k: e for k, e, _ in MODE_COLUMNS if k != "strict"}}
    evals: dict[tuple[str, int], list[dict]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            e = {"step": int(row["step"])}
            if row.get("n"):
                e["n"] = int(float(row["n"]))
            for col, key in cols.items():
                if col in row and _rate(row[col]) is not None:
                    e[key] = _rate(row[col])
            evals.setdefault((row["arm"], int(row["seed"])), []).append(e)
    seeds: dict[tuple[str, int], dict] = {}
    if (report_dir / PER_SEED).is_file():
        with (report_dir / PER_SEED).open(newline="") as f:
            seeds = {(r["arm"], int(r["seed"])): r for r in csv.DictReader(f)}
    runs = []
    for (arm, seed), rows in evals.items():
        rows.sort(key=lambda e: e["step"])
        info = seeds.get((arm, seed), {})
        steps = int(float(info["train_steps"])) if info.get("train_steps") else rows[-1]["step"]
        folder = Path(info.get("folder") or f"{arm}/seed{seed}")
        runs.append(RunRecord(path=folder, arm=arm, seed=seed, preset="?", planned_steps=steps,
                              done=rows[-1]["step"] >= steps, evals=rows, metrics=[]))
    return sorted(runs, key=lambda r: (arm_order(r.arm), r.seed))


def redraw_figures(report_dir: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """pareto.png, trajectories.png and paired_diff.png of a report folder, from its CSVs."""
    from analysis import stats
    from analysis.plots import plot_paired_steps, plot_pareto, plot_trajectories
    from analysis.rundata import summarize

    out = Path(out or report_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = runs_from_report(report_dir)
    summaries = summarize(runs)
    return {"pareto": plot_pareto(summaries, out / "pareto.png"),
            "trajectories": plot_trajectories(summaries, out / "trajectories.png"),
            "paired_diff": plot_paired_steps(stats.analyze(runs).per_step, out / "paired_diff.png")}
