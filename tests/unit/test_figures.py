"""Report figures read as figures: every arm in the legend with its own colour and marker, the legend
clear of the axis labels, the Pareto axes zoomed to the data with the step-0 and control points marked;
and the same figures redrawn from a report's CSVs (what docs/results/* commit) match the run folders."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.container import ErrorbarContainer

from analysis import stats
from analysis.plots import draw_paired_steps, draw_pareto, draw_trajectories, zoomed_limits
from analysis.report import build_report
from analysis.report_csv import ReportCsvError, redraw_figures, runs_from_report
from analysis.rundata import find_runs, label, summarize

REPO = Path(__file__).resolve().parents[2]
ARMS = {"vanilla": "vanilla", "projected": "projected", "rebound": "rebound",
        "projected_svd5": "projected", "mechanism": "projected"}  # folder (arm) -> train.arm (base)
LAST = {"vanilla": (0.62, 0.33), "projected": (0.58, 0.35), "rebound": (0.61, 0.34),
        "projected_svd5": (0.54, 0.37), "mechanism": (0.55, 0.36)}  # (hack, pass) at the last evaluation


def make_runs(root: Path, start=(0.06, 0.43), seeds=3) -> Path:
    for arm, base in ARMS.items():
        for seed in range(seeds):
            d = root / arm / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "config.json").write_text(json.dumps({"preset": "toy", "train": {"arm": base, "seed": seed, "steps": 20}}))
            h, p = LAST[arm]
            jitter = 0.01 * seed
            rows = [{"step": 0, "n": 64, "hack_strict": start[0], "pass_rate": start[1]},
                    {"step": 10, "n": 64, "hack_strict": (start[0] + h) / 2 + jitter, "pass_rate": (start[1] + p) / 2},
                    {"step": 20, "n": 64, "hack_strict": h + jitter, "pass_rate": p - jitter}]
            (d / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / "DONE").write_text("x\n")
    return root


def overlaps(fig, a, b) -> bool:
    r = fig.canvas.get_renderer()
    return a.get_window_extent(r).overlaps(b.get_window_extent(r))


def legend_texts(fig) -> list[str]:
    assert len(fig.legends) == 1
    return [t.get_text() for t in fig.legends[0].get_texts()]


def assert_legend_clear(fig) -> None:
    fig.canvas.draw()
    legend = fig.legends[0]
    for ax in fig.axes:
        for artist in (ax, ax.xaxis.label, ax.yaxis.label, ax.title):
            if artist.get_visible() and (artist is ax or artist.get_text()):
                assert not overlaps(fig, legend, artist), artist


@pytest.fixture
def runs(tmp_path):
    return find_runs(make_runs(tmp_path / "exp"))


def test_pareto_legend_zoom_start_and_control(runs):
    summaries = summarize(runs)
    fig = draw_pareto(summaries)
    ax = fig.axes[0]
    texts = legend_texts(fig)
    for arm in ARMS:
        assert f"{label(arm)} (n=3)" in texts
    assert "Vanilla (a) mean (crosshair)" in texts and "Pareto frontier (all seeds)" in texts
    assert "step 0: before training (3 seeds), off the axes" in texts
    # one colour + marker per arm
    arms = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    styles = {(h.lines[0].get_color(), h.lines[0].get_marker()) for h in arms}
    assert len(arms) == len(ARMS) and len(styles) == len(ARMS)
    # zoomed: every seed's point inside, the span far below 0-100
    xs = [100 * r.last_eval["pass_rate"] for r in runs]
    ys = [100 * r.last_eval["hack_strict"] for r in runs]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    assert x0 < min(xs) and max(xs) < x1 and y0 < min(ys) and max(ys) < y1
    assert x1 - x0 < 20 and y1 - y0 < 20
    # the step-0 policy (hack 6 %) is off these axes: marked on the edge with its coordinates
    notes = [t.get_text() for t in ax.texts]
    assert "step 0 at pass 43.0 %, hack 6.0 %" in notes
    # the control crosshair sits at vanilla's mean
    v = summaries["vanilla"]
    lines = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert sorted(round(float(ln.get_xdata()[0] if ln.get_xdata()[0] == ln.get_xdata()[1] else ln.get_ydata()[0]), 6)
                  for ln in lines) == sorted([round(v.stat("pass")[0], 6), round(v.stat("hack")[0], 6)])
    assert_legend_clear(fig)
    plt.close(fig)


def test_pareto_start_inside_when_it_is_near(tmp_path):
    runs = find_runs(make_runs(tmp_path / "exp", start=(0.57, 0.35)))
    fig = draw_pareto(summarize(runs))
    assert "step 0: before training (3 seeds)" in legend_texts(fig)
    x0, x1 = fig.axes[0].get_xlim()
    y0, y1 = fig.axes[0].get_ylim()
    assert x0 < 35 < x1 and y0 < 57 < y1
    assert not [t for t in fig.axes[0].texts if t.get_text().startswith("step 0")]  # no off-axes pointer
    plt.close(fig)


def test_paired_and_trajectories_label_every_arm_below_the_axes(runs):
    an = stats.analyze(runs)
    fig = draw_paired_steps(an.per_step)
    texts = legend_texts(fig)
    assert texts == [f"{label(a)} (n=3)" for a in summarize(runs) if a != "vanilla"]
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() not in ("None", None, "")]
    assert len({(ln.get_color(), ln.get_marker()) for ln in lines}) == len(ARMS) - 1
    for ax in fig.axes:  # every mean and CI bound inside the panel
        lo, hi = ax.get_ylim()
        for ln in ax.get_lines():
            assert all(lo <= y <= hi for y in ln.get_ydata())
    assert_legend_clear(fig)
    plt.close(fig)
    fig = draw_trajectories(summarize(runs))
    assert legend_texts(fig) == [f"{label(a)} (n=3)" for a in summarize(runs)]
    assert_legend_clear(fig)
    plt.close(fig)


@pytest.mark.parametrize("values, want", [([30.0, 35.0], (26.7, 38.3)),  # 10 pp wide at least, 8 % padding
                                          ([0.0, 1.0], (-2.0, 9.6)), ([95.0, 100.0], (90.4, 102.0))])  # kept in -2..102
def test_zoomed_limits(values, want):
    lo, hi = zoomed_limits(values)
    assert lo == pytest.approx(want[0], abs=0.05) and hi == pytest.approx(want[1], abs=0.05)


# ---------------------------------------------------------------- figures from a report's CSVs
def test_report_csvs_rebuild_the_same_numbers_and_figures(tmp_path, runs):
    exp = tmp_path / "exp"
    build_report(exp, tmp_path / "report", plots=False)
    rebuilt = runs_from_report(tmp_path / "report")
    assert [(r.arm, r.seed, [e["step"] for e in r.evals]) for r in rebuilt] == \
        [(r.arm, r.seed, [e["step"] for e in r.evals]) for r in runs]
    for a, b in zip(rebuilt, runs):
        for ea, eb in zip(a.evals, b.evals):
            assert ea["hack_strict"] == pytest.approx(eb["hack_strict"], abs=1e-12)
            assert ea["pass_rate"] == pytest.approx(eb["pass_rate"], abs=1e-12)
    ours = {(p.arm, p.metric, p.at): p.mean for p in stats.analyze(rebuilt).per_step}
    theirs = {(p.arm, p.metric, p.at): p.mean for p in stats.analyze(runs).per_step}
    assert ours.keys() == theirs.keys() and all(ours[k] == pytest.approx(theirs[k], abs=1e-9) for k in ours)
    figs = redraw_figures(tmp_path / "report", tmp_path / "figs")
    assert sorted(figs) == ["paired_diff", "pareto", "trajectories"]
    assert all(p.stat().st_size > 10_000 for p in figs.values())


@pytest.mark.parametrize("name", ["toy-200-8seeds", "toy-200-exploratory"])
def test_committed_results_csvs_reproduce_their_paired_csv(name):
    """The regenerated docs/results figures draw exactly the per-step numbers the report published."""
    folder = REPO / "docs" / "results" / name
    got = {(p.arm, p.metric, p.at): p for p in stats.analyze(runs_from_report(folder)).per_step}
    rows = [r for r in csv.DictReader((folder / "paired.csv").open()) if r["at"].isdigit()]
    assert rows and len(rows) == len(got)
    for r in rows:
        p = got[(r["arm"], r["metric"], r["at"])]
        assert p.n == int(r["n_pairs"])
        assert p.mean == pytest.approx(float(r["mean"]), abs=1e-9)
        assert p.t_ci[0] == pytest.approx(float(r["t_lo"]), abs=1e-9)


def test_figures_need_per_step_csv(tmp_path):
    with pytest.raises(ReportCsvError, match="per_step.csv not found"):
        runs_from_report(tmp_path)
