"""What an arm steers with, and when that changes: v_hack and its Projector (projection arms), v_concept (Rebound).

`ArmDirections` is built once per run, before any checkpoint loads (directions are extracted on the
model as loaded, delta_S = 0); the Learner then calls `start(step)` once it knows its step (fresh or
resumed) and `after_step(step, groups)` after every optimizer step.

                 authored pairs (cfg.vhack.pair_set)           own rollouts flagged by a weak detector
                 every projection arm; the spec's              vhack.from_rollouts: the weak_flagged arm
    step 0       the cached artifact (learner.artifacts)       nothing: no projection (or routing) until
                                                               vhack.flagged_min_pairs flagged pairs exist
    re-extract   every vhack.refresh_every steps, the same     at the first step with enough pairs, then
                 pairs at the current delta_S (0 = frozen)     every refresh_every steps, newest pairs

The preregistered arms (default VhackConfig) stay frozen, one-sided, meandiff k = 1 on the `solution`
pairs, and write nothing here beyond directions.json. A run whose directions change ("dynamic") keeps
every set in <run_dir>/directions/ (learner.vhack.DirectionsStore) with the step it became live at (the
number of completed steps), logs cos(v_new, v_old) per module in <run_dir>/directions_refresh.jsonl
(mean / min in that step's metrics row), and a weak_flagged run keeps its flagged pairs per step in
<run_dir>/flagged_pairs.jsonl; a resume at step s reloads exactly the set and the pool that were live
at s, so it continues bit for bit. Extraction uses torch.autograd.grad (no .grad is written), draws no
random numbers (eval mode; the RNG state is saved and restored around it all the same), and runs in the
adapter state of the GRPO backward (quarantine on for route), so v_hack lives where the gradient does.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from shared.adapter import adapter_modules, quarantine
from shared.config import HACK_MODES, RunConfig
from shared.problems import Problem
from shared.prompts import build_messages

from .metrics import read_jsonl, truncate_jsonl
from .pairs import Pair, flagged_pairs
from .projection import Projector, noise_floor_mask
from .vhack import Directions, DirectionsStore, direction_cos, extract_directions, subspace_overlap

log = logging.getLogger("rankguard.learner")
PROJECTION_ARMS = ("projected", "projected_nomag", "weak", "route")
WEAK_DEFAULT_MODES = ["A", "B"]
STORE_DIR = "directions"
REFRESH_LOG = "directions_refresh.jsonl"
FLAGGED_LOG = "flagged_pairs.jsonl"
ROLLOUT_SOURCE = ("exploratory: v_hack from the policy's own rollouts flagged by a weak detector (modes {modes}, "
                  "grade.{flag}), not authored before training")


def vhack_modes_for(cfg: RunConfig) -> list[str] | None:
    """Which modes build the arm's v_hack: all four, the weak detector's subset, or none (no v_hack)."""
    arm = cfg.train.arm
    if arm not in PROJECTION_ARMS:
        return None
    modes = sorted(set(cfg.train.vhack_modes))
    if cfg.vhack.from_rollouts:  # the detector's modes, whatever they are (all four = a full detector)
        return modes or list(WEAK_DEFAULT_MODES)
    if arm == "weak":
        return modes if 0 < len(modes) < len(HACK_MODES) else list(WEAK_DEFAULT_MODES)
    return list(HACK_MODES)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a side computation without moving any RNG the training draws from (python, numpy, torch)."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


def _append(path: Path, row: dict) -> None:
    """One JSON line, flushed (a crash loses at most this line; read_jsonl skips a torn one)."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _compact(pair: Pair) -> dict:
    return {"problem_id": pair.problem_id, "mode": pair.mode, "hack": pair.hack, "clean": pair.clean}


class ArmDirections:
    """The run's directions: `projector` (None = nothing projected this step), `v_concept` / `rebound_layer`
    (Rebound), `info` (directions.json, also in summary.json)."""

    def __init__(self, cfg: RunConfig, model: nn.Module, tokenizer, train_problems: Sequence[Problem],
                 run_dir: str | Path, artifacts_root: str | Path | None = None, progress: bool = False):
        from shared.arms import arm_name

        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.run_dir = Path(run_dir)
        self.arm = cfg.train.arm
        self.route = self.arm == "route"
        self.names = list(adapter_modules(model))
        self.device = next(model.parameters()).device
        self.problems = {p.key: p for p in train_problems}
        self.modes = vhack_modes_for(cfg)
        self.from_rollouts = self.modes is not None and cfg.vhack.from_rollouts
        self.refresh_every = cfg.vhack.refresh_every if self.modes is not None else 0
        self.dynamic = self.modes is not None and (self.refresh_every > 0 or self.from_rollouts)
        self.store = DirectionsStore(self.run_dir / STORE_DIR)
        self.projector: Projector | None = None
        self.current: Directions | None = None  # the live set (None: nothing to project yet)
        self.authored: Directions | None = None  # the authored pairs' set at delta_S = 0
        self.keep: dict[str, bool] | None = None
        self.v_concept: Tensor | None = None
        self.rebound_layer: int | None = None
        self.pairs: list[Pair] = []
        self.pool: list[tuple[int, Pair]] = []  # from_rollouts: (train step, flagged pair), oldest first
        self.info: dict[str, Any] = {}
        self._waiting_logged = -1
        if self.modes is not None or self.arm == "rebound":
            from .vhack import pairs_for_config

            self.pairs = pairs_for_config(cfg, train_problems)
        if self.modes is not None:
            self._setup_vhack(artifacts_root, progress)
        if self.arm == "rebound":
            self._setup_rebound(artifacts_root)
        name = arm_name(cfg)
        if name != self.arm:  # exploratory: say what it is (the preregistered arms' file is as it was)
            self.info.update(arm_name=name, exploratory=True, vhack=cfg.vhack.model_dump(mode="json"))
        if self.info:  # vanilla has no directions and writes none
            self._write_info()

    # ------------------------------------------------------------------ setup
    def _setup_vhack(self, artifacts_root, progress: bool) -> None:
        from .artifacts import vhack_artifact

        if self.cfg.vhack.project == "onto_clean":
            return self._setup_clean()

        art = vhack_artifact(self.model, self.tokenizer, self.cfg, self.pairs, self.modes, root=artifacts_root,
                             progress=progress)
        self.authored = art.directions
        if self.cfg.train.noise_floor is not None:  # held-out cos of the authored set; kept across refreshes
            self.keep = noise_floor_mask(art.cos_heldout, self.cfg.train.noise_floor)
        heldout = [m for m in HACK_MODES if m not in self.modes]
        if self.from_rollouts:
            self.info = {"source": ROLLOUT_SOURCE.format(modes=",".join(self.modes), flag=self.cfg.vhack.flag),
                         "modes": self.modes, "heldout_modes": heldout, "n_projected_modules": 0,
                         "authored_reference": {"path": str(art.path), "validation": art.validation()},
                         "status": self._waiting(0)}
            log.info("v_hack from flagged rollouts (%s): %s", "".join(self.modes), self.info["status"])
            return
        self._use(art.directions)
        self.info = {"path": str(art.path), "cached": art.cached, "modes": self.modes, "heldout_modes": heldout,
                     "n_projected_modules": self.projector.n_kept, "validation": art.validation()}
        log.info("v_hack %s (%s): %s", "".join(self.modes), "cached" if art.cached else "extracted", art.validation())

    def _setup_rebound(self, artifacts_root) -> None:
        from .artifacts import vconcept_artifact
        from .rebound import layer_for

        self.rebound_layer = layer_for(self.model, self.cfg.train.rebound_layer_frac)
        v, _, path = vconcept_artifact(self.model, self.tokenizer, self.cfg, self.pairs, self.rebound_layer,
                                       root=artifacts_root)
        self.v_concept = v.to(self.device)
        self.info = {"v_concept_path": str(path), "layer": self.rebound_layer, "alpha": self.cfg.train.rebound_alpha}

    def _setup_clean(self) -> None:
        """projected_onto_clean (issue #23 baseline): keep only the gradient's part in the clean subspace."""
        from .baselines import OntoProjector, clean_subspace, controlled_basis
        from .pairs import split_pairs

        if self.route or self.dynamic:
            raise ValueError("vhack.project=onto_clean is a frozen projection arm: no route, refresh or flagged rollouts")
        pairs = split_pairs(self.pairs, "train", list(self.modes))
        with preserved_rng():
            d = clean_subspace(self.model, self.tokenizer, pairs, self.cfg.vhack.clean_k)
        self.model.zero_grad(set_to_none=True)
        self.current = d
        basis = controlled_basis(d.basis, self.cfg.vhack.direction, self.cfg.train.seed)
        self.projector = OntoProjector(self.names, basis, device=self.device)
        self.info = {"source": "exploratory baseline: gradient projected ONTO the span of the top-k clean-side pair "
                               "gradients (authored pairs' clean completions)",
                     "k": self.cfg.vhack.clean_k, "n_pairs": len(pairs), "n_axes": d.n_axes(),
                     "direction": self.cfg.vhack.direction, "modes": self.modes, "n_projected_modules": len(self.names)}
        log.info("clean subspace: %d axes over %d modules from %d pairs", d.n_axes(), len(self.names), len(pairs))

    def _use(self, d: Directions) -> None:
        """Make `d` (as extracted: stored and resumed as such) live; vhack.direction decides what is applied:
        d itself, a Haar-random basis of the same shape per module, or -d (learner.baselines)."""
        from .baselines import controlled_basis

        self.current = d
        basis = controlled_basis(d.basis, self.cfg.vhack.direction, self.cfg.train.seed)
        self.projector = Projector(self.names, basis, magnitude_preserve=self.arm != "projected_nomag",
                                   keep_mask=self.keep, route=self.route, device=self.device, gate=self.cfg.vhack.gate)

    def _waiting(self, n: int) -> str:
        return (f"waiting for flagged rollouts: {n}/{self.cfg.vhack.flagged_min_pairs} pairs, "
                f"no projection{' or routing' if self.route else ''} yet")

    def _write_info(self) -> None:
        (self.run_dir / "directions.json").write_text(json.dumps(self.info, indent=1, default=str))

    # ------------------------------------------------------------------ resume
    def start(self, step: int) -> None:
        """Make the directions those live after `step` completed steps (0: a fresh start); files written for
        later steps belong to steps that will run again and are dropped, as metrics rows are."""
        if not self.dynamic:
            return
        truncate_jsonl(self.run_dir / REFRESH_LOG, lambda r: r.get("step", -1) <= step)
        truncate_jsonl(self.run_dir / FLAGGED_LOG, lambda r: r.get("step", -1) < step)
        for s in self.store.steps():
            if s > step:
                self.store.path(s).unlink(missing_ok=True)
        if self.from_rollouts:
            self.pool = []
            for row in read_jsonl(self.run_dir / FLAGGED_LOG):
                self._add_to_pool(int(row["step"]), [self._pair(p) for p in row["pairs"]])
        if step == 0:
            if self.current is not None:
                self.store.save(self.current, self._meta("authored pairs"))
        else:
            d = self.store.latest(at_most=step)
            if d is not None:  # fresh, aligned copies: float reductions then round as on the live tensors
                self._use(Directions({n: v.clone() for n, v in d.basis.items()},
                                     {n: v.clone() for n, v in d.sv.items()}, d.step, d.meta))
            elif self.current is not None:
                log.warning("no stored directions at or before step %d in %s; using the step-0 set", step,
                            self.store.root)
        self._update_info()

    def _pair(self, row: dict) -> Pair:
        problem = self.problems[row["problem_id"]]
        return Pair(**row, messages=build_messages(problem, self.cfg.reward.prompt_variant), split="train",
                    end_of_turn=True)

    def _meta(self, source: str) -> dict[str, str]:
        return {"model_id": self.cfg.model.name_or_path, "source": source, "arm": self.arm}

    # ------------------------------------------------------------------ per step
    def after_step(self, step: int, groups: Sequence) -> dict[str, Any]:
        """After `step` completed optimizer steps (the rollouts of train step step-1 in `groups`): collect
        flagged pairs, re-extract when due. Returns extras for that step's metrics row ({} for frozen arms)."""
        if not self.dynamic:
            return {}
        out: dict[str, Any] = {}
        if self.from_rollouts:
            self._collect(step - 1, groups)
            out["flagged_pairs"] = len(self.pool)
        if self._due(step):
            t0 = time.perf_counter()
            out.update(self._reextract(step))
            out["t_refresh"] = time.perf_counter() - t0
        elif self.from_rollouts and self.current is None and self._waiting_logged != len(self.pool):
            self._waiting_logged = len(self.pool)
            self.info["status"] = self._waiting(len(self.pool))
            log.info("after step %d: %s", step, self.info["status"])
            self._write_info()
        return out

    def _collect(self, train_step: int, groups: Sequence) -> None:
        vc = self.cfg.vhack
        new = flagged_pairs(groups, self.problems, self.modes, self.cfg.reward.prompt_variant,
                            max_pairs=vc.flagged_max_pairs, flag=vc.flag)
        _append(self.run_dir / FLAGGED_LOG, {"step": train_step, "pairs": [_compact(p) for p in new]})
        self._add_to_pool(train_step, new)

    def _add_to_pool(self, train_step: int, pairs: Sequence[Pair]) -> None:
        self.pool = (self.pool + [(train_step, p) for p in pairs])[-self.cfg.vhack.flagged_max_pairs:]

    def _due(self, step: int) -> bool:
        every = self.refresh_every > 0 and step % self.refresh_every == 0
        if not self.from_rollouts:
            return every
        if len(self.pool) < self.cfg.vhack.flagged_min_pairs:
            return False
        return self.current is None or every

    def _reextract(self, step: int) -> dict[str, Any]:
        """New directions at the current delta_S, live from step `step` on; logged, stored, projector rebuilt."""
        pairs = [p for _, p in self.pool] if self.from_rollouts else self.pairs
        source = "flagged rollouts" if self.from_rollouts else "authored pairs"
        with preserved_rng(), quarantine(self.model, active=self.route):
            new = extract_directions(self.model, self.tokenizer, pairs, self.cfg.vhack, self.modes, progress=False,
                                     step=step)
        old = self.current
        if old is not None and set(new.names) != set(old.names):  # (a loaded set lists them sorted)
            raise ValueError(f"re-extracted directions cover {len(new.names)} modules, the old ones {len(old.names)}")
        cos = direction_cos(new, old) if old is not None else {}
        row: dict[str, Any] = {"step": step, "from_step": old.step if old is not None else None, "source": source,
                               "n_pairs": len(pairs), "n_axes": new.n_axes(), "cos": cos,
                               "overlap": subspace_overlap(new, old) if old is not None else {}}
        if cos:
            row.update(cos_mean=float(np.mean(list(cos.values()))), cos_min=min(cos.values()))
        if self.from_rollouts:
            row["modes_count"] = {m: sum(p.mode == m for p in pairs) for m in self.modes}
            row["steps_pooled"] = [self.pool[0][0], self.pool[-1][0]]
            with_authored = direction_cos(new, self.authored) if self.authored is not None else {}
            if with_authored:
                row["cos_authored_mean"] = float(np.mean(list(with_authored.values())))
        self.store.save(new, self._meta(source))
        self._use(new)
        _append(self.run_dir / REFRESH_LOG, row)
        self._update_info(row)
        log.info("step %d: v_hack %s from %d %s (%d axes)%s", step, "re-extracted" if old else "extracted", len(pairs),
                 source, new.n_axes(),
                 f", cos(new, old) mean {row['cos_mean']:+.3f} min {row['cos_min']:+.3f}" if cos else "")
        extras = {"directions_step": step}
        if cos:
            extras.update(refresh_cos_mean=row["cos_mean"], refresh_cos_min=row["cos_min"])
        return extras

    def _update_info(self, last: dict | None = None) -> None:
        if not self.dynamic:
            return
        rows = read_jsonl(self.run_dir / REFRESH_LOG)
        last = last or (rows[-1] if rows else None)
        self.info.update(refresh_every=self.refresh_every, refresh_log=REFRESH_LOG, store=STORE_DIR,
                         n_extractions=len(rows), directions_step=self.current.step if self.current else None)
        if self.projector is not None:
            self.info["n_projected_modules"] = self.projector.n_kept
        if last is not None:
            self.info["last_extraction"] = {k: v for k, v in last.items() if k not in ("cos", "overlap")}
        if self.from_rollouts:
            self.info["status"] = (f"projecting{' and routing' if self.route else ''} on v_hack from "
                                   f"{last['n_pairs']} flagged pairs (step {last['step']})"
                                   if self.current is not None and last else self._waiting(len(self.pool)))
        self._write_info()
