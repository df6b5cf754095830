"""Learner: KL at init, an end-to-end in-process run, resume equality, route/rebound/skip behaviour."""
import copy
import json

import pytest
import torch

from learner.checkpoint import list_checkpoints
from learner.metrics import EVAL_KEYS, METRIC_KEYS, read_jsonl
from reward_server.grader import grade_groups as _grade_groups
from services.sources import run_inprocess
from rollout.hf_engine import HFEngine
from shared.adapter import adapter_modules, get_delta
from shared.schemas import Completion, Grade, GradedGroup, RolloutGroup
from tests.support.fakes import RuleGrader
from tests.support.trainer import PROBLEMS, make_cfg, make_learner, one_step, strip_times


def test_make_jobs_deterministic_with_hard_share(tmp_path, base_model, art_root):
    ln = make_learner(make_cfg(tmp_path, extra=["train.prompts_per_step=4"]), base_model, art_root)
    a, b = ln.make_jobs(5), ln.make_jobs(5)
    assert [j.model_dump() for j in a] == [j.model_dump() for j in b]
    assert [j.problem_id for j in ln.make_jobs(6)] != [j.problem_id for j in a]
    assert sum(ln.problems[j.problem_id].difficulty == "hard" for j in a) == 2
    assert all(j.sampling.n == 4 and j.adapter_mode == "train" for j in a)
    assert len({j.sampling.seed for j in a}) == 4
    ev = ln.eval_jobs(3)
    assert len(ev) == 2 and all(j.adapter_mode == "eval" and j.sampling.n == 2 for j in ev)
    assert {j.problem_id for j in ev} <= {p.key for p in PROBLEMS[1]}


def test_kl_zero_at_step0_then_positive(tmp_path, base_model, art_root):
    ln = make_learner(make_cfg(tmp_path), base_model, art_root)
    eng = HFEngine(ln.model, ln.tokenizer)
    row0 = one_step(ln, eng)
    assert row0["kl"] is not None and abs(row0["kl"]) < 1e-6
    assert row0["skipped_frac"] < 1.0 and row0["policy_version"] == 1
    assert float(get_delta(ln.model, flat=True).abs().max()) > 0  # it moved
    eng.version = ln.policy_version
    row1 = one_step(ln, eng)
    assert row1["kl"] > 1e-6


def test_inprocess_run_writes_rows_with_all_keys(tmp_path, base_model, art_root):
    cfg = make_cfg(tmp_path / "run")
    ln = make_learner(cfg, base_model, art_root)
    summary = run_inprocess(cfg, learner=ln, grader=RuleGrader(), progress=False)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    evals = read_jsonl(tmp_path / "run" / "evals.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["policy_version"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(METRIC_KEYS) <= set(r), set(METRIC_KEYS) - set(r)
        assert r["t_generate"] > 0 and r["t_train"] > 0
    assert [e["step"] for e in evals] == [0, 2, 3]
    for e in evals:
        assert set(EVAL_KEYS) <= set(e), set(EVAL_KEYS) - set(e)
        assert 0.0 <= e["pass_rate"] <= 1.0 and e["n"] == 4
    assert (tmp_path / "run" / "DONE").exists() and summary["steps"] == 3
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_eval"]["step"] == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1, 2, 3]  # train.keep_checkpoints=3


def test_resume_gives_the_uninterrupted_next_step(tmp_path, base_model, art_root):
    # uninterrupted: 3 steps
    a = make_learner(make_cfg(tmp_path / "a"), base_model, art_root)
    ea = HFEngine(a.model, a.tokenizer)
    rows_a = []
    for _ in range(3):
        rows_a.append(one_step(a, ea))
        ea.version = a.policy_version
    # interrupted: 2 steps, checkpoint, a third step whose row is written but never checkpointed
    b = make_learner(make_cfg(tmp_path / "b"), base_model, art_root)
    eb = HFEngine(b.model, b.tokenizer)
    for _ in range(2):
        one_step(b, eb)
        eb.version = b.policy_version
    b.save_checkpoint()
    torch.manual_seed(1234)  # disturb global RNG: the resumed run must not depend on it
    one_step(b, eb)
    b.close()
    c = make_learner(make_cfg(tmp_path / "b"), base_model, art_root)
    assert c.step == 2 and c.policy_version == 2
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [0, 1]
    ec = HFEngine(c.model, c.tokenizer)
    ec.version = c.policy_version
    row_c = one_step(c, ec)
    assert strip_times(row_c) == strip_times(rows_a[2])
    assert torch.equal(get_delta(c.model, flat=True), get_delta(a.model, flat=True))
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [0, 1, 2]


def test_no_resume_starts_clean(tmp_path, base_model, art_root):
    cfg = make_cfg(tmp_path)
    a = make_learner(cfg, base_model, art_root)
    one_step(a, HFEngine(a.model, a.tokenizer))
    a.save_checkpoint()
    a.close()
    b = make_learner(cfg, base_model, art_root, resume=False)
    assert b.step == 0 and not list_checkpoints(tmp_path) and read_jsonl(tmp_path / "metrics.jsonl") == []


def _group(job_id, texts, rewards, tok, version=0, prompt="go"):
    comps = [Completion(rollout_id=f"{job_id}-{i}", text=t, token_ids=tok.encode(t) + [2],
                        logprobs=[-1.0] * (len(tok.encode(t)) + 1), finish_reason="stop")
             for i, t in enumerate(texts)]
    grades = [Grade(rollout_id=c.rollout_id, formatted=True, can_compile=True, gt_pass=False, pass_frac=0.0,
                    exploited={m: False for m in "ABCD"}, attempted={m: False for m in "ABCD"}, reward=r)
              for c, r in zip(comps, rewards)]
    g = RolloutGroup(job_id=job_id, step=0, problem_id="p0", policy_version=version, prompt_ids=tok.encode(prompt),
                     completions=comps)
    return GradedGroup(group=g, grades=grades)


def test_skip_rule_counts_flat_groups(tmp_path, base_model, art_root):
    ln = make_learner(make_cfg(tmp_path), base_model, art_root)
    tok = ln.tokenizer
    flat = [_group("f1", ["aa", "bb"], [1.0, 1.0], tok), _group("f2", ["cc", "dd"], [0.5, 0.5 + 5e-5], tok)]
    live = _group("l1", ["ee", "ff"], [0.0, 3.0], tok)
    row = ln.train_step(flat + [live])
    assert row["skipped_frac"] == pytest.approx(2 / 3) and row["n_train_seqs"] == 2
    before = get_delta(ln.model, flat=True).clone()
    row = ln.train_step(flat)
    assert row["skipped_frac"] == 1.0 and row["n_train_seqs"] == 0
    assert torch.equal(get_delta(ln.model, flat=True), before)  # nothing to learn from: weights unchanged
    assert row["policy_version"] == 2


def test_route_arm_quarantine_trains_and_stays_out_of_eval(tmp_path, base_model, art_root):
    ln = make_learner(make_cfg(tmp_path, arm="route"), base_model, art_root)
    assert ln.projector is not None and ln.projector.route
    eng = HFEngine(ln.model, ln.tokenizer)
    row = one_step(ln, eng)
    assert row["frac_fired"] > 0
    q = get_delta(ln.model, kind="q", flat=True)
    assert float(q.abs().max()) > 0, "the removed component should have trained delta_Q"
    upd = ln.delta_update()
    assert upd.quarantine is not None and upd.version == 1
    # eval rollouts ignore the quarantine: identical to a copy whose delta_Q is zero
    eng.version = ln.policy_version
    clean = copy.deepcopy(ln.model)
    for m in adapter_modules(clean).values():
        m.delta_Q.data.zero_()
    ev_jobs = [j for j in ln.eval_jobs(1) if j.adapter_mode == "eval"]  # route adds training-policy ones
    got = eng.generate(ev_jobs)
    want = HFEngine(clean, ln.tokenizer).generate(ev_jobs)
    assert [c.logprobs for g in got for c in g.completions] == [c.logprobs for g in want for c in g.completions]
    # train rollouts do use it
    tr_jobs = ln.make_jobs(1)
    got_tr = eng.generate(tr_jobs)
    want_tr = HFEngine(clean, ln.tokenizer).generate(tr_jobs)
    assert [c.logprobs for g in got_tr for c in g.completions] != [c.logprobs for g in want_tr for c in g.completions]
    assert all(not m.quarantine_active for m in adapter_modules(ln.model).values())


def test_rebound_penalty_lowers_hack_like_rewards(tmp_path, base_model, art_root):
    """The penalty alpha*max(0, cos(h_mean, v_concept)) comes off the reward before advantages.

    (On a random tiny model every completion's h_mean has cos < 0 with the mean-diff v_concept, so
    the penalty would be 0 throughout; the test points v_concept at one hack completion's own h_mean.)
    """
    from shared.logprobs import hidden_at_layer
    from learner.rebound import mean_completion_activation
    from learner.vhack import pairs_for_config

    cfg = make_cfg(tmp_path, arm="rebound")
    ln = make_learner(cfg, base_model, art_root)
    assert ln.v_concept is not None and ln.rebound_layer is not None
    pairs = [p for p in pairs_for_config(cfg, PROBLEMS[0]) if p.split == "train"][:4]
    tok = ln.tokenizer
    hack = _group("h", [p.hack for p in pairs], [1.0] * 4, tok)
    clean = _group("c", [p.clean for p in pairs], [1.0] * 4, tok)
    ids = torch.tensor([hack.group.prompt_ids + hack.group.completions[0].token_ids])
    tmask = torch.zeros_like(ids)
    tmask[0, len(hack.group.prompt_ids):] = 1
    h = hidden_at_layer(ln.model, ids, None, ln.rebound_layer)
    ln.v_concept = mean_completion_activation(h, tmask)[0]  # "hack-like" = like hack completion 0
    row = ln.train_step([hack, clean])
    pen = ln.last_penalties
    assert len(pen) == 8 and all(0 <= p <= 0.5 + 1e-5 for p in pen)
    assert pen[0] == pytest.approx(0.5, abs=1e-4)  # cos = 1 -> the full alpha comes off
    assert pen[0] > sum(pen[4:]) / 4
    assert row["reward_mean"] == pytest.approx(1.0)  # raw grader reward is reported unchanged
    assert row["reward_shaped_mean"] == pytest.approx(1.0 - sum(pen) / 8, abs=1e-6)
    assert row["skipped_frac"] < 1.0  # flat raw rewards, but the penalty gives the groups spread


def test_projected_arm_reports_projection_stats(tmp_path, base_model, art_root):
    ln = make_learner(make_cfg(tmp_path, arm="projected"), base_model, art_root)
    row = one_step(ln, HFEngine(ln.model, ln.tokenizer))
    assert row["cos_mean"] is not None and -1 <= row["cos_mean"] <= 1 and 0 <= row["frac_fired"] <= 1
    assert row["grad_norm"] > 0
    info = json.loads((tmp_path / "directions.json").read_text())
    assert info["modes"] == ["A", "B", "C", "D"] and "heldout_median" in info["validation"]
    weak = make_learner(make_cfg(tmp_path / "w", arm="weak"), base_model, art_root)
    assert weak.vhack_info["modes"] == ["A", "B"] and weak.vhack_info["heldout_modes"] == ["C", "D"]


def sampled_batch(ln, engine, step):
    """(RolloutBatch, one micro-batch of all its rows) of one sampled and graded step, as train_step builds them."""
    graded, _ = _grade_groups(RuleGrader(), ln.problems, engine.generate(ln.make_jobs(step)))
    batch = ln.rollout_batch(graded)
    return batch, batch.micro(torch.arange(len(batch)), ln.device)


def test_shared_prefix_forward_matches_full_sequences(tmp_path, base_model, art_root):
    ln = make_learner(make_cfg(tmp_path), base_model, art_root)
    batch, mb = sampled_batch(ln, HFEngine(ln.model, ln.tokenizer), 0)
    with torch.no_grad():
        a, ha, ma = ln.scorer.forward_shared(mb, hidden_layer=1)
        f, hf, mf = ln.scorer.forward_full(mb, hidden_layer=1)
    m = mb.mask.bool()
    assert torch.allclose(a[m], f[m], atol=1e-4)
    engine_lp = mb.behaviour_logp[m]
    assert torch.allclose(a[m], engine_lp, atol=1e-4)  # = what the engine reported while sampling
    from learner.rebound import mean_completion_activation
    assert torch.allclose(mean_completion_activation(ha, ma), mean_completion_activation(hf, mf), atol=1e-4)


def test_shared_prefix_gradients_match_full_sequences(tmp_path, base_model, art_root):
    ln = make_learner(make_cfg(tmp_path), base_model, art_root)
    batch, mb = sampled_batch(ln, HFEngine(ln.model, ln.tokenizer), 1)
    grads = []
    for fwd in (ln.scorer.forward_shared, ln.scorer.forward_full):
        ln.model.zero_grad(set_to_none=True)
        (fwd(mb)[0] * mb.mask).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1).clone() for p in ln.delta_s]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-4)
    assert float(grads[0].abs().max()) > 0


def test_lean_reference_logprobs_match_the_model_forward(tmp_path, base_model, art_root):
    ln = make_learner(make_cfg(tmp_path), base_model, art_root)
    assert ln.scorer.lean_ref  # CPU + Qwen3 + wrapped
    eng = HFEngine(ln.model, ln.tokenizer)
    one_step(ln, eng)  # delta_S != 0 now: the reference must still be the delta_S = 0 policy
    eng.version = ln.policy_version
    batch, mb = sampled_batch(ln, eng, ln.step)
    lean = ln.scorer.ref_logp(mb)
    ln.scorer.lean_ref = False
    plain = ln.scorer.ref_logp(mb)
    mask = mb.mask.bool()
    torch.testing.assert_close(lean[mask], plain[mask], rtol=1e-4, atol=1e-4)
    policy = ln.scorer.logp(mb)[0].detach()
    assert (policy[mask] - plain[mask]).abs().max() > 1e-4  # and it is not the current policy
