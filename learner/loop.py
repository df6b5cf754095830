"""The one training loop, over any transport that turns prompt jobs into graded groups.

    publish policy -> [eval at step 0] -> per step: submit the step's jobs (k steps ahead when
    pipeline.max_staleness = k) -> collect its graded groups -> learner.train_step -> publish ->
    eval (every eval_every and at the end) -> checkpoint (every checkpoint_every and at the end)
    -> learner.finish()

`rankguard train` runs it over an in-process source (engine + grader called directly), `rankguard up`
and the learner service over Redis (services/sources.py, picked by `make_source`). Everything a run
writes that depends on the algorithm comes from here and from `Learner`, so both paths produce the
same metrics to the last digit (tests/integration/test_golden.py).
"""
from __future__ import annotations

import logging
import time
from typing import Protocol

from shared.schemas import GradedGroup, PromptJob

from .metrics import window_mean

log = logging.getLogger("rankguard.learner")
BucketKey = tuple[str, int]  # ("train", step) or ("eval", step)


class RolloutSource(Protocol):
    """Where the learner's jobs are sampled and graded."""

    def publish(self, learner) -> float:
        """Make the learner's current policy version the one new samples use; returns seconds."""

    def submit(self, key: BucketKey, jobs: list[PromptJob]) -> None:
        """Ask for one graded group per job (a key already submitted is ignored)."""

    def collect(self, key: BucketKey) -> list[GradedGroup]:
        """Block until every job of `key` has one graded group; returns them in job order."""

    def step_done(self, step: int, row: dict, ev: dict | None, timings: dict[str, float]) -> None:
        """Transport bookkeeping after a step (pipeline log, counters)."""


def due(step: int, every: int, total: int) -> bool:
    """Evaluation / checkpoint cadence: every `every` steps and at the last one."""
    return (every > 0 and step % every == 0) or step == total


def evaluate(learner, source: RolloutSource, step: int) -> dict:
    key = ("eval", step)
    source.submit(key, learner.eval_jobs(step))
    return learner.record_eval(step, source.collect(key))


def run_training(learner, source: RolloutSource, progress: bool = False) -> dict:
    """Train until cfg.train.steps (resuming at learner.step); returns the run summary."""
    from tqdm.auto import tqdm

    cfg = learner.cfg.train
    total, ahead = cfg.steps, learner.cfg.pipeline.max_staleness
    submitted: set[BucketKey] = set()
    source.publish(learner)
    if learner.step == 0 and cfg.eval_every > 0 and 0 not in {r["step"] for r in learner.eval_history}:
        evaluate(learner, source, 0)
    bar = tqdm(total=total, initial=learner.step, disable=not progress, dynamic_ncols=True,
               desc=f"{cfg.arm} s{cfg.seed}")
    try:
        while learner.step < total:
            t_step = time.perf_counter()
            step = learner.step
            for s in range(step, min(total, step + ahead + 1)):
                if ("train", s) not in submitted:
                    submitted.add(("train", s))
                    source.submit(("train", s), learner.make_jobs(s))
            t0 = time.perf_counter()
            groups = source.collect(("train", step))
            t = {"t_wait": time.perf_counter() - t0}
            t0 = time.perf_counter()
            row = learner.train_step(groups)
            t["t_train_wall"] = time.perf_counter() - t0
            t["t_publish"] = source.publish(learner)
            t0 = time.perf_counter()
            ev = evaluate(learner, source, learner.step) if due(learner.step, cfg.eval_every, total) else None
            t1 = time.perf_counter()
            if due(learner.step, cfg.checkpoint_every, total) or getattr(learner, "checkpoint_owed", False):
                learner.save_checkpoint()
            t.update(t_eval=t1 - t0, t_checkpoint=time.perf_counter() - t1, t_step=time.perf_counter() - t_step)
            source.step_done(step, row, ev, t)
            if progress:
                bar.set_postfix(_postfix(learner.history, row, ev), refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return learner.finish()


def _postfix(history: list[dict], row: dict, ev: dict | None) -> dict[str, str]:
    recent = history[-10:]
    post = {"hack": f"{window_mean(recent, 'hack_strict', 10):.2f}", "pass": f"{window_mean(recent, 'pass_rate', 10):.2f}",
            "r": f"{row['reward_mean']:.2f}", "s/step": f"{row['t_generate'] + row['t_grade'] + row['t_train']:.2f}"}
    if ev is not None:
        post.update(eval_hack=f"{ev['hack_strict']:.2f}", eval_pass=f"{ev['pass_rate']:.2f}")
    return post
