"""Per-arm, per-kind table of an experiment folder's last evaluations (finished runs only; mean ± SEM over seeds).

    .venv/bin/python scripts/kinds_table.py runs/exp-toy2 > docs/results/toy2-200-8seeds/kinds.md

Complements `rankguard report` (analysis/report.py): pass / strict hack per toy problem kind, the deployed
policy's KL, route's training-policy columns, ||delta_S||, ||delta_Q|| and wall time per run.
"""
import json, sys, statistics as st
from pathlib import Path
root = Path(sys.argv[1])
exp = json.loads((root / "experiment.json").read_text())
walls = {}
for r in exp.get("runs", []):
    if r.get("status") == "finished" and r.get("wall_s"):
        walls.setdefault(r["arm"], []).append(r["wall_s"])
cols = ["pass_rate", "hack_strict", "pass_easy", "pass_partial", "pass_hard", "hack_strict_easy",
        "hack_strict_partial", "hack_strict_hard", "kl_deployed", "kl", "train_policy_pass_rate",
        "train_policy_hack_strict", "train_policy_kl", "delta_s_norm", "delta_q_norm"]
pct = {c for c in cols if c.startswith(("pass", "hack", "train_policy_pass", "train_policy_hack"))}
def cell(vals, c):
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals: return "—"
    m = st.mean(vals); s = st.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else 0.0
    return f"{100*m:.1f} ± {100*s:.1f}" if c in pct else f"{m:.3f} ± {s:.3f}"
print("| arm | n | step | " + " | ".join(cols) + " | wall s/run |")
print("|" + "---|" * (len(cols) + 4))
arms = list(exp.get("arms") or []) or sorted({r["arm"] for r in exp.get("runs", [])})
step0 = None
for arm in arms:
    rows = []
    for d in sorted((root / arm).glob("seed*")):
        if not (d / "DONE").exists(): continue
        ev = [json.loads(l) for l in open(d / "evals.jsonl")]
        rows.append(ev[-1]); step0 = step0 or ev[0]
    if not rows: continue
    w = walls.get(arm, [])
    print(f"| {arm} | {len(rows)} | {rows[0]['step']} | " + " | ".join(cell([r.get(c) for r in rows], c) for c in cols)
          + (f" | {st.mean(w):.0f} |" if w else " | — |"))
if step0:
    print("| step 0 (every arm) | | 0 | " + " | ".join(cell([step0.get(c)], c) for c in cols) + " | |")
