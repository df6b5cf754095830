"""Learners of the direction arms on the tiny Qwen3 + byte tokenizer, and hand-made graded groups
(shared by the direction-wiring and baseline tests)."""
import copy
import json
from types import SimpleNamespace

from learner.trainer import Learner
from reward_server.grader import grade_groups
from shared.arms import arm_overrides
from shared.config import resolve_config
from shared.schemas import Completion, Grade, GradedGroup, RolloutGroup
from tests.support.fakes import ByteTokenizer, RuleGrader
from tests.support.trainer import PROBLEMS


def cfg_for(run_dir, arm="projected", steps=3, extra=()):
    return resolve_config("toy", [
        *arm_overrides(arm), f"run_dir={json.dumps(str(run_dir))}", f"train.steps={steps}",
        "train.prompts_per_step=3", "sampling.group_size=4", "sampling.max_new_tokens=6", "train.micro_batch=8",
        "train.eval_every=0", "train.eval_problems=2", "train.eval_samples=2", "train.checkpoint_every=1",
        "train.keep_checkpoints=10", "train.lr=0.05", *extra,
    ])


def learner_for(cfg, model, art_root, resume=True):
    policy = SimpleNamespace(model=copy.deepcopy(model), tokenizer=ByteTokenizer(), model_id="tiny")
    return Learner(cfg, resume=resume, policy=policy, problems=PROBLEMS, artifacts_root=art_root, tensorboard=False)


def one_step(ln, engine):
    engine.version = ln.policy_version
    graded, _ = grade_groups(RuleGrader(), ln.problems, engine.generate(ln.make_jobs(ln.step)))
    return ln.train_step(graded)


def graded_group(ln, job, texts, flags, passes):
    """One graded group on problem p0: text i is flagged in flags[i] (a set of modes), passes gt if passes[i]."""
    tok = ln.tokenizer
    problem = ln.train_problems[0]
    prompt = ln._prompt(problem)[1]
    comps = [Completion(rollout_id=f"{job}-{i}", text=t, token_ids=tok.encode(t) + [2],
                        logprobs=[-1.0] * (len(tok.encode(t)) + 1), finish_reason="stop") for i, t in enumerate(texts)]
    grades = [Grade(rollout_id=c.rollout_id, formatted=True, can_compile=True, gt_pass=ok, pass_frac=float(ok),
                    exploited={m: m in f and not ok for m in "ABCD"}, attempted={m: m in f for m in "ABCD"},
                    reward=3.5 if (ok or f) else 0.5 + 0.1 * i)
              for i, (c, f, ok) in enumerate(zip(comps, flags, passes))]
    g = RolloutGroup(job_id=job, step=ln.step, problem_id=problem.key, policy_version=ln.policy_version,
                     prompt_ids=prompt, completions=comps)
    return GradedGroup(group=g, grades=grades)
