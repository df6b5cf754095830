"""The learner: GRPO on delta_S with the arm's intervention, one optimizer step per batch of graded groups.

    jobs = learner.make_jobs(step)            # P prompts x G samples, deterministic from (seed, step)
    ... rollout engine + grader (in process, or across Redis) ...
    row  = learner.train_step(graded_groups)  # loss -> backward -> projection -> clip -> step
    upd  = learner.delta_update()             # the new policy version for the rollout engines

Arms (cfg.train.arm):
  vanilla          plain GRPO
  projected        grad(delta_S) projected off v_hack (all four modes), magnitude-preserving
  projected_nomag  the same without the magnitude rescale
  weak             projected with v_hack from the "known" modes only (cfg.train.vhack_modes, default A,B)
  rebound          reward - alpha * max(0, cos(h_mean, v_concept)) before advantages (h from the same forward)
  route            the removed component trains the quarantine delta_Q instead (live for train rollouts only)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from shared.adapter import (adapter_disabled, adapter_modules, delta_s_layout, get_delta, merged_inference,
                            quarantine)
from shared.config import HACK_MODES, RunConfig
from shared.problems import Problem
from shared.prompts import build_messages, render_prompt
from shared.schemas import DeltaSUpdate, Grade, GradedGroup, PromptJob, SamplingParams

from . import checkpoint as ckpt
from .metrics import JsonlWriter, TensorBoard, hack_rates, read_jsonl, truncate_jsonl, window_mean

log = logging.getLogger("rankguard.learner")
PROJECTION_ARMS = ("projected", "projected_nomag", "weak", "route")
WEAK_DEFAULT_MODES = ["A", "B"]
KL_WINDOW = 25


class TrainerError(ValueError):
    """Bad input to the learner (groups that do not fit, unknown problem); names the value."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: Any) -> int:
    """A stable 62-bit seed from any parts (same parts -> same seed in every process)."""
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 2


def lr_lambda(warmup: int, total: int):
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `total`."""
    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (s - warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def vhack_modes_for(cfg: RunConfig) -> list[str] | None:
    """Which modes build the arm's v_hack: all four, the weak detector's subset, or none."""
    arm = cfg.train.arm
    if arm not in PROJECTION_ARMS:
        return None
    if arm == "weak":
        modes = sorted(set(cfg.train.vhack_modes))
        return modes if 0 < len(modes) < len(HACK_MODES) else list(WEAK_DEFAULT_MODES)
    return list(HACK_MODES)


class Learner:
    """GRPO learner over the AntiPaSTO delta_S of one run (arm x seed); resumes from its run dir."""

    def __init__(self, cfg: RunConfig, resume: bool = True, policy=None,
                 problems: tuple[list[Problem], list[Problem]] | None = None,
                 measure_kl: bool | None = None, artifacts_root: str | Path | None = None,
                 tensorboard: bool = True, progress: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(cfg.train.torch_threads)
        seed_everything(cfg.train.seed)
        if policy is None:
            from shared.modeling import load_policy
            policy = load_policy(cfg, progress=progress)
        if problems is None:
            from shared.modeling import load_problem_sets
            problems = load_problem_sets(cfg)
        self.model, self.tokenizer = policy.model, policy.tokenizer
        self.model_id = getattr(policy, "model_id", cfg.model.name_or_path)
        self.train_problems, self.eval_problems = list(problems[0]), list(problems[1])
        if not self.train_problems:
            raise TrainerError("no training problems")
        self.problems = {p.key: p for p in self.train_problems + self.eval_problems}
        self.device = next(self.model.parameters()).device
        self.names, self.sizes = delta_s_layout(self.model)
        mods = adapter_modules(self.model)
        self.delta_s = [m.delta_S for m in mods.values()]
        self.delta_q = [m.delta_Q for m in mods.values()]
        self.arm = cfg.train.arm
        self.route = self.arm == "route"
        self.measure_kl = measure_kl if measure_kl is not None else cfg.train.measure_kl
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # prompt-shared forward (KV cache fan-out) unless training runs with gradient checkpointing
        self.shared_prefix = not cfg.model.gradient_checkpointing
        from shared.fast_decode import unsupported
        self.lean_ref = (self.shared_prefix and self.device.type == "cpu" and unsupported(self.model) is None
                         and bool(adapter_modules(self.model)))
        self._ref_dec = None  # see _ref_decoder
        self._prompts: dict[str, tuple[str, list[int]]] = {}

        # Directions are extracted on the untouched model (delta_S = 0), before any checkpoint loads.
        self.projector = None
        self.vhack_info: dict[str, Any] = {}
        self.v_concept: Tensor | None = None
        self.rebound_layer: int | None = None
        self._setup_arm(artifacts_root, progress)
        seed_everything(cfg.train.seed)  # cached or freshly extracted directions: the same run after this

        params = list(self.delta_s) + (list(self.delta_q) if self.route else [])
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                           betas=tuple(cfg.train.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.train.warmup_steps, cfg.train.steps))
        self.step = 0  # completed optimizer steps (= index of the next step)
        self.policy_version = 0
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self._t_sync = 0.0
        self.last_penalties: list[float] = []  # rebound: per completion of the last step, in group order
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.evals_path = self.run_dir / "evals.jsonl"
        last = ckpt.latest_checkpoint(self.run_dir) if resume else None
        if last is not None:
            self._resume(last)
        else:
            self._fresh_run_dir()
        self.metrics = JsonlWriter(self.metrics_path)
        self.evals = JsonlWriter(self.evals_path)
        self.tb = TensorBoard(self.run_dir / "tb", enabled=tensorboard)

    # ------------------------------------------------------------------ setup
    def _setup_arm(self, artifacts_root, progress: bool) -> None:
        from .artifacts import vconcept_artifact, vhack_artifact
        from .vhack import pairs_for_config

        modes = vhack_modes_for(self.cfg)
        if modes is None and self.arm != "rebound":
            return
        pairs = pairs_for_config(self.cfg, self.train_problems)
        if modes is not None:
            art = vhack_artifact(self.model, self.tokenizer, self.cfg, pairs, modes, root=artifacts_root,
                                 progress=progress)
            keep = None
            if self.cfg.train.noise_floor is not None:
                from .projection import noise_floor_mask
                keep = noise_floor_mask(art.cos_heldout, self.cfg.train.noise_floor)
            from .projection import Projector
            self.projector = Projector(self.names, art.vhack, magnitude_preserve=self.arm != "projected_nomag",
                                       keep_mask=keep, route=self.route, device=self.device)
            self.vhack_info = {"path": str(art.path), "cached": art.cached, "modes": modes,
                               "heldout_modes": [m for m in HACK_MODES if m not in modes],
                               "n_projected_modules": self.projector.n_kept, "validation": art.validation()}
            log.info("v_hack %s (%s): %s", "".join(modes), "cached" if art.cached else "extracted", art.validation())
        if self.arm == "rebound":
            from .rebound import layer_for
            self.rebound_layer = layer_for(self.model, self.cfg.train.rebound_layer_frac)
            v, meta, path = vconcept_artifact(self.model, self.tokenizer, self.cfg, pairs, self.rebound_layer,
                                              root=artifacts_root)
            self.v_concept = v.to(self.device)
            self.vhack_info = {"v_concept_path": str(path), "layer": self.rebound_layer,
                               "alpha": self.cfg.train.rebound_alpha}
        (self.run_dir / "directions.json").write_text(json.dumps(self.vhack_info, indent=1, default=str))

    def _fresh_run_dir(self) -> None:
        """A run that does not resume starts clean: no old rows, checkpoints or DONE marker."""
        for name in ("metrics.jsonl", "evals.jsonl", "summary.json", "DONE"):
            (self.run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(ckpt.checkpoint_dir(self.run_dir), ignore_errors=True)

    def _resume(self, path: Path) -> None:
        c = ckpt.load_checkpoint(path, self.model, self.optimizer, self.scheduler, restore_rng=True)
        self.step, self.policy_version = c.step, c.policy_version
        # rows written after this checkpoint belong to steps that will run again
        truncate_jsonl(self.metrics_path, lambda r: r.get("step", -1) < self.step)
        truncate_jsonl(self.evals_path, lambda r: r.get("step", -1) <= self.step)
        self.history = read_jsonl(self.metrics_path)
        self.eval_history = read_jsonl(self.evals_path)
        for name in ("summary.json", "DONE"):
            (self.run_dir / name).unlink(missing_ok=True)
        log.info("resumed %s at step %d (policy version %d)", path, self.step, self.policy_version)

    # ------------------------------------------------------------------ jobs
    def _prompt(self, problem: Problem) -> tuple[str, list[int]]:
        hit = self._prompts.get(problem.key)
        if hit is None:
            text = render_prompt(self.tokenizer, build_messages(problem, self.cfg.reward.prompt_variant))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            hit = self._prompts[problem.key] = (text, list(ids))
        return hit

    def _sampling(self, n: int, seed: int) -> SamplingParams:
        s = self.cfg.sampling
        return SamplingParams(n=n, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                              top_k=s.top_k, min_p=s.min_p, seed=seed)

    def _job(self, problem: Problem, step: int, idx: int, split: str, n: int, seed: int) -> PromptJob:
        text, ids = self._prompt(problem)
        tag = f"{self.arm}-s{self.cfg.train.seed}"
        min_version = max(0, self.policy_version - self.cfg.pipeline.max_staleness) if split == "train" else 0
        return PromptJob(job_id=f"{tag}-{split}{step}-{idx}", step=step, problem_id=problem.key, prompt_text=text,
                         prompt_ids=ids, sampling=self._sampling(n, seed), min_version=min_version, split=split,
                         adapter_mode="train" if split == "train" else "eval")

    def pick_problems(self, step: int) -> list[Problem]:
        """P problems for `step`, a hard_fraction share from the hard ones when difficulties are known."""
        rng = random.Random(derived_seed("problems", self.cfg.train.seed, step))
        P = self.cfg.train.prompts_per_step
        hard = [p for p in self.train_problems if p.difficulty.lower() == "hard"]
        rest = [p for p in self.train_problems if p.difficulty.lower() != "hard"]

        def draw(pool: list[Problem], k: int) -> list[Problem]:
            if k <= 0 or not pool:
                return []
            return rng.sample(pool, k) if k <= len(pool) else [rng.choice(pool) for _ in range(k)]

        if hard and rest:
            n_hard = int(round(P * self.cfg.train.hard_fraction))
            return draw(hard, n_hard) + draw(rest, P - n_hard)
        return draw(self.train_problems, P)

    def make_jobs(self, step: int) -> list[PromptJob]:
        G = self.cfg.sampling.group_size
        return [self._job(p, step, i, "train", G, derived_seed("sample", self.cfg.train.seed, step, i))
                for i, p in enumerate(self.pick_problems(step))]

    def eval_jobs(self, step: int) -> list[PromptJob]:
        """Held-out problems, quarantine off; the same sample seeds at every eval (less noise between evals)."""
        pool = self.eval_problems or self.train_problems
        chosen = pool[: self.cfg.train.eval_problems]
        return [self._job(p, step, i, "eval", self.cfg.train.eval_samples, derived_seed("eval", self.cfg.train.seed, i))
                for i, p in enumerate(chosen)]

    # ------------------------------------------------------------------ batches
    def _sequences(self, groups: Sequence[GradedGroup]) -> list[dict]:
        seqs = []
        for gi, gg in enumerate(groups):
            grades = _align_grades(gg)
            for c, g in zip(gg.group.completions, grades):
                seqs.append({"group": gi, "prompt": list(gg.group.prompt_ids), "comp": list(c.token_ids),
                             "old": list(c.logprobs), "reward": float(g.reward), "grade": g,
                             "version": gg.group.policy_version})
        return seqs

    def _batch(self, seqs: list[dict]) -> dict[str, Tensor]:
        """Completion-aligned tensors [B, C]: mask, behaviour log-probs, staleness (C = longest completion)."""
        C = max(1, max(len(s["comp"]) for s in seqs))
        B = len(seqs)
        mask = torch.zeros((B, C))
        old = torch.zeros((B, C))
        for i, s in enumerate(seqs):
            c = len(s["comp"])
            mask[i, :c] = 1.0
            if c and len(s["old"]) == c:
                old[i, :c] = torch.tensor(s["old"])
        stale = torch.tensor([s["version"] < self.policy_version for s in seqs])
        d = self.device
        return {"mask": mask.to(d), "old": old.to(d), "stale": stale.to(d), "C": C}

    def _forward(self, seqs: list[dict], b: dict, hidden_layer: int | None = None):
        """log p of each completion token [B, C] (+ residual stream at `hidden_layer` and its token mask).

        Default path: each distinct prompt runs once and its KV cache fans out to its completions
        (a group's G samples share the prompt: ~3x less compute on the toy). With gradient
        checkpointing (no KV cache in training) every sequence runs whole instead.
        """
        if self.shared_prefix:
            return self._forward_shared(seqs, b, hidden_layer)
        return self._forward_full(seqs, b, hidden_layer)

    def _forward_full(self, seqs, b, hidden_layer=None):
        from shared.logprobs import token_logprobs
        L = max(len(s["prompt"]) + len(s["comp"]) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), L), dtype=torch.long)
        start = torch.zeros(len(seqs), dtype=torch.long)
        for i, s in enumerate(seqs):
            p, c = len(s["prompt"]), len(s["comp"])
            ids[i, : p + c] = torch.tensor(s["prompt"] + s["comp"], dtype=torch.long)
            attn[i, : p + c] = 1
            start[i] = p - 1  # logp[:, t] scores token t+1
        ids, attn = ids.to(self.device), attn.to(self.device)
        out = token_logprobs(self.model, ids, attn, hidden_layer=hidden_layer)
        logp, hidden = out if hidden_layer is not None else (out, None)
        idx = (start[:, None] + torch.arange(b["C"])[None]).clamp(max=L - 2).to(self.device)
        logp = logp.gather(1, idx)
        if hidden is None:
            return logp, None, None
        hmask = torch.zeros((len(seqs), L))
        for i, s in enumerate(seqs):
            hmask[i, len(s["prompt"]): len(s["prompt"]) + len(s["comp"])] = 1.0
        return logp, hidden, hmask.to(self.device)

    def _shared_inputs(self, seqs, b):
        """Distinct prompts (left-padded) + the fan-out to their sequences + one completion block per
        sequence that starts with the last prompt token (its output scores completion token 0)."""
        keys: dict[tuple, int] = {}
        for s in seqs:
            keys.setdefault(tuple(s["prompt"]), len(keys))
        prompts = list(keys)
        W = max(len(p) for p in prompts)
        pid = torch.full((len(prompts), W), self.pad_id, dtype=torch.long)
        patt = torch.zeros((len(prompts), W), dtype=torch.long)
        for i, p in enumerate(prompts):
            pid[i, W - len(p):] = torch.tensor(p, dtype=torch.long)
            patt[i, W - len(p):] = 1
        ppos = (patt.cumsum(-1) - 1).clamp_min(0)
        fan = torch.tensor([keys[tuple(s["prompt"])] for s in seqs])
        C = b["C"]
        cid = torch.full((len(seqs), C + 1), self.pad_id, dtype=torch.long)
        catt = torch.zeros((len(seqs), C + 1), dtype=torch.long)
        for i, s in enumerate(seqs):
            c = len(s["comp"])
            cid[i, 0] = s["prompt"][-1]
            cid[i, 1: 1 + c] = torch.tensor(s["comp"], dtype=torch.long)
            catt[i, : 1 + c] = 1
        return pid, patt, ppos, fan, cid, catt, W, C

    @torch.no_grad()
    def _ref_logp(self, seqs, b) -> Tensor:
        """Reference-policy (delta_S = 0) log-probs [B, C] of the completion tokens, for the KL.

        On CPU with a Qwen3 model it runs shared.fast_decode's lean loop over merged weights (the
        toy step is dispatch-bound; same shared-prefix layout); elsewhere the usual forward."""
        if not self.lean_ref:
            with adapter_disabled(self.model):
                return self._forward(seqs, b)[0]
        dev = self.device
        pid, patt, ppos, fan, cid, catt, W, C = self._shared_inputs(seqs, b)
        dec = self._ref_decoder()
        dec.max_len = W + C + 1
        if W > 1:
            dec.prefill(pid[:, :-1].to(dev), patt[:, :-1].to(dev))
            dec.keep(fan.to(dev))
        else:
            dec.reset(len(seqs))
        logits = dec.extend(cid.to(dev), catt.to(dev))[:, :-1].float()
        return -torch.nn.functional.cross_entropy(logits.transpose(1, 2), cid[:, 1:].to(dev), reduction="none")

    def _ref_decoder(self):
        """The lean decoder over the delta_S = 0 weights, merged once: they never change during a run."""
        if self._ref_dec is None:
            from shared.fast_decode import Qwen3Decoder

            with adapter_disabled(self.model), merged_inference(self.model):
                self._ref_dec = Qwen3Decoder(self.model, max_len=1)
        return self._ref_dec

    def _forward_shared(self, seqs, b, hidden_layer=None):
        from shared.logprobs import _LayerCapture
        dev = self.device
        pid, patt, ppos, fan, cid, catt, W, C = self._shared_inputs(seqs, b)
        body = self.model.model
        cap = _LayerCapture(self.model, hidden_layer) if hidden_layer is not None else None
        try:
            if W > 1:
                pre = body(input_ids=pid[:, :-1].to(dev), attention_mask=patt[:, :-1].to(dev),
                           position_ids=ppos[:, :-1].to(dev), use_cache=True)
                cache = pre.past_key_values
                cache.reorder_cache(fan.to(dev))
                att = torch.cat([patt[fan, :-1], catt], dim=1)
            else:
                cache, att = None, catt
            pos = ppos[fan, -1:] + torch.arange(C + 1)[None]
            out = body(input_ids=cid.to(dev), attention_mask=att.to(dev), position_ids=pos.to(dev),
                       past_key_values=cache, use_cache=cache is not None)
        finally:
            if cap is not None:
                cap.handle.remove()
        h = out.last_hidden_state[:, :-1]
        logits = self.model.get_output_embeddings()(h).float()
        logp = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), cid[:, 1:].to(dev), reduction="none")
        if cap is None:
            return logp, None, None
        return logp, cap.out, catt.float().to(dev) - torch.nn.functional.one_hot(
            torch.zeros(len(seqs), dtype=torch.long), C + 1).float().to(dev)

    def _chunks(self, seqs: list[dict], group_aligned: bool) -> list[list[dict]]:
        mb = max(1, self.cfg.train.micro_batch)
        if not group_aligned:  # similar lengths share a chunk: less padding (the loss is a sum)
            seqs = sorted(seqs, key=lambda s: len(s["comp"]))
            return [seqs[i: i + mb] for i in range(0, len(seqs), mb)]
        chunks: list[list[dict]] = []
        cur: list[dict] = []
        by_group: dict[int, list[dict]] = {}
        for s in seqs:
            by_group.setdefault(s["group"], []).append(s)
        for g in by_group.values():
            if cur and len(cur) + len(g) > mb:
                chunks.append(cur)
                cur = []
            cur = cur + g
        if cur:
            chunks.append(cur)
        return chunks

    # ------------------------------------------------------------------ the step
    def train_step(self, groups: Sequence[GradedGroup], timings: dict[str, float] | None = None) -> dict:
        """One optimizer step on graded groups; appends and returns the metrics row."""
        t0 = time.perf_counter()
        cfg = self.cfg.train
        if not groups:
            raise TrainerError("train_step got no groups")
        seqs = self._sequences(groups)
        n_groups = len(groups)
        rebound = self.arm == "rebound"
        self.optimizer.zero_grad(set_to_none=True)
        for q in self.delta_q:
            q.grad = None

        keep_group: dict[int, bool] = {}
        if not rebound:  # advantages up front; flat groups never reach the forward pass
            for gi in range(n_groups):
                mine = [s for s in seqs if s["group"] == gi]
                self._advantages(mine, keep_group, gi)
            train_seqs = [s for s in seqs if keep_group[s["group"]]]
        else:
            train_seqs = seqs

        n_kept_seq = 0
        loss_sum = 0.0
        kl_num = kl_den = 0.0
        clip_num = 0.0
        isw_num = 0.0
        pen_all: list[float] = []
        G_tok = 0.0
        max_len = self.cfg.sampling.max_new_tokens
        self.model.train()
        with quarantine(self.model, active=self.route):
            for chunk in self._chunks(train_seqs, group_aligned=rebound):
                b = self._batch(chunk)
                ref = None
                if cfg.beta_kl > 0 or self.measure_kl:
                    ref = self._ref_logp(chunk, b)
                if rebound:
                    from .rebound import concept_penalty
                    logp, hidden, hmask = self._forward(chunk, b, hidden_layer=self.rebound_layer)
                    with torch.no_grad():
                        pen = concept_penalty(hidden.detach(), hmask, self.v_concept, cfg.rebound_alpha).cpu()
                    del hidden
                    for s, p in zip(chunk, pen.tolist()):
                        s["penalty"] = p
                        pen_all.append(p)
                    for gi in sorted({s["group"] for s in chunk}):
                        self._advantages([s for s in chunk if s["group"] == gi], keep_group, gi)
                else:
                    logp = self._forward(chunk, b)[0]
                rows = torch.tensor([keep_group[s["group"]] for s in chunk], device=self.device)
                if ref is not None and not bool(rows.any()):  # KL still measured on flat-only chunks
                    kl_tok = _k3(logp.detach(), ref) * b["mask"]
                    kl_num += float(kl_tok.sum())
                    kl_den += float(b["mask"].sum())
                    continue
                if not bool(rows.any()):
                    continue
                idx = rows.nonzero().squeeze(1)
                adv = torch.tensor([s["adv"] for s in chunk], device=self.device)[idx]
                lp, mask = logp[idx], b["mask"][idx]
                old, is_w = None, None
                stale = b["stale"][idx]
                if bool(stale.any()):  # async: decoupled PPO, truncated IS on the behaviour log-probs
                    from .grpo import truncated_is_weight
                    is_w = torch.where(stale[:, None], truncated_is_weight(lp.detach(), b["old"][idx],
                                                                           self.cfg.pipeline.is_clip),
                                       torch.ones_like(lp))
                    isw_num += float((is_w * mask).sum())
                from .grpo import grpo_loss
                loss, st = grpo_loss(lp, old, ref[idx] if ref is not None else None, adv, mask,
                                     clip_eps=cfg.clip_eps, beta=cfg.beta_kl, unbiased=cfg.unbiased,
                                     max_len=max_len, is_weight=is_w, num_seqs=1)
                loss.backward()
                n = len(idx)
                n_kept_seq += n
                loss_sum += float(loss.detach())
                tok = float(mask.sum())
                G_tok += tok
                if ref is not None:
                    kl_num += float(st["kl"]) * tok
                    kl_den += tok
                clip_num += float(st["clip_frac"]) * tok
        self.model.eval()

        n_skipped = sum(1 for gi in range(n_groups) if not keep_group.get(gi, False))
        lr_now = self.optimizer.param_groups[0]["lr"]
        proj = {"cos_mean": None, "cos_std": None, "frac_fired": None, "grad_norm_mean": 0.0}
        grad_total = 0.0
        if n_kept_seq > 0:
            scale = 1.0 / n_kept_seq  # micro-batch losses were sums over sequences
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            if self.projector is not None:
                proj = self.projector.project_(self.delta_s, self.delta_q if self.route else None)
            else:
                proj["grad_norm_mean"] = _mean_module_norm(self.delta_s)
            grad_total = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        self.optimizer.step()  # a no-op when every group was flat (all grads None); keeps the schedule in step
        self.scheduler.step()
        self.policy_version += 1
        step = self.step
        self.step += 1

        grades = [s["grade"] for s in seqs]
        rewards = [s["reward"] for s in seqs]
        t_train = time.perf_counter() - t0
        tm = {"t_generate": sum(g.group.gen_seconds for g in groups),
              "t_grade": sum(g.grade_seconds for g in groups), "t_sync": self._t_sync}
        tm.update(timings or {})
        row: dict[str, Any] = {
            "step": step, "policy_version": self.policy_version,
            "loss": loss_sum / n_kept_seq if n_kept_seq else 0.0,
            "reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
            "skipped_frac": n_skipped / n_groups,
            **hack_rates(grades),
            "kl": kl_num / kl_den if kl_den else None,
            "cos_mean": proj["cos_mean"], "cos_std": proj["cos_std"], "frac_fired": proj["frac_fired"],
            "grad_norm": proj["grad_norm_mean"], "lr": lr_now,
            "t_generate": tm["t_generate"], "t_grade": tm["t_grade"], "t_train": t_train, "t_sync": tm["t_sync"],
            # extras (not in the fixed key list): useful when reading a run
            "grad_norm_total": grad_total, "n_groups": n_groups, "n_train_seqs": n_kept_seq,
            "clip_frac": clip_num / G_tok if G_tok else 0.0,
            "staleness": float(np.mean([self.policy_version - 1 - g.group.policy_version for g in groups])),
        }
        self.last_penalties = [s.get("penalty", 0.0) for s in seqs]
        if pen_all:
            row["penalty_mean"] = float(np.mean(pen_all))
            row["reward_shaped_mean"] = float(np.mean([s["reward"] - s.get("penalty", 0.0) for s in seqs]))
        if isw_num and G_tok:
            row["is_weight_mean"] = isw_num / G_tok
        self.history.append(row)
        self.metrics.write(row)
        self.tb.log("train", row, step)
        return row

    def _advantages(self, mine: list[dict], keep: dict[int, bool], gi: int) -> None:
        from .grpo import group_advantages
        r = torch.tensor([[s["reward"] - s.get("penalty", 0.0) for s in mine]])
        adv, k = group_advantages(r, unbiased=self.cfg.train.unbiased, eps=self.cfg.train.skip_eps)
        keep[gi] = bool(k[0])
        for s, a in zip(mine, adv[0].tolist()):
            s["adv"] = a

    # ------------------------------------------------------------------ sync, eval, checkpoints
    def delta_update(self) -> DeltaSUpdate:
        """The current policy version as one flat fp32 delta_S buffer (+ quarantine for the route arm)."""
        t0 = time.perf_counter()
        from shared.codec import encode_floats
        upd = DeltaSUpdate(version=self.policy_version, names=list(self.names), sizes=list(self.sizes),
                           data=encode_floats(get_delta(self.model, flat=True)),
                           quarantine=encode_floats(get_delta(self.model, kind="q", flat=True)) if self.route else None,
                           meta={"arm": self.arm, "seed": self.cfg.train.seed, "step": self.step})
        self._t_sync = time.perf_counter() - t0
        return upd

    def note_sync(self, seconds: float) -> None:
        """Time spent publishing the last policy version (reported as t_sync of the next row)."""
        self._t_sync = float(seconds)

    def record_eval(self, step: int, groups: Sequence[GradedGroup]) -> dict:
        grades = [g for gg in groups for g in _align_grades(gg)]
        recent = self.history[-KL_WINDOW:]
        row: dict[str, Any] = {"step": step, **hack_rates(grades), "kl": window_mean(recent, "kl", KL_WINDOW)}
        for k in ("cos_mean", "frac_fired", "grad_norm"):
            row[k] = window_mean(recent, k, KL_WINDOW) if any(r.get(k) is not None for r in recent) else None
        row["n"] = len(grades)
        row["reward_mean"] = float(np.mean([g.reward for g in grades])) if grades else 0.0
        self.eval_history.append(row)
        self.evals.write(row)
        self.tb.log("eval", row, step)
        return row

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(self.run_dir, self.step, self.policy_version, self.model, self.optimizer,
                                    self.scheduler, json.loads(self.cfg.model_dump_json()), keep=2)

    def summary(self) -> dict:
        last = self.history[-KL_WINDOW:]
        keys = ("reward_mean", "pass_rate", "hack_strict", "hack_loose", "kl", "cos_mean", "frac_fired",
                "grad_norm", "skipped_frac", "t_generate", "t_grade", "t_train", "t_sync")
        out: dict[str, Any] = {
            "arm": self.arm, "seed": self.cfg.train.seed, "steps": self.step, "policy_version": self.policy_version,
            "final_eval": self.eval_history[-1] if self.eval_history else None,
            "train_last25": {k: window_mean(last, k, KL_WINDOW) for k in keys
                             if any(r.get(k) is not None for r in last)},
            "directions": self.vhack_info,
        }
        if self.history:
            out["sec_per_step"] = float(np.mean([r["t_generate"] + r["t_grade"] + r["t_train"] + r["t_sync"]
                                                 for r in self.history]))
        if self.arm == "weak" and out["final_eval"]:
            held = self.vhack_info.get("heldout_modes", [])
            out["heldout_modes"] = held
            out["final_eval_heldout"] = {f"hack_strict_{m}": out["final_eval"].get(f"hack_strict_{m}") for m in held}
        return out

    def finish(self) -> dict:
        """summary.json + DONE; closes the writers."""
        s = self.summary()
        tmp = self.run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(s, indent=1, default=str))
        tmp.replace(self.run_dir / "summary.json")
        (self.run_dir / "DONE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
        self.close()
        return s

    def close(self) -> None:
        self.metrics.close()
        self.evals.close()
        self.tb.close()


def _k3(logp: Tensor, ref: Tensor) -> Tensor:
    d = ref - logp
    return torch.exp(d) - d - 1


def _mean_module_norm(params: Sequence[torch.nn.Parameter]) -> float:
    norms = [float(p.grad.float().norm()) for p in params if p.grad is not None]
    norms = [n for n in norms if n >= 1e-12]
    return sum(norms) / len(norms) if norms else 0.0


def _align_grades(gg: GradedGroup) -> list[Grade]:
    """Grades in completion order: by rollout_id when the grader kept it, else positionally."""
    comps = gg.group.completions
    if len(gg.grades) != len(comps):
        raise TrainerError(f"group {gg.group.job_id!r}: {len(gg.grades)} grades for {len(comps)} completions")
    by_id = {g.rollout_id: g for g in gg.grades if g.rollout_id}
    if len(by_id) == len(comps) and all(c.rollout_id in by_id for c in comps):
        return [by_id[c.rollout_id] for c in comps]
    return list(gg.grades)


# ---------------------------------------------------------------------- in-process loop

def _grade_groups(grader, problems: dict[str, Problem], groups) -> tuple[list[GradedGroup], float]:
    t0 = time.perf_counter()
    pairs = [(problems[g.problem_id], c.text) for g in groups for c in g.completions]
    grades = grader.grade_many(pairs)
    seconds = time.perf_counter() - t0
    out, i = [], 0
    for g in groups:
        mine = []
        for c in g.completions:
            gr = grades[i]
            i += 1
            if not gr.rollout_id:
                gr = gr.model_copy(update={"rollout_id": c.rollout_id})
            mine.append(gr)
        out.append(GradedGroup(group=g, grades=mine, grade_seconds=seconds / max(1, len(groups))))
    return out, seconds


def run_inprocess(cfg: RunConfig, resume: bool = True, progress: bool = True, learner: Learner | None = None,
                  engine=None, grader=None) -> dict:
    """Learner + HFEngine (sharing the learner's model) + Grader in one process; returns the summary.

    Evaluates at step 0, every cfg.train.eval_every steps and at the end; checkpoints every
    cfg.train.checkpoint_every steps and at the end.
    """
    from tqdm.auto import tqdm

    learner = learner or Learner(cfg, resume=resume, progress=progress)
    if engine is None:
        from rollout.hf_engine import HFEngine
        engine = HFEngine(learner.model, learner.tokenizer, device=learner.device)
    engine.version = learner.policy_version
    own_grader = grader is None
    if own_grader:
        from reward_server.grader import Grader
        grader = Grader(cfg.reward, workers=cfg.reward.workers or None)
    total = cfg.train.steps
    done_evals = {r["step"] for r in learner.eval_history}

    def evaluate(step: int) -> dict:
        groups = engine.generate(learner.eval_jobs(step))
        graded, _ = _grade_groups(grader, learner.problems, groups)
        return learner.record_eval(step, graded)

    bar = tqdm(total=total, initial=learner.step, disable=not progress, desc=f"{cfg.train.arm} s{cfg.train.seed}",
               dynamic_ncols=True)
    try:
        if learner.step == 0 and 0 not in done_evals and cfg.train.eval_every > 0:
            evaluate(0)
        while learner.step < total:
            jobs = learner.make_jobs(learner.step)
            t0 = time.perf_counter()
            groups = engine.generate(jobs)  # quarantine follows job.adapter_mode ("train")
            t_gen = time.perf_counter() - t0
            graded, t_grade = _grade_groups(grader, learner.problems, groups)
            row = learner.train_step(graded, timings={"t_generate": t_gen, "t_grade": t_grade})
            t0 = time.perf_counter()
            engine.version = learner.policy_version  # same model object: the weights are already live
            learner.note_sync(time.perf_counter() - t0)
            s = learner.step
            ev = None
            if (cfg.train.eval_every > 0 and s % cfg.train.eval_every == 0) or s == total:
                ev = evaluate(s)
            if (cfg.train.checkpoint_every > 0 and s % cfg.train.checkpoint_every == 0) or s == total:
                learner.save_checkpoint()
            recent = learner.history[-10:]
            post = {"hack": f"{window_mean(recent, 'hack_strict', 10):.2f}",
                    "pass": f"{window_mean(recent, 'pass_rate', 10):.2f}",
                    "r": f"{row['reward_mean']:.2f}",
                    "s/step": f"{row['t_generate'] + row['t_grade'] + row['t_train']:.2f}"}
            if ev is not None:
                post["eval_hack"] = f"{ev['hack_strict']:.2f}"
                post["eval_pass"] = f"{ev['pass_rate']:.2f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
    finally:
        bar.close()
        if own_grader and hasattr(grader, "close"):
            grader.close()
    return learner.finish()
