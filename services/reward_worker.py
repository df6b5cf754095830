"""Reward worker: RolloutGroups in, GradedGroups out. Workers pull on their own from one consumer
group, so adding workers (`docker compose up --scale reward=8`) adds throughput.

    python -m services.reward_worker --config RUN_DIR/config.json [--redis-url URL] [--http-port 8100]

Grades in-process with `Grader` (sandboxed subprocesses). With --http-port the same process also
serves the reward FastAPI app, so every worker is a reward-server replica as well. A group is
published and its input acked atomically (Queues.finish, keyed by the group's job id): a group
redelivered after a crash or a stall is graded again at worst, but published once.
"""
from __future__ import annotations

import logging
import threading

from reward_server.grader import grade_groups
from shared.config import RunConfig
from shared.schemas import RolloutGroup

from .procs import Health, StopFlag, exit_now, load_service_config, run_service, service_parser
from .rollout_service import default_batch
from .queues import Heartbeat, default_consumer, parse_policy_tag, parse_wire_id, queues_for

GROUP = "reward"


def load_problems_by_id(cfg: RunConfig) -> dict:
    from shared.problems import load_problem_sets

    train, held = load_problem_sets(cfg)
    return {p.key: p for p in list(train) + list(held)}


def make_grader(cfg: RunConfig):
    from reward_server.grader import Grader

    return Grader(cfg.reward, workers=cfg.reward.workers or None)


class RewardWorker:
    def __init__(self, cfg: RunConfig, grader, problems: dict, queues, log: logging.Logger,
                 batch: int = 8, stop: StopFlag | None = None):
        self.cfg, self.grader, self.problems, self.q, self.log = cfg, grader, problems, queues, log
        self.batch, self.stop = batch, stop if stop is not None else StopFlag()
        self.consumer = default_consumer("reward")
        self.stats = {"groups": 0, "completions": 0, "duplicates": 0, "stale": 0, "failed": 0, "grade_s": 0.0,
                      "cache_hits": 0}

    def run(self) -> None:
        self.log.info("waiting for rollouts (consumer %s)", self.consumer)
        health = Health("reward")
        with Heartbeat(self.q, "rollouts", GROUP, self.consumer) as hb:
            while not self.stop:
                health.beat()
                self.step_once(hb)
        self.log.info("stopping: %s", self.stats)

    def step_once(self, hb: Heartbeat | None = None) -> int:
        deliveries = self.q.read("rollouts", GROUP, self.consumer, RolloutGroup, count=self.batch)
        if not deliveries:
            return 0
        if hb is not None:
            hb.ids = [d.msg_id for d in deliveries]
        current_inc = parse_policy_tag(self.q.policy_tag())[0]
        todo, skip = [], []
        for d, done in zip(deliveries, self.q.done_flags(GROUP, [d.item.job_id for d in deliveries])):
            group: RolloutGroup = d.item
            if done:
                self.stats["duplicates"] += 1
                skip.append(d)
            elif parse_wire_id(group.job_id)[1] < current_inc:  # from a learner that has restarted
                self.stats["stale"] += 1
                skip.append(d)
            elif group.problem_id not in self.problems:  # can never be graded: dead-letter it now
                self.stats["failed"] += 1
                self.q.dead_letter(d, GROUP, f"cannot grade: unknown problem_id {group.problem_id!r}",
                                   job_id=group.job_id)
            else:
                todo.append(d)
        self.q.ack_many(skip, GROUP)
        # all completions of the batch in one grade_many call: the grader parallelises across them
        graded, _ = grade_groups(self.grader, self.problems, [d.item for d in todo])
        self.q.wait_for_room("graded", len(todo))
        fresh = self.q.finish_many([(d, d.item.job_id, [("graded", g)]) for d, g in zip(todo, graded)], GROUP, GROUP)
        self.stats["groups"] += sum(fresh)
        self.stats["duplicates"] += len(fresh) - sum(fresh)
        self.stats["completions"] += sum(len(d.item.completions) for d in todo)
        self.stats["grade_s"] += sum(g.grade_seconds for g in graded)
        self.stats["cache_hits"] += sum(bool(getattr(x, "cached", False)) for g in graded for x in g.grades)
        if hb is not None:
            hb.ids = []
        return len(todo)


def serve_http(cfg: RunConfig, port: int, log: logging.Logger, grader=None, problems: dict | None = None
               ) -> threading.Thread:
    """The reward FastAPI app on 0.0.0.0:port in a daemon thread of this process, sharing its grader."""
    import uvicorn

    from reward_server.app import create_app

    app = create_app(cfg, grader=grader, problems=problems)
    server = uvicorn.Server(uvicorn.Config(app, host="0.0.0.0", port=port, log_level="warning"))
    server.install_signal_handlers = lambda: None  # the worker's StopFlag owns SIGTERM
    t = threading.Thread(target=server.run, daemon=True, name="reward-http")
    t.start()
    log.info("serving the reward API on :%d", port)
    return t


def main(argv: list[str] | None = None) -> int:
    parser = service_parser("reward_worker", __doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, default=None, help="also serve the reward HTTP API here")
    parser.add_argument("--batch", type=int, default=None, help="groups per read (default max(prompts_per_step, eval_problems))")
    args = parser.parse_args(argv)

    def body(log: logging.Logger) -> None:
        cfg = load_service_config(args.config)
        stop = StopFlag().install()
        q = queues_for(cfg, args.redis_url, args.run_id, stop=lambda: bool(stop))
        grader = make_grader(cfg)
        problems = load_problems_by_id(cfg)
        if args.http_port:
            serve_http(cfg, args.http_port, log, grader=grader, problems=problems)
        try:
            RewardWorker(cfg, grader, problems, q, log, batch=args.batch or default_batch(cfg), stop=stop).run()
        finally:
            close = getattr(grader, "close", None)
            if callable(close):
                close()

    return run_service("reward", body)


if __name__ == "__main__":
    exit_now(main())
