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

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from .config import (ConfigError, RunConfig, read_config, read_config_json,  # noqa: F401 - re-exported
                     validate_config, write_config)

Mode = Literal["resume", "fresh"]
CONFIG_NAME = "config.json"
AMENDMENTS_NAME = "amendments.jsonl"
RUN_ID_NAME = "run_id"  # one line: this run's id, written by the run's first learner start

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
    # where the run's processes run and how vLLM spreads over its devices (issue #21); `.*` = any key below
    "placement.*", "vllm.gpu_memory_utilization", "vllm.tensor_parallel_size",
    "tracking.report_to", "tracking.offline", "tracking.project",  # where the rows are also sent, not what they say
})
# the subset that cannot change a run's numbers (where it lives, what it keeps, how many processes
# share the work): the experiment runner counts a finished run as done whatever these say
OUTCOME_NEUTRAL = RESUME_MUTABLE - {"train.steps", "train.checkpoint_every"}
# free-form dict fields compared (and amended) whole, not key by key
LEAF_DICTS = frozenset({"placement.resources"})
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
        if isinstance(a, dict) and isinstance(b, dict) and dotted not in LEAF_DICTS:
            out += config_changes(a, b, dotted + ".")
        elif key not in saved and isinstance(b, dict):  # a section newer than the file: compare key by key
            out += config_changes({}, b, dotted + ".")
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
        (drift.allowed if key_allowed(c.key, allowed) else drift.refused).append(c)
    return drift


def key_allowed(key: str, allowed: Iterable[str]) -> bool:
    """`key` is in `allowed`, or under an entry written `section.*` (placement.* covers placement.resources.a100)."""
    return any(key == a or (a.endswith(".*") and key.startswith(a[:-1])) for a in allowed)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


# -------------------------------------------------------------------------------- run identity
# A checkpoint carries the identity of the run that wrote it, so a resume never continues another
# run's checkpoints (e.g. two runs whose checkpoints folders are the same volume): the run id is a
# random id born with the run's first learner start and kept in the run dir (a --fresh start moves the
# dir aside, so it is a new run), the fingerprint hashes every config
# key that decides what the run computes (all but RESUME_MUTABLE and FILLED_BY_RUN).

def _drop_dotted(data: dict, keys: Iterable[str]) -> dict:
    """data without the dotted keys (`section.*` drops the whole section)."""
    out = json.loads(json.dumps(data))
    for dotted in keys:
        node, parts = out, dotted.removesuffix(".*").split(".")
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return out


def config_fingerprint(config: RunConfig | dict) -> str:
    """sha256 (16 hex) of the outcome-relevant config: everything a resume may not change."""
    data = config.model_dump(mode="json") if isinstance(config, RunConfig) else config
    relevant = _drop_dotted(data, RESUME_MUTABLE | FILLED_BY_RUN)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def run_id(run_dir: str | Path, create: bool = True) -> str | None:
    """The run's id from `<run_dir>/run_id`; created (race-free) when missing and `create`."""
    path = Path(run_dir) / RUN_ID_NAME
    if not path.exists() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(uuid.uuid4().hex + "\n")
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text:
        raise RunDirError(f"{path} is empty; it should hold the run's id (write any unique line to adopt "
                          "the checkpoints in this run dir)")
    return text


def run_identity(cfg: RunConfig) -> dict[str, str]:
    """What every checkpoint of this run carries: {"run_id", "config_fingerprint"}."""
    return {"run_id": run_id(cfg.run_dir), "config_fingerprint": config_fingerprint(cfg)}


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


# -------------------------------------------------------------------------------- one writer per run dir
class RunDirBusy(RunDirError):
    """Another process holds the run dir's lock; the message says who."""


class RunDirLock:
    """An exclusive lock on a run dir, held for the life of the process that runs it (`rankguard up`,
    `rankguard train`): a second one on the same dir exits at once, naming the holder, instead of
    both writing (two learners, two Redis servers on one AOF). The lock is the sibling file
    `.<name>.lock` (outside the dir, so `--fresh` moving the dir aside keeps it locked) holding the
    holder's pid, host and command; the kernel releases it when the holder exits, however it exits."""

    def __init__(self, run_dir: str | Path, what: str = "rankguard") -> None:
        import fcntl
        import socket
        import sys

        run_dir = Path(run_dir).resolve()
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.path = run_dir.parent / f".{run_dir.name}.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 4096).decode(errors="replace").strip()
            os.close(self.fd)
            try:
                h = json.loads(holder)
                who = f"{h.get('what', '?')} (pid {h.get('pid')} on {h.get('host')}, since {h.get('since')})"
            except ValueError:
                who = "another process"
            raise RunDirBusy(f"{run_dir} is in use by {who}; wait for it to finish or stop it "
                             f"(lock file {self.path})") from None
        info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:8]}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = -1


def lock_run_dir(run_dir: str | Path, what: str = "rankguard") -> RunDirLock:
    """Take the run dir's lock or raise RunDirBusy naming its holder (see RunDirLock)."""
    return RunDirLock(run_dir, what)
