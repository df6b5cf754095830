"""`rankguard diagnose` names the v_oracle recipe its verdict used and shows both recipes (issue #23)."""
from analysis.diagnose import recipe_line


def _rec(main: str, cos: dict, keys: dict) -> dict:
    return {"settings": {"recipe": main},
            "summary": {r: {"cos_oracle_vhack": c} for r, c in cos.items()},
            "verdicts": {r: {"key": k, "line": f"{k} line"} for r, k in keys.items()}}


def test_recipe_line_names_the_used_recipe_and_both_numbers():
    line = recipe_line(_rec("pooled", {"pooled": 0.05, "paired": 0.46}, {"pooled": "misses", "paired": "aligned"}))
    assert "used for the verdict: **pooled**" in line
    assert "pooled +0.050" in line and "paired +0.460" in line and "disagree" in line
    same = recipe_line(_rec("paired", {"pooled": 0.5, "paired": 0.55}, {"pooled": "aligned", "paired": "aligned"}))
    assert "**paired**" in same and "same verdict" in same


def test_recipe_line_without_an_oracle():
    line = recipe_line(_rec("pooled", {"pooled": None, "paired": None}, {"pooled": "silent", "paired": "silent"}))
    assert "pooled –, paired –" in line
