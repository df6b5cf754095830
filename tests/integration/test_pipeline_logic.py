"""The learner service's protocol against real Redis with fake engine/grader/learner (no torch, seconds):
exactly one group per job, duplicates ignored, stale groups dropped and re-requested (max_staleness),
dead-lettered and lost work re-requested, evals through the same pipeline, restarts ignore old work."""
import json
import logging
import struct
import threading
import time

import pytest

from learner.loop import run_training
from services.sources import RedisSource as LearnerService
from services.procs import StopFlag
from services.queues import Queues, parse_wire_id
from services.redis_server import RedisServer
from services.reward_worker import RewardWorker
from services.rollout_service import RolloutWorker
from shared.config import resolve_config
from shared.schemas import Completion, DeltaSUpdate, Grade, GradedGroup, PromptJob, RolloutGroup, SamplingParams

log = logging.getLogger("test")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    yield srv
    srv.stop()


class FakeLearner:
    def __init__(self, cfg, P=3):
        self.cfg, self.P = cfg, P
        self.step, self.policy_version = 0, 0
        self.eval_history: list = []
        self.trained: list[list[tuple[str, int]]] = []  # per step: (job_id, policy_version)
        self.evals: list[tuple[int, list[str]]] = []
        self.checkpoints: list[int] = []

    def _job(self, jid, step, split, min_version):
        return PromptJob(job_id=jid, step=step, problem_id="p1", prompt_text="x", prompt_ids=[1],
                         sampling=SamplingParams(n=2), min_version=min_version, split=split)

    def make_jobs(self, step):
        mv = max(0, self.policy_version - self.cfg.pipeline.max_staleness)
        return [self._job(f"s{step}-{i}", step, "train", mv) for i in range(self.P)]

    def eval_jobs(self, step):
        return [self._job(f"e{step}-{i}", step, "eval", 0) for i in range(2)]

    def train_step(self, groups, timings=None):
        self.trained.append([(g.group.job_id, g.group.policy_version) for g in groups])
        self.step += 1
        self.policy_version += 1
        return {"reward_mean": 1.0, "t_train": 0.0}

    def delta_update(self):
        return DeltaSUpdate(version=self.policy_version, names=["m"], sizes=[1],
                            data=struct.pack("<f", float(self.policy_version)))

    def note_sync(self, s):
        pass

    def record_eval(self, step, groups):
        self.evals.append((step, [g.group.job_id for g in groups]))
        row = {"step": step, "pass_rate": 0.0, "hack_strict": 0.0}
        self.eval_history.append(row)
        return row

    def save_checkpoint(self):
        self.checkpoints.append(self.step)

    def finish(self):
        return {"steps": self.step}


class FakeEngine:
    """Samples 'with' the loaded version; `lag` maps job ids to a version to report instead (stale)."""

    def __init__(self):
        self.version = -1
        self.lag: dict[str, int] = {}
        self.bad_problem: set[str] = set()
        self.calls = 0

    def load_delta(self, upd):
        assert struct.unpack("<f", upd.data)[0] == upd.version
        self.version = upd.version

    def generate(self, jobs):
        self.calls += 1
        out = []
        for j in jobs:
            base = parse_wire_id(j.job_id)[0]
            v = self.lag.pop(base, self.version)
            pid = "nope" if base in self.bad_problem and not self.bad_problem.discard(base) else j.problem_id
            out.append(RolloutGroup(job_id=j.job_id, step=j.step, problem_id=pid, policy_version=v,
                                    prompt_ids=j.prompt_ids,
                                    completions=[Completion(rollout_id=f"{j.job_id}-{k}", text="t", token_ids=[1],
                                                            logprobs=[-0.1]) for k in range(j.sampling.n)]))
        return out


class FakeGrader:
    def grade_many(self, pairs):
        return [Grade(formatted=True, can_compile=True, gt_pass=True, pass_frac=1.0, exploited={}, attempted={},
                      reward=1.0) for _ in pairs]


_ids = iter(range(100_000))


class Rig:
    def __init__(self, server, tmp_path, **over):
        self.cfg = resolve_config("toy", [f"{k}={v}" for k, v in {"train.steps": 3, "train.eval_every": 2,
                                                                    "train.checkpoint_every": 2, **over}.items()],
                                  run_dir=str(tmp_path))
        self.run_id = f"logic{next(_ids)}"
        self.stop = StopFlag()
        self.engine = FakeEngine()
        self.threads: list[threading.Thread] = []

    def queues(self):
        return Queues(self.url, self.run_id, max_queue=64, max_deliveries=2, claim_idle_s=5, block_ms=50,
                      stop=lambda: bool(self.stop))

    def start_workers(self):
        ro = RolloutWorker(self.cfg, self.engine, self.queues(), log, batch=4, stop=self.stop)
        rw = RewardWorker(self.cfg, FakeGrader(), {"p1": object()}, self.queues(), log, batch=4, stop=self.stop)
        for w in (ro, rw):
            t = threading.Thread(target=w.run, daemon=True)
            t.start()
            self.threads.append(t)
        return ro, rw

    def close(self):
        self.stop.event.set()
        for t in self.threads:
            t.join(5)


@pytest.fixture
def rig(server, tmp_path):
    r = Rig(server, tmp_path)
    r.url = server.url
    yield r
    r.close()


def test_on_policy_loop_one_group_per_job(rig):
    learner = FakeLearner(rig.cfg)
    svc = LearnerService(rig.cfg, learner, rig.queues(), log)
    rig.start_workers()
    assert run_training(learner, svc) == {"steps": 3}
    assert [[j for j, _ in step] for step in learner.trained] == [[f"s{s}-{i}" for i in range(3)] for s in range(3)]
    # strictly on-policy: every group sampled with the version current at its step
    assert [{v for _, v in step} for step in learner.trained] == [{0}, {1}, {2}]
    assert [s for s, _ in learner.evals] == [0, 2, 3]  # step 0, every 2, and the end
    assert learner.checkpoints == [2, 3]
    assert svc.counters == {"duplicates": 0, "ignored": 0, "stale_dropped": 0, "rerequested": 0}
    rows = [json.loads(line) for line in open(f"{rig.cfg.run_dir}/pipeline.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["sync_bytes"] > 0 for r in rows)


def test_duplicates_and_old_incarnations_are_ignored(rig):
    q = rig.queues()
    old = LearnerService(rig.cfg, FakeLearner(rig.cfg), q, log)  # a learner that died
    learner = FakeLearner(rig.cfg)
    svc = LearnerService(rig.cfg, learner, q, log)
    assert svc.incarnation == old.incarnation + 1
    ro, rw = rig.start_workers()
    # a graded group from the dead incarnation, and a duplicate of a current one, arrive first
    grp = RolloutGroup(job_id=f"s0-0@{old.incarnation}.0", step=0, problem_id="p1", policy_version=0,
                       prompt_ids=[1], completions=[])
    q.put("graded", GradedGroup(group=grp, grades=[]))
    orig_accept = svc._accept

    def accept_twice(gg):
        orig_accept(gg)
        orig_accept(gg)  # the same message delivered again

    svc._accept = accept_twice
    run_training(learner, svc)
    assert svc.counters["ignored"] >= 1 + 3 * 3  # the old one + every second copy
    assert [len(s) for s in learner.trained] == [3, 3, 3]


def test_stale_group_is_dropped_and_rerequested(server, tmp_path):
    rig = Rig(server, tmp_path, **{"pipeline.max_staleness": 1, "train.steps": 4})
    rig.url = server.url
    try:
        learner = FakeLearner(rig.cfg)
        rig.engine.lag["s3-1"] = 0  # sampled with version 0, trained at version 3 > 0 + 1
        svc = LearnerService(rig.cfg, learner, rig.queues(), log)
        rig.start_workers()
        run_training(learner, svc)
        assert svc.counters["stale_dropped"] == 1 and svc.counters["rerequested"] == 1
        for step, groups in enumerate(learner.trained):
            assert len(groups) == 3
            assert all(step - 1 <= v <= step for _, v in groups), (step, groups)  # within max_staleness
    finally:
        rig.close()


def test_dead_lettered_job_is_rerequested(rig):
    learner = FakeLearner(rig.cfg)
    rig.engine.bad_problem.add("s1-2")  # first attempt: the reward worker cannot grade it -> DLQ
    svc = LearnerService(rig.cfg, learner, rig.queues(), log)
    rig.start_workers()
    run_training(learner, svc)
    assert svc.counters["rerequested"] == 1
    assert [len(s) for s in learner.trained] == [3, 3, 3]
    dlq = rig.queues().dead_letters()
    assert len(dlq) == 1 and "unknown problem_id 'nope'" in dlq[0][1]["reason"]


def test_lost_jobs_are_rerequested(rig):
    learner = FakeLearner(rig.cfg)
    q = rig.queues()
    svc = LearnerService(rig.cfg, learner, q, log)
    lost = threading.Event()

    def lose_then_start():  # the eval jobs of step 0 vanish (redis crash lost them), then workers come up
        while q.backlog("jobs") == 0:
            time.sleep(0.01)
        q.trim(["jobs"])
        lost.set()
        rig.start_workers()

    t = threading.Thread(target=lose_then_start)
    t.start()
    t0 = time.monotonic()
    run_training(learner, svc)
    t.join()
    assert lost.is_set() and svc.counters["rerequested"] == 2  # the two eval jobs
    assert [len(s) for s in learner.trained] == [3, 3, 3]
    assert time.monotonic() - t0 < 15
