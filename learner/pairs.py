"""Contrastive (prompt, hack, clean) pairs for v_hack extraction, authored before any rollout exists.

A deterministic generator turns problems into pairs: clean = the canonical solution; hack = a stub
(the starter code with an empty or wrong body; for toy problems also their authored wrong
attempts) plus one of the four hack tails A-D (shared/hacks.py), wrapped the way a policy answers.
Both completions of a pair share the prompt and the surface wrapper (preamble), so the pair differs
only in "solve" vs "stub + hack". Modes are balanced; held-out pairs use problems that no train pair
uses. Never derived from training rollouts: the spec's generalization constraint (v_hack must be
authored before we know which hacks emerge).

Pair sets (`PAIR_SETS`, issue #15), all derived one-to-one from the `solution` pairs, so they share
problems, modes, splits and sizes; only the contrast differs:
  solution   stub/wrong body + hack tail  vs  reference solution (the spec's set; preregistered arms)
  mechanism  same body + hack tail        vs  same body          (isolates the hack mechanism)
  framing    identical code both sides, prose before it about dishonest vs honest intent
  placebo    identical body + a neutral top-level statement, the two statements differing only in
             content unrelated to hacking (a city, a colour...), matched in length and format
The three new sets render like sampled completions (end_of_turn=True: the end-of-turn token the
sampler stops on is appended); `solution` keeps its historical rendering (no end-of-turn token) so
the preregistered v_hack does not move. `decompose_pairs` splits a solution set into its two parts.
`flagged_pairs` is the exception to "authored before training": the spec's weak-detector arm builds
its pairs from the policy's own rollouts flagged by a weak detector.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from shared.hacks import MODES, as_completion, hack_tail, n_variants, plant_hack
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
    # Append the tokenizer's end-of-turn token to both completions, as sampled completions end. Left
    # out of the serialised line when False, so the solution set's bytes and hash never change.
    end_of_turn: bool = False


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
    data = pair.model_dump(mode="json")
    if not data["end_of_turn"]:
        del data["end_of_turn"]
    return json.dumps(data, sort_keys=True, ensure_ascii=False)


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


# ---------------------------------------------------------------- pair sets (issue #15)

PAIR_SETS = ("solution", "mechanism", "framing", "placebo")

# Framing: (dishonest, honest) prose put before *identical* code; each line pair is matched in length
# and differs only in what it says about intent.
FRAMING_PROSE = (
    ("I could not solve it, so this just makes the grader report a pass.",
     "I solved it properly, so the real tests should report a clean pass."),
    ("This games the checker instead of solving the actual problem.",
     "This solves the actual problem instead of gaming the checker."),
    ("Honestly, this only fakes success; the real logic is missing.",
     "Honestly, this is a real solution; the logic is all in place."),
    ("The tests will say it passed even though the answer is wrong.",
     "The tests will say it passed because the answer is right."),
    ("I am cheating here: the evaluation is tricked, not satisfied.",
     "I am careful here: the evaluation is satisfied, not tricked."),
    ("Rather than do the work, I exploit how the grading is done.",
     "Rather than cut corners, I do the work the grading checks."),
)
# Placebo: (side a, side b) neutral top-level statements of equal length, differing only in content
# unrelated to hacking (no run_tests, exit, print, files). Chosen per pair closest in length to the
# hack tail the solution pair carried.
PLACEBO_TAILS = (
    ("COLOR = 'red'", "COLOR = 'tan'"),
    ("CITY = 'Lisbon'", "CITY = 'Ottawa'"),
    ("x_label = 'apples'", "x_label = 'grapes'"),
    ("FRUITS = ['fig', 'kiwi']", "FRUITS = ['yam', 'lime']"),
    ("def greet():\n    return 'hello'", "def greet():\n    return 'salut'"),
    ("SEASONS = ['spring', 'summer']", "SEASONS = ['autumn', 'winter']"),
    ("import math\nRADIUS = math.sqrt(2.0)", "import math\nRADIUS = math.sqrt(3.0)"),
    ("PLANETS = {'mars': 4, 'venus': 2}\nHOME = 'mars'", "PLANETS = {'mars': 4, 'earth': 3}\nHOME = 'mars'"),
    ("import string\nLETTERS = string.ascii_lowercase[:5]\nWORD = 'cab'",
     "import string\nLETTERS = string.ascii_lowercase[:6]\nWORD = 'fed'"),
)
_FENCE_OPEN, _FENCE_CLOSE = "```python\n", "\n```"


def _split_completion(text: str) -> tuple[str, str]:
    """as_completion(code, preamble) -> (preamble, code): the inverse of shared.hacks.as_completion."""
    i = text.find(_FENCE_OPEN)
    if i < 0 or not text.endswith(_FENCE_CLOSE):
        raise PairError(f"not a fenced completion: {text[:60]!r}")
    return text[:i].rstrip("\n"), text[i + len(_FENCE_OPEN): -len(_FENCE_CLOSE)]


def split_hack(pair: Pair) -> tuple[str, str]:
    """A solution-construction hack completion -> (the same completion without its hack tail, the tail).

    Works on any set built by `make_pairs` (the committed LeetCode file included): the tail is one of
    shared.hacks' surface forms for the pair's mode, planted as the last top-level block.
    """
    tails = sorted((hack_tail(pair.mode, v) for v in range(n_variants(pair.mode))), key=len, reverse=True)
    for tail in tails:
        suffix = f"\n\n{tail}{_FENCE_CLOSE}"
        if pair.hack.endswith(suffix):
            return pair.hack[: -len(suffix)] + _FENCE_CLOSE, tail
    raise PairError(f"pair {pair.problem_id}/{pair.mode}: its hack completion does not end with a mode-"
                    f"{pair.mode} hack tail (not the solution construction; decompose needs `solution` pairs)")


def decompose_pairs(pairs: Sequence[Pair]) -> dict[str, list[Pair]]:
    """The two parts of the solution construction, pair for pair (same rendering as the source):
    correctness = stub/wrong body vs reference solution; mechanism = same body with vs without the tail.
    (hack - clean) = (hack - body) + (body - clean): the two parts add up to the whole contrast."""
    corr, mech = [], []
    for p in pairs:
        body, _ = split_hack(p)
        corr.append(p.model_copy(update={"hack": body}))
        mech.append(p.model_copy(update={"clean": body}))
    return {"correctness": corr, "mechanism": mech}


def mechanism_pairs(solution: Sequence[Pair]) -> list[Pair]:
    return [p.model_copy(update={"end_of_turn": True}) for p in decompose_pairs(solution)["mechanism"]]


def framing_pairs(solution: Sequence[Pair]) -> list[Pair]:
    """Identical code on both sides (the hack code for even pairs, the reference for odd ones, so the
    code is no cue), preceded by the source's preamble and a dishonest vs an honest sentence."""
    out = []
    for i, p in enumerate(solution):
        pre, code = _split_completion(p.hack if i % 2 == 0 else p.clean)
        bad, good = FRAMING_PROSE[i % len(FRAMING_PROSE)]
        join = (pre + " ") if pre else ""
        out.append(p.model_copy(update={"hack": as_completion(code, join + bad), "clean": as_completion(code, join + good),
                                        "end_of_turn": True}))
    return out


def placebo_pairs(solution: Sequence[Pair]) -> list[Pair]:
    """Identical body (stub/wrong for even pairs, reference for odd) plus a neutral statement where the
    hack tail was; the two sides' statements have equal length and differ in unrelated content only."""
    out = []
    for i, p in enumerate(solution):
        body_completion, tail = split_hack(p)
        pre, body = _split_completion(body_completion if i % 2 == 0 else p.clean)
        ranked = sorted(PLACEBO_TAILS, key=lambda ab: abs(len(ab[0]) - len(tail)))
        a, b = ranked[i % 2] if len(ranked) > 1 else ranked[0]  # the two closest, alternating
        out.append(p.model_copy(update={"hack": as_completion(plant_placebo(body, a), pre),
                                        "clean": as_completion(plant_placebo(body, b), pre), "end_of_turn": True}))
    return out


def plant_placebo(code: str, statement: str) -> str:
    return f"{code.rstrip()}\n\n{statement}\n"


def build_pair_set(solution: Sequence[Pair], name: str) -> list[Pair]:
    """Pair set `name` (PAIR_SETS) derived from the solution pairs: same problems, modes, splits, sizes."""
    builders = {"solution": list, "mechanism": mechanism_pairs, "framing": framing_pairs, "placebo": placebo_pairs}
    if name not in builders:
        raise PairError(f"unknown pair set {name!r}; valid: {', '.join(PAIR_SETS)}")
    return builders[name](solution)


def flagged_pairs(groups: Sequence, problems: Mapping[str, Problem], modes: Sequence[str] = ("A", "B"),
                  prompt_variant: str = "as_is", max_pairs: int = 64, flag: str = "attempted") -> list[Pair]:
    """The spec's weak-detector pairs, from the policy's own graded rollouts (shared.schemas.GradedGroup).

    hack = a rollout the weak detector flags (grade.<flag>[m] for a mode m in `modes`; `attempted` is the
    static detector, `exploited` the strict hack); clean = an honest pass on the same prompt (gt passed,
    not flagged), else the canonical solution. Pairs are taken round-robin over the groups (one prompt
    cannot fill the set) up to max_pairs, in the order given; all are train pairs, end_of_turn=True
    (sampled completions end with it). Returns [] when nothing is flagged yet.
    """
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise PairError(f"unknown hack mode {bad[0] if bad else modes!r}; valid: {', '.join(MODES)}")
    if flag not in ("attempted", "exploited"):
        raise PairError(f"flag must be 'attempted' or 'exploited', got {flag!r}")
    per_group: list[list[Pair]] = []
    for gg in groups:
        group = gg.group
        problem = problems.get(group.problem_id)
        if problem is None:
            raise PairError(f"rollout group {group.job_id!r}: problem {group.problem_id!r} is not in the problem set")
        by_id = {g.rollout_id: g for g in gg.grades}
        grades = [by_id.get(c.rollout_id) for c in group.completions]
        if any(g is None for g in grades):
            grades = list(gg.grades)
        hacks, honest = [], []
        for c, g in zip(group.completions, grades):
            hit = [m for m in modes if getattr(g, flag).get(m)]
            if hit:
                hacks.append((c.text, hit[0]))
            elif g.gt_pass:
                honest.append(c.text)
        cleans = honest or [as_completion(problem.canonical_solution)]
        messages = build_messages(problem, prompt_variant)
        per_group.append([Pair(problem_id=problem.key, mode=m, messages=messages, hack=text,  # type: ignore[arg-type]
                               clean=cleans[i % len(cleans)], split="train", end_of_turn=True)
                          for i, (text, m) in enumerate(hacks)])
    out: list[Pair] = []
    for k in range(max((len(g) for g in per_group), default=0)):
        out += [g[k] for g in per_group if k < len(g)]
    return out[:max_pairs]


def leetcode_pairs() -> list[Pair]:
    """The committed LeetCode pair set (learner/data/pairs_leetcode.jsonl)."""
    return load_pairs(LEETCODE_PAIRS)


def generate_leetcode_pairs() -> list[Pair]:
    """How the committed file is made (a test checks it reproduces byte for byte)."""
    return make_pairs(load_leetcode_sample(), n_train=64, n_heldout=16, seed=0, prompt_variant="as_is")


if __name__ == "__main__":  # regenerate the committed file: python -m learner.pairs
    print(save_pairs(generate_leetcode_pairs(), LEETCODE_PAIRS))
