"""HFEngine: seeded per-job sampling, raw-policy log-probs, stop tokens, delta loading."""
import copy

import pytest
import torch

from shared.logprobs import token_logprobs
from rollout.hf_engine import HFEngine, SeededSampler
from shared.codec import encode_floats
from shared.adapter import get_delta, set_delta, wrap_model
from shared.schemas import DeltaSUpdate, PromptJob, SamplingParams
from tests.support.fakes import IM_END, ByteTokenizer


@pytest.fixture()
def engine(tiny_qwen3):
    model = copy.deepcopy(tiny_qwen3)
    wrap_model(model, progress=False)
    return HFEngine(model, ByteTokenizer())


def job(i: int, prompt: str, n: int = 3, seed: int = 7, max_new: int = 12, **kw) -> PromptJob:
    ids = ByteTokenizer().encode(prompt)
    return PromptJob(job_id=f"j{i}", step=0, problem_id=str(i), prompt_text=prompt, prompt_ids=ids,
                     sampling=SamplingParams(n=n, max_new_tokens=max_new, seed=seed, **kw))


def test_seeded_rows_do_not_depend_on_batch_mates(engine):
    a = engine.generate([job(0, "hello world")])[0]
    b = engine.generate([job(1, "a much longer prompt here", seed=99), job(0, "hello world")])[1]
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    # different rows of one job differ, a different seed differs
    assert len({tuple(c.token_ids) for c in a.completions}) > 1
    c = engine.generate([job(0, "hello world", seed=8)])[0]
    assert [x.token_ids for x in c.completions] != [x.token_ids for x in a.completions]


def test_logprobs_match_learner_recompute(engine):
    g = engine.generate([job(0, "abc def", n=4, max_new=10), job(1, "x", n=2, max_new=10)])
    for grp in g:
        for c in grp.completions:
            assert len(c.logprobs) == len(c.token_ids) > 0
            ids = torch.tensor([grp.prompt_ids + c.token_ids])
            lp = token_logprobs(engine.model, ids)[0, len(grp.prompt_ids) - 1:]
            assert torch.allclose(lp, torch.tensor(c.logprobs), atol=1e-4), (lp, c.logprobs)
            assert all(x <= 0 for x in c.logprobs)


def test_stop_token_and_lengths(engine):
    model = engine.model
    with torch.no_grad():  # make <|im_end|> overwhelmingly likely after the first token
        model.lm_head.weight[IM_END] += 50.0 * model.lm_head.weight[IM_END].sign()
    g = engine.generate([job(0, "stop here", n=4, max_new=20)])[0]
    stopped = [c for c in g.completions if c.finish_reason == "stop"]
    assert stopped, [c.token_ids for c in g.completions]
    for c in stopped:
        assert c.token_ids[-1] == IM_END and IM_END not in c.token_ids[:-1]
    for c in g.completions:
        assert len(c.token_ids) <= 20


def test_length_limit_per_job(engine):
    g = engine.generate([job(0, "p", n=2, max_new=3), job(1, "q", n=2, max_new=7)])
    for c in g[0].completions:
        assert len(c.token_ids) <= 3
    assert any(c.finish_reason == "length" and len(c.token_ids) == 7 for c in g[1].completions) or \
        all(c.finish_reason == "stop" for c in g[1].completions)


def test_top_k_one_is_greedy(engine):
    g = engine.generate([job(0, "greedy", n=3, top_k=1, max_new=8)])[0]
    seqs = {tuple(c.token_ids) for c in g.completions}
    assert len(seqs) == 1
    ids = torch.tensor([g.prompt_ids])
    with torch.no_grad():
        first = engine.model(input_ids=ids).logits[0, -1].argmax().item()
    assert g.completions[0].token_ids[0] == first


def test_sampler_respects_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    s = SeededSampler([1, 2, 3, 4], [1.0] * 4, [5, 5, 0, 0], [1.0, 0.5, 0.3, 1.0], [0.0] * 4)
    allowed_k = logits.topk(5).indices
    for _ in range(30):
        tok = s.sample(logits, torch.arange(4))
        assert tok[0] in allowed_k[0] and tok[1] in allowed_k[1]
        p = logits[2].softmax(-1)
        order = p.argsort(descending=True)
        ahead = p[order].cumsum(0) - p[order]
        assert tok[2] in order[ahead <= 0.3]


def test_load_delta_sets_weights_and_version(engine, tiny_qwen3):
    other = copy.deepcopy(tiny_qwen3)
    wrap_model(other, progress=False)
    flat = torch.randn_like(get_delta(other, flat=True)) * 0.05
    set_delta(other, flat)
    upd = DeltaSUpdate(version=5, names=[], sizes=[], data=encode_floats(flat))
    before = engine.generate([job(0, "hi", n=2)])[0]
    engine.load_delta(upd)
    assert engine.version == 5
    assert torch.allclose(get_delta(engine.model, flat=True), flat)
    after = engine.generate([job(0, "hi", n=2)])[0]
    assert after.policy_version == 5 and before.policy_version == 0
    ref = HFEngine(other, ByteTokenizer()).generate([job(0, "hi", n=2)])[0]
    assert [c.token_ids for c in after.completions] == [c.token_ids for c in ref.completions]


def test_generate_by_mode_samples_each_mode_apart_in_job_order(monkeypatch):
    """rollout.engine.generate_by_mode: train-mode jobs first, each mode prepared once (untimed) and
    sampled once, gen_seconds = the part's wall time shared evenly, groups back in job order. A fake
    clock that only the callbacks advance: prepare 0.2 s, sample 0.03 s per job."""
    import types

    from rollout import engine
    from rollout.engine import generate_by_mode
    from shared.schemas import RolloutGroup

    now = [100.0]
    monkeypatch.setattr(engine, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    jobs = [PromptJob(job_id=f"j{i}", step=0, problem_id="p", prompt_text="", prompt_ids=[1],
                      sampling=SamplingParams(n=1), adapter_mode=mode) for i, mode in enumerate(["eval", "train", "eval", "train", "train"])]
    calls = []

    def prepare(train):
        calls.append(("prepare", train))
        now[0] += 0.2  # not counted in gen_seconds

    def sample(part, train):
        calls.append(("sample", train, [j.job_id for j in part]))
        now[0] += 0.03 * len(part)
        return [RolloutGroup(job_id=j.job_id, step=0, problem_id="p", policy_version=0, prompt_ids=[1],
                             completions=[]) for j in reversed(part)]

    groups = generate_by_mode(jobs, sample, prepare)
    assert [g.job_id for g in groups] == ["j0", "j1", "j2", "j3", "j4"]
    assert calls == [("prepare", True), ("sample", True, ["j1", "j3", "j4"]),
                     ("prepare", False), ("sample", False, ["j0", "j2"])]
    assert [g.gen_seconds for g in groups] == pytest.approx([0.03] * 5, rel=1e-9)
    assert generate_by_mode([], sample) == [] and len(calls) == 4
