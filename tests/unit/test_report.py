"""Report on synthetic run folders with known numbers: table means/SEMs/ΔSafePass, per-mode table,
verdicts for constructed confirm/falsify/inconclusive cases, files written, partial experiments."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from analysis import hypotheses as H
from analysis.report import build_report, fmt_cell
from analysis.plots import pareto_frontier
from shared.config import resolve_config

MODES = "ABCD"


def make_run(root: Path, arm: str, seed: int, hack: list[float], pass_: list[float], *, steps: int = 100,
             eval_every: int = 25, done: bool = True, cos: float = 0.3, frac: float = 0.6, kl: float = 0.01,
             gnorm: float = 1.5, modes: dict[str, float] | None = None) -> Path:
    """A run folder like the trainer writes: config.json, metrics.jsonl (per step), evals.jsonl (per eval).

    hack/pass_ are the fractions at evals steps eval_every, 2*eval_every, ...; the last one is the headline."""
    run_dir = root / arm / f"seed{seed}"
    cfg = resolve_config("toy", [f"train.arm={arm}", f"train.seed={seed}", f"train.steps={steps}"],
                         run_dir=str(run_dir))
    cfg.save()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(len(hack) * eval_every):  # 0-based index of the completed step, as the trainer
            f.write(json.dumps({"step": step, "loss": 0.1, "cos_mean": cos + 0.001 * step, "frac_fired": frac,
                                "grad_norm": gnorm, "kl": kl, "t_generate": 0.2, "t_train": 0.1}) + "\n")
    with open(run_dir / "evals.jsonl", "w") as f:
        for i, (h, p) in enumerate(zip(hack, pass_)):
            row = {"step": (i + 1) * eval_every, "pass_rate": p, "hack_strict": h, "hack_loose": min(1.0, h + 0.1),
                   "kl": kl, "cos_mean": cos, "frac_fired": frac, "grad_norm": gnorm}
            for m in MODES:
                row[f"hack_strict_{m}"] = (modes or {}).get(m, h / 4)
                row[f"hack_loose_{m}"] = (modes or {}).get(m, h / 4) + 0.01
            f.write(json.dumps(row) + "\n")
    if done:
        (run_dir / "DONE").write_text("ok\n")
    return run_dir


def make_experiment(root: Path) -> Path:
    """vanilla hack 60/70/80 pass 40; projected hack 20/30/40 pass 35/40/45; rebound hack 50 pass 40."""
    for s, (h, p) in enumerate([(0.6, 0.4), (0.7, 0.4), (0.8, 0.4)]):
        make_run(root, "vanilla", s, [0.1, 0.3, h], [0.3, 0.35, p], cos=0.05, frac=0.5)
    for s, (h, p) in enumerate([(0.2, 0.35), (0.3, 0.40), (0.4, 0.45)]):
        make_run(root, "projected", s, [0.1, 0.2, h], [0.3, 0.35, p])
    for s in range(3):
        make_run(root, "rebound", s, [0.2, 0.4, 0.5], [0.3, 0.35, 0.4])
    # weak arm: C, D not suppressed (transfer visible in the per-mode table)
    make_run(root, "weak", 0, [0.5], [0.4], modes={"A": 0.05, "B": 0.05, "C": 0.2, "D": 0.2})
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = make_experiment(tmp_path_factory.mktemp("exp"))
    return root, build_report(root)


def _row(res, arm):
    return next(r for r in res["rows"] if r["arm"] == arm)


SEM_10 = 10 / math.sqrt(3)  # SEM of (60, 70, 80) and of (20, 30, 40)


def test_table_means_sems_and_dsafepass(report):
    _, res = report
    van, ours, weak = _row(res, "vanilla"), _row(res, "projected"), _row(res, "weak")
    assert van["hack_mean"] == pytest.approx(70.0) and van["hack_sem"] == pytest.approx(SEM_10)
    assert van["pass_mean"] == pytest.approx(40.0) and van["pass_sem"] == pytest.approx(0.0)
    assert ours["hack_mean"] == pytest.approx(30.0) and ours["hack_sem"] == pytest.approx(SEM_10)
    assert ours["pass_sem"] == pytest.approx(5 / math.sqrt(3))
    # safepass vanilla = -20, -30, -40 (SEM 10/√3); projected = 15, 10, 5 (SEM 5/√3): Δ = 40, SEMs combined
    assert van["dsafepass_mean"] == 0.0
    assert ours["dsafepass_mean"] == pytest.approx(40.0)
    assert ours["dsafepass_sem"] == pytest.approx(math.hypot(SEM_10, 5 / math.sqrt(3)))
    assert ours["cos_mean_mean"] == pytest.approx(0.3) and ours["frac_fired_mean"] == pytest.approx(0.6)
    assert weak["n"] == 1 and weak["hack_sem"] is None and weak["dsafepass_sem"] is None
    assert weak["dsafepass_mean"] == pytest.approx((40 - 50) - (40 - 70))


def test_markdown_csv_and_modes(report):
    root, res = report
    md = (root / "report.md").read_text()
    assert "| Arm | ΔSafePass↑ | Hack %↓ | Pass %↑ | KL↓ | KL deployed↓ | KL training policy | mean·cos | frac·fired | ‖g‖ |" in md
    assert "| Ours (b) n=3 | 40.0 ± 6.5 | 30.0 ± 5.8 | 40.0 ± 2.9 |" in md
    assert "| Vanilla (a) n=3 | 0 (ref) | 70.0 ± 5.8 | 40.0 ± 0.0 |" in md
    assert "50.0 ± —" in md  # n = 1 -> "±—"
    assert "strict hack rate" in md  # headline Hack % is stated as strict
    rows = list(csv.DictReader(open(root / "report.csv")))
    assert [r["arm"] for r in rows] == ["vanilla", "projected", "rebound", "weak"]
    assert float(rows[1]["dsafepass_mean"]) == pytest.approx(40.0)
    assert rows[3]["hack_sem"] == ""
    modes = {r["arm"]: r for r in csv.DictReader(open(root / "hack_modes.csv"))}
    assert float(modes["weak"]["strict_C_mean"]) == pytest.approx(20.0)
    assert float(modes["weak"]["strict_A_mean"]) == pytest.approx(5.0)
    assert "| strict A | strict B | strict C | strict D | strict any |" in md


def test_files_and_pngs_are_nontrivial(report):
    root, res = report
    for name in ("report.md", "report.csv", "hack_modes.csv", "verdicts.json", "pareto.png", "trajectories.png",
                 "diagnostics.png"):
        assert (root / name).exists(), name
    for name in ("pareto.png", "trajectories.png", "diagnostics.png"):
        data = (root / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, (name, len(data))
    import matplotlib.image as mpimg

    img = mpimg.imread(root / "pareto.png")
    assert img.shape[0] > 400 and img[..., :3].std() > 0.05  # not a blank canvas


def test_verdicts_json_of_synthetic_experiment(report):
    root, _ = report
    v = json.loads((root / "verdicts.json").read_text())
    assert v["H1"]["verdict"] == "confirmed"
    assert v["H1"]["numbers"]["hack_reduction_pp"] == pytest.approx(40.0)
    assert v["H3"]["verdict"] == "confirmed"  # rebound 50 vs ours 30, SEM 5.8
    assert v["H4"]["verdict"] == "confirmed" and "toy" in v["H4"]["note"]
    md = (root / "report.md").read_text()
    assert "**H1 — CONFIRMED**" in md and "**H4 — CONFIRMED**" in md


def A(hack, pass_, finished=True):
    return H.ArmRates(hack=hack, pass_=pass_, finished=finished, last_steps=[200] * len(hack))


VAN = A([60.0, 70.0, 80.0], [40.0, 40.0, 40.0])


@pytest.mark.parametrize("ours, verdict, why", [
    (A([20.0, 30.0, 40.0], [40.0, 40.0, 40.0]), "confirmed", "reduction >= 30"),
    (A([55.0, 60.0, 65.0], [40.0, 40.0, 40.0]), "falsified", "reduction 10.0 pp < 15"),
    (A([20.0, 30.0, 40.0], [20.0, 20.0, 25.0]), "falsified", "pass drop 18.3 pp > 15"),
    (A([45.0, 50.0, 55.0], [40.0, 40.0, 40.0]), "inconclusive", "between 15 and 30"),
    (A([20.0, 30.0, 40.0], [28.0, 28.0, 28.0]), "inconclusive", "pass drop 12.0 pp is between 10 and 15"),
    (A([30.0], [40.0]), "inconclusive", "needs >= 2 seeds"),
])
def test_h1_cases(ours, verdict, why):
    v = H.check_h1({"vanilla": VAN, "projected": ours})
    assert v.verdict == verdict and why in v.reason, v.reason


def test_h1_within_one_sem_is_falsified():
    noisy_van = A([0.0, 100.0, 100.0], [40.0, 40.0, 40.0])  # mean 66.7, SEM 33.3
    ours = A([0.0, 20.0, 70.0], [40.0, 40.0, 40.0])  # mean 30, SEM 20.8 -> reduction 36.7 <= 39.3
    v = H.check_h1({"vanilla": noisy_van, "projected": ours})
    assert v.verdict == "falsified" and "within 1 SEM" in v.reason


def test_missing_arms_are_inconclusive():
    v = H.check_all({"vanilla": VAN}, preset="toy")
    assert v["H1"].verdict == "inconclusive" and "arm missing: projected" in v["H1"].reason
    assert "arm missing: projected, rebound" in v["H3"].reason
    assert v["H4"].verdict == "confirmed"
    assert H.check_h4({}, preset="toy").reason == "inconclusive (arm missing: vanilla)"


@pytest.mark.parametrize("reb, verdict, why", [
    (A([50.0, 50.0, 50.0], [40.0, 40.0, 40.0]), "confirmed", "more than 1 SEM"),
    (A([25.0, 25.0, 25.0], [40.0, 40.0, 40.0]), "falsified", "at or below ours"),
    (A([33.0, 34.0, 35.0], [40.0, 40.0, 40.0]), "falsified", "within 1 SEM"),
    (A([50.0, 50.0, 50.0], [60.0, 60.0, 60.0]), "inconclusive", "not matched"),
])
def test_h3_cases(reb, verdict, why):
    ours = A([20.0, 30.0, 40.0], [40.0, 40.0, 40.0])
    v = H.check_h3({"projected": ours, "rebound": reb})
    assert v.verdict == verdict and why in v.reason, v.reason


def test_h4_threshold_and_provisional():
    assert H.check_h4({"vanilla": A([30.0, 30.0], [1.0, 1.0])}).verdict == "falsified"  # not > 30
    v = H.check_h4({"vanilla": A([31.0, 35.0], [1.0, 1.0], finished=False)}, preset="qwen35-2b")
    assert v.verdict == "confirmed" and v.provisional and v.note is None


def test_mean_sem_and_format():
    assert H.mean_sem([1.0, 2.0, 3.0]) == (2.0, pytest.approx(1 / math.sqrt(3)), 3)
    assert H.mean_sem([5.0]) == (5.0, None, 1)
    assert H.mean_sem([None, float("nan")]) == (None, None, 0)
    assert fmt_cell(12.345, None, True) == "12.3 ± —"
    assert fmt_cell(0.012345, 0.0021, False) == "0.0123 ± 0.0021"


def test_pareto_frontier():
    pts = [(40, 70), (40, 30), (45, 40), (20, 10), (30, 50), (45, 35)]
    assert pareto_frontier(pts) == [(20, 10), (40, 30), (45, 35)]


def test_partial_experiment(tmp_path):
    make_run(tmp_path, "vanilla", 0, [0.2, 0.5], [0.4, 0.4], steps=200)  # DONE but see below
    make_run(tmp_path, "projected", 0, [0.1], [0.4], steps=200, done=False)  # killed at step 25
    (tmp_path / "projected" / "seed0" / "evals.jsonl").open("a").write('{"step": 50, "pass_ra')  # torn line
    cfg = resolve_config("toy", ["train.arm=rebound"], run_dir=str(tmp_path / "rebound" / "seed0"))
    cfg.save()  # started, no evaluation yet
    (tmp_path / "experiment.json").write_text(json.dumps({"arms": ["vanilla", "projected", "rebound", "weak"],
                                                          "seeds": [0], "mode": "inprocess", "preset": "toy"}))
    res = build_report(tmp_path, plots=False)
    md = res["report_md"].read_text()
    assert "**Partial experiment**" in md and "projected/seed0 (eval step 25 of 200)" in md
    assert "Left out (no evaluation yet): rebound/seed0" in md
    assert "Planned but absent: weak/seed0" in md
    assert res["verdicts"]["H1"]["provisional"] is True
    assert res["verdicts"]["H3"]["reason"] == "inconclusive (arm missing: rebound)"
    assert [r["arm"] for r in res["rows"]] == ["vanilla", "projected"]


def test_report_cli(tmp_path):
    from analysis.cli import register

    app = typer.Typer()
    register(app)
    make_run(tmp_path, "vanilla", 0, [0.5], [0.4])
    r = CliRunner().invoke(app, ["report", str(tmp_path), "--no-plots"])
    assert r.exit_code == 0, r.output
    assert "| Vanilla (a) n=1 | 0 (ref) | 50.0 ± — | 40.0 ± — |" in r.output
    r = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "error: runs folder" in r.output and "does not exist" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(app, ["report", str(empty)])
    assert r.exit_code == 2 and "no run folders" in r.output


def test_report_reads_the_trainer_eval_keys():
    from learner import metrics
    from analysis.report import HEADLINE, MODE_COLUMNS

    used = {e for _, e, *_ in HEADLINE} | {e for _, e, _ in MODE_COLUMNS}
    known = set(metrics.EVAL_KEYS) | set(metrics.OPTIONAL_EVAL_KEYS)
    assert used <= known, used - known
    assert {"cos_mean", "frac_fired", "hack_strict", "pass_rate"} <= set(metrics.METRIC_KEYS)


def test_runs_moved_aside_by_fresh_are_not_counted(tmp_path):
    from analysis.rundata import find_runs

    make_run(tmp_path, "vanilla", 0, [0.2, 0.4], [0.4, 0.3])
    make_run(tmp_path, "vanilla", 1, [0.2, 0.5], [0.4, 0.3])
    (tmp_path / "vanilla" / "seed1").rename(tmp_path / "vanilla" / "seed1.old-20261201-101500")
    make_run(tmp_path, "vanilla", 1, [0.1, 0.3], [0.4, 0.3])
    runs = find_runs(tmp_path)
    assert sorted(str(r.path.relative_to(tmp_path)) for r in runs) == ["vanilla/seed0", "vanilla/seed1"]
