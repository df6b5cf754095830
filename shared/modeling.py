"""Load the policy (HF name, local folder, or the toy model) wrapped with AntiPaSTO, and the problem sets.

`load_policy(cfg)` is the one place every service gets its model from, so the learner, the HF
rollout engine and `rankguard adapter report` see identical module names and SVD factors.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.adapter import wrap_model
from shared.config import RunConfig
from shared.problems import (EVAL_SHARE, TOY_EVAL_FILE, TOY_TRAIN_FILE, Problem, ProblemFormatError,  # noqa: F401
                             load_leetcode_sample, load_problem_sets, load_problems, split_problems)
from shared.svd_cache import CacheStats, SVDCache

log = logging.getLogger("rankguard.modeling")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOY_MODEL_SUBDIR = "model"


class ModelLoadError(ValueError):
    """Model or tokenizer that cannot be loaded; one line naming the path/name and what to do."""


@dataclass
class Policy:
    model: nn.Module
    tokenizer: Any
    module_names: list[str]  # wrapped AntiPaSTO modules in model order ([] when wrap=False)
    model_id: str  # the resolved path or HF name (SVD cache key)
    revision: str | None = None
    load_s: float = 0.0
    wrap_s: float = 0.0
    cache_stats: CacheStats = field(default_factory=CacheStats)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __iter__(self):  # `model, tokenizer = load_policy(cfg)` (the ARCHITECTURE.md shape)
        return iter((self.model, self.tokenizer))


def resolve_model_path(cfg: RunConfig) -> str:
    """"toy" -> <toy.dir>/model (must exist); a folder -> its absolute path; else the HF name as given."""
    name = cfg.model.name_or_path
    if name == "toy":
        path = Path(cfg.toy.dir) / TOY_MODEL_SUBDIR
        if not (path / "config.json").exists():
            raise ModelLoadError(f"toy model not found at {path}; run `rankguard toy build` first "
                                 f"(or set toy.dir=... to where it was built)")
        return str(path.resolve())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"model folder {p} has no config.json (not a saved HF model)")
        return str(p.resolve())
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]:
        raise ModelLoadError(f"model path not found: {name}")
    return name


def _attn_implementation(requested: str | None) -> str | None:
    """Keep flash-attn optional: fall back to sdpa when it is asked for but unusable here."""
    if requested and requested.startswith("flash_attention"):
        if not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None:
            log.warning("attn_implementation=%s needs CUDA + flash-attn; using sdpa", requested)
            return "sdpa"
    return requested


def _load_error(name: str, revision: str | None, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if offline:
        return ModelLoadError(f"cannot load model {name!r}{f' @ {revision}' if revision else ''}: not a local "
                              f"folder and not in the local HF cache (HF_HUB_OFFLINE=1); download it first "
                              f"or give a folder path ({first})")
    return ModelLoadError(f"cannot load model {name!r}{f' @ {revision}' if revision else ''}: {first}")


def load_tokenizer(cfg: RunConfig, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or resolve_model_path(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(path, cfg.model.revision, e) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: RunConfig, path: str | None = None, device: str | torch.device | None = None) -> nn.Module:
    """AutoModelForCausalLM in cfg.model.dtype on `device` (default cuda if present), eval mode."""
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(cfg)
    kwargs: dict[str, Any] = dict(revision=cfg.model.revision, dtype=DTYPES[cfg.model.dtype],
                                  trust_remote_code=cfg.model.trust_remote_code)
    attn = _attn_implementation(cfg.model.attn_implementation)
    if attn:
        kwargs["attn_implementation"] = attn
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(path, cfg.model.revision, e) from None
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    model = model.to(dev).eval()
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.config.use_cache = False
    return model


def load_policy(cfg: RunConfig, wrap: bool = True, device: str | torch.device | None = None,
                progress: bool = True) -> Policy:
    """Model + tokenizer from cfg.model, AntiPaSTO-wrapped (SVDs from cfg.model.svd_cache_dir)."""
    path = resolve_model_path(cfg)
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg, path)
    model = load_model(cfg, path, device)
    load_s = time.perf_counter() - t0
    policy = Policy(model=model, tokenizer=tok, module_names=[], model_id=path, revision=cfg.model.revision,
                    load_s=load_s)
    if wrap:
        cache = SVDCache(cfg.model.svd_cache_dir)
        t0 = time.perf_counter()
        policy.module_names = wrap_model(model, cfg.model.target_modules, rank=cfg.model.rank, cache=cache,
                                         model_id=path, revision=cfg.model.revision, progress=progress)
        policy.wrap_s = time.perf_counter() - t0
        policy.cache_stats = cache.stats
    return policy
