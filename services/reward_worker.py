"""Reward worker: RolloutGroups in, GradedGroups out. Workers pull on their own from one consumer
group, so adding workers (`docker compose up --scale reward=8`) adds throughput.

    python -m services.reward_worker --config RUN_DIR/config.json [--redis-url URL] [--http-port 8100]
                                     [--http-host 127.0.0.1]

Grades in-process with `Grader` (sandboxed subprocesses). With --http-port the same process also
serves the reward FastAPI app, so every worker is a reward-server replica as well: on loopback by
default; another --http-host needs $RANKGUARD_REWARD_TOKEN (reward_server.access), checked at start. A group is
published and its input acked atomically (Queues.finish, keyed by the group's job id): a group
redelivered after a crash or a stall is graded again at worst, but published once. The read ->
dedupe -> process -> publish loop (and what a SIGTERM mid-batch does) is services.consumer's.
"""
from __future__ import annotations

import logging
import threading

from reward_server.grader import failed_grade, grade_groups
from reward_server.sandbox import SandboxError
from shared.config import RunConfig
from shared.schemas import GradedGroup, RolloutGroup

from .consumer import Consumer
from .procs import StopFlag, exit_now, load_service_config, run_service, service_parser
from .rollout_service import default_batch
from .queues import Heartbeat, default_consumer, queues_for

GROUP = "reward"


def load_problems_by_id(cfg: RunConfig) -> dict:
    from shared.problems import load_problem_sets

    train, held = load_problem_sets(cfg)
    return {p.key: p for p in list(train) + list(held)}


def make_grader(cfg: RunConfig):
    from reward_server.grader import Grader

    return Grader(cfg.reward, workers=cfg.reward.workers or None)


class RewardWorker:
    """The consumer loop's reward stage (services.consumer): rollouts in, graded groups out."""

    group, source, sink, item = GROUP, "rollouts", "graded", RolloutGroup

    def __init__(self, cfg: RunConfig, grader, problems: dict, queues, log: logging.Logger,
                 batch: int = 8, stop: StopFlag | None = None):
        self.cfg, self.grader, self.problems, self.q, self.log = cfg, grader, problems, queues, log
        self.batch, self.stop = batch, stop if stop is not None else StopFlag()
        self.consumer = default_consumer("reward")
        self.stats = {"groups": 0, "completions": 0, "duplicates": 0, "stale": 0, "failed": 0, "grade_s": 0.0,
                      "cache_hits": 0}
        self.loop = Consumer(self, queues, log, self.consumer, batch, self.stop, service="reward")

    def run(self) -> None:
        self.log.info("waiting for rollouts (consumer %s)", self.consumer)
        self.loop.run()
        self.log.info("stopping: %s", self.stats)

    def step_once(self, hb: Heartbeat | None = None) -> int:
        return self.loop.step_once(hb)

    def reject(self, group: RolloutGroup) -> str | None:
        if group.problem_id not in self.problems:  # can never be graded
            return f"cannot grade: unknown problem_id {group.problem_id!r}"
        return None

    def process(self, groups: list[RolloutGroup]) -> list[GradedGroup]:
        """All completions of the batch in one grade_many call (the grader parallelises across them).
        A completion never stops the worker: if the batch fails, each group is graded on its own and
        a group that still fails is graded as failed, with the reason as its status."""
        try:
            return grade_groups(self.grader, self.problems, groups)[0]
        except SandboxError:  # the worker's own fault (its sandbox is gone): exit, be restarted
            raise
        except Exception as e:  # noqa: BLE001
            self.log.exception("grading a batch failed (%s); grading its groups one by one", type(e).__name__)
        return [self._one(g) for g in groups]

    def _one(self, group: RolloutGroup) -> GradedGroup:
        try:
            return grade_groups(self.grader, self.problems, [group])[0][0]
        except SandboxError:
            raise
        except Exception as e:  # noqa: BLE001
            self.stats["failed"] += 1
            status = f"grader_error: {type(e).__name__}: {str(e)[:200]}"
            self.log.error("group %s graded as failed: %s", group.job_id, status)
            problem = self.problems[group.problem_id]
            return GradedGroup(group=group, grades=[failed_grade(problem, None, status, c.rollout_id)
                                                    for c in group.completions])

    def count(self, groups: list[RolloutGroup], graded: list[GradedGroup], fresh: list[bool]) -> None:
        self.stats["groups"] += sum(fresh)
        self.stats["completions"] += sum(len(g.completions) for g in groups)
        self.stats["grade_s"] += sum(g.grade_seconds for g in graded)
        self.stats["cache_hits"] += sum(bool(getattr(x, "cached", False)) for g in graded for x in g.grades)


def serve_http(cfg: RunConfig, port: int, log: logging.Logger, grader=None, problems: dict | None = None,
               host: str = "127.0.0.1", token: str | None = None) -> threading.Thread:
    """The reward FastAPI app on host:port in a daemon thread of this process, sharing its grader.
    Beyond loopback it needs a token (AccessError otherwise, before anything is served)."""
    import uvicorn

    from reward_server.access import check_exposure
    from reward_server.app import create_app

    check_exposure(host, token)
    app = create_app(cfg, grader=grader, problems=problems, token=token)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    server.install_signal_handlers = lambda: None  # the worker's StopFlag owns SIGTERM
    t = threading.Thread(target=server.run, daemon=True, name="reward-http")
    t.start()
    log.info("serving the reward API on http://%s:%d (docs at /docs%s)", host, port,
             ", bearer token required" if token else "")
    return t


def main(argv: list[str] | None = None) -> int:
    parser = service_parser("reward_worker", __doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, default=None, help="also serve the reward HTTP API here")
    parser.add_argument("--http-host", default="127.0.0.1",
                        help="interface for --http-port (default loopback; anything else needs $RANKGUARD_REWARD_TOKEN)")
    parser.add_argument("--batch", type=int, default=None, help="groups per read (default max(prompts_per_step, eval_problems))")
    args = parser.parse_args(argv)

    def body(log: logging.Logger) -> None:
        cfg = load_service_config(args.config)
        if args.http_port:
            from reward_server.access import check_exposure, load_token

            token = load_token()
            check_exposure(args.http_host, token)  # exit 2 before a grader starts
        stop = StopFlag().install()
        q = queues_for(cfg, args.redis_url, args.run_id, stop=lambda: bool(stop))
        grader = make_grader(cfg)
        problems = load_problems_by_id(cfg)
        if args.http_port:
            serve_http(cfg, args.http_port, log, grader=grader, problems=problems, host=args.http_host, token=token)
        worker = RewardWorker(cfg, grader, problems, q, log, batch=args.batch or default_batch(cfg), stop=stop)
        try:
            worker.run()
        finally:
            close = getattr(grader, "close", None)
            # after a stop mid-batch the grader still holds that batch's queued work, which close()
            # would finish first; its sandboxes leave with this process instead (control socket EOF)
            if callable(close) and not worker.loop.abandoned:
                close()

    return run_service("reward", body)


if __name__ == "__main__":
    exit_now(main())
