"""Faults through `rankguard up` on the toy preset (issue 20 items 5 and 6): a poisoned completion
injected into the rollouts stream, Redis FLUSHALL mid-run, and a second `up` on a busy run dir."""
import json

import pytest
import redis

from tests.support.pipeline import Up, metrics, quick_toy_dir, small_sets
from shared.hacks import as_completion
from shared.schemas import Completion, RolloutGroup

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy_dir():
    return quick_toy_dir()


def client(st: dict) -> redis.Redis:
    return redis.Redis.from_url(st["redis_url"])


def assert_complete(run_dir, steps: int, per_step: int = 4) -> None:
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(steps))
    assert all(r["n_groups"] == per_step for r in rows), [r["n_groups"] for r in rows]
    assert (run_dir / "DONE").exists()


def poisoned_group(problem_id: str) -> RolloutGroup:
    """A group whose completion makes the honest check's child write a 5,000-digit result index."""
    code = ("import os\nos.write(4, b'7' * 5000 + b' true\\n')\n"
            "def solve(*args, **kwargs):\n    return 0\n")
    return RolloutGroup(job_id="poison@999999.0", step=0, problem_id=problem_id, policy_version=0,
                        prompt_ids=[1], completions=[Completion(rollout_id="poison-0", text=as_completion(code),
                                                                token_ids=[1], logprobs=[0.0])])


def test_poisoned_completion_is_graded_and_the_run_finishes(toy_dir, tmp_path):
    problem_id = json.loads((toy_dir / "problems_train.jsonl").read_text().splitlines()[0])["id"]
    run = tmp_path / "run"
    up = Up(run, small_sets(toy_dir), steps=4)
    try:
        st = up.state()
        up.wait_rows(1)
        client(st).xadd(f"rg:{st['run_id']}:rollouts", {"d": poisoned_group(str(problem_id)).pack()})
        assert up.wait() == 0, up.output()[-3000:]
        assert_complete(run, 4)
        log = (run / "logs" / "reward-0.log").read_text()
        assert "exited" not in (run / "logs" / "up.log").read_text()
        assert "bad input" not in log and "Traceback" not in log, log[-2000:]
    finally:
        up.kill()


def test_redis_flushall_mid_run_continues(toy_dir, tmp_path):
    run = tmp_path / "run"
    up = Up(run, small_sets(toy_dir), steps=5)
    try:
        st = up.state()
        up.wait_rows(2)
        client(st).flushall()
        assert up.wait() == 0, up.output()[-3000:]
        assert_complete(run, 5)
        logs = "".join((run / "logs" / f"{s}.log").read_text() for s in ("reward-0", "rollout-0", "learner"))
        assert "UNBLOCKED" not in (run / "logs" / "up.log").read_text()
        assert "recreating" in logs or "re-request" in logs
    finally:
        up.kill()


def test_second_up_on_a_busy_run_dir_says_who_holds_it(toy_dir, tmp_path):
    run = tmp_path / "run"
    first = Up(run, small_sets(toy_dir), steps=3)
    try:
        st = first.state()
        second = Up(run, small_sets(toy_dir), steps=3)
        rc = second.proc.wait(120)
        out = second.output()
        assert rc != 0
        assert "is in use by rankguard up" in out and f"pid {st['launcher_pid']}" in out, out[-2000:]
        assert first.wait() == 0, first.output()[-3000:]
        assert_complete(run, 3)
    finally:
        first.kill()
