"""One optimizer step's rollouts as one typed batch, built once from the graded groups.

Row i is completion i in group order (group 0's completions, then group 1's, ...). What the engine
and the grader said (token ids, behaviour log-probs, the sampling policy's version, rewards, flags) is
fixed at construction. What the step derives has its own field, each filled by one call: Rebound's
concept penalty (`apply_penalty`), the advantages and the keep mask (`compute_advantages`, one
vectorised `group_advantages` over [P, G]). The scorer reads `MicroBatch`es: a list of rows with its
completion-aligned tensors on the model's device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from shared.hacks import MODES
from shared.schemas import Grade, GradedGroup

from .grpo import LossType, group_advantages


class BatchError(ValueError):
    """Graded groups that do not fit their completions; names the group."""


def align_grades(gg: GradedGroup) -> list[Grade]:
    """Grades in completion order: by rollout_id when the grader kept it, else positionally."""
    comps = gg.group.completions
    if len(gg.grades) != len(comps):
        raise BatchError(f"group {gg.group.job_id!r}: {len(gg.grades)} grades for {len(comps)} completions")
    by_id = {g.rollout_id: g for g in gg.grades if g.rollout_id}
    if len(by_id) == len(comps) and all(c.rollout_id in by_id for c in comps):
        return [by_id[c.rollout_id] for c in comps]
    return list(gg.grades)


@dataclass
class MicroBatch:
    """Some rows of a RolloutBatch, completion-aligned [B, C] (C = the longest completion among them)."""

    rows: Tensor  # [B] long: row indices into the step's RolloutBatch
    prompts: list[list[int]]  # [B] each row's prompt ids
    completions: list[list[int]]  # [B] each row's completion ids
    mask: Tensor  # [B, C] 1.0 on completion tokens
    behaviour_logp: Tensor  # [B, C]
    stale: Tensor  # [B] bool

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def __len__(self) -> int:
        return len(self.completions)


@dataclass
class RolloutBatch:
    """Every completion of one optimizer step: N rows over P groups (prompts)."""

    prompt_ids: list[list[int]]  # [P] each group's prompt
    token_ids: list[list[int]]  # [N] each completion's sampled tokens
    group: Tensor  # [N] long: the group (prompt) index of each row
    version: Tensor  # [N] long: the policy version that sampled the row
    stale: Tensor  # [N] bool: sampled by an older policy version than the learner's
    lengths: Tensor  # [N] long: completion tokens
    mask: Tensor  # [N, C] 1.0 on completion tokens (C = the longest completion)
    behaviour_logp: Tensor  # [N, C] the engine's log-prob of each sampled token (0 when it sent none)
    rewards: Tensor  # [N] float64: the grader's reward
    formatted: Tensor  # [N] bool: a code block was found in the answer
    can_compile: Tensor  # [N] bool: that code compiled (the format reward)
    gt_pass: Tensor  # [N] bool: the hidden tests passed
    exploited: Tensor  # [N, len(MODES)] bool: strict hack per mode A-D
    attempted: Tensor  # [N, len(MODES)] bool: loose hack per mode A-D
    grades: list[Grade]  # [N] the full verdicts (timeouts, reference labels) for the metrics row
    quarantine: bool  # route arm: the rollouts ran with the quarantine delta_Q active, so must the forward
    penalty: Tensor | None = None  # [N] float64, Rebound's concept penalty; None for every other arm
    advantages: Tensor | None = None  # [N] float32, set by compute_advantages (0 in skipped groups)
    keep: Tensor | None = None  # [P] bool: the group has a reward spread (is trained); set with advantages
    flagged: Tensor | None = None  # [N] bool, the oracle monitor's label (exploratory gt_penalty / gt_screen)
    screen: bool = False  # screening: flagged rows leave their group's statistics and get advantage 0

    @classmethod
    def from_groups(cls, groups: Sequence[GradedGroup], policy_version: int, quarantine: bool = False
                    ) -> "RolloutBatch":
        """The step's batch; rows in group order, grades aligned to completions by rollout_id."""
        comps, grades, group, version = [], [], [], []
        for gi, gg in enumerate(groups):
            aligned = align_grades(gg)
            comps += gg.group.completions
            grades += aligned
            group += [gi] * len(aligned)
            version += [gg.group.policy_version] * len(aligned)
        N = len(comps)
        C = max(1, max((len(c.token_ids) for c in comps), default=0))
        mask = torch.zeros((N, C))
        old = torch.zeros((N, C))
        for i, c in enumerate(comps):
            n = len(c.token_ids)
            mask[i, :n] = 1.0
            if n and len(c.logprobs) == n:
                old[i, :n] = torch.tensor(c.logprobs)
        version_t = torch.tensor(version, dtype=torch.long)

        def flags(field: str) -> Tensor:
            return torch.tensor([[bool(getattr(g, field).get(m, False)) for m in MODES] for g in grades],
                                dtype=torch.bool).reshape(N, len(MODES))

        return cls(
            prompt_ids=[list(gg.group.prompt_ids) for gg in groups], token_ids=[list(c.token_ids) for c in comps],
            group=torch.tensor(group, dtype=torch.long), version=version_t, stale=version_t < policy_version,
            lengths=torch.tensor([len(c.token_ids) for c in comps], dtype=torch.long), mask=mask,
            behaviour_logp=old, rewards=torch.tensor([float(g.reward) for g in grades], dtype=torch.float64),
            formatted=torch.tensor([bool(g.formatted) for g in grades], dtype=torch.bool),
            can_compile=torch.tensor([bool(g.can_compile) for g in grades], dtype=torch.bool),
            gt_pass=torch.tensor([bool(g.gt_pass) for g in grades], dtype=torch.bool),
            exploited=flags("exploited"), attempted=flags("attempted"), grades=grades, quarantine=quarantine)

    # ------------------------------------------------------------------ shape
    @property
    def n_groups(self) -> int:
        return len(self.prompt_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    def group_sizes(self) -> Tensor:
        """[P] completions per group."""
        return torch.bincount(self.group, minlength=self.n_groups)

    def group_rows(self, groups: Tensor) -> Tensor:
        """[P', G] row indices of `groups`, which must all have G completions (rows are in group order)."""
        sizes = self.group_sizes()
        if len(groups) and bool((sizes[groups] != sizes[groups[0]]).any()):
            raise BatchError(f"groups of different sizes {sorted(set(sizes[groups].tolist()))} in one [P, G] block")
        starts = torch.cumsum(sizes, 0) - sizes
        G = int(sizes[groups[0]]) if len(groups) else 0
        return starts[groups][:, None] + torch.arange(G)[None]

    # ------------------------------------------------------------------ what the step derives
    @property
    def shaped_rewards(self) -> Tensor:
        """[N] float64: the reward the advantages see (Rebound: minus its penalty)."""
        return self.rewards if self.penalty is None else self.rewards - self.penalty

    def apply_penalty(self, rows: Tensor, penalty: Tensor) -> None:
        """A reward penalty on `rows`, added to any earlier one: Rebound's concept penalty (from their
        forward's residual stream), the oracle monitor's."""
        if self.penalty is None:
            self.penalty = torch.zeros(len(self), dtype=torch.float64)
        self.penalty[rows] += penalty.detach().to("cpu", torch.float64)

    def apply_monitor(self, monitor: str, rh_reward: float) -> None:
        """rl-rewardhacking's ground-truth monitors (exploratory oracle baselines, learner.baselines):
        penalty = a flagged (strict) hack loses rh_reward; screen = a flagged (loose or strict) attempt
        leaves its group's statistics with advantage 0."""
        from .baselines import monitor_flags

        self.flagged = torch.tensor(monitor_flags(self.grades, monitor), dtype=torch.bool)
        if monitor == "penalty":
            self.apply_penalty(torch.arange(len(self)), rh_reward * self.flagged.double())
        else:
            self.screen = True

    def compute_advantages(self, loss_type: LossType, skip_eps: float, groups: Tensor | None = None) -> None:
        """Advantages and keep of `groups` (default all) from the shaped rewards: one [P, G]
        group_advantages call (one per group size, should the groups be ragged)."""
        if self.advantages is None:
            self.advantages = torch.zeros(len(self))
            self.keep = torch.zeros(self.n_groups, dtype=torch.bool)
        groups = torch.arange(self.n_groups) if groups is None else groups
        sizes = self.group_sizes()[groups]
        shaped = self.shaped_rewards.float()
        for size in sorted(set(sizes.tolist()) - {0}):
            gs = groups[sizes == size]
            rows = self.group_rows(gs)
            use = (~self.flagged[rows]) if self.screen and self.flagged is not None else None
            adv, keep = group_advantages(shaped[rows], loss_type, skip_eps, use=use)
            self.advantages[rows] = adv
            self.keep[gs] = keep

    def kept_rows(self) -> Tensor:
        """[N'] rows whose group is trained (needs compute_advantages)."""
        if self.keep is None:
            raise BatchError("compute_advantages first: no keep mask yet")
        return self.keep[self.group].nonzero().squeeze(1)

    # ------------------------------------------------------------------ micro-batches
    def micro(self, rows: Tensor | Sequence[int], device: torch.device | str = "cpu") -> MicroBatch:
        """Rows `rows` completion-aligned to their own longest completion, tensors on `device`."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        C = max(1, int(self.lengths[rows].max())) if len(rows) else 1
        return MicroBatch(rows=rows, prompts=[self.prompt_ids[int(self.group[r])] for r in rows],
                          completions=[self.token_ids[int(r)] for r in rows],
                          mask=self.mask[rows, :C].to(device), behaviour_logp=self.behaviour_logp[rows, :C].to(device),
                          stale=self.stale[rows].to(device))

    def chunks(self, rows: Tensor, size: int, group_aligned: bool) -> list[Tensor]:
        """`rows` split into micro-batches of at most `size` sequences. Not group-aligned: similar
        lengths share a chunk (less padding; the loss is a sum). Group-aligned (Rebound): whole groups
        per chunk, so a group's advantages can follow its forward."""
        size = max(1, size)
        if not group_aligned:
            order = sorted(rows.tolist(), key=lambda r: int(self.lengths[r]))  # stable: ties keep group order
            return [torch.tensor(order[i: i + size], dtype=torch.long) for i in range(0, len(order), size)]
        out: list[list[int]] = []
        cur: list[int] = []
        by_group: dict[int, list[int]] = {}
        for r in rows.tolist():
            by_group.setdefault(int(self.group[r]), []).append(r)
        for g in by_group.values():
            if cur and len(cur) + len(g) > size:
                out.append(cur)
                cur = []
            cur = cur + g
        if cur:
            out.append(cur)
        return [torch.tensor(c, dtype=torch.long) for c in out]
