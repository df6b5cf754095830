"""Per-problem CPU budgets calibrated from each canonical solution (`rankguard problems calibrate`).

A fixed budget fails correct programs whose full test list is simply long (the reference's 3 s
fails 2 of 61 real medium/hard canonical solutions). Here each problem gets
budget = max(min_s, k x CPU seconds of its canonical solution's honest check), measured in the
sandbox under a generous ceiling and kept in the problem set's sidecar file
(shared.problems.budgets_path), which load_problems applies. CPU time, not wall time, is what the
sandbox limits, so a busy machine does not eat into the budget; the wall ceiling sits above it.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
from pathlib import Path
from typing import Callable

from shared.problems import Problem, load_problems, problem_fingerprint, save_budgets

DEFAULT_K, DEFAULT_MIN_S = 3.0, 3.0


def budget_for(cpu_s: float, k: float = DEFAULT_K, min_s: float = DEFAULT_MIN_S) -> float:
    """max(min_s, k x cpu_s), rounded up to 0.1 s."""
    return max(float(min_s), math.ceil(k * cpu_s * 10) / 10)


def measure(problems: list[Problem], workers: int = 2, ceiling_s: float = 60.0, repeats: int = 2,
            isolation: str = "auto", budget_of: Callable[[float], float] | None = None,
            progress: bool = False) -> dict[str, dict]:
    """problem id -> {"canonical_cpu_s" (max over repeats), "passed", "status"}; with `budget_of`, the
    canonical solution also runs once under budget_of(its CPU time) ("passed_under_budget"): what a
    rollout's honest check will get. `progress`: a progress bar on stderr."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from reward_server.grader import Grader
    from reward_server.sandbox import SandboxConfig
    from shared.config import RewardConfig

    sandbox = SandboxConfig(workers=workers, timeout_s=ceiling_s, isolation=isolation)
    with Grader(RewardConfig(timeout_s=ceiling_s), workers=workers, sandbox=sandbox) as grader, \
            ThreadPoolExecutor(workers) as pool:
        def one(p: Problem) -> dict:
            runs = [grader.canonical_cpu(p, ceiling_s) for _ in range(max(1, repeats))]
            out = {"canonical_cpu_s": round(max(r[0] for r in runs), 4), "passed": all(r[1] for r in runs),
                   "status": next((r[2] for r in runs if not r[1]), runs[0][2])}
            if budget_of is not None:
                budget = budget_of(out["canonical_cpu_s"])
                _, passed, status = grader.canonical_cpu(p, budget) if out["passed"] else (0.0, False, out["status"])
                out.update(passed_under_budget=passed, status_under_budget=status)
            return out

        results = tqdm(pool.map(one, problems), total=len(problems), desc="canonical solutions", unit="problem",
                       disable=not progress, leave=False)
        return dict(zip([p.key for p in problems], results))


def calibrate(problems: list[Problem], k: float = DEFAULT_K, min_s: float = DEFAULT_MIN_S, workers: int = 2,
              ceiling_s: float = 60.0, repeats: int = 2, validate: bool = False,
              progress: bool = False) -> tuple[dict[str, dict], dict]:
    """(entries, meta) of the budgets sidecar for these problems (validate: see measure's budget_of)."""
    measured = measure(problems, workers=workers, ceiling_s=ceiling_s, repeats=repeats, progress=progress,
                       budget_of=(lambda cpu: budget_for(cpu, k, min_s)) if validate else None)
    entries = {}
    for p in problems:
        m = measured[p.key]
        # a canonical solution that fails even under the ceiling gains nothing from a budget
        budget = budget_for(m["canonical_cpu_s"], k, min_s) if m["passed"] else float(min_s)
        entries[p.key] = {"budget_s": budget, **m, "tests": problem_fingerprint(p)}
    meta = {"k": k, "min_s": min_s, "ceiling_s": ceiling_s, "repeats": repeats,
            "calibrated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version()}
    return entries, meta


def calibrate_file(path: str | Path, k: float = DEFAULT_K, min_s: float = DEFAULT_MIN_S, workers: int = 2,
                   ceiling_s: float = 60.0, repeats: int = 2) -> tuple[Path, dict[str, dict]]:
    """Measure every problem of one jsonl file and write its sidecar; returns (sidecar, entries)."""
    entries, meta = calibrate(load_problems(path), k, min_s, workers, ceiling_s, repeats)
    return save_budgets(path, entries, meta), entries
