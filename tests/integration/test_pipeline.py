"""End to end: `run_services` runs a toy arm through Redis + reward + rollout + learner processes and
leaves the same run-dir files as the in-process loop, and no processes behind."""
import json

import pytest

from services.launcher import PipelineError, run_services
from shared.config import resolve_config
from tests.support.pipeline import group_members, metrics, small_sets, wait_all_dead


def test_run_services_end_to_end(toy_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKGUARD_CLAIM_IDLE_S", "2")
    cfg = resolve_config("toy", small_sets(toy_dir, **{"train.steps": 3}), run_dir=str(tmp_path / "run"))
    lines = []
    out = run_services(cfg, resume=True, on_line=lambda name, line: lines.append((name, line)))
    assert out == tmp_path / "run"
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["n_groups"] == 4 for r in rows)  # every job answered exactly once
    assert [r["step"] for r in metrics(out, "evals.jsonl")] == [0, 2, 3]
    assert (out / "DONE").exists() and json.loads((out / "summary.json").read_text())["steps"] == 3
    pipe = metrics(out, "pipeline.jsonl")
    assert [p["step"] for p in pipe] == [0, 1, 2]
    assert all(p["duplicates"] == 0 and p["rerequested"] == 0 and p["sync_bytes"] > 0 for p in pipe)
    assert (out / "checkpoints").exists()
    for name in ("learner", "rollout-0", "reward-0", "up"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0
    assert any(n == "learner" and "step 3/3" in line for n, line in lines)
    st = json.loads((out / "services.json").read_text())
    assert wait_all_dead([*st["services"].values(), st["redis_pid"]], timeout=5) == []
    assert (out / "redis" / "appendonlydir").exists()  # AOF on


def test_run_services_refuses_a_missing_problem_set_before_any_service_starts(toy_dir, tmp_path):
    """Issue #21: a missing set is a clear error at start, not a reward worker restarting forever (it used to
    be caught only when that worker exited 2)."""
    from shared.config import ProblemsConfig
    from shared.problems import ProblemFormatError

    cfg = resolve_config("toy", small_sets(toy_dir, **{"train.steps": 2}), run_dir=str(tmp_path / "bad"))
    cfg = cfg.model_copy(update={"problems": ProblemsConfig(source=str(tmp_path / "missing.jsonl"))})
    with pytest.raises(ProblemFormatError, match="missing.jsonl' not found"):
        run_services(cfg, resume=False)
    st = tmp_path / "bad" / "services.json"
    assert not st.exists() or all(not group_members(p) for p in json.loads(st.read_text())["services"].values())


def test_reward_worker_serves_http_and_stops_on_sigterm(toy_dir, tmp_path):
    """Each reward worker is also a reward-server replica (--http-port), and leaves promptly on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from services.redis_server import RedisServer, free_port

    cfg = resolve_config("toy", small_sets(toy_dir), run_dir=str(tmp_path / "run"))
    path = cfg.save()
    port = free_port()
    with RedisServer(tmp_path / "redis") as srv:
        proc = subprocess.Popen([sys.executable, "-m", "services.reward_worker", "--config", str(path),
                                 "--redis-url", srv.url, "--http-port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline, body = time.monotonic() + 120, None
            while time.monotonic() < deadline and body is None:
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                    body = r.json() if r.status_code == 200 else None
                except httpx.HTTPError:
                    time.sleep(0.2)
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert body is not None
            problems = httpx.get(f"http://127.0.0.1:{port}/problems", timeout=5).json()
            assert len(problems) > 0
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
            assert time.monotonic() - t0 < 5
            out = proc.stdout.read().decode()
            assert "[reward] INFO serving the reward API on http://127.0.0.1:%d" % port in out and "stopping:" in out
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def test_async_max_staleness_one(toy_dir, tmp_path, monkeypatch):
    """max_staleness=1: jobs of the next step are enqueued ahead; every trained group is at most one
    version behind, and the learner still gets exactly one group per job."""
    monkeypatch.setenv("RANKGUARD_CLAIM_IDLE_S", "2")
    cfg = resolve_config("toy", small_sets(toy_dir, **{"train.steps": 4, "pipeline.max_staleness": 1,
                                                       "train.eval_every": 0}),
                         run_dir=str(tmp_path / "run"))
    out = run_services(cfg, resume=False)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["n_groups"] == 4 for r in rows)
    assert all(0.0 <= r["staleness"] <= 1.0 for r in rows)
    assert all(p["stale_dropped"] == 0 for p in metrics(out, "pipeline.jsonl"))
