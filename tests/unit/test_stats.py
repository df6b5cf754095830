"""Exploratory statistics of the report (analysis.stats) on synthetic run folders with known per-seed
numbers: paired means and CIs (t against scipy, bootstrap against exact percentiles), unpaired seeds,
hack AUC, training-hack crossing steps and censoring, seeds needed against published power tables,
the per-seed CSV round trip, the paired plot, and `rankguard report` end to end as a subprocess."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from analysis import stats as S
from analysis.report import build_report
from analysis.rundata import find_runs
from shared.config import resolve_config

N_EVAL = 128
REPO = Path(__file__).resolve().parents[2]


def write_run(root: Path, arm: str, seed: int, evals: dict[int, tuple[float, float]],
              train: list[float] | None = None, folder: str | None = None, done: bool = True) -> Path:
    """A run folder as the trainer writes it: evals.jsonl rows {step: (hack, pass)} (fractions, n = 128),
    metrics.jsonl with one row per training step (0-based index) whose hack_strict is train[i]."""
    run_dir = root / (folder or arm) / f"seed{seed}"
    cfg = resolve_config("toy", [f"train.arm={arm}", f"train.seed={seed}", f"train.steps={max(evals)}"],
                         run_dir=str(run_dir))
    cfg.save()
    with open(run_dir / "evals.jsonl", "w") as f:
        for step, (h, p) in sorted(evals.items()):
            f.write(json.dumps({"step": step, "hack_strict": h, "pass_rate": p, "hack_loose": h, "n": N_EVAL,
                                **{f"hack_strict_{m}": h / 4 for m in "ABCD"}}) + "\n")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for i, h in enumerate(train if train is not None else [0.0] * max(evals)):
            f.write(json.dumps({"step": i, "hack_strict": h, "pass_rate": 0.3, "loss": 0.1}) + "\n")
    if done:
        (run_dir / "DONE").write_text("ok\n")
    return run_dir


def k(n: int) -> float:
    """n samples of 128 as a rate (evals are counts over 32 problems × 4 samples)."""
    return n / N_EVAL


# last-eval counts per seed (of 128): vanilla hack 80, 90, 70, 100; ours 70, 86, 58, 94
# -> Δ = -10, -4, -12, -6 samples (×100/128 pp)
VAN_HACK, OURS_HACK = [80, 90, 70, 100], [70, 86, 58, 94]
VAN_PASS, OURS_PASS = [40, 36, 44, 30], [42, 36, 47, 33]


def ramp(offset: int, slope: float = 0.01, n: int = 100, cap: float = 1.0) -> list[float]:
    """Training hack rate at row i = min(cap, max(0, (i - offset) * slope)); linear, so a centred mean keeps it."""
    return [min(cap, max(0.0, (i - offset) * slope)) for i in range(n)]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    for s in range(4):
        # vanilla crosses 50 % at row 50 (step 51) on seeds 0, 1; seed 2 never (cap 0.4); seed 3 at step 51
        write_run(root, "vanilla", s, {0: (0.0, k(30)), 50: (k(40), k(35)), 100: (k(VAN_HACK[s]), k(VAN_PASS[s]))},
                  ramp(0, cap=0.4) if s == 2 else ramp(0))
        # ours: seed 0 crosses 10 steps later; seed 1 never (censored at 100, vanilla crossed: later);
        # seed 2 never (both censored: undetermined); seed 3 crosses 10 steps EARLIER
        train = {0: ramp(10), 1: ramp(0, cap=0.45), 2: ramp(0, cap=0.3), 3: ramp(-10)}[s]
        write_run(root, "projected", s, {0: (0.0, k(30)), 50: (k(30), k(35)), 100: (k(OURS_HACK[s]), k(OURS_PASS[s]))},
                  train)
    # rebound: seeds 0..2 only (vanilla's seed 3 unpaired) plus a seed 7 vanilla lacks
    for s in (0, 1, 2, 7):
        write_run(root, "rebound", s, {0: (0.0, k(30)), 100: (k(75), k(40))})
    return root, build_report(root)


def paired(res, arm: str, metric: str, at: str = "last") -> S.Paired:
    return next(p for p in res["analysis"].last + res["analysis"].per_step
                if p.arm == arm and p.metric == metric and p.at == at)


def test_paired_last_eval_means_and_t_ci_match_scipy(grid):
    _, res = grid
    d = 100 * (np.array(OURS_HACK) - np.array(VAN_HACK)) / N_EVAL
    p = paired(res, "projected", "hack")
    assert p.n == 4 and p.values == pytest.approx(list(d))
    assert p.mean == pytest.approx(d.mean()) and p.sd == pytest.approx(d.std(ddof=1))
    ci = sps.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert p.t_ci == pytest.approx((ci.low, ci.high))
    half = sps.t.ppf(0.975, 3) * d.std(ddof=1) / 2  # by hand: t(0.975, 3)·SD/√4
    assert p.t_ci == pytest.approx((d.mean() - half, d.mean() + half))
    dp = 100 * (np.array(OURS_PASS) - np.array(VAN_PASS)) / N_EVAL
    assert paired(res, "projected", "pass").mean == pytest.approx(dp.mean())
    sp = paired(res, "projected", "safepass")
    assert sp.values == pytest.approx(list(dp - d))  # ΔSafePass = Δpass − Δhack, seed by seed
    assert sp.n_needed == S.seeds_needed(sp.mean, sp.sd)


def test_bootstrap_ci_is_exact_where_the_distribution_is():
    # two values: resampled means are a, (a+b)/2, b with 1/4, 1/2, 1/4 -> 2.5 / 97.5 percentiles are a and b
    assert S.bootstrap_ci([-3.0, 5.0]) == (-3.0, 5.0)
    # four values, two of each: mean = -10 + 5·K/4, K ~ Binomial(4, 1/2); P(K=0) = 1/16 > 2.5 %
    assert S.bootstrap_ci([-10.0, -5.0, -10.0, -5.0]) == (-10.0, -5.0)
    x = np.random.default_rng(3).normal(2.0, 1.0, 12)
    lo, hi = S.bootstrap_ci(x)
    assert (lo, hi) == S.bootstrap_ci(x)  # fixed RNG seed: the same numbers every time
    assert x.min() < lo < x.mean() < hi < x.max()
    tl, th = S.t_ci(x)
    assert abs(lo - tl) < 0.3 and abs(hi - th) < 0.3  # 12 normal values: close to the t interval
    assert S.bootstrap_ci([1.0]) == (None, None) and S.t_ci([1.0]) == (None, None)


def test_unpaired_seeds_are_counted_not_imputed(grid):
    root, res = grid
    p = paired(res, "rebound", "hack")
    assert p.n == 3 and sorted(p.diffs) == [0, 1, 2] and p.only_arm == [7] and p.only_ref == [3]
    expected = [100 * (75 - VAN_HACK[s]) / N_EVAL for s in range(3)]
    assert p.values == pytest.approx(expected)
    md = (root / "report.md").read_text()
    assert "- Rebound (d): 3 seeds paired; the arm lacks seed 3; vanilla lacks seed 7 (left unpaired)." in md


def test_every_evaluation_step_is_paired(grid):
    _, res = grid
    mid = paired(res, "projected", "hack", "50")
    assert mid.n == 4 and mid.values == pytest.approx([100 * (30 - 40) / N_EVAL] * 4)
    assert mid.sd == 0.0 and mid.t_ci == pytest.approx((mid.mean, mid.mean))
    assert paired(res, "projected", "hack", "100").values == paired(res, "projected", "hack").values
    assert not any(p.arm == "rebound" and p.at == "50" for p in res["analysis"].per_step)  # rebound has no step 50
    rows = list(csv.DictReader(open(res["paired_csv"])))
    row = next(r for r in rows if r["arm"] == "projected" and r["metric"] == "hack" and r["at"] == "50")
    assert float(row["mean"]) == pytest.approx(-1000 / N_EVAL) and row["n_pairs"] == "4"


def test_hack_auc_trapezoid_normalised_by_span(tmp_path):
    # 0, 20, 40, 60 % at steps 0, 25, 50, 100: (25·10 + 25·30 + 50·50) / 100 = 35
    write_run(tmp_path, "vanilla", 0, {0: (0.0, 0.3), 50: (0.4, 0.3), 100: (0.6, 0.3)})
    write_run(tmp_path, "projected", 0, {0: (0.0, 0.3), 25: (0.2, 0.3), 50: (0.4, 0.3), 100: (0.6, 0.3)})
    runs = find_runs(tmp_path)
    van, ours = runs
    assert S.hack_auc(ours) == pytest.approx(35.0)
    assert S.hack_auc(van) == pytest.approx((50 * 20 + 50 * 50) / 100)  # 35 too, from 3 points
    assert S.hack_auc(ours, [0, 50, 100]) == pytest.approx(35.0)
    assert S.hack_auc(ours, [50]) is None
    an = S.analyze(runs)
    auc = next(p for p in an.last if p.metric == "hack_auc")
    assert auc.values == [pytest.approx(0.0)]  # compared over the steps both have (0, 50, 100)
    assert next(r for r in an.seeds if r.arm == "projected").auc == pytest.approx(35.0)


def test_crossing_steps_and_censoring(grid):
    _, res = grid
    an = res["analysis"]
    runs = {(r.arm, r.seed): r for r in an.seeds}
    assert runs["vanilla", 0].cross50.step == 51  # row 50 reaches 0.5: 51 steps completed
    assert runs["projected", 0].cross50.step == 61 and runs["projected", 3].cross50.step == 41
    c = runs["projected", 1].cross50
    assert c.censored and c.last_step == 100 and c.text() == "> 100"
    x = next(c for c in an.crossings if c.arm == "projected" and c.name == "cross50")
    assert x.exact.diffs == {0: 10.0, 3: -10.0}
    assert x.later == [1] and x.undetermined == [2] and x.earlier == []
    assert (x.n_later, x.n_earlier) == (2, 1)
    assert x.sign_p == pytest.approx(sps.binomtest(2, 3, 0.5).pvalue)
    # plateau: vanilla's mean training hack over the last 50 steps, mean over seeds
    last50 = [np.mean(ramp(0, cap=0.4 if s == 2 else 1.0)[-50:]) for s in range(4)]
    assert an.plateau == pytest.approx(100 * np.mean(last50))
    assert an.thresholds["cross_plateau"] == pytest.approx(0.8 * an.plateau)
    th = an.thresholds["cross_plateau"] / 100  # the ramp reaches it at row ceil(100·th)
    assert runs["vanilla", 0].cross_plateau.step == math.ceil(round(100 * th, 9)) + 1


def test_centred_mean_and_a_jump():
    assert S.centred_mean([0, 0, 0, 3, 0, 0, 0], 3) == pytest.approx([0, 0, 1, 1, 1, 0, 0])
    assert S.centred_mean([2, 4], 11) == pytest.approx([3, 3])  # truncated at the ends
    # a jump at row 40 (0 -> 100 %): the 11-step centred mean passes 50 % once 6 of 11 rows are high: row 40
    steps, vals = list(range(1, 81)), [0.0] * 40 + [100.0] * 40
    sm = S.centred_mean(vals)
    assert next(s for s, v in zip(steps, sm) if v >= 50) == 41


@pytest.mark.parametrize("dz, n", [(0.2, 199), (0.5, 34), (0.8, 15), (1.0, 10)])  # G*Power, paired t, α .05, 80 %
def test_seeds_needed_matches_power_tables(dz, n):
    assert S.seeds_needed(dz * 3.0, 3.0) == n
    assert S.seeds_needed(-dz * 3.0, 3.0) == n  # two-sided: the sign does not matter
    assert S.paired_t_power(n, dz, 1.0) >= 0.8 > S.paired_t_power(n - 1, dz, 1.0)
    z = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) / dz  # normal approximation n ≈ ((z_.975 + z_.8)/dz)²
    assert 0 <= n - z * z <= 3


def test_seeds_needed_edge_cases():
    assert S.seeds_needed(0.0, 2.0) == math.inf
    assert S.seeds_needed(1.0, None) is None
    assert S.seeds_needed(1.0, 0.0) == 2


def test_power_line_in_the_report(grid):
    root, res = grid
    p = paired(res, "projected", "hack")
    md = (root / "report.md").read_text()
    n_obs, n_5 = S.seeds_needed(p.mean, p.sd), S.seeds_needed(5.0, p.sd)
    line = next(x for x in md.splitlines() if x.startswith("| Ours (b) | Hack % (last eval) |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:4] == ["4", f"{p.mean:+.1f}"]
    assert cells[-2:] == [str(n_obs), str(n_5)]
    assert "n seeds needed (observed Δ)" in md and "80 % power" in md


def test_per_seed_csv_round_trip(grid):
    _, res = grid
    an = res["analysis"]
    rows = list(csv.DictReader(open(res["per_seed_csv"])))
    assert len(rows) == len(an.seeds) == 4 + 4 + 4
    for r, s in zip(rows, an.seeds):
        assert (r["arm"], int(r["seed"])) == (s.arm, s.seed)
        assert float(r["hack"]) == pytest.approx(s.hack) and float(r["pass"]) == pytest.approx(s.pass_)
        assert int(r["hack_count"]) == s.count(s.hack) and r["n_eval"] == "128"
        assert float(r["hack_auc"]) == pytest.approx(s.auc)
        assert (r["cross50_step"] or None) == (None if s.cross50.step is None else str(s.cross50.step))
        if s.arm != "vanilla" and s.dsafepass is not None:
            assert float(r["dsafepass"]) == pytest.approx(s.dsafepass)
    ours1 = next(r for r in rows if r["arm"] == "projected" and r["seed"] == "1")
    assert ours1["hack_count"] == str(OURS_HACK[1]) and ours1["cross50_step"] == "" and ours1["train_steps"] == "100"
    reb7 = next(r for r in rows if r["arm"] == "rebound" and r["seed"] == "7")
    assert reb7["dsafepass"] == ""  # no vanilla seed 7 to compare with


def test_report_sections_order_and_per_seed_counts(grid):
    root, _ = grid
    md = (root / "report.md").read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[:3] == ["## Headline table", "## Hack rate per mode (%)", "## Preregistered check (spec §7)"]
    assert heads[3:8] == ["## Separately preregistered: H5 (docs/prereg/2026-12-05-h5-route.md)",
                          "## Exploratory: every effect against its control (issue #23)",
                          "## Exploratory: paired differences vs vanilla (not preregistered)",
                          "## Exploratory: time-resolved hack metrics (not preregistered)", "## Per-seed values"]
    assert f"| Ours (b) | 1 | 100 | {100 * OURS_HACK[1] / N_EVAL:.1f} ({OURS_HACK[1]}/128) |" in md
    assert "| Ours (b) | 50 % | 2 | +0 |" in md  # two exact pairs: +10 and -10 steps
    assert "| 1 / 0 / 1 | 2 of 3 (p = 1.00) |" in md
    assert ("Vanilla's training strict hack rate (centred 11-step mean) first reaches 50 % at step 51, 51, > 100, 51 "
            "(seeds 0, 1, 2, 3)") in md
    assert "Ceiling arm `oracle`: not in this grid" in md
    assert "Pairing check: step-0 evaluations agree across arms in seeds 0, 1, 2, 3."  # seed 7: one arm only in md
    steps = list(csv.DictReader(open(root / "per_step.csv")))
    assert len(steps) == 4 * 3 + 4 * 3 + 4 * 2 and {"strict_A", "loose", "n"} <= set(steps[0])


def test_step0_mismatch_and_duplicates_are_reported(tmp_path):
    write_run(tmp_path, "vanilla", 0, {0: (0.0, 0.3), 10: (0.5, 0.3)})
    write_run(tmp_path, "projected", 0, {0: (0.1, 0.3), 10: (0.4, 0.3)})
    write_run(tmp_path, "projected", 0, {0: (0.1, 0.3), 10: (0.9, 0.3)}, folder="again")
    res = build_report(tmp_path, plots=False)
    md = res["report_md"].read_text()
    assert "**Pairing check failed**" in md and "seed 0" in md
    assert "Duplicate run projected/seed0" in md
    p = next(p for p in res["analysis"].last if p.metric == "hack")
    assert p.values == pytest.approx([40.0])  # the first in find_runs order (arm, seed, path): again/seed0


def test_paired_plot_is_written(grid):
    root, res = grid
    data = (root / "paired_diff.png").read_bytes()
    assert res["figures"]["paired_diff"] == root / "paired_diff.png"
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    import matplotlib.image as mpimg

    img = mpimg.imread(root / "paired_diff.png")
    assert img.shape[1] > 1000 and img[..., :3].std() > 0.05


def test_rankguard_report_cli_end_to_end(grid, tmp_path):
    root, _ = grid
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "services.cli", "report", str(root), "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "## Exploratory: paired differences vs vanilla" in r.stdout and "paired_diff.png" in r.stdout
    for name in ("report.md", "report.csv", "paired.csv", "per_seed.csv", "per_step.csv", "paired_diff.png"):
        assert (out / name).exists(), name
    assert (out / "per_seed.csv").read_text() == (root / "per_seed.csv").read_text()  # deterministic
    assert (out / "paired.csv").read_text() == (root / "paired.csv").read_text()


def test_readme_results_quotes_the_paired_sections(grid, tmp_path):
    root, _ = grid
    runs = [{"arm": a, "seed": s, "status": "finished", "wall_s": 10.0} for a in ("vanilla", "projected")
            for s in range(4)]
    (root / "experiment.json").write_text(json.dumps({
        "arms": ["vanilla", "projected", "rebound"], "seeds": [0, 1, 2, 3], "steps": 100, "mode": "inprocess",
        "wall_s": 600.0, "prepare_s": 5.0, "git_commit": "abc", "runs": runs}))
    docs = tmp_path / "docs"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "readme_results.py"), str(root), str(docs)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "every run in one process" in out and "**10.0 min wall**" in out
    assert "| Ours (b) | Hack % (last eval) | 4 |" in out  # the paired table
    assert "| Arm | step 0 | step 50 | step 100 |" in out  # per-step table
    assert "| Ours (b) | 50 % | 2 | +0 |" in out  # crossing table
    assert "- Vanilla's training strict hack rate" in out and "Ceiling arm `oracle`" in out
    for name in ("paired.csv", "per_seed.csv", "per_step.csv", "paired_diff.png", "report.md"):
        assert (docs / name).exists(), name


def test_without_vanilla_there_is_nothing_to_pair_but_per_seed_values_stay(tmp_path):
    write_run(tmp_path, "projected", 0, {0: (0.0, 0.3), 10: (0.25, 0.5)}, ramp(0, n=10))
    res = build_report(tmp_path)
    md = res["report_md"].read_text()
    assert "No arm to pair with vanilla" in md and res["analysis"].last == [] and res["analysis"].plateau is None
    assert "| Ours (b) | 0 | 10 | 25.0 (32/128) | 50.0 (64/128) | +25.0 | — | 12.5 | > 10 |" in md
    assert (tmp_path / "paired_diff.png").exists()
    assert list(csv.DictReader(open(res["paired_csv"]))) == []
