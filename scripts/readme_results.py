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

ARTIFACTS = ["report.md", "report.csv", "hack_modes.csv", "verdicts.json", "experiment.json",
             "pareto.png", "trajectories.png", "diagnostics.png"]


def section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    if not m:
        raise SystemExit(f"report.md has no section {title!r}")
    return m.group(1).strip()


def table(block: str) -> str:
    return "\n".join(line for line in block.splitlines() if line.startswith("|"))


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
    print(f"""`rankguard experiment --preset toy --arms {','.join(exp['arms'])} --seeds {len(exp['seeds'])}
--steps {exp['steps']} --mode {exp['mode']} --parallel {exp.get('parallel', 1)}` — every run through the real services
(private Redis, reward worker, rollout worker, learner) on the 2-core CPU machine: {runs_done} of
{len(exp['runs'])} runs finished, **{wall} wall** for the whole grid (prepare
{exp['prepare_s'] or 0:.0f} s; one run {min(walls):.0f}–{max(walls):.0f} s with {exp.get('parallel', 1)} at a time), git
`{(exp.get('git_commit') or '?')[:10]}`. Hack % is the strict rate (a loophole's check passed while the hidden tests
failed) on held-out problems at the last evaluation; mean ± SEM over seeds.

{table(section(report, 'Headline table'))}

Per mode (strict A–D, loose A–D):

{table(section(report, 'Hack rate per mode (%)'))}

Preregistered verdicts (spec thresholds; `{dst}/verdicts.json`):

{bullets}

![Pareto]({dst}/pareto.png)
![Trajectories]({dst}/trajectories.png)

Full report: [{dst}/report.md]({dst}/report.md).""")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
