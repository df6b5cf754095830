"""Issue #21.2: real data in. `rankguard problems import` on small fixtures in both upstream formats
(tests/fixtures/import, derived from the bundled sample by make_fixtures.py), problems.train /
problems.eval in the config, and `rankguard prepare` stopping on a missing or malformed set."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reward_server.importer import DataImportError, convert_and_filter, detect_format, from_leetcodedataset, \
    prompt_tokens, read_jsonl_rows
from services.cli import app
from shared.config import ConfigError, RunConfig, resolve_config
from shared.problems import (ProblemFormatError, check_problem_sets, load_leetcode_sample, load_problem_sets,
                             load_problems)
from shared.rundir import read_config

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "import"
UP_TRAIN, UP_TEST = FIX / "leetcode_train_medhard_filtered.jsonl", FIX / "leetcode_test_medhard.jsonl"
LCD = FIX / "LeetCodeDataset-test.jsonl"
sys.path.insert(0, str(FIX))
import make_fixtures as mf  # noqa: E402


@pytest.fixture(scope="module")
def qwen_tok_dir(tmp_path_factory):
    """The real Qwen3 tokenizer (offline, shared.tiny_models) saved as a folder, as --tokenizer takes it."""
    from shared.tiny_models import qwen_tokenizer

    path = tmp_path_factory.mktemp("qwen_tok")
    qwen_tokenizer("qwen3").save_pretrained(path)
    return path


def test_fixtures_are_what_the_generator_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(mf, "HERE", tmp_path)
    mf.main()
    for f in (UP_TRAIN, UP_TEST, LCD):
        assert (tmp_path / f.name).read_text() == f.read_text(), f.name


def test_leetcodedataset_rows_convert_to_the_reference_records():
    """The reference's process_example applied to LeetCodeDataset rows gives back rl-rewardhacking's
    records field by field (incl. a str-returning problem, whose outputs get their quotes back)."""
    bundled = {p.key: p for p in load_leetcode_sample()}
    rows = read_jsonl_rows(LCD)
    assert {detect_format(r) for r in rows} == {"leetcodedataset"}
    assert detect_format(read_jsonl_rows(UP_TRAIN)[0]) == "rl-rewardhacking"
    for row in rows[:4]:
        got, want = from_leetcodedataset(row), bundled[str(row["question_id"])]
        assert got["question"] == want.question and got["setup_code"] == want.setup_code
        assert [m["content"] for m in got["prompt"]] == [m.content for m in want.prompt]
        assert got["gt_answer"] == want.gt_answer[:mf.TESTS] and got["func_name"] == want.func_name
        assert got["canonical_solution"] == want.canonical_solution and got["difficulty"] == want.difficulty
        assert got["prompt_metadata"]["starter_code"] == want.starter_code
    assert any('== "' in t for t in from_leetcodedataset(rows[3])["gt_answer"])  # 3348 returns str
    with pytest.raises(ValueError, match="not a Solution"):
        from_leetcodedataset(rows[5])
    with pytest.raises(DataImportError, match="unknown record format"):
        detect_format({"foo": 1})


def test_filters_name_every_dropped_record(qwen_tok_dir):
    from transformers import AutoTokenizer

    res = convert_and_filter(read_jsonl_rows(UP_TRAIN))
    assert res.read == 9 and [p.key for p in res.kept] == [*mf.TRAIN_IDS, mf.WRONG_ID]
    assert res.dropped[mf.EASY_ID] == "difficulty: easy"
    assert res.dropped[mf.MALFORMED_ID].startswith("malformed: field 'gt_answer'")
    lcd = convert_and_filter(read_jsonl_rows(LCD))
    assert [p.key for p in lcd.kept] == mf.LCD_IDS
    assert lcd.dropped == {mf.LCD_EASY_ID: "difficulty: easy",
                           mf.LCD_BAD_ENTRY_ID: f"malformed: ValueError entry point "
                                                f"{read_jsonl_rows(LCD)[5]['entry_point']!r} is not a Solution() method"}
    # prompt length in the model's tokens (the real Qwen3 vocabulary): a cap between the shortest and the
    # longest prompt drops exactly the longer ones, each with its count
    tok = AutoTokenizer.from_pretrained(qwen_tok_dir)
    lengths = {p.key: prompt_tokens(p, tok, "simple_overwrite_tests") for p in res.kept}
    assert all(200 < n < 1536 for n in lengths.values()), lengths
    cap = sorted(lengths.values())[3]
    capped = convert_and_filter(read_jsonl_rows(UP_TRAIN), tokenizer=tok, max_prompt_tokens=cap)
    assert {p.key for p in capped.kept} == {k for k, n in lengths.items() if n <= cap}
    longer = {k for k, n in lengths.items() if n > cap}
    assert longer and all(capped.dropped[k] == f"prompt length: {lengths[k]} tokens > {cap}" for k in longer)


def _import(args):
    return CliRunner().invoke(app, ["problems", "import", *map(str, args)])


def test_import_cli_validates_calibrates_and_writes_both_formats(tmp_path, qwen_tok_dir):
    out = tmp_path / "train.jsonl"
    r = _import([UP_TRAIN, "--out", out, "--tokenizer", qwen_tok_dir, "--repeats", "1"])
    assert r.exit_code == 0, r.output
    assert "kept 6 of 9; dropped 3 (canonical fails 1, difficulty 1, malformed 1)" in r.output
    assert f"dropped {mf.WRONG_ID}: canonical fails: wrong answers on its own tests (CPU ceiling 60 s)" in r.output
    problems = load_problems(out)  # the budgets sidecar applies: every problem has its calibrated budget
    assert [p.key for p in problems] == mf.TRAIN_IDS and all(p.time_budget_s == 3.0 for p in problems)
    side = json.loads(out.with_name("train.budgets.json").read_text())
    assert side["imported_from"] == str(UP_TRAIN) and side["read"] == 9 and set(side["dropped"]) == {
        mf.EASY_ID, mf.WRONG_ID, mf.MALFORMED_ID}
    assert all(e["passed_under_budget"] for e in side["problems"].values())
    lcd_out = tmp_path / "lcd.jsonl"
    r = _import([LCD, "--out", lcd_out, "--tokenizer", "none", "--repeats", "1"])
    assert r.exit_code == 0 and "kept 4 of 6" in r.output, r.output
    bundled = {p.key: p for p in load_leetcode_sample()}
    assert [p.gt_answer for p in load_problems(lcd_out)] == [bundled[i].gt_answer[:mf.TESTS] for i in mf.LCD_IDS]


def test_import_cli_errors_are_one_line(tmp_path):
    for args, needle in [([tmp_path / "nope.jsonl", "--out", tmp_path / "o.jsonl"], "nope.jsonl: file not found"),
                         (["--out", tmp_path / "o.jsonl"], "give one input"),
                         ([UP_TRAIN, "--out", tmp_path / "o.jsonl", "--tokenizer", tmp_path / "no-tok"],
                          "cannot load tokenizer")]:
        r = _import(args)
        assert r.exit_code == 2 and needle in r.output and r.output.count("\n") == 1, r.output


# ------------------------------------------------------------------ problems.train / problems.eval
def test_problems_config_train_eval_round_trip(tmp_path):
    default = resolve_config("full")
    assert default.problems == "leetcode" and default.model_dump()["problems"] == "leetcode"  # config.json as before
    cfg = resolve_config("full", [f"problems.train={UP_TEST}", f"problems.eval={FIX / 'x.jsonl'}"])
    assert cfg.model_dump()["problems"] == {"source": "leetcode", "train": str(UP_TEST), "eval": str(FIX / "x.jsonl")}
    assert RunConfig.model_validate_json(cfg.model_dump_json()) == cfg
    cfg.save(tmp_path / "config.json")
    assert read_config(tmp_path / "config.json") == cfg
    with pytest.raises(ConfigError, match="problems.train and problems.eval are given together"):
        resolve_config("full", [f"problems.train={UP_TEST}"])
    assert resolve_config("toy", ["problems=leetcode"]).problems == "leetcode"  # the old spelling still works


def test_train_and_eval_files_are_used_as_given(tmp_path):
    from shared.problems import save_problems

    train_f, eval_f = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    sample = load_leetcode_sample()
    save_problems(sample[:10], train_f)
    save_problems(sample[10:13], eval_f)
    cfg = resolve_config("full", [f"problems.train={train_f}", f"problems.eval={eval_f}"])
    train, held = load_problem_sets(cfg)
    assert [p.key for p in train] == [p.key for p in sample[:10]] and [p.key for p in held] == [p.key for p in sample[10:13]]
    assert check_problem_sets(cfg) == ["train.eval_problems=32 but the eval set has 3 problems; each evaluation "
                                       "uses those 3"]
    assert check_problem_sets(resolve_config("full", [f"problems.train={train_f}", f"problems.eval={eval_f}",
                                                      "train.eval_problems=3"])) == []
    save_problems(sample[9:12], eval_f)
    with pytest.raises(ProblemFormatError, match=r"problems.eval shares 1 problem ids with problems.train \(\w+\)"):
        load_problem_sets(cfg)


def _prepare(tmp_path, *sets):
    return CliRunner().invoke(app, ["prepare", "--preset", "full", "--run-dir", str(tmp_path / "run"),
                                    *[a for s in sets for a in ("--set", s)]])


def test_prepare_stops_on_a_missing_or_malformed_set(tmp_path):
    r = _prepare(tmp_path, f"problems.train={tmp_path / 'missing.jsonl'}", f"problems.eval={UP_TEST}")
    assert r.exit_code == 2 and "problems.train: problem file" in r.output and "not found" in r.output, r.output
    assert not (tmp_path / "run" / "config.json").exists()  # nothing written: fix the path and rerun
    bad = tmp_path / "bad.jsonl"
    bad.write_text(UP_TEST.read_text().splitlines()[0] + "\n{\"id\": 1, \"question\": \"q\"}\n")
    r = _prepare(tmp_path, f"problems.train={bad}", f"problems.eval={UP_TEST}")
    assert r.exit_code == 2 and f"{bad}:2: field 'gt_answer'" in r.output, r.output
    r = _prepare(tmp_path, "problems=/nowhere/set.jsonl")
    assert r.exit_code == 2 and "problem set '/nowhere/set.jsonl' not found" in r.output


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The fixtures' train and test files imported as a user would (no tokenizer: covered above)."""
    root = tmp_path_factory.mktemp("imported")
    for src, name in ((UP_TRAIN, "train.jsonl"), (UP_TEST, "eval.jsonl")):
        r = _import([src, "--out", root / name, "--tokenizer", "none", "--repeats", "1"])
        assert r.exit_code == 0, r.output
    return root / "train.jsonl", root / "eval.jsonl"


def test_prepare_warns_when_eval_problems_exceeds_the_set(tmp_path, imported):
    """Today's default (bundled sample, 15 held out) and an imported 3-problem eval set."""
    r = _prepare(tmp_path)
    assert r.exit_code == 0 and "warning: train.eval_problems=32 but the eval set has 15 problems" in r.output
    train, held = imported
    r = _prepare(tmp_path / "b", f"problems.train={train}", f"problems.eval={held}")
    assert r.exit_code == 0 and "warning: train.eval_problems=32 but the eval set has 3 problems" in r.output
    cfg = read_config(tmp_path / "b" / "run" / "config.json")
    assert [len(s) for s in load_problem_sets(cfg)] == [6, 3]
    r = _prepare(tmp_path / "c", f"problems.train={UP_TRAIN}", f"problems.eval={held}")
    # the raw upstream file still holds its malformed record: prepare names it (import drops it)
    assert r.exit_code == 2 and f"{UP_TRAIN}:9: field 'gt_answer'" in r.output, r.output


def test_cli_entry_point_reports_a_missing_set_with_rc_2(tmp_path):
    """The console script as compose's init runs it (rc 0 before issue #21, then workers restarted forever)."""
    exe = Path(sys.executable).with_name("rankguard")
    out = subprocess.run([str(exe), "prepare", "--preset", "full", "--run-dir", str(tmp_path / "r"), "--set",
                          f"problems.train={tmp_path}/t.jsonl", "--set", f"problems.eval={tmp_path}/e.jsonl"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("error: problems.train: problem file"), out.stderr


def test_hub_reads_leetcodedataset_through_datasets(tmp_path, monkeypatch):
    """--hub SPLIT asks `datasets` for newfacade/LeetCodeDataset (here a stand-in module serving the
    fixture rows: no network in the suite); without `datasets` it says what to install."""
    import types

    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: calls.append((name, split)) or read_jsonl_rows(LCD)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    r = _import(["--hub", "test", "--out", tmp_path / "hub.jsonl", "--tokenizer", "none", "--repeats", "1"])
    assert r.exit_code == 0 and "kept 4 of 6" in r.output, r.output
    assert calls == [("newfacade/LeetCodeDataset", "test")]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    r = _import(["--hub", "train", "--out", tmp_path / "x.jsonl"])
    assert r.exit_code == 2 and "--hub needs the `datasets` package" in r.output
