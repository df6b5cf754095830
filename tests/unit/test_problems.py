"""Problem files: the bundled sample loads; malformed records name file, line and field."""
from __future__ import annotations

import json

import pytest

from shared.problems import ProblemFormatError, load_leetcode_sample, load_problems, save_problems
from shared.prompts import extract_code


def _record(**over):
    rec = {"id": 1, "question": "q", "gt_answer": ["assert f() == 1"], "func_name": "Solution().f"}
    rec.update(over)
    return rec


def _write(tmp_path, records: list) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def test_bundled_sample_loads():
    ps = load_leetcode_sample()
    assert len(ps) == 58
    assert all(p.gt_answer and p.canonical_solution and p.setup_code for p in ps)
    assert len({p.key for p in ps}) == 58


def test_round_trip_keeps_extra_fields(tmp_path):
    ps = load_leetcode_sample()[:3]
    save_problems(ps, tmp_path / "x.jsonl")
    back = load_problems(tmp_path / "x.jsonl")
    assert [p.model_dump() for p in back] == [p.model_dump() for p in ps]


@pytest.mark.parametrize("records,line,needle", [
    ([_record(), "{not json"], 2, "not valid JSON"),
    ([_record(), _record(id=2), "[1, 2]"], 3, "expected a JSON object, got list"),
    ([_record(gt_answer=[])], 1, "field 'gt_answer'"),
    ([_record(), {"id": 3, "question": "q", "gt_answer": ["x"]}], 2, "field 'func_name'"),
    ([_record(question=5)], 1, "field 'question'"),
    ([_record(prompt=[{"role": "user"}])], 1, "field 'prompt.0.content'"),
])
def test_malformed_record_names_line_and_field(tmp_path, records, line, needle):
    path = _write(tmp_path, records)
    with pytest.raises(ProblemFormatError) as e:
        load_problems(path)
    msg = str(e.value)
    assert f"{path}:{line}:" in msg and needle in msg


def test_duplicate_ids_and_missing_file(tmp_path):
    with pytest.raises(ProblemFormatError, match="duplicate problem ids"):
        load_problems(_write(tmp_path, [_record(), _record()]))
    with pytest.raises(ProblemFormatError, match="not found"):
        load_problems(tmp_path / "nope.jsonl")


def test_extract_code_rules():
    assert extract_code("no fence here") is None
    assert extract_code("text\n```python\nx = 1\n```\nmore") == "x = 1"
    assert extract_code("```python\nx = 1\n```\n```\ny = 2\n```") == "x = 1\n\ny = 2"
    assert extract_code("```python\nunclosed = True") == "unclosed = True"
    assert extract_code("```python\n\n```") is None
