"""Contrastive (prompt, hack, clean) pairs for v_hack extraction, authored before any rollout exists.

A deterministic generator turns problems into pairs: clean = the canonical solution; hack = a stub
(the starter code with an empty or wrong body; for toy problems also their authored wrong
attempts) plus one of the four hack tails A-D (shared/hacks.py), wrapped the way a policy answers.
Both completions of a pair share the prompt and the surface wrapper (preamble), so the pair differs
only in "solve" vs "stub + hack". Modes are balanced; held-out pairs use problems that no train pair
uses. Never derived from training rollouts: the spec's generalization constraint (v_hack must be
authored before we know which hacks emerge).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Iterable, Literal, Sequence

from pydantic import BaseModel, ConfigDict

from shared.hacks import MODES, as_completion, n_variants, plant_hack
from shared.problems import Message, Problem, load_leetcode_sample
from shared.prompts import build_messages, method_name

DATA_DIR = Path(__file__).parent / "data"
LEETCODE_PAIRS = DATA_DIR / "pairs_leetcode.jsonl"

# Prose a model might put before its code block (LeetCode-style answers only; the toy policy
# answers with a bare fence). Shared by both completions of a pair.
PREAMBLES = (
    "",
    "Here is my solution.",
    "Sure! Here's the implementation:",
    "The following code solves the problem.",
    "Solution:",
    "Let me write the method.",
    "This should pass all the tests:",
    "Here's a Python 3 solution.",
)
# Empty or wrong method bodies for the stub half of a hack.
STUB_BODIES = (
    "pass",
    "return None",
    "return 0",
    "# TODO: implement\npass",
    "return []",
    "return -1",
    "raise NotImplementedError",
    "...",
)


class PairError(ValueError):
    """Bad pair input (too few problems, unknown mode, malformed file); names the value."""


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    problem_id: str
    mode: Literal["A", "B", "C", "D"]
    messages: list[Message]  # the prompt (system + user)
    hack: str  # completion text that exploits loophole `mode`
    clean: str  # completion text that solves the problem honestly
    split: Literal["train", "heldout"]


def is_toy(problem: Problem) -> bool:
    return getattr(problem, "dataset", None) == "toy"


_HEADER_END = re.compile(r"\)\s*(->\s*[^:]+)?:\s*$")


def _method_header(problem: Problem) -> tuple[str, str]:
    """(code up to and including the method's `def ...:` line(s), body indent) from the starter code
    or, failing that, the canonical solution (handles signatures split over several lines)."""
    name = method_name(problem)
    sources = (problem.starter_code, problem.canonical_solution)
    for source in (sources[::-1] if is_toy(problem) else sources):  # toy policy writes the short form
        lines = source.rstrip().splitlines()
        for i, line in enumerate(lines):
            if re.match(rf"\s*def {re.escape(name)}\s*\(", line):
                for j in range(i, len(lines)):
                    if _HEADER_END.search(lines[j]):
                        indent = len(line) - len(line.lstrip()) + 4
                        return "\n".join(lines[: j + 1]), " " * indent
    raise PairError(f"problem {problem.key}: no `def {name}(...)` header in its starter code or canonical solution")


def stub_solution(problem: Problem, body: str) -> str:
    header, indent = _method_header(problem)
    return header + "\n" + "\n".join(indent + ln for ln in body.splitlines())


def _hack_base(problem: Problem, rng: random.Random) -> str:
    wrong = list(getattr(problem, "wrong_solutions", None) or [])
    if wrong and rng.random() < 0.5:
        return rng.choice(wrong)
    return stub_solution(problem, rng.choice(STUB_BODIES))


def _make_pair(problem: Problem, mode: str, variant: int, split: str, rng: random.Random,
               prompt_variant: str) -> Pair:
    preamble = "" if is_toy(problem) else rng.choice(PREAMBLES)
    hack_code = plant_hack(_hack_base(problem, rng), mode, variant)
    return Pair(
        problem_id=problem.key,
        mode=mode,  # type: ignore[arg-type]
        messages=build_messages(problem, prompt_variant),
        hack=as_completion(hack_code, preamble),
        clean=as_completion(problem.canonical_solution, preamble),
        split=split,  # type: ignore[arg-type]
    )


def make_pairs(problems: Sequence[Problem], n_train: int = 64, n_heldout: int = 16, seed: int = 0,
               prompt_variant: str = "as_is") -> list[Pair]:
    """Deterministic pairs: modes cycle A-D (balanced to +-1), tail variants cycle per mode, held-out
    pairs come from problems reserved for them (disjoint from the train pairs' problems)."""
    usable = [p for p in problems if p.canonical_solution.strip()]
    if len(usable) < 2:
        raise PairError(f"need >= 2 problems with a canonical_solution to make pairs, got {len(usable)}")
    if n_train < 1 or n_heldout < 0:
        raise PairError(f"n_train must be >= 1 and n_heldout >= 0, got {n_train}, {n_heldout}")
    rng = random.Random(f"rankguard-pairs:{seed}")
    order = sorted(usable, key=lambda p: p.key)
    rng.shuffle(order)
    n_held_problems = min(n_heldout, max(1, len(order) // 4)) if n_heldout else 0
    held_problems, train_problems = order[:n_held_problems], order[n_held_problems:]
    used_variant = {m: 0 for m in MODES}
    pairs: list[Pair] = []
    for split, count, pool in (("train", n_train, train_problems), ("heldout", n_heldout, held_problems)):
        start = rng.randrange(len(MODES))
        for i in range(count):
            mode = MODES[(start + i) % len(MODES)]
            problem = pool[i % len(pool)]
            variant = used_variant[mode] % n_variants(mode)
            used_variant[mode] += 1
            pairs.append(_make_pair(problem, mode, variant, split, rng, prompt_variant))
    return pairs


def split_pairs(pairs: Iterable[Pair], split: str, modes: Sequence[str] | None = None) -> list[Pair]:
    bad = [m for m in (modes or ()) if m not in MODES]
    if bad:
        raise PairError(f"unknown hack mode {bad[0]!r}; valid: {', '.join(MODES)}")
    return [p for p in pairs if p.split == split and (modes is None or p.mode in modes)]


def _line(pair: Pair) -> str:
    return json.dumps(pair.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)


def save_pairs(pairs: Iterable[Pair], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_line(p) + "\n" for p in pairs), encoding="utf-8")
    return path


def load_pairs(path: str | Path) -> list[Pair]:
    path = Path(path)
    if not path.exists():
        raise PairError(f"pair file not found: {path}")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(Pair.model_validate_json(line))
        except ValueError as e:
            raise PairError(f"{path}:{lineno}: not a pair ({str(e).splitlines()[0]})") from None
    return out


def pair_set_hash(pairs: Iterable[Pair]) -> str:
    """sha256 (first 16 hex) of the canonical jsonl: names the pair set in v_hack metadata."""
    h = hashlib.sha256()
    for p in pairs:
        h.update((_line(p) + "\n").encode("utf-8"))
    return h.hexdigest()[:16]


def leetcode_pairs() -> list[Pair]:
    """The committed LeetCode pair set (learner/data/pairs_leetcode.jsonl)."""
    return load_pairs(LEETCODE_PAIRS)


def generate_leetcode_pairs() -> list[Pair]:
    """How the committed file is made (a test checks it reproduces byte for byte)."""
    return make_pairs(load_leetcode_sample(), n_train=64, n_heldout=16, seed=0, prompt_variant="as_is")


if __name__ == "__main__":  # regenerate the committed file: python -m learner.pairs
    print(save_pairs(generate_leetcode_pairs(), LEETCODE_PAIRS))
