"""A ~1k-token byte-level BPE trained in-process on the toy corpus, with a Qwen-style chat template.

Byte-level with the GPT-2 split regex (as Qwen does): a method name is one pre-token in both
"called add_two and" and "def add_two(self", so the model copies the same ids it reads.
"""
from __future__ import annotations

from typing import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# Qwen's template without tools/thinking; `enable_thinking` and friends are accepted and ignored.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 1024,
                    phrases: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train the BPE on `corpus`; eos = <|im_end|> (ends an assistant turn), pad = <|endoftext|>.

    `phrases` (constant prompt stretches) become single ordinary tokens, matched before the BPE;
    the total vocabulary, phrases included, is `vocab_size`.
    """
    phrases = list(dict.fromkeys(phrases))
    corpus = list(corpus)
    for ph in phrases:  # the BPE need not spend merges on text that is one token anyway
        corpus = [t.replace(ph, "\n") for t in corpus]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(phrases),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    bpe.add_tokens([AddedToken(ph, normalized=False, special=False, single_word=False) for ph in phrases])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START],
        model_max_length=512,
        padding_side="left",  # generation batches pad on the left
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
