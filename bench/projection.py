"""Projection hook cost vs a learner step: vectorised Projector and the spec's per-module loop, measured
side by side in one run and reported as ratios of one learner fwd+bwd step.

    python bench/projection.py                               # CPU, toy shape (28 modules, 3,072 delta_S)
    python bench/projection.py --shape qwen3-4b              # CUDA, bf16, 8x1024 tokens, 252 modules
    python bench/projection.py --shape qwen3-4b --layers 4   # cut the step model's depth (hook keeps 252)
    python bench/projection.py --k 8                          # the subspace rows use k=8 axes per module

The hook always runs on grads of the *full-depth* module shapes (qwen3-4b: 252 modules, 534,528 values),
restored before every repetition so the loop's `if cos > 0` branch does the same work each time. The
step is one learner micro-step on a random-weight Qwen3 of the chosen shape, AntiPaSTO-wrapped with
random factors (no SVD: timing does not depend on their values): chunked token log-probs, GRPO loss,
backward into delta_S. Reference (H200, full depth): loop 19.7 ms, vectorised 0.98 ms, step 502 ms.
Goal: vectorised hook < 1 % of the step. The subspace hook (issue #15: k orthonormal axes per module,
one-sided and two-sided gates) is timed beside the rank-1 one, on the same grads, with its loop.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from learner.grpo import grpo_loss  # noqa: E402
from shared.logprobs import token_logprobs  # noqa: E402
from learner.projection import Projector, project_grads_reference  # noqa: E402
from shared.adapter import AntiPaSTOLinear  # noqa: E402
from shared.config import DEFAULT_TARGETS  # noqa: E402

SHAPES = {
    "toy": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, vocab_size=1024),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
# device, dtype, batch, seq: toy = one toy learner micro-batch (P*G = 64 sequences, prompt + <= 64 new tokens)
DEFAULTS = {"toy": ("cpu", "float32", 64, 128), "qwen3-4b": ("cuda", "bfloat16", 8, 1024)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def module_shapes(shape: dict) -> list[tuple[str, int, int]]:
    """(name, d_out, d_in) of every wrapped Linear at full depth, in model order."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    per = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
           "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    out = []
    for layer in range(shape["num_hidden_layers"]):
        for t in DEFAULT_TARGETS:
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append((f"model.layers.{layer}.{part}.{t}", *per[t]))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: torch.device, reps: int, before=None, warmup: int = 3) -> float:
    """Median wall time of fn() in ms over `reps` (after `warmup` runs); `before()` runs untimed each rep."""
    samples = []
    for k in range(reps + warmup):
        if before is not None:
            before()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if k >= warmup:
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def bench_hook(shape: dict, device: torch.device, reps: int, seed: int = 0, k: int = 1,
               gate: str = "onesided") -> dict:
    """Time the vectorised hook and the reference loop on full-depth grads; k > 1 uses a random
    orthonormal [k, r] basis per module (its first axis is the rank-1 direction)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mods = module_shapes(shape)
    names = [n for n, _, _ in mods]
    sizes = [min(o, i) for _, o, i in mods]
    vh = {}
    params, saved = [], []
    for j, (n, r) in enumerate(zip(names, sizes)):
        basis, _ = torch.linalg.qr(torch.randn(r, k, generator=gen))  # [r, k], orthonormal columns
        vh[n] = basis.T.contiguous() if k > 1 else basis[:, 0].contiguous()
        top = basis[:, 0]
        g = torch.randn(r, generator=gen) + (0.5 if j % 2 else -0.5) * top * r ** 0.5  # half the modules fire
        p = nn.Parameter(torch.zeros(r, device=device))
        p.grad = g.to(device)
        params.append(p)
        saved.append(p.grad.clone())

    def restore():
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    proj = Projector(names, vh, device=device, gate=gate)
    restore()
    stats = proj.project_(params)
    vec = time_ms(lambda: proj.project_(params), device, reps, restore)
    loop = time_ms(lambda: project_grads_reference(names, params, vh, gate=gate), device, max(3, reps // 4), restore)
    return {"modules": len(names), "delta_s_values": sum(sizes), "vectorised_ms": vec, "loop_ms": loop,
            "frac_fired": stats["frac_fired"], "k": k, "gate": gate}


def fake_wrap(model: nn.Module, dtype: torch.dtype) -> int:
    """Swap target Linears for AntiPaSTOLinear with random factors (timing only); freeze all but delta_S."""
    n = 0
    for name, lin in list(model.named_modules()):
        if isinstance(lin, nn.Linear) and name.rsplit(".", 1)[-1] in DEFAULT_TARGETS:
            d_out, d_in = lin.weight.shape
            r = min(d_out, d_in)
            dev = lin.weight.device
            U = torch.randn(d_out, r, device=dev, dtype=dtype) / r ** 0.5
            Vh = torch.randn(r, d_in, device=dev, dtype=dtype) / d_in ** 0.5
            S = torch.rand(r, device=dev)
            new = AntiPaSTOLinear(U, S, Vh, bias=lin.bias, dtype=dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
            n += 1
    for pn, p in model.named_parameters():
        p.requires_grad_(pn.endswith("delta_S"))
    return n


def bench_step(shape: dict, layers: int | None, device: torch.device, dtype: torch.dtype, batch: int, seq: int,
               reps: int, checkpointing: bool) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kw = dict(shape)
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = Qwen3Config(**kw, tie_word_embeddings=False, max_position_embeddings=max(4096, seq), rope_theta=1e6,
                      bos_token_id=None, eos_token_id=1, pad_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    n_wrapped = fake_wrap(model, dtype)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    ids = torch.randint(2, cfg.vocab_size, (batch, seq), device=device)
    attn = torch.ones_like(ids)
    mask = torch.zeros(batch, seq - 1, device=device)
    mask[:, seq // 2 :] = 1  # completion = second half
    adv = torch.randn(batch, device=device)

    def step():
        logp = token_logprobs(model, ids, attn)
        loss, _ = grpo_loss(logp, None, None, adv, mask)
        loss.backward()

    def zero():
        model.zero_grad(set_to_none=True)

    ms = time_ms(step, device, reps, zero, warmup=1)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_ms": ms, "layers": cfg.num_hidden_layers, "wrapped": n_wrapped, "tokens": batch * seq,
            "peak_gib": peak}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="toy")
    ap.add_argument("--layers", type=int, default=None, help="cut the step model to N layers (hook keeps full depth)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", choices=list(DTYPES), default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions of the hook (loop and step: reps/4, >= 3)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the step model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=5, help="axes per module for the subspace rows (issue #15 basis=svd)")
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev_d, dt_d, b_d, s_d = DEFAULTS[a.shape]
    device = torch.device(a.device or dev_d)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --shape {a.shape} runs on CUDA by default and no GPU is visible; pass --device cpu "
                 "(slow; use --layers 1 --seq 64) or run it on the GPU box")
    dtype = DTYPES[a.dtype or dt_d]
    shape = SHAPES[a.shape]
    hook = bench_hook(shape, device, a.reps)
    subspace = [bench_hook(shape, device, a.reps, k=a.k, gate=g) for g in ("onesided", "twosided")]
    step = bench_step(shape, a.layers, device, dtype, a.batch or b_d, a.seq or s_d, max(3, a.reps // 4),
                      a.checkpointing)
    res = {"shape": a.shape, "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
           "dtype": str(dtype).replace("torch.", ""), **hook, **step,
           "vectorised_pct_of_step": 100 * hook["vectorised_ms"] / step["step_ms"],
           "loop_pct_of_step": 100 * hook["loop_ms"] / step["step_ms"],
           "loop_over_vectorised": hook["loop_ms"] / hook["vectorised_ms"],
           "subspace": [{"k": h["k"], "gate": h["gate"], "vectorised_ms": h["vectorised_ms"], "loop_ms": h["loop_ms"],
                         "vectorised_pct_of_step": 100 * h["vectorised_ms"] / step["step_ms"],
                         "frac_fired": h["frac_fired"]} for h in subspace]}
    if a.json:
        print(json.dumps(res))
        return res
    print(f"shape {a.shape} on {res['device']} ({res['dtype']}): hook over {hook['modules']} modules / "
          f"{hook['delta_s_values']:,} delta_S values ({hook['frac_fired']:.0%} fire)")
    print(f"  projection, vectorised   {hook['vectorised_ms']:9.3f} ms   {res['vectorised_pct_of_step']:7.3f} % of step")
    print(f"  projection, module loop  {hook['loop_ms']:9.3f} ms   {res['loop_pct_of_step']:7.3f} % of step"
          f"   ({res['loop_over_vectorised']:.1f}x the vectorised)")
    for h in res["subspace"]:
        print(f"  subspace k={h['k']} {h['gate']:9s} {h['vectorised_ms']:8.3f} ms   {h['vectorised_pct_of_step']:7.3f} % of step"
              f"   (loop {h['loop_ms']:.3f} ms, {h['frac_fired']:.0%} fire)")
    print(f"  learner fwd+bwd step     {step['step_ms']:9.1f} ms   ({step['tokens']:,} tokens, {step['layers']} layers"
          f"{', peak %.1f GiB' % step['peak_gib'] if step['peak_gib'] else ''})")
    worst = max([res["vectorised_pct_of_step"], *(h["vectorised_pct_of_step"] for h in res["subspace"])])
    print(f"  goal vectorised < 1 % of step (rank-1 and subspace): {'met' if worst < 1 else 'NOT met'}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
