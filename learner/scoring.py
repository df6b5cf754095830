"""Scoring sequences under the policy: batching, the prompt-shared forward, reference log-probs.

What the learner's step needs from the model, apart from the algorithm: completion-aligned tensors
for a micro-batch, log p of each completion token under the current policy (with the residual stream
at one layer for Rebound), and under the reference policy (delta_S = 0) for the KL.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from shared.adapter import adapter_disabled, adapter_modules, merged_inference
from shared.schemas import Grade, GradedGroup


class ScoringError(ValueError):
    """Graded groups that do not fit their completions; names the group."""


class Scorer:
    """Log-probs of completions under a wrapped causal LM (policy, or reference with the adapter off)."""

    def __init__(self, model, pad_id: int, micro_batch: int, shared_prefix: bool):
        from shared.fast_decode import unsupported

        self.model, self.pad_id, self.micro_batch = model, pad_id, max(1, micro_batch)
        self.device = next(model.parameters()).device
        # prompt-shared forward (KV cache fan-out) unless training runs with gradient checkpointing
        self.shared_prefix = shared_prefix
        self.lean_ref = (shared_prefix and self.device.type == "cpu" and unsupported(model) is None
                         and bool(adapter_modules(model)))
        self._ref_dec = None  # see _ref_decoder

    @staticmethod
    def sequences(groups: Sequence[GradedGroup]) -> list[dict]:
        """One dict per completion: group index, prompt/completion ids, behaviour log-probs, reward, grade."""
        seqs = []
        for gi, gg in enumerate(groups):
            grades = align_grades(gg)
            for c, g in zip(gg.group.completions, grades):
                seqs.append({"group": gi, "prompt": list(gg.group.prompt_ids), "comp": list(c.token_ids),
                             "old": list(c.logprobs), "reward": float(g.reward), "grade": g,
                             "version": gg.group.policy_version})
        return seqs

    def batch(self, seqs: list[dict], policy_version: int) -> dict[str, Tensor]:
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
        stale = torch.tensor([s["version"] < policy_version for s in seqs])
        d = self.device
        return {"mask": mask.to(d), "old": old.to(d), "stale": stale.to(d), "C": C}

    def logp(self, seqs: list[dict], b: dict, hidden_layer: int | None = None):
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
    def ref_logp(self, seqs, b) -> Tensor:
        """Reference-policy (delta_S = 0) log-probs [B, C] of the completion tokens, for the KL.

        On CPU with a Qwen3 model it runs shared.fast_decode's lean loop over merged weights (the
        toy step is dispatch-bound; same shared-prefix layout); elsewhere the usual forward."""
        if not self.lean_ref:
            with adapter_disabled(self.model):
                return self.logp(seqs, b)[0]
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

    def chunks(self, seqs: list[dict], group_aligned: bool) -> list[list[dict]]:
        mb = max(1, self.micro_batch)
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


def align_grades(gg: GradedGroup) -> list[Grade]:
    """Grades in completion order: by rollout_id when the grader kept it, else positionally."""
    comps = gg.group.completions
    if len(gg.grades) != len(comps):
        raise ScoringError(f"group {gg.group.job_id!r}: {len(gg.grades)} grades for {len(comps)} completions")
    by_id = {g.rollout_id: g for g in gg.grades if g.rollout_id}
    if len(by_id) == len(comps) and all(c.rollout_id in by_id for c in comps):
        return [by_id[c.rollout_id] for c in comps]
    return list(gg.grades)
