"""Coding problems in rl-rewardhacking's jsonl record format (LeetCode and the toy world alike)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

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
    # CPU seconds per check, calibrated from the canonical solution (`rankguard problems calibrate`,
    # kept in the set's sidecar file, see load_problems); None = the grader's default budget.
    time_budget_s: float | None = Field(None, gt=0)

    @model_serializer(mode="wrap")
    def _drop_unset_budget(self, handler):
        """Records without a budget serialize exactly as the upstream format (no extra key)."""
        data = handler(self)
        if isinstance(data, dict) and data.get("time_budget_s") is None:
            data.pop("time_budget_s", None)
        return data

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
    """Load a jsonl problem file; a malformed record raises ProblemFormatError naming line and field.
    Calibrated time budgets from the set's sidecar file (budgets_path) are applied to records that
    carry none, where the problem's tests are still the ones that were calibrated."""
    path = Path(path)
    if not path.exists():
        raise ProblemFormatError(f"problem file not found: {path}")
    with path.open() as f:
        problems = parse_problems(f, source=str(path))
    ids = [p.key for p in problems]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise ProblemFormatError(f"{path}: duplicate problem ids {sorted(dupes)[:5]}")
    budgets = load_budgets(path)
    for p in problems:
        entry = budgets.get(p.key)
        if p.time_budget_s is None and entry and entry.get("tests") == problem_fingerprint(p):
            p.time_budget_s = float(entry["budget_s"])
    return problems


# ---------------------------------------------------------------- calibrated time budgets
def budgets_path(path: str | Path) -> Path:
    """Where a problem set's calibrated budgets live: `<set>.budgets.json` beside it."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".jsonl") + ".budgets.json")


def problem_fingerprint(p: Problem) -> str:
    """What a calibration measured: setup, tests and canonical solution (a change voids the budget)."""
    return hashlib.sha1("\x00".join([p.setup_code, p.canonical_solution, *p.gt_answer]).encode()).hexdigest()


def load_budgets(path: str | Path) -> dict[str, dict]:
    """problem id -> {"budget_s", "canonical_cpu_s", "tests"} from the sidecar; {} when there is none."""
    side = budgets_path(path)
    if not side.exists():
        return {}
    try:
        data = json.loads(side.read_text())
        return {str(k): v for k, v in data["problems"].items() if isinstance(v, dict) and "budget_s" in v}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ProblemFormatError(f"{side}: not a budgets file ({e})") from None


def save_budgets(path: str | Path, entries: dict[str, dict], meta: dict[str, Any]) -> Path:
    """Write the sidecar of problem set `path` (entries as load_budgets returns them)."""
    side = budgets_path(path)
    tmp = side.with_suffix(".tmp")
    tmp.write_text(json.dumps({**meta, "problems": dict(sorted(entries.items()))}, indent=1) + "\n")
    tmp.replace(side)
    return side


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


def _load_set(path: str, key: str) -> list[Problem]:
    """One problem file named by config key `key`; missing, malformed or empty: one line saying so."""
    path_ = Path(path).expanduser()
    if not path_.is_file():
        raise ProblemFormatError(f"{key}: problem file {path!r} not found (make it with `rankguard problems import`)")
    problems = load_problems(path_)
    if not problems:
        raise ProblemFormatError(f"{key}: {path} holds no problems")
    return problems


def load_problem_sets(cfg: "RunConfig") -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems: problems.train + problems.eval as given (disjoint ids); else the source:
    "toy" -> the built toy files; "leetcode" -> bundled sample, hash split; else a jsonl path, hash split."""
    spec = cfg.problems
    if spec.train is not None and spec.eval is not None:
        train, held = _load_set(spec.train, "problems.train"), _load_set(spec.eval, "problems.eval")
        shared_ids = sorted({p.key for p in train} & {p.key for p in held})
        if shared_ids:
            raise ProblemFormatError(f"problems.eval shares {len(shared_ids)} problem ids with problems.train "
                                     f"({', '.join(shared_ids[:5])}): a held-out set must be disjoint")
        return train, held
    src = spec.source
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


def check_problem_sets(cfg: "RunConfig") -> list[str]:
    """Load the run's sets as every service will (so a missing or malformed set stops `prepare` with one
    line instead of a reward worker that restarts forever); returns warnings for requests the sets
    cannot meet (train.eval_problems above the eval set's size)."""
    train, held = load_problem_sets(cfg)
    if not train:
        raise ProblemFormatError("the training set holds no problems")
    return eval_shortfall(cfg, train, held)


def eval_shortfall(cfg: "RunConfig", train: list[Problem], held: list[Problem]) -> list[str]:
    """A warning when train.eval_problems asks for more problems than evaluation has (it uses them all)."""
    pool = len(held) or len(train)
    want = cfg.train.eval_problems
    if want <= pool:
        return []
    which = "eval set" if held else "training set (no eval set)"
    return [f"train.eval_problems={want} but the {which} has {pool} problems; each evaluation uses those {pool}"]
