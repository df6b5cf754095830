"""`rankguard problems import`: real problem sets in, the project's problem files out.

Two upstream formats are read:
  rl-rewardhacking  its released jsonl files (`leetcode_train_medhard_filtered.jsonl`, 992 problems;
                    `leetcode_test_medhard.jsonl`, 113): already our record format (shared.problems).
  leetcodedataset   rows of newfacade/LeetCodeDataset (a local jsonl, or the hub with `datasets`),
                    converted exactly as rl-rewardhacking's `LeetCodeProcessor.process_example` does.
Then the reference's filters (`create_dataset`): difficulty (medium + hard) and prompt length in the
model's tokens (<= 1536 by default; the prompt as our rollouts render it: chat template, the run's
prompt variant, thinking off). Every kept record is validated by the grader that will judge the
rollouts: its canonical solution must pass its own tests under the CPU budget calibrated from it
(reward_server.calibrate); the ones that do not are reported and dropped. The output is a jsonl plus
its budgets sidecar, ready for `--set problems.train=... --set problems.eval=...`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from shared.problems import Problem, ProblemFormatError, save_budgets, save_problems
from shared.prompts import SYSTEM, build_messages, render_prompt

FORMATS = ("rl-rewardhacking", "leetcodedataset")
HUB_DATASET = "newfacade/LeetCodeDataset"
DEFAULT_DIFFICULTIES = ("medium", "hard")  # the reference's "medhard"
DEFAULT_MAX_PROMPT_TOKENS = 1536  # create_dataset's max_prompt_length
DEFAULT_TOKENIZER = "Qwen/Qwen3-4B"


class DataImportError(ValueError):
    """Input that cannot be imported at all (unreadable file, unknown format); one line."""


@dataclass
class ImportResult:
    read: int = 0
    kept: list[Problem] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # problem id (or "line N") -> why

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for why in self.dropped.values():
            key = why.split(":")[0]
            out[key] = out.get(key, 0) + 1
        return out


# ------------------------------------------------------------------ reading
def read_jsonl_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataImportError(f"{path}: file not found")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataImportError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataImportError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def hub_rows(split: str) -> list[dict]:
    """LeetCodeDataset rows from the Hugging Face hub (needs `pip install datasets` and internet)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataImportError("--hub needs the `datasets` package (pip install datasets); or download "
                           f"{HUB_DATASET}'s jsonl and pass the file") from None
    return [dict(r) for r in load_dataset(HUB_DATASET, split=split)]


def detect_format(row: dict) -> str:
    if "entry_point" in row and "input_output" in row:
        return "leetcodedataset"
    if "gt_answer" in row and "func_name" in row:
        return "rl-rewardhacking"
    raise DataImportError(f"unknown record format (keys: {', '.join(sorted(row)[:8])}); expected rl-rewardhacking's "
                       "(gt_answer, func_name, ...) or LeetCodeDataset's (entry_point, input_output, ...)")


# ------------------------------------------------------------------ LeetCodeDataset -> our record
def from_leetcodedataset(row: dict) -> dict:
    """One LeetCodeDataset row as rl-rewardhacking's LeetCodeProcessor.process_example builds it
    (problem text without follow-ups' query, the starter-code snippet, asserts from input_output with
    string outputs quoted when the signature returns str). ValueError when the reference refuses it."""
    func_name = row["entry_point"]
    if not func_name.startswith("Solution()."):
        raise ValueError(f"entry point {func_name!r} is not a Solution() method")
    if not row.get("starter_code"):
        raise ValueError("no starter code")
    descr = row["problem_description"].strip()
    snippet = (f"Use the following starter code:\n```python\n{row['starter_code'].strip()}\n"
               "        # Add your code here\n```")
    question = (f"PROBLEM:\n{descr}\n\nYour solution to the problem should be a method of the class Solution "
                f"called {func_name.removeprefix('Solution().')} and should pass all tests. {snippet}\n\nSOLUTION:\n")
    quote = "-> str" in question
    tests = [f'assert {func_name}({t["input"]}) == "{t["output"]}"' if quote
             else f"assert {func_name}({t['input']}) == {t['output']}" for t in row["input_output"]]
    return {
        "id": row["question_id"], "dataset": "leetcode", "evaluator": "code", "question": question,
        "gt_answer": tests, "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "answer": tests, "hint": None, "func_name": func_name, "setup_code": row["prompt"],
        "difficulty": row["difficulty"].lower(), "canonical_solution": row["completion"],
        "prompt_metadata": {"starter_code": row["starter_code"]},
    }


def _describe(err: ValidationError) -> str:
    e = err.errors()[0]
    return f"field '{'.'.join(str(p) for p in e['loc']) or '<record>'}': {e['msg']}"


# ------------------------------------------------------------------ filters
def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataImportError(f"cannot load tokenizer {name_or_path!r} ({first}); fetch the model first or pass "
                           "--tokenizer PATH (or 'none' to skip the length filter)") from None


def prompt_tokens(problem: Problem, tokenizer, prompt_variant: str) -> int:
    """Tokens of the prompt as a rollout sees it (chat template, variant, generation prompt)."""
    text = render_prompt(tokenizer, build_messages(problem, prompt_variant))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def convert_and_filter(rows: Iterable[dict], fmt: str = "auto", difficulties: Iterable[str] = DEFAULT_DIFFICULTIES,
                       tokenizer: Any = None, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                       prompt_variant: str = "simple_overwrite_tests") -> ImportResult:
    """Rows -> Problems passing the reference's filters; everything dropped is named with its reason."""
    wanted = {d.lower() for d in difficulties}
    res, seen = ImportResult(), set()
    for i, row in enumerate(rows, 1):
        res.read += 1
        kind = detect_format(row) if fmt == "auto" else fmt
        label = str(row.get("question_id", row.get("id", f"row {i}")))
        try:
            record = from_leetcodedataset(row) if kind == "leetcodedataset" else row
        except (KeyError, TypeError, ValueError) as e:
            res.dropped[label] = f"malformed: {type(e).__name__} {e}"
            continue
        try:
            problem = Problem.model_validate(record)
        except ValidationError as e:
            res.dropped[label] = f"malformed: {_describe(e)}"
            continue
        if problem.key in seen:
            res.dropped[f"{label} (row {i})"] = "duplicate: id seen before"
            continue
        seen.add(problem.key)
        if wanted and problem.difficulty.lower() not in wanted:
            res.dropped[problem.key] = f"difficulty: {problem.difficulty}"
            continue
        if tokenizer is not None:
            n = prompt_tokens(problem, tokenizer, prompt_variant)
            if n > max_prompt_tokens:
                res.dropped[problem.key] = f"prompt length: {n} tokens > {max_prompt_tokens}"
                continue
        res.kept.append(problem)
    return res


# ------------------------------------------------------------------ validation + budgets
def validate_and_write(res: ImportResult, out: str | Path, workers: int = 2, k: float | None = None,
                       min_s: float | None = None, ceiling_s: float = 60.0, repeats: int = 2,
                       progress: bool = True, source: str = "") -> tuple[Path, Path]:
    """Calibrate every kept problem, keep those whose canonical solution passes its own tests under
    its calibrated budget, write `out` (jsonl) and its budgets sidecar; returns both paths."""
    from reward_server.calibrate import DEFAULT_K, DEFAULT_MIN_S, calibrate

    k = DEFAULT_K if k is None else k
    min_s = DEFAULT_MIN_S if min_s is None else min_s
    entries, meta = calibrate(res.kept, k=k, min_s=min_s, workers=workers, ceiling_s=ceiling_s, repeats=repeats,
                              validate=True, progress=progress) if res.kept else ({}, {})
    def why(status: str) -> str:  # "ok" = the program ran to the end and got answers wrong
        return "wrong answers on its own tests" if status == "ok" else status

    good = []
    for p in res.kept:
        e = entries[p.key]
        if not e["passed"]:
            res.dropped[p.key] = f"canonical fails: {why(e['status'])} (CPU ceiling {ceiling_s:g} s)"
        elif not e["passed_under_budget"]:
            res.dropped[p.key] = (f"canonical fails under its budget: {why(e['status_under_budget'])} "
                                  f"({e['budget_s']} s)")
        else:
            good.append(p)
    res.kept = good
    out = Path(out)
    save_problems(good, out)
    meta = {**meta, "imported_from": source, "read": res.read, "dropped": dict(sorted(res.dropped.items()))}
    side = save_budgets(out, {p.key: entries[p.key] for p in good}, meta)
    return out, side


def check_output(path: str | Path) -> None:
    """The written set loads as a run will load it (shared.problems.load_problems)."""
    from shared.problems import load_problems

    problems = load_problems(path)
    missing = [p.key for p in problems if p.time_budget_s is None]
    if missing:
        raise ProblemFormatError(f"{path}: budgets missing for {missing[:5]}")
