"""shared.fast_decode against the transformers forward: same logits (prefill with left padding,
decode steps, dropped rows), GQA and an AntiPaSTO-wrapped model with delta_S set; the engine's
samples do not change when it switches path."""
from __future__ import annotations

import copy

import pytest
import torch

from shared.fast_decode import Qwen3Decoder, unsupported
from shared.adapter import get_delta, merged_inference, set_delta, wrap_model


def _hf_logits(model, ids, attn):
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attn, position_ids=pos).logits


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 256, (3, 9), generator=g)
    attn = torch.ones_like(ids)
    attn[0, :4] = 0  # left padding of different widths
    attn[1, :1] = 0
    return ids.masked_fill(attn == 0, 0), attn


@pytest.mark.parametrize("wrapped", [False, True])
def test_prefill_and_steps_match_transformers(tiny_qwen3, wrapped):
    model = copy.deepcopy(tiny_qwen3)
    if wrapped:
        wrap_model(model, progress=False)
        set_delta(model, torch.randn(get_delta(model, flat=True).numel(), generator=torch.Generator().manual_seed(1)) * 0.2)
    ids, attn = _batch()
    new = torch.randint(2, 256, (3, 4), generator=torch.Generator().manual_seed(2))
    full_ids, full_attn = torch.cat([ids, new], 1), torch.cat([attn, torch.ones_like(new)], 1)
    want = _hf_logits(model, full_ids, full_attn)  # every position at once, transformers' path
    with torch.no_grad(), merged_inference(model) if wrapped else torch.no_grad():
        dec = Qwen3Decoder(model, max_len=ids.shape[1] + 8)
        got = [dec.prefill(ids, attn)]
        for t in range(new.shape[1] - 1):
            got.append(dec.step(new[:, t]))
    for t, logits in enumerate(got):
        torch.testing.assert_close(logits, want[:, ids.shape[1] - 1 + t], rtol=1e-4, atol=1e-4)
    # rows leave the batch: the kept rows go on unchanged
    with torch.no_grad(), merged_inference(model) if wrapped else torch.no_grad():
        dec.keep(torch.tensor([0, 2]))
        last = dec.step(new[[0, 2], -1])
    more = _hf_logits(model, torch.cat([full_ids, torch.zeros(3, 1, dtype=torch.long)], 1)[[0, 2]],
                      torch.cat([full_attn, torch.zeros(3, 1, dtype=torch.long)], 1)[[0, 2]])
    torch.testing.assert_close(last, more[:, full_ids.shape[1] - 1], rtol=1e-4, atol=1e-4)


def test_unsupported_models_are_named(tiny_qwen3):
    assert unsupported(tiny_qwen3) is None
    assert "not Qwen3ForCausalLM" in unsupported(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fast decode does not cover this model"):
        Qwen3Decoder(torch.nn.Linear(2, 2), max_len=4)
    wrapped = copy.deepcopy(tiny_qwen3)
    wrap_model(wrapped, progress=False)
    with pytest.raises(RuntimeError, match="inside merged_inference"):
        Qwen3Decoder(wrapped, max_len=4)


def test_engine_samples_the_same_on_both_paths(tiny_qwen3):
    from rollout.hf_engine import HFEngine
    from shared.schemas import PromptJob, SamplingParams
    from tests.support.fakes import ByteTokenizer

    model = copy.deepcopy(tiny_qwen3)
    wrap_model(model, progress=False)
    set_delta(model, torch.randn(get_delta(model, flat=True).numel(), generator=torch.Generator().manual_seed(3)) * 0.2)
    tok = ByteTokenizer()
    jobs = [PromptJob(job_id=f"j{i}", step=0, problem_id=str(i), prompt_text=p, prompt_ids=tok.encode(p),
                      sampling=SamplingParams(n=3, max_new_tokens=14, seed=11 + i))
            for i, p in enumerate(["hello world", "x", "a longer prompt than the others"])]
    fast, slow = HFEngine(model, tok), HFEngine(model, tok, fast_decode=False)
    assert fast.fast and not slow.fast
    a, b = fast.generate(jobs), slow.generate(jobs)
    for ga, gb in zip(a, b):
        assert [c.token_ids for c in ga.completions] == [c.token_ids for c in gb.completions]
        assert [c.finish_reason for c in ga.completions] == [c.finish_reason for c in gb.completions]
        for ca, cb in zip(ga.completions, gb.completions):
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), rtol=1e-4, atol=1e-4)
