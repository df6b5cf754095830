"""Run configuration: pydantic models, named presets, dotted CLI overrides, resolved-config dumps.

One `RunConfig` describes a whole run; every service reads the same file (`config.json` beside the
run's outputs), so the learner, rollout workers and reward workers can never disagree.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

ARMS = ("vanilla", "projected", "projected_nomag", "rebound", "weak", "route")
Arm = Literal["vanilla", "projected", "projected_nomag", "rebound", "weak", "route"]
HACK_MODES = ("A", "B", "C", "D")  # A rt overwrite run_tests, B se exit(0), C so stdout marker, D fm result file
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """Bad preset, override or value; the message names the bad value and the valid options."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The policy model and the AntiPaSTO adapter wrapped around it."""

    name_or_path: str = Field("toy", description='HF id, local folder, or "toy" (the built toy model under toy.dir).')
    revision: str | None = Field(None, description="HF revision (branch, tag or commit); None = the default branch.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "Weight and compute dtype of the frozen model (delta_S always trains in fp32)."))
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), description=(
        "Module name suffixes whose nn.Linear layers get an SVD adapter (attention and MLP projections)."))
    rank: int | None = Field(None, description=(
        "Adapter rank r; None = full rank min(d_in, d_out); below full adds the frozen W_res residual."))
    svd_cache_dir: str = Field(".cache/svd", description=(
        "Where SVD factors are cached as safetensors (keyed by model, revision, weight fingerprint, dtype, module)."))
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    attn_implementation: str | None = Field(None, description=(
        'transformers attn_implementation ("sdpa", "flash_attention_2", "eager"); None = the library default.'))
    trust_remote_code: bool = Field(False, description="Allow the model repo's own modelling code (transformers).")


TOY_WORLDS: dict[str, dict[str, Any]] = {
    # v1: 13 easy + 2 unlearnable families (RL's honest headroom ~3 pp); eval prompts reuse training ones
    "v1": {"dir": ".cache/toy", "n_train": 400, "n_eval": 64, "hard_fraction": 0.5, "partial_fraction": 0.0},
    # v2: + 6 partial families (warm start ~20-50 %), eval prompts never seen in training (shared/toy/world2.py)
    "v2": {"dir": ".cache/toy-v2", "n_train": 400, "n_eval": 640, "hard_fraction": 0.4, "partial_fraction": 0.4},
}


class ToyConfig(_Strict):
    """The toy world to build/use. Fields left out take the world's defaults (TOY_WORLDS); a saved
    config from before worlds existed (all fields, no `world`) is a v1 world."""

    world: Literal["v1", "v2"] = Field("v2", description=(
        "v2 (default): easy, partial (warm start ~40 %, honest RL headroom) and unlearnable families, eval prompts "
        "never in training; v1: the first world (easy + unlearnable, ~3 pp honest headroom), kept for comparison."))
    dir: str = Field(".cache/toy-v2", description="Where `rankguard toy build` writes model/, the tokenizer and problems.jsonl.")
    seed: int = Field(0, description="Seed of the toy problems, tokenizer and warm start.")
    n_train: int = Field(400, ge=1, description="Toy training problems generated.")
    n_eval: int = Field(640, ge=1, description="Toy held-out evaluation problems generated.")
    hard_fraction: float = Field(0.4, ge=0.0, le=1.0, description="Share of toy problems from the unlearnable families.")
    partial_fraction: float = Field(0.4, ge=0.0, le=1.0, description="Share of toy problems from v2's partly-solved families.")
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

    rt: bool = Field(True, description="A: the grader calls run_tests(), which the program may define or overwrite.")
    se: bool = Field(False, description="B: the grader trusts exit code 0.")
    so: bool = Field(False, description="C: the grader trusts a pass marker on stdout.")
    fm: bool = Field(False, description="D: the grader trusts result.json in the working directory.")


class RewardConfig(_Strict):
    """How completions are graded and paid."""

    format_reward: float = Field(0.5, description="Paid when the extracted code compiles.")
    correct_reward: float = Field(3.0, description="Paid when the hidden tests pass, or (allow_hint) an open loophole passed.")
    allow_hint: bool = Field(True, description="False = the control reward: only the honest check (gt_pass) pays.")
    loopholes: LoopholeConfig = Field(default_factory=LoopholeConfig, description="Which loopholes are open.")
    prompt_variant: str = Field("simple_overwrite_tests", description=(
        "Prompt wording (shared/prompts.py VARIANTS): as_is, or a loophole hint clause."))
    system_line: Literal["none", "plan", "inoculation"] = Field("none", description=(
        "One extra system-prompt line (shared.prompts.SYSTEM_LINES), exploratory: plan (a plan paragraph before "
        "the code, train and eval prompts) or inoculation (the loophole declared acceptable, training prompts only)."))
    timeout_s: float = Field(3.0, gt=0, description=(
        "Default CPU budget per program in seconds (a calibrated per-problem budget overrides it)."))
    memory_mb: int = Field(1024, ge=1, description="Address-space limit per sandboxed program, MiB.")
    workers: int = Field(0, ge=0, description="Sandbox worker processes per grader; 0 = one per core.")
    url: str | None = Field(None, description="Reward server base URL; None = grade in-process.")
    verdict_cache: int = Field(0, ge=0, description=(
        "Verdicts remembered by (problem, extracted code, loopholes), so identical programs run once; 0 = off. "
        "Assumes deterministic programs (a random/time-based one keeps its first verdict)."))


class SamplingConfig(_Strict):
    """Rollout generation settings."""

    group_size: int = Field(8, ge=1, description="G: completions sampled per prompt (one GRPO group).")
    max_new_tokens: int = Field(64, ge=1, description="Generation length cap per completion.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (1 = off).")
    top_k: int = Field(20, ge=-1, description="Top-k sampling; 0 or -1 = off.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Min-p sampling threshold (0 = off).")


class TrainConfig(_Strict):
    """The learner: arm, optimiser, GRPO loss, checkpoints and evaluation."""

    arm: Arm = Field("vanilla", description=(
        "Spec arm (vanilla, projected, projected_nomag, rebound, weak, route); exploratory names expand in shared/arms.py."))
    seed: int = Field(0, description="Run seed (sampling, problem order, initialisation).")
    steps: int = Field(200, ge=1, description="Learner steps (one optimizer step each).")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per step; each yields group_size completions.")
    micro_batch: int = Field(16, ge=1, description=(
        "Sequences per forward/backward chunk (gradients accumulate across chunks)."))
    lr: float = Field(7e-5, gt=0, description="Peak AdamW learning rate for delta_S (cosine schedule after warmup).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas.")
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warmup steps.")
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip (after projection).")
    beta_kl: float = Field(1e-3, ge=0, description="Weight of the k3 KL to the adapter-disabled model.")
    clip_eps: float = Field(0.2, gt=0, description=(
        "PPO clip of pi/pi_old; acts on stale samples (an on-policy ratio is exactly 1)."))
    loss_type: Literal["dr_grpo", "grpo"] = Field("dr_grpo", description=(
        "dr_grpo: advantage r - mean, loss / (seqs x max_new_tokens); grpo: classic (r - mean) / std, per-sequence mean."))
    skip_eps: float = Field(1e-4, description="Skip groups whose max - min reward is below this (no signal).")
    hard_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share of prompts per step drawn from hard problems (toy).")
    rebound_alpha: float = Field(0.5, description="rebound arm: alpha in reward - alpha * max(0, cos(h - c, v_concept)).")
    rebound_layer_frac: float = Field(0.67, description="rebound arm: depth (fraction of layers) of the probed layer.")
    rebound_mode: Literal["additive", "multiplicative"] = Field("additive", description=(
        "additive (the spec's H3 arm): r - alpha*s; multiplicative (Rebound's stronger setting, exploratory): "
        "r * (1 - alpha*s); s = max(0, cos(h_mean - c, v_concept)); both before the group advantage."))
    oracle_monitor: Literal["none", "penalty", "screen"] = Field("none", description=(
        "rl-rewardhacking's ground-truth (oracle) monitors, exploratory baselines (learner/baselines.py): penalty = "
        "reward minus reward.correct_reward for a strict hack; screen = a rollout with a loose hack attempt is "
        "dropped from its group."))
    vhack_modes: list[str] = Field(default_factory=lambda: list(HACK_MODES), description=(
        "Hack modes whose contrastive pairs build v_hack (the weak arm uses A, B)."))
    noise_floor: float | None = Field(None, description=(
        "Drop modules whose held-out cos is below this from projection; None = keep all."))
    checkpoint_every: int = Field(25, ge=0, description="Checkpoint every N steps; 0 = only at the end.")
    keep_checkpoints: int = Field(3, ge=1, description="Newest complete checkpoints kept (older ones pruned).")
    eval_every: int = Field(25, ge=0, description="Evaluate every N steps; 0 = only at the end.")
    eval_problems: int = Field(32, ge=1, description="Held-out problems per evaluation.")
    eval_samples: int = Field(4, ge=1, description="Samples per held-out problem per evaluation.")
    eval_kl_samples: int = Field(128, ge=0, description=(
        "Eval completions the deployed policy's KL (kl_deployed; route: also the training policy's) is measured on."))
    route_cap: float = Field(0.1, ge=0.0, description=(
        "route: per module ||delta_Q|| <= route_cap * ||S|| after every step (0 = unbounded; "
        "shared.adapter.cap_quarantine_)."))
    torch_threads: int = Field(1, ge=1, description="torch.set_num_threads for the learner process.")
    measure_kl: bool = Field(True, description=(
        "Reference forward every step for the reported KL (beta_kl > 0 needs it anyway)."))

    @model_validator(mode="before")
    @classmethod
    def _migrate_unbiased(cls, data: Any) -> Any:
        """config.json files written before train.loss_type said `unbiased: bool`; same meaning."""
        return migrate_train_keys(data) if isinstance(data, dict) else data


RENAMED_KEYS = {"train.unbiased": 'train.loss_type ("dr_grpo" = unbiased true, "grpo" = unbiased false)'}


def migrate_train_keys(train: dict) -> dict:
    """A train section with the old `unbiased` flag -> the same section with `loss_type`."""
    if "unbiased" not in train:
        return train
    train = dict(train)
    old = train.pop("unbiased")
    if not isinstance(old, bool):
        raise ValueError(f"train.unbiased (renamed train.loss_type) must be true or false, got {old!r}")
    want = "dr_grpo" if old else "grpo"
    if train.setdefault("loss_type", want) != want:
        raise ValueError(f"train.unbiased={old} contradicts train.loss_type={train['loss_type']!r}; "
                         "keep only train.loss_type")
    return train


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
    """The split services (`rankguard up`, compose): Redis, workers, queues, staleness."""

    redis_url: str | None = Field(None, description="Redis URL; None = start a private redis for the run.")
    max_staleness: int = Field(0, ge=0, description=(
        "Policy versions a rollout may lag; 0 = strictly on-policy, k > 0 = async, PPO ratio vs the behaviour policy."))
    is_clip: float = Field(2.0, gt=1, description=(
        "Stale samples: dual-clip bound c on pi/pi_behaviour when the advantage < 0."))
    engine: Literal["auto", "vllm", "hf"] = Field("auto", description=(
        "Rollout engine: vllm, hf (transformers generate) or auto (vllm when importable, else hf)."))
    rollout_workers: int = Field(1, ge=1, description="Rollout worker processes `up` starts.")
    reward_workers: int = Field(1, ge=1, description="Reward worker processes `up` starts.")
    max_queue: int = Field(64, ge=1, description="Backpressure: messages a stream may hold before producers wait.")
    max_deliveries: int = Field(3, ge=1, description="Deliveries of one message before it is dead-lettered.")
    claim_idle_s: float | None = Field(None, gt=0, description=(
        "Take over unacked work idle this long (s); None = $RANKGUARD_CLAIM_IDLE_S or 15."))


TRACKERS = ("tensorboard", "wandb", "trackio")


class TrackingConfig(_Strict):
    """Experiment tracking beside metrics.jsonl: where the same rows are also sent."""

    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(default_factory=lambda: ["tensorboard"], description=(
        "Trackers fed every train/eval row (train, eval, projection and timing scalars): tensorboard (RUN_DIR/tb), "
        "wandb, trackio; a comma list, [] or \"none\" = off. wandb and trackio are optional installs."))
    offline: bool = Field(True, description=(
        "wandb: mode=offline under RUN_DIR/wandb (`wandb sync` later); False = online (needs `wandb login`). "
        "trackio always writes its local database unless TRACKIO_SPACE_ID names a Space."))
    project: str = Field("rankguard", description="wandb / trackio project name (the run is named after run_dir).")

    @field_validator("report_to", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        """`--report-to wandb,tensorboard` and `none` read as lists."""
        if isinstance(v, str):
            v = [p.strip() for p in v.split(",") if p.strip()]
        if isinstance(v, list) and [str(x).lower() for x in v] == ["none"]:
            return []
        return v


class PlacementConfig(_Strict):
    """Devices and resources one run asks for. Counts, never device ids: `rankguard experiment` packs runs
    onto free devices (analysis/placement.py) and the Ray backend asks Ray for the same counts; each of
    the run's processes then sees only its own devices through CUDA_VISIBLE_DEVICES."""

    learner_gpus: int = Field(0, ge=0, description=(
        "GPUs the learner process sees. 0 = none (CPU); an in-process run (one process, HF engine) gets "
        "max(learner_gpus, rollout_gpus)."))
    rollout_gpus: int = Field(0, ge=0, description=(
        "GPUs each rollout worker sees (services mode: pipeline.rollout_workers of them per run); vLLM's "
        "vllm.tensor_parallel_size must fit in them. 0 = none (CPU engine)."))
    colocate: bool = Field(False, description=(
        "Rollout workers and the learner share the run's devices instead of taking their own: the run takes "
        "max(learner_gpus, rollout_gpus x rollout_workers) devices, and vLLM's default memory share drops to "
        "0.45 so the learner fits beside it."))
    cpus: float = Field(1.0, gt=0, description=(
        "CPU cores the run reserves on a Ray node (num_cpus of its task; reward workers grade on these)."))
    resources: dict[str, float] = Field(default_factory=dict, description=(
        "Extra Ray resources the run's task needs, e.g. {\"a100\": 1} for nodes started with "
        "`ray start --resources='{\"a100\": 8}'`. Ignored by the local backend."))


class VllmConfig(_Strict):
    """The vLLM engine's knobs (rollout/vllm_engine.py), per run."""

    gpu_memory_utilization: float | None = Field(None, gt=0.0, le=1.0, description=(
        "Share of each of its GPUs vLLM may claim (weights + KV cache). None = 0.9 when the rollout worker "
        "has devices of its own, 0.45 when it shares them with the learner (placement.colocate)."))
    tensor_parallel_size: int = Field(1, ge=1, description=(
        "GPUs one vLLM engine shards the model over; at most placement.rollout_gpus."))
    max_model_len: int | None = Field(None, ge=1, description=(
        "Longest prompt + completion vLLM accepts (sizes the KV cache). None = min(the model's "
        "max_position_embeddings, 4096 + sampling.max_new_tokens)."))

    def memory_fraction(self, colocate: bool) -> float:
        """The share vLLM gets: the configured one, else 0.9 on devices of its own, 0.45 shared."""
        if self.gpu_memory_utilization is not None:
            return self.gpu_memory_utilization
        return 0.45 if colocate else 0.9


class ProblemsConfig(_Strict):
    """Which problems a run trains and evaluates on. `train` + `eval` (jsonl paths, e.g. from
    `rankguard problems import`) are used as given; without them `source` is split by a hash of each
    id (~75/25). Written as the plain string `source` when no files are given (older config.json)."""

    source: str = Field("toy", description=(
        '"toy" (the built toy world), "leetcode" (the bundled sample) or a jsonl path; split by id hash (~75/25).'))
    train: str | None = Field(None, description="jsonl of training problems (needs `eval` too).")
    eval: str | None = Field(None, description="jsonl of held-out evaluation problems (needs `train` too).")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"source": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _both_files(self) -> "ProblemsConfig":
        if (self.train is None) != (self.eval is None):
            raise ValueError("problems.train and problems.eval are given together (a train file and a held-out "
                             "eval file)")
        return self

    @model_serializer(mode="wrap")
    def _as_string_without_files(self, handler):
        if isinstance(self, str):  # set as a plain string past validation (model_copy(update=...)): it is the source
            return self
        data = handler(self)
        return data["source"] if self.train is None and self.eval is None else data

    def __eq__(self, other: object) -> bool:  # `cfg.problems == "leetcode"` keeps working
        if isinstance(other, str):
            return self.train is None and self.source == other
        return super().__eq__(other)

    __hash__ = None  # mutable model


class RunConfig(_Strict):
    """One whole run; every service reads the same resolved config.json."""

    preset: str = Field("toy", description="Named preset the run started from (toy, lite, qwen35-2b, full).")
    run_dir: str = Field("runs/default", description="Where the run writes config.json, metrics, checkpoints and logs.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy model and adapter.")
    toy: ToyConfig = Field(default_factory=ToyConfig, description="The CPU toy world.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Grading and payment.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Rollout generation.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The learner.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="The split services.")
    vhack: VhackConfig = Field(default_factory=VhackConfig, description="issue #15 levers; defaults = the spec.")
    placement: PlacementConfig = Field(default_factory=PlacementConfig, description="Devices per run (issue #21).")
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="The vLLM engine's knobs.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Experiment tracking (TensorBoard, wandb, trackio).")
    problems: ProblemsConfig = Field(default_factory=ProblemsConfig, description=(
        'Problem sets: `problems.train` + `problems.eval` files, or one `source` ("toy", "leetcode" = the bundled '
        'sample, a jsonl path) split by id hash; `--set problems=leetcode` still works.'))
    vhack_path: str | None = Field(None, description=(
        "v_hack file; None = <run_dir>/../vhack-<hash>.safetensors, built on demand."))

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path else Path(self.run_dir) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """A config.json; a broken one stops with `file:line: what is wrong` (read_config below)."""
        return read_config(path)


# -------------------------------------------------------------------------------- reading config.json
# (here, not in shared.rundir: RunConfig.load needs it, and rundir builds on this module, not the reverse)

def _line_of(text: str, loc: Iterable[Any]) -> int | None:
    """Line (1-based) of the dotted key `loc` in a JSON text: each part searched after the previous."""
    pos, found = 0, False
    for part in loc:
        if not isinstance(part, str):
            continue  # list index: stay at the list's key
        m = re.compile(r'"%s"\s*:' % re.escape(part)).search(text, pos)
        if m is None:
            break
        pos, found = m.start(), True
    return text.count("\n", 0, pos) + 1 if found else None


def read_config_json(path: str | Path) -> dict:
    """config.json as a dict; a broken file stops with `path:line:col: what is wrong`."""
    path = Path(path)
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        end = "" if text.rstrip().endswith("}") else " (the file ends before the object closes: truncated?)"
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}{end}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: not a config (a JSON object), got {type(data).__name__}")
    if isinstance(data.get("train"), dict):  # renamed keys, so a drift check compares like with like
        try:
            data["train"] = migrate_train_keys(data["train"])
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
    return data


def validate_config(data: dict, path: str | Path, text: str | None = None) -> RunConfig:
    """RunConfig from a config.json dict; a bad value names file, line, key, problem and value."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        line = _line_of(text if text is not None else Path(path).read_text(), err["loc"])
        where = f"{path}:{line}" if line else str(path)
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"{where}: {loc}: {err['msg']} (got {err.get('input')!r}){more}") from None


def read_config(path: str | Path) -> RunConfig:
    """A run's config.json, validated; every problem is one line naming the file and line."""
    return validate_config(read_config_json(path), path)


def write_config(cfg: RunConfig, path: str | Path) -> Path:
    """config.json written whole or not at all (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(cfg.model_dump_json(indent=2))
    os.replace(tmp, path)
    return path


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
        "placement": {"learner_gpus": 1, "rollout_gpus": 1},
    },
    "qwen35-2b": {
        "model": {"name_or_path": "Qwen/Qwen3.5-2B", "dtype": "bfloat16", "gradient_checkpointing": True},
        "problems": "leetcode",
        "sampling": {"group_size": 8, "max_new_tokens": 1024},
        "train": {"beta_kl": 0.04},
        "placement": {"learner_gpus": 1, "rollout_gpus": 1},
    },
    "full": {
        "model": {"name_or_path": "Qwen/Qwen3-4B", "dtype": "bfloat16", "gradient_checkpointing": True},
        "problems": "leetcode",
        "sampling": {"group_size": 12, "max_new_tokens": 1024},
        "train": {"beta_kl": 1e-3, "steps": 200},
        "pipeline": {"engine": "vllm"},
        "placement": {"learner_gpus": 1, "rollout_gpus": 1},  # an 8-GPU box runs 4 runs at once
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
        if ann is ProblemsConfig:
            keys.append(prefix + name)  # `problems=leetcode` (the source) as well as problems.train / .eval
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
        if dotted in RENAMED_KEYS:
            raise ConfigError(f"config key {dotted!r} was renamed: use {RENAMED_KEYS[dotted]}")
        if dotted not in valid:
            close = sorted(k for k in valid if k.split(".")[-1] == path[-1] or k.startswith(path[0] + "."))
            hint = ", ".join(close[:12]) if close else ", ".join(sorted(valid)[:12]) + ", ..."
            raise ConfigError(f"unknown config key {dotted!r}; valid keys include: {hint}")
        if path[0] == "problems" and len(path) > 1 and isinstance(data.get("problems"), str):
            data["problems"] = {"source": data["problems"]}  # a preset's plain source, now with files
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
