"""The PPO ratio in the learner: exactly 1 on-policy; against the engine's behaviour log-probs for stale
samples, where the clip (and, for negative advantages, the dual clip at pipeline.is_clip) acts."""
import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from learner.trainer import Learner
from shared.adapter import wrap_model
from shared.config import resolve_config
from shared.problems import Message, Problem
from shared.schemas import Completion, Grade, GradedGroup, RolloutGroup
from tests.support.fakes import ByteTokenizer

PROBLEM = Problem(id="p0", question="f a", difficulty="easy", func_name="Solution().f",
                  prompt=[Message(role="system", content="S"), Message(role="user", content="f(a)=a")],
                  gt_answer=["assert Solution().f(1) == 1"],
                  canonical_solution="class Solution:\n    def f(self, a):\n        return a")


@pytest.fixture()
def learner(tiny_qwen3, tmp_path):
    model = copy.deepcopy(tiny_qwen3)
    wrap_model(model, progress=False)
    cfg = resolve_config("toy", [f"run_dir={json.dumps(str(tmp_path))}", "train.arm=vanilla", "train.steps=5",
                                 "train.micro_batch=8", "train.lr=0.05", "train.measure_kl=false",
                                 "pipeline.max_staleness=2", "pipeline.is_clip=1.5", "train.clip_eps=0.2"])
    policy = SimpleNamespace(model=model, tokenizer=ByteTokenizer(), model_id="tiny")
    ln = Learner(cfg, policy=policy, problems=([PROBLEM], []), tensorboard=False)
    yield ln
    ln.close()


def group(ln, job, version, behaviour=None, texts=("ee", "ff"), rewards=(0.0, 3.0)):
    """Two completions; behaviour log-probs -1.0 per token, or behaviour(current policy log-probs [B, C])."""
    tok = ln.tokenizer
    ids = [tok.encode(t) + [2] for t in texts]
    comps = [Completion(rollout_id=f"{job}-{i}", text=t, token_ids=x, logprobs=[-1.0] * len(x), finish_reason="stop")
             for i, (t, x) in enumerate(zip(texts, ids))]
    grades = [Grade(rollout_id=c.rollout_id, formatted=True, can_compile=True, gt_pass=False, pass_frac=0.0,
                    exploited={m: False for m in "ABCD"}, attempted={m: False for m in "ABCD"}, reward=r)
              for c, r in zip(comps, rewards)]
    gg = GradedGroup(group=RolloutGroup(job_id=job, step=0, problem_id="p0", policy_version=version,
                                        prompt_ids=tok.encode("go"), completions=comps), grades=grades)
    if behaviour is not None:  # engine log-probs = a function of what the policy gives now
        batch = ln.rollout_batch([gg])
        with torch.no_grad():
            lp = ln.scorer.logp(batch.micro(torch.arange(len(batch)), ln.device))[0]
        for i, c in enumerate(comps):
            c.logprobs = behaviour(lp[i, : len(c.token_ids)]).tolist()
    return gg


def test_on_policy_ratio_is_exactly_one_whatever_the_engine_said(learner):
    row = learner.train_step([group(learner, "a", version=0)])  # engine said -1.0 per token: ignored
    assert row["ratio_mean"] == 1.0 and row["clip_frac"] == 0.0 and row["stale_frac"] == 0.0
    assert row["grad_norm_total"] > 0


def test_stale_ratio_beyond_the_clip_is_clipped_and_carries_no_gradient(learner):
    learner.train_step([group(learner, "a", version=0)])  # learner at version 1 now
    # behaviour = policy / 2 on every token: ratio 2. A > 0 row: PPO clip at 1.2; A < 0 row: min() keeps 2A,
    # the dual clip raises it to 1.5A. Every token clipped, zero gradient.
    stale = group(learner, "s", version=0, behaviour=lambda lp: lp - math.log(2.0))
    row = learner.train_step([stale])
    assert row["staleness"] == 1.0 and row["stale_frac"] == 1.0
    assert row["clip_frac"] == 1.0
    assert row["ratio_mean"] == pytest.approx(2.0, rel=1e-5)
    assert row["grad_norm_total"] == 0.0
    # per token -surrogate: -1.2 * 1.5 (A > 0), +1.5 * 1.5 (A < 0); summed / (max_len 48), then / 2 sequences
    assert row["loss"] == pytest.approx(-(3 * 1.5 * 1.2 - 3 * 1.5 * 1.5) / (48 * 2), rel=1e-5)


def test_stale_ratio_inside_the_trust_region_trains_and_fresh_rows_stay_at_one(learner):
    learner.train_step([group(learner, "a", version=0)])
    stale = group(learner, "s", version=0, behaviour=lambda lp: lp - 0.1)  # ratio e^0.1 = 1.105 < 1.2
    fresh = group(learner, "f", version=1, texts=("gg", "hh"))
    row = learner.train_step([stale, fresh])
    assert row["clip_frac"] == 0.0 and row["grad_norm_total"] > 0
    assert row["stale_frac"] == pytest.approx(0.5)  # 6 stale tokens of 12
    assert row["ratio_mean"] == pytest.approx((6 * math.exp(0.1) + 6 * 1.0) / 12, rel=1e-5)
