"""Reading a child's output never raises and never costs more than its bounds (issue 20 items 3-5):
the result-line parser and the plain-data decoder on hostile and arbitrary bytes, and a completion
that breaks the grader anyway is graded as failed, in the grader and in the reward worker."""
from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reward_server import judge
from reward_server.grader import Grader, _result_file_says_passed
from reward_server.sandbox import plain
from shared.config import RewardConfig
from shared.hacks import as_completion
from shared.problems import Problem

P = (1 << 61) - 1  # k * P hashes like 0 for every int k
TINY = Problem(id="bounds-tiny", question="add", func_name="Solution().add", setup_code="",
               gt_answer=["assert Solution().add(1, 2) == 3", "assert Solution().add(2, 2) == 4"],
               canonical_solution="class Solution:\n    def add(self, a, b):\n        return a + b\n")


def test_index_with_thousands_of_digits_is_malformed_not_an_exception():
    res = judge.parse_results(b"L\n" + b"7" * 5000 + b" true\n0 3\n1 4\nD 2\n", 2)
    assert dict(res) == {0: b"3", 1: b"4"}
    assert "digits" in res.malformed[0]


def test_parser_reads_only_the_lines_an_honest_child_writes():
    flood = b"L\n" + b"\n" * (1 << 20) + b"0 3\n"
    res = judge.parse_results(flood, 1)
    assert dict(res) == {} and res.malformed  # the result came after n + 2 lines: ignored, recorded
    res = judge.parse_results(b"L\n0 3\n1 4\nD 2\n" + b"0 9\n" * 1000, 2)
    assert dict(res) == {0: b"3", 1: b"4"} and "after the last expected line" in res.malformed[-1]
    assert "unterminated" in judge.parse_results(b"L\n0 3", 1).malformed[0]
    assert judge.parse_results(b"L\n5 3\n", 2).malformed == ["line 2: index 5 >= 2"]


def test_colliding_keys_are_refused_quickly():
    text = b'{"s":[' + b",".join(b"%d" % (i * P) for i in range(1, 50001)) + b"]}"
    with pytest.raises(ValueError, match="hash"):
        plain.loads(text)
    text = b'{"d":[' + b",".join(b"[%d,0]" % (i * P) for i in range(1, 50001)) + b"]}"
    assert judge.decode(text) is None
    ok = b'{"s":[' + b",".join(b"%d" % i for i in range(50000)) + b"]}"  # ordinary ints: fine
    assert plain.loads(ok)[0] == set(range(50000))
    assert plain.loads(b'{"s":[-1,-2]}')[0] == {-1, -2}  # a natural collision or two is fine


def test_decoded_size_is_bounded():
    bomb = b"[" + b"[]," * (5 << 20) + b"[]]"  # 15 MiB of text, GBs once decoded
    assert judge.decode(bomb) is None
    with pytest.raises(ValueError):
        plain.loads(b"[" + b"[]," * (1 << 18) + b"[]]")  # too many containers, small text
    big_honest = plain.dumps(list(range(100_000)))  # a 100k-element answer still decodes
    assert plain.loads(big_honest)[0] == list(range(100_000))
    assert judge.decode(b"[" * 100_000 + b"]" * 100_000) is None  # depth: the decoder's recursion limit


def test_result_file_too_deep_is_not_a_pass_and_not_an_exception():
    assert _result_file_says_passed("[" * 60000 + "]" * 60000) is False
    assert _result_file_says_passed('{"passed": true}') is True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096), st.integers(min_value=0, max_value=50))
def test_parser_and_decoder_never_raise_on_arbitrary_bytes(data, n):
    res = judge.parse_results(data, n)
    assert all(0 <= i < n and body for i, body in res.items())
    for body in res.values():
        judge.decode(body)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=64),
    st.builds(lambda i, b: b"%d %s" % (i, b), st.integers(-5, 10**30), st.binary(max_size=64)),
    st.integers(0, 6000).map(lambda k: b"7" * k + b" true"),  # indices of any width
    st.sampled_from([b"L", b"D 2", b"0 3", b"1 4", b"0 " + b"[" * 5000, b"1 {\"s\":[1,1,1]}", b"0 {\"i\":\"zz\"}"])),
    max_size=12))
def test_judge_never_raises_on_line_soup(lines):
    from reward_server.grader import ProblemChecks

    ck = ProblemChecks(TINY)
    out = judge.judge(ck.split, judge.parse_results(b"\n".join(lines) + b"\n", len(ck.split.program_exprs)),
                      [(3, False), (4, False)])
    assert 0 <= out.passed <= 2


def test_a_completion_that_breaks_the_grader_is_graded_as_failed(monkeypatch, caplog):
    def boom(*_a, **_k):
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")

    with Grader(RewardConfig(), workers=1) as g:
        monkeypatch.setattr(judge, "parse_results", boom)
        with caplog.at_level(logging.ERROR, logger="rankguard.grader"):
            grades = g.grade_many([(TINY, as_completion(TINY.canonical_solution))] * 2)
    assert [x.gt_pass for x in grades] == [False, False]
    assert all(x.reward == 0.0 and x.status.startswith("grader_error: ValueError") for x in grades)
    assert "graded as failed" in caplog.text


def test_reward_worker_grades_a_poisoned_batch_instead_of_exiting():
    from services.reward_worker import RewardWorker
    from shared.config import RunConfig
    from shared.schemas import Completion, RolloutGroup

    class Broken:
        def grade_many(self, items, loopholes=None):
            raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")

    group = RolloutGroup(job_id="j@1.0", step=0, problem_id=TINY.key, policy_version=0, prompt_ids=[1],
                         completions=[Completion(rollout_id="j-0", text="x", token_ids=[1], logprobs=[0.0])])
    worker = RewardWorker.__new__(RewardWorker)
    worker.grader, worker.problems, worker.log = Broken(), {TINY.key: TINY}, logging.getLogger("test")
    worker.stats = {"failed": 0}
    [graded] = worker.process([group])
    assert graded.grades[0].rollout_id == "j-0" and not graded.grades[0].gt_pass
    assert graded.grades[0].status.startswith("grader_error: ValueError") and worker.stats["failed"] == 1
