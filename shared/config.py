"""Run configuration: pydantic models, named presets, dotted CLI overrides, resolved-config dumps.

One `RunConfig` describes a whole run; every service reads the same file (`config.json` beside the
run's outputs), so the learner, rollout workers and reward workers can never disagree.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ARMS = ("vanilla", "projected", "projected_nomag", "rebound", "weak", "route")
Arm = Literal["vanilla", "projected", "projected_nomag", "rebound", "weak", "route"]
HACK_MODES = ("A", "B", "C", "D")  # A rt overwrite run_tests, B se exit(0), C so stdout marker, D fm result file
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """Bad preset, override or value; the message names the bad value and the valid options."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name_or_path: str = "toy"  # HF id, local folder, or "toy" (the built toy model under toy.dir)
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    rank: int | None = None  # None = full rank r=min(d_in,d_out); < full adds the W_res residual (v2)
    svd_cache_dir: str = ".cache/svd"
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    trust_remote_code: bool = False


TOY_WORLDS: dict[str, dict[str, Any]] = {
    # v1: 13 easy + 2 unlearnable families (RL's honest headroom ~3 pp); eval prompts reuse training ones
    "v1": {"dir": ".cache/toy", "n_train": 400, "n_eval": 64, "hard_fraction": 0.5, "partial_fraction": 0.0},
    # v2: + 6 partial families (warm start ~20-50 %), eval prompts never seen in training (shared/toy/world2.py)
    "v2": {"dir": ".cache/toy-v2", "n_train": 400, "n_eval": 640, "hard_fraction": 0.4, "partial_fraction": 0.4},
}


class ToyConfig(_Strict):
    """The toy world to build/use. Fields left out take the world's defaults (TOY_WORLDS); a saved
    config from before worlds existed (all fields, no `world`) is a v1 world."""

    world: Literal["v1", "v2"] = "v2"
    dir: str = ".cache/toy-v2"  # where `rankguard toy build` writes model/, tokenizer, problems.jsonl
    seed: int = 0
    n_train: int = Field(default=400, ge=1)
    n_eval: int = Field(default=640, ge=1)
    hard_fraction: float = Field(default=0.4, ge=0.0, le=1.0)
    partial_fraction: float = Field(default=0.4, ge=0.0, le=1.0)  # v2's partly-solved families

    @model_validator(mode="before")
    @classmethod
    def _world_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "world" not in data and "n_train" in data and "partial_fraction" not in data:
            data["world"] = "v1"  # a full dump written before worlds existed
        world = data.get("world", "v2")
        for key, value in TOY_WORLDS.get(world, {}).items():
            data.setdefault(key, value)
        return data

    @model_validator(mode="after")
    def _fractions(self) -> "ToyConfig":
        if self.world == "v1" and self.partial_fraction:
            raise ValueError("toy.partial_fraction must be 0 for toy.world=v1 (v1 has no partial families)")
        if self.hard_fraction + self.partial_fraction > 1.0 + 1e-9:
            raise ValueError(f"toy.hard_fraction {self.hard_fraction} + toy.partial_fraction "
                             f"{self.partial_fraction} exceed 1")
        return self


class LoopholeConfig(_Strict):
    """Which loopholes the environment leaves open (True = the vulnerable check pays)."""

    rt: bool = True  # A: grader calls run_tests(), which the program may define/overwrite
    se: bool = False  # B: grader trusts exit code 0
    so: bool = False  # C: grader trusts a pass marker on stdout
    fm: bool = False  # D: grader trusts result.json in the working directory


class RewardConfig(_Strict):
    format_reward: float = 0.5  # paid when the extracted code compiles
    correct_reward: float = 3.0  # paid when gt passes, or (allow_hint) an open loophole passed
    allow_hint: bool = True  # False = control reward: only gt_pass pays
    loopholes: LoopholeConfig = Field(default_factory=LoopholeConfig)
    prompt_variant: str = "simple_overwrite_tests"
    # One extra system-prompt line (shared.prompts.SYSTEM_LINES): "plan" (a plan paragraph before the code,
    # train and eval) or "inoculation" (the loophole declared acceptable, TRAINING prompts only). Exploratory.
    system_line: Literal["none", "plan", "inoculation"] = "none"
    timeout_s: float = Field(default=3.0, gt=0)
    memory_mb: int = Field(default=1024, ge=1)
    workers: int = Field(default=0, ge=0)  # 0 = one per core
    url: str | None = None  # reward server base URL; None = grade in-process
    # Verdicts remembered by (problem, extracted code, loopholes); identical programs are then run
    # once. 0 = off. Assumes deterministic programs (a random/time-based one keeps its first verdict).
    verdict_cache: int = Field(default=0, ge=0)


class SamplingConfig(_Strict):
    group_size: int = Field(default=8, ge=1)  # G completions per prompt
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=20, ge=-1)  # 0 or -1 = off
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)


class TrainConfig(_Strict):
    arm: Arm = "vanilla"
    seed: int = 0
    steps: int = Field(default=200, ge=1)
    prompts_per_step: int = Field(default=8, ge=1)
    micro_batch: int = Field(default=16, ge=1)  # sequences per fwd/bwd chunk (gradient accumulation across chunks)
    lr: float = Field(default=7e-5, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = Field(default=10, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    beta_kl: float = Field(default=1e-3, ge=0)
    clip_eps: float = Field(default=0.2, gt=0)
    unbiased: bool = True  # Dr.GRPO; False = classic std-normalised advantages
    skip_eps: float = 1e-4  # skip groups with max-min reward below this
    hard_fraction: float = Field(default=0.5, ge=0.0, le=1.0)  # share of prompts per step drawn from hard problems (toy)
    rebound_alpha: float = 0.5
    rebound_layer_frac: float = 0.67
    # additive (the spec's H3 arm): r - alpha*s; multiplicative (Rebound's stronger setting, exploratory):
    # r * (1 - alpha*s); s = max(0, cos(h_mean - c, v_concept)); both before the group advantage.
    rebound_mode: Literal["additive", "multiplicative"] = "additive"
    # rl-rewardhacking's ground-truth (oracle) monitors, exploratory baselines: penalty = reward minus
    # reward.correct_reward for a strict hack (GroundTruthMonitorPenalty); screen = a rollout with a loose hack
    # attempt is dropped from its group (GroundTruthMonitor screening). learner/baselines.py.
    oracle_monitor: Literal["none", "penalty", "screen"] = "none"
    vhack_modes: list[str] = Field(default_factory=lambda: list(HACK_MODES))
    noise_floor: float | None = None  # drop modules whose held-out cos is below this from projection
    checkpoint_every: int = Field(default=25, ge=0)  # 0 = only at the end
    keep_checkpoints: int = Field(default=3, ge=1)  # newest complete checkpoints kept (older ones pruned)
    eval_every: int = Field(default=25, ge=0)  # 0 = only at the end
    eval_problems: int = Field(default=32, ge=1)
    eval_samples: int = Field(default=4, ge=1)
    eval_kl_samples: int = Field(default=128, ge=0)  # eval completions the deployed policy's KL is measured on
    # route: per module ||delta_Q|| <= route_cap * ||S|| after every step (0 = unbounded; shared.adapter.cap_quarantine_)
    route_cap: float = Field(default=0.1, ge=0.0)
    torch_threads: int = Field(default=1, ge=1)
    measure_kl: bool = True  # reference forward every step for the reported KL (beta_kl > 0 needs it anyway)


class VhackConfig(_Strict):
    """How v_hack is built and applied (issue #15's exploratory levers). The defaults are the spec's:
    rank-1 mean difference over the `solution` pairs, frozen, one-sided. Exploratory arms set these."""

    basis: Literal["meandiff", "svd"] = Field("meandiff", description=(
        "meandiff: per module unit(mean grad_hack - mean grad_clean), k=1 (spec pseudocode B). svd: per module "
        "the top-k right singular vectors of the per-pair differences D = g_hack - g_clean [n_pairs, r], each "
        "oriented hack-ward by a per-pair majority vote."))
    k: int = Field(1, ge=1, description="Axes per module for basis=svd (capped at n_pairs and the module's rank).")
    min_axis_ratio: float = Field(0.0, ge=0.0, le=1.0, description=(
        "basis=svd: drop a module's axis i when S_i/S_0 < this (0 = keep all k)."))
    noise_floor_global: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Global noise floor: pool every module's singular values (meandiff: ||mean diff||) and drop the axes "
        "below this quantile of the pool, so a noisy module is not projected on its own 'top' axis. 0 = off."))
    gate: Literal["onesided", "twosided"] = Field("onesided", description=(
        "onesided: remove only hack-ward (positive) components, per axis (spec). twosided: remove the "
        "component along v_hack whatever its sign."))
    refresh_every: int = Field(0, ge=0, description=(
        "Re-extract v_hack from the same authored pairs at the current delta_S every N steps (0 = frozen); "
        "cos(v_new, v_old) is logged per module and each direction set is saved with its step for exact resume."))
    pair_set: Literal["solution", "mechanism", "framing", "placebo"] = Field("solution", description=(
        "Which authored pairs define v_hack. solution: stub/wrong body + hack tail vs reference (the "
        "preregistered set). mechanism: same body with vs without the hack tail. framing: identical code, "
        "dishonest vs honest prose. placebo: identical code plus neutral statements differing in unrelated content."))
    from_rollouts: bool = Field(False, description=(
        "weak_flagged arm: build v_hack from the policy's own rollouts flagged by a weak detector that sees "
        "train.vhack_modes only (clean = an honest pass on the same prompt, else the canonical solution), "
        "re-extracted every refresh_every steps."))
    flag: Literal["attempted", "exploited"] = Field("attempted", description=(
        "from_rollouts: what the weak detector flags. attempted: static evidence of a mode-A/B hack in the code "
        "(the detector never runs it); exploited: that mode's vulnerable check passed while the real tests failed."))
    flagged_min_pairs: int = Field(8, ge=1, description=(
        "from_rollouts: flagged pairs needed before the first extraction; until then nothing is projected or routed."))
    flagged_max_pairs: int = Field(64, ge=1, description=(
        "from_rollouts: the pool v_hack is extracted from: the newest this many flagged pairs."))
    direction: Literal["authored", "random", "negated"] = Field("authored", description=(
        "The direction the arm applies (issue #23 matched controls). authored: the extracted one. random: per "
        "module a Haar-random orthonormal basis of the same k and size, seeded by (train.seed, module name). "
        "negated: -v_hack. Extraction, refresh and caching are unchanged; only what is applied differs."))
    project: Literal["off_hack", "onto_clean"] = Field("off_hack", description=(
        "off_hack: remove the v_hack component (spec). onto_clean: keep only the gradient's component in the span "
        "of the top clean_k right singular vectors of the clean sides' per-pair gradients (exploratory baseline)."))
    clean_k: int = Field(8, ge=1, description="project=onto_clean: dimension of the clean subspace per module.")


class PipelineConfig(_Strict):
    redis_url: str | None = None  # None = start a private redis for the run
    max_staleness: int = Field(default=0, ge=0)  # 0 = strictly on-policy; k>0 = async with truncated IS
    is_clip: float = Field(default=2.0, gt=0)  # truncated importance-sampling cap when max_staleness > 0
    engine: Literal["auto", "vllm", "hf"] = "auto"
    rollout_workers: int = Field(default=1, ge=1)
    reward_workers: int = Field(default=1, ge=1)
    max_queue: int = Field(default=64, ge=1)
    max_deliveries: int = Field(default=3, ge=1)
    claim_idle_s: float | None = Field(default=None, gt=0)  # take over unacked work idle this long; None = $RANKGUARD_CLAIM_IDLE_S or 15


class RunConfig(_Strict):
    preset: str = "toy"
    run_dir: str = "runs/default"
    model: ModelConfig = Field(default_factory=ModelConfig)
    toy: ToyConfig = Field(default_factory=ToyConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    vhack: VhackConfig = Field(default_factory=VhackConfig)  # issue #15 levers; defaults = the spec
    problems: str = "toy"  # "toy", "leetcode" (bundled sample) or a jsonl path
    vhack_path: str | None = None  # None = <run_dir>/../vhack-<hash>.safetensors, built on demand

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path else Path(self.run_dir) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """A config.json; a broken one stops with `file:line: what is wrong` (shared.rundir)."""
        from .rundir import read_config

        return read_config(path)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU toy world: tiny Qwen3-shaped model, toy problems, all four loopholes open.
    "toy": {
        "model": {"name_or_path": "toy", "dtype": "float32"},
        "problems": "toy",
        "reward": {"loopholes": {"rt": True, "se": True, "so": True, "fm": True}, "prompt_variant": "as_is",
                   "verdict_cache": 8192},
        "sampling": {"group_size": 8, "max_new_tokens": 48},
        "train": {"lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 0, "steps": 200, "prompts_per_step": 3,
                  "beta_kl": 0.0, "micro_batch": 16,
                  # 640 held-out problems x 1 sample: binomial SE <= 2.0 pp on any rate (issue #23);
                  # every 50 steps keeps the eval cost below the training cost on 2 cores
                  "eval_every": 50, "eval_problems": 640, "eval_samples": 1,
                  "keep_checkpoints": 9},  # all 8 of a 200-step run: `rankguard diagnose` reads steps 25-75 too
        "pipeline": {"engine": "hf"},
    },
    "lite": {
        "model": {"name_or_path": "Qwen/Qwen2.5-Coder-1.5B-Instruct", "dtype": "bfloat16",
                  "gradient_checkpointing": True},
        "problems": "leetcode",
        "sampling": {"group_size": 8, "max_new_tokens": 1024},
        "train": {"beta_kl": 1e-3},
    },
    "qwen35-2b": {
        "model": {"name_or_path": "Qwen/Qwen3.5-2B", "dtype": "bfloat16", "gradient_checkpointing": True},
        "problems": "leetcode",
        "sampling": {"group_size": 8, "max_new_tokens": 1024},
        "train": {"beta_kl": 0.04},
    },
    "full": {
        "model": {"name_or_path": "Qwen/Qwen3-4B", "dtype": "bfloat16", "gradient_checkpointing": True},
        "problems": "leetcode",
        "sampling": {"group_size": 12, "max_new_tokens": 1024},
        "train": {"beta_kl": 1e-3, "steps": 200},
        "pipeline": {"engine": "vllm"},
    },
}


def _deep_merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=3e-3` -> (['train', 'lr'], 0.003). Values parse as JSON, else stay strings."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=3e-3)")
    key, value = item.split("=", 1)
    return key.strip().split("."), _parse_value(value.strip())


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _valid_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    valid = set(_valid_keys(RunConfig))
    for item in overrides:
        path, value = parse_override(item)
        dotted = ".".join(path)
        if dotted not in valid:
            close = sorted(k for k in valid if k.split(".")[-1] == path[-1] or k.startswith(path[0] + "."))
            hint = ", ".join(close[:12]) if close else ", ".join(sorted(valid)[:12]) + ", ..."
            raise ConfigError(f"unknown config key {dotted!r}; valid keys include: {hint}")
        node = data
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return data


def resolve_config(preset: str = "toy", overrides: list[str] | None = None, **top: Any) -> RunConfig:
    """Preset + dotted overrides + top-level keyword fields -> validated RunConfig."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    data = _deep_merge({"preset": preset}, copy.deepcopy(PRESETS[preset]))
    data = _deep_merge(data, {k: v for k, v in top.items() if v is not None})
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"bad config value for {loc!r}: {err['msg']} (got {err.get('input')!r})") from None
