"""Token log-probs without materialising fp32 [B, L, V] logits.

The model body (`model.model`) gives the final hidden states; lm_head + cross-entropy then run per
chunk of positions. With grad enabled each chunk is checkpointed, so the backward recomputes that
chunk's logits instead of keeping them: peak extra memory is one chunk's [B, chunk, V].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _body(model: nn.Module) -> nn.Module:
    body = getattr(model, "model", None)
    if body is None:
        raise ValueError(f"{type(model).__name__} has no .model body (expected a *ForCausalLM)")
    return body


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(_body(model), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}.model has no .layers")
    return layers


def _position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding (matches what generate() used when sampling)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class LayerCapture:
    """Forward hook that keeps the output residual stream of one decoder layer."""

    def __init__(self, model: nn.Module, layer: int) -> None:
        layers = decoder_layers(model)
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"layer {layer} out of range; the model has {len(layers)} layers")
        self.out: Tensor | None = None
        self.handle = layers[layer].register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.out = output[0] if isinstance(output, (tuple, list)) else output

    def __enter__(self) -> "LayerCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _chunk_logp(lm_head: nn.Module, h: Tensor, targets: Tensor, temperature: float) -> Tensor:
    logits = lm_head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    chunk: int = 512,
    hidden_layer: int | None = None,
    temperature: float = 1.0,
    positions: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) -> [B, L-1] fp32.

    positions [B, K] (each in 0..L-2): score only those t, -> [B, K]; the hidden states are gathered
    before lm_head, so positions nobody reads (the prompt's) cost no [V]-wide head and log-softmax.
    With hidden_layer=k, returns (logp, hidden) where hidden [B, L, d] is the residual stream after
    decoder layer k (0-based; what Rebound reads). Padded positions hold garbage: mask them.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    body = _body(model)
    lm_head = model.get_output_embeddings()
    cap = LayerCapture(model, hidden_layer) if hidden_layer is not None else None
    try:
        out = body(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=_position_ids(attention_mask), use_cache=False)
    finally:
        if cap is not None:
            cap.handle.remove()
    if positions is None:
        h = out.last_hidden_state[:, :-1]
        targets = input_ids[:, 1:]
    else:
        h = out.last_hidden_state.gather(1, positions[..., None].expand(-1, -1, out.last_hidden_state.shape[-1]))
        targets = input_ids.gather(1, positions + 1)
    parts = []
    for s in range(0, h.shape[1], chunk):
        hs, ts = h[:, s : s + chunk], targets[:, s : s + chunk]
        if torch.is_grad_enabled() and hs.requires_grad:
            parts.append(checkpoint(_chunk_logp, lm_head, hs, ts, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logp(lm_head, hs, ts, temperature))
    logp = torch.cat(parts, dim=1) if parts else h.new_zeros(h.shape[:2], dtype=torch.float32)
    if cap is None:
        return logp
    if cap.out is None:
        raise RuntimeError(f"layer {hidden_layer} produced no output (hook did not fire)")
    return logp, cap.out


@torch.no_grad()
def hidden_at_layer(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, layer: int) -> Tensor:
    """Residual stream after decoder layer `layer` -> [B, L, d], body only (no lm_head)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with LayerCapture(model, layer) as cap:
        _body(model)(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=_position_ids(attention_mask), use_cache=False)
    assert cap.out is not None
    return cap.out
