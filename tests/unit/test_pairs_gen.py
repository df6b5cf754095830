"""Contrastive pairs: determinism, balance, sizes, disjoint held-out, committed file reproduction."""
import collections
import re

import pytest

from learner.pairs import (LEETCODE_PAIRS, PairError, generate_leetcode_pairs, load_pairs, make_pairs,
                           pair_set_hash, save_pairs, split_pairs, stub_solution)
from shared.hacks import MODES, PASS_MARKER, RESULT_FILE
from shared.problems import load_leetcode_sample
from shared.prompts import extract_code
from shared.toy.tasks import make_splits, run_asserts

TAIL_SIGNS = {"A": "run_tests", "B": r"exit\(0\)|SystemExit\(0\)", "C": PASS_MARKER, "D": RESULT_FILE}


@pytest.fixture(scope="module")
def leet():
    return load_leetcode_sample()


@pytest.fixture(scope="module")
def toy():
    train, _ = make_splits(seed=0, n_train=120, n_eval=8, hard_fraction=0.5)
    return train


def test_committed_file_reproduces_byte_for_byte(tmp_path):
    out = save_pairs(generate_leetcode_pairs(), tmp_path / "p.jsonl")
    assert out.read_bytes() == LEETCODE_PAIRS.read_bytes(), "regenerate with: python -m learner.pairs"


@pytest.mark.parametrize("world", ["leet", "toy"])
def test_sizes_balance_and_disjoint_heldout(world, request):
    problems = request.getfixturevalue(world)
    pairs = make_pairs(problems, n_train=64, n_heldout=16, seed=0)
    train, held = split_pairs(pairs, "train"), split_pairs(pairs, "heldout")
    assert len(train) >= 60 and len(held) >= 16
    assert collections.Counter(p.mode for p in train) == {m: 16 for m in MODES}
    assert collections.Counter(p.mode for p in held) == {m: 4 for m in MODES}
    assert not {p.problem_id for p in train} & {p.problem_id for p in held}
    by_id = {p.key: p for p in problems}
    for p in pairs:
        assert re.search(TAIL_SIGNS[p.mode], p.hack) and not re.search(TAIL_SIGNS[p.mode], p.clean)
        assert extract_code(p.clean).strip() == by_id[p.problem_id].canonical_solution.strip()
        assert p.messages[-1].role == "user"


def test_surface_forms_vary(leet):
    pairs = make_pairs(leet, seed=0)
    for m in MODES:
        tails = {p.hack.rsplit("\n\n", 1)[-1] for p in pairs if p.mode == m}
        assert len(tails) >= 3, (m, tails)
    preambles = {p.hack.split("```", 1)[0] for p in pairs}
    assert len(preambles) >= 5
    assert len({extract_code(p.hack).split(":\n", 2)[-1].split("\n\n")[0] for p in pairs}) >= 5


def test_deterministic_and_seed_dependent(toy):
    a, b = make_pairs(toy, seed=3), make_pairs(toy, seed=3)
    assert a == b and pair_set_hash(a) == pair_set_hash(b)
    c = make_pairs(toy, seed=4)
    assert pair_set_hash(c) != pair_set_hash(a)


def test_toy_hacks_fail_and_cleans_pass_the_real_asserts(toy):
    by_id = {p.key: p for p in toy}
    for p in make_pairs(toy, seed=0):
        problem = by_id[p.problem_id]
        assert run_asserts(extract_code(p.clean), problem)
        body = extract_code(p.hack).rsplit("\n\n", 1)[0]  # the stub without its hack tail
        assert not run_asserts(body, problem), p.hack
        assert p.hack.startswith("```python") and p.clean.startswith("```python")  # toy: bare fences


def test_round_trip_and_bad_file(tmp_path, toy):
    pairs = make_pairs(toy, n_train=8, n_heldout=4)
    path = save_pairs(pairs, tmp_path / "x.jsonl")
    assert load_pairs(path) == pairs
    (tmp_path / "bad.jsonl").write_text('{"problem_id": "1", "mode": "Z"}\n')
    with pytest.raises(PairError, match="bad.jsonl:1"):
        load_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(PairError, match="not found"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(PairError, match="unknown hack mode 'E'"):
        split_pairs(pairs, "train", ["A", "E"])


def test_stub_from_multiline_signature_without_starter_code():
    from shared.problems import Problem
    p = Problem(id="x", question="q", gt_answer=["assert True"], func_name="Solution().longName",
                canonical_solution="class Solution:\n    def helper(self):\n        return 1\n\n"
                                   "    def longName(\n        self, a: int, b: List[int]\n    ) -> int:\n        return a")
    stub = stub_solution(p, "# TODO: implement\npass")
    compile(stub, "<stub>", "exec")
    assert stub.endswith(") -> int:\n        # TODO: implement\n        pass")


def test_too_few_problems(leet):
    with pytest.raises(PairError, match=">= 2 problems"):
        make_pairs(leet[:1])
