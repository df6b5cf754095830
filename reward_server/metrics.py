"""Prometheus metrics of one reward-server app (own registry, so several apps can share a process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from shared.hacks import MODES
from shared.schemas import Grade

__all__ = ["RewardMetrics", "CONTENT_TYPE_LATEST"]


class RewardMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.graded = Counter("rankguard_reward_graded", "Completions graded", registry=r)
        self.gt_pass = Counter("rankguard_reward_gt_pass", "Completions that passed the honest check", registry=r)
        self.latency = Histogram("rankguard_reward_grade_seconds", "Seconds to grade one completion",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=r)
        self.exploited = Counter("rankguard_reward_exploited", "Strict hacks: mode's vulnerable check "
                                 "passed while gt failed", ["mode"], registry=r)
        self.attempted = Counter("rankguard_reward_attempted", "Loose hacks: static evidence per mode",
                                 ["mode"], registry=r)
        self.sandbox_failures = Counter("rankguard_reward_sandbox_failures",
                                        "Executions lost to a sandbox failure (not the program's fault)",
                                        registry=r)
        self.rejected = Counter("rankguard_reward_rejected_requests", "Requests answered 4xx", ["status"],
                                registry=r)
        self.queue_depth = Gauge("rankguard_reward_queue_depth", "Completions accepted and not yet graded",
                                 registry=r)
        for m in MODES:  # export zeros from the start
            self.exploited.labels(mode=m)
            self.attempted.labels(mode=m)

    def observe(self, g: Grade) -> None:
        self.graded.inc()
        self.latency.observe(g.seconds)
        if g.gt_pass:
            self.gt_pass.inc()
        for m in MODES:
            if g.exploited.get(m):
                self.exploited.labels(mode=m).inc()
            if g.attempted.get(m):
                self.attempted.labels(mode=m).inc()
        if getattr(g, "error", None):
            self.sandbox_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
