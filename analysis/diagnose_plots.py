"""Rendering of a `rankguard diagnose` record: diagnose.md (tables, the verdict and its rule) and
diagnose.png. Reads only the record (thresholds and verdict headlines included), so it renders what
the diagnostic decided."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from .oracle import RECIPES, nanmean


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
    s, th = rec["summary"][main], rec["thresholds"]
    md = [f"# rankguard diagnose: `{rec['run_dir']}`", "",
          "**Exploratory, post-hoc** (issue #13 section 2): nothing here feeds the preregistered arms.", "",
          f"**Verdict ({main} v_oracle): {rec['verdict']['line']}**", ""]
    md += [f"With the {r} v_oracle: {rec['verdicts'][r]['line']}." for r in other] + [""]
    md += [recipe_line(rec), ""]
    md += [f"Rule (analysis/diagnose.py `verdict`): a direction sees the RL gradient when its mean |cos| is >= "
           f"{th['align_ratio']:g}x a random unit direction's of the same per-module size; v_hack and v_oracle are the same "
           f"direction when their median per-module cos >= {th['same_direction_cos']:g}; v_oracle is one direction when its "
           f"split-half and cross-checkpoint median cos >= {th['one_direction_cos']:g}; v_oracle needs >= "
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
                return nanmean([d.get(n) for n in ns])
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
    fig.suptitle(f"diagnose {rec['run_dir']} ({main} v_oracle): {rec['verdict']['headline']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


