"""Per-problem CPU budgets: calibration, storage beside the problem set, and their effect."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from reward_server.calibrate import budget_for
from reward_server.grader import Grader
from shared.config import RewardConfig
from shared.hacks import as_completion
from shared.problems import (BUNDLED_LEETCODE, Problem, budgets_path, load_budgets, load_leetcode_sample,
                             load_problems, save_problems)

# ~1.2 s of CPU on these machines per check (a full test list of a slow-but-correct solution)
SLOW = Problem(
    id="slow-sum", question="sum", func_name="Solution().total", setup_code="",
    gt_answer=["assert Solution().total(3) == 6"],
    canonical_solution=("class Solution:\n    def total(self, n):\n        s = 0\n"
                        "        for _ in range(80_000_000):\n            s += 1\n        return n * (n + 1) // 2\n"),
)
FAST = Problem(id="fast-add", question="add", func_name="Solution().add", setup_code="",
               gt_answer=["assert Solution().add(1, 2) == 3"],
               canonical_solution="class Solution:\n    def add(self, a, b):\n        return a + b\n")


def test_budget_rule():
    assert budget_for(0.1) == 3.0 and budget_for(1.58) == 4.8 and budget_for(2.0, k=2, min_s=1) == 4.0
    assert budget_for(0.31, k=3, min_s=0.5) == 1.0  # rounded up to 0.1 s


def _app():
    import typer

    from reward_server.cli import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    register(app)
    return app


def test_calibrate_writes_the_sidecar_and_loading_applies_it(tmp_path):
    path = tmp_path / "set.jsonl"
    save_problems([SLOW, FAST], path)
    r = CliRunner().invoke(_app(), ["problems", "calibrate", str(path), "--k", "2", "--min-s", "0.5",
                                    "--repeats", "1", "--ceiling", "20"])
    assert r.exit_code == 0, r.output
    assert "2 problems" in r.output and str(budgets_path(path)) in r.output
    side = json.loads(budgets_path(path).read_text())
    assert side["k"] == 2 and side["min_s"] == 0.5
    slow, fast = side["problems"]["slow-sum"], side["problems"]["fast-add"]
    assert slow["passed"] and fast["passed"]
    assert slow["canonical_cpu_s"] > 0.6 and slow["budget_s"] == budget_for(slow["canonical_cpu_s"], 2, 0.5)
    assert fast["budget_s"] == 0.5
    loaded = {p.key: p for p in load_problems(path)}
    assert loaded["slow-sum"].time_budget_s == slow["budget_s"] and loaded["fast-add"].time_budget_s == 0.5
    # a changed problem (other tests) no longer gets the old budget
    save_problems([SLOW.model_copy(update={"gt_answer": ["assert Solution().total(4) == 10"]}), FAST], path)
    assert {p.key: p.time_budget_s for p in load_problems(path)} == {"slow-sum": None, "fast-add": 0.5}
    # records keep the upstream format: no budget key written when there is none
    assert "time_budget_s" not in path.read_text()


def test_calibrate_bad_source_is_one_error_line(tmp_path):
    r = CliRunner().invoke(_app(), ["problems", "calibrate", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 2 and "not found" in r.output and "Traceback" not in r.output


def test_cpu_budget_decides_and_timeout_is_reported():
    cfg = RewardConfig(timeout_s=1.0)
    with Grader(cfg, workers=1) as g:
        tight = g.grade(SLOW, as_completion(SLOW.canonical_solution))
        roomy = g.grade(SLOW.model_copy(update={"id": "slow-sum-2", "time_budget_s": 6.0}),
                        as_completion(SLOW.canonical_solution))
    assert not tight.gt_pass and tight.timed_out and tight.status == "timeout" and tight.budget_s == 1.0
    assert roomy.gt_pass and not roomy.timed_out and roomy.budget_s == 6.0


def test_bundled_set_is_calibrated():
    budgets = load_budgets(BUNDLED_LEETCODE)
    problems = load_leetcode_sample()
    assert set(budgets) == {p.key for p in problems}
    assert all(p.time_budget_s is not None and p.time_budget_s >= 3.0 for p in problems)
    assert all(e["passed"] for e in budgets.values())


@pytest.mark.slow
def test_all_bundled_canonicals_pass_on_a_busy_two_worker_server():
    """Done-when: calibrated budgets, default 3 s floor, 2 sandbox workers, a CPU hog beside them."""
    from reward_server.app import create_app

    problems = {p.key: p for p in load_leetcode_sample()}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with Grader(RewardConfig(), workers=2) as grader:
            app = create_app(RewardConfig(), grader=grader, problems=problems)
            with TestClient(app) as client:
                r = client.post("/grade/batch", json={"items": [
                    {"problem_id": k, "completion": as_completion(p.canonical_solution)} for k, p in problems.items()]})
    finally:
        hog.kill()
        hog.wait()
    assert r.status_code == 200, r.text[:300]
    grades = r.json()["grades"]
    failed = [(k, g["status"], g["n_passed"], g["n_tests"]) for k, g in zip(problems, grades) if not g["gt_pass"]]
    assert failed == []
    assert all(not g["timed_out"] for g in grades)


def test_wall_ceiling_stops_idle_programs_not_computing_ones():
    """A wall ceiling far below the CPU a correct answer needs (what a busy box amounts to): the
    computing program still gets its CPU budget; a sleeping one is stopped at the ceiling."""
    from reward_server.sandbox import SandboxConfig

    sandbox = SandboxConfig(workers=1, timeout_s=5.0, wall_factor=0.05, wall_slack_s=0.2)  # ceiling 0.45 s
    sleeper = as_completion("import time\nclass Solution:\n    def total(self, n):\n        time.sleep(30)\n")
    with Grader(RewardConfig(timeout_s=5.0), workers=1, sandbox=sandbox) as g:
        computing = g.grade(SLOW, as_completion(SLOW.canonical_solution))
        idle = g.grade(SLOW.model_copy(update={"id": "slow-sleep"}), sleeper)
    assert computing.gt_pass and not computing.timed_out, (computing.status, computing.timings)
    assert computing.timings["gt"] > sandbox.wall_for(5.0)
    # sleeping uses no CPU, so only the wall ceiling (not the 5 s CPU budget) can have stopped it
    assert idle.timed_out and not idle.gt_pass
