"""What every generation engine offers: load a policy version's delta_S, sample groups for prompt jobs."""
from __future__ import annotations

from typing import Protocol

from shared.schemas import DeltaSUpdate, PromptJob, RolloutGroup


class Engine(Protocol):
    version: int  # policy version of the weights currently loaded

    def load_delta(self, update: DeltaSUpdate) -> None:
        """Merge W = U diag(S + delta_S (+ quarantine)) Vh into the engine's weights; set version."""

    def generate(self, jobs: list[PromptJob]) -> list[RolloutGroup]:
        """Sample job.sampling.n completions per job with token ids and per-token logprobs."""
