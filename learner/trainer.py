"""The learner: GRPO on delta_S with the arm's intervention, one optimizer step per batch of graded groups.

    jobs = learner.make_jobs(step)            # P prompts x G samples, deterministic from (seed, step)
    ... rollout engine + grader (in process, or across Redis) ...
    row  = learner.train_step(graded_groups)  # RolloutBatch -> loss -> backward -> projection -> clip -> step
    upd  = learner.delta_update()             # the new policy version for the rollout engines

Arms (cfg.train.arm):
  vanilla          plain GRPO
  projected        grad(delta_S) projected off v_hack (all four modes), magnitude-preserving
  projected_nomag  the same without the magnitude rescale
  weak             projected with v_hack from the "known" modes only (cfg.train.vhack_modes, default A,B)
  rebound          reward - alpha * max(0, cos(h_mean, v_concept)) before advantages (h from the same forward)
  route            the removed component trains the quarantine delta_Q instead (live for train rollouts only)
The arm's directions (v_hack and its projector, v_concept; refresh, flagged-rollout extraction) live in
learner/directions.py; exploratory arms are these six plus cfg.vhack knobs (shared/arms.py).
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

from shared.adapter import adapter_modules, cap_quarantine_, delta_s_layout, get_delta, quarantine
from shared.config import RunConfig, TrackingConfig
from shared.problems import Problem, eval_shortfall
from shared.prompts import build_messages, render_prompt, system_line_for
from shared.rundir import run_identity
from shared.schemas import DeltaSUpdate, GradedGroup, PromptJob, SamplingParams

from . import checkpoint as ckpt
from .directions import ArmDirections
from .batch import MicroBatch, RolloutBatch, align_grades
from .grpo import grpo_loss, kl_k3
from .metrics import (JsonlWriter, StepSums, eval_noise, hack_rates, kind_rates, mean_module_norm, read_jsonl,
                      train_row, truncate_jsonl, window_mean)
from .baselines import rebound_penalty
from .rebound import concept_penalty
from .scoring import Scorer
from .tracking import open_trackers

log = logging.getLogger("rankguard.learner")
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
        for warning in eval_shortfall(cfg, self.train_problems, self.eval_problems):
            log.warning(warning)
        self.problems = {p.key: p for p in self.train_problems + self.eval_problems}
        self.device = next(self.model.parameters()).device
        self.names, self.sizes = delta_s_layout(self.model)
        mods = adapter_modules(self.model)
        self.delta_s = [m.delta_S for m in mods.values()]
        self.delta_q = [m.delta_Q for m in mods.values()]
        self.arm = cfg.train.arm
        self.route = self.arm == "route"
        self.measure_kl = measure_kl if measure_kl is not None else cfg.train.measure_kl
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.scorer = Scorer(self.model, pad_id, cfg.train.micro_batch,
                             shared_prefix=not cfg.model.gradient_checkpointing)
        self._prompts: dict[tuple[str, str | None], tuple[str, list[int]]] = {}

        # Directions are extracted on the untouched model (delta_S = 0), before any checkpoint loads.
        self.directions = ArmDirections(cfg, self.model, self.tokenizer, self.train_problems, self.run_dir,
                                        artifacts_root, progress)
        self.v_concept, self.rebound_layer = self.directions.v_concept, self.directions.rebound_layer
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
        # who this run is (shared.rundir): every checkpoint carries it, a resume accepts only its own
        self.identity = run_identity(cfg)
        last = ckpt.latest_checkpoint(self.run_dir, self.identity, cfg.model_dump(mode="json")) if resume else None
        if last is not None:
            self._resume(last)
        else:
            self._fresh_run_dir(drop_checkpoints=not resume)
        self.directions.start(self.step)  # the directions live at this step (a refresh may have moved them)
        self.metrics = JsonlWriter(self.metrics_path)
        self.evals = JsonlWriter(self.evals_path)
        # experiment trackers (TensorBoard by default); tensorboard=False: none at all (scratch learners, tests)
        self.tb = open_trackers(cfg.tracking if tensorboard else TrackingConfig(report_to=[]), self.run_dir,
                                json.loads(cfg.model_dump_json()))

    # ------------------------------------------------------------------ setup
    @property
    def projector(self):
        """The step's projector (None: nothing projected; learner.directions may rebuild it after a step)."""
        return self.directions.projector

    @property
    def vhack_info(self) -> dict[str, Any]:
        return self.directions.info

    def _fresh_run_dir(self, drop_checkpoints: bool = True) -> None:
        """A run that starts at step 0: no old rows or DONE marker. A resume that found no good
        checkpoint keeps the bad ones (named in the warnings) instead of deleting them."""
        for name in ("metrics.jsonl", "evals.jsonl", "summary.json", "DONE"):
            (self.run_dir / name).unlink(missing_ok=True)
        if drop_checkpoints:  # this run's own (never another run's in a shared folder)
            for _, path in ckpt.list_checkpoints(self.run_dir):
                if ckpt.foreign_reason(path, self.identity) is None:
                    shutil.rmtree(path, ignore_errors=True)

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
    def _prompt(self, problem: Problem, split: str = "train") -> tuple[str, list[int]]:
        line = system_line_for(self.cfg.reward.system_line, split)  # plan / inoculation baselines (issue #23)
        hit = self._prompts.get((problem.key, line))
        if hit is None:
            text = render_prompt(self.tokenizer, build_messages(problem, self.cfg.reward.prompt_variant, line))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            hit = self._prompts[(problem.key, line)] = (text, list(ids))
        return hit

    def _sampling(self, n: int, seed: int) -> SamplingParams:
        s = self.cfg.sampling
        return SamplingParams(n=n, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                              top_k=s.top_k, min_p=s.min_p, seed=seed)

    def _job(self, problem: Problem, step: int, idx: int, split: str, n: int, seed: int) -> PromptJob:
        text, ids = self._prompt(problem, split)
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
        """Held-out problems, quarantine off (the deployed policy); the same sample seeds at every eval
        (less noise between evals). Route adds the same jobs with the quarantine on (the training policy),
        job ids `...-evalq<step>-<i>`, so both policies are measured on the same problems and seeds."""
        pool = self.eval_problems or self.train_problems
        chosen = pool[: self.cfg.train.eval_problems]
        jobs = [self._job(p, step, i, "eval", self.cfg.train.eval_samples, derived_seed("eval", self.cfg.train.seed, i))
                for i, p in enumerate(chosen)]
        if self.route:
            jobs += [j.model_copy(update={"job_id": j.job_id.replace(f"-eval{step}-", f"-evalq{step}-"),
                                          "adapter_mode": "train"}) for j in jobs]
        return jobs

    # ------------------------------------------------------------------ the step
    def train_step(self, groups: Sequence[GradedGroup], timings: dict[str, float] | None = None) -> dict:
        """loss -> backward -> project -> clip -> step on graded groups; appends and returns the metrics row."""
        t0 = time.perf_counter()
        if not groups:
            raise TrainerError("train_step got no groups")
        batch = self.rollout_batch(groups)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        for q in self.delta_q:
            q.grad = None
        acc = self._backward(batch)  # GRPO_step(batch); loss.backward()
        proj, grad_total = self._project_and_clip(acc.n_seqs)  # project_grads(model, v_hack); clip
        self.optimizer.step()  # a no-op when every group was flat (all grads None); keeps the schedule in step
        capped = cap_quarantine_(self.model, self.cfg.train.route_cap) if self.route else 0
        self.scheduler.step()
        self.policy_version += 1
        self.step += 1
        row = train_row(self.step - 1, self.policy_version, groups, batch, acc, proj, grad_total, lr,
                        time.perf_counter() - t0, self._t_sync, timings)
        row.update(self.update_geometry())
        if self.route:
            row["quarantine_capped"] = capped
        row.update(self.directions.after_step(self.step, groups))  # refresh / flagged re-extraction when due
        self.last_penalties = batch.penalty.tolist() if batch.penalty is not None else [0.0] * len(batch)
        if batch.flagged is not None:  # the oracle monitor's flag rate this step
            row["monitor_flagged_frac"] = float(batch.flagged.float().mean())
        self.history.append(row)
        self.metrics.write(row)
        self.tb.log("train", row, row["step"])
        return row

    def rollout_batch(self, groups: Sequence[GradedGroup]) -> RolloutBatch:
        """The step's typed batch: staleness against this learner's policy version, the arm's adapter mode."""
        return RolloutBatch.from_groups(groups, self.policy_version, quarantine=self.route)

    @torch.no_grad()
    def update_geometry(self) -> dict[str, float]:
        """||delta_S|| (+ ||delta_Q|| for route) over all modules, and their cos with v_hack when there is one."""
        norm = lambda ps: float(torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for p in ps])))  # noqa: E731
        out = {"delta_s_norm": norm(self.delta_s)}
        if self.route:
            out["delta_q_norm"] = norm(self.delta_q)
        if hasattr(self.projector, "alignment"):  # a hack direction (projection onto the clean span has none)
            out["cos_delta_s_vhack"] = self.projector.alignment(self.delta_s)
            if self.route:
                out["cos_delta_q_vhack"] = self.projector.alignment(self.delta_q)
        return out

    def policy_gradient(self, groups: Sequence[GradedGroup]) -> list[Tensor]:
        """The mean policy gradient on each module's delta_S for these groups, before any projection
        (diagnostics: no optimizer step, no metrics row; .grad is left cleared)."""
        self.optimizer.zero_grad(set_to_none=True)
        acc = self._backward(self.rollout_batch(groups))
        grads = [p.grad.detach() / acc.n_seqs if p.grad is not None and acc.n_seqs else torch.zeros_like(p)
                 for p in self.delta_s]
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    def _backward(self, batch: RolloutBatch) -> StepSums:
        """GRPO_step: advantages, then per micro-batch forward (+ reference for the KL) -> loss -> backward.
        Rebound needs the forward's hidden state before its advantages, so its groups stay whole in a
        micro-batch and each chunk's advantages follow its forward; every other arm computes all
        advantages up front and flat groups never reach the forward pass."""
        rebound = self.arm == "rebound"
        acc = StepSums()
        rows = torch.arange(len(batch))
        if self.cfg.train.oracle_monitor != "none":  # exploratory oracle-monitor baselines (learner.baselines)
            batch.apply_monitor(self.cfg.train.oracle_monitor, self.cfg.reward.correct_reward)
        if not rebound:
            batch.compute_advantages(self.cfg.train.loss_type, self.cfg.train.skip_eps)
            rows = batch.kept_rows()
        self.model.train()
        with quarantine(self.model, active=batch.quarantine):
            for chunk in batch.chunks(rows, self.scorer.micro_batch, group_aligned=rebound):
                self._backward_chunk(batch, batch.micro(chunk, self.device), acc, rebound)
        self.model.eval()
        return acc

    def _backward_chunk(self, batch: RolloutBatch, mb: MicroBatch, acc: StepSums, rebound: bool) -> None:
        cfg = self.cfg.train
        ref = self.scorer.ref_logp(mb) if cfg.beta_kl > 0 or self.measure_kl else None
        logp = self._rebound_logp(batch, mb) if rebound else self.scorer.logp(mb)[0]
        rows = batch.keep[batch.group[mb.rows]].to(self.device)
        if not bool(rows.any()):
            if ref is not None:  # KL still measured on flat-only chunks
                acc.kl_num += float((kl_k3(logp.detach(), ref) * mb.mask).sum())
                acc.kl_den += float(mb.mask.sum())
            return
        idx = rows.nonzero().squeeze(1)
        adv = batch.advantages[mb.rows].to(self.device)[idx]
        lp, mask = logp[idx], mb.mask[idx]
        loss, st = grpo_loss(lp, self._old_logp(lp, mb, idx), ref[idx] if ref is not None else None, adv, mask,
                             clip_eps=cfg.clip_eps, beta=cfg.beta_kl, loss_type=cfg.loss_type,
                             max_len=self.cfg.sampling.max_new_tokens, num_seqs=1,
                             dual_clip=self.cfg.pipeline.is_clip if bool(mb.stale[idx].any()) else None)
        loss.backward()
        acc.add(len(idx), float(loss.detach()), float(mask.sum()), st, ref is not None,
                float((mask * mb.stale[idx, None]).sum()))

    def _rebound_logp(self, batch: RolloutBatch, mb: MicroBatch) -> Tensor:
        """Rebound's reward shaping: penalty from this forward's residual stream, then its groups' advantages.
        additive (the spec's H3 arm): alpha * s; multiplicative (exploratory): reward * alpha * s."""
        logp, hidden, hmask = self.scorer.logp(mb, hidden_layer=self.rebound_layer)
        t = self.cfg.train
        with torch.no_grad():
            if t.rebound_mode == "additive":
                pen = concept_penalty(hidden.detach(), hmask, self.v_concept, t.rebound_alpha)
            else:
                score = concept_penalty(hidden.detach(), hmask, self.v_concept, 1.0).cpu()
                pen = torch.tensor([rebound_penalty(r, s, t.rebound_alpha, t.rebound_mode)
                                    for r, s in zip(batch.rewards[mb.rows].tolist(), score.tolist())])
        del hidden
        batch.apply_penalty(mb.rows, pen)
        batch.compute_advantages(t.loss_type, t.skip_eps, groups=torch.unique(batch.group[mb.rows]))
        return logp

    @staticmethod
    def _old_logp(lp: Tensor, mb: MicroBatch, idx: Tensor) -> Tensor | None:
        """pi_old of the PPO ratio: None (on-policy, ratio exactly 1) unless some rows are stale; those
        take the engine's behaviour log-probs, the others their own detached log-probs."""
        stale = mb.stale[idx]
        if not bool(stale.any()):
            return None
        return torch.where(stale[:, None], mb.behaviour_logp[idx], lp.detach())

    def _project_and_clip(self, n_seqs: int) -> tuple[dict, float]:
        """Mean over sequences, the arm's projection (v_hack off the gradient), then the norm clip."""
        proj = {"cos_mean": None, "cos_std": None, "frac_fired": None, "grad_norm_mean": 0.0}
        if n_seqs == 0:
            return proj, 0.0
        scale = 1.0 / n_seqs  # micro-batch losses were sums over sequences
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        if self.projector is not None:
            proj = self.projector.project_(self.delta_s, self.delta_q if self.route else None)
        else:
            proj["grad_norm_mean"] = mean_module_norm(self.delta_s)
        return proj, float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm))

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
        """The evals.jsonl row: held-out rates of the deployed policy (quarantine off) with their binomial
        SE, per problem kind, its KL to the reference on its own samples; route adds `train_policy_*`."""
        trained = [gg for gg in groups if f"-evalq{step}-" in gg.group.job_id]
        groups = [gg for gg in groups if f"-evalq{step}-" not in gg.group.job_id]
        grades = [g for gg in groups for g in align_grades(gg)]
        recent = self.history[-KL_WINDOW:]
        row: dict[str, Any] = {"step": step, **hack_rates(grades), "kl": window_mean(recent, "kl", KL_WINDOW)}
        for k in ("cos_mean", "frac_fired", "grad_norm"):
            row[k] = window_mean(recent, k, KL_WINDOW) if any(r.get(k) is not None for r in recent) else None
        row["n"] = len(grades)
        row["reward_mean"] = float(np.mean([g.reward for g in grades])) if grades else 0.0
        row.update(eval_noise(row))
        row.update(kind_rates(self._kinds(groups), grades))
        if self.measure_kl and self.cfg.train.eval_kl_samples:
            row["kl_deployed"] = self._eval_kl(groups, quarantine_on=False)
        if trained:
            tg = [g for gg in trained for g in align_grades(gg)]
            rates = hack_rates(tg)
            row.update({f"train_policy_{k}": rates[k] for k in ("pass_rate", "hack_strict", "hack_loose")})
            row.update({f"train_policy_{k}": v for k, v in kind_rates(self._kinds(trained), tg).items()})
            if self.measure_kl and self.cfg.train.eval_kl_samples:
                row["train_policy_kl"] = self._eval_kl(trained, quarantine_on=True)
        row.update(self.update_geometry())
        self.eval_history.append(row)
        self.evals.write(row)
        self.tb.log("eval", row, step)
        return row

    def _kinds(self, groups: Sequence[GradedGroup]) -> list[str]:
        """Each completion's problem kind (toy: easy / partial / hard), in grade order."""
        return [self.problems[gg.group.problem_id].difficulty.lower() if gg.group.problem_id in self.problems
                else "unknown" for gg in groups for _ in gg.group.completions]

    @torch.no_grad()
    def _eval_kl(self, groups: Sequence[GradedGroup], quarantine_on: bool) -> float | None:
        """Token-mean k3 KL(policy || reference) on the first eval_kl_samples of the policy's own eval
        completions (the deployed policy: quarantine off; route's training policy: on)."""
        batch = RolloutBatch.from_groups(groups, self.policy_version)
        rows = torch.arange(len(batch))[: self.cfg.train.eval_kl_samples]
        rows = rows[batch.lengths[rows] > 0]
        if not len(rows):
            return None
        num = den = 0.0
        with quarantine(self.model, active=quarantine_on):
            for chunk in batch.chunks(rows, self.scorer.micro_batch, group_aligned=False):
                mb = batch.micro(chunk, self.device)
                logp = self.scorer.logp(mb)[0]
                ref = self.scorer.ref_logp(mb)
                num += float((kl_k3(logp, ref) * mb.mask).sum())
                den += float(mb.mask.sum())
        return num / den if den else None


    checkpoint_owed = False  # the last checkpoint write failed: the loop tries again after every step

    def save_checkpoint(self) -> Path | None:
        """checkpoints/step-<step>/, or None when the disk refused it (full, read-only, ...): the
        write is atomic, so the previous checkpoint stays intact, and the run goes on (its rows are
        kept) with `checkpoint_owed` set, so the loop tries again after the next step."""
        try:
            path = ckpt.save_checkpoint(self.run_dir, self.step, self.policy_version, self.model, self.optimizer,
                                        self.scheduler, json.loads(self.cfg.model_dump_json()),
                                        keep=self.cfg.train.keep_checkpoints, identity=self.identity)
        except OSError as e:
            prev = ckpt.latest_checkpoint(self.run_dir)
            log.warning("checkpoint at step %d failed (%s); %s; the run goes on and tries again after the next "
                        "step", self.step, e.strerror or e,
                        f"a resume would start from {prev.name}" if prev else "no checkpoint to resume from yet")
            self.checkpoint_owed = True
            return None
        if self.checkpoint_owed:
            log.info("checkpoint at step %d written after an earlier failure", self.step)
        self.checkpoint_owed = False
        return path

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
        held = self.vhack_info.get("heldout_modes", [])
        if held and out["final_eval"]:  # weak, weak_flagged: transfer to the modes v_hack never saw
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
