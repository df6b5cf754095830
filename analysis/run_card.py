"""What a person wants when one run ends: a short per-step table, a trajectory PNG, where things are.

`rankguard train`, `rankguard up` and `scripts/demo.sh` print it; `rankguard summary RUN_DIR` prints it
for any run (finished or not). Training rows are noisy (3 prompts x 8 samples per step on the toy), so
the table shows means over windows of steps; evaluation rows (held-out problems) are shown as they are.
"""
from __future__ import annotations

from pathlib import Path

from analysis.rundata import read_jsonl


def _pct(v) -> str:
    return "    -" if v is None else f"{100 * v:5.1f}"


def _windows(rows: list[dict], n_windows: int) -> list[list[dict]]:
    size = max(1, -(-len(rows) // n_windows))
    return [rows[i: i + size] for i in range(0, len(rows), size)]


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def step_table(run_dir: Path, n_windows: int = 8) -> str:
    """Per window of training steps: mean reward, pass %, strict and loose hack %; then the evaluations."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "evals.jsonl")
    lines = ["training (mean over the steps of each window; strict hack = a loophole paid, hidden tests failed)",
             "   steps    reward  pass %  hack %  loose %"]
    for w in _windows(rows, n_windows):
        r = _mean(w, "reward_mean")
        lines.append(f"{w[0]['step'] + 1:4d}-{w[-1]['step'] + 1:<4d} {'-' if r is None else f'{r:8.2f}'}  "
                     f"{_pct(_mean(w, 'pass_rate'))}   {_pct(_mean(w, 'hack_strict'))}    {_pct(_mean(w, 'hack_loose'))}")
    if evals:
        lines += ["evaluation (held-out problems, adapter in eval mode)", "    step          pass %  hack %  loose %"]
        for e in evals:
            lines.append(f"{e['step']:8d}          {_pct(e.get('pass_rate'))}   {_pct(e.get('hack_strict'))}    "
                         f"{_pct(e.get('hack_loose'))}")
    return "\n".join(lines)


def plot_run(run_dir: Path, path: Path | None = None) -> Path | None:
    """trajectory.png: training hack/pass (raw and 10-step mean) with the evaluations on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(run_dir / "metrics.jsonl")
    if not rows:
        return None
    evals = read_jsonl(run_dir / "evals.jsonl")
    path = path or run_dir / "trajectory.png"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    steps = [r["step"] + 1 for r in rows]
    for key, color, name in (("hack_strict", "#d62728", "hack (strict)"), ("pass_rate", "#1f77b4", "pass")):
        vals = [100 * (r.get(key) or 0.0) for r in rows]
        smooth = [sum(vals[max(0, i - 9): i + 1]) / len(vals[max(0, i - 9): i + 1]) for i in range(len(vals))]
        ax.plot(steps, vals, color=color, alpha=0.2, lw=0.8)
        ax.plot(steps, smooth, color=color, lw=2, label=f"train {name}, 10-step mean")
        if evals:
            ax.plot([e["step"] for e in evals], [100 * (e.get(key) or 0.0) for e in evals], color=color, ls="--",
                    marker="o", ms=5, label=f"eval {name} (held-out)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("% of completions")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{run_dir.name}: reward hacking vs honest passing", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _tracking_lines(run_dir: Path) -> list[str]:
    """Where the run's trackers write (from its config.json); a run without a readable config has none."""
    from learner.tracking import tracking_lines
    from shared.config import ConfigError
    from shared.rundir import read_config

    try:
        cfg = read_config(run_dir / "config.json")
    except (ConfigError, OSError):
        return []
    lines = tracking_lines(cfg.tracking, run_dir)
    return lines or ["off (--report-to none); metrics.jsonl holds every row"]


def run_card(run_dir: str | Path, next_hint: bool = True) -> str:
    """The text printed when a run ends: table, where the files are, the next command."""
    run_dir = Path(run_dir)
    png = plot_run(run_dir)
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[-1])
                   if p.name.split("-")[-1].isdigit() else -1)
    out = [step_table(run_dir), "", f"run dir     {run_dir}",
           f"metrics     {run_dir / 'metrics.jsonl'} (per step), {run_dir / 'evals.jsonl'} (per evaluation)"]
    if png is not None:
        out.append(f"plot        {png}")
    where = f" in {run_dir / 'checkpoints'}" if ckpts else ""
    out.append(f"checkpoints {', '.join(p.name for p in ckpts) if ckpts else 'none yet'}{where}")
    out += [f"tracking    {line}" for line in _tracking_lines(run_dir)]
    if (run_dir / "logs").is_dir():
        out.append(f"logs        {run_dir / 'logs'}/*.log (rankguard logs -f learner --run-dir {run_dir})")
    if next_hint:
        out += ["", "next: the preregistered comparison (5 arms x 8 seeds, paired statistics, verdicts):",
                "  rankguard experiment --preset toy --arms vanilla,projected,projected_nomag,rebound,weak "
                "--seeds 8 --steps 200 --out runs/exp-toy"]
    return "\n".join(out)
