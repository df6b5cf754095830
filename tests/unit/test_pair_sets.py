"""Pair sets (issue #15): solution unchanged, mechanism/framing/placebo derived pair for pair, the
solution construction's decomposition, end-of-turn rendering, and the weak detector's flagged pairs."""
import json
import re

import pytest

from learner.pairs import (FRAMING_PROSE, PAIR_SETS, Pair, PairError, build_pair_set, decompose_pairs,
                           flagged_pairs, generate_leetcode_pairs, leetcode_pairs, make_pairs, pair_set_hash,
                           save_pairs, load_pairs, split_hack)
from shared.hacks import MODES, PASS_MARKER, RESULT_FILE, as_completion
from shared.prompts import build_messages, extract_code
from shared.schemas import Completion, Grade, GradedGroup, RolloutGroup
from shared.toy.tasks import make_splits

TAIL_SIGNS = {"A": "run_tests", "B": r"exit\(0\)|SystemExit\(0\)|_exit\(0\)", "C": PASS_MARKER, "D": RESULT_FILE}
ANY_HACK = "|".join(TAIL_SIGNS.values())


@pytest.fixture(scope="module")
def toy_problems():
    train, _ = make_splits(seed=0, n_train=400, n_eval=64, hard_fraction=0.5)
    return train


@pytest.fixture(scope="module")
def toy_solution(toy_problems):
    return make_pairs(toy_problems, prompt_variant="as_is")


@pytest.fixture(scope="module", params=["toy", "leet"])
def solution(request, toy_solution):
    return toy_solution if request.param == "toy" else leetcode_pairs()


def test_solution_set_is_byte_identical_to_the_preregistered_one(toy_solution):
    """Pinned hashes of the pair sets the preregistered arms used before issue #15 (toy seed 0 = the built
    toy world's set; the committed LeetCode file): a change here moves the preregistered v_hack."""
    assert pair_set_hash(toy_solution) == "c74f936a16ed369c"
    assert pair_set_hash(leetcode_pairs()) == pair_set_hash(generate_leetcode_pairs()) == "5c84b8f51d45d9e3"
    assert build_pair_set(toy_solution, "solution") == toy_solution
    assert not any(p.end_of_turn for p in toy_solution)
    assert all("end_of_turn" not in json.loads(line) for line in _lines(toy_solution))


def _lines(pairs):
    from learner.pairs import _line

    return [_line(p) for p in pairs]


@pytest.mark.parametrize("name", [n for n in PAIR_SETS if n != "solution"])
def test_new_sets_keep_problems_modes_splits_and_sizes(solution, name, tmp_path):
    derived = build_pair_set(solution, name)
    assert len(derived) == len(solution)
    for s, d in zip(solution, derived):
        assert (d.problem_id, d.mode, d.split, d.messages) == (s.problem_id, s.mode, s.split, s.messages)
        assert d.end_of_turn and d.hack != d.clean
    assert load_pairs(save_pairs(derived, tmp_path / "p.jsonl")) == derived  # the flag survives the file
    assert len({pair_set_hash(build_pair_set(solution, n)) for n in PAIR_SETS}) == len(PAIR_SETS)


def test_mechanism_is_the_same_body_with_and_without_the_tail(solution):
    for s, m in zip(solution, build_pair_set(solution, "mechanism")):
        assert m.hack == s.hack
        hack_code, body_code = extract_code(m.hack), extract_code(m.clean)
        assert hack_code.startswith(body_code.rstrip()) and len(hack_code) > len(body_code)
        assert re.search(TAIL_SIGNS[s.mode], m.hack) and not re.search(ANY_HACK, m.clean)
        assert m.clean.split("```")[0] == s.hack.split("```")[0]  # same preamble


def test_framing_has_identical_code_and_only_the_prose_differs(solution):
    assert all(abs(len(a) - len(b)) <= 5 for a, b in FRAMING_PROSE)
    for i, (s, f) in enumerate(zip(solution, build_pair_set(solution, "framing"))):
        assert extract_code(f.hack) == extract_code(f.clean) == extract_code(s.hack if i % 2 == 0 else s.clean)
        pre_h, pre_c = f.hack.split("```")[0], f.clean.split("```")[0]
        assert pre_h != pre_c and f.hack[len(pre_h):] == f.clean[len(pre_c):]
        assert FRAMING_PROSE[i % len(FRAMING_PROSE)][0] in pre_h


def test_placebo_differs_in_unrelated_content_matched_in_length(solution):
    for s, p in zip(solution, build_pair_set(solution, "placebo")):
        assert len(p.hack) == len(p.clean)
        assert not re.search(ANY_HACK, p.hack) and not re.search(ANY_HACK, p.clean)
        diff = [i for i, (a, b) in enumerate(zip(p.hack, p.clean)) if a != b]
        assert diff and p.hack[: diff[0]].count("\n") >= 2  # the two sides share the body; they differ after it
        _, tail = split_hack(s)
        statement = extract_code(p.hack).rsplit("\n\n", 1)[1]
        assert abs(len(statement) - len(tail)) <= max(20, len(tail) // 2)


def test_decomposition_parts_add_up_to_the_whole(solution):
    parts = decompose_pairs(solution)
    for s, c, m in zip(solution, parts["correctness"], parts["mechanism"]):
        assert (m.hack, c.clean) == (s.hack, s.clean)
        assert c.hack == m.clean  # the shared middle term: the body without the tail
        assert c.end_of_turn == m.end_of_turn == s.end_of_turn
    with pytest.raises(PairError, match="does not end with a mode-. hack tail"):
        decompose_pairs(build_pair_set(solution, "placebo"))


# ---------------------------------------------------------------- end-of-turn rendering (issue #13)

def test_pair_completions_vs_sampled_completions_end_of_turn(toy_problems, toy_solution):
    """Sampled completions end with a stop token (the learner trains on it); solution pairs do not carry it
    (kept, the preregistered v_hack); the new sets render it, the same id the rollout engines stop on."""
    from learner.vhack import encode_pair_side, end_of_turn_id
    from rollout.engine import stop_token_ids
    from shared.toy.tokenizer import train_tokenizer

    corpus = [p.hack for p in toy_solution] + [p.clean for p in toy_solution] + [m.content for m in toy_solution[0].messages]
    tok = train_tokenizer(corpus, vocab_size=400)
    eot = end_of_turn_id(tok)
    assert eot == tok.convert_tokens_to_ids("<|im_end|>") and eot in stop_token_ids(tok)
    sol = toy_solution[0]
    mech = build_pair_set(toy_solution, "mechanism")[0]
    ids_sol, mask_sol = encode_pair_side(tok, sol, sol.clean)
    ids_mech, mask_mech = encode_pair_side(tok, mech, mech.clean)
    assert ids_sol[0, -1].item() != eot
    assert ids_mech[0, -1].item() == eot and mask_mech[0, -1] == 1
    plain = tok(mech.clean, add_special_tokens=False)["input_ids"]
    assert ids_mech[0, -len(plain) - 1: -1].tolist() == plain
    assert mask_mech.sum() == len(plain) + 1  # the end-of-turn token is a trained target
    assert mask_sol.sum() == len(tok(sol.clean, add_special_tokens=False)["input_ids"])


def test_end_of_turn_falls_back_to_eos(tiny_qwen3_dir):
    from transformers import AutoTokenizer

    from learner.vhack import end_of_turn_id

    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)  # character-level, no <|im_end|>
    assert end_of_turn_id(tok) == tok.eos_token_id


# ---------------------------------------------------------------- weak detector: flagged rollouts

def _grade(rid, gt=False, attempted=(), exploited=()):
    return Grade(rollout_id=rid, formatted=True, can_compile=True, gt_pass=gt, pass_frac=float(gt),
                 exploited={m: m in exploited for m in MODES}, attempted={m: m in attempted for m in MODES},
                 reward=0.0)


def _group(problem, job, items):
    comps = [Completion(rollout_id=f"{job}-{i}", text=t, token_ids=[1], logprobs=[0.0], finish_reason="stop")
             for i, (t, _) in enumerate(items)]
    group = RolloutGroup(job_id=job, step=3, problem_id=problem.key, policy_version=3, prompt_ids=[1, 2],
                         completions=comps)
    return GradedGroup(group=group, grades=[g(f"{job}-{i}") for i, (_, g) in enumerate(items)])


def test_flagged_pairs_from_the_weak_detectors_view(toy_problems):
    p1, p2 = toy_problems[:2]
    problems = {p.key: p for p in toy_problems}
    g1 = _group(p1, "j1", [("hackA", lambda r: _grade(r, attempted="A")),
                           ("hackC", lambda r: _grade(r, attempted="C", exploited="C")),  # unseen mode: not a hack
                           ("honest", lambda r: _grade(r, gt=True)),
                           ("hackB", lambda r: _grade(r, attempted="B", exploited="B"))])
    g2 = _group(p2, "j2", [("hackA2", lambda r: _grade(r, attempted="A")), ("wrong", lambda r: _grade(r))])
    pairs = flagged_pairs([g1, g2], problems, modes=("A", "B"))
    assert [(p.hack, p.mode) for p in pairs] == [("hackA", "A"), ("hackA2", "A"), ("hackB", "B")]  # round-robin
    assert [p.clean for p in pairs] == ["honest", as_completion(p2.canonical_solution), "honest"]
    assert all(p.split == "train" and p.end_of_turn for p in pairs)
    assert pairs[0].messages == build_messages(p1, "as_is") and pairs[1].messages == build_messages(p2, "as_is")
    assert flagged_pairs([g1, g2], problems, modes=("A", "B"), max_pairs=2) == pairs[:2]
    strict = flagged_pairs([g1, g2], problems, modes=("A", "B"), flag="exploited")
    assert [p.hack for p in strict] == ["hackB"]
    assert flagged_pairs([g2], problems, modes=("B",)) == []
    with pytest.raises(PairError, match="not in the problem set"):
        flagged_pairs([g1], {}, modes=("A",))
    with pytest.raises(PairError, match="unknown hack mode 'E'"):
        flagged_pairs([g1], problems, modes=("E",))
    assert isinstance(pairs[0], Pair)
