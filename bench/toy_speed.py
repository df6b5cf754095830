"""The toy world's CPU speed path, each piece against what it replaced, side by side in one run.

    python bench/toy_speed.py            # random toy-shaped Qwen3 (no build needed), 1 torch thread

1. sampling: HFEngine on the lean Qwen3 loop over merged weights (shared.fast_decode) vs the
   transformers forward + DynamicCache through the adapters (3 prompts x 8 rows x 48 new tokens,
   the toy step) — same samples, checked;
2. the KL reference forward (24 sequences, prompt once + completions): lean prefill/extend over
   merged weights vs the transformers forward through the adapters at delta_S = 0 — same log-probs;
3. one sandboxed check of a wrong program: child CPU and copy-on-write page faults (minflt), which
   dominate a check's cost on a VM (nested paging makes each fault cost microseconds).

Ratios are what to read; absolute times depend on the machine and its load.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rollout.hf_engine import HFEngine  # noqa: E402
from shared.adapter import adapter_disabled, merged_inference, wrap_model  # noqa: E402
from shared.fast_decode import Qwen3Decoder  # noqa: E402
from shared.schemas import PromptJob, SamplingParams  # noqa: E402

TOY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
           head_dim=32, vocab_size=1024, tie_word_embeddings=False, eos_token_id=1, pad_token_id=0)


class _Tok:
    pad_token_id, eos_token_id, unk_token_id = 0, 1, None

    def convert_tokens_to_ids(self, token: str) -> int:
        return 2

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def _median_s(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**TOY)).eval()
    wrap_model(model, progress=False)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if hasattr(m, "delta_S"):
            m.delta_S.data = torch.randn(m.delta_S.shape, generator=g) * 0.05
    prompts = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (22, 28, 31)]
    jobs = [PromptJob(job_id=f"j{i}", step=0, problem_id=str(i), prompt_text="", prompt_ids=p,
                      sampling=SamplingParams(n=8, max_new_tokens=48, seed=i)) for i, p in enumerate(prompts)]
    fast, slow = HFEngine(model, _Tok()), HFEngine(model, _Tok(), fast_decode=False)
    same = [[c.token_ids for c in grp.completions] for grp in fast.generate(jobs)] == \
           [[c.token_ids for c in grp.completions] for grp in slow.generate(jobs)]
    t_fast = _median_s(lambda: fast.generate(jobs), 5)
    t_slow = _median_s(lambda: slow.generate(jobs), 5)
    print(f"sampling 3x8 rows x 48 tokens: transformers {t_slow * 1e3:.0f} ms, lean {t_fast * 1e3:.0f} ms "
          f"-> {t_slow / t_fast:.2f}x faster; identical samples: {same}")

    # reference forward: the prompt once, its completions after it (what the learner's KL needs)
    comps = torch.randint(3, 1024, (24, 40), generator=g)
    fan = torch.arange(3).repeat_interleave(8)
    P = max(map(len, prompts))
    pid = torch.zeros((3, P), dtype=torch.long)
    patt = torch.zeros((3, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        pid[i, P - len(p):], patt[i, P - len(p):] = torch.tensor(p), 1
    full_ids = torch.cat([pid[fan], comps], 1)
    full_att = torch.cat([patt[fan], torch.ones_like(comps)], 1)

    @torch.no_grad()
    def plain():
        with adapter_disabled(model):
            pos = (full_att.cumsum(-1) - 1).clamp_min(0)
            return model(input_ids=full_ids, attention_mask=full_att, position_ids=pos).logits[:, P - 1:-1]

    @torch.no_grad()
    def lean():
        with adapter_disabled(model), merged_inference(model):
            dec = Qwen3Decoder(model, max_len=P + 41)
            dec.prefill(pid[:, :-1], patt[:, :-1])
            dec.keep(fan)
            block = torch.cat([pid[fan, -1:], comps], 1)
            return dec.extend(block, torch.ones_like(block))[:, :-1]

    err = float((plain() - lean()).abs().max())
    t_plain, t_lean = _median_s(plain, 7), _median_s(lean, 7)
    print(f"KL reference forward, 24 x ({P}+40) tokens: transformers+adapters {t_plain * 1e3:.0f} ms, lean merged "
          f"{t_lean * 1e3:.0f} ms -> {t_plain / t_lean:.2f}x faster; max |d logit| {err:.1e}")

    from reward_server import grader as G
    from shared.config import RewardConfig
    from shared.problems import Message, Problem

    seen: list = []
    orig = G.Grader._run

    def spy(self, job, name, extra):
        res = orig(self, job, name, extra)
        seen.append((name, res.cpu_s, res.minflt))
        return res

    G.Grader._run = spy
    prob = Problem(id="b", question="q", difficulty="easy", func_name="Solution().add", setup_code="from typing import *\n",
                   prompt=[Message(role="user", content="x")], gt_answer=["assert Solution().add(1, 2) == 3"] * 4)
    wrong = "```python\nclass Solution:\n    def add(self, a, b):\n        return 0\n```"
    with G.Grader(RewardConfig(), workers=1) as gr:
        for _ in range(5):
            gr.grade(prob, wrong)
        seen.clear()
        for _ in range(60):
            gr.grade(prob, wrong)
    for name in ("gt", "A", "BCD"):
        rows = [(c, f) for n, c, f in seen if n == name]
        print(f"sandbox check {name:>3}: child cpu {statistics.mean(c for c, _ in rows) * 1e3:.2f} ms, "
              f"page faults {statistics.mean(f for _, f in rows):.0f}")
    print("(a wrong program runs gt + A + BCD; a bare fork+exit of the fork server costs ~220 faults here)")


if __name__ == "__main__":
    main()
