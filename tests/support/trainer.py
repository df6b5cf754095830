"""The in-process learner harness of the learner tests: a 12+4 problem set, a small toy config, a Learner
on a copy of the wrapped tiny Qwen3 with the byte tokenizer, one sample-grade-train step."""
import copy
import json
from types import SimpleNamespace

from learner.trainer import Learner
from reward_server.grader import grade_groups as _grade_groups
from shared.config import resolve_config
from shared.problems import Message, Problem
from tests.support.fakes import ByteTokenizer, RuleGrader


def _problem(i: int, hard: bool) -> Problem:
    name = f"f{i}"
    return Problem(
        id=f"p{i}", question=f"{name} a", difficulty="hard" if hard else "easy", func_name=f"Solution().{name}",
        prompt=[Message(role="system", content="S"), Message(role="user", content=f"{name}(a)=a+{i}")],
        gt_answer=[f"assert Solution().{name}(1) == {1 + i}"],
        canonical_solution=f"class Solution:\n    def {name}(self, a):\n        return a+{i}",
    )


PROBLEMS = ([_problem(i, hard=i % 2 == 0) for i in range(12)], [_problem(100 + i, False) for i in range(4)])


def make_cfg(run_dir, arm="vanilla", steps=3, extra=()):
    return resolve_config("toy", [
        f"run_dir={json.dumps(str(run_dir))}", f"train.arm={arm}", f"train.steps={steps}",
        "train.prompts_per_step=3", "sampling.group_size=4", "sampling.max_new_tokens=6", "train.micro_batch=8",
        "train.eval_every=2", "train.eval_problems=2", "train.eval_samples=2", "train.checkpoint_every=1",
        "train.lr=0.05", *extra,
    ])


def make_learner(cfg, base_model, art_root, resume=True):
    policy = SimpleNamespace(model=copy.deepcopy(base_model), tokenizer=ByteTokenizer(), model_id="tiny")
    return Learner(cfg, resume=resume, policy=policy, problems=PROBLEMS, artifacts_root=art_root, tensorboard=False)


def one_step(learner, engine, grader=None):
    groups = engine.generate(learner.make_jobs(learner.step))
    graded, _ = _grade_groups(grader or RuleGrader(), learner.problems, groups)
    return learner.train_step(graded)


def strip_times(row):
    return {k: v for k, v in row.items() if not k.startswith("t_")}
