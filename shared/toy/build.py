"""`build_toy(cfg)`: problems + tokenizer + tiny Qwen3 + warm start, cached by a config fingerprint.

Layout of <dir>: model/ (safetensors + tokenizer, loadable offline with from_pretrained),
problems_train.jsonl, problems_eval.jsonl, build.json (fingerprint, timings, stats). The build
happens in a sibling temp dir that is renamed into place, and build.json (written last) records
every file's size, so a crash or a truncated file is never mistaken for a finished build.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from pydantic import BaseModel, ConfigDict

from ..config import LoopholeConfig, RewardConfig, ToyConfig
from ..problems import Problem, load_problems, save_problems
from . import prebuilt, tasks, world2
from .model import make_model, param_count
from .tokenizer import train_tokenizer
from .warmstart import QUICK_WARM, WarmStartConfig, auto_threads, corpus_texts, sample_completions, warm_start

# (RewardConfig, workers=n) -> a grader (a context manager with grade_many): reward_server.grader.Grader,
# injected by the caller (services/, analysis/, tests/), since shared/ imports no other package
GraderFactory = Callable[..., Any]

BUILD_VERSION = 2  # bump when the generator, tokenizer or recipe changes meaning (world v1)
WORLD_VERSIONS = {"v1": BUILD_VERSION, "v2": 3}  # each world's build version (v1's stays 2: its shipped build)
V2_ONLY_FIELDS = {"toy": {"world", "partial_fraction"}, "warm": {"partial_correct_share"}}
WARM_ENV = "RANKGUARD_TOY_WARM"  # JSON overrides of WarmStartConfig, e.g. '{"steps": 20}' for fast tests
TRAIN_FILE, EVAL_FILE, BUILD_FILE, MODEL_DIR = "problems_train.jsonl", "problems_eval.jsonl", "build.json", "model"
REQUIRED = (f"{MODEL_DIR}/config.json", f"{MODEL_DIR}/model.safetensors", f"{MODEL_DIR}/tokenizer.json",
            f"{MODEL_DIR}/tokenizer_config.json", TRAIN_FILE, EVAL_FILE)

__all__ = ["ToyArtifacts", "WarmStartConfig", "QUICK_WARM", "build_toy", "ensure_toy_world", "load_toy_problems",
           "toy_status", "resolve_warm", "fingerprint"]


class ToyBuildError(ValueError):
    """A toy build that cannot be made or read; the message names the directory and the problem."""


class ToyArtifacts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dir: Path
    model_dir: Path
    train_problems: Path
    eval_problems: Path
    fingerprint: str
    seconds: float  # wall time of the build that produced these files
    param_count: int
    stats: dict[str, Any]
    cached: bool  # True when this call reused an existing build
    shipped: bool = False  # True when this call unpacked the shipped build (shared/toy/prebuilt/)


def resolve_warm(warm: WarmStartConfig | None = None) -> WarmStartConfig:
    """Explicit argument > $RANKGUARD_TOY_WARM (JSON) > defaults."""
    if warm is not None:
        return warm
    raw = os.environ.get(WARM_ENV)
    if not raw:
        return WarmStartConfig()
    try:
        return WarmStartConfig.model_validate(json.loads(raw))
    except (ValueError, TypeError) as e:
        raise ToyBuildError(f"${WARM_ENV}={raw!r} is not a valid WarmStartConfig JSON: {e}") from None


def fingerprint(cfg: ToyConfig, warm: WarmStartConfig) -> str:
    """Hash of everything that changes the build's content (not where it lives, not threads)."""
    if cfg.world == "v1":  # the exact pre-v2 hash, so the shipped v1 build stays reachable
        return _hash({"v": BUILD_VERSION, "toy": cfg.model_dump(exclude={"dir"} | V2_ONLY_FIELDS["toy"]),
                      "warm": warm.model_dump(exclude={"threads"} | V2_ONLY_FIELDS["warm"])})
    return _hash({"v": WORLD_VERSIONS[cfg.world], "toy": cfg.model_dump(exclude={"dir"}),
                  "warm": warm.model_dump(exclude={"threads"})})


def _hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _file_sizes(root: Path) -> dict[str, int]:
    return {rel: (root / rel).stat().st_size for rel in REQUIRED}


def toy_status(directory: str | Path, expect: str | None = None) -> tuple[bool, str, dict | None]:
    """(complete, reason, build.json) for a build dir; complete means usable as-is for `expect`."""
    root = Path(directory)
    meta_path = root / BUILD_FILE
    if not meta_path.exists():
        return False, f"no {BUILD_FILE} in {root}", None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return False, f"{meta_path} unreadable ({e})", None
    if expect is not None and meta.get("fingerprint") != expect:
        return False, f"config changed (built {meta.get('fingerprint')}, want {expect})", meta
    sizes = meta.get("files", {})
    for rel in REQUIRED:
        f = root / rel
        if not f.exists():
            return False, f"missing {rel}", meta
        if sizes.get(rel) != f.stat().st_size:
            return False, f"{rel} has the wrong size (truncated or edited)", meta
    return True, "ok", meta


def _artifacts(root: Path, meta: dict, cached: bool, shipped: bool = False) -> ToyArtifacts:
    return ToyArtifacts(dir=root, model_dir=root / MODEL_DIR, train_problems=root / TRAIN_FILE,
                        eval_problems=root / EVAL_FILE, fingerprint=meta["fingerprint"],
                        seconds=meta["seconds"], param_count=meta["param_count"], stats=meta["stats"],
                        cached=cached, shipped=shipped)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One builder per directory; a second caller waits, then finds the finished build."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def build_toy(cfg: ToyConfig | None = None, force: bool = False, warm: WarmStartConfig | None = None,
              progress: bool = True, log: Callable[[str], None] | None = None,
              make_grader: GraderFactory | None = None) -> ToyArtifacts:
    """Build (or reuse) the toy world in cfg.dir. Same config twice -> the second call returns at once.

    make_grader grades the warm-started policy's samples for build.json's stats (pass, hack rates);
    without it the stats hold parse rates only and say "grader": "unavailable".
    """
    cfg = cfg or ToyConfig()
    warm = resolve_warm(warm)
    root = Path(cfg.dir)
    fp = fingerprint(cfg, warm)
    say = log or (lambda _msg: None)
    ok, reason, meta = toy_status(root, fp)
    if ok and not force:
        return _artifacts(root, meta, cached=True)
    with _locked(root):
        ok, reason, meta = toy_status(root, fp)  # someone may have built it while we waited
        if ok and not force:
            return _artifacts(root, meta, cached=True)
        _remove_leftovers(root)
        tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shipped = not force and _unpack_shipped(fp, tmp)
            if shipped:
                meta = json.loads((tmp / BUILD_FILE).read_text())
                say(f"toy world {fp}: unpacked the shipped build into {root} "
                    "(`rankguard toy build --force` builds it from source)")
            else:
                say(f"building toy world in {root} ({'forced' if force else reason})")
                with _torch_threads(warm.threads or auto_threads()):
                    meta = _build_into(tmp, cfg, warm, fp, progress, say, make_grader)
            _swap_into_place(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _artifacts(root, meta, cached=False, shipped=shipped)


def _unpack_shipped(fp: str, tmp: Path) -> bool:
    """The shipped archive for `fp` unpacked into tmp and checked like any finished build."""
    if not prebuilt.unpack(fp, tmp):
        return False
    ok, reason, _ = toy_status(tmp, fp)
    if not ok:
        raise ToyBuildError(f"shipped toy world {prebuilt.archive_path(fp)} is unusable ({reason}); "
                            "run `rankguard toy build --force` to build from source")
    return True


def ensure_toy_world(cfg, make_grader: GraderFactory | None = None) -> None:
    """Build the toy model and problems first when a toy run (toy model or toy problems) finds none.

    Every entry point that starts a run (`rankguard train`, `up`, `prepare`) calls this once,
    with the reward server's Grader for the build's stats (see build_toy).
    """
    if cfg.model.name_or_path != "toy" and cfg.problems != "toy":
        return
    root = Path(cfg.toy.dir)
    if all((root / r).exists() for r in REQUIRED):
        built = _built_world(root)
        if built in (None, cfg.toy.world):
            return
        print(f"{root} holds toy world {built}, the run wants {cfg.toy.world}; rebuilding ...", file=sys.stderr, flush=True)
    else:
        print(f"toy world not found under {root}; building it (once) ...", file=sys.stderr, flush=True)
    build_toy(cfg.toy, make_grader=make_grader)


def _built_world(root: Path) -> str | None:
    """The world a build dir holds (None when its build.json is unreadable: left to toy_status)."""
    try:
        return prebuilt.world_of(json.loads((root / BUILD_FILE).read_text()))
    except (OSError, json.JSONDecodeError):
        return None


def _remove_leftovers(root: Path) -> None:
    """Temp/old dirs of builders that died (we hold the lock, so no live builder owns one)."""
    for p in root.parent.glob(f".{root.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.parent.glob(f".{root.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _swap_into_place(tmp: Path, root: Path) -> None:
    old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
    if root.exists():
        root.rename(old)
    tmp.rename(root)
    shutil.rmtree(old, ignore_errors=True)


def _build_into(out: Path, cfg: ToyConfig, warm: WarmStartConfig, fp: str, progress: bool,
                say: Callable[[str], None], make_grader: GraderFactory | None) -> dict:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    out.mkdir(parents=True)
    train, evals, extra = world_problems(cfg, warm)
    pool = train + extra
    save_problems(train, out / TRAIN_FILE)
    save_problems(evals, out / EVAL_FILE)
    timings["problems"] = round(time.perf_counter() - t0, 2)

    t = time.perf_counter()
    tok = train_tokenizer(corpus_texts(pool), vocab_size=warm.vocab_size, phrases=tasks.PHRASES)
    timings["tokenizer"] = round(time.perf_counter() - t, 2)

    # The embedding is always vocab_size rows (a small corpus may yield fewer BPE tokens).
    model = make_model(max(len(tok), warm.vocab_size), tok.eos_token_id, tok.pad_token_id, seed=cfg.seed)
    say(f"model: {param_count(model):,} params; warm start {warm.steps} steps x {warm.batch_size}")
    warm_info = warm_start(model, tok, pool, warm, seed=cfg.seed, progress=progress)
    timings["warm_start"] = warm_info.pop("seconds")

    t = time.perf_counter()
    stats = sample_stats(model, tok, evals, warm, seed=cfg.seed, make_grader=make_grader)
    timings["stats"] = round(time.perf_counter() - t, 2)

    model_dir = out / MODEL_DIR
    with quiet_transformers():
        model.save_pretrained(model_dir)  # safetensors
    tok.save_pretrained(model_dir)
    _portable_tokenizer_config(model_dir)
    meta = {
        "fingerprint": fp,
        "build_version": BUILD_VERSION,
        "toy": cfg.model_dump(),
        "warm": warm.model_dump(),
        "param_count": param_count(model),
        "vocab_size": len(tok),
        "n_train": len(train),
        "n_eval": len(evals),
        "n_warm_pool": len(pool),
        "warm_start": warm_info,
        "stats": stats,
        "timings": timings,
        "seconds": round(time.perf_counter() - t0, 2),
        "torch_threads": torch.get_num_threads(),
        "files": _file_sizes(out),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (out / BUILD_FILE).write_text(json.dumps(meta, indent=2))  # last: marks the build complete
    return meta


def world_problems(cfg: ToyConfig, warm: WarmStartConfig) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """(train, eval, warm-start-only) problems of cfg.world; none of the others repeats an eval instance
    (v2: not even an eval prompt)."""
    if cfg.world == "v1":
        train, evals = tasks.make_splits(cfg.seed, cfg.n_train, cfg.n_eval, cfg.hard_fraction)
        held_out = {tasks.problem_signature(p) for p in evals}
        extra = tasks.generate_problems(warm.extra_problems, cfg.seed, "warm", 0.5, held_out | {
            tasks.problem_signature(p) for p in train})
        return train, evals, extra
    train, evals = world2.make_splits(cfg.seed, cfg.n_train, cfg.n_eval, cfg.hard_fraction, cfg.partial_fraction)
    extra = world2.warm_problems(warm.extra_problems, cfg.seed, {tasks.problem_signature(p) for p in train})
    return train, evals, extra


def _portable_tokenizer_config(model_dir: Path) -> None:
    """transformers 5 writes class 'TokenizersBackend' and a list of extra specials, which 4.x (the GPU
    box's vLLM may pin one) cannot read; the 4.x spelling loads in both. Template inlined for old readers."""
    path = model_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    template = model_dir / "chat_template.jinja"
    if template.exists():
        cfg["chat_template"] = template.read_text()
    path.write_text(json.dumps(cfg, indent=2))


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No 'Writing model shards' bar for a 4 MB file."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def stats_grader(make_grader: GraderFactory | None):
    """A grader with all four loopholes open (the stats count every hack), or None without a factory."""
    if make_grader is None:
        return None
    return make_grader(RewardConfig(loopholes=LoopholeConfig(rt=True, se=True, so=True, fm=True)), workers=2)


def sample_stats(model, tok, evals: list[Problem], warm: WarmStartConfig, seed: int = 0,
                 completions: list[str] | None = None, make_grader: GraderFactory | None = None) -> dict[str, Any]:
    """Sample completions on held-out problems and grade them: parse / pass / hack rates."""
    n = warm.stats_samples
    if n <= 0 or not evals:
        return {"samples": 0}
    if any(p.difficulty == "partial" for p in evals):  # world v2: every eval problem once (per-kind rates)
        n = max(n, len(evals))
    probs = [evals[i % len(evals)] for i in range(n)]
    texts = completions or sample_completions(model, tok, probs, warm.stats_max_new_tokens, 1.0, seed)
    return grade_stats(probs, texts, make_grader)


def grade_stats(probs: list[Problem], texts: list[str],
                make_grader: GraderFactory | None = None) -> dict[str, Any]:
    from ..prompts import extract_code  # noqa: PLC0415

    def compiles(text: str) -> bool:
        code = extract_code(text)
        if code is None:
            return False
        try:
            compile(code, "<completion>", "exec")
        except (SyntaxError, ValueError):
            return False
        return True

    n = len(texts)
    stats: dict[str, Any] = {"samples": n, "parse": round(sum(map(compiles, texts)) / n, 4)}
    grader = stats_grader(make_grader)
    if grader is None:
        stats["grader"] = "unavailable"
        return stats
    with grader:
        grades = grader.grade_many(list(zip(probs, texts)))
    hard = [p.difficulty == "hard" for p in probs]

    def rate(flags: list[bool], mask: list[bool] | None = None) -> float | None:
        sel = [f for f, m in zip(flags, mask or [True] * n) if m]
        return round(sum(sel) / len(sel), 4) if sel else None

    passed = [bool(g.gt_pass) for g in grades]
    kinds = [p.difficulty for p in probs]
    stats.update({
        "grader": "ok",
        "pass": rate(passed),
        "pass_easy": rate(passed, [k not in ("hard", "partial") for k in kinds]),
        "pass_hard": rate(passed, hard),
        "formatted": rate([bool(g.formatted) for g in grades]),
        "hack_strict": rate([any(g.exploited.values()) for g in grades]),
        "hack_loose": rate([any(getattr(g, "attempted", {}).values()) for g in grades]),
    })
    if "partial" in kinds:  # world v2
        stats["pass_partial"] = rate(passed, [k == "partial" for k in kinds])
        for kind in world2.KINDS:
            stats[f"hack_strict_{kind}"] = rate([any(g.exploited.values()) for g in grades],
                                                [k == kind for k in kinds])
        stats["pass_by_family"] = {f: rate(passed, [p.family == f for p in probs])
                                   for f in sorted({p.family for p in probs})}
    for m in "ABCD":
        stats[f"hack_strict_{m}"] = rate([bool(g.exploited.get(m)) for g in grades])
        stats[f"hack_loose_{m}"] = rate([bool(getattr(g, "attempted", {}).get(m)) for g in grades])
    return stats


def load_toy_problems(directory: str | Path) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) problems of a finished build."""
    root = Path(directory)
    ok, reason, _ = toy_status(root)
    if not ok:
        raise ToyBuildError(f"toy build in {root} is not usable ({reason}); run `rankguard toy build`")
    return load_problems(root / TRAIN_FILE), load_problems(root / EVAL_FILE)
