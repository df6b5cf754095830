"""Rollout engine on plain transformers `generate` (CPU toy runs, tests, GPU fallback without vLLM).

All jobs x n samples decode together on the model's own KV cache (a small loop instead of
`generate`, for speed on CPU): each prompt is prefilled once and its cache fanned out to its n
rows, and rows that hit <|im_end|>/eos or their token limit leave the batch. Every row draws from
its own seeded generator (a job's samples depend only on its seed and the weights, never on what
else shares the batch) with its job's temperature, top-k, top-p and min-p. The log-prob reported
per token is log_softmax of the raw logits (temperature 1, before any warping): the policy's own
probability, what the learner recomputes.

In the in-process loop the engine holds the learner's model object itself (no copy): weights are
always current and `load_delta` only matters when the engine has its own model.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from shared.fast_decode import Qwen3Decoder, unsupported
from shared.adapter import adapter_modules, merged_inference, quarantine, set_delta
from shared.codec import decode_floats
from rollout.engine import generate_by_mode, stop_token_ids
from shared.schemas import Completion, DeltaSUpdate, PromptJob, RolloutGroup

ROW_SEED_STRIDE = 1_000_003  # row k of a job uses seed + k * stride


class EngineError(ValueError):
    """Bad job or update (empty prompt, layout mismatch); the message names the value."""


class SeededSampler:
    """Per-row temperature / top-k / top-p / min-p sampling, one torch.Generator per row.

    A row's draws depend only on its seed and its logits, so a job's samples do not change with what
    else shares the batch (or with rows that finished and left it).
    """

    def __init__(self, seeds: list[int], temperature: list[float], top_k: list[int], top_p: list[float],
                 min_p: list[float]):
        self.gens = []
        for s in seeds:
            g = torch.Generator()
            g.manual_seed(int(s) % (2**63 - 1))
            self.gens.append(g)
        self.temperature = torch.tensor(temperature, dtype=torch.float32)
        self.top_k = torch.tensor(top_k, dtype=torch.long)
        self.top_p = torch.tensor(top_p, dtype=torch.float32)
        self.min_p = torch.tensor(min_p, dtype=torch.float32)
        self.any_greedy = bool((self.temperature <= 0).any())
        self.any_top_k = bool((self.top_k > 0).any())
        self.any_top_p = bool((self.top_p < 1.0).any())
        self.any_min_p = bool((self.min_p > 0).any())

    def sample(self, logits: Tensor, rows: Tensor) -> Tensor:
        """logits [b, V] of the live rows `rows` (indices into the original batch) -> token ids [b]."""
        dev = logits.device
        logits = logits.float()
        V = logits.shape[1]
        temp = self.temperature[rows].to(dev)
        logits = logits / temp.clamp_min(1e-6)[:, None]
        cand = None  # candidate token ids per row when top-k narrows the vocabulary first
        k = self.top_k[rows].to(dev)
        if self.any_top_k and bool(((k > 0) & (k < V)).all()):
            vals, cand = logits.topk(int(k.max()), dim=-1)  # sorted descending; far cheaper than a sort
            logits = vals.masked_fill(torch.arange(vals.shape[1], device=dev)[None, :] >= k[:, None], float("-inf"))
        elif self.any_top_k or self.any_top_p:
            sorted_logits, cand = logits.sort(dim=-1, descending=True)  # top_k 0 somewhere, or top_p alone
            kk = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
            logits = sorted_logits.masked_fill(torch.arange(V, device=dev)[None, :] >= kk[:, None], float("-inf"))
        if cand is not None and self.any_top_p:  # logits are sorted descending here
            probs = logits.softmax(-1)
            before = probs.cumsum(-1) - probs  # mass strictly ahead of each token
            drop = before > self.top_p[rows].to(dev)[:, None]
            drop[:, 0] = False
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(-1)
        if self.any_min_p:
            floor = self.min_p[rows].to(dev)[:, None] * probs.max(-1, keepdim=True).values
            probs = torch.where(probs < floor, torch.zeros_like(probs), probs)
        cdf = probs.cumsum(-1)
        u = torch.stack([torch.rand((), generator=self.gens[i]) for i in rows.tolist()]).to(dev)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous(), right=True).clamp_(max=probs.shape[1] - 1)
        tok = (cand.gather(1, pick) if cand is not None else pick).squeeze(1)
        if self.any_greedy:
            best = probs.argmax(-1, keepdim=True)
            tok = torch.where(temp <= 0, (cand.gather(1, best) if cand is not None else best).squeeze(1), tok)
        return tok


class HFEngine:
    """rollout.engine.Engine on a transformers causal LM + its KV cache. `model` is AntiPaSTO-wrapped (shared or own)."""

    def __init__(self, model: nn.Module, tokenizer, device: str | torch.device = "cpu", fast_decode: bool = True):
        """fast_decode: use shared.fast_decode when the model is a wrapped Qwen3 (same samples, less glue)."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.version = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = stop_token_ids(tokenizer)
        # the lean loop needs merged weights: wrapped models only (generate() merges them)
        self.fast = fast_decode and unsupported(model) is None and bool(adapter_modules(model))

    # ------------------------------------------------------------------ weights
    def load_delta(self, update: DeltaSUpdate) -> None:
        """Copy a policy version's flat delta_S (and quarantine) into the model; set the version."""
        set_delta(self.model, decode_floats(update.data))
        if update.quarantine is not None:
            set_delta(self.model, decode_floats(update.quarantine), kind="q")
        self.version = int(update.version)

    # ------------------------------------------------------------------ sampling
    def generate(self, jobs: list[PromptJob]) -> list[RolloutGroup]:
        """Sample job.sampling.n completions per job; jobs with different adapter modes run apart."""
        return generate_by_mode(jobs, self._generate_mode)

    def _generate_mode(self, jobs: list[PromptJob], train: bool) -> list[RolloutGroup]:
        # quarantine (route arm) is live for training rollouts only; delta_Q is 0 elsewhere
        with quarantine(self.model, active=train), merged_inference(self.model):
            return self._generate(jobs)

    @torch.no_grad()
    def _generate(self, jobs: list[PromptJob]) -> list[RolloutGroup]:
        """Prefill each prompt once, fan its KV cache out to n rows, decode; finished rows leave the batch."""
        for j in jobs:
            if not j.prompt_ids:
                raise EngineError(f"job {j.job_id!r} has no prompt_ids")
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, j in enumerate(jobs):
            n = len(j.prompt_ids)
            ids[i, width - n:] = torch.tensor(j.prompt_ids, dtype=torch.long)
            attn[i, width - n:] = 1
        rows: list[tuple[PromptJob, int]] = [(j, k) for j in jobs for k in range(j.sampling.n)]
        fan = torch.repeat_interleave(torch.arange(len(jobs)), torch.tensor([j.sampling.n for j in jobs]))
        sp = [j.sampling for j, _ in rows]
        base = [s.seed if s.seed is not None else int(torch.randint(0, 2**62, ()).item()) for s in sp]
        sampler = SeededSampler(seeds=[b + k * ROW_SEED_STRIDE for b, (_, k) in zip(base, rows)],
                                temperature=[s.temperature for s in sp], top_k=[s.top_k for s in sp],
                                top_p=[s.top_p for s in sp], min_p=[s.min_p for s in sp])
        limits = torch.tensor([s.max_new_tokens for s in sp])
        stop = torch.tensor(self.stop_ids, dtype=torch.long)
        dev = self.device
        was_training = self.model.training
        self.model.eval()
        try:
            if self.fast:  # lean Qwen3 loop over merged weights (shared.fast_decode)
                dec = Qwen3Decoder(self.model, max_len=width + int(limits.max()) + 1)
            else:
                dec = _TransformersDecoder(self.model)
            logits = dec.prefill(ids.to(dev), attn.to(dev))
            dec.keep(fan.to(dev))  # one prefill per prompt, n rows each
            logits = logits[fan.to(dev)]
            live = torch.arange(len(rows))
            toks: list[list[int]] = [[] for _ in rows]
            lps: list[list[float]] = [[] for _ in rows]
            reasons = ["length"] * len(rows)
            for t in range(int(limits.max()) if len(rows) else 0):
                logp = torch.log_softmax(logits.float(), dim=-1)  # raw policy, temperature 1
                tok = sampler.sample(logits, live)
                tok_lp = logp.gather(1, tok[:, None]).squeeze(1)
                tok_c, lp_c = tok.cpu(), tok_lp.cpu()
                for r, tk, lp in zip(live.tolist(), tok_c.tolist(), lp_c.tolist()):
                    toks[r].append(tk)
                    lps[r].append(lp)
                ended = torch.isin(tok_c, stop)
                for r in live[ended].tolist():
                    reasons[r] = "stop"
                finished = ended | (t + 1 >= limits[live])
                if bool(finished.all()):
                    break
                if bool(finished.any()):
                    keep = (~finished).nonzero().squeeze(1)
                    dec.keep(keep.to(dev))
                    live, tok = live[keep], tok[keep.to(dev)]
                logits = dec.step(tok)
        finally:
            self.model.train(was_training)
        return self._to_groups(jobs, rows, toks, lps, reasons)

    def _to_groups(self, jobs: list[PromptJob], rows, toks, lps, reasons) -> list[RolloutGroup]:
        comps: dict[str, list[Completion]] = {j.job_id: [] for j in jobs}
        for i, (job, k) in enumerate(rows):
            text = self.tokenizer.decode(toks[i], skip_special_tokens=True)
            comps[job.job_id].append(Completion(rollout_id=f"{job.job_id}-{k}", text=text, token_ids=toks[i],
                                                logprobs=lps[i], finish_reason=reasons[i]))
        return [
            RolloutGroup(job_id=j.job_id, step=j.step, problem_id=j.problem_id, policy_version=self.version,
                         prompt_ids=list(j.prompt_ids), completions=comps[j.job_id], split=j.split)
            for j in jobs
        ]


class _TransformersDecoder:
    """The same prefill / step / keep interface on the model's own forward and KV cache (any causal LM)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def prefill(self, ids: Tensor, attn: Tensor) -> Tensor:
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        self.cache, self.mask, self.next_pos = out.past_key_values, attn, pos[:, -1] + 1
        return out.logits[:, -1, :]

    def keep(self, rows: Tensor) -> None:
        self.cache.reorder_cache(rows)
        self.mask, self.next_pos = self.mask[rows], self.next_pos[rows]

    def step(self, tok: Tensor) -> Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        out = self.model(input_ids=tok[:, None], attention_mask=self.mask, position_ids=self.next_pos[:, None],
                         past_key_values=self.cache, use_cache=True)
        self.cache, self.next_pos = out.past_key_values, self.next_pos + 1
        return out.logits[:, -1, :]


def groups_by_job(groups: Iterable[RolloutGroup]) -> dict[str, RolloutGroup]:
    return {g.job_id: g for g in groups}
