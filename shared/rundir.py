"""Run directories: nothing in one is deleted implicitly, and a resumed run is the run on disk.

`prepare_run_dir(cfg, mode)` is the one door the single-run entry points (`rankguard train`, `up`,
`prepare`, the launcher under the experiment runner) go through before a run writes anything:

  resume (the default): an existing config.json is read strictly (errors say file:line: what is
      wrong) and compared with this invocation's config. Keys outside `RESUME_MUTABLE` that differ
      stop the run with the diff; changes to allowed keys are applied to config.json and recorded,
      dated, in amendments.jsonl.
  fresh: a run dir that holds outputs is renamed to a timestamped sibling `<name>.old-<time>`
      (the message names it and what it held), never deleted; the new run starts in an empty folder.

`check_config_drift` is also what the experiment runner uses (allowing only OUTCOME_NEUTRAL keys) to refuse a
folder that belongs to another configuration, so both paths agree on what "the same run" means.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from .config import (ConfigError, RunConfig, read_config, read_config_json,  # noqa: F401 - re-exported
                     validate_config, write_config)

Mode = Literal["resume", "fresh"]
CONFIG_NAME = "config.json"
AMENDMENTS_NAME = "amendments.jsonl"

# Keys a resume may change: they decide how long the run goes on or how it is operated, not what
# it computes per step. train.steps changes the cosine schedule's end from the resumed step on
# (the scheduler is rebuilt with the new total); that is applied and recorded as an amendment.
RESUME_MUTABLE = frozenset({
    "run_dir",  # the folder was moved or is named by another path
    "train.steps", "train.checkpoint_every", "train.keep_checkpoints", "train.torch_threads",
    "model.svd_cache_dir",
    "pipeline.redis_url", "pipeline.rollout_workers", "pipeline.reward_workers", "pipeline.max_queue",
    "pipeline.claim_idle_s",
    "reward.workers",
})
# the subset that cannot change a run's numbers (where it lives, what it keeps, how many processes
# share the work): the experiment runner counts a finished run as done whatever these say
OUTCOME_NEUTRAL = RESUME_MUTABLE - {"train.steps", "train.checkpoint_every"}
# keys the trainer may fill in when it writes config.json; a planned None then matches any value
FILLED_BY_RUN = frozenset({"vhack_path"})


class RunDirError(ValueError):
    """A run dir that cannot be used as asked (drift, outputs without a config); says what to do."""


# -------------------------------------------------------------------------------- config drift

@dataclass(frozen=True)
class Change:
    key: str  # dotted
    saved: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} (on disk) != {self.new!r} (planned)"


@dataclass
class ConfigDrift:
    refused: list[Change] = field(default_factory=list)  # keys that may not change on resume
    allowed: list[Change] = field(default_factory=list)  # allowed keys that changed (to apply + record)

    def __bool__(self) -> bool:
        return bool(self.refused)

    def describe(self, limit: int = 6) -> str:
        parts = [str(c) for c in self.refused[:limit]]
        more = f" (+{len(self.refused) - limit} more)" if len(self.refused) > limit else ""
        return "; ".join(parts) + more


def _field_default(dotted: str) -> Any:
    """The RunConfig field default for a dotted key (KeyError when there is no such field)."""
    node: Any = RunConfig
    for part in dotted.split("."):
        field_info = node.model_fields[part]
        node = field_info.annotation
    return field_info.get_default(call_default_factory=True)


def _is_default(dotted: str, value: Any) -> bool:
    try:
        return _field_default(dotted) == value
    except (KeyError, AttributeError):
        return False


def config_changes(saved: dict, new: dict, prefix: str = "") -> list[Change]:
    """Dotted keys where a stored config.json differs from the new one. A key missing on disk whose
    new value is the field's default is no difference: the file predates the field, and the run
    behaved as the default says. A FILLED_BY_RUN key planned as None matches any stored value."""
    out = []
    for key in sorted(set(saved) | set(new)):
        dotted = prefix + key
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, dotted + ".")
        elif dotted in FILLED_BY_RUN and b is None:
            continue
        elif key not in saved and _is_default(dotted, b):
            continue
        elif a != b:
            out.append(Change(dotted, a, b))
    return out


def config_diff(saved: dict, new: dict) -> list[str]:
    """config_changes as readable lines: `key: old (on disk) != new (planned)`."""
    return [str(c) for c in config_changes(saved, new)]


def check_config_drift(saved: dict, new: dict, allowed_keys: Iterable[str] = RESUME_MUTABLE) -> ConfigDrift:
    """Split the differences between a run's stored config and a new one into refused and allowed."""
    allowed = set(allowed_keys)
    drift = ConfigDrift()
    for c in config_changes(saved, new):
        (drift.allowed if c.key in allowed else drift.refused).append(c)
    return drift


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


# -------------------------------------------------------------------------------- run dir contents

def _has_files(path: Path) -> bool:
    if not path.is_dir():
        return True
    return any(_has_files(p) for p in path.iterdir())


def run_outputs(run_dir: str | Path) -> list[Path]:
    """Entries of the run dir that hold something (an empty folder, e.g. a volume mount point, does not)."""
    root = Path(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _has_files(p))


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def describe_outputs(run_dir: str | Path) -> str:
    """What a run dir holds, for a human: `checkpoints step-20, step-30; metrics.jsonl 35 rows; ...`."""
    parts = []
    for p in run_outputs(run_dir):
        if p.name == "checkpoints" and p.is_dir():
            steps = sorted(c.name for c in p.iterdir() if c.name.startswith("step-"))
            parts.append(f"checkpoints {', '.join(steps) or '(none complete)'}")
        elif p.suffix == ".jsonl" and p.is_file():
            n = _count_lines(p)
            parts.append(f"{p.name} {n} row{'' if n == 1 else 's'}")
        else:
            parts.append(p.name + ("/" if p.is_dir() else ""))
    return "; ".join(parts) or "nothing"


def aside_path(run_dir: str | Path, now: float | None = None) -> Path:
    """A free timestamped sibling `<name>.old-<YYYYmmdd-HHMMSS>[-k]` for a run set aside."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    k = 1
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{k}")
        k += 1
    return target


def move_aside(run_dir: str | Path) -> Path:
    """Rename the run dir to a timestamped sibling (nothing is deleted); returns the new path."""
    run_dir = Path(run_dir)
    target = aside_path(run_dir)
    try:
        os.rename(run_dir, target)
    except OSError as e:  # a mount point (docker volume) or another file system
        raise RunDirError(f"cannot move {run_dir} aside to {target} ({e.strerror}); move or remove it "
                          "yourself, or use another --run-dir") from None
    return target


# -------------------------------------------------------------------------------- the door

@dataclass
class Prepared:
    """What prepare_run_dir did. `config` is the run's config from now on (what config.json says)."""

    config: RunConfig
    status: Literal["new", "resume", "fresh"]
    moved_to: Path | None = None  # fresh: where the earlier run went
    moved: str = ""  # fresh: what it held
    amended: list[Change] = field(default_factory=list)  # resume: allowed keys that changed

    def message(self) -> str:
        run_dir = self.config.run_dir
        if self.status == "fresh":
            return f"--fresh: moved the earlier run in {run_dir} ({self.moved}) aside to {self.moved_to}"
        if self.status == "resume" and self.amended:
            return f"resuming {run_dir} with amended config: " + "; ".join(
                f"{c.key} {c.saved!r} -> {c.new!r}" for c in self.amended) + f" (recorded in {AMENDMENTS_NAME})"
        if self.status == "resume":
            return f"run dir {run_dir} matches this config; continuing it"
        return f"new run in {run_dir}"


def prepare_run_dir(cfg: RunConfig, mode: Mode = "resume",
                    allowed_keys: Iterable[str] = RESUME_MUTABLE) -> Prepared:
    """Make cfg.run_dir ready for this run without losing anything; see the module docstring."""
    if mode not in ("resume", "fresh"):
        raise ValueError(f"mode must be 'resume' or 'fresh', got {mode!r}")
    run_dir = Path(cfg.run_dir)
    path = run_dir / CONFIG_NAME
    outputs = run_outputs(run_dir)
    if mode == "fresh":
        if not outputs:
            write_config(cfg, path)
            return Prepared(cfg, "new")
        what = describe_outputs(run_dir)
        target = move_aside(run_dir)
        write_config(cfg, path)
        return Prepared(cfg, "fresh", moved_to=target, moved=what)
    if not path.exists():
        if outputs:
            raise RunDirError(f"{run_dir} holds {describe_outputs(run_dir)} but no {CONFIG_NAME}, so it cannot "
                              "be checked against this run; use --fresh to move it aside, or another --run-dir")
        write_config(cfg, path)
        return Prepared(cfg, "new")
    text = path.read_text()
    saved = read_config_json(path)
    validate_config(saved, path, text)  # a bad value stops here, with its line
    drift = check_config_drift(saved, cfg.model_dump(mode="json"), allowed_keys)
    if drift:
        raise RunDirError(f"{run_dir} holds a run with a different config: {drift.describe()}. A resume may "
                          f"only change {', '.join(sorted(allowed_keys)) or 'nothing'}; rerun with the "
                          "run's settings, use --fresh to move it aside and start over, or another --run-dir")
    if not drift.allowed:
        return Prepared(validate_config(saved, path, text), "resume")
    for c in drift.allowed:
        _set_dotted(saved, c.key, c.new)
    amended = validate_config(saved, path, json.dumps(saved, indent=2))
    with (run_dir / AMENDMENTS_NAME).open("a") as f:
        f.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "changes": {c.key: {"from": c.saved, "to": c.new} for c in drift.allowed}}) + "\n")
    write_config(amended, path)
    return Prepared(amended, "resume", amended=drift.allowed)
