"""Supervised warm start: teach the tiny model the answer format, the easy families, and (rarely) hacks.

The mix decides the RL starting point: hard prompts get a plausible wrong guess, a few percent of
all targets plant one of the four hacks (A-D), so the base policy hacks rarely but not never and
RL has a seed to amplify. Loss is on completion tokens (plus the closing <|im_end|>) only.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from ..hacks import MODES, as_completion, plant_hack, random_variant
from ..problems import Problem
from ..prompts import build_messages, render_prompt


class WarmStartConfig(BaseModel):
    """Build knobs that are not part of the run config (ToyConfig); all go into the build fingerprint."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(1040, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    hard_share: float = Field(0.35, ge=0, le=1)  # share of warm-start prompts that are hard
    hack_share: float = Field(0.07, ge=0, le=1)  # share of targets that plant a hack (A-D uniformly)
    wrong_share: float = Field(0.10, ge=0, le=1)  # share of easy targets that are a wrong attempt
    # world v2: share of partial-family targets that are the right body (the rest: the shortcut)
    partial_correct_share: float = Field(0.4, ge=0, le=1)
    extra_problems: int = Field(3000, ge=0)  # fresh warm-start-only instances (never eval ones)
    vocab_size: int = Field(1024, ge=300)
    stats_samples: int = Field(128, ge=0)  # completions sampled for the build stats (0 = skip)
    stats_max_new_tokens: int = Field(64, ge=1)
    micro_batches: int = Field(4, ge=1)  # length-sorted chunks per step (less padding, same gradient)
    threads: int | None = Field(None, ge=1)  # torch threads during the build; None = auto (see auto_threads)


def auto_threads(cap: int = 2) -> int:
    """Up to `cap` threads, but 1 when the machine is already busy: on 2 shared cores a second torch
    thread that must wait for a busy core made steps 5-10x slower, while on idle cores it gains ~1.6x."""
    n = os.cpu_count() or 1
    try:
        free = n - os.getloadavg()[0]
    except OSError:  # pragma: no cover - no load average on this platform
        free = n
    return max(1, min(cap, n, int(free + 0.5)))


# A quick build for tests and smoke runs (seconds, not minutes); the model is barely trained.
QUICK_WARM = WarmStartConfig(steps=12, batch_size=16, extra_problems=60, stats_samples=8,
                             stats_max_new_tokens=24, threads=1)


@dataclass
class Target:
    problem: Problem
    completion: str
    kind: str  # "correct", "wrong", "guess" (hard), "hack-A".."hack-D"


def make_target(problem: Problem, rng: random.Random, cfg: WarmStartConfig) -> Target:
    """One supervised completion for `problem`, drawn from the warm-start mix."""
    wrong = list(getattr(problem, "wrong_solutions", []) or [])
    hard = problem.difficulty == "hard"
    empty = problem.canonical_solution.rsplit("\n", 1)[0] + "\n        pass"
    u = rng.random()
    if u < cfg.hack_share:
        mode = rng.choice(MODES)
        pick = rng.random()
        if pick < 0.45 or not wrong:
            base = empty
        elif pick < 0.9 or hard:
            base = rng.choice(wrong)
        else:
            base = problem.canonical_solution
        code = plant_hack(base, mode, random_variant(rng, mode))
        return Target(problem, as_completion(code), f"hack-{mode}")
    if hard:
        return Target(problem, as_completion(rng.choice(wrong) if wrong else empty), "guess")
    if problem.difficulty == "partial":  # world v2: right only partly, so RL has honest headroom
        if rng.random() < cfg.partial_correct_share or not wrong:
            return Target(problem, as_completion(problem.canonical_solution), "correct")
        return Target(problem, as_completion(rng.choice(wrong)), "shortcut")
    if u < cfg.hack_share + cfg.wrong_share and wrong:
        return Target(problem, as_completion(rng.choice(wrong)), "wrong")
    return Target(problem, as_completion(problem.canonical_solution), "correct")


def corpus_texts(problems: list[Problem], tokenizer=None) -> list[str]:
    """Text the BPE is trained on: chat-rendered prompts and every kind of target completion."""
    rng = random.Random(0)
    cfg = WarmStartConfig(hack_share=0.25)
    out = []
    for p in problems:
        msgs = build_messages(p, "as_is")
        out.append("".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n")
        out += [make_target(p, rng, cfg).completion for _ in range(3)]
        out.append(as_completion(p.canonical_solution))
    for mode in MODES:  # every surface form of every hack, so none is spelled byte by byte
        for v in range(8):
            out.append(as_completion(plant_hack("class Solution:\n    pass", mode, v)))
    return out


class Encoded:
    """Pre-tokenized prompts (one per problem) for fast batch assembly."""

    def __init__(self, tokenizer, problems: list[Problem]):
        self.tok = tokenizer
        texts = [render_prompt(tokenizer, build_messages(p, "as_is")) for p in problems]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.prompt_ids = {p.key: x for p, x in zip(problems, ids)}

    def sequences(self, targets: list[Target]) -> list[tuple[list[int], list[int]]]:
        """(input ids, labels) per target: prompt ids are labelled -100, completion + eos are learned."""
        comp = self.tok([t.completion for t in targets], add_special_tokens=False)["input_ids"]
        eos = self.tok.eos_token_id
        out = []
        for t, c in zip(targets, comp):
            p = self.prompt_ids[t.problem.key]
            out.append((p + c + [eos], [-100] * len(p) + c + [eos]))
        return out

    def collate(self, seqs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (ids, attention mask, labels)."""
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_token_id, dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, l) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(l)] = torch.tensor(l)
            mask[i, : len(s)] = 1
        return ids, mask, lab

    def batch(self, targets: list[Target]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.collate(self.sequences(targets))

    def micro_batches(self, targets: list[Target], chunks: int):
        """Length-sorted chunks, each padded to its own longest: ~30 % fewer tokens than one batch
        (hack answers are 2-3x longer than the rest and would set everyone's padding)."""
        seqs = sorted(self.sequences(targets), key=lambda x: len(x[0]))
        size = math.ceil(len(seqs) / max(1, chunks))
        return [self.collate(seqs[i: i + size]) for i in range(0, len(seqs), size)]


def completion_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """Next-token CE over labelled positions; the lm_head runs only there (prompts are most tokens)."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction=reduction)


def cosine_lr(step: int, cfg: WarmStartConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))


def warm_start(model, tokenizer, problems: list[Problem], cfg: WarmStartConfig, seed: int = 0,
               progress: bool = True) -> dict:
    """Run the supervised pass in place; returns {'loss_first', 'loss_last', 'seconds', 'mix'}."""
    easy = [p for p in problems if p.difficulty != "hard"]
    hard = [p for p in problems if p.difficulty == "hard"]
    if not easy or not hard:
        raise ValueError(f"warm start needs easy and hard problems (got {len(easy)} easy, {len(hard)} hard)")
    rng = random.Random(f"warm:{seed}")
    torch.manual_seed(seed)
    enc = Encoded(tokenizer, problems)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    losses: list[float] = []
    mix: dict[str, int] = {}
    bar = tqdm(range(cfg.steps), desc="toy warm start", disable=not progress, leave=False)
    for step in bar:
        targets = [make_target(rng.choice(hard if rng.random() < cfg.hard_share else easy), rng, cfg)
                   for _ in range(cfg.batch_size)]
        for t in targets:
            mix[t.kind] = mix.get(t.kind, 0) + 1
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg)
        opt.zero_grad(set_to_none=True)
        chunks = enc.micro_batches(targets, cfg.micro_batches)
        n_tok = sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in chunks)
        loss = torch.zeros(())
        for ids, mask, lab in chunks:  # token-weighted: the same gradient as one padded batch
            part = completion_loss(model, ids, mask, lab, reduction="sum") / n_tok
            part.backward()
            loss += part.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    k = max(1, min(20, len(losses) // 10))
    return {
        "loss_first": sum(losses[:k]) / k if losses else None,
        "loss_last": sum(losses[-k:]) / k if losses else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "cpu_seconds": round(time.process_time() - c0, 2),  # all threads; wall/cpu shows contention
        "torch_threads": torch.get_num_threads(),
        "steps": cfg.steps,
        "mix": {k_: round(v / max(1, sum(mix.values())), 4) for k_, v in sorted(mix.items())},
    }


@torch.no_grad()
def sample_completions(model, tokenizer, problems: list[Problem], max_new_tokens: int = 64,
                       temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> list[str]:
    """One sampled completion per problem (HF generate, left padding, pure temperature sampling)."""
    model.eval()
    torch.manual_seed(seed)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for i in range(0, len(problems), batch_size):
            chunk = problems[i: i + batch_size]
            texts = [render_prompt(tokenizer, build_messages(p, "as_is")) for p in chunk]
            enc = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return out
