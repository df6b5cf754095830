"""A lean prefill + decode loop for Qwen3-architecture models (CPU toy sampling, HF-engine fallback).

Why: the tiny toy model's decode step is dispatch-bound. transformers' forward spends most of it on
glue (mask building, cache concatenation, repeat_kv, seven separate projections per layer). Here
each layer is four matmuls (fused q|k|v, o, fused gate|up, down) over the *merged* weights of
`shared.adapter.merged_inference`, with a preallocated KV cache written in place, `F.rms_norm` and
grouped-query SDPA. Same math as `Qwen3ForCausalLM` (tests/unit/test_fast_decode.py: logits within 1e-4
of the HF forward); anything it does not cover (other architectures, sliding windows, non-SiLU
MLPs) makes `unsupported()` name the reason and the engine keeps the transformers path.

All rows advance in lockstep, so one cache index serves the batch; prompts are left-padded and
`valid` masks the padding keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.adapter import AntiPaSTOLinear


def unsupported(model: nn.Module) -> str | None:
    """None if `model` can decode here, else the reason it cannot."""
    if type(model).__name__ != "Qwen3ForCausalLM":
        return f"{type(model).__name__} is not Qwen3ForCausalLM"
    cfg = model.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(cfg, "use_sliding_window", False):
        return f"layer types {sorted(kinds)} (sliding windows not covered)"
    return None


def _weight(mod: nn.Module) -> Tensor:
    if isinstance(mod, AntiPaSTOLinear):
        if mod.merged is None:
            raise RuntimeError("AntiPaSTO module without merged weight: decode inside merged_inference()")
        return mod.merged
    return mod.weight


def _bias(mods: list[nn.Module]) -> Tensor | None:
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(_weight(m).shape[0], dtype=_weight(m).dtype,
                                                                     device=_weight(m).device) for m in mods])


class Qwen3Decoder:
    """prefill(ids, attn) -> last logits; step(tokens) -> next logits; keep(rows) drops finished rows.

    `max_len` is the cache length the next prefill/reset allocates; a decoder may be reused for
    batches of other lengths by setting it between uses (the weights are gathered once)."""

    def __init__(self, model: nn.Module, max_len: int):
        reason = unsupported(model)
        if reason:
            raise ValueError(f"fast decode does not cover this model: {reason}")
        cfg, inner = model.config, model.model
        self.model, self.inner, self.max_len = model, inner, max_len
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps, self.scale = cfg.rms_norm_eps, self.head_dim ** -0.5
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = [a.q_proj, a.k_proj, a.v_proj]
            self.layers.append(dict(
                ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                qn=a.q_norm.weight, kn=a.k_norm.weight,
                wqkv=torch.cat([_weight(x) for x in qkv]), bqkv=_bias(qkv),
                wo=_weight(a.o_proj), bo=a.o_proj.bias,
                wgu=torch.cat([_weight(m.gate_proj), _weight(m.up_proj)]), wd=_weight(m.down_proj),
            ))
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []

    def _norm(self, x: Tensor, w: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    def _forward(self, ids: Tensor, pos: Tensor, start: int, mask: Tensor, every: bool = False) -> Tensor:
        """ids/pos [B, T] written at cache slots start..start+T; mask [B, 1, T, start+T] (True = attend).
        Logits of the last position [B, V], or of every position [B, T, V] with `every`."""
        B, T = ids.shape
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, pos)
        cos, sin = cos[:, None], sin[:, None]
        end = start + T
        for i, L in enumerate(self.layers):
            x = self._norm(h, L["ln1"])
            qkv = F.linear(x, L["wqkv"], L["bqkv"])
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self._norm(q.view(B, T, self.heads, self.head_dim), L["qn"]).transpose(1, 2)
            k = self._norm(k.view(B, T, self.kv_heads, self.head_dim), L["kn"]).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i][:, :, start:end] = k
            self.v[i][:, :, start:end] = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, self.k[i][:, :, :end], self.v[i][:, :, :end], attn_mask=mask,
                                               scale=self.scale, enable_gqa=self.heads != self.kv_heads)
            h = h + F.linear(o.transpose(1, 2).reshape(B, T, self.q_size), L["wo"], L["bo"])
            g, u = F.linear(self._norm(h, L["ln2"]), L["wgu"]).chunk(2, dim=-1)
            h = h + F.linear(F.silu(g) * u, L["wd"])
        return self.model.lm_head(self._norm(h if every else h[:, -1], self.inner.norm.weight))

    def reset(self, batch: int) -> None:
        """An empty cache for `batch` rows (prefill does this itself)."""
        w = self.layers[0]["wqkv"]
        shape = (batch, self.kv_heads, self.max_len, self.head_dim)
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.layers]
        self.valid = torch.zeros((batch, self.max_len), dtype=torch.bool, device=w.device)
        self.cur, self.next_pos = 0, torch.zeros(batch, dtype=torch.long, device=w.device)

    def prefill(self, ids: Tensor, attn: Tensor) -> Tensor:
        """Left-padded prompts ids/attn [B, P] -> logits of the last position [B, V]."""
        B, P = ids.shape
        if P >= self.max_len:
            raise ValueError(f"prompt length {P} leaves no room in a cache of {self.max_len}")
        self.reset(B)
        self.valid[:, :P] = attn.bool()
        self.pos = (attn.cumsum(-1) - 1).clamp_min(0)
        causal = torch.ones((P, P), dtype=torch.bool, device=ids.device).tril()
        # padding query rows see themselves, so no row of the softmax is empty (no NaN in the cache)
        mask = (causal[None] & self.valid[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=ids.device)[None]
        logits = self._forward(ids, self.pos, 0, mask[:, None])
        self.cur, self.next_pos = P, self.pos[:, -1] + 1
        return logits

    def step(self, tok: Tensor) -> Tensor:
        """One new token per row [B] -> next logits [B, V]."""
        if self.cur >= self.max_len:
            raise ValueError(f"cache of {self.max_len} positions is full")
        self.valid[:, self.cur] = True
        logits = self._forward(tok[:, None], self.next_pos[:, None], self.cur,
                               self.valid[:, None, None, : self.cur + 1])
        self.cur += 1
        self.next_pos = self.next_pos + 1
        return logits

    def extend(self, ids: Tensor, attn: Tensor) -> Tensor:
        """Append a right-padded block ids/attn [B, T] after what the cache holds -> logits [B, T, V]
        (every position; the learner's scoring pass over completions)."""
        B, T = ids.shape
        start, end = self.cur, self.cur + T
        if end > self.max_len:
            raise ValueError(f"block of {T} does not fit a cache of {self.max_len} holding {start}")
        self.valid[:, start:end] = attn.bool()
        block = torch.ones((T, T), dtype=torch.bool, device=ids.device).tril()[None] & self.valid[:, None, start:end]
        block = block | torch.eye(T, dtype=torch.bool, device=ids.device)[None]
        mask = torch.cat([self.valid[:, None, :start].expand(B, T, start), block], dim=-1)
        pos = self.next_pos[:, None] + torch.arange(T, device=ids.device)[None]
        logits = self._forward(ids, pos, start, mask[:, None], every=True)
        self.cur, self.next_pos = end, self.next_pos + T
        return logits

    def keep(self, rows: Tensor) -> None:
        """Keep only these rows (indices into the current batch) in the cache."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.valid, self.next_pos = self.valid.index_select(0, rows), self.next_pos.index_select(0, rows)


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)
