"""Learner service: the one training loop (learner/loop.py) over the Redis source (services/sources.py),
with the rollout engine and the grader on the other side of Redis.

    python -m services.learner_service --config RUN_DIR/config.json [--redis-url URL]

It always resumes from the run dir's newest good checkpoint: a fresh start goes through
`rankguard up --fresh` / `prepare --fresh`, which move the old run aside (nothing is deleted here).

Per step: publish the policy (DeltaSUpdate -> Redis key + notification) -> enqueue the step's
PromptJobs -> collect exactly one GradedGroup per job (duplicates ignored) -> train_step -> publish ->
eval (at step 0, every eval_every and at the end; eval jobs go through the same pipeline) ->
checkpoint (every checkpoint_every and at the end) -> finish.

Version handshake (pipeline.max_staleness = k): jobs carry min_version = version - k (the Learner
sets it); with k = 0 every group is sampled with exactly the current policy. With k > 0 the jobs of
the next k steps are enqueued ahead, and a group sampled with a version older than current - k is
dropped and its job re-requested; for the rest Learner.train_step takes the PPO ratio against the
behaviour log-probs the engine sent (clipped, dual-clipped at pipeline.is_clip).

Every start of this service is a new *incarnation* (a Redis counter): job ids travel as
`<job_id>@<incarnation>.<attempt>`, the run's queues are emptied at start, and results of an earlier
incarnation (work in flight when the learner was killed) are ignored, so `--resume` is exact.
"""
from __future__ import annotations

import json
import logging

from .procs import StopFlag, exit_now, load_service_config, run_service, service_parser, set_torch_threads
from .queues import queues_for
from .sources import Stopped, make_source


def main(argv: list[str] | None = None) -> int:
    parser = service_parser("learner_service", __doc__.splitlines()[0])
    args = parser.parse_args(argv)

    def body(log: logging.Logger) -> None:
        cfg = load_service_config(args.config)
        set_torch_threads(cfg.train.torch_threads)
        stop = StopFlag().install()
        q = queues_for(cfg, args.redis_url, args.run_id, stop=lambda: bool(stop))
        from learner.loop import run_training
        from learner.trainer import Learner

        learner = Learner(cfg, resume=True)
        try:
            if stop:  # SIGTERM while the model and directions were loading
                raise Stopped()
            summary = run_training(learner, make_source("redis", learner, queues=q, log=log, stop=stop))
            log.info("finished: %s", json.dumps({k: summary.get(k) for k in ("arm", "seed", "steps", "sec_per_step")}))
        except Stopped:
            from learner.checkpoint import resume_point

            log.info("stopped at step %d; %s", learner.step, resume_point(learner.run_dir))
            learner.close()

    return run_service("learner", body)


if __name__ == "__main__":
    exit_now(main())
