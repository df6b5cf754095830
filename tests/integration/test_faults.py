"""Faults on the toy preset through `rankguard up` (real processes, real Redis, tiny runs):
kill -9 of a rollout or reward worker mid-batch, a stalled worker whose work was taken over, Redis
killed and restarted, the learner killed then --resume, a crashed worker restarted under plain `up`
(and failing the run once its restart budget is spent), a run dir kept by a second `up` and moved aside
by `--fresh`, and no orphans after Ctrl-C / kill -9 of the launcher / a crashed worker."""
import json
import os
import signal

import pytest
import redis

from learner.checkpoint import list_checkpoints
from tests.support.pipeline import Up, metrics, small_sets, stop_until_holding, wait_all_dead

pytestmark = pytest.mark.slow




def client(st: dict) -> redis.Redis:
    return redis.Redis.from_url(st["redis_url"])


def key(st: dict, stream: str) -> str:
    return f"rg:{st['run_id']}:{stream}"


def consumers(r: redis.Redis, stream_key: str, group: str) -> list[str]:
    out = []
    for c in r.xinfo_consumers(stream_key, group):
        n = c["name"]
        out.append(n.decode() if isinstance(n, bytes) else n)
    return out


def assert_complete(run_dir, steps: int, per_step: int = 4) -> None:
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(steps))
    assert all(r["n_groups"] == per_step for r in rows), [r["n_groups"] for r in rows]
    assert (run_dir / "DONE").exists()


def all_pids(st: dict) -> list[int]:
    return [p for p in [*st["services"].values(), st.get("redis_pid")] if p]


@pytest.mark.parametrize("victim,stream,group", [("rollout-0", "jobs", "rollout"), ("reward-0", "rollouts", "reward")])
def test_kill9_worker_mid_batch_work_is_redelivered(toy_dir, tmp_path, victim, stream, group):
    run = tmp_path / "run"
    up = Up(run, small_sets(toy_dir), steps=3, extra_args=["--restart-workers", "1"])
    try:
        st = up.state()
        up.wait_rows(1)
        pid = st["services"][victim]
        r = client(st)
        stop_until_holding(r, key(st, stream), group, pid)  # it holds a message it will never finish
        os.kill(pid, signal.SIGKILL)
        assert up.wait() == 0, up.output()[-3000:]
        assert_complete(run, 3)
        assert "restarting (1/1)" in (run / "logs" / "up.log").read_text()
        assert "re-claimed" in (run / "logs" / f"{victim}.log").read_text()  # the new worker took it over
        pipe = metrics(run, "pipeline.jsonl")
        assert all(p["rerequested"] == 0 and p["duplicates"] == 0 for p in pipe)  # redelivered, not re-made
    finally:
        up.kill()


def test_stalled_worker_cannot_publish_twice(toy_dir, tmp_path):
    """A rollout worker stalls holding jobs; the other takes them over and publishes. When the first
    resumes and publishes too, the atomic finish refuses: the learner sees each job once."""
    run = tmp_path / "run"
    up = Up(run, small_sets(toy_dir, **{"pipeline.rollout_workers": 2}), steps=8)
    try:
        st = up.state()
        up.wait_rows(1)
        pid = st["services"]["rollout-0"]
        stop_until_holding(client(st), key(st, "jobs"), "rollout", pid)
        held_step = len(metrics(run))  # the held jobs belong to this step (or the eval before it)
        up.wait_for_log("rollout-1", "re-claimed")  # after claim idle (2 s) rollout-1 takes them over
        up.wait_rows(held_step + 1)  # ... and publishes them: the run went on without rollout-0
        os.kill(pid, signal.SIGCONT)
        assert up.wait() == 0, up.output()[-3000:]
        assert_complete(run, 8)
        stats = [line for line in (run / "logs" / "rollout-0.log").read_text().splitlines() if "stopping:" in line]
        assert stats and "'duplicates': 0" not in stats[-1], stats  # its late publish was refused
        assert "re-claimed" in (run / "logs" / "rollout-1.log").read_text()
    finally:
        up.kill()


def test_redis_killed_and_restarted_run_continues(toy_dir, tmp_path):
    run = tmp_path / "run"
    up = Up(run, small_sets(toy_dir), steps=4)
    try:
        st = up.state()
        up.wait_rows(1)
        os.kill(st["redis_pid"], signal.SIGKILL)
        killed_at = len(metrics(run))
        assert up.wait() == 0, up.output()[-3000:]
        assert killed_at < 4  # it died mid-run
        assert_complete(run, 4)  # every service reconnected (the launcher restarted redis from its AOF)
        assert "restarting it on the same port" in (run / "logs" / "up.log").read_text()
        assert all(p["incarnation"] == 1 for p in metrics(run, "pipeline.jsonl"))  # same learner throughout
    finally:
        up.kill()


def test_learner_killed_then_resume_continues(toy_dir, tmp_path):
    run = tmp_path / "run"
    sets = small_sets(toy_dir)
    up = Up(run, sets, steps=5)
    try:
        st1 = up.state()
        up.wait_rows(3)  # checkpoint at step 2 exists
        os.kill(st1["services"]["learner"], signal.SIGKILL)
        assert up.wait() == 1  # a crashed learner fails the run
        assert "FAILED: learner" in up.output()
    finally:
        up.kill()
    up2 = Up(run, sets, steps=5, extra_args=["--resume"])
    try:
        st2 = up2.state()
        assert up2.wait() == 0, up2.output()[-3000:]
        assert st2["run_id"] == st1["run_id"]
        assert_complete(run, 5)  # one metrics file, each step exactly once
        pipe = metrics(run, "pipeline.jsonl")
        incarnations = [p["incarnation"] for p in pipe if p["step"] >= 2]
        assert incarnations[-1] == 2 and "resumed" in (run / "logs" / "learner.log").read_text()
    finally:
        up2.kill()


def test_kill9_launcher_leaves_no_orphans(toy_dir, tmp_path):
    up = Up(tmp_path / "run", small_sets(toy_dir), steps=50)
    try:
        st = up.state()
        up.wait_for_log("reward-0", "waiting for rollouts")  # its sandbox pool is up (grandchildren)
        pids = all_pids(st)
        os.kill(up.proc.pid, signal.SIGKILL)
        up.proc.wait()
        assert wait_all_dead(pids, timeout=20) == []
    finally:
        up.kill()


def test_ctrl_c_stops_everything(toy_dir, tmp_path):
    up = Up(tmp_path / "run", small_sets(toy_dir), steps=50)
    try:
        st = up.state()
        up.wait_rows(1)
        os.kill(up.proc.pid, signal.SIGINT)
        assert up.wait(120) == 130  # hang guard only
        assert "ignored SIGTERM" not in up.output()  # services honour SIGTERM (no grace-period SIGKILL)
        assert wait_all_dead(all_pids(st), timeout=5) == []
    finally:
        up.kill()


def test_crashed_worker_fails_the_run_without_restart_budget(toy_dir, tmp_path):
    up = Up(tmp_path / "run", small_sets(toy_dir), steps=50, extra_args=["--restart-workers", "0"])
    try:
        st = up.state()
        up.wait_for_log("reward-0", "waiting for rollouts")
        up.wait_for_log("learner", "incarnation")  # the learner is in its loop, before its first checkpoint
        os.kill(st["services"]["reward-0"], signal.SIGKILL)
        assert up.wait(60) == 1
        assert "FAILED: reward-0 (exit -9; 0/0 restarts used)" in up.output()
        assert wait_all_dead(all_pids(st), timeout=5) == []
        if not list((tmp_path / "run" / "checkpoints").glob("step-*/complete")):  # stopped before the first one
            learner_log = (tmp_path / "run" / "logs" / "learner.log").read_text()
            assert "no checkpoint yet: a resume starts over at step 0" in learner_log, learner_log[-2000:]
            assert "continues from" not in learner_log  # issue #12: it used to claim a checkpoint
    finally:
        up.kill()


def test_kill9_reward_worker_under_plain_up_is_absorbed(toy_dir, tmp_path):
    """Like compose's restart: on-failure, plain `rankguard up` restarts a crashed worker (bounded)."""
    run = tmp_path / "run"
    up = Up(run, small_sets(toy_dir), steps=4)
    try:
        st = up.state()
        up.wait_rows(1)
        os.kill(st["services"]["reward-0"], signal.SIGKILL)
        assert up.wait() == 0, up.output()[-3000:]
        assert_complete(run, 4)
        up_log = (run / "logs" / "up.log").read_text()
        assert "reward-0 exited with -9; restarting (1/3)" in up_log, up_log
        assert json.loads((run / "services.json").read_text())["services"]["reward-0"] != st["services"]["reward-0"]
    finally:
        up.kill()


def test_plain_up_on_a_finished_run_keeps_it_and_fresh_moves_it_aside(toy_dir, tmp_path):
    """A second plain `up` resumes (nothing deleted; --steps may grow, recorded as an amendment);
    `--fresh` moves the run aside whole. (Drift refusal: tests/unit/test_rundir.py, before any process starts.)"""
    run = tmp_path / "run"
    sets = small_sets(toy_dir)
    for steps in (3, 4):
        up = Up(run, sets, steps=steps)
        try:
            assert up.wait() == 0, up.output()[-3000:]
        finally:
            up.kill()
        assert_complete(run, steps)
    assert [s for s, _ in list_checkpoints(run)] == [2, 3, 4]  # the second run went on from step-3
    assert "train.steps 3 -> 4" in (run / "logs" / "up.log").read_text()
    assert json.loads((run / "amendments.jsonl").read_text())["changes"] == {"train.steps": {"from": 3, "to": 4}}
    up = Up(run, sets, steps=1, extra_args=["--fresh"])
    try:
        assert up.wait() == 0, up.output()[-3000:]
    finally:
        up.kill()
    assert_complete(run, 1)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and f"aside to {aside[0]}" in up.output()
    assert_complete(aside[0], 4)  # the earlier run, whole
    assert [s for s, _ in list_checkpoints(aside[0])] == [2, 3, 4]
