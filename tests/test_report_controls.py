"""Issue #23 in the report: direction-specific effects (arm − its random control), learning retained against
the no-loophole control with step 0 as reference, H5 as a separate preregistration, H1/H3/H4 untouched."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from analysis import hypotheses as H
from analysis.report import build_report
from analysis.stats import t_ci
from shared.arms import arm_overrides
from shared.config import resolve_config


def make_run(root: Path, arm: str, seed: int, step0: tuple[float, float], last: tuple[float, float],
             steps: int = 50) -> Path:
    """A finished run folder: evaluations at step 0 and at the last step (hack, pass fractions)."""
    run_dir = root / arm / f"seed{seed}"
    cfg = resolve_config("toy", [*arm_overrides(arm), f"train.seed={seed}", f"train.steps={steps}"],
                         run_dir=str(run_dir))
    cfg.save()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for st in range(steps):
            f.write(json.dumps({"step": st, "loss": 0.1, "hack_strict": last[0], "kl": 0.01}) + "\n")
    with open(run_dir / "evals.jsonl", "w") as f:
        for st, (h, p) in ((0, step0), (steps, last)):
            f.write(json.dumps({"step": st, "hack_strict": h, "pass_rate": p, "n": 128}) + "\n")
    (run_dir / "DONE").write_text("ok\n")
    return run_dir


STEP0 = (0.05, 0.40)
# seed -> (hack, pass) at the last evaluation
GRID = {
    "vanilla": [(0.60, 0.42), (0.64, 0.40), (0.62, 0.44), (0.66, 0.42)],
    "control": [(0.04, 0.60), (0.03, 0.62), (0.05, 0.58), (0.04, 0.64)],
    "route": [(0.20, 0.50), (0.22, 0.52), (0.18, 0.50), (0.24, 0.54)],
    "route+random": [(0.40, 0.46), (0.36, 0.48), (0.42, 0.48), (0.38, 0.52)],
    "projected": [(0.50, 0.42), (0.52, 0.44), (0.48, 0.42), (0.54, 0.46)],
    "rebound": [(0.55, 0.42), (0.57, 0.40), (0.53, 0.44), (0.59, 0.40)],
    "gt_penalty": [(0.02, 0.56), (0.03, 0.58), (0.02, 0.56), (0.01, 0.60)],
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    for arm, rows in GRID.items():
        for s, last in enumerate(rows):
            make_run(root, arm, s, STEP0, last)
    return root, build_report(root, plots=False)


def test_direction_specific_effect_is_arm_minus_its_random_control(report):
    root, res = report
    an = res["analysis"]
    hack = next(p for p in an.direction if p.metric == "hack")
    assert (hack.arm, hack.ref, hack.n) == ("route", "route+random", 4)
    want = [100 * (a[0] - b[0]) for a, b in zip(GRID["route"], GRID["route+random"])]
    assert hack.values == pytest.approx(want)
    assert hack.mean == pytest.approx(sum(want) / 4) and hack.t_ci == pytest.approx(t_ci(want))
    assert hack.n_needed is not None and hack.n_needed >= 2
    rows = list(csv.DictReader(open(root / "controls.csv")))
    got = next(r for r in rows if r["arm"] == "route" and r["metric"] == "hack")
    assert got["ref"] == "route+random" and float(got["mean"]) == pytest.approx(hack.mean)
    md = (root / "report.md").read_text()
    assert "every effect against its control" in md and "`route+random`" in md


def test_learning_retained_per_seed_against_control_and_step0(report):
    root, res = report
    rt = res["analysis"].retained["route"]
    want = {s: (100 * GRID["route"][s][1] - 40) / (100 * GRID["control"][s][1] - 40) for s in range(4)}
    assert rt.values == pytest.approx(want) and rt.no_headroom == []
    assert res["analysis"].retained["control"].values == pytest.approx({s: 1.0 for s in range(4)})
    assert res["analysis"].step0_rates[0] == pytest.approx({"hack": 5.0, "pass": 40.0})
    md = (root / "report.md").read_text()
    assert "Learning retained↑" in md and "Step-0 policy (reference) n=4" in md
    assert "Control: no loophole (honest frontier)" in md
    rows = list(csv.DictReader(open(root / "controls.csv")))
    assert any(r["arm"] == "route" and r["metric"] == "retained" for r in rows)


def test_h5_is_evaluated_separately(report):
    root, res = report
    h5 = json.loads((root / "verdict_h5.json").read_text())
    diffs = [100 * (b[0] - a[0]) for a, b in zip(GRID["route"], GRID["route+random"])]  # random − route: +18 pp
    assert h5["hypothesis"] == "H5" and h5["numbers"]["hack_diff_mean_pp"] == pytest.approx(sum(diffs) / 4)
    assert h5["verdict"] == H.CONFIRMED and "Qwen3-4B" in h5["note"]  # toy preset: computed, flagged as not H5's
    assert set(json.loads((root / "verdicts.json").read_text())) == {"H1", "H3", "H4"}


def test_exploratory_arms_do_not_change_preregistered_verdicts(tmp_path):
    spec_only, full = tmp_path / "spec", tmp_path / "full"
    for arm, rows in GRID.items():
        for s, last in enumerate(rows):
            if arm in ("vanilla", "projected", "rebound"):
                make_run(spec_only, arm, s, STEP0, last)
            make_run(full, arm, s, STEP0, last)
    a = json.loads((build_report(spec_only, plots=False)["verdicts_json"]).read_text())
    b = json.loads((build_report(full, plots=False)["verdicts_json"]).read_text())
    assert a == b


def test_check_h5_decisions():
    lr = {s: 0.8 for s in range(4)}
    ok = H.check_h5({s: 15.0 + s for s in range(4)}, lr, lr, 12.0, preset="full")
    assert ok.verdict == H.CONFIRMED and ok.note is None
    small = H.check_h5({0: 2.0, 1: 3.0, 2: 2.5, 3: 3.5}, lr, lr, 12.0)
    assert small.verdict == H.FALSIFIED and "CI upper bound" in small.reason
    worse = H.check_h5({s: -1.0 - s for s in range(4)}, lr, lr, 12.0)
    assert worse.verdict == H.FALSIFIED and "does not beat" in worse.reason
    unmatched = H.check_h5({s: 15.0 + s for s in range(4)}, {s: 0.2 for s in range(4)}, lr, 12.0)
    assert unmatched.verdict == H.INCONCLUSIVE and "not matched" in unmatched.reason
    assert H.check_h5({}, {}, {}, None).verdict == H.NOT_EVALUABLE
    flat = H.check_h5({s: 15.0 for s in range(4)}, lr, lr, 2.0)
    assert flat.verdict == H.NOT_EVALUABLE and "no honest headroom" in flat.reason
    few = H.check_h5({0: 15.0, 1: 16.0}, {0: 1, 1: 1}, {0: 1, 1: 1}, 12.0)
    assert few.verdict == H.NOT_EVALUABLE and "need 3" in few.reason


def test_report_without_controls_says_what_is_missing(tmp_path):
    for arm in ("vanilla", "route"):
        for s in range(2):
            make_run(tmp_path, arm, s, STEP0, GRID[arm][s])
    res = build_report(tmp_path, plots=False)
    md = (tmp_path / "report.md").read_text()
    assert "--controls" in md and "No `control` arm" in md
    assert res["verdict_h5"]["verdict"] == H.NOT_EVALUABLE
