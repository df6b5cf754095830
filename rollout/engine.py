"""What every generation engine offers: load a policy version's delta_S, sample groups for prompt jobs."""
from __future__ import annotations

import time
from typing import Callable, Protocol

from shared.schemas import DeltaSUpdate, PromptJob, RolloutGroup


class Engine(Protocol):
    version: int  # policy version of the weights currently loaded

    def load_delta(self, update: DeltaSUpdate) -> None:
        """Merge W = U diag(S + delta_S (+ quarantine)) Vh into the engine's weights; set version."""

    def generate(self, jobs: list[PromptJob]) -> list[RolloutGroup]:
        """Sample job.sampling.n completions per job with token ids and per-token logprobs."""


def generate_by_mode(jobs: list[PromptJob], sample: Callable[[list[PromptJob], bool], list[RolloutGroup]],
                     prepare: Callable[[bool], None] | None = None) -> list[RolloutGroup]:
    """Sample train-mode jobs (quarantine live, route arm) and the others apart, train first.

    Per mode present: `prepare(train)` (untimed: vLLM reloads its weights for the mode there), then
    `sample(part, train)`, whose wall time is shared out evenly as each group's gen_seconds.
    Groups come back in job order.
    """
    out: dict[str, RolloutGroup] = {}
    for train in (True, False):
        part = [j for j in jobs if (j.adapter_mode == "train") == train]
        if not part:
            continue
        if prepare is not None:
            prepare(train)
        t0 = time.perf_counter()
        groups = sample(part, train)
        share = (time.perf_counter() - t0) / len(part)
        for g in groups:
            g.gen_seconds = share
            out[g.job_id] = g
    return [out[j.job_id] for j in jobs]


def stop_token_ids(tokenizer) -> list[int]:
    """EOS + <|im_end|>: the stop set every engine uses, so HF and vLLM samples end alike."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end >= 0 and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    return sorted(set(ids))
