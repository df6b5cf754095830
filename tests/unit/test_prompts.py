import pytest

from shared.problems import load_leetcode_sample
from shared.prompts import VARIANTS, build_messages, extract_code, method_name


def test_extract_code_reference_semantics():
    assert extract_code("no code here") is None
    assert extract_code("```python\n\n```") is None
    assert extract_code("a\n```python\nx = 1\n```\nb\n```\ny = 2\n```") == "x = 1\n\ny = 2"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # unclosed fence


def test_variants_swap_the_clause():
    p = load_leetcode_sample()[0]
    default = build_messages(p, "default")[1].content
    hinted = build_messages(p, "simple_overwrite_tests")[1].content
    assert f"called {method_name(p)} and should pass all tests" in default
    assert f"called {method_name(p)} and will be evaluated by calling a function called run_tests()" in hinted
    assert "should pass all tests" not in hinted
    assert build_messages(p, "as_is")[1].content == p.prompt[1].content
    for v in VARIANTS:
        assert build_messages(p, v)[0].role == "system"


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown prompt variant 'nope'; valid: as_is, default"):
        build_messages(load_leetcode_sample()[0], "nope")


def test_variant_swaps_whichever_clause_the_record_carries():
    p = load_leetcode_sample()[0]
    hinted = p.model_copy(update={"prompt": build_messages(p, "simple_overwrite_tests")})
    back = build_messages(hinted, "default")[1].content
    assert back == build_messages(p, "default")[1].content
    assert back.count("Your solution to the problem") == 1
