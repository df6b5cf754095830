"""Rollout sources: the transports the one training loop (learner/loop.py) runs over.

    make_source("inprocess", learner)      engine + grader called directly (`rankguard train`)
    make_source("redis", learner, ...)     the run's Redis streams; rollout/reward workers elsewhere
                                           (`rankguard up`, the learner service, docker compose)

Both implement learner.loop.RolloutSource: publish(learner) / submit(key, jobs) / collect(key) /
step_done(...). Only transport lives here (buckets, re-requests, staleness, incarnations); the
algorithm's cadence (evals, checkpoints, stopping) lives in the loop, once.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from reward_server.grader import grade_groups
from shared.config import RunConfig
from shared.schemas import GradedGroup, PromptJob

from .procs import Health, StopFlag
from .queues import QueueError, Queues, default_consumer, policy_tag, wire_job_id

GROUP = "learner"
WAIT_LOG_S = 30.0
LOST_CHECK_S = 1.0


class Stopped(Exception):
    """SIGTERM while waiting: leave without a new checkpoint (the log line says where a resume starts)."""


@dataclass
class Bucket:
    """One batch the learner waits for: a train step's jobs or an evaluation's."""

    key: tuple[str, int]
    order: list[str]  # original job ids, in make_jobs order
    got: dict[str, GradedGroup] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.got) == len(self.order)


class RedisSource:
    """Jobs out and graded groups in over the run's Redis streams (rollout and reward workers elsewhere).

    Every construction is a new *incarnation* (a Redis counter): job ids travel as
    `<job_id>@<incarnation>.<attempt>`, the run's queues are emptied at start, and results of an
    earlier incarnation (work in flight when the learner was killed) are ignored, so `--resume` is
    exact. A bucket is one train step's jobs or one evaluation's; a group sampled with a version older
    than current - max_staleness is dropped and its job re-requested.
    """

    def __init__(self, cfg: RunConfig, learner, queues: Queues, log: logging.Logger, stop: StopFlag | None = None):
        self.cfg, self.learner, self.q, self.log = cfg, learner, queues, log
        self.stop = stop if stop is not None else StopFlag()
        self.k = cfg.pipeline.max_staleness
        self.consumer = default_consumer("learner")
        self.incarnation = self.q.incr("incarnation")
        self.q.trim(["jobs", "rollouts", "graded"])  # work of an earlier incarnation is void
        self.q.ensure_group("graded", GROUP)
        dlq = self.q.dead_letters(count=10_000)
        self.dlq_cursor = dlq[-1][0] if dlq else "0-0"
        self.buckets: dict[tuple[str, int], Bucket] = {}
        self.wanted: dict[str, tuple[tuple[str, int], PromptJob, int]] = {}  # wire id -> (bucket, job, attempt)
        self.counters = {"duplicates": 0, "ignored": 0, "stale_dropped": 0, "rerequested": 0}
        self.health = Health("learner")
        self.pipeline_log = Path(cfg.run_dir) / "pipeline.jsonl"
        self._truncate_pipeline_log(learner.step)
        self.last_sync_bytes = 0
        self._last_lost_check, self._empty_checks = time.monotonic(), 0
        log.info("incarnation %d, step %d, policy version %d, max_staleness %d", self.incarnation,
                 learner.step, learner.policy_version, self.k)

    def _truncate_pipeline_log(self, step: int) -> None:
        """Rows of steps that will run again (resume) or of an earlier run (fresh start) go."""
        if not self.pipeline_log.exists():
            return
        keep = []
        for line in self.pipeline_log.read_text().splitlines():
            try:
                if json.loads(line).get("step", -1) < step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass
        self.pipeline_log.write_text("".join(k + "\n" for k in keep))

    # -- policy -------------------------------------------------------------------------------------
    def publish(self, learner=None) -> float:
        t0 = time.perf_counter()
        upd = self.learner.delta_update()
        upd.meta["incarnation"] = self.incarnation
        data = upd.pack()
        self.q.publish_policy(policy_tag(self.incarnation, upd.version), data)
        dt = time.perf_counter() - t0
        self.learner.note_sync(dt)
        self.last_sync_bytes = len(data)
        return dt

    # -- jobs ---------------------------------------------------------------------------------------
    def submit(self, key: tuple[str, int], jobs: list[PromptJob]) -> None:
        if key in self.buckets:
            return
        self.buckets[key] = Bucket(key, [j.job_id for j in jobs])
        self._send([(key, j, 0) for j in jobs])

    def _send(self, items: list[tuple[tuple[str, int], PromptJob, int]]) -> None:
        wire = []
        for key, job, attempt in items:
            wid = wire_job_id(job.job_id, self.incarnation, attempt)
            self.wanted[wid] = (key, job, attempt)
            wire.append(job.model_copy(update={"job_id": wid}))
        # Not blocked by backpressure: the learner is the jobs stream's only producer and bounds it itself (a
        # step's and an evaluation's prompts ahead). Blocked, a submission larger than the pipeline holds
        # (jobs + rollouts + graded, max_queue each; toy v2 evaluates 640 problems) deadlocks: the learner
        # waits for room in `jobs` before it ever collects `graded`, and every stage behind it is full.
        self.q.put_many("jobs", wire, block=False)

    def _rerequest(self, key, job: PromptJob, attempt: int, why: str) -> None:
        if attempt + 1 >= max(2, self.cfg.pipeline.max_deliveries + 1):
            raise QueueError(f"job {job.job_id} failed {attempt + 1} times; last: {why}")
        if key[0] == "train":
            job = job.model_copy(update={"min_version": max(0, self.learner.policy_version - self.k)})
        self.counters["rerequested"] += 1
        self.log.warning("re-requesting %s (%s)", job.job_id, why)
        self._send([(key, job, attempt + 1)])

    def collect(self, key: tuple[str, int]) -> list[GradedGroup]:
        """Block until every job of the bucket has one graded group; returns them in job order."""
        bucket = self.buckets[key]
        t_log = time.monotonic()
        while not bucket.complete:
            if self.stop:
                raise Stopped()
            self.health.beat()
            ds = self.q.read("graded", GROUP, self.consumer, GradedGroup, count=64)
            self.q.ack_many(ds, GROUP)
            for d in ds:
                self._accept(d.item)
            if not ds:
                self._check_dead_letters()
                self._check_lost()
                if time.monotonic() - t_log > WAIT_LOG_S:
                    t_log = time.monotonic()
                    self.log.info("waiting for %d/%d groups of %s (queued jobs %d, rollouts %d)",
                                  len(bucket.order) - len(bucket.got), len(bucket.order), key,
                                  self.q.backlog("jobs"), self.q.backlog("rollouts"))
        del self.buckets[key]
        return [bucket.got[j] for j in bucket.order]

    def _accept(self, gg: GradedGroup) -> None:
        entry = self.wanted.get(gg.group.job_id)
        if entry is None:  # an earlier incarnation's, or an attempt already answered
            self.counters["ignored"] += 1
            return
        key, job, attempt = entry
        bucket = self.buckets.get(key)
        if bucket is None or job.job_id in bucket.got:
            self.counters["duplicates"] += 1
            return
        del self.wanted[gg.group.job_id]
        if key[0] == "train" and gg.group.policy_version < self.learner.policy_version - self.k:
            self.counters["stale_dropped"] += 1
            self._rerequest(key, job, attempt, f"sampled with version {gg.group.policy_version} < "
                                               f"{self.learner.policy_version} - {self.k}")
            return
        for wid in [w for w, (k2, j2, _) in self.wanted.items() if k2 == key and j2.job_id == job.job_id]:
            del self.wanted[wid]  # other attempts of the same job are no longer needed
        bucket.got[job.job_id] = gg.model_copy(update={"group": gg.group.model_copy(update={"job_id": job.job_id})})

    def _check_lost(self) -> None:
        """Work can only vanish with Redis itself (a crash loses up to a second of AOF). Every queue
        message in flight stays in its stream until acked, so: all streams empty twice in a row while
        groups are missing => they were lost; republish the policy and re-request them."""
        now = time.monotonic()
        if now - self._last_lost_check < LOST_CHECK_S:
            return
        self._last_lost_check = now
        empty = all(self.q.backlog(s) == 0 for s in ("jobs", "rollouts", "graded"))
        self._empty_checks = self._empty_checks + 1 if empty and self.wanted else 0
        if self._empty_checks < 2:
            return
        self._empty_checks = 0
        lost = list(self.wanted.items())
        self.log.warning("%d job(s) lost (all queues empty); republishing the policy and re-requesting", len(lost))
        self.publish()
        for wid, (key, job, attempt) in lost:
            del self.wanted[wid]
            self._rerequest(key, job, attempt, "lost")

    def _check_dead_letters(self) -> None:
        for mid, f in self.q.dead_letters(after=self.dlq_cursor):
            self.dlq_cursor = mid
            entry = self.wanted.pop(f.get("job_id", ""), None)
            if entry is not None:
                self._rerequest(entry[0], entry[1], entry[2], f"dead-lettered: {f.get('reason')}")
            else:
                self.log.warning("dead letter in %s: %s", f.get("stream"), f.get("reason"))

    def step_done(self, step: int, row: dict, ev: dict | None, t: dict) -> None:
        """pipeline.jsonl row (waits, re-requests, bytes) + one log line per step."""
        rec = {"step": step, "policy_version": self.learner.policy_version, "incarnation": self.incarnation,
               "t_step": t["t_step"], **{k: v for k, v in t.items() if k != "t_step"}, "t_train": row.get("t_train"),
               "sync_bytes": self.last_sync_bytes,
               "eval": ev is not None, **self.counters}
        with self.pipeline_log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        msg = (f"step {step + 1}/{self.cfg.train.steps} reward {row.get('reward_mean', 0):.2f} "
               f"pass {row.get('pass_rate', 0) or 0:.2f} hack {row.get('hack_strict', 0) or 0:.2f} "
               f"wait {t['t_wait']:.2f}s train {row.get('t_train', 0):.2f}s step {t['t_step']:.2f}s")
        if ev is not None:
            msg += f" | eval pass {ev.get('pass_rate', 0) or 0:.2f} hack {ev.get('hack_strict', 0) or 0:.2f}"
        self.log.info(msg)


class InProcessSource:
    """Engine and grader in this process. The HF engine shares the learner's model object, so a new
    policy version is live the moment the optimizer steps: publishing only bumps the version tag."""

    def __init__(self, learner, engine=None, grader=None):
        self.learner = learner
        if engine is None:
            from rollout.hf_engine import HFEngine

            engine = HFEngine(learner.model, learner.tokenizer, device=learner.device)
        self.engine = engine
        self.own_grader = grader is None
        if grader is None:
            from reward_server.grader import Grader

            cfg = learner.cfg.reward
            grader = Grader(cfg, workers=cfg.workers or None)
        self.grader = grader
        self.pending: dict[tuple[str, int], list[PromptJob]] = {}

    def publish(self, learner) -> float:
        t0 = time.perf_counter()
        self.engine.version = learner.policy_version  # same model object: the weights are already live
        dt = time.perf_counter() - t0
        learner.note_sync(dt)
        return dt

    def submit(self, key: tuple[str, int], jobs: list[PromptJob]) -> None:
        self.pending.setdefault(key, jobs)

    def collect(self, key: tuple[str, int]) -> list[GradedGroup]:
        groups = self.engine.generate(self.pending.pop(key))  # quarantine follows job.adapter_mode
        return grade_groups(self.grader, self.learner.problems, groups)[0]

    def step_done(self, step: int, row: dict, ev: dict | None, timings: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        if self.own_grader and hasattr(self.grader, "close"):
            self.grader.close()


def make_source(kind: str, learner, **kw):
    """The one factory: "inprocess" (engine=, grader=) or "redis" (queues=, log=, stop=)."""
    if kind == "inprocess":
        return InProcessSource(learner, engine=kw.get("engine"), grader=kw.get("grader"))
    if kind == "redis":
        return RedisSource(learner.cfg, learner, kw["queues"], kw.get("log") or logging.getLogger("rankguard.learner"),
                           stop=kw.get("stop"))
    raise ValueError(f"unknown rollout source {kind!r}; valid: inprocess, redis")


def run_inprocess(cfg: RunConfig, resume: bool = True, progress: bool = True, learner=None, engine=None,
                  grader=None) -> dict:
    """`rankguard train`: Learner + in-process source + the one loop; returns the run summary."""
    from learner.loop import run_training
    from learner.trainer import Learner

    learner = learner or Learner(cfg, resume=resume, progress=progress)
    source = make_source("inprocess", learner, engine=engine, grader=grader)
    try:
        return run_training(learner, source, progress=progress)
    finally:
        source.close()
