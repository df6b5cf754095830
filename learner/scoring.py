"""Scoring sequences under the policy: the prompt-shared forward, the full forward, reference log-probs.

What the learner's step needs from the model, apart from the algorithm: log p of each completion token
of a micro-batch (learner.batch.MicroBatch) under the current policy (with the residual stream at one
layer for Rebound), and under the reference policy (delta_S = 0) for the KL.
"""
from __future__ import annotations

import torch
from torch import Tensor

from shared.adapter import adapter_disabled, adapter_modules, merged_inference
from shared.logprobs import LayerCapture, token_logprobs

from .batch import MicroBatch


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

    def logp(self, mb: MicroBatch, hidden_layer: int | None = None):
        """log p of each completion token [B, C] (+ residual stream at `hidden_layer` and its token mask).

        Default path: each distinct prompt runs once and its KV cache fans out to its completions
        (a group's G samples share the prompt: ~3x less compute on the toy). With gradient
        checkpointing (no KV cache in training) every sequence runs whole instead.
        """
        if self.shared_prefix:
            return self.forward_shared(mb, hidden_layer)
        return self.forward_full(mb, hidden_layer)

    def _full_inputs(self, mb: MicroBatch) -> tuple[Tensor, Tensor, Tensor, int]:
        """Right-padded prompt + completion ids [B, L], their attention mask, each row's prompt length."""
        L = max(len(p) + len(c) for p, c in zip(mb.prompts, mb.completions))
        ids = torch.full((len(mb), L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(mb), L), dtype=torch.long)
        plen = torch.tensor([len(p) for p in mb.prompts], dtype=torch.long)
        for i, (p, c) in enumerate(zip(mb.prompts, mb.completions)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            attn[i, : len(p) + len(c)] = 1
        return ids, attn, plen, L

    def forward_full(self, mb: MicroBatch, hidden_layer: int | None = None, slice_completions: bool = True):
        """Every sequence whole (the gradient-checkpointing path). lm_head + log-softmax run only at the
        positions that score completion tokens (slice_completions; False: at every position, then gathered,
        kept for the equivalence test): on a real prompt most positions are prompt."""
        ids, attn, plen, L = self._full_inputs(mb)
        # position t scores token t+1: completion token j of row i is scored at plen_i - 1 + j
        pos = (plen[:, None] - 1 + torch.arange(mb.width)[None]).clamp(max=L - 2).to(self.device)
        ids, attn = ids.to(self.device), attn.to(self.device)
        out = token_logprobs(self.model, ids, attn, hidden_layer=hidden_layer,
                             positions=pos if slice_completions else None)
        logp, hidden = out if hidden_layer is not None else (out, None)
        if not slice_completions:
            logp = logp.gather(1, pos)
        if hidden is None:
            return logp, None, None
        hmask = torch.zeros((len(mb), L))
        for i, (p, c) in enumerate(zip(mb.prompts, mb.completions)):
            hmask[i, len(p): len(p) + len(c)] = 1.0
        return logp, hidden, hmask.to(self.device)

    def _shared_inputs(self, mb: MicroBatch):
        """Distinct prompts (left-padded) + the fan-out to their sequences + one completion block per
        sequence that starts with the last prompt token (its output scores completion token 0)."""
        keys: dict[tuple, int] = {}
        for p in mb.prompts:
            keys.setdefault(tuple(p), len(keys))
        prompts = list(keys)
        W = max(len(p) for p in prompts)
        pid = torch.full((len(prompts), W), self.pad_id, dtype=torch.long)
        patt = torch.zeros((len(prompts), W), dtype=torch.long)
        for i, p in enumerate(prompts):
            pid[i, W - len(p):] = torch.tensor(p, dtype=torch.long)
            patt[i, W - len(p):] = 1
        ppos = (patt.cumsum(-1) - 1).clamp_min(0)
        fan = torch.tensor([keys[tuple(p)] for p in mb.prompts])
        C = mb.width
        cid = torch.full((len(mb), C + 1), self.pad_id, dtype=torch.long)
        catt = torch.zeros((len(mb), C + 1), dtype=torch.long)
        for i, (p, comp) in enumerate(zip(mb.prompts, mb.completions)):
            c = len(comp)
            cid[i, 0] = p[-1]
            cid[i, 1: 1 + c] = torch.tensor(comp, dtype=torch.long)
            catt[i, : 1 + c] = 1
        return pid, patt, ppos, fan, cid, catt, W, C

    @torch.no_grad()
    def ref_logp(self, mb: MicroBatch) -> Tensor:
        """Reference-policy (delta_S = 0) log-probs [B, C] of the completion tokens, for the KL.

        On CPU with a Qwen3 model it runs shared.fast_decode's lean loop over merged weights (the
        toy step is dispatch-bound; same shared-prefix layout); elsewhere the usual forward."""
        if not self.lean_ref:
            with adapter_disabled(self.model):
                return self.logp(mb)[0]
        dev = self.device
        pid, patt, ppos, fan, cid, catt, W, C = self._shared_inputs(mb)
        dec = self._ref_decoder()
        dec.max_len = W + C + 1
        if W > 1:
            dec.prefill(pid[:, :-1].to(dev), patt[:, :-1].to(dev))
            dec.keep(fan.to(dev))
        else:
            dec.reset(len(mb))
        logits = dec.extend(cid.to(dev), catt.to(dev))[:, :-1].float()
        return -torch.nn.functional.cross_entropy(logits.transpose(1, 2), cid[:, 1:].to(dev), reduction="none")

    def _ref_decoder(self):
        """The lean decoder over the delta_S = 0 weights, merged once: they never change during a run."""
        if self._ref_dec is None:
            from shared.fast_decode import Qwen3Decoder

            with adapter_disabled(self.model), merged_inference(self.model):
                self._ref_dec = Qwen3Decoder(self.model, max_len=1)
        return self._ref_dec

    def forward_shared(self, mb: MicroBatch, hidden_layer: int | None = None):
        """Each distinct prompt once, its KV cache fanned out to its completions (the default path)."""
        dev = self.device
        pid, patt, ppos, fan, cid, catt, W, C = self._shared_inputs(mb)
        body = self.model.model
        cap = LayerCapture(self.model, hidden_layer) if hidden_layer is not None else None
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
            torch.zeros(len(mb), dtype=torch.long), C + 1).float().to(dev)
