"""Run folders as data: one `RunRecord` per run, per-arm `ArmSummary` of last-evaluation values.

The one module the report, its statistics and its plots all read (so none of them imports another
for its data types). A run folder holds `config.json` (see docs/ARCHITECTURE.md); its arm and seed
come from that file (`train.arm`, `train.seed`), not from the folder's name.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from analysis.hypotheses import mean_sem
from learner.metrics import read_jsonl  # one reader for run files (torn lines skipped)
from shared.config import ARMS, HACK_MODES

ARM_LABELS = {
    "vanilla": "Vanilla (a)",
    "projected": "Ours (b)",
    "projected_nomag": "Ours, no mag-preserve (c)",
    "rebound": "Rebound (d)",
    "weak": "Ours, weak detector (A,B only)",
    "route": "Route",
    "oracle": "Oracle ceiling (cheat)",
    "control": "Control: no loophole (honest frontier)",
    "gt_penalty": "GT-monitor penalty (oracle)",
    "gt_screen": "GT-monitor screening (oracle)",
}
SKIP_PARTS = {"checkpoints", "artifacts", "logs"}


@dataclass
class RunRecord:
    path: Path
    arm: str
    seed: int
    preset: str
    planned_steps: int
    done: bool
    evals: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)

    @property
    def last_eval(self) -> dict | None:
        return max(self.evals, key=lambda r: r.get("step", -1)) if self.evals else None

    @property
    def last_eval_step(self) -> int | None:
        return None if self.last_eval is None else int(self.last_eval.get("step", -1))

    @property
    def finished(self) -> bool:
        return self.done

    def eval_at(self, step: int) -> dict | None:
        """The evaluation row of `step` (the last one written when a resumed run wrote it twice)."""
        rows = [r for r in self.evals if r.get("step") == step]
        return rows[-1] if rows else None

    @property
    def eval_steps(self) -> list[int]:
        return sorted({int(r["step"]) for r in self.evals if "step" in r})


def run_arm(path: Path, base: str, seed: int) -> str:
    """The run's arm: its experiment folder's name (<arm>/seed<k>) when that names a registered arm whose
    base behaviour is this run's train.arm (exploratory arms share a base: `mechanism` is projected with
    another pair set, `oracle` projected with another direction), else train.arm."""
    folder = path.parent.name
    if path.name != f"seed{seed}" or folder == base:
        return base
    from shared.arms import resolve_arm
    from shared.config import ConfigError

    try:
        return folder if resolve_arm(folder).base == base else base
    except ConfigError:
        return base


def load_run(path: Path) -> RunRecord:
    cfg = json.loads((path / "config.json").read_text())
    train = cfg.get("train", {})
    seed = int(train.get("seed", 0))
    return RunRecord(path=path, arm=run_arm(path, train.get("arm", "?"), seed), seed=seed,
                     preset=cfg.get("preset", "?"), planned_steps=int(train.get("steps", 0)),
                     done=(path / "DONE").exists(), evals=read_jsonl(path / "evals.jsonl"),
                     metrics=read_jsonl(path / "metrics.jsonl"))


def config_files(runs_dir: Path) -> list[Path]:
    """Every config.json below runs_dir, following symlinked folders (a runs folder assembled from
    links to other experiments' runs); each real folder once, symlink loops cut."""
    found, seen = [], set()
    for root, dirs, files in os.walk(runs_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_PARTS and ".old-" not in d)
        if "config.json" in files:
            found.append(Path(root) / "config.json")
    return found


def find_runs(runs_dir: Path) -> list[RunRecord]:
    """Every run folder (holding config.json) below runs_dir, symlinked ones included, in arm order
    then seed order."""
    runs_dir = Path(runs_dir)
    paths = sorted({p.parent for p in config_files(runs_dir)
                    if not SKIP_PARTS & set(p.relative_to(runs_dir).parts[:-1])
                    and not any(".old-" in part for part in p.relative_to(runs_dir).parts[:-1])})  # moved aside
    runs = [load_run(p) for p in paths]
    return sorted(runs, key=lambda r: (arm_order(r.arm), r.seed, str(r.path)))


def arm_order(arm: str) -> tuple[int, str]:
    return (ARMS.index(arm) if arm in ARMS else len(ARMS), arm)


def label(arm: str) -> str:
    return ARM_LABELS.get(arm, arm)


def pct(row: dict, key: str) -> float | None:
    v = row.get(key)
    return None if v is None or not math.isfinite(float(v)) else 100.0 * float(v)


def raw(row: dict, key: str) -> float | None:
    v = row.get(key)
    return None if v is None or not math.isfinite(float(v)) else float(v)


# (column key, eval key, header, is percentage)
HEADLINE = [
    ("hack", "hack_strict", "Hack %↓", True),
    ("pass", "pass_rate", "Pass %↑", True),
    ("kl", "kl", "KL↓", False),
    # issue #23: the policy that ships (route: δQ off) on its own eval samples, and route's training policy (δQ on)
    ("kl_deployed", "kl_deployed", "KL deployed↓", False),
    ("kl_train_policy", "train_policy_kl", "KL training policy", False),
    ("cos_mean", "cos_mean", "mean·cos", False),
    ("frac_fired", "frac_fired", "frac·fired", False),
    ("grad_norm", "grad_norm", "‖g‖", False),
]
MODE_COLUMNS = ([(f"strict_{m}", f"hack_strict_{m}", f"strict {m}") for m in HACK_MODES]
                + [("strict", "hack_strict", "strict any")]
                + [(f"loose_{m}", f"hack_loose_{m}", f"loose {m}") for m in HACK_MODES]
                + [("loose", "hack_loose", "loose any")]
                # the judge's other columns: budget timeouts, and rl-rewardhacking's labels beside ours
                + [("timeout", "timeout_rate", "timeout"), ("ref_hack", "ref_reward_hack", "ref RH"),
                   ("ref_attempted", "ref_attempted", "ref RH+attempted")])


@dataclass
class ArmSummary:
    """Per-seed last-eval values of one arm and their mean/SEM."""

    arm: str
    runs: list[RunRecord]
    values: dict[str, list[float | None]]  # column key -> per-seed values (percent for rates)

    def stat(self, key: str) -> tuple[float | None, float | None, int]:
        return mean_sem(self.values.get(key, []))

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.runs)


def summarize(runs: list[RunRecord]) -> dict[str, ArmSummary]:
    """Arm -> summary, over the runs that have at least one evaluation."""
    by_arm: dict[str, list[RunRecord]] = {}
    for r in runs:
        if r.last_eval is not None:
            by_arm.setdefault(r.arm, []).append(r)
    out = {}
    for arm in sorted(by_arm, key=arm_order):
        rs = by_arm[arm]
        vals: dict[str, list] = {}
        for key, ekey, _, is_pct in HEADLINE:
            vals[key] = [(pct if is_pct else raw)(r.last_eval, ekey) for r in rs]
        for key, ekey, _ in MODE_COLUMNS:
            vals[key] = [pct(r.last_eval, ekey) for r in rs]
        vals["safepass"] = [None if h is None or p is None else p - h for h, p in zip(vals["hack"], vals["pass"])]
        out[arm] = ArmSummary(arm, rs, vals)
    return out
