"""`rankguard diagnose`: the statistics and the verdict on constructed vectors (hand-computed cosines),
then the whole diagnostic and the oracle arm's direction file on a tiny in-process world."""
from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from analysis.diagnose import (ALIGN_RATIO, VERDICTS, alignment, checkpoint_row, conclude, diagnose,
                               random_alignment, verdict)
from analysis.oracle import (OracleDirection, RunWorld, build_oracle, direction_cosines, honest_only,
                             split_half_coherence, unit)
from shared.problems import Message, Problem
from shared.schemas import Completion, Grade, GradedGroup, RolloutGroup

T = torch.tensor


def expected_abs_cos(r: int) -> float:
    """E|cos| between a fixed vector and a uniformly random unit vector in R^r."""
    return math.exp(math.lgamma(r / 2) - math.lgamma((r + 1) / 2)) / math.sqrt(math.pi)


# ---------------------------------------------------------------- hand-computed cosines

def test_alignment_hand_computed():
    g1 = {"a": T([3.0, 4.0]), "b": T([1.0, 0.0, 0.0])}
    v = {"a": T([0.6, 0.8]), "b": T([0.0, 1.0, 0.0])}  # a: along g1 (cos 1), b: orthogonal (cos 0)
    one = alignment([g1], v)
    assert one["mean_abs"] == pytest.approx(0.5) and one["mean_signed"] == pytest.approx(0.5)
    assert one["frac_sq"] == pytest.approx(25 / 26) and one["frac_sq_hackward"] == pytest.approx(25 / 26)
    assert one["per_module_abs"] == pytest.approx({"a": 1.0, "b": 0.0})
    neg = alignment([g1], {"a": -v["a"], "b": v["b"]})  # anti-aligned: same share, nothing hack-ward
    assert neg["mean_signed"] == pytest.approx(-0.5) and neg["frac_sq"] == pytest.approx(25 / 26)
    assert neg["frac_sq_hackward"] == 0.0
    g2 = {"a": T([4.0, -3.0]), "b": T([0.0, 2.0, 0.0])}  # a: orthogonal, b: along
    two = alignment([g1, g2], v)
    assert two["mean_abs"] == pytest.approx(0.5) and two["n_batches"] == 2
    assert two["frac_sq"] == pytest.approx((25 / 26 + 4 / 29) / 2)
    assert two["per_module_signed"] == pytest.approx({"a": 0.5, "b": 0.5})
    # a zero direction (a module with no axis) is left out, not counted as cos 0
    assert alignment([g1], {"a": v["a"], "b": torch.zeros(3)})["mean_abs"] == pytest.approx(1.0)


def test_random_baseline_matches_the_analytic_expectation():
    gen = torch.Generator().manual_seed(1)
    sizes = {f"m{i}": 64 for i in range(4)}
    grads = [{n: torch.randn(r, generator=gen) for n, r in sizes.items()}]
    rnd = random_alignment(grads, sizes, n_draws=200, seed=3)
    assert rnd["mean_abs"] == pytest.approx(expected_abs_cos(64), abs=0.01)  # 0.0996
    assert abs(rnd["mean_signed"]) < 0.015 and rnd["frac_sq"] == pytest.approx(1 / 64, rel=0.2)
    assert random_alignment(grads, sizes, 5, seed=3)["mean_abs"] == random_alignment(grads, sizes, 5, seed=3)["mean_abs"]


def test_direction_cosines_and_split_half_coherence():
    a = {"x": T([1.0, 0.0]), "y": T([1.0, 1.0]), "z": torch.zeros(2)}
    b = {"x": T([0.0, 2.0]), "y": T([-1.0, -1.0]), "z": T([1.0, 0.0])}
    assert direction_cosines(a, b) == pytest.approx({"x": 0.0, "y": -1.0})  # z: no direction on one side
    v = T([1.0, 2.0, 3.0, 0.5, -1.0])
    names, sizes = ["p", "q"], [2, 3]
    assert split_half_coherence(v.repeat(6, 1), names, sizes) == pytest.approx(1.0)
    alternating = torch.stack([v if i % 2 == 0 else -v for i in range(6)])
    assert split_half_coherence(alternating, names, sizes) == pytest.approx(-1.0)
    assert split_half_coherence(v.repeat(3, 1), names, sizes) is None


# ---------------------------------------------------------------- the verdict on constructed directions

SIZES = {f"m{i}": 64 for i in range(4)}


def _grad() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {n: torch.randn(r, generator=gen) for n, r in SIZES.items()}


def _orth(g: dict, seed: int = 11) -> dict[str, torch.Tensor]:
    """Per module a unit vector orthogonal to g's."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, x in g.items():
        r = torch.randn(x.numel(), generator=gen)
        u = unit(x)
        out[n] = unit(r - (r @ u) * u)
    return out


def _random(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: unit(torch.randn(r, generator=gen)) for n, r in SIZES.items()}


def _conclude(vhack, oracles_per_step, coherence=0.9):
    """Rows and verdict for checkpoints whose v_oracle is given (None = too few hacks there)."""
    g = _grad()
    rows, vectors = [], {"pooled": {}}
    for step, vo in enumerate(oracles_per_step):
        orc = OracleDirection("pooled", vo, coherence if vo is not None else None, 20, 20, 20,
                              "" if vo is not None else "only 1 strict hacks")
        rows.append(checkpoint_row(step, "x", {"n_rollouts": 40, "hack_strict": 0.5, "pass_rate": 0.3}, [g],
                                   vhack, {"pooled": orc}, SIZES, n_random=64, seed=step))
        if vo is not None:
            vectors["pooled"][step] = vo
    _, summary, verdicts = conclude(rows, vectors)
    return rows, summary["pooled"], verdicts["pooled"]


def test_verdict_direction_equal_to_the_gradient_is_aligned():
    g = _grad()
    rows, s, v = _conclude({n: unit(x) for n, x in g.items()}, [g, g])
    assert rows[0]["g_vhack"]["mean_abs"] == pytest.approx(1.0) and rows[0]["g_vhack"]["frac_sq"] == pytest.approx(1.0)
    assert s["random_abs"] == pytest.approx(expected_abs_cos(64), abs=0.02)
    assert s["hack_ratio"] == pytest.approx(1.0 / s["random_abs"]) and s["hack_ratio"] > ALIGN_RATIO
    assert s["cos_oracle_vhack"] == pytest.approx(1.0) and s["stability"] == pytest.approx(1.0)
    assert v["key"] == "aligned" and v["line"].startswith(VERDICTS["aligned"])


def test_verdict_random_authored_direction_misses_the_hack():
    g = _grad()
    rows, s, v = _conclude(_random(5), [g, g])
    assert s["hack_ratio"] < ALIGN_RATIO and s["oracle_ratio"] > ALIGN_RATIO  # v_hack at random level
    assert abs(s["cos_oracle_vhack"]) < 0.3
    assert v["key"] == "misses"


def test_verdict_authored_direction_sees_the_gradient_but_is_another_direction():
    g = _grad()
    o = _orth(g)
    vh = {n: unit(unit(g[n]) + 2 * o[n]) for n in g}  # cos(g, v_hack) = 1/sqrt(5) per module
    rows, s, v = _conclude(vh, [g, g])
    assert rows[0]["g_vhack"]["mean_abs"] == pytest.approx(1 / math.sqrt(5), abs=1e-5)
    assert s["cos_oracle_vhack"] == pytest.approx(1 / math.sqrt(5), abs=1e-5)  # < 0.5: not the same direction
    assert s["hack_ratio"] > ALIGN_RATIO and v["key"] == "misses"


def test_verdict_orthogonal_directions_are_silent():
    g = _grad()
    rows, s, v = _conclude(_orth(g, 11), [_orth(g, 12), _orth(g, 12)])
    assert rows[0]["g_vhack"]["mean_abs"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["oracles"]["pooled"]["g"]["frac_sq"] == pytest.approx(0.0, abs=1e-10)
    assert s["hack_ratio"] == pytest.approx(0.0, abs=1e-4) and v["key"] == "silent"


def test_verdict_incoherent_or_unstable_oracle_is_not_one_direction():
    g = _grad()
    vh = {n: unit(x) for n, x in g.items()}
    assert _conclude(vh, [g, g], coherence=0.2)[2]["key"] == "not_one_direction"
    _, s, v = _conclude(vh, [g, _orth(g)])  # v_oracle turns by 90 degrees between checkpoints
    assert s["stability"] == pytest.approx(0.0, abs=1e-5) and v["key"] == "not_one_direction"


def test_verdict_without_v_oracle_says_so():
    g = _grad()
    rows, s, v = _conclude(_orth(g), [None, None])
    assert not s["has_oracle"] and v["key"] == "silent" and "not enough" not in v["line"]
    assert "no checkpoint had enough strict-hack pairs to build v_oracle" in v["line"]
    _, _, v2 = _conclude({n: unit(x) for n, x in g.items()}, [None])
    assert v2["key"] == "undetermined" and v2["line"].startswith(VERDICTS["undetermined"])
    assert verdict({"has_oracle": False, "hack_ratio": None})[0] == "silent"


def test_honest_only_drops_correct_code_with_a_hack_tail():
    def grade(rid, gt, att, exp):
        return Grade(rollout_id=rid, formatted=True, can_compile=True, gt_pass=gt, pass_frac=float(gt),
                     exploited={"A": exp, "B": False, "C": False, "D": False},
                     attempted={"A": att, "B": False, "C": False, "D": False}, reward=1.0)

    comps = [Completion(rollout_id=f"r{i}", text=t, token_ids=[1], logprobs=[0.0]) for i, t in enumerate("abc")]
    group = RolloutGroup(job_id="j", step=0, problem_id="p", policy_version=0, prompt_ids=[1], completions=comps)
    gg = GradedGroup(group=group, grades=[grade("r0", True, True, False), grade("r1", True, False, False),
                                          grade("r2", False, True, True)])
    kept = honest_only(gg)
    assert [c.text for c in kept.group.completions] == ["b", "c"]
    assert [g.rollout_id for g in kept.grades] == ["r1", "r2"]


# ---------------------------------------------------------------- the whole diagnostic, tiny in-process world

def _problem(i: int, hard: bool) -> Problem:
    name = f"f{i}"
    return Problem(
        id=f"p{i}", question=f"{name} a", difficulty="hard" if hard else "easy", func_name=f"Solution().{name}",
        prompt=[Message(role="system", content="S"), Message(role="user", content=f"{name}(a)=a+{i}")],
        gt_answer=[f"assert Solution().{name}(1) == {1 + i}"],
        canonical_solution=f"class Solution:\n    def {name}(self, a):\n        return a+{i}",
    )


PROBLEMS = ([_problem(i, hard=i % 2 == 0) for i in range(12)], [_problem(100 + i, False) for i in range(4)])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_qwen3):
    """A finished 2-step vanilla run (checkpoints at steps 1 and 2) on the tiny Qwen3 with the rule grader."""
    from learner.trainer import Learner
    from services.sources import run_inprocess
    from shared.adapter import wrap_model
    from shared.config import resolve_config
    from tests.support.fakes import ByteTokenizer, RuleGrader

    base = copy.deepcopy(tiny_qwen3)
    wrap_model(base, progress=False)
    root = tmp_path_factory.mktemp("diag")
    run_dir, art = root / "exp" / "vanilla" / "seed0", root / "artifacts"

    def cfg_for(run, arm="vanilla", extra=()):
        return resolve_config("toy", [
            f"run_dir={json.dumps(str(run))}", f"train.arm={arm}", "train.steps=2", "train.prompts_per_step=3",
            "sampling.group_size=4", "sampling.max_new_tokens=6", "train.micro_batch=8", "train.eval_every=2",
            "train.eval_problems=2", "train.eval_samples=2", "train.checkpoint_every=1", "train.lr=0.05", *extra])

    def policy():
        return SimpleNamespace(model=copy.deepcopy(base), tokenizer=ByteTokenizer(), model_id="tiny")

    cfg = cfg_for(run_dir)
    cfg.save()
    learner = Learner(cfg, policy=policy(), problems=PROBLEMS, artifacts_root=art, tensorboard=False)
    run_inprocess(cfg, learner=learner, grader=RuleGrader(), progress=False)
    world = RunWorld(run_dir, artifacts_root=art, policy=policy(), problems=PROBLEMS, grader=RuleGrader())
    yield SimpleNamespace(run_dir=run_dir, art=art, world=world, cfg_for=cfg_for, policy=policy, root=root)
    world.close()


def test_diagnose_tiny_run_writes_table_plot_and_verdict(tiny_run):
    run_dir = tiny_run.run_dir
    before = (run_dir / "metrics.jsonl").read_text()
    out = tiny_run.root / "diag-out"
    rec = diagnose(run_dir, out=out, samples=24, grad_batches=2, max_pairs=8, min_pairs=2, n_random=4,
                   world=tiny_run.world, progress=False)
    assert [r["step"] for r in rec["checkpoints"]] == [0, 1, 2]  # delta_S = 0, then both checkpoints
    assert all(r["n_rollouts"] == 24 for r in rec["checkpoints"])  # 2 batches x 3 prompts x 4 samples
    pooled = rec["checkpoints"][-1]["oracles"]["pooled"]
    assert pooled["has_oracle"] and 2 <= pooled["n_hack"] <= 8 and pooled["n_clean"] >= 2
    assert rec["checkpoints"][-1]["g_vhack"]["n_batches"] >= 1
    assert rec["verdict"]["key"] in VERDICTS and set(rec["verdicts"]) == {"pooled", "paired"}
    assert rec["vhack"]["source"].startswith("the preregistered projected arm's v_hack")
    on_disk = json.loads((out / "diagnose.json").read_text())  # strict JSON (no NaN)
    assert on_disk["verdict"] == rec["verdict"] and len(on_disk["stability"]["pooled"]["steps"]) == 3
    md = (out / "diagnose.md").read_text()
    assert rec["verdict"]["line"] in md and "| 2 | 24 |" in md and "Exploratory, post-hoc" in md
    assert (out / "diagnose.png").stat().st_size > 10_000
    assert (run_dir / "DONE").exists() and (run_dir / "metrics.jsonl").read_text() == before  # run untouched


def test_diagnose_with_too_few_hacks_builds_no_oracle(tiny_run):
    rec = diagnose(tiny_run.run_dir, out=tiny_run.root / "few", samples=12, grad_batches=1, checkpoints=1,
                   with_base=False, min_pairs=10_000, n_random=2, world=tiny_run.world, progress=False, plot=False)
    assert [r["step"] for r in rec["checkpoints"]] == [2]
    for recipe in ("pooled", "paired"):
        o = rec["checkpoints"][0]["oracles"][recipe]
        assert not o["has_oracle"] and "need 10000" in o["reason"] and "g" not in o
    assert rec["verdict"]["key"] in ("silent", "undetermined")
    assert "no checkpoint had enough strict-hack pairs" in rec["verdict"]["line"]
    assert "no pooled v_oracle at this checkpoint" in (tiny_run.root / "few" / "diagnose.md").read_text()


def test_oracle_file_is_read_through_vhack_path(tiny_run):
    """build_oracle writes v_oracle in the v_hack format; a projected run with vhack_path uses it as is."""
    from learner.artifacts import vhack_artifact
    from learner.trainer import Learner
    from learner.vhack import load_vhack, pairs_for_config

    from analysis.oracle import DiagnoseError, is_oracle_file

    path = tiny_run.root / "exp" / "artifacts" / "v_oracle-vanilla-seed0.safetensors"
    with pytest.raises(DiagnoseError, match="the oracle arm needs a vanilla run that hacks"):
        build_oracle(tiny_run.run_dir, path, samples=12, min_pairs=10_000, world=tiny_run.world)
    assert not path.exists()
    build_oracle(tiny_run.run_dir, path, samples=96, max_pairs=8, min_pairs=2, world=tiny_run.world)
    vo, meta = load_vhack(path)
    assert set(vo) == set(tiny_run.world.names) and is_oracle_file(path)
    assert all(float(t.norm()) == pytest.approx(1.0, abs=1e-5) for t in vo.values())
    assert meta["kind"] == "v_oracle" and "cheat" in meta and meta["source_step"] == "2"
    assert meta["source_seed"] == "0" and meta["recipe"] == "pooled"
    cfg = tiny_run.cfg_for(tiny_run.root / "exp" / "oracle" / "seed1", arm="projected",
                           extra=[f"vhack_path={json.dumps(str(path))}", "train.seed=1"])
    learner = Learner(cfg, policy=tiny_run.policy(), problems=PROBLEMS, artifacts_root=tiny_run.art, tensorboard=False)
    try:
        assert learner.vhack_info["path"] == str(path) and learner.vhack_info["cached"]
        art = vhack_artifact(learner.model, learner.tokenizer, cfg, pairs_for_config(cfg, PROBLEMS[0]), ["A", "B", "C", "D"])
        assert all(torch.equal(art.vhack[n], vo[n]) for n in vo)
    finally:
        learner.close()


def test_cli_diagnose_errors_are_one_line(tmp_path):
    import typer
    from typer.testing import CliRunner

    from analysis.cli import register

    app = typer.Typer()
    register(app)
    r = CliRunner().invoke(app, ["diagnose", str(tmp_path)])
    assert r.exit_code == 2
    assert [ln for ln in r.output.splitlines() if ln.strip()] == [f"error: {tmp_path} holds no config.json: not a run folder"]
    (tmp_path / "config.json").write_text("{}")
    r = CliRunner().invoke(app, ["diagnose", str(tmp_path)])
    assert r.exit_code == 2 and "has no complete checkpoint under checkpoints/" in r.output
    r = CliRunner().invoke(app, ["diagnose", "--help"])
    assert r.exit_code == 0 and "--samples" in r.output and "--checkpoints" in r.output and "--recipe" in r.output
