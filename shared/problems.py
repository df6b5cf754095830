"""Coding problems in rl-rewardhacking's jsonl record format (LeetCode and the toy world alike)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:  # pragma: no cover
    from shared.config import RunConfig

BUNDLED_LEETCODE = Path(__file__).parent / "data" / "leetcode_medhard_dev.jsonl"


class ProblemFormatError(ValueError):
    """A problem file that does not parse; the message names file, line and field."""


class Message(BaseModel):
    role: str
    content: str


class PromptMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    starter_code: str = ""


class Problem(BaseModel):
    """One problem. Extra upstream fields (dataset, hint, answer, ...) are kept, not required."""

    model_config = ConfigDict(extra="allow")
    id: int | str
    question: str
    prompt: list[Message] = Field(default_factory=list)
    gt_answer: list[str] = Field(min_length=1)
    func_name: str
    setup_code: str = ""
    canonical_solution: str = ""
    difficulty: str = "unknown"
    prompt_metadata: PromptMetadata = Field(default_factory=PromptMetadata)

    @property
    def key(self) -> str:
        """Stable string id used on the wire and in result files."""
        return str(self.id)

    @property
    def starter_code(self) -> str:
        return self.prompt_metadata.starter_code


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<record>"
        parts.append(f"field '{loc}': {e['msg']}")
    return "; ".join(parts)


def parse_problems(lines: Iterable[str], source: str = "<memory>") -> list[Problem]:
    out: list[Problem] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProblemFormatError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(raw, dict):
            raise ProblemFormatError(f"{source}:{lineno}: expected a JSON object, got {type(raw).__name__}")
        try:
            out.append(Problem.model_validate(raw))
        except ValidationError as e:
            raise ProblemFormatError(f"{source}:{lineno}: {_describe(e)}") from None
    return out


def load_problems(path: str | Path) -> list[Problem]:
    """Load a jsonl problem file; a malformed record raises ProblemFormatError naming line and field."""
    path = Path(path)
    if not path.exists():
        raise ProblemFormatError(f"problem file not found: {path}")
    with path.open() as f:
        problems = parse_problems(f, source=str(path))
    ids = [p.key for p in problems]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise ProblemFormatError(f"{path}: duplicate problem ids {sorted(dupes)[:5]}")
    return problems


def save_problems(problems: Iterable[Problem], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for p in problems:
            f.write(json.dumps(p.model_dump(mode="json")) + "\n")
    tmp.replace(path)


def load_leetcode_sample() -> list[Problem]:
    """The 58 bundled medium/hard LeetCode problems."""
    return load_problems(BUNDLED_LEETCODE)


# ---------------------------------------------------------------- train / eval sets of a run
# (here, not in shared.modeling, so services that only grade never import torch)
TOY_TRAIN_FILE, TOY_EVAL_FILE = "problems_train.jsonl", "problems_eval.jsonl"
EVAL_SHARE = 4  # a problem is held out for eval when sha1(id) % EVAL_SHARE == 0 (~25 %)


def _is_eval(problem: Problem) -> bool:
    return int(hashlib.sha1(problem.key.encode()).hexdigest(), 16) % EVAL_SHARE == 0


def split_problems(problems: list[Problem]) -> tuple[list[Problem], list[Problem]]:
    """Deterministic ~75/25 train/eval split by a hash of each problem id (stable across runs)."""
    train = [p for p in problems if not _is_eval(p)]
    held = [p for p in problems if _is_eval(p)]
    return train, held


def load_problem_sets(cfg: "RunConfig") -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems: "toy" -> the built toy files; "leetcode" -> bundled sample; else a jsonl path."""
    src = cfg.problems
    if src == "toy":
        root = Path(cfg.toy.dir)
        train_f, eval_f = root / TOY_TRAIN_FILE, root / TOY_EVAL_FILE
        for f in (train_f, eval_f):
            if not f.exists():
                raise ProblemFormatError(f"toy problems not found at {f}; run `rankguard toy build` first")
        return load_problems(train_f), load_problems(eval_f)
    if src == "leetcode":
        return split_problems(load_leetcode_sample())
    path = Path(src).expanduser()
    if not path.exists():
        raise ProblemFormatError(f"problem set {src!r} not found; use 'toy', 'leetcode' or a jsonl path")
    return split_problems(load_problems(path))
