"""Rollout worker: PromptJobs in, RolloutGroups out, sampled with the policy version each job needs.

    python -m services.rollout_service --config RUN_DIR/config.json [--redis-url URL] [--batch N]

Loads its own policy copy (`load_policy`) behind the engine chosen by `pipeline.engine` ("vllm" when
importable, else HFEngine). Before sampling a batch it compares the published policy tag
(<learner incarnation>:<version>) with the one it holds and fetches + loads the DeltaSUpdate when they
differ; a job whose min_version is newer than anything published waits for it. Each group is
published and its job acked in one atomic step (Queues.finish), so a killed worker's jobs are
re-claimed by another worker and never published twice. The read -> dedupe -> process -> publish
loop (and what a SIGTERM mid-batch does) is services.consumer's.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time

from shared.config import RunConfig
from shared.schemas import DeltaSUpdate, PromptJob, RolloutGroup

from .consumer import Consumer, StopRequested
from .procs import StopFlag, exit_now, load_service_config, run_service, service_parser, set_torch_threads
from .queues import Heartbeat, QueueError, default_consumer, parse_policy_tag, parse_wire_id, queues_for

GROUP = "rollout"
POLICY_WAIT_S = 600.0


def make_engine(cfg: RunConfig, log: logging.Logger):
    """Engine per cfg.pipeline.engine: "vllm" (or "auto" with vllm importable) -> VLLMEngine, else HFEngine."""
    choice = cfg.pipeline.engine
    if choice in ("vllm", "auto") and importlib.util.find_spec("vllm") is not None:
        try:
            from rollout.vllm_engine import VLLMEngine

            log.info("engine: vLLM (CUDA_VISIBLE_DEVICES=%s, tensor_parallel_size %d)",
                     os.environ.get("CUDA_VISIBLE_DEVICES", "all"), cfg.vllm.tensor_parallel_size)
            engine = VLLMEngine(cfg)
            log.info("vLLM up: gpu_memory_utilization %.2f, max_model_len %d", engine.gpu_memory_utilization,
                     engine.max_model_len)
            return engine
        except ImportError as e:
            log.warning("vLLM engine unavailable (%s); falling back to HF generate", e)
    elif choice == "vllm":
        log.warning("pipeline.engine=vllm but vllm is not installed; falling back to HF generate")
    from rollout.hf_engine import HFEngine
    from shared.modeling import load_policy

    policy = load_policy(cfg, progress=False)
    log.info("engine: HF generate on %s (%d wrapped modules, load %.1f s)", policy.device,
             len(policy.module_names), policy.load_s + policy.wrap_s)
    return HFEngine(policy.model, policy.tokenizer, device=policy.device)


def default_batch(cfg: RunConfig) -> int:
    """Jobs per read: a whole train step or a whole evaluation, so one engine call samples all of it."""
    return max(cfg.train.prompts_per_step, cfg.train.eval_problems)


class RolloutWorker:
    """The consumer loop's rollout stage (services.consumer): prompt jobs in, rollout groups out."""

    group, source, sink, item = GROUP, "jobs", "rollouts", PromptJob

    def __init__(self, cfg: RunConfig, engine, queues, log: logging.Logger, batch: int | None = None,
                 stop: StopFlag | None = None):
        self.cfg, self.engine, self.q, self.log = cfg, engine, queues, log
        self.batch = batch or default_batch(cfg)
        self.stop = stop if stop is not None else StopFlag()
        self.consumer = default_consumer("rollout")
        self.held = (-1, -1)  # (incarnation, version) of the loaded delta
        self.stats = {"jobs": 0, "duplicates": 0, "stale": 0, "syncs": 0, "sync_s": 0.0, "sync_bytes": 0}
        self.loop = Consumer(self, queues, log, self.consumer, self.batch, self.stop, service="rollout")

    # -- policy -------------------------------------------------------------------------------------
    def sync_policy(self, need: tuple[int, int] = (-1, -1)) -> None:
        """Load the published delta if it differs from the held one; wait while it is older than `need`."""
        t0 = time.monotonic()
        while True:
            if self.stop:
                raise StopRequested(f"while waiting for policy {need}")
            tag, data = self.q.fetch_policy() if self.q.policy_tag() != self._held_tag() else (None, None)
            if tag is not None and data is not None:
                t1 = time.perf_counter()
                update = DeltaSUpdate.unpack(data)
                self.engine.load_delta(update)
                self.held = parse_policy_tag(tag)
                dt = time.perf_counter() - t1
                self.stats["syncs"] += 1
                self.stats["sync_s"] += dt
                self.stats["sync_bytes"] += len(data)
                self.log.debug("loaded policy %s (%d bytes, %.1f ms)", tag, len(data), dt * 1e3)
            if self.held >= need:
                return
            if time.monotonic() - t0 > POLICY_WAIT_S:
                raise QueueError(f"policy {need} never published (holding {self.held})")
            time.sleep(0.01)

    def _held_tag(self) -> str | None:
        return None if self.held[0] < 0 else f"{self.held[0]}:{self.held[1]}"

    # -- loop ---------------------------------------------------------------------------------------
    def run(self) -> None:
        self.log.info("waiting for jobs (consumer %s, batch %d)", self.consumer, self.batch)
        self.loop.run()
        self.log.info("stopping: %s", self.stats)

    def step_once(self, hb: Heartbeat | None = None) -> int:
        return self.loop.step_once(hb)

    def reject(self, job: PromptJob) -> str | None:
        return None  # any job can be sampled

    def process(self, jobs: list[PromptJob]) -> list[RolloutGroup]:
        """Sample the batch in one engine call, with a policy at least as new as every job needs."""
        self.sync_policy(max((parse_wire_id(j.job_id)[1], j.min_version) for j in jobs))
        groups = {g.job_id: g for g in self.engine.generate(jobs)}
        return [groups[j.job_id] for j in jobs]

    def count(self, jobs: list[PromptJob], groups: list[RolloutGroup], fresh: list[bool]) -> None:
        self.stats["jobs"] += sum(fresh)


def main(argv: list[str] | None = None) -> int:
    parser = service_parser("rollout_service", __doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="jobs per generate call (default max(prompts_per_step, eval_problems))")
    args = parser.parse_args(argv)

    def body(log: logging.Logger) -> None:
        cfg = load_service_config(args.config)
        set_torch_threads(cfg.train.torch_threads)
        stop = StopFlag().install()
        q = queues_for(cfg, args.redis_url, args.run_id, stop=lambda: bool(stop))
        engine = make_engine(cfg, log)
        worker = RolloutWorker(cfg, engine, q, log, batch=args.batch, stop=stop)
        try:
            worker.run()
        finally:
            close = getattr(engine, "close", None)
            # the vLLM engine runs in a child process; after a stop mid-batch it may still be sampling,
            # and it dies with this process (PDEATHSIG, socket EOF) rather than be waited for
            if callable(close) and not worker.loop.abandoned:
                close()

    return run_service("rollout", body)


if __name__ == "__main__":
    exit_now(main())
