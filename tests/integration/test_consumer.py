"""The workers' one consumer loop (services.consumer) against a real redis-server: duplicates, stale
work and rejects are settled before processing; a stop mid-batch publishes and acks nothing, and the
batch is re-claimed and published exactly once by another consumer; a worker process given SIGTERM
while it works exits within ~2 s (no 10 s grace-period kill)."""
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.consumer import Consumer, StopRequested
from services.procs import StopFlag
from services.queues import Queues, wire_job_id
from services.redis_server import RedisServer
from services.reward_worker import RewardWorker
from shared.config import resolve_config
from shared.schemas import Completion, Grade, GradedGroup, PromptJob, RolloutGroup, SamplingParams

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("test")
_runs = iter(range(10_000))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    yield srv
    srv.stop()


def queues(url: str, run_id: str, stop=None) -> Queues:
    return Queues(url, run_id, max_queue=16, max_deliveries=3, claim_idle_s=0.5, block_ms=50,
                  stop=(lambda: bool(stop)) if stop is not None else None)


def job(jid: str) -> PromptJob:
    return PromptJob(job_id=jid, step=0, problem_id="p1", prompt_text="x", prompt_ids=[1], sampling=SamplingParams(n=1))


class Echo:
    """A stage that turns jobs into empty groups; `gate` (an Event) holds processing until set."""

    group, source, sink, item = "echo", "jobs", "rollouts", PromptJob

    def __init__(self, gate: threading.Event | None = None, on_process=None):
        self.stats = {"done": 0, "duplicates": 0, "stale": 0, "failed": 0}
        self.gate, self.on_process, self.calls = gate, on_process, 0

    def reject(self, item):
        return "no such problem" if item.problem_id == "bad" else None

    def process(self, items):
        self.calls += 1
        if self.on_process:
            self.on_process()
        if self.gate is not None:
            self.gate.wait(10)
        return [RolloutGroup(job_id=j.job_id, step=0, problem_id=j.problem_id, policy_version=0, prompt_ids=[1],
                             completions=[]) for j in items]

    def count(self, items, outputs, fresh):
        self.stats["done"] += sum(fresh)


def test_duplicates_stale_and_rejects_are_settled_before_processing(server):
    run = f"c{next(_runs)}"
    q = queues(server.url, run)
    q.publish_policy("2:0", b"")  # learner incarnation 2 is live
    q.put("jobs", job(wire_job_id("done", 2)))
    d = q.read("jobs", "echo", "x", PromptJob)[0]
    assert q.finish(d, "echo", "echo", d.item.job_id)  # a job some consumer already finished ...
    bad = job(wire_job_id("b", 2)).model_copy(update={"problem_id": "bad"})
    # ... comes again, with one from a dead learner incarnation, one nobody can process, and a good one
    q.put_many("jobs", [job(wire_job_id("done", 2)), job(wire_job_id("old", 1)), bad, job(wire_job_id("ok", 2))])
    stage = Echo()
    c = Consumer(stage, q, log, "c1", batch=8, stop=StopFlag(), service="test")
    assert c.step_once() == 1 and stage.calls == 1
    assert stage.stats == {"done": 1, "duplicates": 1, "stale": 1, "failed": 1}
    out = q.read("rollouts", "learner", "l", RolloutGroup, count=8)
    assert [d.item.job_id for d in out] == [wire_job_id("ok", 2)]
    dlq = q.dead_letters()
    assert [(f["job_id"], f["reason"]) for _, f in dlq] == [(wire_job_id("b", 2), "no such problem")]
    assert q.backlog("jobs") == 0 and q.pending_count("jobs", "echo") == 0  # everything settled
    assert c.step_once() == 0 and stage.calls == 1  # nothing left: no processing call


def test_stop_mid_batch_acks_nothing_and_another_consumer_publishes_once(server):
    run = f"c{next(_runs)}"
    stop = StopFlag()
    q = queues(server.url, run, stop)
    q.put_many("jobs", [job(f"j{i}") for i in range(3)])
    gate = threading.Event()
    stage = Echo(gate, on_process=stop.event.set)  # the stop arrives while the batch is processed
    first = Consumer(stage, q, log, "first", batch=8, stop=stop, service="test")
    gate.set()
    assert first.step_once() == 0 and first.abandoned == 3 and stage.stats["done"] == 0
    assert q.backlog("rollouts") == 0 and not any(q.done_flags("echo", ["j0", "j1", "j2"]))
    assert q.pending_count("jobs", "echo") == 3  # still owned by the stopped consumer, unacked
    other = Echo()
    second = Consumer(other, queues(server.url, run), log, "second", batch=8, stop=StopFlag(), service="test")
    deadline = time.monotonic() + 10
    while other.stats["done"] < 3 and time.monotonic() < deadline:
        second.step_once()  # re-claims after claim_idle_s (0.5 s)
    assert other.stats["done"] == 3 and q.backlog("rollouts") == 3 and q.pending_count("jobs", "echo") == 0


def test_stop_before_processing_leaves_the_batch_pending(server):
    run = f"c{next(_runs)}"
    stop = StopFlag()
    q = queues(server.url, run, stop)
    q.put("jobs", job("j0"))
    stop.event.set()  # e.g. SIGTERM during the blocking read
    stage = Echo()
    assert Consumer(stage, q, log, "c", batch=8, stop=stop, service="test").step_once() == 0
    assert stage.calls == 0 and q.pending_count("jobs", "echo") == 1 and q.backlog("rollouts") == 0


def test_stop_while_waiting_for_queue_room_abandons_instead_of_crashing(server):
    run = f"c{next(_runs)}"
    stop = StopFlag()
    q = Queues(server.url, run, max_queue=1, claim_idle_s=0.5, block_ms=50, stop=lambda: bool(stop))
    q.put("rollouts", RolloutGroup(job_id="x", step=0, problem_id="p", policy_version=0, prompt_ids=[1],
                                   completions=[]))  # the sink is full
    q.put("jobs", job("j0"))
    threading.Timer(0.3, stop.event.set).start()
    c = Consumer(Echo(), q, log, "c", batch=8, stop=stop, service="test")
    assert c.step_once() == 0 and c.abandoned == 1 and q.pending_count("jobs", "echo") == 1


def test_rollout_worker_stopped_while_waiting_for_a_policy_samples_nothing(server, tmp_path):
    """A job needing a policy version nobody published yet: a stop abandons it (before, the worker
    stopped waiting and sampled with the policy it held)."""
    from services.rollout_service import RolloutWorker

    class Engine:
        version, calls = -1, 0

        def load_delta(self, upd):
            self.version = upd.version

        def generate(self, jobs):
            self.calls += 1
            raise AssertionError("sampled although stopped")

    run = f"c{next(_runs)}"
    stop = StopFlag()
    q = queues(server.url, run, stop)
    q.put("jobs", job(wire_job_id("j0", 0)).model_copy(update={"min_version": 5}))
    cfg = resolve_config("toy", [], run_dir=str(tmp_path / "run"))
    engine = Engine()
    worker = RolloutWorker(cfg, engine, q, log, batch=4, stop=stop)
    threading.Timer(0.3, stop.event.set).start()
    assert worker.step_once() == 0 and stop.event.is_set()  # it returned because of the stop, not before
    assert engine.calls == 0 and worker.loop.abandoned == 1 and worker.stats["jobs"] == 0
    assert q.backlog("rollouts") == 0 and q.pending_count("jobs", "rollout") == 1


def test_stop_requested_is_not_an_exception():
    """Library code's `except Exception` must not swallow the interrupt."""
    assert not issubclass(StopRequested, Exception) and issubclass(StopRequested, BaseException)


WORKER = """
import sys, time
from services.procs import StopFlag, exit_now, run_service
from services.queues import Queues
from services.reward_worker import RewardWorker
from shared.config import resolve_config

class SlowGrader:
    def grade_many(self, pairs):
        print("grading", flush=True)
        time.sleep(60)  # far past the launcher's 10 s grace period
        raise AssertionError("not interrupted")

def body(log):
    stop = StopFlag().install()
    q = Queues(sys.argv[1], sys.argv[2], claim_idle_s=1.0, block_ms=50, stop=lambda: bool(stop))
    cfg = resolve_config("toy", [], run_dir=sys.argv[3])
    RewardWorker(cfg, SlowGrader(), {"p1": object()}, q, log, batch=4, stop=stop).run()

exit_now(run_service("reward", body))
"""


def test_sigterm_mid_grading_exits_fast_with_nothing_half_acked(server, tmp_path):
    run = f"c{next(_runs)}"
    q = queues(server.url, run)
    grp = RolloutGroup(job_id="g0", step=0, problem_id="p1", policy_version=0, prompt_ids=[1],
                       completions=[Completion(rollout_id="g0-0", text="t", token_ids=[1], logprobs=[-0.1])])
    q.put("rollouts", grp)
    env = dict(os.environ, PYTHONPATH=str(REPO), RANKGUARD_HEALTH_FILE=str(tmp_path / "health"))
    proc = subprocess.Popen([sys.executable, "-c", WORKER, server.url, run, str(tmp_path / "run")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        lines = []
        while not lines or lines[-1] not in ("grading\n", ""):  # "" = EOF: the worker died
            lines.append(proc.stdout.readline().decode())
        assert lines[-1] == "grading\n" and "waiting for rollouts" in "".join(lines), lines
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0  # hang guard only; the output below says it was interrupted mid-grading
        out = proc.stdout.read().decode()
        assert "1 message(s) left unacked" in out and "stopping: {'groups': 0" in out, out
        assert "not interrupted" not in out and "crashed" not in out
        assert (tmp_path / "health").exists()  # the loop beat before it read
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert q.backlog("graded") == 0 and not q.is_done("reward", "g0")  # nothing published, not marked done
    assert q.pending_count("rollouts", "reward") == 1  # the group waits for the next consumer
    cfg = resolve_config("toy", [], run_dir=str(tmp_path / "run"))

    class FakeGrader:
        def grade_many(self, pairs):
            return [Grade(formatted=True, can_compile=True, gt_pass=True, pass_frac=1.0, exploited={}, attempted={},
                          reward=1.0) for _ in pairs]

    rw = RewardWorker(cfg, FakeGrader(), {"p1": object()}, queues(server.url, run), log, batch=4)
    deadline = time.monotonic() + 10
    while rw.stats["groups"] == 0 and time.monotonic() < deadline:
        rw.step_once()  # re-claimed once the dead consumer's claim is 0.5 s idle
    got = q.read("graded", "learner", "l", GradedGroup, count=4)
    assert rw.stats["groups"] == 1 and [d.item.group.job_id for d in got] == ["g0"]
    assert q.pending_count("rollouts", "reward") == 0
