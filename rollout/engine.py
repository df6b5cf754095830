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


def stop_token_ids(tokenizer) -> list[int]:
    """EOS + <|im_end|>: the stop set every engine uses, so HF and vLLM samples end alike."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end >= 0 and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    return sorted(set(ids))
