"""Copy an experiment's report into docs/results/<name>/ and print the README's result section.

    python scripts/readme_results.py runs/exp-toy-200 docs/results/toy-200 > /tmp/section.md

The section quotes the report's tables and verdicts as they are; the prose paragraph "In words"
is written by hand afterwards (numbers from the same files).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

SMOOTH = 11  # analysis.stats.SMOOTH_WINDOW (this script reads report.md only, no project imports)

ARTIFACTS = ["report.md", "report.csv", "hack_modes.csv", "verdicts.json", "experiment.json", "paired.csv",
             "per_seed.csv", "per_step.csv", "pareto.png", "trajectories.png", "diagnostics.png", "paired_diff.png"]
PAIRED = "Exploratory: paired differences vs vanilla (not preregistered)"
TIMED = "Exploratory: time-resolved hack metrics (not preregistered)"


def section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    if not m:
        raise SystemExit(f"report.md has no section {title!r}")
    return m.group(1).strip()


def table(block: str) -> str:
    return tables(block)[0]


def tables(block: str) -> list[str]:
    """The markdown tables of a section, in order (a table = consecutive lines starting with '|')."""
    out, cur = [], []
    for line in block.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            out.append("\n".join(cur))
            cur = []
    if not out:
        raise SystemExit("report.md section has no table")
    return out


def bullets_of(block: str) -> str:
    return "\n".join(line for line in block.splitlines() if line.startswith("- "))


def main(runs: str, docs: str) -> None:
    src, dst = Path(runs), Path(docs)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    report = (src / "report.md").read_text()
    exp = json.loads((src / "experiment.json").read_text())
    verdicts = section(report, "Preregistered check (spec §7)")
    bullets = "\n".join(line for line in verdicts.splitlines() if line.startswith(("- **", "  Note")))
    runs_done = sum(r["status"] in ("finished", "skipped") for r in exp["runs"])
    walls = [r["wall_s"] for r in exp["runs"] if r.get("wall_s")] or [0.0]
    wall = f"{exp['wall_s'] / 60:.1f} min" if exp.get("wall_s") else "unfinished (no total)"
    how = ("every run through the real services\n(private Redis, reward worker, rollout worker, learner)"
           if exp["mode"] == "services" else "every run in one process (the same algorithm code)")
    par = exp.get("parallel", 1)
    paired, timed = section(report, PAIRED), section(report, TIMED)
    last_table, step_table = tables(paired)[:2]
    cross_table = tables(timed)[0]
    dyn = bullets_of(timed.split("Testbed dynamic range:")[-1])
    print(f"""`rankguard experiment --preset toy --arms {','.join(exp['arms'])} --seeds {len(exp['seeds'])}
--steps {exp['steps']} --mode {exp['mode']} --parallel {exp.get('parallel', 1)}` — {how}
on the 2-core CPU machine: {runs_done} of {len(exp['runs'])} runs finished, **{wall} wall** for the whole grid
(prepare {exp['prepare_s'] or 0:.0f} s; one run {min(walls):.0f}–{max(walls):.0f} s with {par} at a time), git
`{(exp.get('git_commit') or '?')[:10]}`. Hack % is the strict rate (a loophole's check passed while the hidden tests
failed) on held-out problems at the last evaluation; mean ± SEM over seeds.

{table(section(report, 'Headline table'))}

Per mode (strict A–D, loose A–D):

{table(section(report, 'Hack rate per mode (%)'))}

Preregistered verdicts (spec thresholds; `{dst}/verdicts.json`):

{bullets}

![Pareto]({dst}/pareto.png)
![Trajectories]({dst}/trajectories.png)

Exploratory, not preregistered — paired by seed (arm − vanilla of the same seed, pp; t and bootstrap 95 % CIs;
"n seeds needed" = seeds for 80 % power at α = 0.05 if the observed Δ and SD were true):

{last_table}

{bullets_of(paired)}

Hack % Δ at every evaluation step, mean [95 % CI (t)]:

{step_table}

![Paired difference over steps]({dst}/paired_diff.png)

When the training hack rate (centred {SMOOTH}-step mean) first reaches 50 % / 80 % of vanilla's plateau, arm − vanilla
in steps (censored runs: direction only):

{cross_table}

Testbed dynamic range:

{dyn}

Per-seed values (last eval, AUC, crossing steps): [{dst}/per_seed.csv]({dst}/per_seed.csv); every evaluation of
every run: [{dst}/per_step.csv]({dst}/per_step.csv).

Full report: [{dst}/report.md]({dst}/report.md).""")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
