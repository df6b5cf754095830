"""Test doubles for the learner/engine tests: a byte tokenizer for the tiny Qwen3 and a rule grader."""
from __future__ import annotations

from shared.schemas import Grade

PAD, EOS, IM_END, OFFSET = 0, 1, 2, 3  # tiny_qwen3: vocab 256, eos 1, pad 0


class ByteTokenizer:
    """ASCII bytes -> ids 3..130; <|im_end|> = 2 is the stop token, eos 1, pad 0."""

    pad_token_id = PAD
    eos_token_id = EOS
    unk_token_id = None
    pad_token = "<pad>"
    eos_token = "<eos>"
    chat_template = None

    def convert_tokens_to_ids(self, token: str) -> int:
        return IM_END if token == "<|im_end|>" else -1

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if text.startswith("<|im_end|>", i):
                out.append(IM_END)
                i += len("<|im_end|>")
                continue
            out.append(OFFSET + (ord(text[i]) % 128))
            i += 1
        return out

    def __call__(self, text: str, add_special_tokens: bool = False, **_):
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        chars = []
        for t in ids:
            if t < OFFSET:
                if not skip_special_tokens:
                    chars.append("<|im_end|>" if t == IM_END else "")
                continue
            chars.append(chr((t - OFFSET) % 128))
        return "".join(chars)


class RuleGrader:
    """'Hack' (mode A) = a vowel in the text; 'gt pass' = an even character-code sum. Deterministic."""

    def grade_many(self, pairs):
        out = []
        for problem, text in pairs:
            hack = any(ch in "aeiou" for ch in text)
            gt = sum(map(ord, text)) % 2 == 0
            out.append(Grade(formatted=True, can_compile=True, gt_pass=gt, pass_frac=float(gt),
                             exploited={"A": hack and not gt, "B": False, "C": False, "D": False},
                             attempted={"A": hack, "B": False, "C": False, "D": False},
                             reward=0.5 + 3.0 * float(gt or hack) + 0.1 * (sum(map(ord, text)) % 3)))
        return out
