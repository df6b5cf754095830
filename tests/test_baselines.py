"""Issue #23 baselines and matched controls in the learner: random / negated directions, projection onto the
clean subspace, Rebound's multiplicative penalty, the ground-truth (oracle) monitors, prompt lines.
Tiny wrapped Qwen3 + byte tokenizer + rule grader, as tests/test_directions_wiring.py."""
import math

import pytest
import torch

from learner.baselines import (controlled_basis, haar_basis, module_seed, monitor_flags, monitored_advantages,
                               rebound_penalty)
from learner.scoring import Scorer
from rollout.hf_engine import HFEngine
from reward_server.grader import grade_groups
from shared.prompts import SYSTEM_LINES
from tests.test_directions_wiring import _graded, art_root, base_model, cfg_for, learner_for, one_step  # noqa: F401
from tests.test_trainer_fakes import RuleGrader


# ---------------------------------------------------------------- direction controls
def test_haar_basis_is_orthonormal_seeded_and_shaped():
    a, b = haar_basis(3, 40, 7), haar_basis(3, 40, 7)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a @ a.T, torch.eye(3), atol=1e-5, rtol=0)
    assert not torch.allclose(a, haar_basis(3, 40, 8)) and haar_basis(0, 5, 1).shape == (0, 5)
    assert module_seed(0, "m.q_proj") != module_seed(0, "m.k_proj") != module_seed(1, "m.q_proj")


def test_controlled_basis_keeps_shapes():
    V = {"a": torch.nn.functional.normalize(torch.randn(1, 16), dim=1), "b": torch.linalg.qr(torch.randn(9, 2))[0].T}
    assert controlled_basis(V, "authored", 0) == V
    neg = controlled_basis(V, "negated", 0)
    rnd = controlled_basis(V, "random", 0)
    for n in V:
        torch.testing.assert_close(neg[n], -V[n])
        assert rnd[n].shape == V[n].shape
        torch.testing.assert_close(rnd[n], haar_basis(V[n].shape[0], V[n].shape[1], module_seed(0, n)))
    with pytest.raises(ValueError, match="unknown vhack.direction 'sideways'"):
        controlled_basis(V, "sideways", 0)


def test_route_random_and_negated_apply_the_control_but_store_the_authored_set(tmp_path, base_model, art_root):
    auth = learner_for(cfg_for(tmp_path / "a", "route"), base_model, art_root)
    rnd = learner_for(cfg_for(tmp_path / "r", "route+random"), base_model, art_root)
    neg = learner_for(cfg_for(tmp_path / "n", "route+negated"), base_model, art_root)
    v_pad = lambda ln: ln.projector._cpu[0]  # noqa: E731 - [M, K, r_max] of what is applied
    torch.testing.assert_close(v_pad(neg), -v_pad(auth))
    assert rnd.projector.ks == auth.projector.ks and rnd.projector.sizes == auth.projector.sizes
    for i, n in enumerate(rnd.names):
        r = rnd.projector.sizes[i]
        torch.testing.assert_close(v_pad(rnd)[i, :1, :r], haar_basis(1, r, module_seed(rnd.cfg.train.seed, n)))
        torch.testing.assert_close(rnd.directions.current.basis[n], auth.directions.current.basis[n])  # raw set kept
    cos = [float(v_pad(rnd)[i, 0] @ v_pad(auth)[i, 0]) for i in range(len(rnd.names))]
    assert max(abs(c) for c in cos) < 0.9  # a random direction, not the authored one
    row = one_step(rnd, HFEngine(rnd.model, rnd.tokenizer))
    assert row["frac_fired"] is not None and 0 < row["frac_fired"] <= 1
    q = [float(p.abs().sum()) for p in rnd.delta_q]
    assert sum(q) > 0  # the random direction's removed component trained the quarantine


# ---------------------------------------------------------------- projection onto the clean subspace
def test_projected_onto_clean_keeps_only_the_clean_span(tmp_path, base_model, art_root):
    ln = learner_for(cfg_for(tmp_path, "projected_onto_clean", extra=["vhack.clean_k=3"]), base_model, art_root)
    basis = ln.directions.current.basis
    assert max(v.shape[0] for v in basis.values()) == 3 and ln.vhack_info["k"] == 3
    eng = HFEngine(ln.model, ln.tokenizer)
    graded, _ = grade_groups(RuleGrader(), ln.problems, eng.generate(ln.make_jobs(0)))
    raw = ln.policy_gradient(graded)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in raw]
    for p, g in zip(params, raw):
        p.grad = g.clone()
    stats = ln.projector.project_(params)
    assert stats["n_modules"] > 0 and 0 <= stats["cos_mean"] <= 1 + 1e-6
    for n, p, g in zip(ln.names, params, raw):
        V = basis[n]
        new = p.grad.reshape(-1)
        scale = max(float(g.norm()), 1e-12)
        assert float((new - V.T @ (V @ new)).norm()) <= 1e-5 * scale  # in the clean span
        torch.testing.assert_close(new, V.T @ (V @ g.reshape(-1)), atol=1e-6, rtol=1e-5)  # = the orthogonal projection
    row = one_step(ln, eng)
    assert row["step"] == 0 and math.isfinite(row["loss"])


# ---------------------------------------------------------------- Rebound multiplicative
def test_rebound_penalty_forms():
    assert rebound_penalty(3.5, 0.4, 0.5, "additive") == pytest.approx(0.2)
    assert rebound_penalty(3.5, 0.4, 2.0, "multiplicative") == pytest.approx(3.5 * 0.8)  # r' = r(1 - 2*0.4)
    with pytest.raises(ValueError, match="unknown rebound_mode"):
        rebound_penalty(1.0, 0.1, 1.0, "exponential")


def test_rebound_mult_penalises_in_proportion_to_the_reward(tmp_path, base_model, art_root):
    add = learner_for(cfg_for(tmp_path / "a", "rebound"), base_model, art_root)
    mult = learner_for(cfg_for(tmp_path / "m", "rebound_mult"), base_model, art_root)
    assert (mult.cfg.train.rebound_mode, mult.cfg.train.rebound_alpha) == ("multiplicative", 2.0)
    graded, _ = grade_groups(RuleGrader(), add.problems, HFEngine(add.model, add.tokenizer).generate(add.make_jobs(0)))
    add.train_step(graded)
    mult.train_step(graded)
    rewards = [s["reward"] for s in Scorer.sequences(graded)]
    scores = [p / 0.5 for p in add.last_penalties]  # additive: 0.5 * s
    assert any(s > 0 for s in scores)
    for r, s, p in zip(rewards, scores, mult.last_penalties):
        assert p == pytest.approx(r * 2.0 * s, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------- ground-truth monitors
def test_monitored_advantages_numbers():
    adv, keep = monitored_advantages([3.5, 3.5, 0.5, 0.5], [True, False, False, False], "penalty", 3.0)
    assert keep and adv == pytest.approx([0.5 - 1.25, 3.5 - 1.25, 0.5 - 1.25, 0.5 - 1.25])
    adv, keep = monitored_advantages([3.5, 3.5, 0.5, 0.5], [True, False, False, False], "screen", 3.0)
    assert keep and adv == pytest.approx([0.0, 3.5 - 1.5, 0.5 - 1.5, 0.5 - 1.5])  # mean over the kept three
    adv, keep = monitored_advantages([3.5, 3.5, 0.5], [True, True, False], "screen", 3.0)
    assert not keep and adv == [0.0, 0.0, 0.0]  # one rollout left: nothing to compare


@pytest.mark.parametrize("arm, flagged", [("gt_penalty", 1), ("gt_screen", 2)])
def test_oracle_monitor_acts_in_a_train_step(tmp_path, base_model, art_root, arm, flagged):
    ln = learner_for(cfg_for(tmp_path, arm), base_model, art_root)
    # rollout 0: strict hack (mode A, fails gt); 1: loose attempt that passed gt; 2, 3: honest
    g = _graded(ln, "j0", ["hack", "try", "ok", "no"], [{"A"}, {"A"}, set(), set()], [False, True, True, False])
    assert monitor_flags(g.grades, ln.cfg.train.oracle_monitor) == [True, flagged == 2, False, False]
    seqs = Scorer.sequences([g])
    keep = {}
    ln._advantages(seqs, keep, 0)
    rewards = [s["reward"] for s in seqs]
    if arm == "gt_penalty":
        r = [rewards[0] - 3.0] + rewards[1:]
        assert [s["adv"] for s in seqs] == pytest.approx([x - sum(r) / 4 for x in r])
        assert seqs[0]["adv"] < 0  # the flagged hack now loses
    else:
        kept = rewards[2:]
        assert [s["adv"] for s in seqs] == pytest.approx([0.0, 0.0] + [x - sum(kept) / 2 for x in kept])
    row = ln.train_step([g])
    assert row["monitor_flagged_frac"] == pytest.approx(flagged / 4)


# ---------------------------------------------------------------- prompt lines
def test_plan_line_on_train_and_eval_inoculation_on_train_only(tmp_path, base_model, art_root):
    plan = learner_for(cfg_for(tmp_path / "p", "plan_prompt"), base_model, art_root)
    ino = learner_for(cfg_for(tmp_path / "i", "inoculation"), base_model, art_root)
    van = learner_for(cfg_for(tmp_path / "v", "vanilla"), base_model, art_root)
    p_line, i_line = SYSTEM_LINES["plan"][0], SYSTEM_LINES["inoculation"][0]
    assert p_line in plan.make_jobs(0)[0].prompt_text and p_line in plan.eval_jobs(0)[0].prompt_text
    assert i_line in ino.make_jobs(0)[0].prompt_text and i_line not in ino.eval_jobs(0)[0].prompt_text
    assert ino.eval_jobs(0)[0].prompt_text == van.eval_jobs(0)[0].prompt_text
    assert p_line not in van.make_jobs(0)[0].prompt_text
    row = one_step(ino, HFEngine(ino.model, ino.tokenizer))
    assert math.isfinite(row["loss"])
