"""Prometheus metrics of one reward-server app (own registry, so several apps can share a process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from reward_server.reference import LABELS
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
        self.timeouts = Counter("rankguard_reward_timeouts", "Honest checks stopped by the problem's CPU budget "
                                "(or the wall ceiling above it)", registry=r)
        self.unsupported = Counter("rankguard_reward_unsupported_asserts", "Hidden asserts the judge could not "
                                   "verify (shape it does not take, or the expected side failed): never passed",
                                   registry=r)
        self.ref_label = Counter("rankguard_reward_reference_label", "rl-rewardhacking's label of each completion",
                                 ["label"], registry=r)
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
        for label in LABELS:
            self.ref_label.labels(label=label)

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
        if getattr(g, "timed_out", False):
            self.timeouts.inc()
        self.unsupported.inc(getattr(g, "n_unsupported", 0) or 0)
        if getattr(g, "ref_label", None) in LABELS:
            self.ref_label.labels(label=g.ref_label).inc()
        if getattr(g, "error", None):
            self.sandbox_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
