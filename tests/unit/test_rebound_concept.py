"""Rebound baseline: layer choice, concept direction (mean-diff), penalty formula, artifact."""

import pytest
import torch

from shared.logprobs import hidden_at_layer, token_logprobs
from learner.pairs import Pair
from learner.rebound import (concept_direction, concept_penalty, layer_for, load_concept,
                             mean_completion_activation, save_concept)
from learner.vhack import VHackError, encode_pair_side
from shared.problems import Message

torch.set_num_threads(1)


class ByteTok:
    """Bytes as ids (+2), enough for a vocab-256 model; no chat template (render_prompt's fallback)."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (b % 254) for b in text.encode()]}


def _pairs():
    msgs = [Message(role="system", content="sys"), Message(role="user", content="solve f")]
    return [Pair(problem_id=str(i), mode="A", messages=msgs, split="train",
                 hack=f"```python\ndef f(): pass\ndef run_tests(): pass{i}\n```",
                 clean=f"```python\ndef f(): return {i} + 1\n```") for i in range(3)]


def test_layer_for_depth_fraction(tiny_qwen3):
    assert layer_for(tiny_qwen3, 0.67) == 1  # 2 layers
    assert layer_for(tiny_qwen3, 0.1) == 0
    with pytest.raises(ValueError, match="fraction 0"):
        layer_for(tiny_qwen3, 0.0)


def test_concept_direction_is_mean_difference_over_completion_tokens(tiny_qwen3):
    tok, pairs = ByteTok(), _pairs()
    v = concept_direction(tiny_qwen3, tok, pairs, layer=1, progress=False)
    expected, centre = torch.zeros(64), torch.zeros(64)
    for p in pairs:
        for sign, text in ((1, p.hack), (-1, p.clean)):
            ids, tmask = encode_pair_side(tok, p, text)
            h = hidden_at_layer(tiny_qwen3, ids, None, 1)[0]
            comp = h[tmask[0].sum().long().neg():]  # the completion's own positions (last n tokens)
            expected += sign * comp.mean(0) / len(pairs)
            centre += comp.mean(0) / (2 * len(pairs))
    assert v.shape == (2, 64)
    torch.testing.assert_close(v[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v[1], centre, rtol=1e-5, atol=1e-6)
    with pytest.raises(VHackError, match="no pairs"):
        concept_direction(tiny_qwen3, tok, [], layer=1)


def test_penalty_formula_and_masks(tiny_qwen3):
    torch.manual_seed(0)
    hidden = torch.randn(3, 6, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.float)
    v = torch.randn(8)
    pen = concept_penalty(hidden, mask, v, alpha=0.5)
    for b in range(3):
        h = hidden[b][mask[b].bool()].mean(0)
        cos = torch.nn.functional.cosine_similarity(h, v, dim=0)
        assert pen[b].item() == pytest.approx(0.5 * max(cos.item(), 0.0), abs=1e-6)
    # a target-aligned [B, L-1] mask means the same tokens
    torch.testing.assert_close(concept_penalty(hidden, mask[:, 1:], v), pen)
    # anti-aligned activations cost nothing; aligned ones cost alpha
    h_al = v.expand(1, 4, 8).clone()
    assert concept_penalty(-h_al, torch.ones(1, 4), v).item() == 0.0
    assert concept_penalty(h_al, torch.ones(1, 4), v, alpha=0.5).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="fits neither"):
        concept_penalty(hidden, mask[:, :3], v)


def test_penalty_from_token_logprobs_hidden(tiny_qwen3):
    ids = torch.randint(2, 256, (2, 9))
    with torch.no_grad():
        _, hidden = token_logprobs(tiny_qwen3, ids, torch.ones_like(ids), hidden_layer=1)
    mask = torch.zeros(2, 8)
    mask[:, 4:] = 1
    h_mean = mean_completion_activation(hidden, mask)
    torch.testing.assert_close(h_mean, hidden[:, 5:].mean(1))


def test_concept_artifact_round_trip(tmp_path):
    v = torch.randn(64)
    path = save_concept(tmp_path / "c.safetensors", v, {"model_id": "tiny", "layer": 1})
    v2, meta = load_concept(path, expect_model="tiny")
    assert torch.equal(v, v2) and meta == {"model_id": "tiny", "layer": "1"}
    with pytest.raises(VHackError, match="not 'other'"):
        load_concept(path, expect_model="other")


def test_centred_penalty_fires_on_the_hack_side_despite_a_shared_offset():
    """A big common activation makes raw cos negative for everything; centring restores the sign."""
    d = 8
    offset = torch.full((d,), -10.0)
    direction = torch.zeros(d)
    direction[0] = 1.0
    hack_side = (offset + 2 * direction).expand(1, 3, d)
    clean_side = (offset - 2 * direction).expand(1, 3, d)
    hidden = torch.cat([hack_side, clean_side])
    mask = torch.ones(2, 3)
    concept = torch.stack([direction, offset])
    pen = concept_penalty(hidden, mask, concept, alpha=0.5)
    torch.testing.assert_close(pen, torch.tensor([0.5, 0.0]))
    raw = concept_penalty(hidden, mask, direction, alpha=0.5)  # uncentred: the offset dominates
    assert float(raw[0]) < 0.05
