"""Learner service: the same loop as `learner.trainer.run_inprocess`, with the rollout engine and the
grader on the other side of Redis.

    python -m services.learner_service --config RUN_DIR/config.json [--redis-url URL] [--no-resume]

Per step: publish the policy (DeltaSUpdate -> Redis key + notification) -> enqueue the step's
PromptJobs -> collect exactly one GradedGroup per job (duplicates ignored) -> train_step -> publish ->
eval (at step 0, every eval_every and at the end; eval jobs go through the same pipeline) ->
checkpoint (every checkpoint_every and at the end) -> finish.

Version handshake (pipeline.max_staleness = k): jobs carry min_version = version - k (the Learner
sets it); with k = 0 every group is sampled with exactly the current policy. With k > 0 the jobs of
the next k steps are enqueued ahead, and a group sampled with a version older than current - k is
dropped and its job re-requested; Learner.train_step applies the truncated IS correction to the rest.

Every start of this service is a new *incarnation* (a Redis counter): job ids travel as
`<job_id>@<incarnation>.<attempt>`, the run's queues are emptied at start, and results of an earlier
incarnation (work in flight when the learner was killed) are ignored, so `--resume` is exact.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import RunConfig
from shared.schemas import GradedGroup, PromptJob

from .procs import Health, StopFlag, exit_now, load_service_config, run_service, service_parser, set_torch_threads
from .queues import QueueError, Queues, default_consumer, policy_tag, queues_for, wire_job_id

GROUP = "learner"
WAIT_LOG_S = 30.0
LOST_CHECK_S = 1.0


class Stopped(Exception):
    """SIGTERM while waiting: leave without a new checkpoint (resume starts from the last one)."""


@dataclass
class Bucket:
    """One batch the learner waits for: a train step's jobs or an evaluation's."""

    key: tuple[str, int]
    order: list[str]  # original job ids, in make_jobs order
    got: dict[str, GradedGroup] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.got) == len(self.order)


class LearnerService:
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
    def publish(self) -> float:
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
        self.q.put_many("jobs", wire)

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

    # -- the loop (mirrors run_inprocess) -----------------------------------------------------------
    def evaluate(self, step: int) -> dict:
        key = ("eval", step)
        self.submit(key, self.learner.eval_jobs(step))
        return self.learner.record_eval(step, self.collect(key))

    def enqueue_ahead(self) -> None:
        s, total = self.learner.step, self.cfg.train.steps
        for ahead in range(s, min(total, s + self.k + 1)):
            if ("train", ahead) not in self.buckets:
                self.submit(("train", ahead), self.learner.make_jobs(ahead))

    def run(self) -> dict:
        L, cfg = self.learner, self.cfg
        total = cfg.train.steps
        done_evals = {r["step"] for r in L.eval_history}
        self.publish()
        if L.step == 0 and 0 not in done_evals and cfg.train.eval_every > 0:
            self.evaluate(0)
        while L.step < total:
            t_step = time.perf_counter()
            step = L.step
            self.enqueue_ahead()
            t0 = time.perf_counter()
            groups = self.collect(("train", step))
            t_wait = time.perf_counter() - t0
            t0 = time.perf_counter()
            row = L.train_step(groups)
            t = {"t_wait": t_wait, "t_train_wall": time.perf_counter() - t0, "t_publish": self.publish()}
            s = L.step
            ev = None
            t0 = time.perf_counter()
            if (cfg.train.eval_every > 0 and s % cfg.train.eval_every == 0) or s == total:
                ev = self.evaluate(s)
            t1 = time.perf_counter()
            if (cfg.train.checkpoint_every > 0 and s % cfg.train.checkpoint_every == 0) or s == total:
                L.save_checkpoint()
            t.update(t_eval=t1 - t0, t_checkpoint=time.perf_counter() - t1)
            self._log_step(step, row, ev, t, time.perf_counter() - t_step)
        return L.finish()

    def _log_step(self, step: int, row: dict, ev: dict | None, t: dict, t_all: float) -> None:
        rec = {"step": step, "policy_version": self.learner.policy_version, "incarnation": self.incarnation,
               "t_step": t_all, **t, "t_train": row.get("t_train"), "sync_bytes": self.last_sync_bytes,
               "eval": ev is not None, **self.counters}
        with self.pipeline_log.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        msg = (f"step {step + 1}/{self.cfg.train.steps} reward {row.get('reward_mean', 0):.2f} "
               f"pass {row.get('pass_rate', 0) or 0:.2f} hack {row.get('hack_strict', 0) or 0:.2f} "
               f"wait {t['t_wait']:.2f}s train {row.get('t_train', 0):.2f}s step {t_all:.2f}s")
        if ev is not None:
            msg += f" | eval pass {ev.get('pass_rate', 0) or 0:.2f} hack {ev.get('hack_strict', 0) or 0:.2f}"
        self.log.info(msg)


def main(argv: list[str] | None = None) -> int:
    parser = service_parser("learner_service", __doc__.splitlines()[0])
    parser.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
    args = parser.parse_args(argv)

    def body(log: logging.Logger) -> None:
        cfg = load_service_config(args.config)
        set_torch_threads(cfg.train.torch_threads)
        stop = StopFlag().install()
        q = queues_for(cfg, args.redis_url, args.run_id, stop=lambda: bool(stop))
        from learner.trainer import Learner

        learner = Learner(cfg, resume=not args.no_resume)
        try:
            summary = LearnerService(cfg, learner, q, log, stop=stop).run()
            log.info("finished: %s", json.dumps({k: summary.get(k) for k in ("arm", "seed", "steps", "sec_per_step")}))
        except Stopped:
            log.info("stopped at step %d (resume continues from the last checkpoint)", learner.step)
            learner.close()

    return run_service("learner", body)


if __name__ == "__main__":
    exit_now(main())
