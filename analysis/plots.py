"""Report figures (matplotlib Agg): Pareto plot of hack % vs pass %, trajectories, projection diagnostics,
paired differences vs vanilla over steps.

Pareto: one point per (arm × seed) at its last evaluation, the non-dominated frontier (higher pass,
lower hack) drawn as a step line, arm means with SEM error bars, Rebound annotated. Good = bottom
right. Trajectories: mean ± SEM band across seeds per arm versus step.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.hypotheses import mean_sem  # noqa: E402
from analysis.rundata import ArmSummary  # noqa: E402
from analysis.rundata import label as _label  # noqa: E402
from analysis.stats import Paired  # noqa: E402

ARM_COLORS = {"vanilla": "#444444", "projected": "#1f77b4", "projected_nomag": "#17becf",
              "rebound": "#d62728", "weak": "#2ca02c", "route": "#9467bd", "control": "#000000"}
ARM_MARKERS = {"vanilla": "s", "projected": "o", "projected_nomag": "D", "rebound": "^", "weak": "v", "route": "P",
               "control": "*"}
# exploratory arms: distinct colours and markers, the same arm alike in every plot of a report
EXTRA_COLORS = ["#8c564b", "#e377c2", "#bcbd22", "#ff7f0e", "#7f7f7f", "#aec7e8", "#98df8a", "#ff9896",
                "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79"]
EXTRA_MARKERS = ["X", "*", "h", "<", ">", "d", "p", "8"]


_SEEN: dict[str, int] = {}  # exploratory arm -> slot, in order of first appearance (stable within a report)


def _slot(arm: str, n: int) -> int:
    return _SEEN.setdefault(arm, len(_SEEN)) % n


def color_of(arm: str) -> str:
    return ARM_COLORS.get(arm) or EXTRA_COLORS[_slot(arm, len(EXTRA_COLORS))]


def marker_of(arm: str) -> str:
    return ARM_MARKERS.get(arm) or EXTRA_MARKERS[_slot(arm, len(EXTRA_MARKERS))]


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-dominated (pass, hack) points (maximise pass, minimise hack), sorted by pass ascending."""
    front, best_hack = [], math.inf
    for p, h in sorted(points, key=lambda t: (-t[0], t[1])):
        if h < best_hack:
            front.append((p, h))
            best_hack = h
    return sorted(front)


def plot_pareto(summaries: dict[str, ArmSummary], path: Path,
                step0: tuple[float, float] | None = None) -> Path:
    """`step0` = (pass %, hack %) of the initial policy, mean over seeds: a reference point (issue #23), as
    is the `control` arm (every loophole closed) when the grid has it."""
    fig, ax = plt.subplots(figsize=(7.5, 5.8), dpi=120)
    all_pts = []
    if step0 is not None and None not in step0:
        ax.scatter([step0[0]], [step0[1]], marker="o", s=110, facecolors="none", edgecolors="#000000", linewidths=1.6,
                   label="step 0 (initial policy)", zorder=6)
    for i, (arm, s) in enumerate(summaries.items()):
        pts = [(p, h) for p, h in zip(s.values["pass"], s.values["hack"]) if p is not None and h is not None]
        all_pts += pts
        c, mk = color_of(arm), marker_of(arm)
        if pts:
            ax.scatter([p for p, _ in pts], [h for _, h in pts], color=c, marker=mk, alpha=0.45, s=40,
                       edgecolors=c, linewidths=0.8)
        pm, ps, _ = mean_sem([p for p, _ in pts])
        hm, hs, _ = mean_sem([h for _, h in pts])
        if pm is None:
            continue
        ms = max(5.0, 13.0 - 1.6 * i)  # earlier arms drawn larger, so coinciding means stay visible (nested)
        ax.errorbar(pm, hm, xerr=ps or 0, yerr=hs or 0, color=c, marker=mk, ms=ms, mec="white", mew=1.2,
                    capsize=4, lw=1.5, alpha=0.9, label=f"{_label(arm)} (n={len(pts)})", zorder=5)
        if arm == "rebound":
            ax.annotate("Rebound", (pm, hm), xytext=(14, 14), textcoords="offset points", color=c,
                        fontweight="bold", arrowprops=dict(arrowstyle="->", color=c))
    front = pareto_frontier(all_pts)
    if len(front) >= 1:
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color="#999999", ls="--", lw=1.2, label="Pareto frontier (all seeds)",
                zorder=1)
    lo = min([0.0] + [v for pt in all_pts for v in pt])
    hi = max([100.0 if not all_pts else max(v for pt in all_pts for v in pt) + 5.0, 10.0])
    ax.set_xlim(lo - 2, min(hi, 102))
    ax.set_ylim(lo - 2, min(hi, 102))
    ax.set_xlabel("Pass % on held-out problems (gt only) →  better")
    ax.set_ylabel("Strict hack %, any mode  (lower is better)")
    ax.set_title("Hack vs pass at the last evaluation (better: bottom right)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _series(runs, rows_of, key: str, scale: float) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean, SEM (0 where n = 1) of `key` across runs, over the steps any run logged."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for row in rows_of(r):
            v = row.get(key)
            if v is None or "step" not in row or not math.isfinite(float(v)):
                continue
            by_step.setdefault(int(row["step"]), []).append(scale * float(v))
    steps = sorted(by_step)
    means, sems = [], []
    for st in steps:
        m, s, _ = mean_sem(by_step[st])
        means.append(m)
        sems.append(s or 0.0)
    return steps, means, sems


def _band_panel(ax, summaries, rows_of, key: str, scale: float, ylabel: str, title: str) -> bool:
    drew = False
    for i, (arm, s) in enumerate(summaries.items()):
        steps, m, e = _series(s.runs, rows_of, key, scale)
        if not steps:
            continue
        drew = True
        c = color_of(arm)
        # earlier arms drawn wider underneath, so coinciding curves stay visible
        ax.plot(steps, m, color=c, marker=marker_of(arm) if len(steps) <= 12 else None,
                ms=max(3.0, 7.0 - i), lw=max(1.2, 3.6 - 0.5 * i), label=f"{_label(arm)} (n={s.n})", zorder=2 + i)
        ax.fill_between(steps, [a - b for a, b in zip(m, e)], [a + b for a, b in zip(m, e)], color=c, alpha=0.18,
                        lw=0)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if not drew:
        ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center", transform=ax.transAxes, color="#888")
    return drew


def plot_trajectories(summaries: dict[str, ArmSummary], path: Path) -> Path:
    """Hack % and pass % at each evaluation, per arm, mean ± SEM band across seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    evals = lambda r: r.evals  # noqa: E731
    _band_panel(axes[0], summaries, evals, "hack_strict", 100.0, "strict hack %, any mode", "Hack rate (↓)")
    _band_panel(axes[1], summaries, evals, "pass_rate", 100.0, "pass % (held-out, gt only)", "Pass rate (↑)")
    for ax in axes:
        ax.set_ylim(-3, 103)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle("Evaluations vs training step (mean ± SEM across seeds)")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * -(-len(handles) // 4) if handles else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_diagnostics(summaries: dict[str, ArmSummary], path: Path) -> Path:
    """Projection diagnostics per training step (metrics.jsonl): mean cos_align and frac fired."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    metrics = lambda r: r.metrics  # noqa: E731
    _band_panel(axes[0], summaries, metrics, "cos_mean", 1.0, "mean cos(g, v_hack)", "mean·cos per step")
    axes[0].axhline(0.2, color="#888", ls=":", lw=1)
    _band_panel(axes[1], summaries, metrics, "frac_fired", 1.0, "fraction of modules with cos > 0",
                "frac·fired per step")
    axes[1].axhline(0.4, color="#888", ls=":", lw=1)
    axes[1].set_ylim(-0.03, 1.03)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle("Projection diagnostics (dotted: 'active' thresholds 0.2 and 0.4)")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * -(-len(handles) // 4) if handles else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_paired_steps(per_step: list[Paired], path: Path) -> Path:
    """Paired difference arm − vanilla (pp) at each evaluation step: mean line, 95 % t-CI band (n >= 2)."""
    panels = [("hack", "Δ strict hack % (↓ better)"), ("pass", "Δ pass % (↑ better)"),
              ("safepass", "ΔSafePass (↑ better)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=110)
    for ax, (metric, title) in zip(axes, panels):
        by_arm: dict[str, list[Paired]] = {}
        for p in per_step:
            if p.metric == metric:
                by_arm.setdefault(p.arm, []).append(p)
        for i, (arm, ps) in enumerate(by_arm.items()):
            ps = sorted(ps, key=lambda p: int(p.at))
            c = color_of(arm)
            steps = [int(p.at) for p in ps]
            ax.plot(steps, [p.mean for p in ps], color=c, marker=marker_of(arm), ms=4,
                    lw=max(1.2, 2.6 - 0.4 * i), label=f"{_label(arm)} (n={max(p.n for p in ps)})", zorder=3 + i)
            band = [(int(p.at), *p.t_ci) for p in ps if p.n >= 2]
            if band:
                xs, lo, hi = zip(*band)
                ax.fill_between(xs, lo, hi, color=c, alpha=0.15, lw=0)
        ax.axhline(0.0, color="#444444", lw=1, ls="--")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("arm − vanilla, same seed (pp)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if not by_arm:
            ax.text(0.5, 0.5, "nothing to pair with vanilla", ha="center", va="center", transform=ax.transAxes,
                    color="#888")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle("Paired difference vs vanilla at each evaluation (mean, 95 % t-CI band over seeds; exploratory)")
    fig.tight_layout(rect=(0, 0.04 + 0.035 * -(-len(handles) // 4) if handles else 0, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path
