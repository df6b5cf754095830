"""Chunked fused log-probs == log_softmax-gather of the full logits (values, grads, hidden states)."""
import copy

import pytest
import torch

from shared.logprobs import hidden_at_layer, token_logprobs

torch.set_num_threads(1)


def _reference(model, ids, mask):
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, use_cache=False)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return logp, out.hidden_states


@pytest.mark.parametrize("chunk", [3, 7, 1000])
def test_matches_full_logits(tiny_qwen3, chunk):
    torch.manual_seed(0)
    ids = torch.randint(2, 256, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on one row
    with torch.no_grad():
        ref, _ = _reference(tiny_qwen3, ids, mask)
        got = token_logprobs(tiny_qwen3, ids, mask, chunk=chunk)
    assert got.shape == (3, 16) and got.dtype == torch.float32
    valid = mask[:, 1:].bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-5)


def test_gradients_match_and_hidden_layer(tiny_qwen3):
    model = copy.deepcopy(tiny_qwen3)
    torch.manual_seed(1)
    ids = torch.randint(2, 256, (2, 11))
    mask = torch.ones_like(ids)
    w = model.model.layers[0].mlp.up_proj.weight
    w.requires_grad_(True)
    ref, hs = _reference(model, ids, mask)
    ref.sum().backward()
    g_ref = w.grad.clone()
    w.grad = None
    logp, hidden = token_logprobs(model, ids, mask, chunk=4, hidden_layer=0)
    logp.sum().backward()
    torch.testing.assert_close(w.grad, g_ref, rtol=1e-4, atol=1e-6)
    # hidden_states[k+1] is the residual stream after decoder layer k
    assert hidden.shape == (2, 11, 64)
    torch.testing.assert_close(hidden.detach(), hs[1].detach(), rtol=1e-5, atol=1e-5)
    h0 = hidden_at_layer(model, ids, mask, 0)
    torch.testing.assert_close(h0, hs[1].detach(), rtol=1e-5, atol=1e-5)
    h_last = hidden_at_layer(model, ids, mask, 1)
    torch.testing.assert_close(model.model.norm(h_last), hs[2].detach(), rtol=1e-5, atol=1e-5)


def test_bad_layer_is_rejected(tiny_qwen3):
    ids = torch.randint(2, 256, (1, 5))
    with pytest.raises(ValueError, match="out of range.*2 layers"):
        token_logprobs(tiny_qwen3, ids, None, hidden_layer=7)
