"""Reward throughput: prewarmed fork servers vs a naive fresh interpreter per execution.

    python bench/reward.py [--workers 2] [--limit 58] [--timeout 30] [--json out.json]

Items: for every shared LeetCode problem, its canonical solution, a wrong one, and a wrong one with
a planted hack (modes A-D in turn). Arms, measured side by side in this process:
  naive      fresh `python harness.py` per execution, all five checks per rollout as five processes
             (the reference's layout: five fresh interpreters per rollout)
  fast       fork-server pool; B/C/D observed on one run; vulnerable checks skipped once gt passed
             (they cannot change a verdict then)
  fast-full  fork-server pool; B/C/D on one run; all checks always (3 executions per rollout)
Arms run interleaved, chunk by chunk, so load changes hit all alike. Verdicts (formatted,
can_compile, gt_pass, pass_frac, exploited, attempted, reward) are compared one by one against naive. Also reports the per-execution overhead on a trivial program.
A generous CPU limit keeps slow canonical solutions from turning machine load into verdict noise.
"""
from __future__ import annotations

import argparse
import json
import marshal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward_server.grader import Grader, ProblemChecks, compile_program  # noqa: E402
from reward_server.sandbox import ExecJob, SandboxConfig, make_executor  # noqa: E402
from shared.config import LoopholeConfig, RewardConfig  # noqa: E402
from shared.hacks import MODES, as_completion, plant_hack  # noqa: E402
from shared.problems import load_leetcode_sample  # noqa: E402
from shared.prompts import method_name  # noqa: E402

VERDICT_FIELDS = ("formatted", "can_compile", "gt_pass", "pass_frac", "exploited", "attempted", "reward")


def build_items(limit: int | None) -> list[tuple]:
    items = []
    for i, p in enumerate(load_leetcode_sample()[:limit]):
        wrong = f"class Solution:\n    def {method_name(p)}(self, *args, **kwargs):\n        return None\n"
        items.append((p, as_completion(p.canonical_solution), "canonical"))
        items.append((p, as_completion(wrong), "wrong"))
        mode = MODES[i % 4]
        items.append((p, as_completion(plant_hack(wrong, mode, i // 4)), f"hack-{mode}"))
    return items


def make_grader(name: str, workers: int, timeout: float) -> Grader:
    cfg = RewardConfig(loopholes=LoopholeConfig(rt=True, se=True, so=True, fm=True), timeout_s=timeout)
    iso = "fresh" if name == "naive" else "auto"
    return Grader(cfg, workers=workers, sandbox=SandboxConfig(timeout_s=timeout, isolation=iso, allow_fallback=iso == "fresh"),
                  full_checks=name != "fast", separate_bcd=name == "naive")


def run_arms(names: list[str], items: list[tuple], workers: int, timeout: float, chunk: int = 12
             ) -> dict[str, tuple[float, list]]:
    """All arms over the same items, interleaved chunk by chunk (rotating the order), so a change in
    machine load during the run hits every arm alike. Returns arm -> (seconds, grades)."""
    graders = {n: make_grader(n, workers, timeout) for n in names}
    secs = {n: 0.0 for n in names}
    grades: dict[str, list] = {n: [] for n in names}
    try:
        for g in graders.values():
            g.grade(items[1][0], items[1][1])  # warm up: fork servers, per-problem cache path
        for k, start in enumerate(range(0, len(items), chunk)):
            part = [(p, c) for p, c, _ in items[start:start + chunk]]
            order = names[k % len(names):] + names[:k % len(names)]
            for n in order:
                t0 = time.perf_counter()
                got = graders[n].grade_many(part)
                secs[n] += time.perf_counter() - t0
                grades[n].extend(got)
    finally:
        for g in graders.values():
            g.close()
    return {n: (secs[n], grades[n]) for n in names}


def exec_overhead(isolation: str, n: int) -> tuple[float, float]:
    """Median seconds per execution: (empty program, no setup, no asserts; honest check of a wrong
    program on the first LeetCode problem: its setup + 70 call sides, each raising)."""
    p = load_leetcode_sample()[0]
    ck = ProblemChecks(p)
    blob, _ = compile_program("class Solution:\n    pass\n")
    empty = marshal.dumps(compile("", "<empty>", "exec"))
    ex = make_executor(SandboxConfig(workers=1, isolation=isolation))
    try:
        out = []
        for job in (lambda: ExecJob("BCD", empty, empty, {}, {"asserts": empty}),
                    lambda: ExecJob("eval", ck.setup, blob, {}, {"exprs": ck.program_exprs})):
            ts = []
            for _ in range(n):
                j = job()
                t0 = time.perf_counter()
                ex.run(j)
                ts.append(time.perf_counter() - t0)
            out.append(statistics.median(ts))
        return out[0], out[1]
    finally:
        ex.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="first N problems (default all 58)")
    ap.add_argument("--timeout", type=float, default=30.0, help="CPU seconds per check")
    ap.add_argument("--arms", default="naive,fast,fast-full")
    ap.add_argument("--overhead-runs", type=int, default=40)
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)

    items = build_items(args.limit)
    out: dict = {"items": len(items), "workers": args.workers, "timeout_s": args.timeout}
    fast = exec_overhead("auto", args.overhead_runs)
    naive = exec_overhead("fresh", max(10, args.overhead_runs // 4))
    out["exec_ms"] = {}
    for i, what in enumerate(("empty program", "honest check, wrong program, 70 asserts")):
        out["exec_ms"][what] = {"fork_server": fast[i] * 1e3, "fresh_interpreter": naive[i] * 1e3}
        print(f"per execution ({what}): fork server {fast[i] * 1e3:.1f} ms, fresh interpreter "
              f"{naive[i] * 1e3:.1f} ms ({naive[i] / fast[i]:.1f}x)")

    results = {}
    for arm, (secs, grades) in run_arms(args.arms.split(","), items, args.workers, args.timeout).items():
        results[arm] = grades
        out[arm] = {"seconds": secs, "rollouts_per_s": len(items) / secs}
        print(f"{arm:10s} {len(items)} rollouts in {secs:7.2f} s = {len(items) / secs:7.2f} rollouts/s")
    if "naive" in results:
        base = out["naive"]["rollouts_per_s"]
        for arm, grades in results.items():
            if arm == "naive":
                continue
            diff = [(items[i][0].key, items[i][2], f) for i, (a, b) in enumerate(zip(results["naive"], grades))
                    for f in VERDICT_FIELDS if getattr(a, f) != getattr(b, f)]
            out[arm]["speedup_vs_naive"] = out[arm]["rollouts_per_s"] / base
            out[arm]["verdict_mismatches"] = len(diff)
            print(f"{arm:10s} speed-up vs naive {out[arm]['speedup_vs_naive']:.2f}x, "
                  f"verdict mismatches {len(diff)}/{len(items)}" + (f": {diff[:5]}" if diff else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
